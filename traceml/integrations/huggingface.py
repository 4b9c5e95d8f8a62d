"""Hugging Face ``transformers.Trainer``: one traced step per optimizer step (``TraceMLCallback``, ``TraceMLTrainer``).

Evaluation and prediction never count towards a step.  Importing this module imports ``transformers``
(MissingDependencyError with the install hint when missing).  Step rules: docs/internals.md, "Integrations".
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from traceml.errors import MissingDependencyError
from traceml.integrations._bridge import StepDriver
from traceml.runtime import patches

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingDependencyError(
        "traceml.integrations.huggingface needs the Hugging Face extra (transformers and accelerate); "
        f"importing transformers failed ({exc}).  Install it with: pip install 'traceml-recorder[hf]'"
    ) from exc

__all__ = ["TraceMLCallback", "TraceMLTrainer", "attach"]

#: the module-level name Accelerate's DataLoaderShard calls to move a batch to the device
_SEND_TO_DEVICE_MODULE = "accelerate.data_loader"
_SEND_TO_DEVICE_PATCH = "accelerate.data_loader.send_to_device [traceml huggingface]"


class TraceMLCallback(TrainerCallback):  # type: ignore[misc]
    """Traces every optimizer step of the Trainer it is added to.

    ``trainer`` (optional) lets the step see the model the Trainer really calls
    (``trainer.model_wrapped``: DDP/FSDP-wrapped); without it the callback's ``model``
    argument is used.
    """

    def __init__(self, trainer: Any = None) -> None:
        super().__init__()
        self.driver = StepDriver("huggingface")
        self._trainer: Any = None
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)

    def _model(self, model: Any) -> Any:
        trainer = self._trainer() if self._trainer is not None else None
        wrapped = getattr(trainer, "model_wrapped", None) if trainer is not None else None
        return wrapped if wrapped is not None else model

    # -- training ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.driver.discard()
        self.driver.prepare(self._model(model))
        self.driver.reset_carried()
        self._time_device_copies()

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.driver.begin(self._model(model))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.end()
        self.driver.mark()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.discard()  # stopped inside an accumulation window: not an optimizer step
        self.driver.unpatch_all()

    # -- evaluation: never part of a training step -----------------------------------------
    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.rewind()

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self.driver.rewind()

    # -- failure ---------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Close the open step as failed (the training loop is unwinding with ``exc``)."""
        self.driver.end(exc)
        self.driver.unpatch_all()

    def _time_device_copies(self) -> None:
        """Time Accelerate's ``send_to_device`` (the batch's trip to the device, made while
        the batch is fetched, before the step) as host-to-device."""
        module = sys.modules.get(_SEND_TO_DEVICE_MODULE)
        fn = getattr(module, "send_to_device", None) if module is not None else None
        if fn is None or patches.is_active(_SEND_TO_DEVICE_PATCH):
            return
        timed = self.driver.timed_h2d(fn)
        if timed is not None:
            self.driver.patch(module, "send_to_device", timed, _SEND_TO_DEVICE_PATCH)


def find_callback(trainer: Any) -> TraceMLCallback | None:
    """The TraceMLCallback attached to ``trainer``, if any."""
    handler = getattr(trainer, "callback_handler", None)
    for cb in getattr(handler, "callbacks", ()) or ():
        if isinstance(cb, TraceMLCallback):
            return cb
    return None


def attach(trainer: Any) -> TraceMLCallback:
    """Attach a :class:`TraceMLCallback` to ``trainer`` unless it has one; returns it."""
    cb = find_callback(trainer)
    if cb is None:
        cb = TraceMLCallback(trainer)
        trainer.add_callback(cb)
    elif cb._trainer is None:
        cb.bind(trainer)
    return cb


class TraceMLTrainer(Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` with TraceML: every optimizer step traced, evaluation excluded,
    a step interrupted by an exception recorded as failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traceml_callback = attach(self)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        except BaseException as exc:
            self.traceml_callback.fail(exc)
            raise

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        with self.traceml_callback.driver.excluded():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self.traceml_callback.driver.excluded():
            return super().predict(*args, **kwargs)
