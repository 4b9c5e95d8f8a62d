/* What _stacktimer.c reads from CPython's internal structures, in its own translation unit (reading
 * them needs Py_BUILD_CORE, which nothing else may see).  Each function has a public-API answer
 * elsewhere: -1 / NULL says "not here" (another Python, or the internal headers not installed).
 *  - where the main interpreter's eval breaker lives (Python 3.10-3.12);
 *  - the code objects of a thread's frames without making a frame object for each (3.11-3.12). */
#ifndef Py_BUILD_CORE
#define Py_BUILD_CORE 1
#endif
#include <Python.h>
#include <stddef.h>

#if PY_VERSION_HEX >= 0x030A0000 && PY_VERSION_HEX < 0x030D0000 && defined(__has_include)
#if __has_include("internal/pycore_interp.h")
#include "internal/pycore_interp.h"
#define TRACEML_HAVE_BREAKER 1
#endif
#endif

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000 && defined(__has_include)
#if __has_include("internal/pycore_frame.h")
#include "internal/pycore_frame.h"
#define TRACEML_HAVE_FRAMES 1
#endif
#endif

long traceml_eval_breaker_offset(void) {
#ifdef TRACEML_HAVE_BREAKER
    return (long)offsetof(PyInterpreterState, ceval.eval_breaker);
#else
    return -1;
#endif
}

/* Up to `max` code objects of `tstate`'s frames, innermost first, as borrowed references (valid while
 * the caller holds the GIL and runs no Python code); -1 where this Python has no such walk. */
int traceml_frame_codes(PyThreadState *tstate, PyObject **out, int max) {
#ifdef TRACEML_HAVE_FRAMES
    int n = 0;
    for (_PyInterpreterFrame *f = tstate->cframe->current_frame; f != NULL && n < max; f = f->previous)
        if (!_PyFrame_IsIncomplete(f)) out[n++] = (PyObject *)f->f_code;
    return n;
#else
    (void)tstate;
    (void)out;
    (void)max;
    return -1;
#endif
}
