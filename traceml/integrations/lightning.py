"""PyTorch Lightning: one traced step per optimizer step, for ``lightning`` and ``pytorch_lightning``.

Validation and the sanity check never count towards a step.  Importing this module imports no Lightning
package; ``TraceMLCallback`` imports one.  Step rules: docs/internals.md, "Integrations".
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from traceml.errors import MissingDependencyError
from traceml.integrations._bridge import StepDriver

__all__ = ["TraceMLLightningCallback", "callback_class", "find_callback", "with_callback"]  # + TraceMLCallback (lazy)

#: the Lightning packages, in order of preference
FLAVORS: tuple[str, ...] = ("lightning.pytorch", "pytorch_lightning")
_INSTALL_HINT = "pip install 'traceml-recorder[lightning]'"

_classes: dict[str, type] = {}


class TraceMLLightningCallback:
    """The hooks of :data:`TraceMLCallback`, shared by both Lightning packages' variants."""

    traceml_flavor = ""

    def __init__(self) -> None:
        super().__init__()
        self.driver = StepDriver("lightning")
        self._stepped = False

    # -- fit lifecycle -------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.discard()
        self.driver.reset_carried()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.prepare(pl_module)
        self.driver.reset_carried()  # the sanity check's fetches are not the first step's
        self._install(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.driver.discard()
        self.driver.unpatch_all()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.driver.end(exception)
        self.driver.unpatch_all()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.driver.discard()
        self.driver.unpatch_all()

    # -- steps ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.driver.is_open:
            self._stepped = False
            self.driver.begin(pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepped = True
        self.driver.resume_optimizer()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            self._stepped = False
            self.driver.end()
        self.driver.mark()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._stepped:
            self.driver.discard()  # the epoch ended inside a window that never stepped

    # -- evaluation: never part of a training step ------------------------------------------
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.driver.rewind()

    # -- the strategy's hooks we time ------------------------------------------------------
    def _install(self, trainer: Any) -> None:
        strategy = getattr(trainer, "strategy", None)
        if strategy is None:
            return
        tag = f"{type(strategy).__name__}#{id(strategy):x} [traceml lightning]"
        step = getattr(strategy, "training_step", None)
        if callable(step):

            def manual() -> bool:  # training_step runs backward and the optimizer itself
                module = getattr(trainer, "lightning_module", None)
                return module is not None and not getattr(module, "automatic_optimization", True)

            wrapped = self.driver.training_step(step, manual)
            self.driver.patch(strategy, "training_step", wrapped, f"training_step of {tag}")
        to_device = getattr(strategy, "batch_to_device", None)
        if callable(to_device):
            timed = self.driver.timed_h2d(to_device)
            if timed is not None:
                self.driver.patch(strategy, "batch_to_device", timed, f"batch_to_device of {tag}")


def _top_level(flavor: str) -> str:
    return flavor.split(".", 1)[0]


def _pick_flavor() -> str:
    imported = [f for f in FLAVORS if f in sys.modules or _top_level(f) in sys.modules]
    if "pytorch_lightning" in imported and not any(f.startswith("lightning") for f in imported):
        return "pytorch_lightning"
    if imported:
        return imported[0]
    for flavor in FLAVORS:
        if importlib.util.find_spec(_top_level(flavor)) is not None:
            return flavor
    raise MissingDependencyError(
        "traceml.integrations.lightning needs PyTorch Lightning; neither 'lightning' nor 'pytorch_lightning' "
        f"is installed.  Install it with: {_INSTALL_HINT}"
    )


def callback_class(flavor: str | None = None) -> type:
    """The TraceMLCallback class for ``flavor`` (``"lightning.pytorch"`` or ``"pytorch_lightning"``;
    default: the one the script imported, else the one installed)."""
    if flavor is None:
        flavor = _pick_flavor()
    if flavor not in FLAVORS:
        raise MissingDependencyError(f"unknown Lightning package {flavor!r}; expected one of {list(FLAVORS)}")
    cls = _classes.get(flavor)
    if cls is None:
        try:
            base = importlib.import_module(flavor).Callback
        except ImportError as exc:
            raise MissingDependencyError(
                f"traceml.integrations.lightning: importing {flavor} failed ({exc}).  Install it with: {_INSTALL_HINT}"
            ) from exc
        cls = type(
            "TraceMLCallback",
            (TraceMLLightningCallback, base),
            {
                "__module__": __name__,
                "__qualname__": "TraceMLCallback",
                "__doc__": f"TraceML's callback for {flavor}: one traced step per optimizer step.",
                "traceml_flavor": flavor,
            },
        )
        _classes[flavor] = cls
    return cls


def find_callback(callbacks: Any) -> TraceMLLightningCallback | None:
    """The TraceML callback among ``callbacks`` (a list, one callback, or None), if any."""
    if callbacks is None:
        return None
    items = [callbacks] if not isinstance(callbacks, list | tuple) else list(callbacks)
    for cb in items:
        if isinstance(cb, TraceMLLightningCallback):
            return cb
    return None


def with_callback(callbacks: Any, flavor: str) -> Any:
    """``callbacks`` (a Trainer argument: list, one callback, or None) plus a TraceMLCallback
    for ``flavor`` unless one is there already."""
    if find_callback(callbacks) is not None:
        return callbacks
    cb = callback_class(flavor)()
    if callbacks is None:
        return [cb]
    if isinstance(callbacks, list | tuple):
        return [*callbacks, cb]
    return [callbacks, cb]


def __getattr__(name: str) -> Any:
    if name == "TraceMLCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
