/*
 * `diff` of asobi/merge_patch.py in C: the same patch, as a new dict, for the same two values.
 *
 * Why: with per-player views every player's `match.patch` needs a diff of their last view and
 * this one each tick; in Python that walk was a sixth of the server's CPU on the field game.
 * The Python function stays the definition (merge_patch.py's docstring has the rules):
 * tests/test_merge_patch_c.py checks that both give equal patches, generated values included.
 *
 * Values are plain JSON data as orjson or the host's walk produce them (dict with str keys,
 * list, str, int, float, bool, None).  "Same JSON" (merge_patch.same_json compares orjson's
 * bytes) is decided here without encoding: same types all the way down, same dict keys in the
 * same order, and floats equal with the same sign (0.0 and -0.0 are spelled differently).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

/* Whether `a` and `b` encode to the same JSON bytes; -1 on error. */
static int same_json(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    PyTypeObject *type = Py_TYPE(a);
    if (type != Py_TYPE(b)) return 0;
    if (type == &PyFloat_Type) {
        double x = PyFloat_AS_DOUBLE(a), y = PyFloat_AS_DOUBLE(b);
        return x == y && signbit(x) == signbit(y);
    }
    if (type == &PyDict_Type) {
        if (PyDict_GET_SIZE(a) != PyDict_GET_SIZE(b)) return 0;
        if (Py_EnterRecursiveCall(" comparing a merge patch's values")) return -1;
        Py_ssize_t i = 0, j = 0;
        PyObject *ka, *va, *kb, *vb;
        int same = 1;
        while (same > 0 && PyDict_Next(a, &i, &ka, &va)) {
            same = PyDict_Next(b, &j, &kb, &vb) ? PyObject_RichCompareBool(ka, kb, Py_EQ) : 0;
            if (same > 0) same = same_json(va, vb);
        }
        Py_LeaveRecursiveCall();
        return same;
    }
    if (type == &PyList_Type) {
        Py_ssize_t n = PyList_GET_SIZE(a);
        if (n != PyList_GET_SIZE(b)) return 0;
        if (Py_EnterRecursiveCall(" comparing a merge patch's values")) return -1;
        int same = 1;
        for (Py_ssize_t k = 0; same > 0 && k < n; k++) {
            same = same_json(PyList_GET_ITEM(a, k), PyList_GET_ITEM(b, k));
        }
        Py_LeaveRecursiveCall();
        return same;
    }
    /* str, int, bool, None: one spelling per value */
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

static PyObject *diff_dicts(PyObject *old, PyObject *new) {
    PyObject *patch = PyDict_New();
    if (patch == NULL) return NULL;
    Py_ssize_t pos = 0, kept = 0;
    PyObject *key, *value;
    while (PyDict_Next(new, &pos, &key, &value)) {
        PyObject *before = PyDict_GetItemWithError(old, key); /* borrowed */
        if (before == NULL && PyErr_Occurred()) goto fail;
        if (before != NULL && Py_TYPE(before) == Py_TYPE(value)) {
            kept++;
            if (Py_IS_TYPE(value, &PyDict_Type)) {
                int same = same_json(before, value);
                if (same < 0) goto fail;
                if (same) continue;
                if (Py_EnterRecursiveCall(" in a merge patch's diff")) goto fail;
                PyObject *sub = diff_dicts(before, value);
                Py_LeaveRecursiveCall();
                if (sub == NULL) goto fail;
                int failed = PyDict_GET_SIZE(sub) && PyDict_SetItem(patch, key, sub);
                Py_DECREF(sub);
                if (failed) goto fail;
                continue;
            }
            /* Python's == (0.0 == -0.0, as in merge_patch.diff), and lists as JSON. */
            int same = Py_IS_TYPE(value, &PyList_Type) ? same_json(before, value)
                                            : PyObject_RichCompareBool(value, before, Py_EQ);
            if (same < 0) goto fail;
            if (same) continue;
        } else if (before != NULL) {
            kept++;
        }
        if (PyDict_SetItem(patch, key, value)) goto fail;
    }
    if (kept < PyDict_GET_SIZE(old)) {
        pos = 0;
        while (PyDict_Next(old, &pos, &key, &value)) {
            int present = PyDict_Contains(new, key);
            if (present < 0) goto fail;
            if (!present && PyDict_SetItem(patch, key, Py_None)) goto fail;
        }
    }
    return patch;
fail:
    Py_DECREF(patch);
    return NULL;
}

static PyObject *diff(PyObject *old, PyObject *new) {
    if (!PyDict_CheckExact(new) || !PyDict_CheckExact(old)) return Py_NewRef(new);
    return diff_dicts(old, new);
}

static PyObject *py_diff(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "diff(old, new) takes two arguments");
        return NULL;
    }
    return diff(args[0], args[1]);
}

static PyMethodDef methods[] = {
    {"diff", (PyCFunction)(void (*)(void))py_diff, METH_FASTCALL,
     "The merge patch that turns old into new (asobi.merge_patch.diff)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "asobi._merge_patch", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__merge_patch(void) { return PyModule_Create(&module); }
