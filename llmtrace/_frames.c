/* Where every Python thread of this process is, read without the GIL.

An in-process sampler that reads stacks with sys._current_frames() must hold the GIL, so
it sees a thread running Python only when that thread lets the GIL go: at its next call
into C that releases it (a matmul, a socket call, torch.cat) or after the switch
interval. Pure-Python work that ends in such a call (an f-string formatting an array, a
deepcopy, np.pad's Python code before the model's matmul) is then sampled in the call
that follows it. snapshot() instead sleeps with the GIL released and, still without it,
copies each thread's frame chain (code object, instruction offset, globals: three
addresses per frame) through process_vm_readv on this process, which fails cleanly
(EFAULT) where a frame was freed mid-read instead of crashing: the technique of py-spy,
from inside. The caller names the addresses under the GIL, through object_at(), which
checks through the same reads that a live object of the expected type is there before
handing out a reference.

CPython 3.11 and 3.12 (their frame layouts: internal/pycore_frame.h); elsewhere
available() is False and the GIL sampler is used. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__linux__) && PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define FRAMES_SUPPORTED 1
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#include <errno.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#endif

#define MAX_THREADS 512
#define WORDS_PER_FRAME 3

#ifdef FRAMES_SUPPORTED
static pid_t g_pid;
/* This tick's stacks and the last tick's (the sampler thread's only): a thread whose
   innermost frame is the same frame at the same instruction as last tick (it waits in a
   call) keeps last tick's stack, one read instead of one per frame. */
typedef struct {
    unsigned long tid;
    const void *top; /* the innermost frame's address */
    int depth;
} ThreadStack;
static ThreadStack g_threads[2][MAX_THREADS];
static int g_nthreads[2];
static uint64_t *g_frames[2]; /* MAX_THREADS * g_depth frames each, WORDS_PER_FRAME words a frame */
static int g_depth, g_cur;

static int safe_read(const void *addr, void *dst, size_t n)
{
    struct iovec local = {dst, n}, remote = {(void *)addr, n};
    return process_vm_readv(g_pid, &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : -1;
}

static _PyInterpreterFrame *current_frame(const PyThreadState *ts)
{
    _PyCFrame cf;
    if (ts->cframe == NULL || safe_read(ts->cframe, &cf, sizeof cf))
        return NULL;
    return cf.current_frame;
}

static int skipped(unsigned long tid, const unsigned long *skip, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (skip[i] == tid)
            return 1;
    return 0;
}

static int read_frame(const _PyInterpreterFrame *frame, _PyInterpreterFrame *f, uint64_t *out)
{
    if (safe_read(frame, f, offsetof(_PyInterpreterFrame, localsplus)))
        return -1;
    char *code_start = (char *)f->f_code + offsetof(PyCodeObject, co_code_adaptive);
    out[0] = (uint64_t)(uintptr_t)f->f_code;
    out[1] = (uint64_t)(int64_t)((char *)f->prev_instr - code_start);
    out[2] = (uint64_t)(uintptr_t)f->f_globals;
    return 0;
}

static const ThreadStack *last_tick(unsigned long tid)
{
    int prev = 1 - g_cur;
    for (int i = 0; i < g_nthreads[prev]; i++)
        if (g_threads[prev][i].tid == tid)
            return &g_threads[prev][i];
    return NULL;
}

/* Thread `slot`'s frames from `frame` down, innermost first, into its part of this tick's buffer. */
static void read_stack(ThreadStack *t, int slot, const _PyInterpreterFrame *frame)
{
    uint64_t *out = g_frames[g_cur] + (size_t)slot * WORDS_PER_FRAME * g_depth;
    _PyInterpreterFrame f;
    t->top = NULL;
    t->depth = 0;
    while (frame != NULL && t->depth < g_depth && read_frame(frame, &f, out) == 0) {
#if PY_VERSION_HEX >= 0x030C0000
        if (f.owner == FRAME_OWNED_BY_CSTACK) { /* the C stack's shim frame: no Python code */
            frame = f.previous;
            continue;
        }
#endif
        if (t->depth == 0) {
            t->top = frame;
            const ThreadStack *last = last_tick(t->tid);
            int prev_slot = last != NULL ? (int)(last - g_threads[1 - g_cur]) : -1;
            const uint64_t *before = prev_slot >= 0 ? g_frames[1 - g_cur] + (size_t)prev_slot * WORDS_PER_FRAME * g_depth : NULL;
            if (last != NULL && last->top == frame && last->depth > 0 && memcmp(before, out, sizeof(uint64_t) * WORDS_PER_FRAME) == 0) {
                memcpy(out, before, sizeof(uint64_t) * WORDS_PER_FRAME * last->depth);
                t->depth = last->depth;
                return;
            }
        }
        out += WORDS_PER_FRAME;
        t->depth++;
        frame = f.previous;
    }
}
#endif

PyDoc_STRVAR(available_doc, "available() -> bool: whether snapshot() works in this process.");

static PyObject *available(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
#ifdef FRAMES_SUPPORTED
    int probe = 1, copy = 0;
    g_pid = getpid();
    if (safe_read(&probe, &copy, sizeof copy) == 0 && copy == 1)
        Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

PyDoc_STRVAR(snapshot_doc,
             "snapshot(sleep_ns, max_depth, skip) -> (t_ns, [(native_tid, bytes)])\n"
             "Sleep sleep_ns with the GIL released, then read every thread's frames (threads whose\n"
             "native id is in the tuple `skip` excepted) without taking it. t_ns: CLOCK_MONOTONIC (what\n"
             "time.perf_counter_ns() reads) when the read began. Each thread's bytes: native-endian\n"
             "uint64 triples (code address, instruction offset in bytes, globals address), innermost\n"
             "frame first; a thread without Python frames is left out.");

static PyObject *snapshot(PyObject *Py_UNUSED(m), PyObject *args)
{
#ifdef FRAMES_SUPPORTED
    long long sleep_ns;
    int max_depth;
    PyObject *skip_obj;
    if (!PyArg_ParseTuple(args, "LiO!", &sleep_ns, &max_depth, &PyTuple_Type, &skip_obj))
        return NULL;
    if (max_depth < 1 || max_depth > 1024) {
        PyErr_SetString(PyExc_ValueError, "max_depth must be in 1..1024");
        return NULL;
    }
    unsigned long skip[16];
    Py_ssize_t nskip = PyTuple_GET_SIZE(skip_obj) < 16 ? PyTuple_GET_SIZE(skip_obj) : 16;
    for (Py_ssize_t i = 0; i < nskip; i++) {
        skip[i] = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(skip_obj, i));
        if (PyErr_Occurred())
            return NULL;
    }
    if (g_depth != max_depth) {
        for (int i = 0; i < 2; i++) {
            PyMem_RawFree(g_frames[i]);
            g_frames[i] = PyMem_RawMalloc(sizeof(uint64_t) * WORDS_PER_FRAME * MAX_THREADS * max_depth);
            g_nthreads[i] = 0;
        }
        if (g_frames[0] == NULL || g_frames[1] == NULL) {
            g_depth = 0;
            return PyErr_NoMemory();
        }
        g_depth = max_depth;
    }
    g_pid = getpid(); /* a forked child reads its own memory */
    PyInterpreterState *interp = PyThreadState_GetInterpreter(PyThreadState_Get());
    struct timespec ts_now;
    int nthreads = 0;
    g_cur = 1 - g_cur;
    Py_BEGIN_ALLOW_THREADS
    if (sleep_ns > 0) {
        struct timespec req = {(time_t)(sleep_ns / 1000000000LL), (long)(sleep_ns % 1000000000LL)};
        while (nanosleep(&req, &req) == -1 && errno == EINTR) {
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &ts_now);
    PyThreadState *tstate = PyInterpreterState_ThreadHead(interp);
    PyThreadState ts;
    while (tstate != NULL && nthreads < MAX_THREADS && safe_read(tstate, &ts, sizeof ts) == 0) {
        if (!skipped(ts.native_thread_id, skip, nskip)) {
            ThreadStack *t = &g_threads[g_cur][nthreads];
            t->tid = ts.native_thread_id;
            read_stack(t, nthreads, current_frame(&ts));
            nthreads++;
        }
        tstate = ts.next;
    }
    g_nthreads[g_cur] = nthreads;
    Py_END_ALLOW_THREADS
    PyObject *rows = PyList_New(0);
    if (rows == NULL)
        return NULL;
    for (int i = 0; i < nthreads; i++) {
        const ThreadStack *t = &g_threads[g_cur][i];
        if (t->depth == 0)
            continue;
        PyObject *row = Py_BuildValue("(ky#)", t->tid, (const char *)(g_frames[g_cur] + (size_t)i * WORDS_PER_FRAME * g_depth),
                                      (Py_ssize_t)(sizeof(uint64_t) * WORDS_PER_FRAME * t->depth));
        if (row == NULL || PyList_Append(rows, row)) {
            Py_XDECREF(row);
            Py_DECREF(rows);
            return NULL;
        }
        Py_DECREF(row);
    }
    long long t_ns = (long long)ts_now.tv_sec * 1000000000LL + ts_now.tv_nsec;
    PyObject *out = Py_BuildValue("(LN)", t_ns, rows);
    return out;
#else
    PyErr_SetString(PyExc_RuntimeError, "frame snapshots need CPython 3.11 or 3.12 on Linux");
    return NULL;
#endif
}

PyDoc_STRVAR(object_at_doc,
             "object_at(address, type) -> object | None: the object of exactly `type` that lives at\n"
             "`address` now (a new reference), else None. Called under the GIL, so what it finds\n"
             "alive stays alive while the caller holds it. A freed object fails the checks: its first\n"
             "words are the allocator's free-list pointers (a reference count no live object has) or\n"
             "another type.");

static PyObject *object_at(PyObject *Py_UNUSED(m), PyObject *args)
{
#ifdef FRAMES_SUPPORTED
    unsigned long long address;
    PyTypeObject *type;
    if (!PyArg_ParseTuple(args, "KO!", &address, &PyType_Type, &type))
        return NULL;
    PyObject head;
    g_pid = getpid();
    if (address != 0 && safe_read((void *)(uintptr_t)address, &head, sizeof head) == 0 && Py_TYPE(&head) == type &&
        head.ob_refcnt > 0 && head.ob_refcnt < ((Py_ssize_t)1 << 30)) {
        PyObject *o = (PyObject *)(uintptr_t)address;
        Py_INCREF(o);
        return o;
    }
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(line_doc, "line(code, offset) -> int: the source line of the instruction at byte offset `offset`.");

static PyObject *line(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyCodeObject *code;
    int offset;
    if (!PyArg_ParseTuple(args, "O!i", &PyCode_Type, &code, &offset))
        return NULL;
    if (offset < 0 || offset >= (int)(Py_SIZE(code) * 2)) /* ob_size: 2-byte code units */
        return PyLong_FromLong(code->co_firstlineno); /* a frame not yet started, or a torn read */
    return PyLong_FromLong(PyCode_Addr2Line(code, offset));
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, available_doc},
    {"snapshot", snapshot, METH_VARARGS, snapshot_doc},
    {"object_at", object_at, METH_VARARGS, object_at_doc},
    {"line", line, METH_VARARGS, line_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "llmtrace._frames", NULL, -1, methods};

PyMODINIT_FUNC PyInit__frames(void) { return PyModule_Create(&module); }
