"""What the dashboard's callbacks share: the sources (main and compared), the settings, a cache of
view models per view object, and the bookkeeping of charts in flight (one :class:`AppContext` per app)."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from traceml.drivers.web.zoom import as_range, ranks_arg
from traceml.store import StoreView

Source = Callable[[], StoreView]
T = TypeVar("T")


class ModelCache:
    """Small LRU of view models keyed by (view identity, what, parameters).

    A replay source hands back the same view object every time, so repeated callbacks (other
    charts, the same range again) reuse the models; a live source gives a fresh snapshot each
    tick and so misses, as it should.  Entries keep their view alive so ``id`` cannot be reused.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[Hashable, ...], tuple[StoreView, Any]] = OrderedDict()

    def get(self, view: StoreView, key: tuple[Hashable, ...], build: Callable[[], T]) -> T:
        full = (id(view), *key)
        with self._lock:
            hit = self._items.get(full)
            if hit is not None and hit[0] is view:
                self._items.move_to_end(full)
                value: T = hit[1]
                return value
        value = build()
        with self._lock:
            self._items[full] = (view, value)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


@dataclass
class AppContext:
    """One app's state.  ``labels``: the runs' names in the page; ``plot_labels``: the same, escaped
    for plotly strings.  ``loading`` (replay) is true while ``main`` still loads tables;
    ``on_charts_drawn`` is called once the step charts were built and no chart is in flight."""

    main: Source
    compare: Source | None
    labels: tuple[str, str]
    plot_labels: tuple[str, str]
    live: bool
    refresh_s: float
    max_points: int
    loading: Callable[[], bool] | None = None
    on_charts_drawn: Callable[[], None] | None = None
    #: replay of a long recording: a zoomed step range's rows, read through the index (None: the view)
    zoomed: Callable[[tuple[int, int]], StoreView | None] | None = None
    cache: ModelCache = field(default_factory=ModelCache)
    #: callbacks that build charts or panels, running now
    inflight: int = 0
    #: how many times the step charts were built
    drawn: int = 0
    #: live: the last diagnosis panel and when it was built (monotonic seconds)
    diagnosis: list[Any] | None = None
    diagnosis_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def still_loading(self) -> bool:
        return bool(self.loading is not None and self.loading())

    def views(self) -> tuple[StoreView, StoreView | None]:
        return self.main(), (self.compare() if self.compare is not None else None)

    @staticmethod
    def all_ranks(view: StoreView, other: StoreView | None) -> list[int]:
        return sorted(set(view.ranks) | set(other.ranks if other is not None else ()))

    def params(
        self, rank_value: Any, range_data: Any
    ) -> tuple[StoreView, StoreView | None, tuple[int, ...], tuple[int, int] | None]:
        """The views, the ranks chosen and the step range, from the page's filter and range."""
        view, other = self.views()
        rng = as_range(range_data)
        if rng is not None and self.zoomed is not None:
            view = self.zoomed(rng) or view
        return view, other, ranks_arg(rank_value, self.all_ranks(view, other)), rng

    def busy(self) -> bool:
        with self._lock:
            return self.inflight > 0

    def bind(self, fn: Callable[..., T], *, tracked: bool = False) -> Callable[..., T]:
        """``fn(self, *args)`` as a Dash callback; ``tracked`` ones count as in flight while they run."""

        @functools.wraps(fn)
        def run(*args: Any) -> T:
            if not tracked:
                return fn(self, *args)
            with self._lock:
                self.inflight += 1
            try:
                return fn(self, *args)
            finally:
                with self._lock:
                    self.inflight -= 1

        return run
