"""Run a callback right after the script imports a module (torch), without importing it first.

Registered in :mod:`.patches`; it removes itself after firing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from traceml.runtime import patches
from traceml.runtime._failopen import disable_piece


class _NotifyingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, callback: Callable[[ModuleType], None]) -> None:
        self._inner = inner
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        # put the real loader back first: torch must never see ours
        try:
            if module.__spec__ is not None:
                module.__spec__.loader = self._inner
            module.__loader__ = self._inner
        except Exception:
            pass
        self._inner.exec_module(module)
        try:
            self._callback(module)
        except Exception:
            disable_piece("import-hook-callback", "installing the torch patches after `import torch`")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ImportWatcher(importlib.abc.MetaPathFinder):
    """Calls ``callback(module)`` once, after ``module_name`` is first imported."""

    def __init__(self, module_name: str, callback: Callable[[ModuleType], None], patch_name: str) -> None:
        self.module_name = module_name
        self.callback = callback
        self.patch_name = patch_name

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module_name:
            return None
        patches.undo(self.patch_name)  # one shot: off sys.meta_path before anything else happens
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _NotifyingLoader(spec.loader, self.callback)
            return spec
        except Exception:
            disable_piece("import-hook", f"the {self.module_name} import hook")
            return None


def call_after_import(module_name: str, callback: Callable[[ModuleType], None], tag: str = "") -> str | None:
    """Run ``callback`` now if ``module_name`` is imported, else right after its import.

    Returns the registry name of the pending hook (None when the callback already ran).
    """
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return None
    name = f"import hook for {module_name}" + (f" [{tag}]" if tag else "")
    watcher = ImportWatcher(module_name, callback, name)

    def remove() -> None:
        try:
            sys.meta_path.remove(watcher)
        except ValueError:
            pass

    sys.meta_path.insert(0, watcher)
    patches.register(name, remove)
    return name
