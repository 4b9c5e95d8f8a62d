/* The optional C fast path of traceml's phase clock (traceml/runtime/step.py is the reference).
 *
 * Only the common case runs here: the step context's enter/exit, the in-step timed wrapper,
 * the optimizer hooks and the training loader's carried fetch.  Every rare case (a sampled
 * step, a GPU timer, another loader, a nested or failed step, a disabled tracker) calls the
 * Python code it would have run.  Fail-open: an error in traceml's own bookkeeping is cleared
 * (the step tracker's _fail() turns step timing off); an exception of the wrapped call
 * propagates unchanged.  State lives in the Python objects (PhaseClock, StepTracker): this
 * module only reads and writes their attributes, so both implementations share it.
 *
 * The clock is CLOCK_MONOTONIC: time.perf_counter_ns() on Linux (tests check it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <errno.h>

#define CARRY 1
#define STEP 2
#define SAMPLE 4
#define DATALOADER 0
#define OPTIMIZER 4
#define NPHASES 5
/* past the step table's high-water mark, the step exit lets the sender run every this many rows */
#define YIELD_EVERY 64
#define YIELD_NS 20000
/* which steps measure traceml's own time: step.py's SAMPLE_EVERY, SAMPLE_WARM, SAMPLE_EVERY_LATER,
 * SAMPLE_OFFSET (step.py uses this module only when its SAMPLING attribute matches them) */
#define SAMPLE_EVERY 64
#define SAMPLE_WARM 4096
#define SAMPLE_EVERY_LATER 512
#define SAMPLE_OFFSET 1

static inline int sampled_step(long long step) {
    return step == 1 ||
           (step > 1 && step % (step < SAMPLE_WARM ? SAMPLE_EVERY : SAMPLE_EVERY_LATER) == SAMPLE_OFFSET);
}

enum {
    A_gate,
    A_base,
    A_owner,
    A__phase,
    A_acc,
    A_first,
    A_gpu,
    A_carry,
    A_carry_first,
    A_train_src,
    A_last_src,
    A_train_seen,
    A_fetched_in_step,
    A_opt_depth,
    A_opt_t0,
    A_other,
    A_add_carried,
    A__dataset,
    A_depth,
    A__rare,
    A_clock,
    A_pending,
    A_t0,
    A_step,
    A__slow_at,
    A_step_table,
    A__rows,
    A_appended,
    A__high_water,
    A_wake,
    A_append,
    A__enter_full,
    A__exit_full,
    A__fail,
    A__memory,
    A_active,
    A__open,
    A__last_pre,
    A__new,
    A__closer,
    A_steps_recorded,
    A_boundaries,
    A__enabled,
    N_ATTR
};
static PyObject *attr_name[N_ATTR];
#define NAME(a) (attr_name[a])

static PyObject *k_zero, *k_one;

static inline long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
}

/* -- attribute access ------------------------------------------------------------------------
 * PhaseClock, StepTracker and StepRows keep their state in __slots__: each slot is a member
 * descriptor (T_OBJECT_EX) at a fixed offset in the instance.  The offsets are read once per type
 * from the type's own descriptors and the slot is then read and written as CPython's member
 * descriptor does; a name that is not such a slot (a property, another class) goes through the
 * generic PyObject_GetAttr / PyObject_SetAttr. */
#define MAX_LAYOUTS 8
typedef struct {
    PyTypeObject *type;
    Py_ssize_t off[N_ATTR];  /* -1: not a writable object slot of this type */
    Py_ssize_t noff[N_ATTR]; /* -1: not a native member (the ClockCore / StepContext fields) */
    int ntype[N_ATTR];       /* T_LONGLONG, T_ULONGLONG or T_BOOL where noff >= 0 */
} Layout;
static Layout layouts[MAX_LAYOUTS];
static int n_layouts;
static Layout *last_layout;

static Layout *layout_of(PyObject *o) {
    PyTypeObject *tp = Py_TYPE(o);
    if (last_layout != NULL && last_layout->type == tp) return last_layout;
    for (int i = 0; i < n_layouts; i++)
        if (layouts[i].type == tp) return (last_layout = &layouts[i]);
    if (n_layouts == MAX_LAYOUTS) return NULL;
    Layout *L = &layouts[n_layouts];
    for (int a = 0; a < N_ATTR; a++) {
        L->off[a] = L->noff[a] = -1;
        L->ntype[a] = 0;
        PyObject *d = PyObject_GetAttr((PyObject *)tp, attr_name[a]);
        if (d == NULL) {
            PyErr_Clear();
            continue;
        }
        if (Py_IS_TYPE(d, &PyMemberDescr_Type) && PyType_IsSubtype(tp, ((PyDescrObject *)d)->d_type)) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            if (!(m->flags & READONLY) && m->offset > 0) {
                if (m->type == T_OBJECT_EX) {
                    L->off[a] = m->offset;
                } else if (m->type == T_LONGLONG || m->type == T_ULONGLONG || m->type == T_BOOL) {
                    L->noff[a] = m->offset;
                    L->ntype[a] = m->type;
                }
            }
        }
        Py_DECREF(d);
    }
    Py_INCREF(tp); /* kept for the life of the process: the offsets belong to it */
    L->type = tp;
    n_layouts++;
    return (last_layout = L);
}

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))
#define NATIVE(o, off, T) (*(T *)((char *)(o) + (off)))

static long long native_get(PyObject *o, Layout *L, int a) {
    Py_ssize_t off = L->noff[a];
    switch (L->ntype[a]) {
    case T_BOOL:
        return NATIVE(o, off, char) != 0;
    case T_ULONGLONG:
        return (long long)NATIVE(o, off, unsigned long long);
    default:
        return NATIVE(o, off, long long);
    }
}

static void native_set(PyObject *o, Layout *L, int a, long long v) {
    Py_ssize_t off = L->noff[a];
    switch (L->ntype[a]) {
    case T_BOOL:
        NATIVE(o, off, char) = v != 0;
        break;
    case T_ULONGLONG:
        NATIVE(o, off, unsigned long long) = (unsigned long long)v;
        break;
    default:
        NATIVE(o, off, long long) = v;
    }
}

/* o.<a> as a new reference (AttributeError when the slot is empty) */
static PyObject *GA(PyObject *o, int a) {
    Layout *L = layout_of(o);
    if (L != NULL && L->off[a] >= 0) {
        PyObject *v = SLOT(o, L->off[a]);
        if (v == NULL) {
            PyErr_SetObject(PyExc_AttributeError, attr_name[a]);
            return NULL;
        }
        Py_INCREF(v);
        return v;
    }
    if (L != NULL && L->noff[a] >= 0) {
        long long x = native_get(o, L, a);
        if (L->ntype[a] == T_BOOL) return PyBool_FromLong((long)x);
        if (L->ntype[a] == T_ULONGLONG) return PyLong_FromUnsignedLongLong((unsigned long long)x);
        return PyLong_FromLongLong(x);
    }
    return PyObject_GetAttr(o, attr_name[a]);
}

/* o.<a> = v (v borrowed) */
static int SA(PyObject *o, int a, PyObject *v) {
    Layout *L = layout_of(o);
    if (L != NULL && L->off[a] >= 0) {
        PyObject *old = SLOT(o, L->off[a]);
        Py_INCREF(v);
        SLOT(o, L->off[a]) = v;
        Py_XDECREF(old);
        return 0;
    }
    if (L != NULL && L->noff[a] >= 0) {
        long long x;
        if (L->ntype[a] == T_BOOL)
            x = PyObject_IsTrue(v);
        else if (L->ntype[a] == T_ULONGLONG)
            x = (long long)PyLong_AsUnsignedLongLong(v);
        else
            x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred()) return -1;
        native_set(o, L, a, x);
        return 0;
    }
    return PyObject_SetAttr(o, attr_name[a], v);
}

/* -- attribute helpers: 0 on success, -1 with an exception set ------------------------------ */
static int get_ll(PyObject *o, int a, long long *out) {
    Layout *L = layout_of(o);
    if (L != NULL && L->noff[a] >= 0) {
        *out = native_get(o, L, a);
        return 0;
    }
    PyObject *v = GA(o, a);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (*out == -1 && PyErr_Occurred()) return -1;
    return 0;
}

static int set_ll(PyObject *o, int a, long long v) {
    Layout *L = layout_of(o);
    if (L != NULL && L->noff[a] >= 0) {
        native_set(o, L, a, v);
        return 0;
    }
    PyObject *x = PyLong_FromLongLong(v);
    if (x == NULL) return -1;
    int r = SA(o, a, x);
    Py_DECREF(x);
    return r;
}

/* ==== ClockCore: the base of PhaseClock, its state in C memory ============================== *
 * The integers and the four phase arrays (acc, first, carry, carry_first) are C fields, so the
 * wrappers below read and write them without Python objects.  Python sees the integers as
 * members and each array as a PhaseArray: a live view (index, slice, len, iter, ==) that the
 * reference code in step.py uses as it uses the lists of the pure-Python PhaseClock. */
typedef struct {
    PyObject_HEAD
    long long gate, base, phase, opt_depth, opt_t0, train_src, last_src;
    unsigned long long owner;
    char train_seen, fetched_in_step, gpu_on;
    long long self_ns;
    long long acc[NPHASES], first[NPHASES], carry[NPHASES], carry_first[NPHASES];
} ClockCoreObject;

static PyTypeObject ClockCoreType;
#define CC(o) ((ClockCoreObject *)(o))

typedef struct {
    PyObject_HEAD
    PyObject *clock; /* keeps the array alive */
    long long *data;
} PhaseArrayObject;

static PyTypeObject PhaseArrayType;

static PyObject *array_view(ClockCoreObject *clock, long long *data) {
    PhaseArrayObject *v = PyObject_New(PhaseArrayObject, &PhaseArrayType);
    if (v == NULL) return NULL;
    Py_INCREF(clock);
    v->clock = (PyObject *)clock;
    v->data = data;
    return (PyObject *)v;
}

static void PhaseArray_dealloc(PhaseArrayObject *self) {
    Py_XDECREF(self->clock);
    PyObject_Free(self);
}

static Py_ssize_t PhaseArray_len(PyObject *self) { return NPHASES; }

static PyObject *PhaseArray_item(PhaseArrayObject *self, Py_ssize_t i) {
    if (i < 0 || i >= NPHASES) {
        PyErr_SetString(PyExc_IndexError, "phase index out of range (0..4)");
        return NULL;
    }
    return PyLong_FromLongLong(self->data[i]);
}

static PyObject *PhaseArray_list(PhaseArrayObject *self) {
    PyObject *l = PyList_New(NPHASES);
    if (l == NULL) return NULL;
    for (int i = 0; i < NPHASES; i++) {
        PyObject *x = PyLong_FromLongLong(self->data[i]);
        if (x == NULL) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, i, x);
    }
    return l;
}

/* the NPHASES integers of `seq` into out[] (nothing written on error) */
static int read_phases(PyObject *seq, long long *out) {
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of 5 ints");
    if (fast == NULL) return -1;
    long long tmp[NPHASES];
    if (PySequence_Fast_GET_SIZE(fast) != NPHASES) {
        PyErr_Format(PyExc_ValueError, "expected 5 ints (one per phase), found %zd", PySequence_Fast_GET_SIZE(fast));
        Py_DECREF(fast);
        return -1;
    }
    for (int i = 0; i < NPHASES; i++) {
        tmp[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (tmp[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    memcpy(out, tmp, sizeof(tmp));
    return 0;
}

static PyObject *PhaseArray_subscript(PhaseArrayObject *self, PyObject *key) {
    if (PySlice_Check(key)) {
        PyObject *l = PhaseArray_list(self);
        if (l == NULL) return NULL;
        PyObject *r = PyObject_GetItem(l, key);
        Py_DECREF(l);
        return r;
    }
    Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0) i += NPHASES;
    return PhaseArray_item(self, i);
}

static int PhaseArray_ass_subscript(PhaseArrayObject *self, PyObject *key, PyObject *value) {
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "a phase array has a fixed size: nothing can be deleted");
        return -1;
    }
    if (PySlice_Check(key)) {
        Py_ssize_t start, stop, step, n;
        if (PySlice_Unpack(key, &start, &stop, &step) < 0) return -1;
        n = PySlice_AdjustIndices(NPHASES, &start, &stop, step);
        if (n != NPHASES) {
            PyErr_SetString(PyExc_ValueError, "a phase array is assigned whole (a[:] = five ints)");
            return -1;
        }
        return read_phases(value, self->data);
    }
    Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return -1;
    if (i < 0) i += NPHASES;
    if (i < 0 || i >= NPHASES) {
        PyErr_SetString(PyExc_IndexError, "phase index out of range (0..4)");
        return -1;
    }
    long long x = PyLong_AsLongLong(value);
    if (x == -1 && PyErr_Occurred()) return -1;
    self->data[i] = x;
    return 0;
}

static PyObject *PhaseArray_richcompare(PhaseArrayObject *self, PyObject *other, int op) {
    PyObject *l = PhaseArray_list(self);
    if (l == NULL) return NULL;
    PyObject *o = Py_IS_TYPE(other, &PhaseArrayType) ? PhaseArray_list((PhaseArrayObject *)other) : (Py_INCREF(other), other);
    if (o == NULL) {
        Py_DECREF(l);
        return NULL;
    }
    PyObject *r = PyObject_RichCompare(l, o, op);
    Py_DECREF(l);
    Py_DECREF(o);
    return r;
}

static PyObject *PhaseArray_repr(PhaseArrayObject *self) {
    PyObject *l = PhaseArray_list(self);
    if (l == NULL) return NULL;
    PyObject *r = PyObject_Repr(l);
    Py_DECREF(l);
    return r;
}

static PySequenceMethods PhaseArray_as_sequence = {
    .sq_length = PhaseArray_len,
    .sq_item = (ssizeargfunc)PhaseArray_item,
};

static PyMappingMethods PhaseArray_as_mapping = {
    .mp_length = PhaseArray_len,
    .mp_subscript = (binaryfunc)PhaseArray_subscript,
    .mp_ass_subscript = (objobjargproc)PhaseArray_ass_subscript,
};

static PyTypeObject PhaseArrayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.PhaseArray",
    .tp_doc = "A live view of one of the clock's phase arrays (5 ints, one per phase).",
    .tp_basicsize = sizeof(PhaseArrayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)PhaseArray_dealloc,
    .tp_as_sequence = &PhaseArray_as_sequence,
    .tp_as_mapping = &PhaseArray_as_mapping,
    .tp_richcompare = (richcmpfunc)PhaseArray_richcompare,
    .tp_repr = (reprfunc)PhaseArray_repr,
    .tp_hash = PyObject_HashNotImplemented,
};

static long long *clock_array(ClockCoreObject *c, int which) {
    switch (which) {
    case 0:
        return c->acc;
    case 1:
        return c->first;
    case 2:
        return c->carry;
    default:
        return c->carry_first;
    }
}

static PyObject *Clock_get_array(ClockCoreObject *self, void *which) {
    return array_view(self, clock_array(self, (int)(intptr_t)which));
}

static int Clock_set_array(ClockCoreObject *self, PyObject *value, void *which) {
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "a phase array cannot be deleted");
        return -1;
    }
    return read_phases(value, clock_array(self, (int)(intptr_t)which));
}

static PyGetSetDef Clock_getset[] = {
    {"acc", (getter)Clock_get_array, (setter)Clock_set_array, "ns per phase in the current step", (void *)0},
    {"first", (getter)Clock_get_array, (setter)Clock_set_array, "each phase's first start (0: not yet)", (void *)1},
    {"carry", (getter)Clock_get_array, (setter)Clock_set_array, "ns carried towards the next step", (void *)2},
    {"carry_first", (getter)Clock_get_array, (setter)Clock_set_array, "where each carried phase began", (void *)3},
    {NULL},
};

/* the carried time becomes the step's first phases; the accumulators (zeroed at the last
 * step's end) become the carry */
static void clock_swap(ClockCoreObject *c) {
    long long t[NPHASES];
    memcpy(t, c->acc, sizeof(t));
    memcpy(c->acc, c->carry, sizeof(t));
    memcpy(c->carry, t, sizeof(t));
    memcpy(t, c->first, sizeof(t));
    memcpy(c->first, c->carry_first, sizeof(t));
    memcpy(c->carry_first, t, sizeof(t));
}

static PyObject *Clock_swap_carry(ClockCoreObject *self, PyObject *unused) {
    clock_swap(self);
    Py_RETURN_NONE;
}

static PyMethodDef Clock_methods[] = {
    {"swap_carry", (PyCFunction)Clock_swap_carry, METH_NOARGS,
     "Swap acc/first with carry/carry_first (at a step's start)."},
    {NULL},
};

static PyMemberDef Clock_members[] = {
    {"gate", T_LONGLONG, offsetof(ClockCoreObject, gate), 0, "what the patches read first (step.py)"},
    {"base", T_LONGLONG, offsetof(ClockCoreObject, base), 0, "the gate while no phase runs"},
    {"_phase", T_LONGLONG, offsetof(ClockCoreObject, phase), 0, "the phase running (-1: none)"},
    {"opt_depth", T_LONGLONG, offsetof(ClockCoreObject, opt_depth), 0, "optimizer steps open"},
    {"opt_t0", T_LONGLONG, offsetof(ClockCoreObject, opt_t0), 0, "start of the optimizer phase"},
    {"train_src", T_LONGLONG, offsetof(ClockCoreObject, train_src), 0, "the training loader"},
    {"last_src", T_LONGLONG, offsetof(ClockCoreObject, last_src), 0, "the loader of the latest fetch"},
    {"owner", T_ULONGLONG, offsetof(ClockCoreObject, owner), 0, "the training thread's ident"},
    {"train_seen", T_BOOL, offsetof(ClockCoreObject, train_seen), 0, "the training loader was fetched from"},
    {"fetched_in_step", T_BOOL, offsetof(ClockCoreObject, fetched_in_step), 0, "a loader was fetched from in the step"},
    {"self_ns", T_LONGLONG, offsetof(ClockCoreObject, self_ns), 0, "traceml's own ns in the sampled step under way"},
    {"_gpu_on", T_BOOL, offsetof(ClockCoreObject, gpu_on), 0, "a GPU phase timer is set (PhaseClock.gpu)"},
    {NULL},
};

static PyTypeObject ClockCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.ClockCore",
    .tp_doc = "Base of PhaseClock: its integers and phase arrays as C fields (the wrappers read them directly).",
    .tp_basicsize = sizeof(ClockCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_members = Clock_members,
    .tp_getset = Clock_getset,
    .tp_methods = Clock_methods,
};

/* 1: the calling thread is clock.owner */
static inline int is_owner(PyObject *clock) { return CC(clock)->owner == (unsigned long long)PyThread_get_thread_ident(); }

/* acc[phase] += t1 - t0; first[phase] = t0 when 0 */
static inline void account(PyObject *clock, int phase, long long t0, long long t1) {
    ClockCoreObject *c = CC(clock);
    c->acc[phase] += t1 - t0;
    if (c->first[phase] == 0) c->first[phase] = t0;
}

/* clock._phase = NO_PHASE; clock.gate = clock.base */
static inline void close_phase(PyObject *clock) {
    CC(clock)->phase = -1;
    CC(clock)->gate = CC(clock)->base;
}

static inline void open_phase(PyObject *clock, int phase) {
    CC(clock)->phase = phase;
    CC(clock)->gate = 0;
}

/* ==== Timed: forward / backward / optimizer-free wrappers timed inside a step ============= */
typedef struct {
    PyObject_HEAD
    PyObject *clock;
    PyObject *fn;
    PyObject *full; /* the Python wrapper: sampled steps, a GPU timer */
    PyObject *dict;
    PyObject *weakreflist;
    PyObject *grad_check; /* zero-code forward: a callable; false = evaluation, not timed */
    PyObject *after_eval; /* called after such a call */
    vectorcallfunc vectorcall;
    int phase;
} TimedObject;

static PyObject *Timed_call(TimedObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PyObject *Fetch_call(TimedObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PyObject *OptHook_call(TimedObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PyTypeObject FetchType, OptHookType;

static int Timed_init(TimedObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"clock", "phase", "fn", "full", NULL};
    PyObject *clock, *fn, *full;
    int phase;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OiOO", kwlist, &clock, &phase, &fn, &full)) return -1;
    if (!PyObject_TypeCheck(clock, &ClockCoreType)) {
        PyErr_SetString(PyExc_TypeError, "traceml: the clock must be a PhaseClock (a _fastclock.ClockCore)");
        return -1;
    }
    if (phase < 0 || phase >= NPHASES) {
        PyErr_Format(PyExc_ValueError, "phase %d: expected 0..4", phase);
        return -1;
    }
    Py_INCREF(clock);
    Py_XSETREF(self->clock, clock);
    Py_INCREF(fn);
    Py_XSETREF(self->fn, fn);
    Py_INCREF(full);
    Py_XSETREF(self->full, full);
    self->phase = phase;
    if (PyObject_TypeCheck(self, &FetchType))
        self->vectorcall = (vectorcallfunc)Fetch_call;
    else if (PyObject_TypeCheck(self, &OptHookType))
        self->vectorcall = (vectorcallfunc)OptHook_call;
    else
        self->vectorcall = (vectorcallfunc)Timed_call;
    return 0;
}

static int Timed_traverse(TimedObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->clock);
    Py_VISIT(self->fn);
    Py_VISIT(self->full);
    Py_VISIT(self->dict);
    Py_VISIT(self->grad_check);
    Py_VISIT(self->after_eval);
    return 0;
}

static int Timed_clear(TimedObject *self) {
    Py_CLEAR(self->clock);
    Py_CLEAR(self->fn);
    Py_CLEAR(self->full);
    Py_CLEAR(self->dict);
    Py_CLEAR(self->grad_check);
    Py_CLEAR(self->after_eval);
    return 0;
}

static void Timed_dealloc(TimedObject *self) {
    /* a static type: a heap subclass (TimedForward) drops its own type reference */
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) PyObject_ClearWeakRefs((PyObject *)self);
    Timed_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Fetch is a class attribute (``_BaseDataLoaderIter.__next__``): it binds like a function */
static PyObject *Fetch_descr_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static PyObject *Timed_call(TimedObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *clock = self->clock, *fn = self->fn;
    if (clock == NULL || fn == NULL || self->full == NULL) {
        PyErr_SetString(PyExc_TypeError, "traceml: timed wrapper not initialised");
        return NULL;
    }
    ClockCoreObject *c = CC(clock);
    long long gate = c->gate;
    if (!(gate & STEP) || !is_owner(clock)) /* outside a step, a phase runs, or another thread */
        return PyObject_Vectorcall(fn, args, nargsf, kwnames);
    if (self->grad_check != NULL) { /* zero-code forward: an evaluation call is not step work */
        PyObject *g = PyObject_CallNoArgs(self->grad_check);
        int on = g == NULL ? -1 : PyObject_IsTrue(g);
        Py_XDECREF(g);
        if (on < 0) {
            PyErr_Clear();
        } else if (!on) {
            PyObject *res = PyObject_Vectorcall(fn, args, nargsf, kwnames);
            PyObject *et, *ev, *etb;
            PyErr_Fetch(&et, &ev, &etb);
            PyObject *r = self->after_eval != NULL ? PyObject_CallNoArgs(self->after_eval) : NULL;
            if (r == NULL) PyErr_Clear();
            Py_XDECREF(r);
            PyErr_Restore(et, ev, etb);
            return res;
        }
    }
    if ((gate & ~SAMPLE) != (CARRY | STEP) || c->gpu_on) /* a GPU timer: the reference code */
        return PyObject_Vectorcall(self->full, args, nargsf, kwnames);
    long long te = (gate & SAMPLE) ? now_ns() : 0; /* a sampled step: this wrapper's own time too */
    open_phase(clock, self->phase);
    long long t0 = now_ns();
    PyObject *res = PyObject_Vectorcall(fn, args, nargsf, kwnames);
    long long t1 = now_ns();
    account(clock, self->phase, t0, t1);
    close_phase(clock);
    if (te) c->self_ns += now_ns() - t1 + t0 - te;
    return res;
}

static PyObject *Timed_get_wrapped(TimedObject *self, void *closure) {
    PyObject *v = self->fn ? self->fn : Py_None;
    Py_INCREF(v);
    return v;
}

static PyObject *Timed_get_clock(TimedObject *self, void *closure) {
    PyObject *v = self->clock ? self->clock : Py_None;
    Py_INCREF(v);
    return v;
}

static PyObject *Timed_set_grad_check(TimedObject *self, PyObject *args) {
    PyObject *check, *after;
    if (!PyArg_ParseTuple(args, "OO", &check, &after)) return NULL;
    Py_INCREF(check);
    Py_XSETREF(self->grad_check, check);
    Py_INCREF(after);
    Py_XSETREF(self->after_eval, after);
    Py_RETURN_NONE;
}

static PyMethodDef Timed_methods[] = {
    {"_set_grad_check", (PyCFunction)Timed_set_grad_check, METH_VARARGS,
     "_set_grad_check(check, after): inside a step, a call with check() false runs untimed, then after()."},
    {NULL},
};

static PyGetSetDef Timed_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"__wrapped__", (getter)Timed_get_wrapped, NULL, "the wrapped callable", NULL},
    {"_fn", (getter)Timed_get_wrapped, NULL, "the wrapped callable", NULL},
    {"_clock", (getter)Timed_get_clock, NULL, "the phase clock", NULL},
    {NULL},
};

static PyTypeObject TimedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.Timed",
    .tp_doc = "Timed(clock, phase, fn, full): fn timed as `phase` inside a step (C fast path of step.timed).",
    .tp_basicsize = sizeof(TimedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Timed_init,
    .tp_dealloc = (destructor)Timed_dealloc,
    .tp_traverse = (traverseproc)Timed_traverse,
    .tp_clear = (inquiry)Timed_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimedObject, vectorcall),
    .tp_getset = Timed_getset,
    .tp_methods = Timed_methods,
    .tp_dictoffset = offsetof(TimedObject, dict),
    .tp_weaklistoffset = offsetof(TimedObject, weakreflist),
};

/* ==== Fetch: DataLoader __next__, the training loader's carried fetch ====================== */
static PyObject *Fetch_call(TimedObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *clock = self->clock, *fn = self->fn;
    if (clock == NULL || fn == NULL || self->full == NULL) {
        PyErr_SetString(PyExc_TypeError, "traceml: fetch wrapper not initialised");
        return NULL;
    }
    ClockCoreObject *c = CC(clock);
    long long gate = c->gate;
    if (PyVectorcall_NARGS(nargsf) < 1 || (gate & ~SAMPLE) != CARRY || !is_owner(clock))
        return PyObject_Vectorcall(self->full, args, nargsf, kwnames); /* in a step, off, nested, another thread */
    /* before a sampled step: this wrapper's own time counts in that step's cost (as in the reference) */
    long long te = (gate & SAMPLE) ? now_ns() : 0;
    open_phase(clock, DATALOADER);
    long long t0 = now_ns();
    PyObject *res = PyObject_Vectorcall(fn, args, nargsf, kwnames);
    long long t1 = now_ns();
    close_phase(clock);
    if (res == NULL) { /* StopIteration at the end of an epoch too: not counted */
        if (te) c->self_ns += t0 - te;
        return NULL;
    }
    /* which loader: id(it._dataset), else id(type(it)) (hooks._loader_source) */
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    PyObject *it = args[0];
    PyObject *ds = GA(it, A__dataset);
    long long src;
    if (ds == NULL) {
        PyErr_Clear();
        src = (long long)(uintptr_t)Py_TYPE(it);
    } else {
        src = (long long)(uintptr_t)ds;
        Py_DECREF(ds);
    }
    c->last_src = src;
    if (src == c->train_src) {
        c->train_seen = 1;
        if (c->carry[DATALOADER] == 0) c->carry_first[DATALOADER] = t0;
        c->carry[DATALOADER] += t1 - t0;
    } else {
        PyObject *out = PyObject_CallMethod(clock, "add_carried", "iLLL", DATALOADER, src, t0, t1 - t0);
        if (out == NULL) PyErr_Clear(); /* the fetch is not counted; the batch goes to the user */
        Py_XDECREF(out);
    }
    PyErr_Restore(et, ev, etb);
    if (te) c->self_ns += now_ns() - t1 + t0 - te;
    return res;
}

static PyTypeObject FetchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.Fetch",
    .tp_doc = "Fetch(clock, phase, fn, full): DataLoader __next__ carried between steps (C fast path).",
    .tp_basicsize = sizeof(TimedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_METHOD_DESCRIPTOR | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Timed_init,
    .tp_dealloc = (destructor)Timed_dealloc,
    .tp_traverse = (traverseproc)Timed_traverse,
    .tp_clear = (inquiry)Timed_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimedObject, vectorcall),
    .tp_descr_get = Fetch_descr_get,
    .tp_getset = Timed_getset,
    .tp_dictoffset = offsetof(TimedObject, dict),
    .tp_weaklistoffset = offsetof(TimedObject, weakreflist),
};

/* ==== OptimizerHook: the optimizer step pre-hook (phase 0 in `phase`) or post-hook (1) ======= */
static PyObject *OptHook_call(TimedObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *clock = self->clock;
    if (clock == NULL || self->full == NULL) Py_RETURN_NONE;
    ClockCoreObject *c = CC(clock);
    long long depth = c->opt_depth;
    if (self->phase == 0) { /* pre */
        if (depth) {        /* an optimizer stepped from inside another one's step */
            c->opt_depth = depth + 1;
            Py_RETURN_NONE;
        }
        long long gate = c->gate;
        if (!(gate & STEP) || !is_owner(clock)) Py_RETURN_NONE;
        if ((gate & ~SAMPLE) != (CARRY | STEP) || c->gpu_on)
            return PyObject_Vectorcall(self->full, args, nargsf, kwnames);
        long long te = (gate & SAMPLE) ? now_ns() : 0;
        c->opt_depth = 1;
        open_phase(clock, OPTIMIZER);
        long long t = c->opt_t0 = now_ns();
        if (c->first[OPTIMIZER] == 0) c->first[OPTIMIZER] = t;
        if (te) c->self_ns += t - te;
        Py_RETURN_NONE;
    }
    /* post */
    if (!depth || !is_owner(clock)) Py_RETURN_NONE;
    if (c->gpu_on) return PyObject_Vectorcall(self->full, args, nargsf, kwnames);
    long long t = now_ns();
    c->opt_depth = depth - 1;
    if (depth == 1 && c->phase == OPTIMIZER) {
        c->acc[OPTIMIZER] += t - c->opt_t0;
        close_phase(clock);
        if (c->base & SAMPLE) c->self_ns += now_ns() - t;
    }
    Py_RETURN_NONE;
}

static PyTypeObject OptHookType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.OptimizerHook",
    .tp_doc = "OptimizerHook(clock, 0|1, None, full): the optimizer step pre- (0) or post-hook (1).",
    .tp_basicsize = sizeof(TimedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Timed_init,
    .tp_dealloc = (destructor)Timed_dealloc,
    .tp_traverse = (traverseproc)Timed_traverse,
    .tp_clear = (inquiry)Timed_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimedObject, vectorcall),
    .tp_getset = Timed_getset,
    .tp_dictoffset = offsetof(TimedObject, dict),
    .tp_weaklistoffset = offsetof(TimedObject, weakreflist),
};

/* ==== StatmCore: the base of hostmem.HostStepMemory, its read of /proc/self/statm ============= *
 * hostmem.py stays the reference (pure Python, and every step that takes the full exit); the C
 * exit below reads on the memory steps itself: pread, the resident pages, one row appended, the
 * stride adapted -- the same rule as HostStepMemory._adapt, with these constants (checked there). */
#define STATM_WARM_STEPS 256
#define STATM_MIN_GAP_NS 50000000LL
#define STATM_MAX_EVERY 4096
typedef struct {
    PyObject_HEAD
    PyObject *append;
    long long every, page, last_ts, last_step, floor_;
    int fd;
} StatmCoreObject;

static int Statm_traverse(StatmCoreObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->append);
    return 0;
}

static int Statm_clear(StatmCoreObject *self) {
    Py_CLEAR(self->append);
    return 0;
}

static void Statm_dealloc(StatmCoreObject *self) {
    PyObject_GC_UnTrack(self);
    Statm_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* HostStepMemory._adapt: the stride for the next reads */
static void statm_adapt(StatmCoreObject *m, long long step, long long ts) {
    long long steps = step - m->last_step, took = ts - m->last_ts;
    m->last_step = step;
    m->last_ts = ts;
    if (step < STATM_WARM_STEPS || took <= 0 || steps <= 0) return;
    long long gap = took * m->every / steps; /* between two reads at the current stride */
    if (gap < STATM_MIN_GAP_NS && m->every < STATM_MAX_EVERY)
        m->every *= 2;
    else if (gap > 4 * STATM_MIN_GAP_NS && m->every > m->floor_)
        m->every /= 2;
}

/* HostStepMemory.step_end on a step it reads: -1 with an exception set on any failure (the
 * caller then runs the Python reference, which retries and turns the piece off if it fails) */
static int statm_read(StatmCoreObject *m, long long step, long long ts) {
    char buf[129];
    ssize_t n = pread(m->fd, buf, 128, 0);
    if (n <= 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    buf[n] = 0;
    char *p = buf, *end;
    while (*p == ' ') p++;
    strtoll(p, &end, 10); /* size */
    if (end == p) goto bad;
    p = end;
    errno = 0;
    long long resident = strtoll(p, &end, 10);
    if (end == p || errno) goto bad;
    PyObject *row = Py_BuildValue("(LLL)", step, ts, resident * m->page);
    if (row == NULL) return -1;
    PyObject *r = m->append != NULL ? PyObject_CallOneArg(m->append, row) : NULL;
    Py_DECREF(row);
    if (r == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "traceml: no append");
        return -1;
    }
    Py_DECREF(r);
    statm_adapt(m, step, ts);
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "traceml: unexpected /proc/self/statm");
    return -1;
}

static PyObject *Statm_adapt_c(StatmCoreObject *self, PyObject *args) {
    long long step, ts;
    if (!PyArg_ParseTuple(args, "LL", &step, &ts)) return NULL;
    statm_adapt(self, step, ts);
    Py_RETURN_NONE;
}

static PyObject *Statm_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    StatmCoreObject *self = (StatmCoreObject *)PyType_GenericNew(type, args, kw);
    if (self != NULL) {
        self->fd = -1; /* nothing to read until the reader opens the file */
        self->every = self->floor_ = 1;
    }
    return (PyObject *)self;
}

static PyMethodDef Statm_methods[] = {
    {"_adapt_c", (PyCFunction)Statm_adapt_c, METH_VARARGS, "_adapt_c(step, ts): the C exit's stride rule."},
    {NULL},
};

static PyMemberDef Statm_members[] = {
    {"append", T_OBJECT_EX, offsetof(StatmCoreObject, append), 0, "appends one (step, ts, bytes) row"},
    {"every", T_LONGLONG, offsetof(StatmCoreObject, every), 0, "read on the steps divisible by this"},
    {"_page", T_LONGLONG, offsetof(StatmCoreObject, page), 0, "bytes per page"},
    {"_last_ts", T_LONGLONG, offsetof(StatmCoreObject, last_ts), 0, "wall ns of the last read"},
    {"_last_step", T_LONGLONG, offsetof(StatmCoreObject, last_step), 0, "step of the last read"},
    {"_floor", T_LONGLONG, offsetof(StatmCoreObject, floor_), 0, "the narrowest stride"},
    {"_fd", T_INT, offsetof(StatmCoreObject, fd), 0, "the open /proc/self/statm (-1: closed)"},
    {NULL},
};

static PyTypeObject StatmCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.StatmCore",
    .tp_doc = "Base of HostStepMemory: its state in C, read by the step context's C exit.",
    .tp_basicsize = sizeof(StatmCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = Statm_new,
    .tp_dealloc = (destructor)Statm_dealloc,
    .tp_traverse = (traverseproc)Statm_traverse,
    .tp_clear = (inquiry)Statm_clear,
    .tp_methods = Statm_methods,
    .tp_members = Statm_members,
};

static inline long long wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
}

/* ==== StepContext: the base of StepTracker, its __enter__ / __exit__ ======================= */
/* StepTracker's integers, read and written here without building Python ints */
typedef struct {
    PyObject_HEAD
    long long depth, step, t0, pending, slow_at;
    long long sampled, enter_ns, cost_ns, cost_steps, rare_ns;
    char rare;
} StepContextObject;

#define SC(o) ((StepContextObject *)(o))

static PyObject *call_full_method(PyObject *self, PyObject *name) {
    return PyObject_CallMethodNoArgs(self, name);
}

/* bookkeeping failed half-way: StepTracker._fail() turns step timing off (logged once) */
static void step_failed(PyObject *self) {
    PyErr_Clear();
    PyObject *r = PyObject_CallMethodNoArgs(self, NAME(A__fail));
    if (r == NULL) PyErr_Clear();
    Py_XDECREF(r);
}

/* self.clock (a new reference) when it is a ClockCore, else NULL (the full path handles it) */
static PyObject *step_clock(PyObject *self) {
    PyObject *clock = GA(self, A_clock);
    if (clock != NULL && !PyObject_TypeCheck(clock, &ClockCoreType)) {
        Py_DECREF(clock);
        return NULL;
    }
    return clock;
}

static PyObject *Step_enter(PyObject *self, PyObject *unused) {
    StepContextObject *s = SC(self);
    PyObject *clock = NULL, *other = NULL;
    if (s->depth || s->rare) goto full;
    if ((clock = step_clock(self)) == NULL) goto full;
    ClockCoreObject *c = CC(clock);
    long long sampled = c->gate & SAMPLE;
    if ((c->gate & ~SAMPLE) != CARRY) goto full;
    long long te = sampled ? now_ns() : 0;
    /* another loader fetched since the last step: the full path settles it */
    if ((other = GA(clock, A_other)) == NULL || !PyDict_CheckExact(other) || PyDict_GET_SIZE(other)) goto full;
    Py_DECREF(other);
    /* the common step (StepTracker.__enter__) */
    s->depth = 1;
    c->owner = (unsigned long long)PyThread_get_thread_ident();
    clock_swap(c);
    s->pending = c->acc[DATALOADER] + c->acc[DATALOADER + 1];
    c->train_seen = c->fetched_in_step = 0;
    c->opt_depth = 0;
    c->phase = -1;
    c->base = c->gate = CARRY | STEP | sampled;
    s->sampled = sampled;
    s->t0 = now_ns();
    if (sampled) s->enter_ns = s->t0 - te;
    Py_DECREF(clock);
    Py_INCREF(self);
    return self;
full:
    Py_XDECREF(other);
    Py_XDECREF(clock);
    PyErr_Clear();
    return call_full_method(self, NAME(A__enter_full));
}

static PyObject *Step_exit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long t1 = now_ns();
    StepContextObject *s = SC(self);
    PyObject *clock = NULL, *table = NULL, *rows = NULL;
    PyObject *exc_type = nargs > 0 ? args[0] : Py_None;
    if (s->depth != 1 || exc_type != Py_None || s->step >= s->slow_at) goto full;
    if ((clock = step_clock(self)) == NULL) goto full;
    ClockCoreObject *c = CC(clock);
    if (c->gate != (CARRY | STEP | s->sampled)) goto full; /* a phase is open, or the clock is off */
    /* the common step (StepTracker.__exit__): the row is ROW = struct.Struct("14q"), native
     * (steprows.pack_row) */
    long long row[14];
    row[0] = s->step;
    row[1] = 0;
    row[2] = s->t0 - s->pending;
    row[3] = t1;
    memcpy(row + 4, c->acc, sizeof(c->acc));
    memcpy(row + 4 + NPHASES, c->first, sizeof(c->first));
    s->depth = 0;
    s->step += 1;
    c->opt_depth = 0;
    c->base = c->gate = sampled_step(s->step) ? CARRY | SAMPLE : CARRY;
    memset(c->acc, 0, sizeof(c->acc));
    memset(c->first, 0, sizeof(c->first));
    PyObject *packed = PyBytes_FromStringAndSize((const char *)row, sizeof(row));
    if (packed == NULL) goto failed;
    if ((table = GA(self, A_step_table)) == NULL || (rows = GA(table, A__rows)) == NULL) {
        Py_DECREF(packed);
        goto failed;
    }
    PyObject *r = PyObject_CallMethodOneArg(rows, NAME(A_append), packed);
    Py_DECREF(packed);
    if (r == NULL) goto failed;
    Py_DECREF(r);
    long long appended, hw;
    if (get_ll(table, A_appended, &appended) < 0 || set_ll(table, A_appended, appended + 1) < 0) goto failed;
    Py_ssize_t n = PyObject_Length(rows);
    if (n < 0 || get_ll(table, A__high_water, &hw) < 0) goto failed;
    if (n == hw) {
        r = PyObject_CallMethodNoArgs(table, NAME(A_wake));
        if (r == NULL) goto failed;
        Py_DECREF(r);
    } else if (n > hw && (appended + 1) % YIELD_EVERY == 0) { /* at most every 64th step, even when full */
        /* the sender is behind (steps faster than it drains, as in an empty loop): hand it the
         * GIL for a moment every YIELD_EVERY rows past the high-water mark, so that rows are
         * drained instead of lost; a normal loop never gets here */
        Py_BEGIN_ALLOW_THREADS
        struct timespec ts = {0, YIELD_NS};
        nanosleep(&ts, NULL);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(rows);
    Py_DECREF(table);
    rows = table = NULL;
    /* a memory step (hostmem.HostStepMemory with its C base; never a sampled step) */
    PyObject *mem = GA(self, A__memory);
    if (mem == NULL) {
        PyErr_Clear();
        mem = Py_NewRef(Py_None);
    }
    if (mem != Py_None && PyObject_TypeCheck(mem, &StatmCoreType)) {
        StatmCoreObject *m = (StatmCoreObject *)mem;
        long long done = s->step - 1;
        if (m->fd >= 0 && m->every > 0 && done % m->every == 0) {
            long long ts = wall_ns();
            if (statm_read(m, done, ts) < 0) { /* the reference retries, and turns it off if it fails */
                PyErr_Clear();
                r = PyObject_CallMethod(mem, "step_end", "LL", done, ts);
                if (r == NULL) PyErr_Clear();
                Py_XDECREF(r);
            }
            s->rare_ns += now_ns() - t1;
        }
    }
    Py_DECREF(mem);
    if (s->sampled) {
        s->cost_ns += now_ns() - t1 + s->enter_ns + c->self_ns;
        s->cost_steps += 1;
        c->self_ns = 0;
        s->sampled = 0;
    }
    Py_DECREF(clock);
    Py_RETURN_FALSE;
failed:
    Py_XDECREF(rows);
    Py_XDECREF(table);
    Py_XDECREF(clock);
    step_failed(self);
    Py_RETURN_FALSE; /* never swallow the user's exception */
full:
    Py_XDECREF(clock);
    PyErr_Clear();
    PyObject *t1o = PyLong_FromLongLong(t1);
    if (t1o == NULL) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    PyObject *out = PyObject_CallMethodObjArgs(self, NAME(A__exit_full), t1o, exc_type, NULL);
    Py_DECREF(t1o);
    return out;
}

static PyMethodDef Step_methods[] = {
    {"__enter__", (PyCFunction)Step_enter, METH_NOARGS, "Open a step (C fast path of StepTracker.__enter__)."},
    {"__exit__", (PyCFunction)(void (*)(void))Step_exit, METH_FASTCALL,
     "Close the step (C fast path of StepTracker.__exit__)."},
    {NULL},
};

static PyMemberDef Step_members[] = {
    {"depth", T_LONGLONG, offsetof(StepContextObject, depth), 0, "nesting depth of the open step (0: none)"},
    {"step", T_LONGLONG, offsetof(StepContextObject, step), 0, "index of the current (or next) step"},
    {"t0", T_LONGLONG, offsetof(StepContextObject, t0), 0, "perf_counter_ns at the step's start"},
    {"pending", T_LONGLONG, offsetof(StepContextObject, pending), 0, "carried ns the step began with"},
    {"_slow_at", T_LONGLONG, offsetof(StepContextObject, slow_at), 0, "next step whose exit takes the full path"},
    {"_rare", T_BOOL, offsetof(StepContextObject, rare), 0, "every step takes the full path"},
    {"sampled", T_LONGLONG, offsetof(StepContextObject, sampled), 0, "SAMPLE: this step measures traceml's own time"},
    {"enter_ns", T_LONGLONG, offsetof(StepContextObject, enter_ns), 0, "the sampled step's enter cost"},
    {"cost_ns", T_LONGLONG, offsetof(StepContextObject, cost_ns), 0, "traceml's own ns over the sampled steps"},
    {"cost_steps", T_LONGLONG, offsetof(StepContextObject, cost_steps), 0, "the sampled steps measured"},
    {"rare_ns", T_LONGLONG, offsetof(StepContextObject, rare_ns), 0, "traceml's own ns on the memory steps"},
    {NULL},
};

static PyTypeObject StepContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.StepContext",
    .tp_doc = "Base of StepTracker: __enter__/__exit__ in C; the rare cases call _enter_full/_exit_full.",
    .tp_basicsize = sizeof(StepContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_methods = Step_methods,
    .tp_members = Step_members,
};

/* ==== AutoHook: zero-code steps' optimizer pre- (kind 0) and post-hook (1), steady state ====== *
 * The AutoSteps object (autostep.py) keeps every decision; this only runs its most common case
 * (the optimizer that closes each iteration, seen before) and calls the Python hook otherwise. */
typedef struct {
    PyObject_HEAD
    PyObject *auto_;   /* the AutoSteps */
    PyObject *tracker; /* its StepTracker (a StepContext) */
    PyObject *clock;   /* its PhaseClock (a ClockCore) */
    PyObject *full;    /* the Python hook */
    vectorcallfunc vectorcall;
    int kind;
} AutoHookObject;


/* 1 / 0: auto.<name> is true / false; -1: error */
/* AutoSteps keeps its state in __slots__: read and written at their offsets (GA / SA) */
static int attr_true(PyObject *o, int name) {
    PyObject *v = GA(o, name);
    if (v == NULL) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* 1 when the weak reference `ref` points at `obj` (an identity test: no reference is kept).
 * PyWeakref_GET_OBJECT is deprecated from 3.13 (to be removed): PyWeakref_GetRef there. */
static inline int weakref_is(PyObject *ref, PyObject *obj) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *target = NULL;
    if (PyWeakref_GetRef(ref, &target) < 0) {
        PyErr_Clear();
        return 0;
    }
    int r = target == obj;
    Py_XDECREF(target);
    return r;
#else
    return PyWeakref_GET_OBJECT(ref) == obj;
#endif
}

/* 1: auto.<name> is a weakref to obj; 0: it is not (or None); -1: error */
static int ref_is(PyObject *o, int name, PyObject *obj) {
    PyObject *v = GA(o, name);
    if (v == NULL) return -1;
    int r = PyWeakref_Check(v) && weakref_is(v, obj);
    Py_DECREF(v);
    return r;
}

static int add_one(PyObject *o, int name) {
    PyObject *v = GA(o, name);
    if (v == NULL) return -1;
    PyObject *w = PyNumber_Add(v, k_one);
    Py_DECREF(v);
    if (w == NULL) return -1;
    int r = SA(o, name, w);
    Py_DECREF(w);
    return r;
}

static PyObject *AutoHook_call(AutoHookObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (self->auto_ == NULL || self->full == NULL) Py_RETURN_NONE;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n < 1 || kwnames != NULL) goto full;
    PyObject *opt = args[0];
    ClockCoreObject *c = CC(self->clock);
    int r;
    if ((r = attr_true(self->auto_, A_active)) <= 0) goto none_or_full;
    if (self->kind == 0) { /* pre */
        if ((r = attr_true(self->auto_, A__open)) <= 0) goto full_or_error; /* no open step: Python sets the owner */
        if (!is_owner(self->clock) || c->opt_depth > 1) Py_RETURN_NONE;
        if ((r = ref_is(self->auto_, A__last_pre, opt)) == 1) Py_RETURN_NONE; /* the optimizer of the last step */
        goto full_or_error;
    }
    /* post */
    if (!is_owner(self->clock) || c->opt_depth > 0) Py_RETURN_NONE;
    PyObject *nw = GA(self->auto_, A__new);
    if (nw == NULL) goto error;
    int no_new = nw == Py_None;
    Py_DECREF(nw);
    if (!no_new || (r = ref_is(self->auto_, A__closer, opt)) != 1) goto full_or_error;
    /* the steady state (AutoSteps._post): the step ends, the next begins */
    if ((r = attr_true(self->auto_, A__open)) < 0) goto error;
    if (r) {
        if (SA(self->auto_, A__open, Py_False) < 0) goto error;
        PyObject *exit_args[3] = {Py_None, Py_None, Py_None};
        PyObject *out = Step_exit(self->tracker, exit_args, 3);
        Py_XDECREF(out);
        if (out == NULL || add_one(self->auto_, A_steps_recorded) < 0) goto error;
    }
    if (add_one(self->auto_, A_boundaries) < 0) goto error;
    if (!SC(self->tracker)->depth) {
        if ((r = attr_true(self->tracker, A__enabled)) < 0) goto error;
        if (r) {
            PyObject *out = Step_enter(self->tracker, NULL);
            Py_XDECREF(out);
            if (out == NULL || SA(self->auto_, A__open, Py_True) < 0) goto error;
        }
    }
    Py_RETURN_NONE;
none_or_full:
    if (r == 0) Py_RETURN_NONE;
full_or_error:
    if (r >= 0) goto full;
error:
    PyErr_Clear(); /* the Python hook decides (and fails open) */
full:
    return PyObject_Vectorcall(self->full, args, nargsf, kwnames);
}

static int AutoHook_init(AutoHookObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"auto", "kind", "full", NULL};
    PyObject *auto_, *full, *tracker, *clock;
    int kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OiO", kwlist, &auto_, &kind, &full)) return -1;
    if ((tracker = PyObject_GetAttrString(auto_, "tracker")) == NULL) return -1;
    if ((clock = PyObject_GetAttrString(auto_, "clock")) == NULL) {
        Py_DECREF(tracker);
        return -1;
    }
    if (!PyObject_TypeCheck(tracker, &StepContextType) || !PyObject_TypeCheck(clock, &ClockCoreType)) {
        Py_DECREF(tracker);
        Py_DECREF(clock);
        PyErr_SetString(PyExc_TypeError, "traceml: AutoHook needs the C StepTracker and PhaseClock");
        return -1;
    }
    Py_INCREF(auto_);
    Py_XSETREF(self->auto_, auto_);
    Py_XSETREF(self->tracker, tracker);
    Py_XSETREF(self->clock, clock);
    Py_INCREF(full);
    Py_XSETREF(self->full, full);
    self->kind = kind;
    self->vectorcall = (vectorcallfunc)AutoHook_call;
    return 0;
}

static int AutoHook_traverse(AutoHookObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->auto_);
    Py_VISIT(self->tracker);
    Py_VISIT(self->clock);
    Py_VISIT(self->full);
    return 0;
}

static int AutoHook_clear(AutoHookObject *self) {
    Py_CLEAR(self->auto_);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->full);
    return 0;
}

static void AutoHook_dealloc(AutoHookObject *self) {
    PyObject_GC_UnTrack(self);
    AutoHook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject AutoHookType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.AutoHook",
    .tp_doc = "AutoHook(auto, 0|1, full): zero-code steps' optimizer pre- (0) or post-hook (1), steady state in C.",
    .tp_basicsize = sizeof(AutoHookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)AutoHook_init,
    .tp_dealloc = (destructor)AutoHook_dealloc,
    .tp_traverse = (traverseproc)AutoHook_traverse,
    .tp_clear = (inquiry)AutoHook_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(AutoHookObject, vectorcall),
};

/* ==== StepEntry: traceml.trace_step's common case ======================================== *
 * `traceml.trace_step(model)` on every step after the first returns the agent's tracker (api.py's
 * reference says when).  That one Python frame cost ~1.7 µs per step in the real loop, cold.
 * api.py arms the entry with (tracker, model) once its own fast case holds; the entry then returns
 * the tracker for `trace_step()` and `trace_step(model)` of that model (checked through a weak
 * reference: another object at a dead model's address is not that model) and calls the reference
 * for anything else.  init(), shutdown() and a forked child disarm it. */
typedef struct {
    PyObject_HEAD
    PyObject *fn;      /* api._trace_step, the reference */
    PyObject *tracker; /* NULL: disarmed */
    PyObject *model;   /* a weak reference to the armed model, or NULL: trace_step() only */
    PyObject *dict;
    vectorcallfunc vectorcall;
} StepEntryObject;

static PyObject *StepEntry_call(StepEntryObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *tracker = self->tracker;
    if (tracker != NULL && kwnames == NULL && nargs <= 1) {
        PyObject *model = nargs ? args[0] : Py_None;
        if (model == Py_None || (self->model != NULL && weakref_is(self->model, model))) {
            Py_INCREF(tracker);
            return tracker;
        }
    }
    if (self->fn == NULL) {
        PyErr_SetString(PyExc_TypeError, "traceml: trace_step entry not initialised");
        return NULL;
    }
    return PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
}

static int StepEntry_init(StepEntryObject *self, PyObject *args, PyObject *kwds) {
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "O:StepEntry", &fn)) return -1;
    Py_INCREF(fn);
    Py_XSETREF(self->fn, fn);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->model);
    self->vectorcall = (vectorcallfunc)StepEntry_call;
    return 0;
}

static PyObject *StepEntry_arm(StepEntryObject *self, PyObject *args) {
    PyObject *tracker, *model, *ref = NULL;
    if (!PyArg_ParseTuple(args, "OO:arm", &tracker, &model)) return NULL;
    if (model != Py_None) {
        ref = PyWeakref_NewRef(model, NULL);
        if (ref == NULL) { /* not weak-referenceable: trace_step() only */
            PyErr_Clear();
        }
    }
    Py_INCREF(tracker);
    Py_XSETREF(self->tracker, tracker);
    Py_XSETREF(self->model, ref);
    Py_RETURN_NONE;
}

static PyObject *StepEntry_disarm(StepEntryObject *self, PyObject *unused) {
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->model);
    Py_RETURN_NONE;
}

static PyObject *StepEntry_get_armed(StepEntryObject *self, void *unused) { return PyBool_FromLong(self->tracker != NULL); }

static int StepEntry_traverse(StepEntryObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->fn);
    Py_VISIT(self->tracker);
    Py_VISIT(self->model);
    Py_VISIT(self->dict);
    return 0;
}

static int StepEntry_clear(StepEntryObject *self) {
    Py_CLEAR(self->fn);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->model);
    Py_CLEAR(self->dict);
    return 0;
}

static void StepEntry_dealloc(StepEntryObject *self) {
    PyObject_GC_UnTrack(self);
    StepEntry_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef StepEntry_methods[] = {
    {"arm", (PyCFunction)StepEntry_arm, METH_VARARGS, "arm(tracker, model): return tracker for that model (or none)."},
    {"disarm", (PyCFunction)StepEntry_disarm, METH_NOARGS, "Every call goes to the reference again."},
    {NULL},
};

static PyGetSetDef StepEntry_getset[] = {
    {"armed", (getter)StepEntry_get_armed, NULL, "the common case runs here", NULL},
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject StepEntryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "traceml.runtime._fastclock.StepEntry",
    .tp_basicsize = sizeof(StepEntryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "StepEntry(fn): traceml.trace_step with its common case in C (see api.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)StepEntry_init,
    .tp_dealloc = (destructor)StepEntry_dealloc,
    .tp_traverse = (traverseproc)StepEntry_traverse,
    .tp_clear = (inquiry)StepEntry_clear,
    .tp_methods = StepEntry_methods,
    .tp_getset = StepEntry_getset,
    .tp_dictoffset = offsetof(StepEntryObject, dict),
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(StepEntryObject, vectorcall),
};

static PyObject *mod_now_ns(PyObject *m, PyObject *unused) { return PyLong_FromLongLong(now_ns()); }

static PyMethodDef module_methods[] = {
    {"now_ns", mod_now_ns, METH_NOARGS, "clock_gettime(CLOCK_MONOTONIC) in ns (time.perf_counter_ns on Linux)."},
    {NULL},
};

static struct PyModuleDef fastclock_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "traceml.runtime._fastclock",
    .m_doc = "The optional C fast path of traceml's phase clock (see traceml/runtime/step.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                                     \
    do {                                                      \
        if ((var = PyUnicode_InternFromString(text)) == NULL) \
            return NULL;                                      \
    } while (0)

PyMODINIT_FUNC PyInit__fastclock(void) {
    INTERN(attr_name[A_gate], "gate");
    INTERN(attr_name[A_base], "base");
    INTERN(attr_name[A_owner], "owner");
    INTERN(attr_name[A__phase], "_phase");
    INTERN(attr_name[A_acc], "acc");
    INTERN(attr_name[A_first], "first");
    INTERN(attr_name[A_gpu], "gpu");
    INTERN(attr_name[A_carry], "carry");
    INTERN(attr_name[A_carry_first], "carry_first");
    INTERN(attr_name[A_train_src], "train_src");
    INTERN(attr_name[A_last_src], "last_src");
    INTERN(attr_name[A_train_seen], "train_seen");
    INTERN(attr_name[A_fetched_in_step], "fetched_in_step");
    INTERN(attr_name[A_opt_depth], "opt_depth");
    INTERN(attr_name[A_opt_t0], "opt_t0");
    INTERN(attr_name[A_other], "other");
    INTERN(attr_name[A_add_carried], "add_carried");
    INTERN(attr_name[A__dataset], "_dataset");
    INTERN(attr_name[A_depth], "depth");
    INTERN(attr_name[A__rare], "_rare");
    INTERN(attr_name[A_clock], "clock");
    INTERN(attr_name[A_pending], "pending");
    INTERN(attr_name[A_t0], "t0");
    INTERN(attr_name[A_step], "step");
    INTERN(attr_name[A__slow_at], "_slow_at");
    INTERN(attr_name[A_step_table], "step_table");
    INTERN(attr_name[A__rows], "_rows");
    INTERN(attr_name[A_appended], "appended");
    INTERN(attr_name[A__high_water], "_high_water");
    INTERN(attr_name[A_wake], "wake");
    INTERN(attr_name[A_append], "append");
    INTERN(attr_name[A__enter_full], "_enter_full");
    INTERN(attr_name[A__exit_full], "_exit_full");
    INTERN(attr_name[A__fail], "_fail");
    INTERN(attr_name[A__memory], "_memory");
    INTERN(attr_name[A_active], "active");
    INTERN(attr_name[A__open], "_open");
    INTERN(attr_name[A__last_pre], "_last_pre");
    INTERN(attr_name[A__new], "_new");
    INTERN(attr_name[A__closer], "_closer");
    INTERN(attr_name[A_steps_recorded], "steps_recorded");
    INTERN(attr_name[A_boundaries], "boundaries");
    INTERN(attr_name[A__enabled], "_enabled");
    if ((k_zero = PyLong_FromLong(0)) == NULL || (k_one = PyLong_FromLong(1)) == NULL) return NULL;
    if (PyType_Ready(&TimedType) < 0 || PyType_Ready(&FetchType) < 0 || PyType_Ready(&OptHookType) < 0 ||
        PyType_Ready(&StepContextType) < 0 || PyType_Ready(&ClockCoreType) < 0 ||
        PyType_Ready(&PhaseArrayType) < 0 || PyType_Ready(&AutoHookType) < 0 ||
        PyType_Ready(&StepEntryType) < 0 || PyType_Ready(&StatmCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastclock_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Timed", (PyObject *)&TimedType) < 0 ||
        PyModule_AddObjectRef(m, "Fetch", (PyObject *)&FetchType) < 0 ||
        PyModule_AddObjectRef(m, "OptimizerHook", (PyObject *)&OptHookType) < 0 ||
        PyModule_AddObjectRef(m, "StepContext", (PyObject *)&StepContextType) < 0 ||
        PyModule_AddObjectRef(m, "ClockCore", (PyObject *)&ClockCoreType) < 0 ||
        PyModule_AddObjectRef(m, "AutoHook", (PyObject *)&AutoHookType) < 0 ||
        PyModule_AddObjectRef(m, "StepEntry", (PyObject *)&StepEntryType) < 0 ||
        PyModule_AddObjectRef(m, "StatmCore", (PyObject *)&StatmCoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *sampling = Py_BuildValue("(iiii)", SAMPLE_EVERY, SAMPLE_WARM, SAMPLE_EVERY_LATER, SAMPLE_OFFSET);
    if (sampling == NULL || PyModule_AddObjectRef(m, "SAMPLING", sampling) < 0) {
        Py_XDECREF(sampling);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(sampling);
    /* steprows.py's YIELD_EVERY and YIELD_S (in ns): step.py checks them as it checks SAMPLING */
    PyObject *yield = Py_BuildValue("(ii)", YIELD_EVERY, YIELD_NS);
    if (yield == NULL || PyModule_AddObjectRef(m, "YIELD", yield) < 0) {
        Py_XDECREF(yield);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(yield);
    /* hostmem.py's WARM_STEPS, MIN_GAP_NS and MAX_EVERY: it uses StatmCore only when they match */
    PyObject *statm = Py_BuildValue("(iLi)", STATM_WARM_STEPS, STATM_MIN_GAP_NS, STATM_MAX_EVERY);
    if (statm == NULL || PyModule_AddObjectRef(m, "STATM", statm) < 0) {
        Py_XDECREF(statm);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(statm);
    return m;
}
