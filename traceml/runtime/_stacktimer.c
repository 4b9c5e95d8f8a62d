/* The stack sampler's native timer (traceml/runtime/stacks.py is the reference and the fallback).
 *
 * A native thread that never takes the GIL wakes `hz` times a second.  While a step is open it notes
 * the clock's phase and schedules one pending call (Py_AddPendingCall); the main thread runs it at its
 * next safe point, walks its own frames and counts (phase, function, site, reads data) in a dict.  So
 * a sample costs the training thread a few µs and no GIL hand-off between threads, where a Python
 * sampler thread costs a hand-off each time.  Pending calls run only in the main thread: a sample
 * that finds another thread training is counted in `foreign` and stacks.py samples from its thread.
 * Up to Python 3.12 a pending call added from a thread that is not the main thread does not set the
 * eval breaker (the call would wait for the main thread's next GIL take, after a torch op or a sleep,
 * but never come in a pure-Python loop): the timer then sets it itself, as CPython's own signal code
 * does on Windows (its offset from _stacktimer_core.c; the main thread recomputes it when it runs the
 * call).  No signal is raised and no handler installed.  Fail-open: the callback never raises; after MAX_ERRORS failed samples the timer stops sampling.
 *
 * The clock and the step tracker are read through their native integer members (`_phase`, `base`,
 * `owner`; `depth`, `step`): the timer thread reads two of them without the GIL (a torn read is
 * impossible for an aligned 64-bit integer, and a stale one only misplaces one sample).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h> /* PyFrame_GetBack on Python 3.10 */
#include <structmember.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define MAX_ERRORS 16
/* the code objects whose attribution is cached, by address: a dict would hash each code object on
 * every lookup (its consts, names and bytecode: tens of µs on a large module), an address costs nothing.
 * The table holds a reference to each code object, so an address is never reused while cached. */
#define CACHE_BITS 13
#define CACHE_SLOTS (1 << CACHE_BITS)
#define MAX_CACHE (CACHE_SLOTS / 2)

typedef struct {
    PyObject_HEAD
    PyObject *clock, *tracker;
    PyObject *resolve; /* code -> (name, site, user, reads data) */
    PyObject **codes;  /* CACHE_SLOTS code objects (NULL: free) ... */
    PyObject **infos;  /* ... and their resolve() results */
    int cached;
    PyObject *counts; /* (phase, name, site, reads data) -> samples */
    Py_ssize_t off_phase, off_base, off_owner, off_depth, off_step;
    long long period_ns;
    int max_depth;
    long long first_step, total, samples, cost_ns, foreign, errors, triggers, misses, frames;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pid_t pid;
    int started;          /* a thread was started (and not yet joined) by this process */
    int release_in_cb;    /* stop() left the thread's reference to the queued callback */
    atomic_int running;   /* the thread schedules samples while 1 */
    atomic_int pending;   /* a callback is queued */
    atomic_llong trig_phase;
} StackTimerObject;

static PyTypeObject StackTimerType;

/* _stacktimer_core.c: the main interpreter's eval breaker (Python 3.10-3.12), a thread's frames' code */
long traceml_eval_breaker_offset(void);
int traceml_frame_codes(PyThreadState *tstate, PyObject **out, int max);
#define MAX_WALK 256
static atomic_int *eval_breaker;

static inline long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
}

static inline long long read_ll(PyObject *o, Py_ssize_t off) { return *(volatile long long *)((char *)o + off); }

/* the offset of `name`, a native 64-bit integer member of type(o); -1 with an error set otherwise */
static Py_ssize_t member_offset(PyObject *o, const char *name) {
    PyObject *d = PyObject_GetAttrString((PyObject *)Py_TYPE(o), name);
    if (d == NULL) PyErr_Clear();
    Py_ssize_t off = -1;
    if (d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_LONGLONG || m->type == T_ULONGLONG) off = m->offset;
    }
    Py_XDECREF(d);
    if (off < 0)
        PyErr_Format(PyExc_TypeError, "expected %s.%s to be a native 64-bit integer member (the C phase clock)",
                     Py_TYPE(o)->tp_name, name);
    return off;
}

/* -- the sample: runs in the main thread, holding the GIL ----------------------------------- */

static inline size_t slot_of(PyObject *code) {
    return (size_t)(((uintptr_t)code >> 4) * 0x9E3779B97F4A7C15ULL >> (64 - CACHE_BITS));
}

/* the info of one code object, a new reference: (name, site, user code, reads data) */
static PyObject *code_info(StackTimerObject *t, PyObject *code) {
    size_t i = slot_of(code);
    while (t->codes[i] != NULL) {
        if (t->codes[i] == code) {
            Py_INCREF(t->infos[i]);
            return t->infos[i];
        }
        i = (i + 1) & (CACHE_SLOTS - 1);
    }
    t->misses++;
    PyObject *info = PyObject_CallOneArg(t->resolve, code);
    if (info == NULL) return NULL;
    if (!(PyTuple_Check(info) && PyTuple_GET_SIZE(info) == 4)) {
        Py_DECREF(info);
        PyErr_SetString(PyExc_TypeError, "expected resolve(code) to return (name, site, user, reads data)");
        return NULL;
    }
    if (t->cached < MAX_CACHE && t->codes[i] == NULL) { /* resolve() ran Python: the slot may be taken */
        Py_INCREF(code);
        Py_INCREF(info);
        t->codes[i] = code;
        t->infos[i] = info;
        t->cached++;
    }
    return info;
}

/* the code objects of the calling thread's frames, innermost first, as new references */
static int frame_codes(PyObject **codes, int max) {
    PyThreadState *ts = PyThreadState_Get();
    int n = traceml_frame_codes(ts, codes, max);
    if (n >= 0) {
        for (int i = 0; i < n; i++) Py_INCREF(codes[i]);
        return n;
    }
    n = 0; /* the public way: a frame object for each frame */
    PyFrameObject *frame = PyThreadState_GetFrame(ts);
    while (frame != NULL && n < max) {
        codes[n++] = (PyObject *)PyFrame_GetCode(frame);
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
    Py_XDECREF(frame);
    return n;
}

/* one sample of the calling thread's stack, counted under `phase` (stacks.py's _attribute) */
static int sample_here(StackTimerObject *t, long long phase) {
    PyObject *codes[MAX_WALK];
    int n = frame_codes(codes, t->max_depth);
    PyObject *leaf = NULL, *user = NULL;
    int is_input = 0, rc = 0;
    t->frames += n;
    for (int i = 0; i < n; i++) {
        PyObject *info = code_info(t, codes[i]);
        if (info == NULL) {
            rc = -1;
            break;
        }
        int done = 0;
        if (leaf == NULL) {
            Py_INCREF(info);
            leaf = info;
        }
        if (PyTuple_GET_ITEM(info, 3) == Py_True) is_input = 1;
        if (user == NULL && PyTuple_GET_ITEM(info, 2) == Py_True) {
            Py_INCREF(info);
            user = info;
            done = is_input;
        } else if (user != NULL && is_input) {
            done = 1;
        }
        Py_DECREF(info);
        if (done) break;
    }
    for (int i = 0; i < n; i++) Py_DECREF(codes[i]);
    PyObject *chosen = user != NULL ? user : leaf;
    if (rc == 0 && chosen != NULL) {
        rc = -1;
        PyObject *key = Py_BuildValue("(LOOO)", phase, PyTuple_GET_ITEM(chosen, 0), PyTuple_GET_ITEM(chosen, 1),
                                      is_input ? Py_True : Py_False);
        if (key != NULL) {
            PyObject *old = PyDict_GetItemWithError(t->counts, key);
            long long seen = old != NULL ? PyLong_AsLongLong(old) : 0;
            if (!PyErr_Occurred()) {
                PyObject *v = PyLong_FromLongLong(seen + 1);
                if (v != NULL) {
                    rc = PyDict_SetItem(t->counts, key, v);
                    Py_DECREF(v);
                }
            }
            Py_DECREF(key);
        }
        if (rc == 0) {
            if (t->first_step < 0) t->first_step = read_ll(t->tracker, t->off_step);
            t->total++;
            t->samples++;
        }
    }
    Py_XDECREF(leaf);
    Py_XDECREF(user);
    return rc;
}

static int timer_cb(void *arg) {
    StackTimerObject *t = (StackTimerObject *)arg;
    atomic_store(&t->pending, 0);
    if (!atomic_load(&t->running)) {
        if (t->release_in_cb) {
            t->release_in_cb = 0;
            Py_DECREF(t);
        }
        return 0;
    }
    long long t0 = now_ns();
    if ((unsigned long long)read_ll(t->clock, t->off_owner) != (unsigned long long)PyThread_get_thread_ident()) {
        t->foreign++;
        return 0;
    }
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (sample_here(t, atomic_load(&t->trig_phase)) < 0) {
        PyErr_Clear();
        if (++t->errors >= MAX_ERRORS) atomic_store(&t->running, 0); /* the thread stops scheduling */
    }
    PyErr_Restore(et, ev, tb);
    t->cost_ns += now_ns() - t0;
    return 0;
}

/* -- the timer thread: no GIL, no Python object touched but two integer reads ---------------- */
static void *timer_main(void *arg) {
    StackTimerObject *t = (StackTimerObject *)arg;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (atomic_load(&t->running)) {
        long long ns = (long long)next.tv_nsec + t->period_ns;
        next.tv_sec += ns / 1000000000LL;
        next.tv_nsec = ns % 1000000000LL;
        pthread_mutex_lock(&t->mu); /* the condition waits on CLOCK_MONOTONIC (set in start) */
        while (atomic_load(&t->running) && pthread_cond_timedwait(&t->cv, &t->mu, &next) == 0) {
        }
        pthread_mutex_unlock(&t->mu);
        if (!atomic_load(&t->running)) break;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec + 1) next = now; /* suspended or starved: do not catch up */
        if (atomic_load(&t->pending)) continue;
        if (read_ll(t->tracker, t->off_depth) <= 0 || read_ll(t->clock, t->off_base) == 0) continue;
        long long phase = read_ll(t->clock, t->off_phase);
        if (phase != -1) continue; /* a timed phase: its time is measured already, only the residual is sampled */
        atomic_store(&t->trig_phase, phase);
        atomic_store(&t->pending, 1);
        t->triggers++;
        if (Py_AddPendingCall(timer_cb, t) != 0)
            atomic_store(&t->pending, 0);
        else if (eval_breaker != NULL)
            atomic_store_explicit(eval_breaker, 1, memory_order_relaxed); /* run at the next check */
    }
    return NULL;
}

/* -- the Python face ------------------------------------------------------------------------ */
static PyObject *StackTimer_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"clock", "tracker", "resolve", "hz", "max_depth", NULL};
    PyObject *clock, *tracker, *resolve;
    double hz;
    int max_depth = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOd|i", kwlist, &clock, &tracker, &resolve, &hz, &max_depth))
        return NULL;
    if (!(hz > 0.0)) {
        PyErr_Format(PyExc_ValueError, "expected hz > 0, found %g", hz);
        return NULL;
    }
    StackTimerObject *t = (StackTimerObject *)type->tp_alloc(type, 0);
    if (t == NULL) return NULL;
    t->off_phase = member_offset(clock, "_phase");
    t->off_base = t->off_phase < 0 ? -1 : member_offset(clock, "base");
    t->off_owner = t->off_base < 0 ? -1 : member_offset(clock, "owner");
    t->off_depth = t->off_owner < 0 ? -1 : member_offset(tracker, "depth");
    t->off_step = t->off_depth < 0 ? -1 : member_offset(tracker, "step");
    t->codes = PyMem_Calloc(CACHE_SLOTS, sizeof(PyObject *));
    t->infos = PyMem_Calloc(CACHE_SLOTS, sizeof(PyObject *));
    if (t->codes == NULL || t->infos == NULL) PyErr_NoMemory();
    if (t->codes == NULL || t->infos == NULL || (t->counts = PyDict_New()) == NULL || t->off_step < 0) {
        Py_DECREF(t);
        return NULL;
    }
    Py_INCREF(clock);
    t->clock = clock;
    Py_INCREF(tracker);
    t->tracker = tracker;
    Py_INCREF(resolve);
    t->resolve = resolve;
    t->period_ns = (long long)(1e9 / hz);
    if (t->period_ns < 1000000) t->period_ns = 1000000; /* at most 1 kHz */
    t->max_depth = max_depth < 1 ? 1 : max_depth > MAX_WALK ? MAX_WALK : max_depth;
    t->first_step = -1;
    return (PyObject *)t;
}

static PyObject *StackTimer_start(StackTimerObject *t, PyObject *unused) {
    if (t->started && t->pid == getpid()) Py_RETURN_FALSE;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_store(&t->running, 1);
    Py_INCREF(t); /* the thread's and the queued callbacks' reference, dropped by stop() */
    if (pthread_create(&t->thread, NULL, timer_main, t) != 0) {
        atomic_store(&t->running, 0);
        Py_DECREF(t);
        PyErr_SetString(PyExc_OSError, "the stack sampler's timer thread could not be started");
        return NULL;
    }
    t->started = 1;
    t->pid = getpid();
    Py_RETURN_TRUE;
}

static PyObject *StackTimer_stop(StackTimerObject *t, PyObject *unused) {
    if (!t->started) Py_RETURN_NONE;
    t->started = 0;
    if (t->pid != getpid()) Py_RETURN_NONE; /* a forked child: the thread is not ours */
    pthread_mutex_lock(&t->mu);
    atomic_store(&t->running, 0);
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(t->thread, NULL);
    Py_END_ALLOW_THREADS
    if (atomic_load(&t->pending))
        t->release_in_cb = 1; /* a queued callback still holds `t`: it drops the reference */
    else
        Py_DECREF(t);
    Py_RETURN_NONE;
}

/* (counts, total, first step) since the last take, and a fresh count */
static PyObject *StackTimer_take(StackTimerObject *t, PyObject *unused) {
    PyObject *fresh = PyDict_New();
    if (fresh == NULL) return NULL;
    PyObject *r = Py_BuildValue("(OLL)", t->counts, t->total, t->first_step);
    if (r == NULL) {
        Py_DECREF(fresh);
        return NULL;
    }
    Py_SETREF(t->counts, fresh);
    t->total = 0;
    t->first_step = -1;
    return r;
}

static PyObject *StackTimer_get_running(StackTimerObject *t, void *unused) {
    return PyBool_FromLong(atomic_load(&t->running));
}

static int StackTimer_traverse(StackTimerObject *t, visitproc visit, void *arg) {
    Py_VISIT(t->clock);
    Py_VISIT(t->tracker);
    Py_VISIT(t->resolve);
    Py_VISIT(t->counts);
    if (t->codes != NULL)
        for (int i = 0; i < CACHE_SLOTS; i++) {
            Py_VISIT(t->codes[i]);
            Py_VISIT(t->infos[i]);
        }
    return 0;
}

static int StackTimer_clear(StackTimerObject *t) {
    Py_CLEAR(t->clock);
    Py_CLEAR(t->tracker);
    Py_CLEAR(t->resolve);
    Py_CLEAR(t->counts);
    if (t->codes != NULL)
        for (int i = 0; i < CACHE_SLOTS; i++) {
            Py_CLEAR(t->codes[i]);
            Py_CLEAR(t->infos[i]);
        }
    t->cached = 0;
    return 0;
}

static void StackTimer_dealloc(StackTimerObject *t) {
    PyObject_GC_UnTrack(t);
    StackTimer_clear(t);
    PyMem_Free(t->codes);
    PyMem_Free(t->infos);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef StackTimer_methods[] = {
    {"start", (PyCFunction)StackTimer_start, METH_NOARGS, "Start the timer thread (False when it runs already)."},
    {"stop", (PyCFunction)StackTimer_stop, METH_NOARGS, "Stop and join the timer thread (idempotent)."},
    {"take", (PyCFunction)StackTimer_take, METH_NOARGS, "(counts, total, first step) since the last take."},
    {NULL},
};

static PyMemberDef StackTimer_members[] = {
    {"samples", T_LONGLONG, offsetof(StackTimerObject, samples), READONLY, "samples taken"},
    {"cost_ns", T_LONGLONG, offsetof(StackTimerObject, cost_ns), READONLY, "time spent sampling (main thread)"},
    {"foreign", T_LONGLONG, offsetof(StackTimerObject, foreign), READONLY, "samples skipped: another thread trains"},
    {"errors", T_LONGLONG, offsetof(StackTimerObject, errors), READONLY, "samples that failed"},
    {"triggers", T_LONGLONG, offsetof(StackTimerObject, triggers), READONLY, "callbacks scheduled"},
    {"misses", T_LONGLONG, offsetof(StackTimerObject, misses), READONLY, "code objects resolved (cache misses)"},
    {"frames", T_LONGLONG, offsetof(StackTimerObject, frames), READONLY, "frames walked"},
    {"period_ns", T_LONGLONG, offsetof(StackTimerObject, period_ns), READONLY, "the timer's period"},
    {NULL},
};

static PyGetSetDef StackTimer_getset[] = {
    {"running", (getter)StackTimer_get_running, NULL, "the timer schedules samples", NULL},
    {NULL},
};

static PyTypeObject StackTimerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._stacktimer.StackTimer",
    .tp_basicsize = sizeof(StackTimerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "StackTimer(clock, tracker, resolve, hz, max_depth=64): samples the main thread's stack.",
    .tp_new = StackTimer_new,
    .tp_dealloc = (destructor)StackTimer_dealloc,
    .tp_traverse = (traverseproc)StackTimer_traverse,
    .tp_clear = (inquiry)StackTimer_clear,
    .tp_methods = StackTimer_methods,
    .tp_members = StackTimer_members,
    .tp_getset = StackTimer_getset,
};

static struct PyModuleDef stacktimer_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "traceml.runtime._stacktimer",
    .m_doc = "The stack sampler's native timer (see traceml/runtime/stacks.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__stacktimer(void) {
    if (PyType_Ready(&StackTimerType) < 0) return NULL;
    long off = traceml_eval_breaker_offset();
    if (off >= 0) eval_breaker = (atomic_int *)((char *)PyInterpreterState_Main() + off);
    PyObject *m = PyModule_Create(&stacktimer_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "StackTimer", (PyObject *)&StackTimerType) < 0 ||
        PyModule_AddIntConstant(m, "WAKES_MAIN", eval_breaker != NULL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
