"""A run summary as OpenTelemetry metrics, sent over OTLP/HTTP with the OpenTelemetry SDK.

:func:`metric_points` is pure; :func:`send_summary` sends one request, honouring the standard
``OTEL_*`` variables.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from traceml.errors import ExportError
from traceml.exports import require

log = logging.getLogger(__name__)

#: the OTLP extra's pip line
OTLP_PACKAGES = "opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
METRICS_PATH = "/v1/metrics"
#: the push thread waits at least this many times as long as its last push took (<= 5 % duty)
MAX_DUTY = 20
#: attribute values taken from a recording are cut to this many characters
MAX_ATTR_CHARS = 256
#: at most this many ranks get their own resource
MAX_RANKS = 1024
_PHASES = ("dataloader", "h2d", "forward", "backward", "optimizer", "residual")
_SEVERITY = {"info": 0, "warn": 1, "critical": 2}

#: name -> (unit, description)
METRICS: dict[str, tuple[str, str]] = {
    "traceml.step.duration": ("s", "Step time over the analysed steps (traceml.stat: median|p95)"),
    "traceml.step.phase.duration": ("s", "Time of one phase of the step (traceml.phase, traceml.stat)"),
    "traceml.step.phase.share": ("1", "A phase's median as a share of the median step"),
    "traceml.step.throughput": ("{step}/s", "Steps per second at the median step time"),
    "traceml.step.count": ("{step}", "Steps analysed (warm-up excluded)"),
    "traceml.memory.peak": ("By", "Peak memory of a rank (traceml.memory.kind: rss|gpu_allocated|gpu_reserved)"),
    "traceml.run.duration": ("s", "Wall time of the run"),
    "traceml.run.verdict": ("1", "Severity of the primary diagnosis (0 info, 1 warn, 2 critical); kind in attributes"),
    "hw.gpu.utilization": ("1", "Mean utilisation of the GPU over the run"),
    "hw.gpu.memory.usage": ("By", "Most GPU memory used"),
    "hw.gpu.memory.limit": ("By", "GPU memory size"),
    "hw.temperature": ("Cel", "Highest GPU temperature"),
    "hw.power": ("W", "Mean GPU power draw"),
}


@dataclass
class Resource:
    """One OTel resource (run / node / rank attributes) and its gauge points."""

    attributes: dict[str, str | int]
    points: list[tuple[str, float, dict[str, str | int]]] = field(default_factory=list)

    def add(self, name: str, value: Any, attributes: Mapping[str, str | int] | None = None, scale: float = 1.0) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        number = float(value) * scale
        if math.isfinite(number):
            self.points.append((name, number, dict(attributes or {})))


@dataclass(frozen=True)
class Sent:
    endpoint: str
    resources: int
    points: int


def _text(value: Any) -> str:
    return "".join(ch for ch in str(value)[:MAX_ATTR_CHARS] if ch.isprintable())


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def metric_points(summary: Mapping[str, Any]) -> list[Resource]:
    """The summary as resources with gauge points (pure)."""
    run = _map(summary.get("run"))
    base: dict[str, str | int] = {
        "traceml.run.id": _text(run.get("id", "")),
        "traceml.run.name": _text(run.get("name", "")),
    }
    hosts = {}
    for r in _list(run.get("ranks"))[:MAX_RANKS]:
        r = _map(r)
        rank, node = _int(r.get("rank")), _int(r.get("node_rank"))
        if rank is not None:
            hosts[rank] = (_text(r.get("host", "")), node if node is not None else -1)

    job = Resource(dict(base))
    steps = _map(summary.get("steps"))
    overall = _map(steps.get("overall"))
    job.add("traceml.run.duration", run.get("duration_s"))
    job.add("traceml.step.count", steps.get("count"))
    job.add("traceml.step.throughput", steps.get("throughput_steps_per_s"))
    step_stats = _map(overall.get("step"))
    job.add("traceml.step.duration", step_stats.get("median_ms"), {"traceml.stat": "median"}, 1e-3)
    job.add("traceml.step.duration", step_stats.get("p95_ms"), {"traceml.stat": "p95"}, 1e-3)
    step_median = step_stats.get("median_ms")
    for phase in _PHASES:
        stats = _map(overall.get(phase))
        for stat in ("median", "p95"):
            job.add(
                "traceml.step.phase.duration",
                stats.get(f"{stat}_ms"),
                {"traceml.phase": phase, "traceml.stat": stat},
                1e-3,
            )
        median = stats.get("median_ms")
        if isinstance(median, (int, float)) and isinstance(step_median, (int, float)) and step_median > 0:
            job.add("traceml.step.phase.share", median / step_median, {"traceml.phase": phase})
    primary = _map(_map(summary.get("diagnosis")).get("primary"))
    if primary.get("kind"):
        severity = _text(primary.get("severity", "info"))
        job.add(
            "traceml.run.verdict",
            _SEVERITY.get(severity, 0),
            {"traceml.verdict.kind": _text(primary["kind"]), "traceml.verdict.severity": severity},
        )
    resources = [job]

    memory = {_int(_map(m).get("rank")): _map(m) for m in _list(_map(summary.get("memory")).get("per_rank"))}
    for row in _list(steps.get("per_rank"))[:MAX_RANKS]:
        row = _map(row)
        rank = _int(row.get("rank"))
        if rank is None:
            continue
        host, node = hosts.get(rank, ("", -1))
        res = Resource({**base, "traceml.rank": rank, "traceml.node.rank": node, "host.name": host})
        phases = _map(row.get("phases"))
        res.add("traceml.step.count", row.get("count"))
        step = _map(phases.get("step"))
        res.add("traceml.step.duration", step.get("median_ms"), {"traceml.stat": "median"}, 1e-3)
        res.add("traceml.step.duration", step.get("p95_ms"), {"traceml.stat": "p95"}, 1e-3)
        for phase in _PHASES:
            res.add(
                "traceml.step.phase.duration",
                _map(phases.get(phase)).get("median_ms"),
                {"traceml.phase": phase, "traceml.stat": "median"},
                1e-3,
            )
        mem = memory.get(rank, {})
        for kind, key in (
            ("rss", "peak_rss_bytes"),
            ("gpu_allocated", "peak_gpu_alloc_bytes"),
            ("gpu_reserved", "peak_gpu_reserved_bytes"),
        ):
            res.add("traceml.memory.peak", mem.get(key), {"traceml.memory.kind": kind})
        resources.append(res)

    nodes: dict[int, Resource] = {}
    node_hosts = {node: host for host, node in hosts.values()}
    for gpu in _list(_map(summary.get("system")).get("gpus"))[:MAX_RANKS]:
        gpu = _map(gpu)
        node, idx = _int(gpu.get("node_rank")), _int(gpu.get("gpu_idx"))
        if node is None or idx is None:
            continue
        if node not in nodes:
            nodes[node] = Resource({**base, "traceml.node.rank": node, "host.name": node_hosts.get(node, "")})
        res = nodes[node]
        hw: dict[str, str | int] = {"hw.id": f"gpu{idx}", "hw.type": "gpu"}
        res.add("hw.gpu.utilization", gpu.get("util_pct_mean"), hw, 1e-2)
        res.add("hw.gpu.memory.usage", gpu.get("mem_used_max_bytes"), hw)
        res.add("hw.gpu.memory.limit", gpu.get("mem_total_bytes"), hw)
        res.add("hw.temperature", gpu.get("temp_c_max"), hw)
        res.add("hw.power", gpu.get("power_w_mean"), hw)
    resources.extend(nodes[n] for n in sorted(nodes))
    return [r for r in resources if r.points]


def metrics_endpoint(endpoint: str | None) -> str | None:
    """``--otlp URL`` is a base URL like ``OTEL_EXPORTER_OTLP_ENDPOINT``: ``/v1/metrics`` is added
    unless the path already ends with it.  None: the exporter reads the ``OTEL_*`` variables."""
    if not endpoint:
        return None
    if not endpoint.startswith(("http://", "https://")):
        raise ExportError(
            f"OTLP endpoint {endpoint!r}: expected an http:// or https:// URL of an OTLP/HTTP receiver,"
            " e.g. http://localhost:4318 (gRPC is not supported)"
        )
    trimmed = endpoint.rstrip("/")
    return trimmed if trimmed.endswith(METRICS_PATH) else trimmed + METRICS_PATH


def send_summary(summary: Mapping[str, Any], *, endpoint: str | None = None, timeout_s: float | None = None) -> Sent:
    """Record the summary's metrics with the OTel SDK and send them in one OTLP/HTTP request."""
    metrics_sdk = require("opentelemetry.sdk.metrics", "otlp", OTLP_PACKAGES)
    export_sdk = require("opentelemetry.sdk.metrics.export", "otlp", OTLP_PACKAGES)
    resources_sdk = require("opentelemetry.sdk.resources", "otlp", OTLP_PACKAGES)
    exporter_mod = require("opentelemetry.exporter.otlp.proto.http.metric_exporter", "otlp", OTLP_PACKAGES)

    url = metrics_endpoint(endpoint)
    exporter = exporter_mod.OTLPMetricExporter(endpoint=url, timeout=timeout_s)
    resolved = str(getattr(exporter, "_endpoint", url or "the OTEL_EXPORTER_OTLP_* endpoint"))
    resource_metrics = []
    points = 0
    version = _version()
    for res in metric_points(summary):
        attrs: dict[str, str | int] = dict(res.attributes)
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attrs["service.name"] = "traceml"
        attrs["service.version"] = version
        reader = export_sdk.InMemoryMetricReader()
        provider = metrics_sdk.MeterProvider(resource=resources_sdk.Resource.create(attrs), metric_readers=[reader])
        try:
            meter = provider.get_meter("traceml", version)
            gauges: dict[str, Any] = {}
            for name, value, point_attrs in res.points:
                if name not in gauges:
                    unit, description = METRICS[name]
                    gauges[name] = meter.create_gauge(name, unit=unit, description=description)
                gauges[name].set(value, point_attrs)
                points += 1
            data = reader.get_metrics_data()
        finally:
            provider.shutdown()
        if data is not None:
            resource_metrics.extend(data.resource_metrics)
    try:
        result = exporter.export(export_sdk.MetricsData(resource_metrics=resource_metrics))
    finally:
        exporter.shutdown()
    if result != export_sdk.MetricExportResult.SUCCESS:
        raise ExportError(
            f"the OTLP receiver at {resolved} did not take the metrics (see the log line above for its answer);"
            " check --otlp / OTEL_EXPORTER_OTLP_ENDPOINT and that an OTLP/HTTP receiver listens there"
        )
    return Sent(resolved, len(resource_metrics), points)


def _version() -> str:
    from traceml._version import __version__

    return __version__


class LivePusher:
    """Sends the run's metrics every ``interval_s`` from a thread of the aggregator, and once more
    at the end (:meth:`stop` with the final summary).  The wait after a push is at least
    :data:`MAX_DUTY` times what the push took, so pushing costs at most ~5 % of one core.  Fail-open: a failed push is logged (the
    first one as a warning, later ones at debug level) and the next one is tried; a push still
    running when the next is due is not doubled.  Never touches the ranks."""

    def __init__(
        self,
        summary: Callable[[], Mapping[str, Any] | None],
        endpoint: str | None,
        *,
        interval_s: float = 15.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._summary = summary
        self.endpoint = endpoint
        self.interval_s = max(0.1, float(interval_s))
        self.timeout_s = timeout_s
        self.pushes = 0
        self.failures = 0
        self.last_cost_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="traceml-otlp", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _push(self, summary: Mapping[str, Any] | None) -> None:
        if summary is None:
            return
        with self._lock:
            try:
                send_summary(summary, endpoint=self.endpoint, timeout_s=self.timeout_s)
                self.pushes += 1
            except Exception as exc:  # fail-open: the run goes on without its OTLP export
                self.failures += 1
                (log.warning if self.failures == 1 else log.debug)("OTLP export failed (again later): %s", exc)

    def _run(self) -> None:
        wait_s = self.interval_s
        while not self._stop.wait(wait_s):
            started = time.monotonic()
            try:
                summary = self._summary()
            except Exception:
                log.debug("no summary for the OTLP export this time", exc_info=True)
                summary = None
            self._push(summary)
            # a push (mostly the summary of a big live store) never takes more than 1/MAX_DUTY of the time
            self.last_cost_s = time.monotonic() - started
            wait_s = max(self.interval_s, self.last_cost_s * MAX_DUTY)

    def stop(self, final: Mapping[str, Any] | None) -> None:
        """Stop the periodic pushes; push ``final`` (the run's closing summary) once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s * 3)
        self._push(final)
