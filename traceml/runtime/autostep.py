"""Zero-code steps: the optimizer marks the step boundaries of a script that never calls ``trace_step``.

An explicit ``trace_step`` always wins (turns this off for the run); every hook is in the patch registry.
Imports torch: loaded from the agent's torch-import callback.  Rules: docs/internals.md, "Rank runtime".
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from traceml.runtime import patches
from traceml.runtime._failopen import disable_piece
from traceml.runtime.hooks import TimedForward
from traceml.runtime.step import (
    BACKWARD,
    DATALOADER,
    FAST,
    FORWARD,
    H2D,
    NO_PHASE,
    STEP,
    PhaseClock,
    StepTracker,
)

_perf_ns = time.perf_counter_ns
_get_ident = threading.get_ident
_grad_enabled = torch.is_grad_enabled
#: inside a torch.compile trace the global forward hooks are traced too: they must do nothing there
_is_compiling = torch.compiler.is_compiling

#: calling frames whose locals are searched for the optimizer's model before the gc scan
FRAME_DEPTH = 12
#: modules looked at among those locals (and one attribute level below them)
MAX_CANDIDATES = 256
#: top-level modules timed as the forward phase per optimizer
MAX_MODELS = 8
#: module calls without autograd (or without trainable parameters) before the first-forward
#: hooks give up (an inference-only script pays for them no longer)
FIRST_FORWARD_TRIES = 10_000


class AutoForward(TimedForward):
    """Instance-level ``forward`` wrapper of a module the optimizer trains.

    Times the outermost grad-enabled call as FORWARD (the timing is :class:`TimedForward`'s);
    a call without autograd (evaluation) is not timed and, before any training work of the
    step, moves the step's start past it.  Pickles as the plain method, like its base.
    """

    __slots__ = ("_auto",)

    def __init__(self, auto: AutoSteps, fn: Any, model: Any) -> None:
        super().__init__(auto.clock, fn, model)
        self._auto = auto
        if FAST is not None:  # the same rule in C (``Timed._set_grad_check``)
            self._set_grad_check(_grad_enabled, auto.after_eval_forward)  # type: ignore[attr-defined]

    if FAST is None:

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            c = self._clock
            g = c.gate  # one integer read while nothing is timed (see PhaseClock.gate)
            if not g & STEP or _get_ident() != c.owner:
                return self._fn(*args, **kwargs)
            if not _grad_enabled():
                try:
                    return self._fn(*args, **kwargs)
                finally:
                    self._auto.after_eval_forward()
            return TimedForward.__call__(self, *args, **kwargs)


class AutoSteps:
    """The automatic step boundaries of one agent (see the module docstring).

    ``on_model(module)`` is told the first model found (the agent decides on GPU timing and
    the wrapper kind from it).
    """

    # slots: the C hooks (_fastclock.AutoHook) read and write the steady state's fields at their offsets
    __slots__ = (
        "clock",
        "tracker",
        "on_model",
        "active",
        "names",
        "steps_recorded",
        "windows_discarded",
        "models",
        "_open",
        "_seen",
        "_closer",
        "_new",
        "_last_pre",
        "_wrapped",
        "boundaries",
        "_scaler_seen",
        "_first_hooks",
        "_first_root",
        "_first_t0",
        "_first_misses",
        "_first_step",
        "_others",
        "__weakref__",
    )

    def __init__(self, clock: PhaseClock, tracker: StepTracker, on_model: Callable[[Any], None] | None = None) -> None:
        self.clock = clock
        self.tracker = tracker
        self.on_model = on_model
        #: False once an explicit step took over, or after a failure
        self.active = True
        self.names: list[str] = []
        self.steps_recorded = 0
        self.windows_discarded = 0
        self.models: list[str] = []
        self._open = False
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closer: weakref.ref[Any] | None = None
        self._new: weakref.ref[Any] | None = None
        #: the optimizer the pre-hook saw last, already in _seen (spares a WeakSet lookup per step)
        self._last_pre: weakref.ref[Any] | None = None
        self._wrapped: set[int] = set()
        #: step boundaries so far (the GradScaler check compares against it)
        self.boundaries = 0
        self._scaler_seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._first_hooks: list[str] = []
        self._first_root: Any = None  # the module whose call opened the first step (its forward is timed)
        self._first_t0 = 0
        self._first_misses = 0
        self._first_step = False  # the open step began at the first training forward
        self._others = False  # the first optimizer's callers hold another optimizer

    # -- install / uninstall ---------------------------------------------------------------
    def install(self, tag: str = "") -> list[str]:
        """Register the optimizer hooks (after the agent's own, so the optimizer phase is
        accounted before a step closes).  Returns the registry names."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        suffix = f" [{tag}]" if tag else ""
        pre_hook: Any = self._pre
        post_hook: Any = self._post
        if FAST is not None:  # their steady state in C (_fastclock.AutoHook); the rest is these methods
            pre_hook, post_hook = FAST.AutoHook(self, 0, self._pre), FAST.AutoHook(self, 1, self._post)
        pre = register_optimizer_step_pre_hook(pre_hook)
        self.names.append(patches.register("auto-step optimizer pre-hook" + suffix, pre.remove))
        post = register_optimizer_step_post_hook(post_hook)
        self.names.append(patches.register("auto-step optimizer post-hook" + suffix, post.remove))
        try:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            fpre = register_module_forward_pre_hook(self._first_forward_pre)
            self._first_hooks.append(patches.register("auto-step first forward pre-hook" + suffix, fpre.remove))
            fpost = register_module_forward_hook(self._first_forward_post, always_call=True)
            self._first_hooks.append(patches.register("auto-step first forward hook" + suffix, fpost.remove))
            self.names.extend(self._first_hooks)
        except Exception:
            disable_piece("auto-steps-first", "recording the first iteration")
        scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
        update = getattr(scaler, "update", None)
        if update is not None:
            auto = self

            def traceml_update(scaler_self: Any, *args: Any, **kwargs: Any) -> Any:
                try:
                    return update(scaler_self, *args, **kwargs)
                finally:
                    auto._scaler_updated(scaler_self)

            traceml_update.__wrapped__ = update  # type: ignore[attr-defined]
            name = "auto-step GradScaler.update" + suffix
            self.names.append(patches.patch_attribute(scaler, "update", traceml_update, name))
        return list(self.names)

    def yield_to_explicit(self) -> None:
        """An explicit ``trace_step`` is about to run: drop the open step, stop for good."""
        if self.active:
            self.active = False
            self._discard()
        self.close()

    def close(self) -> None:
        """Undo every hook and forward wrapper (the open step, if any, is never recorded)."""
        self.active = False
        names, self.names = self.names, []
        for name in reversed(names):
            patches.undo(name)

    def _fail(self, what: str) -> None:
        self.active = False
        try:
            self._discard()
        except Exception:
            pass
        disable_piece("auto-steps", what)

    # -- the optimizer hooks -----------------------------------------------------------------
    def _pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        if not self.active:
            return
        try:
            c = self.clock
            if not self._open:
                c.owner = _get_ident()  # the thread that steps the optimizer is the training thread
            elif _get_ident() != c.owner:
                return
            if c.opt_depth > 1:
                return  # an optimizer stepped from inside another one's step
            last = self._last_pre
            if last is not None and last() is opt:
                return  # the optimizer of the last step (the steady state: no WeakSet lookup)
            if opt in self._seen:
                self._last_pre = weakref.ref(opt)
                return  # a known one
            self._seen.add(opt)
            self._new = weakref.ref(opt)
            if self._first_step and self._closer is None:
                self._others = _other_optimizer(opt, sys._getframe(1))
            self._adopt_models(opt)
        except Exception:
            self._fail("automatic step detection (optimizer pre-hook)")

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        if not self.active:
            return
        try:
            c = self.clock
            if _get_ident() != c.owner or c.opt_depth > 0:
                return
            new = self._new
            closer = self._closer
            if new is None and closer is not None and closer() is opt:
                # the steady state (_boundary and _begin inlined): the step ends, the next begins
                t = self.tracker
                if self._open:
                    self._open = False
                    t.__exit__(None, None, None)
                    self.steps_recorded += 1
                self.boundaries += 1
                if not t.depth and t._enabled:
                    t.__enter__()
                    self._open = True
                return
            if new is not None and new() is opt:
                # a new optimizer closes the iteration from now on; what ran before is not a whole
                # step, unless it is the first iteration, opened at its first forward
                self._new = None
                whole = self._first_step and self._closer is None and not self._others
                self._first_step = False
                self._closer = new
                if whole and self._open:
                    self._boundary()
                    return
                self._discard()
                self._begin(fresh=True)
                return
            closer = self._closer() if self._closer is not None else None
            if closer is None:
                self._closer = weakref.ref(opt)
            elif closer is not opt:
                return
            self._boundary()
        except Exception:
            self._fail("automatic step detection (optimizer post-hook)")

    def _boundary(self) -> None:
        """The open step ends now (a row) and the next one begins."""
        if self._open:
            self._open = False
            self.tracker.__exit__(None, None, None)
            self.steps_recorded += 1
        self.boundaries += 1
        self._begin(fresh=False)

    # -- the first iteration and GradScaler ----------------------------------------------------
    def _first_forward_pre(self, module: Any, args: Any) -> None:
        if _is_compiling() or self._first_root is not None:
            return  # inside the first forward
        try:
            if not self.active or self._open or self._closer is not None or self._new is not None:
                self._drop_first_hooks()
                return
            if not _grad_enabled() or not any(p.requires_grad for p in module.parameters()):
                self._first_misses += 1
                if self._first_misses > FIRST_FORWARD_TRIES:
                    self._drop_first_hooks()  # no training forward in sight: stop looking
                return
            c = self.clock
            c.owner = _get_ident()
            self._begin(fresh=False)
            if not self._open:
                self._drop_first_hooks()  # an explicit step is open: not ours to start
                return
            self._first_step = True
            self._first_root = module
            c._phase = FORWARD
            c.gate = 0
            self._first_t0 = _perf_ns()
        except Exception:
            self._drop_first_hooks()
            disable_piece("auto-steps-first", "recording the first iteration")

    def _first_forward_post(self, module: Any, args: Any, output: Any) -> None:
        if _is_compiling() or module is not self._first_root:
            return
        t1 = _perf_ns()
        self._first_root = None
        try:
            c = self.clock
            c.acc[FORWARD] += t1 - self._first_t0
            if not c.first[FORWARD]:
                c.first[FORWARD] = self._first_t0
            c._phase = NO_PHASE
            c.gate = c.base
        finally:
            self._drop_first_hooks()

    def _drop_first_hooks(self) -> None:
        names, self._first_hooks = self._first_hooks, []
        for name in names:
            patches.undo(name)
            if name in self.names:
                self.names.remove(name)

    def _scaler_updated(self, scaler: Any) -> None:
        """``scaler.update()`` returned: no boundary since its last update means the step was
        skipped (inf/nan gradients, no ``optimizer.step()``): it ends here all the same."""
        if not self.active or _get_ident() != self.clock.owner:
            return
        try:
            last = self._scaler_seen.get(scaler)
            self._scaler_seen[scaler] = self.boundaries
            if last != self.boundaries or not self._open or self._closer is None or self._new is not None:
                return
            self._boundary()
            self._scaler_seen[scaler] = self.boundaries
        except Exception:
            self._fail("automatic step detection (GradScaler.update)")

    # -- the open step -----------------------------------------------------------------------
    def _begin(self, fresh: bool) -> None:
        t = self.tracker
        if t.depth or not t.enabled:
            return
        if fresh:
            self._forget_carried()
        t.__enter__()
        self._open = True

    def _discard(self) -> None:
        """Close the open step without a row (its time is forgotten)."""
        if not self._open:
            return
        self._open = False
        t = self.tracker
        enabled = t.enabled
        t.enabled = False
        try:
            t.__exit__(None, None, None)
        finally:
            t.enabled = enabled
        self._forget_carried()
        t.regions.clear()
        self.windows_discarded += 1

    def _forget_carried(self) -> None:
        c = self.clock
        if c.phase == NO_PHASE:
            acc = c.acc
            acc[DATALOADER] = acc[H2D] = 0
            c.forget_carried()
            _recycle_gpu_pairs(c)

    def after_eval_forward(self) -> None:
        """An evaluation forward just ended: before any training work, the step starts now."""
        if not self._open or not self.active:
            return
        c = self.clock
        acc = c.acc
        if acc[FORWARD] or acc[BACKWARD] or c.phase != NO_PHASE:
            return
        try:
            acc[DATALOADER] = acc[H2D] = 0
            c.first[DATALOADER] = c.first[H2D] = 0
            self.tracker.regions.clear()
            self.tracker.t0 = _perf_ns()
            _recycle_gpu_pairs(c)
        except Exception:
            self._fail("excluding an evaluation pass from the automatic step")

    # -- finding the model -------------------------------------------------------------------
    def _adopt_models(self, opt: Any) -> None:
        ids = {id(p) for group in getattr(opt, "param_groups", ()) for p in group.get("params", ())}
        if not ids:
            return
        roots = find_models(ids)
        for model in roots[:MAX_MODELS]:
            if id(model) in self._wrapped:
                continue
            name = self._wrap(model)
            if name is not None:
                self._wrapped.add(id(model))
                self.models.append(type(model).__name__)
        if roots and self.on_model is not None:
            self.on_model(roots[0])

    def _wrap(self, model: Any) -> str | None:
        try:
            d = vars(model)
        except TypeError:
            return None
        attr = "_compiled_call_impl" if d.get("_compiled_call_impl") is not None else "forward"
        current = d.get(attr)
        if isinstance(current, AutoForward):
            return None
        had_own = attr in d
        fn = current if had_own else getattr(model, attr)
        wrapper = AutoForward(self, fn, model)
        name = f"auto-step forward of {type(model).__name__}#{id(model):x}"
        ref = weakref.ref(model)
        model_id = id(model)

        def restore() -> None:
            finalizer.detach()
            self._wrapped.discard(model_id)
            m = ref()
            if m is None:
                return
            md = vars(m)
            if md.get(attr) is wrapper:
                if had_own:
                    md[attr] = fn
                else:
                    del md[attr]

        d[attr] = wrapper
        finalizer = weakref.finalize(model, patches.undo, name)
        finalizer.atexit = False
        patches.register(name, restore)
        self.names.append(name)
        return name


def _recycle_gpu_pairs(clock: PhaseClock) -> None:
    """Drop the CUDA event pairs of time that no longer counts (back to the timer's pool)."""
    gpu = clock.gpu
    pairs = getattr(gpu, "_pairs", None) if gpu is not None else None
    if not isinstance(pairs, list) or not pairs:
        return
    pool = getattr(gpu, "_pool", None)
    for pair in pairs:
        if pool is not None:
            pool.append(pair[1])
            pool.append(pair[2])
    del pairs[:]


def _other_optimizer(opt: Any, start: Any) -> bool:
    """Whether the calling frames' locals (or their attributes) hold an optimizer besides ``opt``."""
    optimizer = torch.optim.Optimizer
    frame, depth = start, 0
    while frame is not None and depth < FRAME_DEPTH:
        try:
            for value in list(frame.f_locals.values())[:MAX_CANDIDATES]:
                if isinstance(value, optimizer):
                    if value is not opt:
                        return True
                elif not isinstance(value, type | int | float | str | bytes | torch.Tensor):
                    try:
                        attrs = list(vars(value).values())[:64]
                    except TypeError:
                        continue
                    if any(isinstance(a, optimizer) and a is not opt for a in attrs):
                        return True
        except Exception:
            pass
        frame = frame.f_back
        depth += 1
    return False


def _holds(module: torch.nn.Module, ids: set[int]) -> bool:
    return any(id(p) in ids for p in module.parameters())


def _candidates_from_frames(start: Any) -> list[torch.nn.Module]:
    found: dict[int, torch.nn.Module] = {}
    frame = start
    depth = 0
    module_type = torch.nn.Module

    def consider(values: Iterable[Any], deeper: bool) -> None:
        for value in values:
            if len(found) >= MAX_CANDIDATES:
                return
            if issubclass(type(value), module_type):
                found.setdefault(id(value), value)
            elif deeper and not isinstance(value, type | int | float | str | bytes):
                try:
                    attrs = vars(value)
                except TypeError:
                    continue
                consider(list(attrs.values())[:64], False)

    while frame is not None and depth < FRAME_DEPTH:
        try:
            consider(list(frame.f_locals.values()), True)
        except Exception:
            pass
        frame = frame.f_back
        depth += 1
    return list(found.values())


def _roots(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules that are not a submodule of another one in the list."""
    inner: set[int] = set()
    for m in modules:
        for sub in m.modules():
            if sub is not m:
                inner.add(id(sub))
    return [m for m in modules if id(m) not in inner]


def find_models(param_ids: set[int], frame: Any = None) -> list[torch.nn.Module]:
    """The top-level modules holding any of ``param_ids``: from the calling frames' locals,
    else from one scan of the garbage collector's objects."""
    start = frame if frame is not None else sys._getframe(1)
    holders = [m for m in _candidates_from_frames(start) if _holds(m, param_ids)]
    if not holders:
        module_type = torch.nn.Module
        # type(), not isinstance(): a weak proxy or a deprecated-module shim answers __class__ itself
        everything = [o for o in gc.get_objects() if issubclass(type(o), module_type)]
        child_ids = {id(c) for m in everything for c in m._modules.values() if c is not None}
        holders = [m for m in everything if id(m) not in child_ids and _holds(m, param_ids)]
    return _roots(holders)
