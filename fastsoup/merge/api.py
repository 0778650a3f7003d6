"""``fastsoup.merge``: the Python API of the merge engine (the CLI is a thin layer over it).

Flow: resolve every input from its headers (:mod:`.formats`) → plan and validate
(:mod:`.plan`) → stop here for a dry run → check integer tensors → stream the sums into
pre-sized files in a temporary sibling (:mod:`.engine`, :mod:`.writer`) while a thread
hashes the inputs for the manifest (:mod:`.manifest`) → fsync → rename into place.
On any error (Ctrl-C and a full disk included) the temporary is removed and an existing
output is left as it was.

Soup maintenance (:func:`soup_add`, :func:`soup_remove`) recomputes the soup from its
constituents, listed with their sizes and sha256 in the soup's manifest; fastsoup keeps
no fp32 master. The result is bit-identical to merging the new constituent list from
scratch (the same kernel, the same order), which is stronger than "exact to fp32
rounding". Constituents are verified against the manifest (size before, sha256 during
the run) and the output is not committed if one changed.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

from .options import user_dtype
from .engine import InputMaps, budget_split, check_equal_copies, execute
from .errors import MergeError, PlanError
from .formats import WEIGHT_SUFFIXES, Layout, _is_index, resolve
from .manifest import HASH_MODES, METADATA_KEY, Hasher, build, metadata_entry, read as read_manifest, sidecar_path
from .plan import Plan, build_plan, parse_size
from .report import FilePlan, MergeReport
from ..io.atomic import FILE_MODE, TMP_MARK, write_small_file
from .writer import AtomicOutput, SafetensorsFileWriter

PathLike = Union[str, os.PathLike]
DEFAULT_MEMORY = 256 * 2**20


def _peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` on Linux (per address space,
    so not inherited across exec, unlike ``ru_maxrss``), else ``getrusage``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def _identity(path: str):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _check_inputs_and_output(layouts: List[Layout], output: str, planned: bool = False) -> None:
    problems = []
    seen: Dict[tuple, int] = {}
    for i, lay in enumerate(layouts):
        ident = _identity(lay.path)
        if ident in seen:
            problems.append(f"input {i + 1} ({lay.path}) is the same as input {seen[ident] + 1} "
                            "(duplicate inputs: use --weights to weight an input more)")
        seen.setdefault(ident, i)
    out = os.path.realpath(output)
    for i, lay in enumerate(layouts):
        paths = [lay.path] + [wf.path for wf in lay.files()]
        for p in paths:
            rp = os.path.realpath(p)
            if rp == out or rp.startswith(out.rstrip(os.sep) + os.sep):
                problems.append(f"the output {output} is (or contains) input {i + 1} ({p}); "
                                "choose another output path")
                break
            if os.path.exists(out) and os.path.isfile(out) and os.path.exists(rp) \
                    and _identity(rp) == _identity(out):
                problems.append(f"the output {output} is the same file as input {i + 1} ({p})")
                break
    for i, lay in enumerate(layouts):
        if lay.kind == "file" or planned:  # planned: a dry run's stand-in output path
            continue
        root = os.path.realpath(lay.path if os.path.isdir(lay.path) else os.path.dirname(lay.path))
        if out != root and out.startswith(root.rstrip(os.sep) + os.sep):
            problems.append(f"the output {output} is inside the folder of input {i + 1} "
                            f"({lay.path}); writing there would change that checkpoint's "
                            "layout (extra weight files next to it); choose a path outside it")
    if problems:
        raise PlanError("refusing to merge", problems)


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


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, someone else's
        return True
    return True


def _remove_stale_temporaries(output: str) -> List[str]:
    """Remove ``.NAME.fastsoup-tmp-<pid>-*`` siblings of ``output`` left by a fastsoup run
    that died (SIGKILL, power loss): only those whose process is no longer alive."""
    final = os.path.abspath(output)
    parent, name = os.path.dirname(final), os.path.basename(final)
    pattern = re.compile(r"^\." + re.escape(name) + re.escape(TMP_MARK) +
                         r"(?:old-)?(\d+)-[0-9a-f]+(?:\.fastsoup\.json)?$")
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if not m or _pid_alive(int(m.group(1))):
            continue
        p = os.path.join(parent, entry)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(p)
        except OSError:
            pass
    return removed


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) or type(exc).__name__


def output_metadata(plan: Plan, manifest: dict) -> Dict[str, str]:
    """The ``__metadata__`` of the output files: the first input's string metadata (other
    than a previous fastsoup manifest), ``"format": "pt"`` (loaders such as transformers'
    require it when metadata exists) and the ``fastsoup`` manifest."""
    meta: Dict[str, str] = {}
    first = plan.inputs[0]
    for wf in first.files():
        md = (wf.header.metadata or {}) if getattr(wf, "header", None) is not None else {}
        for k, v in md.items():
            if isinstance(k, str) and isinstance(v, str) and k != METADATA_KEY:
                meta.setdefault(k, v)
        break
    meta["format"] = "pt"
    meta.update(metadata_entry(manifest))
    return meta


def _resolve_all(paths: Sequence[PathLike], variant, allow_pickle, what="input") -> List[Layout]:
    layouts, problems = [], []
    for i, p in enumerate(paths):
        try:
            layouts.append(resolve(os.fspath(p), variant=variant, allow_pickle=allow_pickle))
        except MergeError as exc:
            problems.append(f"{what} {i + 1}: {exc}")
    if problems:
        raise PlanError(f"cannot read the {what}s", problems)
    return layouts


def _copy_side_files(plan: Plan, out: AtomicOutput, warnings: Optional[List[str]] = None) -> List[str]:
    """Copy non-weight files (configs, scheduler, tokenizer) from the first input's root.
    Symlinks to regular files are followed (a Hugging Face hub snapshot is made of them);
    symlinks to directories are not, and are reported. Files are streamed, not read whole."""
    first = plan.inputs[0]
    root = first.path if os.path.isdir(first.path) else os.path.dirname(first.path)
    if plan.kind == "file" or first.kind == "file":
        return []
    copied = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                if warnings is not None:
                    warnings.append(f"{os.path.join(rel_dir, d)}: a symlink to a directory in "
                                    f"{root}; not copied to the output")
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.endswith(WEIGHT_SUFFIXES) or _is_index(name) or name == "fastsoup.json" \
                    or name.startswith("."):
                continue
            src = os.path.join(dirpath, name)
            if not os.path.isfile(src):  # broken symlinks, sockets, fifos
                continue
            rel = os.path.normpath(os.path.join(rel_dir, name))
            dst = out.path(*rel.split(os.sep))
            if os.path.exists(dst):
                continue
            _copy_file(src, dst)
            copied.append(rel)
    return copied


def _copy_file(src: str, dst: str) -> None:
    """Stream ``src`` (symlinks followed) into a new file ``dst`` with the output's mode,
    fsynced."""
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     FILE_MODE)
        with os.fdopen(fd, "wb") as fout:
            os.fchmod(fout.fileno(), FILE_MODE)
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())


def _write_indexes(plan: Plan, out: AtomicOutput) -> None:
    for comp in plan.components:
        if not comp.index_name:
            continue
        meta = {k: v for k, v in comp.index_metadata.items() if k != "total_size"}
        meta["total_size"] = sum(f.data_bytes for f in comp.files)
        weight_map = {t.key: f.name for f in comp.files for t in f.tensors}
        text = json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n"
        parts = ([comp.name] if comp.name else []) + [comp.index_name]
        write_small_file(out.path(*parts), text.encode())


def _file_paths(plan: Plan, out: AtomicOutput) -> List[str]:
    if plan.kind == "file":
        return [out.path()]
    paths = []
    for comp in plan.components:
        for f in comp.files:
            paths.append(out.path(*(([comp.name] if comp.name else []) + [f.name])))
    return paths


def _make_report(plan: Plan, output: str, *, dry_run, accumulate, dtype, device, memory) -> MergeReport:
    files = []
    for comp in plan.components:
        for f in comp.files:
            name = os.path.basename(output) if plan.kind == "file" else \
                "/".join(([comp.name] if comp.name else []) + [f.name])
            files.append(FilePlan(name, len(f.tensors), f.data_bytes))
    counts: Dict[str, int] = {}
    summed = copied = 0
    for t in plan.tensors():
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
        summed += t.op == "sum"
        copied += t.op == "copy"
    parent = os.path.dirname(os.path.abspath(output))
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = None
    n = len(plan.input_weights)
    base_coef = 1.0 - sum(plan.coefficients) if plan.base_index is not None else None
    return MergeReport(
        output=os.path.abspath(output), kind=plan.kind, dry_run=dry_run,
        inputs=[lay.path for lay in plan.inputs[:n]],
        base=plan.inputs[plan.base_index].path if plan.base_index is not None else None,
        weights=list(plan.input_weights), coefficients=list(plan.coefficients),
        base_coefficient=base_coef, normalize=plan.normalize, key_policy=plan.key_policy,
        accumulate=accumulate, dtype=dtype, device=device, tensors=summed + copied,
        tensors_summed=summed, tensors_copied=copied, files=files,
        bytes_to_read=plan.bytes_to_read, bytes_to_write=plan.bytes_to_write,
        memory_budget=memory, disk_free=free, dropped_keys=list(plan.dropped_keys),
        warnings=list(plan.warnings), output_dtypes=dict(sorted(counts.items())))


def _tty_progress(total: int, quiet: Optional[bool]) -> Optional[Callable]:
    if quiet or (quiet is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, dynamic_ncols=True,
               desc="merging", file=sys.stderr, leave=False)
    state = {"key": None}

    def update(key: str, nbytes: int) -> None:
        if key != state["key"]:
            state["key"] = key
            bar.set_postfix_str(key[-48:], refresh=False)
        bar.update(nbytes)
    update.close = bar.close  # type: ignore[attr-defined]
    return update


def merge(inputs: Sequence[PathLike], output: Optional[PathLike],
          weights: Optional[Sequence[float]] = None,
          *, base: Optional[PathLike] = None, normalize: Optional[bool] = None,
          keys: str = "strict", dtype: Optional[str] = None, accumulate: str = "fp32",
          variant: Optional[str] = None, allow_pickle: bool = False,
          max_shard_size: Union[None, int, str] = None, memory: Union[int, str] = DEFAULT_MEMORY,
          threads: Optional[int] = None, device: str = "cpu", dry_run: bool = False,
          overwrite: bool = False, quiet: Optional[bool] = None, hash: str = "sha256",
          drop_cache: bool = False, _expect_hashes: Optional[Dict[str, str]] = None,
          _manifest_extra: Optional[dict] = None) -> MergeReport:
    """Average checkpoints, streaming: ``out = Σ_i c_i θ_i`` (or ``θ_0 + Σ_i c_i (θ_i − θ_0)``).

    Args:
        inputs: checkpoints θ_1..θ_n: ``.safetensors`` files, sharded directories (or their
            ``*.index.json``), diffusers roots; mixed layouts must resolve to the same keys.
        output: where to write; mirrors the first input's layout (a file, a sharded
            directory with its index, or a diffusers tree with the non-weight files).
            May be None for a dry run (planned as ``./soup.safetensors`` or ``./soup``).
        weights: raw weights (any reals; default uniform). ``normalize`` divides them by
            their sum (default on, off with ``base``).
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
        memory: streaming budget for mapped input windows and output buffers (bytes or
            "256MiB", the default); the resident set stays near this plus the
            interpreter's own.
        threads: CPU threads for the sum (default: all cores).
        device: "cpu" (``fastsoup._C``) or "cuda"/"cuda:N" (:func:`fastsoup.weighted_sum_`
            on the GPU). "torch:cpu" runs the device path's code on CPU tensors (tests).
        dry_run: plan and validate only: headers are read, and integer/bool tensors
            compared; no floating data is read and nothing is written.
        overwrite: replace an existing output (only once the new one is complete); a
            directory is replaced only if it is a previous fastsoup output (has fastsoup.json).
        quiet: no progress bar (default: a bar only when stderr is a terminal).
        hash: "sha256" (default; hashed in a background thread during the merge) or
            "none": the constituents' content hashes in the manifest.
        drop_cache: also drop consumed input ranges from the page cache.

    Returns:
        a :class:`MergeReport`. Raises :class:`MergeError` (or :class:`PlanError`, listing
        every problem) for bad inputs or options, ``OSError`` for I/O failures; in both
        cases nothing is left at ``output``.
    """
    if output is None and not dry_run:
        raise MergeError("no output path given (only a dry run can do without one)")
    _manifest_extra = dict(_manifest_extra or {}, default_weights=weights is None)
    if hash not in HASH_MODES:
        raise MergeError(f"unknown hash mode {hash!r} (choose {', '.join(HASH_MODES)})")
    if accumulate not in ("fp32", "fp64"):
        raise MergeError(f"accumulate must be 'fp32' or 'fp64', got {accumulate!r}")
    if dtype is not None and not isinstance(dtype, str):
        raise MergeError(f"dtype must be a name (fp32, fp16, bf16 or fp64), got {dtype!r}")
    try:
        out_dtype = user_dtype(dtype) if dtype is not None else None
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    memory_bytes = parse_size(memory)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    if device not in ("cpu", "cuda", "torch:cpu") and not device.startswith("cuda:"):
        raise MergeError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if threads is None:
        threads = os.cpu_count() or 1

    paths = list(inputs) + ([base] if base is not None else [])
    layouts = _resolve_all(paths, variant, allow_pickle)
    planned_output = output is None
    if output is None:  # dry run without an output: plan as if writing into the cwd
        output = os.path.join(os.getcwd(), "soup.safetensors" if layouts[0].kind == "file" and
                              max_shard_size is None else "soup")
    output = os.fspath(output)
    _check_inputs_and_output(layouts, output, planned=planned_output)
    constituents = layouts[: len(inputs)]
    base_layout = layouts[len(inputs)] if base is not None else None
    plan = build_plan(constituents, weights=weights, base=base_layout, normalize=normalize,
                      keys=keys, dtype=out_dtype, max_shard_size=shard_bytes)
    if plan.kind == "file" and not output.endswith(".safetensors"):
        raise MergeError(f"{output}: the output is a single safetensors file; name it *.safetensors")
    report = _make_report(plan, output, dry_run=dry_run, accumulate=accumulate,
                          dtype=out_dtype, device=device, memory=memory_bytes)
    _raise_fd_limit()  # every input file stays mapped (one descriptor each) for the run
    if dry_run:  # integer/bool tensors are compared too (they are small): a full check
        maps = InputMaps()
        try:
            check_equal_copies(plan, maps)
        finally:
            maps.close()
        report.peak_rss = _peak_rss()
        return report
    needed = plan.bytes_to_write + (1 << 20)
    if report.disk_free is not None and report.disk_free < needed:
        raise MergeError(f"{output}: not enough disk space: the output needs about "
                         f"{needed} bytes, {report.disk_free} are free")

    t0 = time.perf_counter()
    out: Optional[AtomicOutput] = None
    writers: List[SafetensorsFileWriter] = []
    hasher: Optional[Hasher] = None
    maps = InputMaps(drop_cache=drop_cache)
    progress = None
    side_tmp = None
    _remove_stale_temporaries(output)
    after_commit: List[str] = []
    try:
        out = AtomicOutput(output, is_dir=plan.kind != "file", overwrite=overwrite)
        hasher = Hasher(layouts, hash)
        check_equal_copies(plan, maps, chunk=budget_split(memory_bytes)[0])
        hasher.start()
        hashes_pending = {} if hash == "sha256" else None
        manifest = build(plan, accumulate=accumulate, dtype=out_dtype, hashes=hashes_pending)
        manifest.update(_manifest_extra)
        meta = output_metadata(plan, manifest)
        for path, f in zip(_file_paths(plan, out), (f for c in plan.components for f in c.files)):
            writers.append(SafetensorsFileWriter(path, f, meta))
        progress = _tty_progress(plan.bytes_to_write, quiet)
        stats = execute(plan, writers, memory=memory_bytes, threads=threads,
                        acc64=accumulate == "fp64",
                        device=device,
                        progress=progress, drop_cache=drop_cache, maps=maps)
        hashes = hasher.wait() if hash == "sha256" else None
        if _expect_hashes and hashes is None:
            report.warnings.append("hash='none': the constituents were checked by size only, "
                                   "not against the sha256 in the soup's manifest")
        if _expect_hashes and hashes is not None:
            bad = [p for p, h in _expect_hashes.items() if hashes and hashes.get(p) != h]
            if bad:
                raise MergeError("constituents changed since the soup was made (sha256 differs "
                                 "from its manifest): " + ", ".join(bad))
        manifest = build(plan, accumulate=accumulate, dtype=out_dtype, hashes=hashes,
                         created=manifest["created"])
        manifest.update(_manifest_extra)
        meta = output_metadata(plan, manifest)
        t_write = time.perf_counter()
        for w in writers:
            w.rewrite_header(meta)
            w.finish()
        _write_indexes(plan, out)
        copied = _copy_side_files(plan, out, report.warnings)
        side_text = (json.dumps(manifest, indent=2) + "\n").encode()
        if plan.kind != "file":
            write_small_file(out.path("fastsoup.json"), side_text)
        else:  # the sidecar is written before the commit, renamed right after it
            side_tmp = out.tmp + ".fastsoup.json"
            write_small_file(side_tmp, side_text)
        out.commit()
    except BaseException as exc:
        if out is None or not out.committed:
            if hasher is not None:
                hasher.cancel()
            for w in writers:
                w.close()
            if out is not None:
                out.abort()
            if side_tmp is not None and os.path.lexists(side_tmp):
                os.unlink(side_tmp)
            raise
        # the new output is in place (e.g. a signal delivered right after the renames):
        # report it as written, never as "nothing was written"
        after_commit.append(f"output written; a problem followed the commit: {_describe(exc)}")
    finally:
        maps.close()
        if progress is not None:
            progress.close()
    # ---- after the commit: the new output is at its final path whatever happens below
    try:
        out.remove_old()
    except BaseException as exc:
        after_commit.append(f"output written; cleanup of the previous output failed: "
                            f"{_describe(exc)} (remove {out.old} by hand)")
    if side_tmp is not None:
        side_final = sidecar_path(out.final, False)
        try:
            os.replace(side_tmp, side_final)
        except BaseException as exc:
            after_commit.append(f"output written, but its manifest sidecar {side_final} could not "
                                f"be written ({_describe(exc)}); the manifest embedded in the "
                                "output's safetensors metadata is complete and authoritative")
            try:
                if os.path.lexists(side_tmp):
                    os.unlink(side_tmp)
            except BaseException:
                pass
    report.warnings.extend(after_commit)
    report.write_seconds = time.perf_counter() - t_write
    report.seconds = time.perf_counter() - t0
    report.peak_rss = _peak_rss()
    report.manifest = manifest
    report.sidecar = sidecar_path(out.final, plan.kind != "file")
    report.copied_files = copied
    report.work_items, report.window_bytes = stats.items, stats.window_bytes
    report.staging_bytes = stats.staging_bytes
    report.timings = {"stream": stats.seconds, "sum": stats.sum_seconds,
                      "prefetch_wait": stats.prefetch_wait_seconds,
                      "write_wait": stats.write_wait_seconds,
                      "finish": report.write_seconds or 0.0}
    return report


# ------------------------------------------------------------------------ soup upkeep
_CARRIED = ("normalize", "key_policy", "accumulate", "dtype")


def _soup_options(m: dict, options: dict) -> dict:
    opts = dict(options)
    opts.setdefault("normalize", m.get("normalize"))
    opts.setdefault("keys", m.get("key_policy", "strict"))
    opts.setdefault("accumulate", m.get("accumulate", "fp32"))
    if opts.get("variant") is None and m["constituents"][0].get("variant"):
        opts["variant"] = m["constituents"][0]["variant"]
    if m.get("dtype") and "dtype" not in opts:
        names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}
        if m["dtype"] not in names:
            raise MergeError(f"the soup's manifest records an unknown output dtype "
                             f"{m['dtype']!r} (known: {', '.join(names)})")
        opts["dtype"] = names[m["dtype"]]
    return opts


def _check_recorded(entry: dict, what: str) -> None:
    path = entry["path"]
    if not os.path.exists(path):
        raise MergeError(f"{what} {path} (recorded in the soup's manifest) no longer exists; "
                         "fastsoup recomputes soups from their constituents")
    if entry.get("kind") == "file":
        size = os.path.getsize(path)
    else:
        size = 0
        for f in entry.get("files", []):
            p = os.path.join(_entry_root(entry), *f["name"].split("/"))
            if not os.path.isfile(p):
                raise MergeError(f"{what} {path}: {f['name']} (recorded in the soup's manifest) "
                                 "no longer exists")
            size += os.path.getsize(p)
    if size != entry["size_bytes"]:
        raise MergeError(f"{what} {path} changed since the soup was made "
                         f"({entry['size_bytes']} -> {size} bytes)")


def _entry_root(entry: dict) -> str:
    """The folder a manifest entry's file names are relative to (a sharded input may have
    been given as its ``*.index.json``)."""
    path = entry["path"]
    return path if os.path.isdir(path) else os.path.dirname(path)


def _expected_hashes(entries: List[dict]) -> Dict[str, str]:
    out = {}
    for e in entries:
        for f in e.get("files", []):
            if "sha256" not in f:
                continue
            p = e["path"] if e.get("kind") == "file" else \
                os.path.join(_entry_root(e), *f["name"].split("/"))
            out[p] = f["sha256"]
    return out


def soup_add(soup: PathLike, new: PathLike, output: PathLike, weight: Optional[float] = None,
             **options) -> MergeReport:
    """Add constituent ``new`` to ``soup``: ``θ' = (Σ a_i θ_i + a θ_new) / (Σ a_i + a)``.

    The soup is recomputed from the constituents in its manifest (verified by size and
    sha256) plus ``new``. A soup made with the default weights gets the default weights
    for ``n + 1`` inputs (the mean, or ``1/(n+1)`` task weights with a base); otherwise
    ``weight`` (``a``) defaults to the soup's common raw weight (the mean raw weight when
    they differ). Other keyword arguments are those of :func:`merge`
    (the soup's normalize, key policy, accumulation and dtype are kept by default).
    """
    m = read_manifest(os.fspath(soup))
    entries = m["constituents"]
    for e in entries:
        _check_recorded(e, "constituent")
    if m.get("base"):
        _check_recorded(m["base"], "base")
    raw = [float(e["weight"]) for e in entries]
    if weight is None and m.get("default_weights"):
        weights = None  # the soup used the default weights: recompute them for n + 1
    else:
        if weight is None:
            weight = raw[0] if len(set(raw)) == 1 else sum(raw) / len(raw)
        weights = raw + [float(weight)]
    opts = _soup_options(m, options)
    return merge([e["path"] for e in entries] + [os.fspath(new)], output, weights,
                 base=m["base"]["path"] if m.get("base") else None,
                 _expect_hashes=_expected_hashes(entries + ([m["base"]] if m.get("base") else [])),
                 **opts)


def soup_remove(soup: PathLike, old: PathLike, output: PathLike, **options) -> MergeReport:
    """Remove constituent ``old`` from ``soup``: ``θ' = (Σ a_i θ_i − a_j θ_j) / (Σ a_i − a_j)``,
    recomputed from the remaining constituents (see :func:`soup_add`). ``old`` is matched
    by path, or else by content (sha256) against the manifest."""
    m = read_manifest(os.fspath(soup))
    entries = m["constituents"]
    target = os.path.abspath(os.fspath(old))
    idx = [i for i, e in enumerate(entries) if os.path.abspath(e["path"]) == target]
    if not idx and os.path.exists(target):
        from .manifest import describe, file_sha256

        lay = resolve(target)
        digest = describe(lay, {wf.path: file_sha256(wf.path) for wf in lay.files()})["sha256"]
        idx = [i for i, e in enumerate(entries) if e.get("sha256") == digest]
    if not idx:
        raise MergeError(f"{old} is not a constituent of {soup} (constituents: "
                         + ", ".join(e["path"] for e in entries) + ")")
    keep = [e for i, e in enumerate(entries) if i != idx[0]]
    if not keep:
        raise MergeError(f"removing {old} would leave {soup} without constituents")
    if len(keep) < 2 and not m.get("base"):
        raise MergeError(f"removing {old} would leave one constituent; a soup of one model is "
                         f"that model ({keep[0]['path']})")
    for e in keep:
        _check_recorded(e, "constituent")
    if m.get("base"):
        _check_recorded(m["base"], "base")
    opts = _soup_options(m, options)
    weights = None if m.get("default_weights") else [float(e["weight"]) for e in keep]
    return merge([e["path"] for e in keep], output, weights,
                 base=m["base"]["path"] if m.get("base") else None,
                 _expect_hashes=_expected_hashes(keep + ([m["base"]] if m.get("base") else [])),
                 **opts)
