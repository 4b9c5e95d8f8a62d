"""What a profiler patched in torch, noted and toggled: shared by the child scripts of
``bench_vs_upstream.py`` and ``bench_step_segments.py`` (they put this folder on ``sys.path``).

A snapshot holds every attribute of the given owners (classes, modules, module instances); a dict
that is a torch global hook registry or a module instance's hook dict is copied, since hooks hold
a reference to that very dict and it is refilled in place.
"""

from __future__ import annotations

from typing import Any

Key = tuple[int, str]
Snapshot = dict[Key, tuple[Any, str, bool, Any]]


def owners(models: list[Any]) -> list[Any]:
    """The classes and modules a profiler may patch, and the traced models' own modules."""
    import torch
    import torch.nn.modules.module as torch_module
    import torch.optim.optimizer as torch_optimizer
    from torch import nn
    from torch.utils.data import DataLoader, dataloader

    found: list[Any] = [DataLoader, dataloader._BaseDataLoaderIter, dataloader._SingleProcessDataLoaderIter]
    found += [nn.Module, nn.Sequential, nn.Linear, nn.ReLU, torch.Tensor, torch.autograd]
    found += [torch.optim.Optimizer, torch.optim.SGD, torch_module, torch_optimizer]
    return found + [sub for model in models for sub in model.modules()]


def capture(of: list[Any]) -> Snapshot:
    from torch import nn

    snap: Snapshot = {}
    for owner in of:
        for k, v in list(vars(owner).items()):
            hooks = isinstance(v, dict) and (k.startswith("_global_") or isinstance(owner, nn.Module))
            snap[(id(owner), k)] = (owner, k, hooks, dict(v) if hooks else v)
    return snap


def _same(a: tuple[Any, str, bool, Any], b: tuple[Any, str, bool, Any]) -> bool:
    if a[2] != b[2]:
        return False
    if a[2]:
        return {k: id(v) for k, v in a[3].items()} == {k: id(v) for k, v in b[3].items()}
    return a[3] is b[3]


def changed(before: Snapshot, after: Snapshot) -> list[Key]:
    """The keys whose attribute was added, removed or replaced between two snapshots."""
    return [k for k in set(before) | set(after) if k not in before or k not in after or not _same(before[k], after[k])]


def apply(snap: Snapshot, keys: list[Key], other: Snapshot) -> None:
    """Set the ``keys`` back to their state in ``snap``; a key absent there (it is in ``other``) is deleted."""
    for key in keys:
        if key in snap:
            owner, k, hooks, v = snap[key]
            if hooks:
                d = vars(owner)[k]
                d.clear()
                d.update(v)
            elif isinstance(owner, type):
                setattr(owner, k, v)
            else:
                vars(owner)[k] = v
        else:
            owner, k = other[key][:2]
            if isinstance(owner, type):
                delattr(owner, k)
            else:
                del vars(owner)[k]


def name_of(owner: Any, k: str) -> str:
    from torch import nn

    if isinstance(owner, nn.Module):
        return f"<traced {type(owner).__name__} instance>.{k}"
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{k}"
    return f"{owner.__name__}.{k}"
