"""Zero-code integrations: under ``traceml run`` every Trainer gets the TraceML callback.

Every hook and patch is in the patch registry (undone by :func:`uninstall` and ``traceml.shutdown()``);
``TRACEML_NO_AUTO_INTEGRATIONS=1`` turns it all off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from traceml.config import rank_config_from_env
from traceml.integrations._bridge import adopt
from traceml.runtime import patches
from traceml.runtime._failopen import disable_piece
from traceml.runtime.importhook import call_after_import

TAG = "traceml auto-integration"

HF_TRAINER_MODULE = "transformers.trainer"
#: module that defines the Trainer -> the Lightning package (flavor) it belongs to
LIGHTNING_TRAINER_MODULES: dict[str, str] = {
    "lightning.pytorch.trainer.trainer": "lightning.pytorch",
    "pytorch_lightning.trainer.trainer": "pytorch_lightning",
}

_names: list[str] = []


def enabled(env: Any = None) -> bool:
    """Whether the configuration asks for auto-integrations (not disabled, not turned off)."""
    cfg = rank_config_from_env(env)
    return cfg.auto_integrations and not cfg.disabled


def install(force: bool = False) -> list[str]:
    """Attach TraceML to every HF / Lightning Trainer created from now on.

    Returns the registry names of what was installed (empty when turned off by
    ``TRACEML_NO_AUTO_INTEGRATIONS`` / ``TRACEML_DISABLED`` unless ``force``, or already
    installed).  A framework imported already is patched at once.
    """
    if installed() or not (force or enabled()):
        return []
    _names.clear()  # what traceml.shutdown() undid since
    targets: list[tuple[str, Callable[[ModuleType], None]]] = [(HF_TRAINER_MODULE, _patch_hf)]
    targets += [(m, functools.partial(_patch_lightning, flavor=f)) for m, f in LIGHTNING_TRAINER_MODULES.items()]
    for module_name, patch in targets:
        try:
            name = call_after_import(module_name, patch, tag=TAG)
        except Exception:
            disable_piece(f"autohook-{module_name}", f"the {module_name} import hook")
            continue
        if name is not None:
            _keep(name)
    return list(_names)


def uninstall() -> None:
    """Undo every hook and patch :func:`install` made (those still in place)."""
    names = list(_names)
    _names.clear()
    for name in reversed(names):
        patches.undo(name)


def installed() -> list[str]:
    """The registry names of the auto-integration hooks and patches in place now."""
    live = set(patches.active_patches())
    return [n for n in _names if n in live]


def _keep(name: str) -> None:
    _names.append(name)
    adopt(name)


def _patch_class_method(cls: type, attr: str, make: Callable[[Any], Any], label: str) -> None:
    name = f"{label} [{TAG}]"
    if patches.is_active(name):
        return
    original = getattr(cls, attr)
    replacement = functools.wraps(original)(make(original))
    _keep(patches.patch_attribute(cls, attr, replacement, name))


# -- Hugging Face -------------------------------------------------------------------------


def _patch_hf(module: ModuleType) -> None:
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        return

    def make_init(original: Any) -> Any:
        def traceml_init(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            try:
                from traceml.integrations import huggingface

                huggingface.attach(self)
            except Exception:
                disable_piece("autohook-hf-attach", "attaching TraceML to a transformers Trainer")

        return traceml_init

    def make_train(original: Any) -> Any:
        def traceml_train(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, *args, **kwargs)
            except BaseException as exc:
                try:
                    from traceml.integrations import huggingface

                    cb = huggingface.find_callback(self)
                    if cb is not None:
                        cb.fail(exc)
                except Exception:
                    disable_piece("autohook-hf-fail", "recording a failed transformers step")
                raise

        return traceml_train

    _patch_class_method(trainer_cls, "__init__", make_init, "transformers Trainer.__init__")
    _patch_class_method(trainer_cls, "train", make_train, "transformers Trainer.train")


# -- Lightning ----------------------------------------------------------------------------


def _patch_lightning(module: ModuleType, flavor: str) -> None:
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        return

    def make_init(original: Any) -> Any:
        def traceml_init(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                from traceml.integrations import lightning

                kwargs["callbacks"] = lightning.with_callback(kwargs.get("callbacks"), flavor)
            except Exception:
                disable_piece(f"autohook-{flavor}-attach", f"attaching TraceML to a {flavor} Trainer")
            original(self, *args, **kwargs)

        return traceml_init

    _patch_class_method(trainer_cls, "__init__", make_init, f"{flavor} Trainer.__init__")
