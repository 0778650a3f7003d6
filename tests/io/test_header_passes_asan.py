"""The compiled header passes (``fastsoup._C.header_columns`` / ``tensors_json``) read
hostile bytes: their property tests also run through a build of the same C++ sources with
AddressSanitizer and UndefinedBehaviorSanitizer, where any out-of-bounds access, overflow
or bad reference count aborts the run."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runtime(cxx: str, name: str) -> str:
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else ""


def test_header_passes_are_clean_under_sanitizers(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the sanitizer shim")
    asan, ubsan = _runtime(cxx, "libasan.so"), _runtime(cxx, "libubsan.so")
    if not (asan and ubsan):
        pytest.skip("g++ has no libasan/libubsan runtime")
    cpu = os.path.join(ROOT, "csrc", "cpu")
    shim = tmp_path / ("fastsoup_asan_shim" + sysconfig.get_config_var("EXT_SUFFIX"))
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
         f"-I{cpu}", os.path.join(ROOT, "tests", "io", "asan_shim.cpp"),
         os.path.join(cpu, "header_columns.cpp"), os.path.join(cpu, "tensors_json.cpp"),
         "-o", str(shim)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    # PYTHONMALLOC=malloc: every object from malloc, so that ASAN sees the bounds of small ones
    env = dict(os.environ, LD_PRELOAD=f"{asan} {ubsan}", ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               PYTHONMALLOC="malloc",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "io", "asan_run.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert run.returncode == 0 and "sanitized header passes: ok" in run.stdout, \
        (run.stdout[-2000:], run.stderr[-6000:])
