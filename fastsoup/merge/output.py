"""The merge output on disk: where it may go, its temporary, and what it holds besides
the weight files.

* :func:`check_paths` — refuses duplicate inputs and an output that is, contains, or lies
  inside an input (all problems at once, before anything is read);
* :class:`AtomicOutput` — the output is built in a temporary sibling that is renamed into
  place only when complete (:mod:`fastsoup.io.atomic`): at every instant the final path
  holds the old or the new output; a failed run leaves an existing output untouched,
  and only directories that are previous fastsoup outputs (holding ``fastsoup.json``)
  are replaced;
* :func:`remove_stale_temporaries` — temporaries of runs that died (SIGKILL, power loss);
* :func:`file_paths`, :func:`write_indexes`, :func:`copy_side_files` — the weight files'
  paths in the temporary, the sharded ``*.index.json`` files, and the first input's
  non-weight files (configs, scheduler, tokenizer).

A commit that was not asked to overwrite never replaces anything: it renames with
``RENAME_NOREPLACE`` (:func:`fastsoup.io.atomic.rename_noreplace`), so of two merges
racing for the same new path one commits and the other fails. Temporary names are cut
to fit the filesystem's NAME_MAX whatever the output's name. Side files are copied only
when they resolve inside their input's root (for a Hugging Face hub snapshot, also its
repository's ``blobs`` folder, where the snapshot's links point): a link to anything
else (``tokenizer/merges.txt -> /etc/shadow``) is not followed, and a copy never gets
wider permissions than its source.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from typing import Dict, List, Optional

from ..io import atomic
from ..io.atomic import DIR_MODE, FILE_MODE, TMP_MARK, write_small_file
from .errors import MergeError, PlanError, flag
from .formats import WEIGHT_SUFFIXES, Layout, _is_index
from .manifest import sidecar_path
from .plan import Plan


def _identity(path: str):
    st = os.stat(path)
    return st.st_dev, st.st_ino


# what a temporary adds to the output's name, at most: "." + TMP_MARK + "old-" + pid +
# "-" + 8 hex digits + ".fastsoup.json"
_TMP_EXTRA = 1 + len(TMP_MARK) + len("old-") + 10 + 1 + 8 + len(".fastsoup.json")


def tmp_prefix(final: str) -> str:
    """``.NAME`` for the temporaries of ``final``, ``NAME`` cut so that every temporary
    name fits the filesystem's NAME_MAX."""
    parent = os.path.dirname(os.path.abspath(final))
    limit = atomic.name_max(parent if os.path.isdir(parent) else ".")
    return atomic.short_name("." + os.path.basename(os.path.abspath(final)), "",
                             limit - _TMP_EXTRA + 1)


def check_output_name(output: str, is_dir: bool) -> None:
    """The output's name must be a valid file name (NAME_MAX); its temporaries always are
    (:func:`tmp_prefix`)."""
    parent = os.path.dirname(os.path.abspath(output))
    limit = atomic.name_max(parent if os.path.isdir(parent) else ".")
    name = os.path.basename(os.path.abspath(output))
    if len(os.fsencode(name)) > limit:
        raise MergeError(f"{output}: the output's name is {len(os.fsencode(name))} bytes, longer "
                         f"than the {limit} bytes a file name may have here; choose a shorter name")


def check_paths(layouts: List[Layout], output: str, planned: bool = False) -> None:
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


def describe_error(exc: BaseException) -> str:
    """One line for an exception in a warning ("interrupted" for Ctrl-C)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) or type(exc).__name__


class AtomicOutput:
    """The output being built: ``tmp`` is a sibling of ``final`` (same filesystem)."""

    def __init__(self, final: str, is_dir: bool, overwrite: bool = False):
        self.final = os.path.abspath(final)
        self.is_dir = is_dir
        parent = os.path.dirname(self.final)
        if not os.path.isdir(parent):
            raise MergeError(f"{final}: the parent directory {parent} does not exist")
        self.overwrite = overwrite
        if os.path.lexists(self.final) and not overwrite:
            raise MergeError(f"{final}: already exists (pass {flag('overwrite')} to replace it; "
                             "it is only replaced once the new output is complete)")
        if os.path.exists(self.final) and os.path.isdir(self.final) != is_dir:
            raise MergeError(f"{final}: exists and is a {'directory' if not is_dir else 'file'}; "
                             f"this merge writes a {'directory' if is_dir else 'file'}")
        if is_dir and os.path.isdir(self.final) and \
                not os.path.isfile(os.path.join(self.final, "fastsoup.json")):
            raise MergeError(f"{final}: exists and is not a previous fastsoup output (no "
                             f"fastsoup.json in it); {flag('overwrite')} only replaces fastsoup outputs. "
                             "Remove it yourself or choose another output path")
        self.prefix = tmp_prefix(self.final)
        self.tmp = os.path.join(parent, f"{self.prefix}{TMP_MARK}"
                                        f"{os.getpid()}-{secrets.token_hex(4)}")
        self.sidecar_tmp: Optional[str] = None
        self.committed = False
        self.old: Optional[str] = None
        if is_dir:
            os.mkdir(self.tmp, DIR_MODE)
            os.chmod(self.tmp, DIR_MODE)

    def path(self, *parts: str) -> str:
        """Where to write ``parts`` (relative to the output root) inside the temporary."""
        if not self.is_dir:
            assert not parts
            return self.tmp
        p = os.path.join(self.tmp, *parts)
        d = os.path.dirname(p)
        if not os.path.isdir(d):
            os.makedirs(d, DIR_MODE, exist_ok=True)
        return p

    def commit(self) -> None:
        """fsync the tree, then put it in place: a file with ``os.replace``; a directory
        over an existing one with an atomic exchange (Linux ``renameat2``), else two
        renames with SIGINT/SIGTERM blocked between them (the old one is renamed back if
        the second fails). At every instant the final path holds the old or the new
        output. Sets ``committed``; the previous output (if any) is left at ``old`` for
        :meth:`remove_old`."""
        if self.is_dir:
            for root, dirs, files in os.walk(self.tmp, topdown=False):
                atomic.fsync_dir(root)
        parent = os.path.dirname(self.final)
        if not self.overwrite:  # never replace what appeared meanwhile (another merge)
            with atomic.signals_deferred():
                try:
                    atomic.rename_noreplace(self.tmp, self.final)
                except FileExistsError:
                    raise MergeError(f"{self.final}: appeared while merging (another merge "
                                     f"writing the same output?); left as it is, nothing was "
                                     f"written (pass {flag('overwrite')} to replace it)") from None
                self.committed = True
        elif self.is_dir and os.path.isdir(self.final):
            with atomic.signals_deferred():  # `committed` must be set with the swap
                if atomic.exchange(self.tmp, self.final):
                    self.committed = True
                    self.old = self.tmp  # the temporary's name now holds the previous output
                else:
                    self._commit_two_renames(parent)
        else:
            with atomic.signals_deferred():
                os.replace(self.tmp, self.final)
                self.committed = True
        atomic.fsync_dir(parent)

    def _commit_two_renames(self, parent: str) -> None:
        old = os.path.join(parent, f"{self.prefix}{TMP_MARK}old-"
                                   f"{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(self.final, old)  # signals are deferred by the caller
        try:
            os.rename(self.tmp, self.final)
        except BaseException:
            os.rename(old, self.final)
            raise
        self.committed = True
        self.old = old

    def remove_old(self) -> None:
        """Remove the previous output replaced by :meth:`commit` (errors are raised: the
        new output is in place whatever happens here)."""
        if self.old is not None and os.path.lexists(self.old):
            shutil.rmtree(self.old)
        self.old = None

    def abort(self) -> None:
        """Remove the temporary and a sidecar's temporary (never the final output;
        nothing once committed)."""
        if self.committed:
            return
        try:
            if self.is_dir:
                shutil.rmtree(self.tmp, ignore_errors=True)
            elif os.path.lexists(self.tmp):
                os.unlink(self.tmp)
        except OSError:
            pass
        if self.sidecar_tmp is not None and os.path.lexists(self.sidecar_tmp):
            os.unlink(self.sidecar_tmp)

    def write_sidecar(self, data: bytes) -> Optional[str]:
        """Write the manifest sidecar: ``fastsoup.json`` inside a directory output; for a
        file output, a temporary beside it that :meth:`place_sidecar` renames into place
        right after the commit. A file output whose sidecar name would exceed NAME_MAX
        gets none (the returned warning says so; the embedded manifest is complete)."""
        if self.is_dir:
            write_small_file(self.path("fastsoup.json"), data)
            return None
        parent = os.path.dirname(self.final)
        side = os.path.basename(sidecar_path(self.final, False))
        if len(os.fsencode(side)) > atomic.name_max(parent):
            return (f"no manifest sidecar: {side[:24]}... would be longer than a file name may "
                    "be; the manifest embedded in the output's metadata is complete")
        self.sidecar_tmp = self.tmp + ".fastsoup.json"
        write_small_file(self.sidecar_tmp, data)
        return None

    def place_sidecar(self) -> Optional[str]:
        """After the commit: rename a file output's sidecar into place. Returns a warning
        instead of raising (the output is in place, its embedded manifest complete)."""
        if self.sidecar_tmp is None:
            return None
        side_final = sidecar_path(self.final, False)
        try:
            os.replace(self.sidecar_tmp, side_final)
        except BaseException as exc:
            try:
                if os.path.lexists(self.sidecar_tmp):
                    os.unlink(self.sidecar_tmp)
            except BaseException:
                pass
            return (f"output written, but its manifest sidecar {side_final} could not be "
                    f"written ({describe_error(exc)}); the manifest embedded in the output's "
                    "safetensors metadata is complete and authoritative")
        return None


# --------------------------------------------------------------------- safetensors files
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


def remove_stale_temporaries(output: str) -> List[str]:
    """Remove ``.NAME.fastsoup-tmp-<pid>-*`` siblings of ``output`` left by a fastsoup run
    that died (SIGKILL, power loss): only those whose process is no longer alive."""
    final = os.path.abspath(output)
    parent = os.path.dirname(final)
    pattern = re.compile(r"^" + re.escape(tmp_prefix(final)) + re.escape(TMP_MARK) +
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


def allowed_roots(root: str) -> List[str]:
    """Real paths a side file of the input at ``root`` may resolve into: the root, and
    for a Hugging Face hub snapshot (``.../models--ORG--NAME/snapshots/REV``, whose files
    are links into the repository's blob store) that repository's ``blobs`` folder."""
    real = os.path.realpath(root)
    roots = [real]
    snapshots = os.path.dirname(os.path.abspath(root))
    if os.path.basename(snapshots) == "snapshots":
        blobs = os.path.join(os.path.dirname(snapshots), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def _inside(path: str, roots: List[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def copy_side_files(plan: Plan, out: AtomicOutput, warnings: Optional[List[str]] = None) -> List[str]:
    """Copy non-weight files (configs, scheduler, tokenizer) from the first input's root.
    Symlinks are followed only to files inside that root (or, for a hub snapshot, its
    repository's blob store; see :func:`allowed_roots`): a link leading anywhere else is
    not copied and reported in one warning, as are links to directories. Files are
    streamed, not read whole, and keep at most their source's permissions."""
    first = plan.inputs[0]
    root = first.path if os.path.isdir(first.path) else os.path.dirname(first.path)
    if plan.kind == "file" or first.kind == "file":
        return []
    roots = allowed_roots(root)
    copied: List[str] = []
    outside: List[str] = []
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
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not _inside(os.path.realpath(src), roots):
                outside.append(rel)
                continue
            if not os.path.isfile(src):  # broken symlinks, sockets, fifos
                continue
            dst = out.path(*rel.split(os.sep))
            if os.path.exists(dst):
                continue
            if copy_file(src, dst, roots):
                copied.append(rel)
            else:
                outside.append(rel)
    if outside and warnings is not None:
        shown = ", ".join(outside[:3]) + (", ..." if len(outside) > 3 else "")
        warnings.append(f"{len(outside)} side file{'s' if len(outside) != 1 else ''} of "
                        f"{root} link{'s' if len(outside) == 1 else ''} outside it ({shown}); "
                        "not copied (a checkpoint must not pull other files into the soup); "
                        "copy them into the output yourself if you trust them")
    return copied


def copy_file(src: str, dst: str, roots: Optional[List[str]] = None) -> bool:
    """Stream ``src`` (symlinks followed) into a new file ``dst``, fsynced, with the
    output's mode narrowed to the source's permission bits (never wider). With ``roots``,
    the file actually opened must lie inside one of them (checked on the open descriptor,
    so a link swapped after the check is still refused); returns False if it does not."""
    with open(src, "rb") as fin:
        if roots is not None:
            try:
                opened = os.path.realpath(f"/proc/self/fd/{fin.fileno()}")
            except OSError:
                opened = None
            if opened is not None and opened.startswith("/proc/"):
                opened = None  # no /proc: the realpath check before the open stands
            if opened is not None and not _inside(opened, roots):
                return False
        mode = FILE_MODE & os.fstat(fin.fileno()).st_mode & 0o777
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     mode)
        with os.fdopen(fd, "wb") as fout:
            os.fchmod(fout.fileno(), mode)
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    return True


def write_indexes(plan: Plan, out: AtomicOutput) -> None:
    for comp in plan.components:
        if not comp.index_name:
            continue
        meta = {k: v for k, v in comp.index_metadata.items() if k != "total_size"}
        meta["total_size"] = sum(f.data_bytes for f in comp.files)
        weight_map = {t.key: f.name for f in comp.files for t in f.tensors}
        text = json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n"
        parts = ([comp.name] if comp.name else []) + [comp.index_name]
        write_small_file(out.path(*parts), text.encode())


def file_paths(plan: Plan, out: AtomicOutput) -> List[str]:
    if plan.kind == "file":
        return [out.path()]
    paths = []
    for comp in plan.components:
        for f in comp.files:
            paths.append(out.path(*(([comp.name] if comp.name else []) + [f.name])))
    return paths
