"""SYSTEM_GPU rows via NVML (``pynvml`` from nvidia-ml-py), one per GPU of the node.

``nvmlInit`` is tried once per process; without a GPU or driver the rows are absent and one log line says why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from traceml.runtime._failopen import log_once

_lock = threading.Lock()
#: None = not tried yet; a module = initialized; a str = why NVML is unavailable
_nvml: Any = None


def nvml_module() -> Any | None:
    """The initialized ``pynvml`` module, or None (reason logged once)."""
    global _nvml
    with _lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
                _nvml = f"{type(exc).__name__}: {exc}"
        state = _nvml
    if isinstance(state, str):
        log_once(
            "nvml-unavailable",
            "traceml: no GPU system metrics (NVML unavailable: %s); system_gpu rows are not recorded",
            state,
            level=logging.INFO,
        )
        return None
    return state


class NvmlSampler:
    def __init__(self, node_rank: int, clock: Callable[[], int] = time.time_ns, nvml: Any | None = None) -> None:
        self.node_rank = node_rank
        self.clock = clock
        self._nvml = nvml if nvml is not None else nvml_module()
        self._handles: list[Any] = []
        if self._nvml is not None:
            n = self._nvml.nvmlDeviceGetCount()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
            if not self._handles:
                log_once(
                    "nvml-no-gpu", "traceml: NVML sees no GPU; system_gpu rows are not recorded", level=logging.INFO
                )

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def sample(self) -> list[tuple[int | float, ...]]:
        nv: Any = self._nvml
        ts = self.clock()
        rows: list[tuple[int | float, ...]] = []
        for idx, h in enumerate(self._handles):
            util = _query(nv.nvmlDeviceGetUtilizationRates, h)
            mem = _query(nv.nvmlDeviceGetMemoryInfo, h)
            temp = _query(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            power_mw = _query(nv.nvmlDeviceGetPowerUsage, h)
            limit_mw = _query(nv.nvmlDeviceGetEnforcedPowerLimit, h)
            rows.append(
                (
                    ts,
                    self.node_rank,
                    idx,
                    _nan(util.gpu if util is not None else None),
                    int(mem.used) if mem is not None else -1,
                    int(mem.total) if mem is not None else -1,
                    _nan(temp),
                    _nan(power_mw / 1000.0 if power_mw is not None else None),
                    _nan(limit_mw / 1000.0 if limit_mw is not None else None),
                )
            )
        return rows


def _query(fn: Callable[..., Any], *args: Any) -> Any:
    """One NVML query; a metric the GPU does not support is missing, not an error."""
    try:
        return fn(*args)
    except Exception:
        return None


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)
