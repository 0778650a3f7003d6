"""Inputs that change under the merge, outputs inside inputs, stale temporaries, and the
resources a merge holds (descriptors, resident pages of the integer-tensor check)."""
import os
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

import fastsoup as fs
from fastsoup.merge import MergeError, PlanError
from fastsoup.merge import mmap as input_maps
from fastsoup.merge.formats import resolve
from tests.helpers import leftovers, make_state, save_diffusers, save_file_layout, save_sharded

HERE = os.path.dirname(os.path.abspath(__file__))



def test_output_inside_a_directory_input_is_refused(tmp_path):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 2)
    b = save_sharded(str(tmp_path / "b"), make_state(1), 2)
    with pytest.raises(PlanError, match="inside the folder of input 1"):
        fs.merge([a, b], os.path.join(a, "soup"), quiet=True, hash="none")
    with pytest.raises(PlanError, match="inside the folder of input 2"):
        fs.merge([a, b], os.path.join(b, "x", "soup"), quiet=True, hash="none", dry_run=True)
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))


def test_output_inside_a_diffusers_component_is_refused(tmp_path):
    roots = [save_diffusers(str(tmp_path / f"d{i}"), {"unet": make_state(i)}) for i in range(2)]
    comp = os.path.join(roots[0], "unet")
    with pytest.raises(PlanError, match="inside the folder of input 1"):
        fs.merge(roots, os.path.join(comp, "soup"), quiet=True, hash="none")


def test_input_truncated_while_merging_is_an_error_not_sigbus(tmp_path):
    a = save_file_layout(str(tmp_path / "a.safetensors"), {"w": torch.randn(1 << 18)})
    b = save_file_layout(str(tmp_path / "b.safetensors"), {"w": torch.randn(1 << 18)})
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {HERE!r})
        import fastsoup as fs
        from fastsoup.merge import MergeError
        from fastsoup.merge import mmap as input_maps
        real = input_maps.release_window
        n = [0]
        def release(maps, win):
            real(maps, win)
            n[0] += 1
            if n[0] == 1:
                os.truncate({b!r}, 4096)
        input_maps.release_window = release
        try:
            fs.merge([{a!r}, {b!r}], {str(tmp_path / "out.safetensors")!r}, memory="64KiB",
                     quiet=True, hash="none")
        except MergeError as exc:
            print("MergeError:", exc)
            sys.exit(3)
    """)
    env = dict(os.environ, FASTSOUP_HASH_CACHE="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "truncated while merging" in proc.stdout and "b.safetensors" in proc.stdout
    assert not leftovers(tmp_path) and not (tmp_path / "out.safetensors").exists()


def test_a_short_read_is_an_error_naming_the_input(tmp_path):
    a = save_file_layout(str(tmp_path / "a.safetensors"), {"w": torch.randn(4096)})
    wf = resolve(a).files()[0]
    files = input_maps.InputFiles()
    try:
        files.fd(wf)
        os.truncate(a, 100)
        with pytest.raises(MergeError, match=r"a\.safetensors was truncated while merging"):
            files.read(wf, "w", 0, 4096 * 4)
    finally:
        files.close()


def test_a_file_replaced_after_planning_is_refused_when_opened(tmp_path):
    a = save_file_layout(str(tmp_path / "a.safetensors"), {"w": torch.randn(16)})
    wf = resolve(a).files()[0]
    save_file_layout(a + ".new", {"w": torch.randn(16)})
    os.replace(a + ".new", a)  # same size, another inode
    files = input_maps.InputFiles()
    try:
        with pytest.raises(MergeError, match="changed since planning .*inode"):
            files.fd(wf)
    finally:
        files.close()


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    dead = tmp_path / ".soup.safetensors.fastsoup-tmp-999999999-abcd1234"
    dead.write_bytes(b"x" * 100)
    dead_dir = tmp_path / ".soup.safetensors.fastsoup-tmp-old-999999998-abcd1234"
    dead_dir.mkdir()
    alive = tmp_path / f".soup.safetensors.fastsoup-tmp-{os.getppid()}-abcd1234"
    alive.write_bytes(b"y")
    other = tmp_path / ".other.safetensors.fastsoup-tmp-999999999-abcd1234"
    other.write_bytes(b"z")
    fs.merge(paths, tmp_path / "soup.safetensors", quiet=True, hash="none")
    assert not dead.exists() and not dead_dir.exists()
    assert alive.exists() and other.exists()


def test_integer_check_is_chunked_and_releases_pages(tmp_path, monkeypatch):
    n = 1 << 17
    x = torch.arange(n, dtype=torch.int64)
    y = x.clone()
    y[-1] = -1
    a = save_file_layout(str(tmp_path / "a.safetensors"), {"ids": x, "w": torch.randn(8)})
    b = save_file_layout(str(tmp_path / "b.safetensors"), {"ids": y, "w": torch.randn(8)})
    released = []
    real = input_maps.InputMaps.release
    monkeypatch.setattr(input_maps.InputMaps, "release",
                        lambda self, wf, lo, hi: (released.append(hi - lo), real(self, wf, lo, hi)))
    with pytest.raises(PlanError, match="values differ"):
        fs.merge([a, b], tmp_path / "out.safetensors", memory="64KiB", quiet=True, hash="none")
    assert len(released) >= 8 and max(released) <= 64 << 10
    assert not leftovers(tmp_path)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_one_descriptor_per_input_file_and_raised_fd_limit(tmp_path, monkeypatch):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(4)]
    maps = input_maps.InputFiles()
    before = _open_fds()
    try:
        for p in paths:
            wf = resolve(p).files()[0]
            maps.fd(wf)
            maps.fd(wf)
        assert _open_fds() - before == len(paths)
    finally:
        maps.close()
    assert _open_fds() == before
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 64:
        pytest.skip("no finite hard limit to raise to")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        fs.merge(paths, tmp_path / "soup.safetensors", quiet=True, hash="none")
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_killed_runs_temporary_is_named_and_freed_before_the_space_check(tmp_path, monkeypatch):
    """A merge killed outright (the OOM killer, SIGKILL: exit 137, no message) leaves its
    temporary. The next merge into that output removes it before it checks the free
    space (which the temporary took), and says so in its report."""
    import shutil

    from fastsoup.merge import report as report_mod

    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    dead = tmp_path / ".soup.safetensors.fastsoup-tmp-999999999-abcd1234"
    dead.write_bytes(b"x" * 4096)
    need = fs.merge(paths, None, dry_run=True, quiet=True).bytes_to_write + (1 << 20)
    real = shutil.disk_usage

    def disk_usage(path):  # the free space counts the dead temporary only while it exists
        u = real(path)
        free = need - 1 + (0 if dead.exists() else 4096)
        return type(u)(u.total, u.total - free, free)

    monkeypatch.setattr(report_mod.shutil, "disk_usage", disk_usage)
    rep = fs.merge(paths, tmp_path / "soup.safetensors", quiet=True, hash="none")
    assert not dead.exists()
    said = [w for w in rep.warnings if str(dead) in w]
    assert len(said) == 1 and "did not finish" in said[0], rep.warnings
