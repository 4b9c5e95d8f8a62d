"""The torch patches that time each phase of a step; every one registered in :mod:`.patches`.

Imports torch: only loaded once the script has imported it.  What each phase patches: docs/internals.md.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

from traceml.runtime import patches
from traceml.runtime._failopen import disable_piece
from traceml.runtime.step import (
    BACKWARD,
    CARRY,
    DATALOADER,
    FAST,
    FORWARD,
    H2D,
    NO_PHASE,
    OPTIMIZER,
    SAMPLE,
    STEP,
    PhaseClock,
)
from traceml.runtime.timed import timed, timed_carried

_perf_ns = time.perf_counter_ns
_get_ident = threading.get_ident


def install_torch_hooks(clock: PhaseClock, h2d: bool | None = None, tag: str = "") -> list[str]:
    """Install the global patches for ``clock``; returns their registry names.

    ``h2d``: None = only when ``torch.cuda.is_available()``; True/False forces it.
    Each piece that fails to install is logged once and skipped (fail-open).
    """
    names: list[str] = []
    suffix = f" [{tag}]" if tag else ""
    for piece, what, install in (
        ("patch-dataloader", "the DataLoader wait patch", install_dataloader),
        ("patch-backward", "the backward patch", install_backward),
        ("patch-optimizer", "the optimizer step hooks", install_optimizer),
    ):
        try:
            names.extend(install(clock, suffix))
        except Exception:
            disable_piece(piece, what)
    if h2d is None:
        h2d = bool(torch.cuda.is_available())
    if h2d:
        try:
            names.extend(install_h2d(clock, suffix))
        except Exception:
            disable_piece("patch-h2d", "the host-to-device copy patch")
    return names


def _loader_source(it: Any) -> int:
    """Which loader an iterator fetches from: its dataset (the same across epochs' iterators)."""
    try:
        return id(it._dataset)
    except AttributeError:
        return id(type(it))


def install_dataloader(clock: PhaseClock, suffix: str = "") -> list[str]:
    from torch.utils.data import dataloader

    base = dataloader._BaseDataLoaderIter
    wrapper = _fetch_wrapper(clock, base.__next__)
    return [patches.patch_attribute(base, "__next__", wrapper, "DataLoader.__next__" + suffix)]


def _fetch_wrapper(clock: PhaseClock, fn: Any) -> Any:
    """``__next__`` of DataLoader iterators: a fetch between steps from the training loader is
    carried inline (one frame: the loader read without a ``source`` call); every other case
    (inside a step, another loader, a failure; in pure Python also a fetch before a sampled step)
    is :func:`timed_carried`'s.  The C path also times the fetch before a sampled step, whose own
    time then counts in that step's cost, so that a sampled step costs what the others do."""
    full = timed_carried(clock, DATALOADER, fn, source=_loader_source, gpu=False)
    if FAST is not None:
        fast = FAST.Fetch(clock, DATALOADER, fn, full)  # the same fast path in C
        fast.__name__ = getattr(fn, "__name__", "traceml_fetch")
        fast.__doc__ = getattr(fn, "__doc__", None)
        return fast

    def traceml_fetch(it: Any, *args: Any, **kwargs: Any) -> Any:
        c = clock
        if c.gate != CARRY or _get_ident() != c.owner:  # in a step, sampled, off, a phase open, a thread
            return full(it, *args, **kwargs)
        c._phase = DATALOADER
        c.gate = 0
        t0 = _perf_ns()
        try:
            out = fn(it, *args, **kwargs)
        except BaseException:  # StopIteration at the end of an epoch too: not counted
            c._phase = NO_PHASE
            c.gate = c.base
            raise
        t1 = _perf_ns()
        c._phase = NO_PHASE
        c.gate = c.base
        try:
            src = id(it._dataset)
        except AttributeError:
            src = id(type(it))
        c.last_src = src
        if src == c.train_src:
            c.train_seen = True
            carry = c.carry
            if not carry[DATALOADER]:
                c.carry_first[DATALOADER] = t0
            carry[DATALOADER] += t1 - t0
        else:
            c.add_carried(DATALOADER, src, t0, t1 - t0)
        return out

    traceml_fetch.__wrapped__ = fn  # type: ignore[attr-defined]
    traceml_fetch.__name__ = getattr(fn, "__name__", "traceml_fetch")
    traceml_fetch.__doc__ = getattr(fn, "__doc__", None)
    return traceml_fetch


def install_backward(clock: PhaseClock, suffix: str = "") -> list[str]:
    wrapper = timed(clock, BACKWARD, torch.autograd.backward)
    return [patches.patch_attribute(torch.autograd, "backward", wrapper, "torch.autograd.backward" + suffix)]


def install_optimizer(clock: PhaseClock, suffix: str = "") -> list[str]:
    return _install_optimizer_hooks(clock, suffix)


def install_h2d(clock: PhaseClock, suffix: str = "") -> list[str]:
    names = [patches.patch_attribute(torch.Tensor, "to", _h2d_wrapper(clock, torch.Tensor.to), "Tensor.to" + suffix)]
    names.append(
        patches.patch_attribute(torch.Tensor, "cuda", _h2d_wrapper(clock, torch.Tensor.cuda), "Tensor.cuda" + suffix)
    )
    return names


def _install_optimizer_hooks(clock: PhaseClock, suffix: str) -> list[str]:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    pre, post = optimizer_hooks(clock)
    pre_handle = register_optimizer_step_pre_hook(pre)
    post_handle = register_optimizer_step_post_hook(post)
    names = [patches.register("optimizer step pre-hook" + suffix, pre_handle.remove)]
    names.append(patches.register("optimizer step post-hook" + suffix, post_handle.remove))
    return names


def optimizer_hooks(clock: PhaseClock) -> tuple[Any, Any]:
    """The optimizer step pre- and post-hook timing the optimizer phase (C when built)."""

    def pre(opt: Any, args: Any, kwargs: Any) -> None:
        c = clock
        if c.opt_depth:  # an optimizer wrapping another one steps it from inside its own step
            c.opt_depth += 1
            return None
        g = c.gate
        if not g & STEP or _get_ident() != c.owner:
            return None
        te = _perf_ns() if g & SAMPLE else 0
        c.opt_depth = 1
        c._phase = OPTIMIZER
        c.gate = 0
        gp = c.gpu
        if gp is not None:
            gp.begin(OPTIMIZER)
        t0 = c.opt_t0 = _perf_ns()
        f = c.first
        if not f[OPTIMIZER]:
            f[OPTIMIZER] = t0
        if te:
            c.self_ns += t0 - te
        return None

    def post(opt: Any, args: Any, kwargs: Any) -> None:
        c = clock
        if not c.opt_depth or _get_ident() != c.owner:
            return
        t1 = _perf_ns()
        c.opt_depth -= 1
        if c.opt_depth == 0 and c._phase == OPTIMIZER:
            c.acc[OPTIMIZER] += t1 - c.opt_t0
            c._phase = NO_PHASE
            c.gate = g = c.base
            gp = c.gpu
            if gp is not None:
                gp.end(OPTIMIZER)
            if g & SAMPLE:
                c.self_ns += _perf_ns() - t1

    if FAST is not None:  # the common case in C, sampled steps and a GPU timer in pre/post
        return FAST.OptimizerHook(clock, 0, None, pre), FAST.OptimizerHook(clock, 1, None, post)
    return pre, post


def _h2d_wrapper(clock: PhaseClock, fn: Any) -> Any:
    is_compiling = torch.compiler.is_compiling
    tensor = torch.Tensor

    # only a host tensor landing on a device is a host-to-device copy (not a dtype cast)
    def is_copy(src: Any, out: Any) -> bool:
        return out is not src and isinstance(out, tensor) and src.device.type == "cpu" and out.device.type != "cpu"

    carried = timed_carried(clock, H2D, fn, source=None, accept=is_copy)

    def traceml_h2d(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if is_compiling() or not clock.gate:
            return fn(self, *args, **kwargs)
        return carried(self, *args, **kwargs)

    traceml_h2d.__wrapped__ = fn  # type: ignore[attr-defined]
    traceml_h2d.__name__ = fn.__name__
    traceml_h2d.__doc__ = fn.__doc__
    return traceml_h2d


# --- the traced model's forward ----------------------------------------------------------


if TYPE_CHECKING or FAST is None:
    _ForwardBase: type = object
else:
    _ForwardBase = FAST.Timed


class TimedForward(_ForwardBase):
    """Instance-level wrapper stored in the model's ``__dict__``; pickles/deepcopies as the
    plain method so a saved or copied model carries no traceml state.  With the C fast path
    its base is ``_fastclock.Timed`` (``_fn``, ``_clock`` and the call in C, :meth:`_call_py`
    for sampled steps and a GPU timer)."""

    __slots__ = ("_fn", "_clock", "_model", "__weakref__") if FAST is None else ("_model",)
    _fn: Any
    _clock: PhaseClock
    if TYPE_CHECKING:

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def __init__(self, clock: PhaseClock, fn: Any, model: Any) -> None:
        if FAST is None:
            self._fn = fn
            self._clock = clock
        else:
            FAST.Timed.__init__(self, clock, FORWARD, fn, self._call_py)
        self._model = weakref.ref(model)

    def _call_py(self, *args: Any, **kwargs: Any) -> Any:
        c = self._clock
        g = c.gate
        if not g & STEP or _get_ident() != c.owner:
            return self._fn(*args, **kwargs)
        te = _perf_ns() if g & SAMPLE else 0
        c._phase = FORWARD
        c.gate = 0
        gp = c.gpu
        if gp is not None:
            gp.begin(FORWARD)
        t0 = _perf_ns()
        try:
            return self._fn(*args, **kwargs)
        finally:
            t1 = _perf_ns()
            c.acc[FORWARD] += t1 - t0
            f = c.first
            if not f[FORWARD]:
                f[FORWARD] = t0
            c._phase = NO_PHASE
            c.gate = c.base
            if gp is not None:
                gp.end(FORWARD)
            if te:
                c.self_ns += _perf_ns() - t1 + t0 - te

    def __reduce__(self) -> tuple[Any, ...]:
        model = self._model()
        return (getattr, (model, "forward")) if model is not None else (_identity_none, ())

    def __getattr__(self, name: str) -> Any:
        if name in ("_fn", "_clock", "_model", "_auto"):  # slots not set yet (also a subclass's)
            raise AttributeError(name)
        return getattr(self._fn, name)


if FAST is None:
    TimedForward.__call__ = TimedForward._call_py  # type: ignore[method-assign]


def _identity_none() -> None:
    return None


def wrapper_kind(model: Any) -> str:
    """``DDP`` / ``FSDP`` / ``FSDP2`` / ``none``, read from the traced model's wrapper class."""
    seen = 0
    while model is not None and seen < 4:
        seen += 1
        names = {cls.__name__ for cls in type(model).__mro__}
        if "DistributedDataParallel" in names:
            return "DDP"
        if "FullyShardedDataParallel" in names:
            return "FSDP"
        if "FSDPModule" in names:
            return "FSDP2"
        if "DeepSpeedEngine" in names:
            return "DeepSpeed"
        model = getattr(model, "_orig_mod", None)  # torch.compile'd: look inside
    return "none"


def wrap_forward(clock: PhaseClock, model: Any, tag: str = "") -> str | None:
    """Time the outermost call of ``model``; returns the patch name (None when not possible)."""
    try:
        d = vars(model)
    except TypeError:
        return None
    attr = "_compiled_call_impl" if d.get("_compiled_call_impl") is not None else "forward"
    current = d.get(attr)
    if type(current) is TimedForward and current._clock is clock:  # not AutoForward: trace_step wins
        return None
    had_own = attr in d
    fn = current if had_own else getattr(model, attr)
    wrapper = TimedForward(clock, fn, model)
    name = f"forward of {type(model).__name__}#{id(model):x}" + (f" [{tag}]" if tag else "")
    ref = weakref.ref(model)

    def restore() -> None:
        finalizer.detach()
        m = ref()
        if m is None:
            return
        md = vars(m)
        if md.get(attr) is wrapper:
            if had_own:
                md[attr] = fn
            else:
                del md[attr]

    try:
        d[attr] = wrapper
    except Exception:
        disable_piece("patch-forward", "the forward timing wrapper")
        return None
    # a model collected while traced takes its registry entry with it
    finalizer = weakref.finalize(model, patches.undo, name)
    finalizer.atexit = False
    patches.register(name, restore)
    return name
