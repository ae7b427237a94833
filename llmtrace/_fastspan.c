/* _fastspan: the C recorder backend.
 *
 * Same module-level functions, semantics and 112-byte records as _pyrecorder.py (the
 * reference; read it first). What makes this one cheap:
 *   - each thread appends to its own fixed array of records (a C thread-local pointer);
 *     no lock and no allocation besides the span object, overflow is counted per thread.
 *     Every call runs under the GIL, which also serialises writers with drain().
 *   - the current (span_id, step) of a thread / asyncio task lives in a small mutable
 *     object per Context, found with one cached ContextVar lookup and updated in place,
 *     so entering a span does not ContextVar.set (see "Current span" below).
 *   - span names map to (name id, default stage id) through one dict lookup.
 *   - when recording is off, span() returns one shared object whose __enter__/__exit__
 *     are no-ops and traced() wrappers call straight through.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <assert.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifdef Py_GIL_DISABLED
#error "_fastspan relies on the GIL to serialise writers with drain()"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "records are written in host order; the spool format is little-endian"
#endif

#define N_ATTRS 4
#define BUFFER_CAP (1 << 16)
#define KIND_SPAN 0
#define KIND_INSTANT 1
#define KIND_COUNTER 2
#define FLAG_EXCEPTION 1
#define FLAG_ATTRS_CUT 2
#define FLAG_OPEN_AT_STOP 4
#define ATTR_STR (1u << 31)
#define ATTR_FLOAT (1u << 30)
#define ATTR_ID_MASK ((1u << 30) - 1)

/* spool_format.RECORD ("<qqQQQq4q4I3IBBH") with natural alignment: no padding. */
typedef struct {
    int64_t start, end;
    uint64_t span_id, parent_id, link_id;
    int64_t step;
    int64_t attr_val[N_ATTRS];
    uint32_t attr_key[N_ATTRS];
    uint32_t name_id, stage_id, tid;
    uint8_t kind, flags;
    uint16_t pad;
} record_t;
static_assert(sizeof(record_t) == 112, "record must match spool_format.RECORD");

/* ---------------------------------------------------------------- clock, ids */

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter_ns() reads on Linux */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int g_enabled;
static uint64_t g_id_base;
static uint64_t g_seq;

static inline uint64_t next_span_id(void) { return g_id_base | ++g_seq; }

/* ---------------------------------------------------------------- per-thread buffers */

typedef struct tbuf {
    record_t *recs;
    uint32_t n;
    uint32_t tid;
    uint64_t dropped, reported;
    int dead; /* set (atomically) by the pthread key destructor when the thread exits */
    struct tbuf *next;
} tbuf_t;

/* initial-exec: a plain %fs-relative load instead of a __tls_get_addr call */
static __thread tbuf_t *t_buf __attribute__((tls_model("initial-exec")));
static tbuf_t *g_bufs; /* every live or not yet drained buffer; guarded by the GIL */
static pthread_key_t g_buf_key;

static void buf_thread_exit(void *p)
{
    /* Runs without the GIL after the thread's last record; drain() frees the buffer. */
    __atomic_store_n(&((tbuf_t *)p)->dead, 1, __ATOMIC_RELEASE);
}

static tbuf_t *buf_register(void)
{
    tbuf_t *b = calloc(1, sizeof *b);
    if (b != NULL)
        b->recs = malloc(sizeof(record_t) * BUFFER_CAP);
    if (b == NULL || b->recs == NULL) {
        free(b);
        PyErr_NoMemory();
        return NULL;
    }
    b->tid = (uint32_t)syscall(SYS_gettid);
    b->next = g_bufs;
    g_bufs = b;
    pthread_setspecific(g_buf_key, b);
    t_buf = b;
    return b;
}

/* Slot for one record of this thread, or NULL when the buffer is full (counted) or on
 * error (exception set; tell them apart with PyErr_Occurred only where it matters). */
static inline record_t *rec_slot(void)
{
    tbuf_t *b = t_buf;
    if (b == NULL && (b = buf_register()) == NULL)
        return NULL;
    if (b->n < BUFFER_CAP) {
        record_t *r = &b->recs[b->n++];
        r->tid = b->tid;
        r->pad = 0;
        return r;
    }
    b->dropped++;
    return NULL;
}

/* ---------------------------------------------------------------- strings */

static PyObject *g_strings;     /* str -> int id (1, 2, ...) */
static PyObject *g_new_strings; /* [(id, str)] not yet handed to drain() */
static PyObject *g_names;       /* span name -> NameIds */

typedef struct {
    PyObject_HEAD
    uint32_t name_id, stage_id; /* the name's and its default stage's (the part before the first dot) */
} NameIds;

static PyTypeObject NameIds_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmtrace._fastspan._NameIds",
    .tp_basicsize = sizeof(NameIds),
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

/* Id of `s` (a str), interning it on first sight; 0 with an exception set on error. */
static uint32_t intern_id(PyObject *s)
{
    PyObject *v = PyDict_GetItemWithError(g_strings, s);
    if (v != NULL)
        return (uint32_t)PyLong_AsUnsignedLong(v);
    if (PyErr_Occurred())
        return 0;
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "llmtrace names must be str, not %.100s", Py_TYPE(s)->tp_name);
        return 0;
    }
    /* The id is taken right before the dict insert: allocating a tuple can run the GC, whose
     * callbacks (llmtrace.gc_spans) may intern strings themselves. */
    PyObject *key = PyUnicode_CheckExact(s) ? Py_NewRef(s) : PyUnicode_FromObject(s);
    if (key == NULL)
        return 0;
    uint32_t id = (uint32_t)PyDict_GET_SIZE(g_strings) + 1;
    PyObject *idobj = PyLong_FromUnsignedLong(id);
    int bad = idobj == NULL || PyDict_SetItem(g_strings, key, idobj) < 0;
    PyObject *entry = bad ? NULL : PyTuple_Pack(2, idobj, key);
    bad = bad || entry == NULL || PyList_Append(g_new_strings, entry) < 0;
    Py_DECREF(key);
    Py_XDECREF(idobj);
    Py_XDECREF(entry);
    return bad ? 0 : id;
}

/* Name id and the id of its default stage (the part before the first dot). */
static int name_ids(PyObject *name, uint32_t *name_id, uint32_t *stage_id)
{
    PyObject *v = PyDict_GetItemWithError(g_names, name);
    if (v != NULL) {
        *name_id = ((NameIds *)v)->name_id;
        *stage_id = ((NameIds *)v)->stage_id;
        return 0;
    }
    if (PyErr_Occurred())
        return -1;
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "span name must be str, not %.100s", Py_TYPE(name)->tp_name);
        return -1;
    }
    Py_ssize_t dot = PyUnicode_FindChar(name, '.', 0, PyUnicode_GET_LENGTH(name), 1);
    if (dot == -2)
        return -1;
    PyObject *stage = dot < 0 ? Py_NewRef(name) : PyUnicode_Substring(name, 0, dot);
    if (stage == NULL)
        return -1;
    *name_id = intern_id(name);
    *stage_id = *name_id ? intern_id(stage) : 0;
    Py_DECREF(stage);
    if (*stage_id == 0)
        return -1;
    NameIds *ids = PyObject_New(NameIds, &NameIds_Type);
    if (ids == NULL)
        return -1;
    ids->name_id = *name_id;
    ids->stage_id = *stage_id;
    int rc = PyDict_SetItem(g_names, name, (PyObject *)ids);
    Py_DECREF(ids);
    return rc;
}

/* ---------------------------------------------------------------- attributes */

typedef struct {
    int64_t val[N_ATTRS];
    uint32_t key[N_ATTRS];
    uint8_t n, flags;
} attrs_t;

static void attrs_to_record(const attrs_t *a, record_t *r)
{
    memcpy(r->attr_val, a->val, sizeof a->val);
    memcpy(r->attr_key, a->key, sizeof a->key);
}

/* Set attribute `key` like a dict update: replace in place, else append, else cut. */
static int attrs_put(attrs_t *a, PyObject *key, PyObject *value)
{
    uint32_t kid = intern_id(key);
    if (kid == 0)
        return -1;
    int i = 0;
    while (i < a->n && (a->key[i] & ATTR_ID_MASK) != kid)
        i++;
    if (i == N_ATTRS) {
        a->flags |= FLAG_ATTRS_CUT;
        return 0;
    }
    int64_t val;
    if (PyLong_Check(value)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (!overflow) {
            val = x;
            goto store;
        }
    }
    if (PyFloat_Check(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        memcpy(&val, &d, sizeof val);
        kid |= ATTR_FLOAT;
    } else {
        PyObject *s = PyUnicode_Check(value) ? Py_NewRef(value) : PyObject_Str(value);
        if (s == NULL)
            return -1;
        uint32_t sid = intern_id(s);
        Py_DECREF(s);
        if (sid == 0)
            return -1;
        val = sid;
        kid |= ATTR_STR;
    }
store:
    a->val[i] = val;
    a->key[i] = kid;
    if (i == a->n)
        a->n++;
    return 0;
}

static int attrs_from_kwargs(attrs_t *a, PyObject *const *vals, PyObject *kwnames, Py_ssize_t from, Py_ssize_t to)
{
    for (Py_ssize_t i = from; i < to; i++)
        if (attrs_put(a, PyTuple_GET_ITEM(kwnames, i), vals[i]) < 0)
            return -1;
    return 0;
}

static int attrs_from_dict(attrs_t *a, PyObject *d)
{
    if (d == NULL || d == Py_None)
        return 0;
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "attrs must be a dict or None");
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v))
        if (attrs_put(a, k, v) < 0)
            return -1;
    return 0;
}

/* ---------------------------------------------------------------- current span
 *
 * The current (span_id, step) of a Context is a small mutable Cur object stored in the
 * ContextVar g_cur_var. A span enter/exit reads it with PyContextVar_Get (cached by
 * CPython until the thread's context changes) and updates it in place. That is only
 * correct while nobody else sees the object, so a Context first takes its own Cur (one
 * ContextVar.set, copying the values) when:
 *   - the Cur it sees belongs to another Context: a new asyncio Task, contextvars.copy_context,
 *     asyncio.to_thread, ... inherit the creator's current span as in _pyrecorder;
 *   - its variables may have been copied since: the Context's HAMT of variables is no
 *     longer the one it had when it took the Cur, or someone else holds a reference to it.
 *     The copy keeps the old Cur, frozen at the value it had when it was copied.
 * Interleaved tasks therefore keep separate parents, like the reference's ContextVar.
 * One case goes unseen: a copy that sets some other ContextVar (dropping the copied
 * variables) before this context's next span enter/exit, and only later reads the
 * current span, sees this context's span of that later time instead of the copy time.
 */

/* CPython's PyContext layout (Include/internal/pycore_context.h, unchanged 3.7-3.13);
 * the module refuses to import (pure-Python fallback) if the size differs. */
typedef struct {
    PyObject_HEAD
    PyObject *ctx_prev;
    PyObject *ctx_vars;
    PyObject *ctx_weakreflist;
    int ctx_entered;
} ContextLayout;

typedef struct {
    PyObject_HEAD
    PyObject *owner; /* weak reference to the Context that may update this in place */
    PyObject *vars;  /* borrowed: the owner's variables when it took this object */
    uint64_t id;
    int64_t step;
} CurObject;

static PyObject *g_cur_var;

static void cur_dealloc(CurObject *c)
{
    Py_XDECREF(c->owner);
    PyObject_Free(c);
}

static PyTypeObject Cur_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmtrace._fastspan._Current",
    .tp_basicsize = sizeof(CurObject),
    .tp_dealloc = (destructor)cur_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

static inline int is_owner(CurObject *c, PyObject *ctx)
{
    if (c->owner == NULL || ctx == NULL)
        return 0;
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *o;
    if (PyWeakref_GetRef(c->owner, &o) <= 0) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(o);
    return o == ctx;
#else
    return PyWeakref_GET_OBJECT(c->owner) == ctx;
#endif
}

/* The Cur visible in the current context (borrowed), or NULL when none; -1 on error. */
static inline int cur_peek(CurObject **out)
{
    PyObject *v;
    if (PyContextVar_Get(g_cur_var, NULL, &v) < 0)
        return -1;
    Py_XDECREF(v); /* the context's variables keep it alive */
    *out = (CurObject *)v;
    return 0;
}

/* The Cur this context may update in place (borrowed); NULL on error. */
static CurObject *cur_own(void)
{
    PyThreadState *ts = PyThreadState_Get();
    CurObject *c;
    if (cur_peek(&c) < 0)
        return NULL;
    PyObject *ctx = ts->context;
    if (c != NULL && ctx != NULL && ((ContextLayout *)ctx)->ctx_vars == c->vars && Py_REFCNT(c->vars) == 1 &&
        is_owner(c, ctx))
        return c;
    CurObject *mine = PyObject_New(CurObject, &Cur_Type);
    if (mine == NULL)
        return NULL;
    mine->owner = NULL;
    mine->vars = NULL;
    mine->id = c ? c->id : 0;
    mine->step = c ? c->step : -1;
    PyObject *token = PyContextVar_Set(g_cur_var, (PyObject *)mine);
    Py_DECREF(mine); /* held by the context's variables from here on */
    if (token == NULL)
        return NULL;
    Py_DECREF(token);
    ctx = ts->context; /* created by the set when the thread had none */
    mine->owner = PyWeakref_NewRef(ctx, NULL);
    if (mine->owner == NULL)
        return NULL;
    mine->vars = ((ContextLayout *)ctx)->ctx_vars;
    return mine;
}

/* ---------------------------------------------------------------- device hook */

static PyObject *g_device_hook; /* None or an object with begin() / end(tok, span_id, name_id, stage_id, step) */
static PyObject *s_begin;

/* ---------------------------------------------------------------- Span
 *
 * `with` looks __enter__ and __exit__ up on the type and binds them to the object; for C
 * methods that allocates two GC-tracked bound-method objects per span, which in CPython
 * 3.11 costs about as much as the span's own work. So a span carries its two bound
 * methods inside itself: the type's __enter__/__exit__ descriptors hand out these
 * embedded objects, which hold a reference to their span from the moment the first
 * reference to them is taken until the last one is dropped (their dealloc frees nothing).
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
} BoundSlot;

typedef struct SpanObject {
    PyObject_HEAD
    BoundSlot enter_b, exit_b;
    int64_t t0, step;
    uint64_t span_id, parent, link, prev_id;
    int64_t prev_step;
    uint32_t name_id, stage_id;
    int device;
    int open;     /* entered while recording, not yet left */
    int has_t0;   /* start_ns= given: t0 is the span's start, not the time of __enter__ */
    int reported; /* recorded by close_open() while still open: its exit records nothing */
    uint32_t tid; /* the thread that entered it */
    attrs_t attrs;
    PyObject *hook; /* the device hook used at enter, and its token */
    PyObject *dtok;
    struct SpanObject *open_prev, *open_next; /* in g_open while open */
} SpanObject;

static PyTypeObject Span_Type;

/* Every open span of the process (any thread, any task), for close_open() at a process's
 * end: a doubly linked list through the spans, guarded by the GIL. A stack per thread
 * would not do: asyncio tasks interleave their spans on one thread. */
static SpanObject *g_open;

static void open_link(SpanObject *s)
{
    s->open_prev = NULL;
    s->open_next = g_open;
    if (g_open != NULL)
        g_open->open_prev = s;
    g_open = s;
}

static void open_unlink(SpanObject *s)
{
    if (s->open_prev == NULL && g_open != s)
        return; /* not linked (forgotten after a fork) */
    if (s->open_prev != NULL)
        s->open_prev->open_next = s->open_next;
    else
        g_open = s->open_next;
    if (s->open_next != NULL)
        s->open_next->open_prev = s->open_prev;
    s->open_prev = s->open_next = NULL;
}

/* Freed spans kept for reuse: most code opens and closes spans in a loop. */
#define SPAN_FREELIST 64
static SpanObject *g_span_free[SPAN_FREELIST];
static int g_n_span_free;

static void span_dealloc(SpanObject *s)
{
    if (s->open) /* a frame dropped without running its __exit__ */
        open_unlink(s);
    Py_XDECREF(s->hook);
    Py_XDECREF(s->dtok);
    if (g_n_span_free < SPAN_FREELIST)
        g_span_free[g_n_span_free++] = s;
    else
        PyObject_Free(s);
}

static PyObject *span_enter(SpanObject *s)
{
    if (!g_enabled)
        return Py_NewRef(s);
    CurObject *c = cur_own();
    if (c == NULL)
        return NULL;
    s->span_id = next_span_id();
    s->parent = s->prev_id = c->id;
    s->prev_step = c->step;
    if (s->step == -1)
        s->step = c->step;
    c->id = s->span_id;
    c->step = s->step;
    if (s->device && g_device_hook != Py_None) {
        s->dtok = PyObject_CallMethodNoArgs(g_device_hook, s_begin);
        if (s->dtok == NULL) {
            c->id = s->prev_id;
            c->step = s->prev_step;
            return NULL;
        }
        s->hook = Py_NewRef(g_device_hook);
    }
    if (t_buf == NULL && buf_register() == NULL) {
        c->id = s->prev_id;
        c->step = s->prev_step;
        return NULL;
    }
    s->tid = t_buf->tid;
    s->open = 1;
    open_link(s);
    if (!s->has_t0)
        s->t0 = now_ns();
    return Py_NewRef(s);
}

/* The span's record, ending at t1. */
static void span_record(const SpanObject *s, record_t *r, int64_t t1, uint8_t flags)
{
    r->start = s->t0;
    r->end = t1;
    r->span_id = s->span_id;
    r->parent_id = s->parent;
    r->link_id = s->link;
    r->step = s->step;
    attrs_to_record(&s->attrs, r);
    r->name_id = s->name_id;
    r->stage_id = s->stage_id;
    r->kind = KIND_SPAN;
    r->flags = s->attrs.flags | flags;
}

/* __exit__(exc_type, exc, tb): records the span; never swallows the exception. */
static PyObject *span_exit(SpanObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (!s->open)
        Py_RETURN_FALSE;
    s->open = 0;
    open_unlink(s);
    int64_t t1 = now_ns();
    int failed = nargs > 0 && args[0] != Py_None;
    int hook_failed = 0;
    if (s->dtok != NULL) {
        PyObject *res = PyObject_CallMethod(s->hook, "end", "OKIIL", s->dtok, (unsigned long long)s->span_id,
                                            s->name_id, s->stage_id, (long long)s->step);
        hook_failed = res == NULL;
        Py_XDECREF(res);
        Py_CLEAR(s->dtok);
        Py_CLEAR(s->hook);
    }
    CurObject *c = cur_own();
    if (c != NULL) {
        c->id = s->prev_id;
        c->step = s->prev_step;
    }
    record_t *r = s->reported ? NULL : rec_slot();
    if (r != NULL)
        span_record(s, r, t1, failed ? FLAG_EXCEPTION : 0);
    if (hook_failed || c == NULL || PyErr_Occurred())
        return NULL;
    Py_RETURN_FALSE;
}

#define SPAN_OF(b, member) ((SpanObject *)((char *)(b) - offsetof(SpanObject, member)))

static PyObject *bound_enter_call(PyObject *b, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    (void)args;
    if (PyVectorcall_NARGS(nargsf) != 0 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "__enter__() takes no arguments");
        return NULL;
    }
    return span_enter(SPAN_OF(b, enter_b));
}

static PyObject *bound_exit_call(PyObject *b, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "__exit__() takes 3 arguments (exc_type, exc, tb)");
        return NULL;
    }
    return span_exit(SPAN_OF(b, exit_b), args, nargs);
}

static void bound_enter_dealloc(PyObject *b) { Py_DECREF(SPAN_OF(b, enter_b)); }
static void bound_exit_dealloc(PyObject *b) { Py_DECREF(SPAN_OF(b, exit_b)); }

#define BOUND_SLOT_TYPE(var, tpname, dealloc)                                                                  \
    static PyTypeObject var = {                                                                                \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = tpname,                                                       \
        .tp_basicsize = sizeof(BoundSlot),                                                                     \
        .tp_dealloc = dealloc,                                                                                 \
        .tp_vectorcall_offset = offsetof(BoundSlot, vectorcall),                                               \
        .tp_call = PyVectorcall_Call,                                                                          \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,                                           \
    }
BOUND_SLOT_TYPE(BoundEnter_Type, "llmtrace._fastspan.Span.__enter__", bound_enter_dealloc);
BOUND_SLOT_TYPE(BoundExit_Type, "llmtrace._fastspan.Span.__exit__", bound_exit_dealloc);

/* Span.__enter__ / Span.__exit__: bind to the embedded slot; called unbound, take the span first. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    size_t offset; /* of the BoundSlot in SpanObject */
} SlotDescr;

static PyObject *slot_descr_get(PyObject *d, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL)
        return Py_NewRef(d);
    if (!Py_IS_TYPE(obj, &Span_Type)) {
        PyErr_SetString(PyExc_TypeError, "descriptor needs a Span");
        return NULL;
    }
    PyObject *b = (PyObject *)((char *)obj + ((SlotDescr *)d)->offset);
    if (Py_REFCNT(b) == 0)
        Py_INCREF(obj);
    Py_INCREF(b);
    return b;
}

static PyObject *slot_descr_call(PyObject *d, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1 || !Py_IS_TYPE(args[0], &Span_Type)) {
        PyErr_SetString(PyExc_TypeError, "descriptor needs a Span as first argument");
        return NULL;
    }
    PyObject *b = (PyObject *)((char *)args[0] + ((SlotDescr *)d)->offset);
    return ((BoundSlot *)b)->vectorcall(b, args + 1, (size_t)(nargs - 1), kwnames);
}

static PyTypeObject SlotDescr_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmtrace._fastspan.SpanSlot",
    .tp_basicsize = sizeof(SlotDescr),
    .tp_vectorcall_offset = offsetof(SlotDescr, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_descr_get = slot_descr_get,
};

static int add_slot_descr(const char *name, size_t offset)
{
    SlotDescr *d = PyObject_New(SlotDescr, &SlotDescr_Type);
    if (d == NULL)
        return -1;
    d->vectorcall = slot_descr_call;
    d->offset = offset;
    int rc = PyDict_SetItemString(Span_Type.tp_dict, name, (PyObject *)d);
    Py_DECREF(d);
    return rc;
}

/* An embedded slot starts unreferenced. Its header is cleared with memset, not
 * Py_SET_REFCNT: since 3.12 that is a no-op on a count that looks immortal (low 32 bits
 * negative), and fresh PyObject_New memory may hold one; the slot would then never take
 * its reference to the span, which was freed and reused while still inside `with`. */
static void slot_init(BoundSlot *b, PyTypeObject *type, vectorcallfunc call)
{
    memset(b, 0, sizeof *b);
    Py_SET_TYPE(b, type);
    b->vectorcall = call;
}

static SpanObject *span_new(void)
{
    SpanObject *s;
    if (g_n_span_free > 0) {
        s = g_span_free[--g_n_span_free];
        Py_SET_REFCNT(s, 1);
    } else if ((s = PyObject_New(SpanObject, &Span_Type)) == NULL) {
        return NULL;
    }
    slot_init(&s->enter_b, &BoundEnter_Type, bound_enter_call);
    slot_init(&s->exit_b, &BoundExit_Type, bound_exit_call);
    s->step = -1;
    s->span_id = s->link = 0;
    s->device = s->open = s->has_t0 = s->reported = 0;
    s->open_prev = s->open_next = NULL;
    memset(&s->attrs, 0, sizeof s->attrs);
    s->hook = s->dtok = NULL;
    return s;
}

static PyObject *span_set(SpanObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 0) {
        PyErr_SetString(PyExc_TypeError, "set() takes keyword arguments only");
        return NULL;
    }
    if (kwnames != NULL && attrs_from_kwargs(&s->attrs, args, kwnames, 0, PyTuple_GET_SIZE(kwnames)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *span_get_id(SpanObject *s, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(s->span_id);
}

static int apply_follows(SpanObject *s, PyObject *follows);

/* follow(carrier): link to a span of another process known only once the span is open
 * (the frame it times carries it). A span without a step, and the children opened in it
 * from now on, take the carrier's step. */
static PyObject *span_follow(SpanObject *s, PyObject *carrier)
{
    int adopt = s->step == -1;
    if (carrier == Py_None)
        Py_RETURN_NONE;
    if (apply_follows(s, carrier) < 0)
        return NULL;
    if (adopt && s->open) {
        CurObject *c = cur_own();
        if (c == NULL)
            return NULL;
        if (c->id == s->span_id)
            c->step = s->step;
    }
    Py_RETURN_NONE;
}

static PyObject *span_get_start(SpanObject *s, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(s->span_id || s->has_t0 ? s->t0 : 0);
}

static PyObject *span_get_step(SpanObject *s, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(s->step);
}

static PyMethodDef span_methods[] = {
    {"set", (PyCFunction)(void (*)(void))span_set, METH_FASTCALL | METH_KEYWORDS,
     "Add attributes known only inside the span (e.g. the batch size)."},
    {"follow", (PyCFunction)span_follow, METH_O,
     "Link to the sender's span once its carrier is known; a span without a step takes the carrier's."},
    {NULL},
};

static PyGetSetDef span_getset[] = {
    {"span_id", (getter)span_get_id, NULL, "id of the span once entered, else 0", NULL},
    {"start_ns", (getter)span_get_start, NULL, "start time (perf_counter_ns clock) once entered or given, else 0",
     NULL},
    {"step", (getter)span_get_step, NULL, "the span's step (-1: none)", NULL},
    {NULL},
};

static PyTypeObject Span_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmtrace._fastspan.LiveSpan",
    .tp_doc = "A timed region; use through `llmtrace.span(...)`.",
    .tp_basicsize = sizeof(SpanObject),
    .tp_dealloc = (destructor)span_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = span_methods,
    .tp_getset = span_getset,
};

static int span_type_ready(void)
{
    if (PyType_Ready(&BoundEnter_Type) < 0 || PyType_Ready(&BoundExit_Type) < 0 ||
        PyType_Ready(&SlotDescr_Type) < 0 || PyType_Ready(&Span_Type) < 0 ||
        add_slot_descr("__enter__", offsetof(SpanObject, enter_b)) < 0 ||
        add_slot_descr("__exit__", offsetof(SpanObject, exit_b)) < 0)
        return -1;
    PyType_Modified(&Span_Type);
    return 0;
}

/* The one span handed out while recording is off. Its type's __enter__/__exit__ are plain
 * builtin functions bound to it (not descriptors), so `with` neither binds nor allocates,
 * and CPython's specialised call path for builtins applies. They take any arguments, so
 * that both `cm.__enter__()` and `type(cm).__enter__(cm)` (contextlib.ExitStack) work. */
static PyObject *g_nospan;

static PyObject *nospan_enter(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args, (void)nargs;
    return Py_NewRef(self);
}

static PyObject *nospan_exit(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self, (void)args, (void)nargs;
    Py_RETURN_FALSE;
}

static PyObject *nospan_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self, (void)args, (void)nargs, (void)kwnames;
    Py_RETURN_NONE;
}

static PyObject *nospan_id(PyObject *self, void *closure)
{
    (void)self, (void)closure;
    return PyLong_FromLong(0);
}

static PyObject *nospan_step(PyObject *self, void *closure)
{
    (void)self, (void)closure;
    return PyLong_FromLong(-1);
}

static PyMethodDef nospan_enter_def = {"__enter__", (PyCFunction)(void (*)(void))nospan_enter, METH_FASTCALL, NULL};
static PyMethodDef nospan_exit_def = {"__exit__", (PyCFunction)(void (*)(void))nospan_exit, METH_FASTCALL, NULL};
static PyObject *nospan_follow(PyObject *self, PyObject *carrier)
{
    (void)self, (void)carrier;
    Py_RETURN_NONE;
}

static PyMethodDef nospan_methods[] = {
    {"set", (PyCFunction)(void (*)(void))nospan_set, METH_FASTCALL | METH_KEYWORDS, "Does nothing: recording is off."},
    {"follow", nospan_follow, METH_O, "Does nothing: recording is off."},
    {NULL},
};
static PyGetSetDef nospan_getset[] = {
    {"span_id", nospan_id, NULL, "always 0", NULL},
    {"start_ns", nospan_id, NULL, "always 0", NULL},
    {"step", nospan_step, NULL, "always -1", NULL},
    {NULL},
};

static PyTypeObject NoSpan_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmtrace._fastspan.NoSpan",
    .tp_doc = "What span() returns while recording is off.",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = nospan_methods,
    .tp_getset = nospan_getset,
};

static int nospan_ready(void)
{
    if (PyType_Ready(&NoSpan_Type) < 0 || (g_nospan = PyObject_New(PyObject, &NoSpan_Type)) == NULL)
        return -1;
    PyMethodDef *defs[] = {&nospan_enter_def, &nospan_exit_def};
    for (int i = 0; i < 2; i++) {
        PyObject *fn = PyCFunction_New(defs[i], g_nospan);
        int rc = fn ? PyDict_SetItemString(NoSpan_Type.tp_dict, defs[i]->ml_name, fn) : -1;
        Py_XDECREF(fn);
        if (rc < 0)
            return -1;
    }
    PyType_Modified(&NoSpan_Type);
    return 0;
}

/* ---------------------------------------------------------------- argument parsing */

static PyObject *s_stage, *s_step, *s_follows, *s_device, *s_value, *s_start_ns;

static int kw_is(PyObject *key, PyObject *name)
{
    return key == name || (!PyUnicode_CHECK_INTERNED(key) && PyUnicode_Compare(key, name) == 0);
}

static int as_i64(PyObject *o, int64_t *out)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static int as_u64(PyObject *o, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* follows: a (trace_id, span_id, step) carrier; sets the link and, when the span has no
 * step (none given, none inherited yet or none to inherit), takes the carrier's. */
static int apply_follows(SpanObject *s, PyObject *follows)
{
    if (follows == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(follows, "follows must be a (trace_id, span_id, step) carrier");
    if (seq == NULL)
        return -1;
    int rc = -1;
    if (PySequence_Fast_GET_SIZE(seq) != 3)
        PyErr_SetString(PyExc_ValueError, "follows must be a (trace_id, span_id, step) carrier");
    else if (as_u64(PySequence_Fast_GET_ITEM(seq, 1), &s->link) == 0)
        rc = s->step != -1 ? 0 : as_i64(PySequence_Fast_GET_ITEM(seq, 2), &s->step);
    Py_DECREF(seq);
    return rc;
}

/* span(name, *, stage=None, step=-1, follows=None, device=False, start_ns=None, **attrs) */
static PyObject *fs_span(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (!g_enabled)
        return Py_NewRef(g_nospan);
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "span() takes 1 positional argument (the name), %zd given", nargs);
        return NULL;
    }
    SpanObject *s = span_new();
    if (s == NULL)
        return NULL;
    if (name_ids(args[0], &s->name_id, &s->stage_id) < 0)
        goto fail;
    if (kwnames != NULL) {
        PyObject *follows = Py_None;
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i), *v = args[1 + i];
            if (kw_is(k, s_stage)) {
                if (v != Py_None && (s->stage_id = intern_id(v)) == 0)
                    goto fail;
            } else if (kw_is(k, s_step)) {
                if (as_i64(v, &s->step) < 0)
                    goto fail;
            } else if (kw_is(k, s_start_ns)) {
                if (v != Py_None && as_i64(v, &s->t0) < 0)
                    goto fail;
                s->has_t0 = v != Py_None;
            } else if (kw_is(k, s_follows)) {
                follows = v;
            } else if (kw_is(k, s_device)) {
                if ((s->device = PyObject_IsTrue(v)) < 0)
                    goto fail;
            } else if (attrs_put(&s->attrs, k, v) < 0) {
                goto fail;
            }
        }
        if (apply_follows(s, follows) < 0)
            goto fail;
    }
    return (PyObject *)s;
fail:
    Py_DECREF(s);
    return NULL;
}

/* Record a point event; used by instant() and counter(). */
static int emit_point(int kind, PyObject *name, int64_t step, uint64_t parent, const attrs_t *a)
{
    uint32_t name_id, stage_id;
    if (name_ids(name, &name_id, &stage_id) < 0)
        return -1;
    int64_t t = now_ns();
    record_t *r = rec_slot();
    if (r == NULL)
        return PyErr_Occurred() ? -1 : 0;
    r->start = r->end = t;
    r->span_id = r->link_id = 0;
    r->parent_id = parent;
    r->step = step;
    attrs_to_record(a, r);
    r->name_id = name_id;
    r->stage_id = stage_id;
    r->kind = (uint8_t)kind;
    r->flags = a->flags;
    return 0;
}

/* instant(name, *, step=-1, **attrs) */
static PyObject *fs_instant(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (!g_enabled)
        Py_RETURN_NONE;
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "instant() takes 1 positional argument (the name), %zd given", nargs);
        return NULL;
    }
    attrs_t a = {0};
    int64_t step = -1;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i), *v = args[1 + i];
        if (kw_is(k, s_step) ? as_i64(v, &step) < 0 : attrs_put(&a, k, v) < 0)
            return NULL;
    }
    CurObject *c;
    if (cur_peek(&c) < 0)
        return NULL;
    if (step == -1)
        step = c ? c->step : -1;
    if (emit_point(KIND_INSTANT, args[0], step, c ? c->id : 0, &a) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* counter(name, value, **attrs): the value goes in attribute slot 0 as "value" (float). */
static PyObject *fs_counter(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (!g_enabled)
        Py_RETURN_NONE;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "counter() takes 2 positional arguments (name, value), %zd given", nargs);
        return NULL;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++)
        if (kw_is(PyTuple_GET_ITEM(kwnames, i), s_value)) {
            PyErr_SetString(PyExc_TypeError, "counter() got multiple values for argument 'value'");
            return NULL;
        }
    attrs_t a = {0};
    PyObject *value = PyNumber_Float(args[1]);
    if (value == NULL)
        return NULL;
    int rc = attrs_put(&a, s_value, value);
    Py_DECREF(value);
    if (rc < 0 || (nkw && attrs_from_kwargs(&a, args + 2, kwnames, 0, nkw) < 0))
        return NULL;
    if (emit_point(KIND_COUNTER, args[0], -1, 0, &a) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Fill out[] from positional-or-keyword arguments named names[] (n of them, the first
 * n_required required); missing optional ones are left as they are. */
static int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      const char *const *names, int n, int n_required, PyObject **out)
{
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments, %zd given", fname, n, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        const char *k = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, i));
        if (k == NULL)
            return -1;
        int j = 0;
        while (j < n && strcmp(names[j], k) != 0)
            j++;
        if (j == n || j < nargs) {
            PyErr_Format(PyExc_TypeError, "%s() got %s argument '%s'", fname, j == n ? "an unexpected" : "multiple values for",
                         k);
            return -1;
        }
        out[j] = args[nargs + i];
    }
    for (int i = 0; i < n_required; i++)
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    return 0;
}

/* emit(kind, name_id, stage_id, start, end, span_id=0, parent_id=0, link_id=0, step=-1, attrs=None, flags=0, tid=0)
 * tid=0 means the calling thread; the stack sampler passes the sampled thread's id. */
static PyObject *fs_emit(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"kind", "name_id", "stage_id", "start", "end", "span_id",
                                        "parent_id", "link_id", "step", "attrs", "flags", "tid"};
    PyObject *a[12] = {NULL};
    if (parse_args("emit", args, nargs, kwnames, names, 12, 5, a) < 0)
        return NULL;
    int64_t kind, name_id, stage_id, start, end, step = -1, flags = 0, tid = 0;
    uint64_t span_id = 0, parent_id = 0, link_id = 0;
    if (as_i64(a[0], &kind) < 0 || as_i64(a[1], &name_id) < 0 || as_i64(a[2], &stage_id) < 0 ||
        as_i64(a[3], &start) < 0 || as_i64(a[4], &end) < 0 || (a[5] && as_u64(a[5], &span_id) < 0) ||
        (a[6] && as_u64(a[6], &parent_id) < 0) || (a[7] && as_u64(a[7], &link_id) < 0) ||
        (a[8] && as_i64(a[8], &step) < 0) || (a[10] && as_i64(a[10], &flags) < 0) ||
        (a[11] && as_i64(a[11], &tid) < 0))
        return NULL;
    attrs_t at = {0};
    if (attrs_from_dict(&at, a[9]) < 0)
        return NULL;
    record_t *r = rec_slot();
    if (r == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    r->start = start;
    r->end = end;
    r->span_id = span_id;
    r->parent_id = parent_id;
    r->link_id = link_id;
    r->step = step;
    attrs_to_record(&at, r);
    r->name_id = (uint32_t)name_id;
    r->stage_id = (uint32_t)stage_id;
    r->kind = (uint8_t)kind;
    r->flags = (uint8_t)(flags | at.flags);
    if (tid)
        r->tid = (uint32_t)tid;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- traced */

typedef struct {
    PyObject *type, *value, *tb;
} saved_exc_t;

static void exc_save(saved_exc_t *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    e->type = e->tb = NULL;
    e->value = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&e->type, &e->value, &e->tb);
#endif
}

static void exc_restore(saved_exc_t *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(e->value);
#else
    PyErr_Restore(e->type, e->value, e->tb);
#endif
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;
    PyObject *dict; /* __wrapped__, __name__, __qualname__, __doc__ ... from functools.update_wrapper */
    uint32_t name_id, stage_id;
} TracedObject;

static PyObject *traced_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TracedObject *t = (TracedObject *)self;
    if (!g_enabled)
        return PyObject_Vectorcall(t->fn, args, nargsf, kwnames);
    CurObject *c = cur_own();
    if (c == NULL)
        return NULL;
    uint64_t span_id = next_span_id(), parent = c->id;
    int64_t step = c->step;
    c->id = span_id;
    int64_t t0 = now_ns();
    PyObject *res = PyObject_Vectorcall(t->fn, args, nargsf, kwnames);
    int64_t t1 = now_ns();
    saved_exc_t exc;
    if (res == NULL)
        exc_save(&exc); /* the bookkeeping below needs a clear error indicator */
    if ((c = cur_own()) != NULL) { /* looked up again: the call may have copied the context */
        c->id = parent;
        c->step = step;
    }
    record_t *r = rec_slot();
    if (r != NULL) {
        r->start = t0;
        r->end = t1;
        r->span_id = span_id;
        r->parent_id = parent;
        r->link_id = 0;
        r->step = step;
        memset(r->attr_val, 0, sizeof r->attr_val + sizeof r->attr_key);
        r->name_id = t->name_id;
        r->stage_id = t->stage_id;
        r->kind = KIND_SPAN;
        r->flags = res == NULL ? FLAG_EXCEPTION : 0;
    }
    if (res == NULL) {
        exc_restore(&exc); /* the function's exception wins over any of ours */
        return NULL;
    }
    if (PyErr_Occurred())
        Py_CLEAR(res);
    return res;
}

static PyObject *traced_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static int traced_traverse(TracedObject *t, visitproc visit, void *arg)
{
    Py_VISIT(t->fn);
    Py_VISIT(t->dict);
    return 0;
}

static int traced_clear(TracedObject *t)
{
    Py_CLEAR(t->fn);
    Py_CLEAR(t->dict);
    return 0;
}

static void traced_dealloc(TracedObject *t)
{
    PyObject_GC_UnTrack(t);
    traced_clear(t);
    PyObject_GC_Del(t);
}

static PyObject *traced_repr(TracedObject *t) { return PyUnicode_FromFormat("<llmtrace traced %R>", t->fn); }

static PyGetSetDef traced_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject Traced_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmtrace._fastspan.Traced",
    .tp_doc = "A function wrapped in a span by @llmtrace.trace.",
    .tp_basicsize = sizeof(TracedObject),
    .tp_dealloc = (destructor)traced_dealloc,
    .tp_vectorcall_offset = offsetof(TracedObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_repr = (reprfunc)traced_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_traverse = (traverseproc)traced_traverse,
    .tp_clear = (inquiry)traced_clear,
    .tp_descr_get = traced_get,
    .tp_dictoffset = offsetof(TracedObject, dict),
    .tp_getset = traced_getset,
};

/* traced(fn, name, stage) */
static PyObject *fs_traced(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "traced() takes 3 arguments (fn, name, stage)");
        return NULL;
    }
    if (!PyCallable_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "traced() needs a callable");
        return NULL;
    }
    uint32_t name_id = intern_id(args[1]), stage_id = name_id ? intern_id(args[2]) : 0;
    if (stage_id == 0)
        return NULL;
    TracedObject *t = PyObject_GC_New(TracedObject, &Traced_Type);
    if (t == NULL)
        return NULL;
    t->vectorcall = traced_call;
    t->fn = Py_NewRef(args[0]);
    t->dict = NULL;
    t->name_id = name_id;
    t->stage_id = stage_id;
    PyObject_GC_Track(t);
    return (PyObject *)t;
}

/* ---------------------------------------------------------------- module functions */

static PyObject *fs_intern(PyObject *Py_UNUSED(mod), PyObject *s)
{
    uint32_t id = intern_id(s);
    return id ? PyLong_FromUnsignedLong(id) : NULL;
}

static PyObject *fs_current(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    CurObject *c;
    if (cur_peek(&c) < 0)
        return NULL;
    return c ? Py_BuildValue("(KL)", (unsigned long long)c->id, (long long)c->step) : Py_BuildValue("(ii)", 0, -1);
}

/* set_current(span_id, step) -> token: the (span_id, step) it replaced. */
static PyObject *fs_set_current(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t id;
    int64_t step;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_current() takes 2 arguments (span_id, step)");
        return NULL;
    }
    if (as_u64(args[0], &id) < 0 || as_i64(args[1], &step) < 0)
        return NULL;
    CurObject *c = cur_own();
    if (c == NULL)
        return NULL;
    PyObject *token = Py_BuildValue("(KL)", (unsigned long long)c->id, (long long)c->step);
    if (token != NULL) {
        c->id = id;
        c->step = step;
    }
    return token;
}

static PyObject *fs_reset_current(PyObject *Py_UNUSED(mod), PyObject *token)
{
    uint64_t id;
    int64_t step;
    if (!PyTuple_Check(token) || PyTuple_GET_SIZE(token) != 2) {
        PyErr_SetString(PyExc_TypeError, "reset_current() needs a token from set_current()");
        return NULL;
    }
    if (as_u64(PyTuple_GET_ITEM(token, 0), &id) < 0 || as_i64(PyTuple_GET_ITEM(token, 1), &step) < 0)
        return NULL;
    CurObject *c = cur_own();
    if (c == NULL)
        return NULL;
    c->id = id;
    c->step = step;
    Py_RETURN_NONE;
}

static PyObject *fs_new_span_id(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(next_span_id());
}

static PyObject *fs_set_enabled(PyObject *Py_UNUSED(mod), PyObject *on)
{
    int v = PyObject_IsTrue(on);
    if (v < 0)
        return NULL;
    g_enabled = v;
    Py_RETURN_NONE;
}

static PyObject *fs_is_enabled(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(g_enabled);
}

static PyObject *fs_set_device_hook(PyObject *Py_UNUSED(mod), PyObject *hook)
{
    Py_SETREF(g_device_hook, Py_NewRef(hook));
    Py_RETURN_NONE;
}

/* drain() -> (records bytes, n, new strings, {tid: dropped since last drain}) */
static PyObject *fs_drain(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    /* GC-tracked objects first: their allocation may run GC callbacks that record, which
     * must happen before the records are counted. */
    PyObject *fresh = PyList_New(0), *dropped = PyDict_New(), *records = NULL;
    if (fresh == NULL || dropped == NULL) {
        Py_XDECREF(fresh);
        Py_XDECREF(dropped);
        return NULL;
    }
    PyObject *strings = g_new_strings;
    g_new_strings = fresh;
    Py_ssize_t total = 0;
    for (tbuf_t *b = g_bufs; b; b = b->next)
        total += b->n;
    if ((records = PyBytes_FromStringAndSize(NULL, total * (Py_ssize_t)sizeof(record_t))) == NULL)
        goto fail;
    char *out = PyBytes_AS_STRING(records);
    for (tbuf_t **link = &g_bufs, *b; (b = *link) != NULL;) {
        int dead = __atomic_load_n(&b->dead, __ATOMIC_ACQUIRE); /* before the copy: no record after it */
        memcpy(out, b->recs, b->n * sizeof(record_t));
        out += b->n * sizeof(record_t);
        b->n = 0;
        if (b->dropped != b->reported) {
            PyObject *tid = PyLong_FromUnsignedLong(b->tid), *d = PyLong_FromUnsignedLongLong(b->dropped - b->reported);
            int rc = (tid && d) ? PyDict_SetItem(dropped, tid, d) : -1;
            Py_XDECREF(tid);
            Py_XDECREF(d);
            if (rc < 0)
                goto fail;
            b->reported = b->dropped;
        }
        if (dead) {
            *link = b->next;
            free(b->recs);
            free(b);
        } else {
            link = &b->next;
        }
    }
    return Py_BuildValue("(NnNN)", records, total, strings, dropped);
fail:
    Py_XDECREF(records);
    Py_XDECREF(dropped);
    Py_DECREF(strings);
    return NULL;
}

/* requeue_strings(): queue every interned string again, so that the next drain starts a
 * self-contained spool file (a new sink, a forked child). */
static PyObject *fs_requeue_strings(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    PyObject *all = PyList_New(0);
    if (all == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *s, *id;
    while (PyDict_Next(g_strings, &pos, &s, &id)) { /* insertion order is id order */
        PyObject *entry = PyTuple_Pack(2, id, s);
        if (entry == NULL || PyList_Append(all, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(all);
            return NULL;
        }
        Py_DECREF(entry);
    }
    Py_SETREF(g_new_strings, all);
    Py_RETURN_NONE;
}

/* In a forked child (only this thread exists): new id base, drop the parent's records,
 * and queue every interned string again for the child's own spool file. */
static PyObject *fs_reset_after_fork(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    uint32_t old_tid = t_buf != NULL ? t_buf->tid : 0, new_tid = (uint32_t)syscall(SYS_gettid);
    for (SpanObject *s = g_open, *next; s; s = next) { /* only the forking thread goes on */
        next = s->open_next;
        if (s->tid == old_tid)
            s->tid = new_tid;
        else
            open_unlink(s);
    }
    g_id_base = (uint64_t)getpid() << 40;
    g_seq = 0;
    for (tbuf_t *b = g_bufs, *next; b; b = next) {
        next = b->next;
        if (b != t_buf) {
            free(b->recs);
            free(b);
        }
    }
    g_bufs = t_buf;
    if (t_buf != NULL) {
        t_buf->next = NULL;
        t_buf->n = 0;
        t_buf->dropped = t_buf->reported = 0;
        t_buf->tid = new_tid;
    }
    return fs_requeue_strings(NULL, NULL);
}

/* Record every open span as ending now, flagged FLAG_OPEN_AT_STOP: the last flush of a
 * process that is going away (SIGTERM, exit with daemon threads mid-span). The spans go
 * on; their own exit then records nothing. Returns how many were recorded. */
static PyObject *fs_close_open(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    int64_t t1 = now_ns();
    long n = 0;
    for (SpanObject *s = g_open; s != NULL; s = s->open_next) {
        if (s->reported)
            continue;
        record_t *r = rec_slot();
        if (r == NULL) {
            if (PyErr_Occurred())
                return NULL;
            break; /* buffer full: counted as dropped */
        }
        r->tid = s->tid;
        span_record(s, r, t1, FLAG_OPEN_AT_STOP);
        s->reported = 1;
        n++;
    }
    return PyLong_FromLong(n);
}

static PyMethodDef fs_methods[] = {
    {"span", (PyCFunction)(void (*)(void))fs_span, METH_FASTCALL | METH_KEYWORDS,
     "span(name, *, stage=None, step=-1, follows=None, device=False, start_ns=None, **attrs)"},
    {"instant", (PyCFunction)(void (*)(void))fs_instant, METH_FASTCALL | METH_KEYWORDS,
     "instant(name, *, step=-1, **attrs)"},
    {"counter", (PyCFunction)(void (*)(void))fs_counter, METH_FASTCALL | METH_KEYWORDS, "counter(name, value, **attrs)"},
    {"emit", (PyCFunction)(void (*)(void))fs_emit, METH_FASTCALL | METH_KEYWORDS,
     "Append one raw record (used by device timing and generator wrappers)."},
    {"traced", (PyCFunction)(void (*)(void))fs_traced, METH_FASTCALL, "traced(fn, name, stage): fn wrapped in a span"},
    {"intern", fs_intern, METH_O, "Id of a string in the records."},
    {"drain", fs_drain, METH_NOARGS,
     "Take everything recorded so far: (records bytes, n, new strings, {tid: dropped since last drain})."},
    {"current", fs_current, METH_NOARGS, "(span_id, step) of the innermost open span in this thread / task."},
    {"set_current", (PyCFunction)(void (*)(void))fs_set_current, METH_FASTCALL,
     "Make span_id the current span; returns a token for reset_current."},
    {"reset_current", fs_reset_current, METH_O, NULL},
    {"new_span_id", fs_new_span_id, METH_NOARGS, NULL},
    {"set_enabled", fs_set_enabled, METH_O, NULL},
    {"is_enabled", fs_is_enabled, METH_NOARGS, NULL},
    {"set_device_hook", fs_set_device_hook, METH_O, NULL},
    {"requeue_strings", fs_requeue_strings, METH_NOARGS,
     "Queue every interned string again, so that the next drain starts a self-contained spool file."},
    {"reset_after_fork", fs_reset_after_fork, METH_NOARGS,
     "In a forked child: forget the parent's records and strings, take a new id base."},
    {"close_open", fs_close_open, METH_NOARGS,
     "Record every open span as ending now, flagged FLAG_OPEN_AT_STOP; returns how many."},
    {NULL},
};

static struct PyModuleDef fs_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "llmtrace._fastspan",
    .m_doc = "C recorder backend; same functions and records as llmtrace._pyrecorder.",
    .m_size = -1,
    .m_methods = fs_methods,
};

static int intern_names(void)
{
    struct {
        PyObject **slot;
        const char *s;
    } names[] = {{&s_stage, "stage"}, {&s_step, "step"},   {&s_follows, "follows"}, {&s_device, "device"},
                 {&s_value, "value"}, {&s_begin, "begin"}, {&s_start_ns, "start_ns"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].s)) == NULL)
            return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__fastspan(void)
{
    if (PyType_Ready(&Cur_Type) < 0 || PyType_Ready(&NameIds_Type) < 0 || span_type_ready() < 0 || nospan_ready() < 0 ||
        PyType_Ready(&Traced_Type) < 0 || intern_names() < 0)
        return NULL;
    if (PyContext_Type.tp_basicsize != sizeof(ContextLayout)) { /* a CPython whose Context we do not know */
        PyErr_SetString(PyExc_ImportError, "_fastspan: unknown contextvars.Context layout");
        return NULL;
    }
    if (pthread_key_create(&g_buf_key, buf_thread_exit) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_key_create failed");
        return NULL;
    }
    g_id_base = (uint64_t)getpid() << 40;
    g_device_hook = Py_NewRef(Py_None);
    g_strings = PyDict_New();
    g_new_strings = PyList_New(0);
    g_names = PyDict_New();
    g_cur_var = PyContextVar_New("llmtrace_current", NULL);
    PyObject *m = PyModule_Create(&fs_module);
    if (!g_strings || !g_new_strings || !g_names || !g_cur_var || !m ||
        PyModule_AddIntConstant(m, "BUFFER_CAP", BUFFER_CAP) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_EXCEPTION", FLAG_EXCEPTION) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_ATTRS_CUT", FLAG_ATTRS_CUT) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_OPEN_AT_STOP", FLAG_OPEN_AT_STOP) < 0 ||
        PyModule_AddObjectRef(m, "Span", (PyObject *)&Span_Type) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
