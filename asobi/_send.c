/*
 * The sends at the end of a ticker pass (asobi/server_writes.py), in one C call.
 *
 * Why: a pass holds every state frame its matches wrote and then writes them back to back.
 * Each went through asyncio's `transport.write` (a dozen checks in Python, a memoryview, the
 * socket object's `send`, which releases and retakes the GIL) to end in one `send(2)`.  Here the
 * whole list goes to the kernel in one loop, with the GIL released once.
 *
 * It only does what `transport.write` does for a transport whose write buffer is empty: send at
 * once, and hand back what the kernel did not take.  The caller passes -1 for any frame that must
 * go through its transport (a buffer not empty, a transport closing or not asyncio's plain
 * socket transport).  Whatever is not sent whole (EAGAIN, a partial send, an error such as
 * EPIPE) is returned with the bytes sent so far; the caller writes the rest through the
 * transport, which buffers it or reports the error as it always does.  Once one frame for a
 * socket is returned, every later frame for that socket is returned too, unsent, so the
 * transport gets them in order behind it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Frames handled per release of the GIL (the caller holds at most a few hundred). */
#define CHUNK 256
/* Sockets remembered as blocked within one call; past that, nothing more is sent directly. */
#define MAX_BLOCKED 64

typedef struct {
    int fd;
    const char *data;
    Py_ssize_t len;
    Py_ssize_t sent;
} Item;

typedef struct {
    int fds[MAX_BLOCKED];
    int count;
    int overflow;
} Blocked;

static int is_blocked(const Blocked *b, int fd) {
    if (b->overflow) return 1;
    for (int i = 0; i < b->count; i++)
        if (b->fds[i] == fd) return 1;
    return 0;
}

static void block(Blocked *b, int fd) {
    if (b->count < MAX_BLOCKED)
        b->fds[b->count++] = fd;
    else
        b->overflow = 1;
}

/* Send each item whose fd is not -1 and not blocked; `sent` says how much went. */
static void send_items(Item *items, Py_ssize_t count, Blocked *blocked) {
    for (Py_ssize_t k = 0; k < count; k++) {
        Item *it = &items[k];
        it->sent = 0;
        if (it->fd < 0 || is_blocked(blocked, it->fd)) continue;
        ssize_t r;
        do {
            r = send(it->fd, it->data, (size_t)it->len, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (r < 0 && errno == EINTR);
        if (r > 0) it->sent = r;
        if (it->sent != it->len) block(blocked, it->fd);
    }
}

static PyObject *py_send_each(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "send_each(fds, frames) takes two lists of the same length");
        return NULL;
    }
    PyObject *fds = args[0], *frames = args[1];
    Py_ssize_t n = PyList_GET_SIZE(frames);
    PyObject *left = PyList_New(0);
    if (left == NULL) return NULL;
    Item items[CHUNK];
    Blocked blocked = {{0}, 0, 0};
    for (Py_ssize_t start = 0; start < n; start += CHUNK) {
        Py_ssize_t count = n - start < CHUNK ? n - start : CHUNK;
        for (Py_ssize_t k = 0; k < count; k++) {
            PyObject *fd = PyList_GET_ITEM(fds, start + k);
            PyObject *frame = PyList_GET_ITEM(frames, start + k);
            if (!PyLong_CheckExact(fd) || !PyBytes_CheckExact(frame)) {
                PyErr_SetString(PyExc_TypeError, "send_each: fds are ints, frames are bytes");
                goto fail;
            }
            long value = PyLong_AsLong(fd);
            if (value == -1 && PyErr_Occurred()) goto fail;
            items[k].fd = value < 0 || value > INT_MAX ? -1 : (int)value;
            items[k].data = PyBytes_AS_STRING(frame);
            items[k].len = PyBytes_GET_SIZE(frame);
        }
        /* The lists are the caller's own and the bytes are immutable: nothing moves meanwhile. */
        Py_BEGIN_ALLOW_THREADS
        send_items(items, count, &blocked);
        Py_END_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < count; k++) {
            if (items[k].sent == items[k].len) continue;
            PyObject *entry = Py_BuildValue("(nn)", start + k, items[k].sent);
            if (entry == NULL) goto fail;
            int appended = PyList_Append(left, entry);
            Py_DECREF(entry);
            if (appended < 0) goto fail;
        }
    }
    return left;
fail:
    Py_DECREF(left);
    return NULL;
}

static PyMethodDef methods[] = {
    {"send_each", (PyCFunction)(void (*)(void))py_send_each, METH_FASTCALL,
     "Send frames[i] on socket fds[i] (-1: skip); return [(i, bytes sent)] for what is left."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "asobi._send", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__send(void) { return PyModule_Create(&module); }
