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

static int skipped(unsigned long tid, const unsigned long *skip, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (skip[i] == tid)
            return 1;
    return 0;
}

/* A thread's frames sit next to each other in its data stack (3.11+), each caller below
   its callee: one read of the pages below the innermost frame holds most of a stack, read
   at one instant (frame by frame, a deep stack took ~40 reads, and a busy thread moved on
   between the first and the last). Pages are read top down, so an unmapped page below a
   chunk only shortens the block. Generator frames live elsewhere: a read of their own. */
#define PAGE 4096
#define BLOCK_PAGES 4
#define FRAME_HEAD offsetof(_PyInterpreterFrame, localsplus)
static char g_block[BLOCK_PAGES * PAGE + FRAME_HEAD];
static uintptr_t g_block_start;         /* the address g_block[0] stands for */
static uintptr_t g_block_lo, g_block_hi; /* the part of it read; none when equal */

static int read_block(uintptr_t end)
{
    struct iovec local[BLOCK_PAGES + 2], remote[BLOCK_PAGES + 2];
    uintptr_t start = end > sizeof g_block ? end - sizeof g_block : 0;
    int n = 0;
    for (uintptr_t hi = end; hi > start; n++) { /* [lo, hi): within one page, read whole or not at all */
        uintptr_t lo = (hi - 1) & ~(uintptr_t)(PAGE - 1);
        if (lo < start)
            lo = start;
        remote[n].iov_base = (void *)lo;
        local[n].iov_base = g_block + (lo - start);
        remote[n].iov_len = local[n].iov_len = hi - lo;
        hi = lo;
    }
    ssize_t got = process_vm_readv(g_pid, local, n, remote, n, 0); /* stops at the first unmapped page */
    if (got < (ssize_t)FRAME_HEAD) {
        g_block_lo = g_block_hi = 0;
        return -1;
    }
    g_block_start = start;
    g_block_hi = end;
    g_block_lo = end - (uintptr_t)got;
    return 0;
}

static int read_frame(const _PyInterpreterFrame *frame, _PyInterpreterFrame *f)
{
    uintptr_t at = (uintptr_t)frame;
    if (at > UINTPTR_MAX - FRAME_HEAD) /* a torn read's `previous` (0xffff...): no frame */
        return -1;
    if ((at < g_block_lo || at + FRAME_HEAD > g_block_hi) && read_block(at + FRAME_HEAD))
        return -1;
    memcpy(f, g_block + (at - g_block_start), FRAME_HEAD);
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

/* Elements [0, n) of one scattered read, as many system calls as failures + 1; ok[i]:
   whether element i was read (each lies within one object, read whole or not at all). */
static void read_all(struct iovec *local, struct iovec *remote, int n, char *ok)
{
    int i = 0;
    while (i < n) {
        ssize_t got = process_vm_readv(g_pid, local + i, (unsigned long)(n - i), remote + i, (unsigned long)(n - i), 0);
        for (; i < n && got >= (ssize_t)remote[i].iov_len; i++) {
            ok[i] = 1;
            got -= (ssize_t)remote[i].iov_len;
        }
        if (i < n)
            ok[i++] = 0; /* the element the read stopped at */
    }
}

/* This tick's thread states into g_ts (their addresses in g_ts_at), in list order: one
   read of last tick's list where it is still the list, else a walk of `next`. */
static PyThreadState *g_ts_at[MAX_THREADS];
static PyThreadState g_ts[MAX_THREADS];
static int g_nts;

static int read_thread_states(PyInterpreterState *interp)
{
    static struct iovec local[MAX_THREADS], remote[MAX_THREADS];
    static char ok[MAX_THREADS];
    PyThreadState *head = PyInterpreterState_ThreadHead(interp);
    if (g_nts > 0 && g_ts_at[0] == head) {
        for (int i = 0; i < g_nts; i++) {
            local[i].iov_base = &g_ts[i];
            remote[i].iov_base = g_ts_at[i];
            local[i].iov_len = remote[i].iov_len = sizeof(PyThreadState);
        }
        read_all(local, remote, g_nts, ok);
        int same = 1;
        for (int i = 0; i < g_nts && same; i++)
            same = ok[i] && g_ts[i].next == (i + 1 < g_nts ? g_ts_at[i + 1] : NULL);
        if (same)
            return g_nts;
    }
    g_nts = 0;
    for (PyThreadState *t = head; t != NULL && g_nts < MAX_THREADS && safe_read(t, &g_ts[g_nts], sizeof *t) == 0;
         t = g_ts[g_nts++].next)
        g_ts_at[g_nts] = t;
    return g_nts;
}

/* Whether thread t's stack is last tick's: the same innermost frame at the same instruction
   (it waits in a call), whose words `out` holds. Then last tick's frames are copied into it. */
static int unmoved(ThreadStack *t, uint64_t *out)
{
    const ThreadStack *last = last_tick(t->tid);
    if (last == NULL || last->top != t->top || last->depth == 0)
        return 0;
    const uint64_t *before = g_frames[1 - g_cur] + (size_t)(last - g_threads[1 - g_cur]) * WORDS_PER_FRAME * g_depth;
    if (memcmp(before, out, sizeof(uint64_t) * WORDS_PER_FRAME) != 0)
        return 0;
    memcpy(out, before, sizeof(uint64_t) * WORDS_PER_FRAME * last->depth);
    t->depth = last->depth;
    return 1;
}

static void frame_words(const _PyInterpreterFrame *f, uint64_t *out)
{
    /* integer arithmetic: the pointers of a torn read may point anywhere */
    uintptr_t code_start = (uintptr_t)f->f_code + offsetof(PyCodeObject, co_code_adaptive);
    out[0] = (uint64_t)(uintptr_t)f->f_code;
    out[1] = (uint64_t)((uintptr_t)f->prev_instr - code_start);
    out[2] = (uint64_t)(uintptr_t)f->f_globals;
}

/* Thread `slot`'s stack: its innermost frame `top` (read already, at address t->top), then
   the callers through the block. */
static void read_stack(ThreadStack *t, int slot, const _PyInterpreterFrame *top)
{
    uint64_t *out = g_frames[g_cur] + (size_t)slot * WORDS_PER_FRAME * g_depth;
    _PyInterpreterFrame f = *top;
    t->depth = 0;
    g_block_lo = g_block_hi = 0; /* this thread's frames as they are now */
    for (;;) {
#if PY_VERSION_HEX >= 0x030C0000
        if (f.owner != FRAME_OWNED_BY_CSTACK) /* the C stack's shim frame: no Python code */
#endif
        {
            frame_words(&f, out);
            if (t->depth == 0 && unmoved(t, out))
                return;
            out += WORDS_PER_FRAME;
            t->depth++;
        }
        if (f.previous == NULL || t->depth >= g_depth || read_frame(f.previous, &f))
            return;
    }
}

/* Every thread's stack, those in `skip` excepted: scattered reads of all thread states,
   all their frame pointers and all innermost frames, then a block per thread that moved. */
static int read_threads(PyInterpreterState *interp, const unsigned long *skip, Py_ssize_t nskip)
{
    static struct iovec local[MAX_THREADS], remote[MAX_THREADS];
    static char ok[MAX_THREADS];
    static _PyCFrame cframes[MAX_THREADS];
    static _PyInterpreterFrame tops[MAX_THREADS];
    static int which[MAX_THREADS]; /* g_ts index of each thread read */
    int n = 0, nts = read_thread_states(interp);
    for (int i = 0; i < nts; i++) {
        if (g_ts[i].cframe == NULL || skipped(g_ts[i].native_thread_id, skip, nskip))
            continue;
        which[n] = i;
        local[n].iov_base = &cframes[n];
        remote[n].iov_base = g_ts[i].cframe;
        local[n].iov_len = remote[n].iov_len = sizeof(_PyCFrame);
        n++;
    }
    read_all(local, remote, n, ok);
    for (int k = 0; k < n; k++) {
        local[k].iov_base = &tops[k];
        remote[k].iov_base = ok[k] ? cframes[k].current_frame : NULL;
        local[k].iov_len = remote[k].iov_len = ok[k] && cframes[k].current_frame != NULL ? FRAME_HEAD : 0;
    }
    read_all(local, remote, n, ok);
    int nthreads = 0;
    for (int k = 0; k < n; k++) {
        if (!ok[k] || remote[k].iov_len == 0)
            continue;
        ThreadStack *t = &g_threads[g_cur][nthreads];
        t->tid = g_ts[which[k]].native_thread_id;
        t->top = remote[k].iov_base;
        read_stack(t, nthreads, &tops[k]);
        nthreads++;
    }
    return nthreads;
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
    nthreads = read_threads(interp, skip, nskip);
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

#ifdef FRAMES_SUPPORTED
/* A count a live object has: a plausible one, or 3.12's immortal mark (deep-frozen and
   static code objects: importlib, runpy, os ... are on many stacks). A freed block's first
   word is a free-list pointer instead: far larger, or 0. */
static int live_refcnt(Py_ssize_t n)
{
#ifdef _Py_IMMORTAL_REFCNT
    if (n == _Py_IMMORTAL_REFCNT)
        return 1;
#endif
    return n > 0 && n < ((Py_ssize_t)1 << 30);
}
#endif

PyDoc_STRVAR(object_at_doc,
             "object_at(address, type) -> object | None: the object of exactly `type` that lives at\n"
             "`address` now (a new reference), else None. Called under the GIL, so what it finds\n"
             "alive stays alive while the caller holds it. A freed object fails the checks: its first\n"
             "words are the allocator's free-list pointers (a reference count no live object has) or\n"
             "another type. Immortal objects (3.12) count as live.");

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
        live_refcnt(head.ob_refcnt)) {
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
    long long offset;
    if (!PyArg_ParseTuple(args, "O!L", &PyCode_Type, &code, &offset))
        return NULL;
    if (offset < 0 || offset >= (long long)Py_SIZE(code) * 2) /* ob_size: 2-byte code units */
        return PyLong_FromLong(code->co_firstlineno);      /* a frame not yet started, or a torn read */
    return PyLong_FromLong(PyCode_Addr2Line(code, (int)offset));
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
