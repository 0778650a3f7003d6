"""Which merge a call asks for, planned and run: the weighted sum (with per-key
weights), a task-vector method (:mod:`.methods`) or a LoRA soup (:mod:`.lora`); and the
base fingerprint checks (:mod:`.fingerprint`).

:func:`build` replaces :func:`.plan.build_plan` in :func:`fastsoup.merge`;
:func:`stream` runs the engine over the tensors it computes and the per-tensor code over
the others; :func:`manifest_extra` is what the manifest records about the choice.
"""
from __future__ import annotations

from typing import Optional

from .errors import MergeError


def build(constituents, base, *, weights, normalize, opts):
    """The plan of a merge of ``constituents`` (and ``base``) under ``opts``
    (:class:`.options.MergeOptions`)."""
    from . import keyweights, lora, methods
    from .plan import build_plan

    if lora.any_lora(constituents):
        if opts.method != "average":
            raise MergeError(f"--method {opts.method} applies to full checkpoints; LoRA adapters "
                             "are merged exactly as products (the default method)")
        if opts.weights_for:
            raise MergeError("per-key weights are not supported for LoRA adapters yet; "
                             "give one weight per adapter")
        if base is not None:
            if normalize:
                raise MergeError("--normalize with --base: baking LoRA adapters uses the weights "
                                 "as given (default 1/n each: the mean delta)")
            plan = lora.plan_bake(constituents, base, weights=weights, keys=opts.keys,
                                  dtype=opts.dtype, max_shard_size=opts.max_shard_size,
                                  accumulate=opts.accumulate)
        else:
            plan = lora.plan_soup(constituents, weights=weights, normalize=normalize,
                                  keys=opts.keys, dtype=opts.dtype,
                                  max_shard_size=opts.max_shard_size, accumulate=opts.accumulate,
                                  lora_rank=opts.lora_rank)
    else:
        if opts.lora_rank is not None:
            raise MergeError("lora_rank compresses LoRA soups; the inputs are not LoRA adapters")
        plan = build_plan(constituents, weights=weights, base=base, normalize=normalize,
                          keys=opts.keys, dtype=opts.dtype, max_shard_size=opts.max_shard_size,
                          accumulate=opts.accumulate)
        keyweights.apply(plan, opts.weights_for)
        methods.apply_method(plan, opts)
    from .fingerprint import check_bases

    check_bases(plan, force=opts.force)
    return plan


ERROR_PLACEHOLDER = "0.000000e+00"   # fixed width: the header is rewritten in place


def manifest_extra(plan, opts) -> dict:
    """What the manifest records about the method, the per-key weights and the LoRA soup."""
    from . import keyweights, methods

    out = methods.manifest_entry(opts)
    if opts.weights_for:
        out["weights_for"] = keyweights.to_manifest(opts.weights_for)
    info = getattr(plan, "lora", None)
    if info is not None:
        entry = {"mode": info["mode"], "modules": info["modules"]}
        if info["mode"] == "compressed":
            entry.update(rank=info["rank"], relative_error_max=ERROR_PLACEHOLDER,
                         relative_error_total=ERROR_PLACEHOLDER)
        out["lora"] = entry
    fp = getattr(plan, "base_fingerprint", None)
    if fp:
        out["base_fingerprint"] = fp
    return out


def stream(plan, writers, execute, *, maps, memory: int, progress=None,
           manifest_extra: Optional[dict] = None, **kwargs):
    """Run ``execute`` (:func:`.engine.execute`) over the tensors it computes, then the
    per-tensor methods and LoRA products over the others; returns the engine's stats."""
    from .methods import execute_special, has_special, linear_view

    if not has_special(plan):
        return execute(plan, writers, maps=maps, memory=memory, progress=progress, **kwargs)
    maps.open_all(plan)
    stats = execute(linear_view(plan), writers, maps=maps, memory=memory, progress=progress,
                    **kwargs)
    cache: dict = {}
    written = execute_special(plan, writers, maps, memory=memory, progress=progress,
                              lora_cache=cache)
    stats.bytes_written += written
    from .lora import error_summary

    errors = error_summary(cache)
    if errors and manifest_extra is not None and "lora" in manifest_extra:
        for k, v in errors.items():
            manifest_extra["lora"][k] = f"{v:.6e}"
    return stats


def recorded_options(m: dict) -> dict:
    """The :func:`fastsoup.merge` options a soup's manifest ``m`` records about its method,
    per-key weights and LoRA rank (what :mod:`.soup` recomputes it with)."""
    from .keyweights import from_manifest

    out = {}
    if m.get("method") not in (None, "average"):
        out["method"] = m["method"]
        if m.get("density") is not None:
            out["density"] = m["density"]
        if m["method"] == "dare" and m.get("seed") is not None:
            out["seed"] = m["seed"]
    if m.get("weights_for"):
        out["weights_for"] = from_manifest(m["weights_for"])
    lora = m.get("lora")
    if isinstance(lora, dict) and lora.get("mode") == "compressed" and lora.get("rank"):
        out["lora_rank"] = lora["rank"]
    return out
