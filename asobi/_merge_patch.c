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
#include <string.h>

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

/*
 * diff_text: the same patch, read from and written as JSON text, for two frames' bodies that
 * asobi's encoders wrote (no whitespace; one spelling per value, so equal text is "same JSON").
 * Nothing is parsed into Python objects: each object level is scanned once, its members located
 * as spans, and unchanged values compared with memcmp.  It declines (returns None) on anything
 * it does not expect, and the caller then parses both texts and runs `diff`.  Two differences
 * from `diff`, both harmless to a client applying the patch: 0.0 after -0.0 (or back) is sent,
 * and a value spelled differently by two encoders (1e16 / 1e+16) is sent.
 */
#define TEXT_MAX_DEPTH 64
#define MEMBERS_ON_STACK 64

typedef struct {
    const char *p, *end;
} Cursor;

typedef struct {
    const char *key;
    Py_ssize_t key_len;
    const char *value;
    Py_ssize_t value_len;
} Member;

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Out;

static int out_put(Out *o, const char *s, Py_ssize_t n) {
    if (o->len + n > o->cap) {
        Py_ssize_t cap = o->cap ? o->cap : 256;
        while (cap < o->len + n) cap *= 2;
        char *grown = PyMem_Realloc(o->data, (size_t)cap);
        if (grown == NULL) return -1;
        o->data = grown;
        o->cap = cap;
    }
    memcpy(o->data + o->len, s, (size_t)n);
    o->len += n;
    return 0;
}

/* Past one string starting at c->p (a '"'); 0, or -1 if malformed. */
static int skip_string(Cursor *c) {
    const char *p = c->p + 1;
    while (p < c->end) {
        char ch = *p++;
        if (ch == '"') {
            c->p = p;
            return 0;
        }
        if (ch == '\\') {
            if (p >= c->end) return -1;
            p++;
        }
    }
    return -1;
}

/* Past one value; 0, or -1 if malformed (nesting past TEXT_MAX_DEPTH included). */
static int skip_value(Cursor *c) {
    if (c->p >= c->end) return -1;
    char first = *c->p;
    if (first == '"') return skip_string(c);
    if (first == '{' || first == '[') {
        int depth = 0;
        while (c->p < c->end) {
            char ch = *c->p;
            if (ch == '"') {
                if (skip_string(c)) return -1;
                continue;
            }
            c->p++;
            if (ch == '{' || ch == '[') {
                if (++depth > TEXT_MAX_DEPTH) return -1;
            } else if (ch == '}' || ch == ']') {
                if (--depth == 0) return 0;
            }
        }
        return -1;
    }
    /* number, true, false, null: letters, digits, '.', '+', '-' up to the next separator */
    const char *start = c->p;
    while (c->p < c->end && *c->p != ',' && *c->p != '}' && *c->p != ']') {
        char ch = *c->p++;
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || ch == 'E' || ch == '.' ||
              ch == '+' || ch == '-'))
            return -1;
    }
    return c->p > start ? 0 : -1;
}

/* The members of the object spanning [p, end) (p at '{', end past '}'), into *members (grown on
 * the heap past `room`); the count, or -1 if malformed or out of memory. */
static Py_ssize_t members_of(const char *p, const char *end, Member **members, Py_ssize_t room,
                             int *on_heap) {
    Cursor c = {p + 1, end - 1};
    Py_ssize_t n = 0;
    if (end - p < 2 || *p != '{' || end[-1] != '}') return -1;
    if (c.p == c.end) return 0;
    for (;;) {
        if (c.p >= c.end || *c.p != '"') return -1;
        if (n == room) {
            Py_ssize_t bigger = room * 2;
            Member *grown = *on_heap ? PyMem_Realloc(*members, sizeof(Member) * (size_t)bigger)
                                     : PyMem_Malloc(sizeof(Member) * (size_t)bigger);
            if (grown == NULL) return -1;
            if (!*on_heap) memcpy(grown, *members, sizeof(Member) * (size_t)room);
            *members = grown;
            *on_heap = 1;
            room = bigger;
        }
        Member *m = &(*members)[n++];
        m->key = c.p;
        if (skip_string(&c)) return -1;
        m->key_len = c.p - m->key;
        if (c.p >= c.end || *c.p != ':') return -1;
        c.p++;
        m->value = c.p;
        if (skip_value(&c)) return -1;
        m->value_len = c.p - m->value;
        if (c.p == c.end) return n;
        if (*c.p != ',') return -1;
        c.p++;
    }
}

static int same_key(const Member *a, const Member *b) {
    return a->key_len == b->key_len && memcmp(a->key, b->key, (size_t)a->key_len) == 0;
}

/* Append the patch between two objects' texts to `out` as `{...}`; 1 if it has members, 0 if
 * it is `{}`, -1 to decline. */
static int diff_objects(const char *old, Py_ssize_t old_len, const char *new, Py_ssize_t new_len,
                        Out *out, int depth) {
    if (depth > TEXT_MAX_DEPTH) return -1;
    Member old_stack[MEMBERS_ON_STACK], new_stack[MEMBERS_ON_STACK];
    Member *olds = old_stack, *news = new_stack;
    int old_heap = 0, new_heap = 0, result = -1;
    char *matched = NULL;
    Py_ssize_t n_old = members_of(old, old + old_len, &olds, MEMBERS_ON_STACK, &old_heap);
    Py_ssize_t n_new = n_old < 0 ? -1
                                 : members_of(new, new + new_len, &news, MEMBERS_ON_STACK,
                                              &new_heap);
    if (n_new < 0) goto done;
    matched = PyMem_Calloc((size_t)(n_old ? n_old : 1), 1);
    if (matched == NULL) goto done;
    Py_ssize_t kept = 0, cursor = 0, written = 0;
    if (out_put(out, "{", 1)) goto done;
    for (Py_ssize_t i = 0; i < n_new; i++) {
        const Member *m = &news[i];
        /* Frames of one match usually list keys in the same order: try the next one first. */
        Py_ssize_t found = -1;
        if (cursor < n_old && !matched[cursor] && same_key(&olds[cursor], m)) {
            found = cursor;
        } else {
            for (Py_ssize_t k = 0; k < n_old; k++) {
                if (!matched[k] && same_key(&olds[k], m)) {
                    found = k;
                    break;
                }
            }
        }
        if (found >= 0) {
            const Member *o = &olds[found];
            matched[found] = 1;
            kept++;
            cursor = found + 1;
            if (o->value_len == m->value_len && memcmp(o->value, m->value, (size_t)m->value_len) == 0)
                continue;
            if (m->value[0] == '{' && o->value[0] == '{') {
                Py_ssize_t mark = out->len;
                if (out_put(out, written ? "," : "", written ? 1 : 0) ||
                    out_put(out, m->key, m->key_len) || out_put(out, ":", 1))
                    goto done;
                int sub = diff_objects(o->value, o->value_len, m->value, m->value_len, out,
                                       depth + 1);
                if (sub < 0) goto done;
                if (sub == 0) {
                    out->len = mark; /* same members in another order: nothing to send */
                    continue;
                }
                written++;
                continue;
            }
        }
        if (out_put(out, written ? "," : "", written ? 1 : 0) || out_put(out, m->key, m->key_len) ||
            out_put(out, ":", 1) || out_put(out, m->value, m->value_len))
            goto done;
        written++;
    }
    if (kept < n_old) {
        for (Py_ssize_t k = 0; k < n_old; k++) {
            if (matched[k]) continue;
            if (out_put(out, written ? "," : "", written ? 1 : 0) ||
                out_put(out, olds[k].key, olds[k].key_len) || out_put(out, ":null", 5))
                goto done;
            written++;
        }
    }
    if (out_put(out, "}", 1)) goto done;
    result = written > 0;
done:
    PyMem_Free(matched);
    if (old_heap) PyMem_Free(olds);
    if (new_heap) PyMem_Free(news);
    return result;
}

static PyObject *py_diff_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "diff_text(old, new) takes two bytes");
        return NULL;
    }
    const char *old = PyBytes_AS_STRING(args[0]), *new = PyBytes_AS_STRING(args[1]);
    Py_ssize_t old_len = PyBytes_GET_SIZE(args[0]), new_len = PyBytes_GET_SIZE(args[1]);
    if (old_len < 2 || new_len < 2 || old[0] != '{' || new[0] != '{') Py_RETURN_NONE;
    Out out = {NULL, 0, 0};
    int made = diff_objects(old, old_len, new, new_len, &out, 0);
    PyObject *text = made < 0 ? NULL : PyBytes_FromStringAndSize(out.data, out.len);
    PyMem_Free(out.data);
    if (made < 0) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    return text;
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
    {"diff_text", (PyCFunction)(void (*)(void))py_diff_text, METH_FASTCALL,
     "diff of two JSON object texts, as JSON text; None where it declines."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "asobi._merge_patch", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__merge_patch(void) { return PyModule_Create(&module); }
