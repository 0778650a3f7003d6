// The tensors' part of a safetensors header as JSON text, for fastsoup.io.safetensors:
// the text json.dumps(obj, separators=(",", ":"), ensure_ascii=False) writes for
// {key: {"dtype": d, "shape": [...], "data_offsets": [begin, end]}, ...}.
#include "header_columns.h"

#include <cstdint>
#include <string>

namespace fastsoup {
namespace {

// A str as json.dumps(ensure_ascii=False) writes it; false with a Python error set when
// the str has no UTF-8 form (a lone surrogate).
bool put_string(std::string& out, PyObject* s) {
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "tensors_json: keys and dtypes must be str");
        return false;
    }
    Py_ssize_t n;
    const char* p = PyUnicode_AsUTF8AndSize(s, &n);
    if (p == nullptr) return false;
    static const char hex[] = "0123456789abcdef";
    out.push_back('"');
    for (Py_ssize_t i = 0; i < n; ++i) {
        unsigned char c = static_cast<unsigned char>(p[i]);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    out += "\\u00";
                    out.push_back(hex[c >> 4]);
                    out.push_back(hex[c & 15]);
                } else {
                    out.push_back(static_cast<char>(c));
                }
        }
    }
    out.push_back('"');
    return true;
}

// A non-negative int; false with a Python error set otherwise.
bool get_size(PyObject* o, long long* value) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return false;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "tensors_json: negative size");
        return false;
    }
    *value = v;
    return true;
}

}  // namespace

PyObject* tensors_json(PyObject* entries) {
    PyObject* seq = PySequence_Fast(entries, "tensors_json: a sequence of (key, dtype, shape, nbytes)");
    if (seq == nullptr) return nullptr;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    PyObject* offsets = PyList_New(n);
    if (offsets == nullptr) { Py_DECREF(seq); return nullptr; }
    std::string out;
    out.reserve(static_cast<size_t>(n) * 96 + 2);
    out.push_back('{');
    long long pos = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* e = items[i];
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 4) {
            PyErr_SetString(PyExc_TypeError, "tensors_json: entries are (key, dtype, shape, nbytes)");
            goto error;
        }
        if (i) out.push_back(',');
        if (!put_string(out, PyTuple_GET_ITEM(e, 0))) goto error;
        out += ":{\"dtype\":";
        if (!put_string(out, PyTuple_GET_ITEM(e, 1))) goto error;
        out += ",\"shape\":[";
        {
            PyObject* shape = PySequence_Fast(PyTuple_GET_ITEM(e, 2), "tensors_json: a shape is a sequence");
            if (shape == nullptr) goto error;
            Py_ssize_t nd = PySequence_Fast_GET_SIZE(shape);
            PyObject** dims = PySequence_Fast_ITEMS(shape);
            for (Py_ssize_t d = 0; d < nd; ++d) {
                long long v;
                if (!get_size(dims[d], &v)) { Py_DECREF(shape); goto error; }
                if (d) out.push_back(',');
                out += std::to_string(v);
            }
            Py_DECREF(shape);
        }
        out += "],\"data_offsets\":[";
        {
            PyObject* at = PyLong_FromLongLong(pos);
            if (at == nullptr) goto error;
            PyList_SET_ITEM(offsets, i, at);
            long long nbytes;
            if (!get_size(PyTuple_GET_ITEM(e, 3), &nbytes)) goto error;
            if (nbytes > INT64_MAX - pos) {
                PyErr_SetString(PyExc_OverflowError, "tensors_json: offsets past int64");
                goto error;
            }
            out += std::to_string(pos);
            out.push_back(',');
            pos += nbytes;
            out += std::to_string(pos);
        }
        out += "]}";
    }
    out.push_back('}');
    Py_DECREF(seq);
    {
        PyObject* text = PyUnicode_DecodeUTF8(out.data(), static_cast<Py_ssize_t>(out.size()), "strict");
        if (text == nullptr) { Py_DECREF(offsets); return nullptr; }
        return Py_BuildValue("(NN)", text, offsets);
    }
error:
    Py_DECREF(seq);
    Py_DECREF(offsets);  // unset items are NULL: list dealloc skips them
    return nullptr;
}

}  // namespace fastsoup
