"""``fastsoup.merge``: the Python API of the merge engine (the CLI is a thin layer over it).

:func:`merge` is one transaction:

1. **options** — every option checked (:class:`.options.MergeOptions`);
2. **plan** — every input resolved from its headers (:mod:`.formats`), the output path
   checked against them (:mod:`.output`), keys, shapes and dtypes validated with every
   problem reported at once (:mod:`.plan`); a dry run stops here after comparing the
   integer/bool tensors;
3. **temporary** — a temporary sibling of the output (:class:`.output.AtomicOutput`);
4. **validate** — integer/bool tensors compared across inputs (they are copied);
5. **stream** — the fused sums written into pre-sized files (:mod:`.engine`,
   :mod:`.writer`) while worker threads hash the bytes the engine read (:mod:`.manifest`);
6. **verify** — the inputs' digests against those a soup's manifest recorded;
7. **finish** — final headers carrying the manifest, indexes, side files, sidecar; fsync;
8. **check** — every input file still has the identity it had when planned (device,
   inode, size, mtime, ctime): an input rewritten during the run is never committed;
9. **commit** — renamed into place (never replacing anything unless asked).

On any error before the commit (Ctrl-C and a full disk included) the temporary is
removed and an existing output is left as it was; a problem after the commit is
reported as a warning of a written output. Soup upkeep lives in :mod:`.soup`, the
report in :mod:`.report`.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from .engine import RunStats, budget_split, check_equal_copies, execute
from ..io.safetensors import file_identity
from .errors import MergeError, PlanError
from .formats import Layout, resolve
from .hashing import Hasher
from .manifest import build, output_metadata, sidecar_path
from .mmap import InputFiles, describe_identity_change, plan_files
from .options import MergeOptions
from .output import (AtomicOutput, check_output_name, check_paths, copy_side_files, describe_error, file_paths,
                     remove_stale_temporaries, write_indexes)
from .plan import Plan, build_plan
from .report import MergeReport, disk_free, human_bytes, peak_rss, plan_report, record_run
from .writer import SafetensorsFileWriter

PathLike = Union[str, os.PathLike]


def merge(inputs: Sequence[PathLike], output: Optional[PathLike],
          weights: Optional[Sequence[float]] = None,
          *, base: Optional[PathLike] = None, normalize: Optional[bool] = None,
          keys: str = "strict", dtype: Optional[str] = None, accumulate: str = "fp32",
          variant: Optional[str] = None, allow_pickle: bool = False,
          max_shard_size: Union[None, int, str] = None, memory: Union[None, int, str] = None,
          threads: Optional[int] = None, device: str = "cpu", dry_run: bool = False,
          overwrite: bool = False, quiet: Optional[bool] = None, hash: str = "sha256",
          drop_cache: bool = False, metadata: Optional[Mapping[str, str]] = None,
          method: str = "average", density: Optional[float] = None, seed: Optional[int] = None,
          weights_for=None, lora_rank: Optional[int] = None, force: bool = False,
          progress: Union[None, bool, Callable] = None,
          _expect_hashes: Optional[Dict[str, str]] = None,
          _manifest_extra: Optional[dict] = None) -> MergeReport:
    """Average checkpoints, streaming: ``out = Σ_i c_i θ_i`` (or ``θ_0 + Σ_i c_i (θ_i − θ_0)``).

    Args:
        inputs: checkpoints θ_1..θ_n: ``.safetensors`` files, sharded directories (or their
            ``*.index.json``), diffusers roots; mixed layouts must resolve to the same keys.
        output: where to write; mirrors the first input's layout (a file, a sharded
            directory with its index, or a diffusers tree with the non-weight files).
            May be None for a dry run (planned as ``./soup.safetensors`` or ``./soup``).
        weights: raw weights (any reals; default uniform), one per input in order, or a
            mapping keyed by the inputs' paths. ``normalize`` divides them by their sum
            (default on, off with ``base``). With fp32 accumulation every coefficient must
            be finite in fp32.
        base: θ_0 for task arithmetic (coefficient ``1 − Σ c_i``).
        keys: "strict" (default: every input has every key), "intersection", or "union"
            (weights renormalised per key over the inputs holding it).
        dtype: output dtype of floating tensors ("fp32", "fp16", "bf16", "fp64"); default
            each tensor's input dtype. Integer/bool tensors must be equal and are copied.
        accumulate: "fp32" (default) or "fp64".
        variant: diffusers weight variant ("fp16" reads ``*.fp16.safetensors``).
        allow_pickle: load ``.ckpt/.bin/.pt`` inputs with ``torch.load(weights_only=True)``.
        max_shard_size: re-shard into files of at most this size ("5GB" = 5·10⁹ bytes,
            "5GiB" = 5·2³⁰ bytes, or an int in bytes).
        memory: streaming budget for input windows and output buffers (bytes or text
            such as "64MiB"; default 32 MiB on the CPU, 256 MiB with a GPU ``device``); the
            resident set stays near this plus the interpreter's own.
        threads: CPU threads for the merge (default: all cores). On the CPU each reads a
            slice of every safetensors input, sums it and hashes it for the digests.
        device: "cpu" (``fastsoup._C``) or "cuda"/"cuda:N" (:func:`fastsoup.weighted_sum_`
            on the GPU). "torch:cpu" runs the device path's code on CPU tensors (tests).
        dry_run: plan and validate only: headers are read, and integer/bool tensors
            compared; no floating data is read and nothing is written.
        overwrite: replace an existing output (only once the new one is complete); a
            directory is replaced only if it is a previous fastsoup output (has fastsoup.json).
        quiet: True: no progress and no phase lines; False: a bar; None (default): a bar
            in a terminal or a Jupyter notebook (``tqdm.auto``), one line per phase on a
            non-terminal stderr such as a log file, nothing under CI (``CI`` set).
        progress: a callable ``progress(phase, done, total, key)`` called per phase
            ("plan", "merge", "verify", "finish", "commit") and, during "merge", per chunk
            (bytes written so far of ``total``; ``key`` names the tensor); ``True`` forces
            a bar, ``False`` disables progress (as ``quiet``).
        hash: "sha256" (default; hashed in a background thread during the merge) or
            "none": the constituents' content hashes in the manifest.
        drop_cache: also drop consumed input ranges from the page cache.
        method: "average" (default), "ties", "dare" (both need ``base``) or "slerp" (two
            inputs); see :mod:`fastsoup.merge.methods`. LoRA adapters are detected and
            merged exactly as products (:mod:`fastsoup.merge.lora`).
        density: TIES/DARE: fraction of task-vector entries kept (default 0.2).
        seed: DARE: seed of the drop masks (default 0).
        weights_for: per-key weights, ``{"unet/down_blocks.*": [0.7, 0.3], ...}`` or
            ``["PATTERN=w1,w2", ...]`` (globs, first match wins; :mod:`.keyweights`).
        lora_rank: compress a LoRA soup to this rank (truncated SVD).
        force: merge inputs whose metadata declares different base models.
        metadata: entries for the soup's ``__metadata__`` (``{"modelspec.title": "My
            soup"}``). The soup keeps only the input metadata every input shares; ``format``
            and ``fastsoup`` (the manifest) are written by fastsoup.

    Returns:
        a :class:`MergeReport`. Raises :class:`MergeError` (or :class:`PlanError`, listing
        every problem) for bad inputs or options, ``OSError`` for I/O failures; in both
        cases nothing is left at ``output``.
    """
    with _gc_paused():
        return _merge(inputs, output, weights, base=base, normalize=normalize, keys=keys,
                      dtype=dtype, accumulate=accumulate, variant=variant,
                      allow_pickle=allow_pickle, max_shard_size=max_shard_size, memory=memory,
                      threads=threads, device=device, dry_run=dry_run, overwrite=overwrite,
                      quiet=quiet, hash=hash, drop_cache=drop_cache, metadata=metadata,
                      method=method, density=density, seed=seed, weights_for=weights_for,
                      lora_rank=lora_rank, force=force, progress=progress,
                      _expect_hashes=_expect_hashes, _manifest_extra=_manifest_extra)


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection during a merge: a checkpoint of 50,000 tensors makes
    hundreds of thousands of small objects (header entries, plan tensors, work items),
    and the collector's passes over them, and over everything else the caller holds,
    cost more than the merge. Its objects are freed by reference counting anyway; the
    collector runs again afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _merge(inputs, output, weights, *, base, normalize, keys, dtype, accumulate, variant,
           allow_pickle, max_shard_size, memory, threads, device, dry_run, overwrite, quiet,
           hash, drop_cache, metadata, method, density, seed, weights_for, lora_rank, force,
           progress, _expect_hashes, _manifest_extra) -> MergeReport:
    if output is None and not dry_run:
        raise MergeError("no output path given (only a dry run can do without one)")
    manifest_extra = dict(_manifest_extra or {}, default_weights=weights is None)
    opts = MergeOptions.validate(
        keys=keys, dtype=dtype, accumulate=accumulate, variant=variant,
        allow_pickle=allow_pickle, max_shard_size=max_shard_size, memory=memory,
        threads=threads, device=device, dry_run=dry_run, overwrite=overwrite, quiet=quiet,
        hash=hash, drop_cache=drop_cache, metadata=metadata, method=method, density=density,
        seed=seed, weights_for=weights_for, lora_rank=lora_rank, force=force)
    if opts.metadata:
        manifest_extra["metadata"] = dict(opts.metadata)
    layouts, plan, output = _plan(inputs, output, weights, base, normalize, opts)
    from .strategy import manifest_extra as _method_manifest

    manifest_extra.update(_method_manifest(plan, opts))
    report = plan_report(plan, output, opts)
    _raise_fd_limit()  # every input file stays mapped (one descriptor each) for the run
    if opts.dry_run:  # integer/bool tensors are compared too (they are small): a full check
        maps = InputFiles()
        try:
            check_equal_copies(plan, maps)
        finally:
            maps.close()
        report.peak_rss = peak_rss()
        return report
    # an earlier run into this output killed outright (SIGKILL, the OOM killer: exit 137,
    # no message) left its temporary: freed before the space check, and said
    stale = remove_stale_temporaries(output)
    if stale:
        report.warnings.extend(
            f"removed {p}: the temporary of an earlier merge into this output that did not "
            "finish (its process is gone: killed, e.g. by the out-of-memory killer, or the "
            "machine stopped)" for p in stale)
        report.disk_free = disk_free(output)
    needed = report.bytes_to_write + (1 << 20)
    if report.disk_free is not None and report.disk_free < needed:
        raise MergeError(f"{output}: not enough disk space: the output needs about "
                         f"{needed} bytes, {report.disk_free} are free")

    t0 = time.perf_counter()
    run = _Run(plan, layouts, output, opts, manifest_extra)
    run.progress = bar = Progress.make(progress, quiet, report.bytes_to_write)
    bar.phase("plan", f"{report.tensors} tensors from {len(plan.inputs)} inputs, "
              f"{human_bytes(report.bytes_to_write)} to write")
    after_commit: List[str] = []
    try:
        run.open_temporary()
        run.check_copies()
        bar.phase("merge", output)
        run.stream()
        bar.phase("verify", "input digests" if opts.hash == "sha256" else "sizes")
        run.verify(_expect_hashes, report.warnings)
        t_write = time.perf_counter()
        bar.phase("finish", "headers, indexes, side files, fsync")
        run.finish(report.warnings)
        run.check_inputs()
        run.out.commit()
        bar.phase("commit", output)
    except BaseException as exc:
        if not run.committed:
            run.abort()
            raise
        # the new output is in place (e.g. a signal delivered right after the renames):
        # report it as written, never as "nothing was written"
        after_commit.append(f"output written; a problem followed the commit: {describe_error(exc)}")
    finally:
        run.close()
    # ---- after the commit: the new output is at its final path whatever happens below
    out = run.out
    try:
        out.remove_old()
    except BaseException as exc:
        after_commit.append(f"output written; cleanup of the previous output failed: "
                            f"{describe_error(exc)} (remove {out.old} by hand)")
    problem = out.place_sidecar()
    if problem is not None:
        after_commit.append(problem)
    report.warnings.extend(after_commit)
    report.commit_warnings = list(after_commit)
    now = time.perf_counter()
    record_run(report, run.stats, seconds=now - t0, write_seconds=now - t_write)
    report.manifest = run.manifest
    report.sidecar = sidecar_path(out.final, plan.kind != "file")
    report.copied_files = run.copied
    return report


def _plan(inputs, output, weights, base, normalize, opts: MergeOptions):
    """Resolve every input, check the output path against them and build the plan.
    Returns ``(layouts, plan, output)``: the constituents then the base, and the output
    path (a dry run without one plans ``./soup.safetensors`` or ``./soup``)."""
    inputs = _input_list(inputs)
    weights = _weight_list(weights, inputs)
    paths = list(inputs) + ([base] if base is not None else [])
    layouts = _resolve_all(paths, opts.variant, opts.allow_pickle)
    planned_output = output is None
    if output is None:  # dry run without an output: plan as if writing into the cwd
        output = os.path.join(os.getcwd(), "soup.safetensors" if layouts[0].kind == "file" and
                              opts.max_shard_size is None else "soup")
    output = os.fspath(output)
    check_paths(layouts, output, planned=planned_output)
    constituents = layouts[: len(inputs)]
    base_layout = layouts[len(inputs)] if base is not None else None
    from .strategy import build  # the weighted sum, methods, per-key weights, LoRA soups

    plan = build(constituents, base_layout, weights=weights, normalize=normalize, opts=opts)
    if plan.kind == "file" and not output.endswith(".safetensors"):
        raise MergeError(f"{output}: the output is a single safetensors file; name it *.safetensors")
    if not planned_output:
        check_output_name(output, plan.kind != "file")
    return layouts, plan, output


def _input_list(inputs) -> list:
    """``inputs`` as a list of paths; a single path (a common slip) is refused with the fix."""
    if isinstance(inputs, (str, bytes, os.PathLike)):
        raise MergeError(f"inputs must be a list of paths, got the single path {inputs!r}; "
                         f"write fs.merge([{os.fspath(inputs)!r}, ...], output)")
    try:
        items = list(inputs)
    except TypeError:
        raise MergeError(f"inputs must be a list of paths, got {type(inputs).__name__}") from None
    for i, p in enumerate(items):
        if not isinstance(p, (str, os.PathLike)):
            raise MergeError(f"input {i + 1}: expected a path, got {type(p).__name__} {p!r}")
    return items


def _weight_list(weights, inputs: list) -> Optional[List[float]]:
    """``weights`` as one number per input: a sequence in input order, or a mapping keyed
    by the inputs themselves (the paths as given); anything else is refused."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)):
        raise MergeError(f"weights must be numbers, one per input, got the string {weights!r}")
    if isinstance(weights, Mapping):
        by_path = {os.path.abspath(os.fspath(p)): i for i, p in enumerate(inputs)}
        out: List[Optional[float]] = [None] * len(inputs)
        for key, w in weights.items():
            if not isinstance(key, (str, os.PathLike)) or \
                    os.path.abspath(os.fspath(key)) not in by_path:
                raise MergeError(f"weights: a mapping must be keyed by the inputs' paths, got the "
                                 f"key {key!r} (inputs: {', '.join(map(repr, map(os.fspath, inputs)))}); "
                                 "or pass a list in input order")
            out[by_path[os.path.abspath(os.fspath(key))]] = w
        missing = [os.fspath(inputs[i]) for i, w in enumerate(out) if w is None]
        if missing:
            raise MergeError(f"weights: no weight for input(s) {', '.join(missing)}")
        weights = out
    try:
        values = list(weights)
    except TypeError:
        raise MergeError(f"weights must be a list of numbers, got {type(weights).__name__}") from None
    result = []
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)) and not hasattr(w, "__float__"):
            raise MergeError(f"weights[{i}]: expected a number, got {w!r}")
        try:
            result.append(float(w))
        except (TypeError, ValueError, OverflowError):
            raise MergeError(f"weights[{i}]: expected a number, got {w!r}") from None
    return result


class _Run:
    """The steps of :func:`merge` between the plan and the commit, and what must be undone
    if the run does not commit (:meth:`abort`)."""

    def __init__(self, plan: Plan, layouts: List[Layout], output: str, opts: MergeOptions,
                 manifest_extra: dict):
        self.plan, self.layouts, self.output, self.opts = plan, layouts, output, opts
        self.manifest_extra = manifest_extra
        self.out: Optional[AtomicOutput] = None
        self.writers: List[SafetensorsFileWriter] = []
        self.hasher: Optional[Hasher] = None
        self.maps = InputFiles(drop_cache=opts.drop_cache)
        self.progress: Optional["Progress"] = None
        self.manifest: Optional[dict] = None
        self.stats: Optional[RunStats] = None
        self.copied: List[str] = []

    @property
    def committed(self) -> bool:
        return self.out is not None and self.out.committed

    def _manifest(self, hashes: Optional[Dict[str, str]], created: Optional[str] = None) -> dict:
        manifest = build(self.plan, accumulate=self.opts.accumulate, dtype=self.opts.dtype,
                         hashes=hashes, created=created)
        manifest.update(self.manifest_extra)
        return manifest

    def open_temporary(self) -> None:
        self.out = AtomicOutput(self.output, is_dir=self.plan.kind != "file",
                                overwrite=self.opts.overwrite)
        self.hasher = Hasher(self.layouts, self.opts.hash)

    def check_copies(self) -> None:
        """Integer/bool tensors must be equal across inputs (read within the budget)."""
        check_equal_copies(self.plan, self.maps, chunk=budget_split(self.opts.memory)[0])

    def stream(self) -> None:
        """Start hashing, create the pre-sized files (headers with a placeholder manifest of
        the final length) and stream every tensor into them."""
        self.hasher.start()
        self.manifest = self._manifest({} if self.opts.hash == "sha256" else None)
        meta = output_metadata(self.plan, self.manifest, dict(self.opts.metadata))
        for path, (_, f) in zip(file_paths(self.plan, self.out), self.plan.output_files()):
            self.writers.append(SafetensorsFileWriter(path, f, meta))
        from .strategy import stream

        self.stats = stream(self.plan, self.writers, execute, memory=self.opts.memory,
                             manifest_extra=self.manifest_extra,
                             threads=self.opts.threads, acc64=self.opts.acc64,
                             device=self.opts.device,
                             progress=self.progress.update if self.progress else None,
                             drop_cache=self.opts.drop_cache, maps=self.maps,
                             digest=self.hasher if self.opts.hash == "sha256" else None)

    def verify(self, expect_hashes: Optional[Dict[str, str]], warnings: List[str]) -> None:
        """Wait for the digests of the bytes that were merged; a soup's constituents must
        match those its manifest recorded. The final manifest carries them."""
        hashes = self.hasher.wait() if self.opts.hash == "sha256" else None
        if expect_hashes and hashes is None:
            warnings.append("hash='none': the constituents were checked by size only, "
                            "not against the sha256 in the soup's manifest")
        if expect_hashes and hashes is not None:
            bad = [p for p, h in expect_hashes.items() if hashes and hashes.get(p) != h]
            if bad:
                raise MergeError("constituents changed since the soup was made (sha256 differs "
                                 "from its manifest): " + ", ".join(bad))
        self.manifest = self._manifest(hashes, created=self.manifest["created"])

    def finish(self, warnings: List[str]) -> None:
        """Final headers (fsynced files), indexes, side files and the manifest sidecar."""
        meta = output_metadata(self.plan, self.manifest, dict(self.opts.metadata))
        for w in self.writers:
            w.rewrite_header(meta)
            w.finish()
        write_indexes(self.plan, self.out)
        self.copied = copy_side_files(self.plan, self.out, warnings)
        problem = self.out.write_sidecar((json.dumps(self.manifest, indent=2) + "\n").encode())
        if problem:
            warnings.append(problem)

    def check_inputs(self) -> None:
        """Every input file must still be the one planned (device, inode, size, mtime,
        ctime), through the descriptor the merge read and at its path: an input rewritten
        in place, truncated or replaced during the run is never committed, and the digests
        in the manifest stay those of the bytes that were merged."""
        for wf in plan_files(self.plan):
            if wf.header is not None:
                self.maps.check_unchanged(wf)
                continue
            try:
                now = file_identity(os.stat(wf.path))
            except OSError as exc:
                raise MergeError(f"input {wf.path} cannot be read ({exc.strerror or exc}); "
                                 "nothing was written") from None
            if wf.identity is not None and now != wf.identity:
                raise MergeError(f"input {wf.path} changed while merging "
                                 f"({describe_identity_change(wf.identity, now)}); nothing was written")

    def abort(self) -> None:
        if self.hasher is not None:
            self.hasher.cancel()
        for w in self.writers:
            w.close()
        if self.out is not None:
            self.out.abort()

    def close(self) -> None:
        self.maps.close()
        if self.progress is not None:
            self.progress.close()


def _raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every input file stays mapped, with
    one descriptor each, for the whole merge)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


def _resolve_all(paths: Sequence[PathLike], variant, allow_pickle, what="input") -> List[Layout]:
    from ..io.safetensors import shared_headers
    from .hub import local_path

    layouts, problems = [], []
    with shared_headers():  # identical headers (fine-tunes of one base) are parsed once
        for i, p in enumerate(paths):
            try:
                layouts.append(resolve(local_path(os.fspath(p)), variant=variant,
                                       allow_pickle=allow_pickle))
            except MergeError as exc:
                problems.append(f"{what} {i + 1}: {exc}")
    if problems:
        raise PlanError(f"cannot read the {what}s", problems)
    return layouts


def _in_ci() -> bool:
    """Whether this runs under CI (``CI`` set, as GitHub Actions, GitLab, Travis, CircleCI
    and most others do): no progress at all there."""
    v = os.environ.get("CI", "").strip().lower()
    return v not in ("", "0", "false", "no")


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter/Colab kernel (stderr is no terminal there, but a bar
    is what the user sees)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    """Where a merge reports progress: a callback, a bar (``tqdm.auto``: a widget in a
    notebook, text in a terminal), one line per phase (a log file), or nothing."""

    def __init__(self, total: int, callback: Optional[Callable] = None, bar=None,
                 lines: bool = False):
        self.total, self.callback, self.bar, self.lines = total, callback, bar, lines
        self.done = 0
        self._key = None

    @classmethod
    def make(cls, progress, quiet: Optional[bool], total: int) -> "Progress":
        if callable(progress) and not isinstance(progress, bool):
            return cls(total, callback=progress)
        if progress is False or quiet or (quiet is None and progress is None and _in_ci()):
            return cls(total)
        if progress is True or quiet is False or sys.stderr.isatty() or _in_notebook():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return cls(total, lines=True)
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                       dynamic_ncols=True, desc="merging", file=sys.stderr, leave=False)
            return cls(total, bar=bar)
        return cls(total, lines=True)

    def phase(self, name: str, detail: str = "") -> None:
        if self.callback is not None:
            self.callback(name, self.done, self.total, None)
        elif self.lines:
            print(f"fastsoup-merge: {name}: {detail}" if detail else f"fastsoup-merge: {name}",
                  file=sys.stderr, flush=True)

    def update(self, key: str, nbytes: int) -> None:
        self.done += nbytes
        if self.callback is not None:
            self.callback("merge", self.done, self.total, key)
        elif self.bar is not None:
            if key != self._key:
                self._key = key
                self.bar.set_postfix_str(key[-48:], refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __bool__(self) -> bool:
        return True
