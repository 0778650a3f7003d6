"""Run the header passes' property tests through the sanitizer-built shim (argv[1]: the
folder holding it). Started by tests/io/test_header_passes_asan.py under LD_PRELOAD."""
import json
import sys
import types

sys.path.insert(0, sys.argv[1])
import fastsoup_asan_shim as shim  # noqa: E402

from fastsoup.io import safetensors as sf  # noqa: E402

compiled = types.SimpleNamespace(header_columns=shim.header_columns, tensors_json=shim.tensors_json)
sf._ext.cpu_ext = lambda warn=False: compiled

import tests.io.test_safetensors_header as header_tests  # noqa: E402
import tests.io.test_safetensors_writer as writer_tests  # noqa: E402

for name in sorted(dir(header_tests)):
    if name.startswith("test_property"):
        getattr(header_tests, name)()
header_tests.test_compiled_scan_takes_the_writers_form_and_hands_over_the_rest()
writer_tests.test_property_compiled_tensors_json_is_the_python_text()
keys = ["a", "é\"q\\", "tab\tnl\n\x01\x1f\x7f\b\f\r"]
got = shim.tensors_json([(k, "F32", (1, 2), 8) for k in keys])[0]
assert got == json.dumps({k: {"dtype": "F32", "shape": [1, 2], "data_offsets": [8 * i, 8 * i + 8]}
                          for i, k in enumerate(keys)}, separators=(",", ":"), ensure_ascii=False)
for bad in ([("a", "F32", (1,), -1)], [("a", "F32", (1,))], [("\ud800", "F32", (1,), 1)],
            [("a", "F32", "x", 1)], [("a", "F32", (1,), 2**63)], [("a", "F32", (2**64,), 1)]):
    try:
        shim.tensors_json(bad)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        continue
    raise AssertionError(f"tensors_json accepted {bad!r}")
print("sanitized header passes: ok")
