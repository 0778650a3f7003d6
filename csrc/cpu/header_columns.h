// Safetensors header text, read and written (header_columns.cpp, tensors_json.cpp).
#pragma once

#include <Python.h>

#include <cstdint>

namespace fastsoup {

// (keys, dtypes, shapes, begins, ends, metadata span or None) for the JSON text `raw`
// (bytes) of a header whose tensors fill `data_len` bytes back to back, dtypes taken
// from `itemsizes` ({name: bytes per element}); None when the text is not in the
// canonical compact form or breaks a rule; nullptr with a Python error on failure.
PyObject* header_columns(PyObject* raw, PyObject* itemsizes, int64_t data_len);

// (text, offsets): the JSON json.dumps(separators=(",", ":"), ensure_ascii=False) writes
// for (key, dtype, shape, nbytes) entries stored back to back from offset 0, and each
// entry's offset (tensors_json.cpp); nullptr with a Python error on failure.
PyObject* tensors_json(PyObject* entries);

}  // namespace fastsoup
