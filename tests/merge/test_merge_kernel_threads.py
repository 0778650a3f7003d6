"""The CPU weighted-sum kernel under thread-creation failure: it must raise (a
RuntimeError from Python), never abort the process with std::terminate, and it caps its
threads at the hardware's."""
import os
import subprocess
import sys
import textwrap

import pytest

from fastsoup.kernels import _ext
from fastsoup.io.safetensors import DTYPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import importlib.machinery, importlib.util, resource, sys
    import numpy as np
    # the extension alone (not the fastsoup package, which imports torch: a fast test)
    loader = importlib.machinery.ExtensionFileLoader("fastsoup._C", sys.argv[2])
    spec = importlib.util.spec_from_file_location("fastsoup._C", sys.argv[2], loader=loader)
    ext = importlib.util.module_from_spec(spec)
    loader.exec_module(ext)
    c = int(sys.argv[3])
    n = 64 << 17
    a = np.ones(n, np.float32); b = np.full(n, 3.0, np.float32); out = np.empty(n, np.float32)
    args = [memoryview(a), memoryview(b)], [c, c], [0.5, 0.5], n
    ext.weighted_sum(memoryview(out), c, *args, 1, False)
    status = open("/proc/self/status").read().split("VmSize:")[1].split()[0]
    vm = int(status) * 1024
    # room for about one thread stack (8 MiB): later threads cannot be created
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]) * (1 << 20),
                                            resource.RLIM_INFINITY))
    out[:] = 0
    try:
        ext.weighted_sum(memoryview(out), c, *args, 64, False)
    except RuntimeError as exc:
        print("RuntimeError", exc)
        sys.exit(3)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert (out == 2.0).all()
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux rlimits")
@pytest.mark.parametrize("room_mib", [1, 12])
def test_thread_creation_failure_raises_instead_of_aborting(room_mib):
    ext = _ext.cpu_ext(warn=False)
    if ext is None:
        pytest.skip("fastsoup._C not built")
    code = DTYPES["F32"].kernel_code
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(room_mib), ext.__file__, str(code)],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 3), (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert ("ok" in proc.stdout) if proc.returncode == 0 else ("RuntimeError" in proc.stdout)
