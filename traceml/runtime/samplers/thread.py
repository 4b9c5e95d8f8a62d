"""The one sampler thread of a rank: runs every sampler each interval, appends their rows.

A sampler that raises is logged once and dropped; the others go on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from traceml.runtime._failopen import disable_piece

#: a named sampler: () -> one row, a list of rows, or None
Sampler = tuple[str, Callable[[], Any], Callable[[Sequence[Any]], None]]


class SamplerThread:
    def __init__(
        self,
        samplers: Iterable[Sampler],
        interval_s: float,
        on_tick: Callable[[], None] | None = None,
        name: str = "traceml-sampler",
    ) -> None:
        self.samplers: list[Sampler] = list(samplers)
        self.interval_s = interval_s
        self.on_tick = on_tick
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def tick(self) -> None:
        """Run every sampler once (also callable directly from tests)."""
        for entry in list(self.samplers):
            name, sample, append = entry
            try:
                out = sample()
                if out is None:
                    continue
                if isinstance(out, list):
                    for row in out:
                        append(row)
                else:
                    append(out)
            except Exception:
                self.samplers.remove(entry)
                disable_piece(f"sampler-{name}", f"the {name} sampler")
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception:
                self.on_tick = None
                disable_piece("sampler-on-tick", "the sampler thread's periodic task")
        self.ticks += 1

    def _run(self) -> None:
        self.tick()
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
