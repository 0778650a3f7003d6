// The columns of a safetensors header in its canonical compact form, for
// fastsoup.io.safetensors: one pass over the JSON text, no intermediate objects.
//
// Only a header that this scan accepts completely is returned; anything else (whitespace,
// escapes, another key order inside an entry, a gap, an overflow, an unknown dtype, ...)
// gives None, and the Python parser decides and names the problem. So this scan may be
// stricter than the format, never looser.
#include "header_columns.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fastsoup {
namespace {

constexpr int64_t kInt64Max = INT64_MAX;

struct Cursor {
    const char* p;
    const char* end;

    bool lit(const char* s, size_t n) {
        if (static_cast<size_t>(end - p) < n || std::memcmp(p, s, n) != 0) return false;
        p += n;
        return true;
    }
    bool ch(char c) {
        if (p >= end || *p != c) return false;
        ++p;
        return true;
    }
    // A JSON string without escapes or control characters: [*lo, *hi) between the quotes.
    bool str(const char** lo, const char** hi) {
        if (!ch('"')) return false;
        const char* s = p;
        while (p < end) {
            unsigned char c = static_cast<unsigned char>(*p);
            if (c == '"') {
                *lo = s;
                *hi = p;
                ++p;
                return true;
            }
            if (c == '\\' || c < 0x20) return false;
            ++p;
        }
        return false;
    }
    // A non-negative JSON integer (no sign, no leading zero, no fraction) within int64.
    bool uint(int64_t* out) {
        if (p >= end || *p < '0' || *p > '9') return false;
        if (*p == '0' && p + 1 < end && p[1] >= '0' && p[1] <= '9') return false;
        int64_t v = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            int d = *p - '0';
            if (v > (kInt64Max - d) / 10) return false;
            v = v * 10 + d;
            ++p;
        }
        if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) return false;
        *out = v;
        return true;
    }
};

// Raw-API helpers: each returns a new reference or nullptr with a Python error set.
PyObject* list_steal(std::vector<PyObject*>& items) {
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(items.size()));
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < items.size(); ++i) PyList_SET_ITEM(list, i, items[i]);
    items.clear();
    return list;
}

void release(std::vector<PyObject*>& items) {
    for (PyObject* o : items) Py_XDECREF(o);
    items.clear();
}

}  // namespace

PyObject* header_columns(PyObject* raw, PyObject* itemsizes, int64_t data_len) {
    if (!PyBytes_Check(raw) || !PyDict_Check(itemsizes)) {
        PyErr_SetString(PyExc_TypeError, "header_columns(raw: bytes, itemsizes: dict, data_len)");
        return nullptr;
    }
    Cursor c{PyBytes_AS_STRING(raw), PyBytes_AS_STRING(raw) + PyBytes_GET_SIZE(raw)};
    std::vector<PyObject*> keys, dtypes, shapes, begins, ends;
    // the dtype strings, one object each (and their item sizes): set() over them is cheap
    std::unordered_map<std::string, std::pair<PyObject*, int64_t>> known;
    std::vector<int64_t> dims;  // the current entry's shape (reused)
    int64_t meta_lo = -1, meta_hi = -1, pos = 0;
    bool ok = c.ch('{');
    bool first = true;
    while (ok) {
        if (c.ch('}')) {
            while (c.p < c.end && *c.p == ' ') ++c.p;  // the writers' padding to 8 bytes
            ok = c.p == c.end && !keys.empty();
            break;
        }
        if (!first && !c.ch(',')) { ok = false; break; }
        first = false;
        const char *klo, *khi;
        if (!c.str(&klo, &khi) || !c.ch(':') || khi == klo) { ok = false; break; }
        if (static_cast<size_t>(khi - klo) == 12 && std::memcmp(klo, "__metadata__", 12) == 0) {
            // a flat object of strings; its text goes to json.loads in Python
            if (meta_lo >= 0) { ok = false; break; }
            meta_lo = c.p - PyBytes_AS_STRING(raw);
            if (!c.ch('{')) { ok = false; break; }
            bool mfirst = true;
            while (ok && !c.ch('}')) {
                const char *a, *b;
                ok = (mfirst || c.ch(',')) && c.str(&a, &b) && c.ch(':') && c.str(&a, &b);
                mfirst = false;
            }
            meta_hi = c.p - PyBytes_AS_STRING(raw);
            continue;
        }
        const char *dlo, *dhi;
        if (!c.lit("{\"dtype\":", 9) || !c.str(&dlo, &dhi) || !c.lit(",\"shape\":[", 10)) {
            ok = false;
            break;
        }
        std::string dname(dlo, dhi);
        auto it = known.find(dname);
        if (it == known.end()) {
            PyObject* name = PyUnicode_FromStringAndSize(dlo, dhi - dlo);
            if (name == nullptr) goto error;
            PyObject* size = PyDict_GetItemWithError(itemsizes, name);  // borrowed
            if (size == nullptr) {
                Py_DECREF(name);
                if (PyErr_Occurred()) goto error;
                ok = false;  // an unknown dtype: the Python parser names it
                break;
            }
            int64_t es = PyLong_AsLongLong(size);
            if (es == -1 && PyErr_Occurred()) { Py_DECREF(name); goto error; }
            PyUnicode_InternInPlace(&name);
            it = known.emplace(dname, std::make_pair(name, es)).first;  // owns `name`
        }
        // shape: numel and the extent with zero dimensions as 1 must fit int64
        dims.clear();
        __int128 numel = 1, extent = it->second.second;
        if (!c.ch(']')) {
            do {
                int64_t d;
                if (!c.uint(&d)) { ok = false; break; }
                dims.push_back(d);
                numel *= d;
                extent *= d > 1 ? d : 1;
                if (extent > kInt64Max) { ok = false; break; }
            } while (c.ch(','));
            if (!ok || !c.ch(']')) { ok = false; break; }
        }
        int64_t b, e;
        if (!c.lit(",\"data_offsets\":[", 17) || !c.uint(&b) || !c.ch(',') || !c.uint(&e) ||
            !c.lit("]}", 2)) {
            ok = false;
            break;
        }
        __int128 nbytes = numel * it->second.second;
        // back to back from byte 0, in the text's order, within the data section
        if (b != pos || nbytes > kInt64Max || static_cast<__int128>(e) - b != nbytes ||
            e > data_len) {
            ok = false;
            break;
        }
        pos = e;
        PyObject* key = PyUnicode_DecodeUTF8(klo, khi - klo, "strict");
        PyObject* shape = PyTuple_New(static_cast<Py_ssize_t>(dims.size()));
        PyObject* pb = PyLong_FromLongLong(b);
        PyObject* pe = PyLong_FromLongLong(e);
        if (key == nullptr || shape == nullptr || pb == nullptr || pe == nullptr) {
            Py_XDECREF(key); Py_XDECREF(shape); Py_XDECREF(pb); Py_XDECREF(pe);
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                ok = false;
                break;
            }
            goto error;
        }
        for (size_t i = 0; i < dims.size(); ++i) {
            PyObject* d = PyLong_FromLongLong(dims[i]);
            if (d == nullptr) {
                Py_DECREF(key); Py_DECREF(shape); Py_DECREF(pb); Py_DECREF(pe);
                goto error;
            }
            PyTuple_SET_ITEM(shape, i, d);
        }
        PyObject* dt = it->second.first;
        Py_INCREF(dt);
        keys.push_back(key);
        dtypes.push_back(dt);
        shapes.push_back(shape);
        begins.push_back(pb);
        ends.push_back(pe);
    }
    for (auto& kv : known) Py_DECREF(kv.second.first);
    known.clear();
    if (!ok || pos != data_len) {
        release(keys); release(dtypes); release(shapes); release(begins); release(ends);
        Py_RETURN_NONE;
    }
    {
        PyObject* cols[5] = {list_steal(keys), list_steal(dtypes), list_steal(shapes),
                             list_steal(begins), list_steal(ends)};
        for (PyObject* col : cols) {
            if (col == nullptr) {
                for (PyObject* o : cols) Py_XDECREF(o);
                release(keys); release(dtypes); release(shapes); release(begins); release(ends);
                return nullptr;
            }
        }
        PyObject* meta = meta_lo >= 0 ? Py_BuildValue("(LL)", static_cast<long long>(meta_lo),
                                                      static_cast<long long>(meta_hi))
                                      : (Py_INCREF(Py_None), Py_None);
        if (meta == nullptr) {
            for (PyObject* o : cols) Py_DECREF(o);
            return nullptr;
        }
        return Py_BuildValue("(NNNNNN)", cols[0], cols[1], cols[2], cols[3], cols[4], meta);
    }
error:
    for (auto& kv : known) Py_DECREF(kv.second.first);
    release(keys); release(dtypes); release(shapes); release(begins); release(ends);
    return nullptr;
}

}  // namespace fastsoup
