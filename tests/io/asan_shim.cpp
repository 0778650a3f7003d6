// A stand-alone module over fastsoup's compiled header passes (csrc/cpu/header_columns.cpp,
// csrc/cpu/tensors_json.cpp), built with sanitizers by tests/io/test_header_passes_asan.py.
#include <Python.h>

#include "header_columns.h"

static PyObject* header_columns(PyObject*, PyObject* args) {
    PyObject *raw, *itemsizes;
    long long data_len;
    if (!PyArg_ParseTuple(args, "OOL", &raw, &itemsizes, &data_len)) return nullptr;
    return fastsoup::header_columns(raw, itemsizes, data_len);
}

static PyObject* tensors_json(PyObject*, PyObject* entries) { return fastsoup::tensors_json(entries); }

static PyMethodDef methods[] = {
    {"header_columns", header_columns, METH_VARARGS, nullptr},
    {"tensors_json", tensors_json, METH_O, nullptr},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastsoup_asan_shim", nullptr, -1, methods};

PyMODINIT_FUNC PyInit_fastsoup_asan_shim() { return PyModule_Create(&module); }
