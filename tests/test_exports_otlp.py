"""``traceml export --format otlp``: metrics through the OTel SDK to a real OTLP/HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.otlp_receiver import OtlpReceiver
from traceml.errors import ExportError
from traceml.exports.otlp import metric_points, metrics_endpoint, send_summary

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_traces"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from traceml.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )


def test_cli_export_sends_step_metrics_per_rank_with_resource_attributes() -> None:
    with OtlpReceiver() as rx:
        res = _cli("export", str(SAMPLES / "ddp_input_straggler.tml"), "--format", "otlp", "--endpoint", rx.url)
    assert res.returncode == 0, res.stderr
    assert rx.paths == ["/v1/metrics"] and len(rx.requests) == 1
    assert rx.headers[0]["content-type"] == "application/x-protobuf"
    points = rx.points()
    per_rank = {
        (r["traceml.rank"], a["traceml.stat"]): v
        for r, name, v, a in points
        if name == "traceml.step.duration" and "traceml.rank" in r
    }
    assert set(per_rank) == {(0, "median"), (0, "p95"), (1, "median"), (1, "p95")}
    assert all(0 < v < 1 for v in per_rank.values())  # seconds, not ms
    resources = [r for r, *_ in points]
    assert all(r["service.name"] == "traceml" and r["traceml.run.name"] == "ddp_input_straggler" for r in resources)
    assert {r.get("traceml.node.rank") for r in resources if "traceml.rank" in r} == {0}
    verdict = [(v, a) for _, name, v, a in points if name == "traceml.run.verdict"]
    assert verdict == [(2.0, {"traceml.verdict.kind": "STRAGGLER", "traceml.verdict.severity": "critical"})]
    dataloader_rank1 = [
        v
        for r, name, v, a in points
        if name == "traceml.step.phase.duration" and r.get("traceml.rank") == 1 and a["traceml.phase"] == "dataloader"
    ]
    assert dataloader_rank1 and dataloader_rank1[0] > 0.01


def test_standard_otel_variables_choose_endpoint_headers_and_service() -> None:
    with OtlpReceiver() as rx:
        res = _cli(
            "export",
            str(SAMPLES / "compute_bound.tml"),
            "--format",
            "otlp",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": rx.url,
                "OTEL_EXPORTER_OTLP_HEADERS": "x-team=ml-infra",
                "OTEL_SERVICE_NAME": "trainer",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci",
            },
        )
    assert res.returncode == 0, res.stderr
    assert rx.paths == ["/v1/metrics"] and rx.headers[0]["x-team"] == "ml-infra"
    resources = [r for r, *_ in rx.points()]
    assert all(r["service.name"] == "trainer" and r["deployment.environment"] == "ci" for r in resources)


def test_gpu_metrics_follow_hw_gpu_conventions() -> None:
    summary = {
        "run": {"id": "i", "name": "n", "ranks": [{"rank": 0, "node_rank": 0, "host": "h0"}]},
        "system": {
            "gpus": [
                {"node_rank": 0, "gpu_idx": 3, "util_pct_mean": 75.0, "mem_used_max_bytes": 10, "mem_total_bytes": 80}
            ]
        },
    }
    with OtlpReceiver() as rx:
        sent = send_summary(summary, endpoint=rx.url + "/v1/metrics")
    assert sent.endpoint == rx.url + "/v1/metrics"
    gpu = {name: (v, a, r) for r, name, v, a in rx.points() if name.startswith("hw.gpu.")}
    assert set(gpu) == {"hw.gpu.utilization", "hw.gpu.memory.usage", "hw.gpu.memory.limit"}
    value, attrs, resource = gpu["hw.gpu.utilization"]
    assert value == 0.75 and attrs == {"hw.id": "gpu3", "hw.type": "gpu"}
    assert resource["traceml.node.rank"] == 0 and resource["host.name"] == "h0"


def test_a_receiver_that_refuses_is_an_error_naming_the_endpoint() -> None:
    summary = {"run": {"duration_s": 1.0}}
    with OtlpReceiver(status=400) as rx, pytest.raises(ExportError, match="did not take the metrics"):
        send_summary(summary, endpoint=rx.url, timeout_s=2)


def test_endpoint_spelling() -> None:
    assert metrics_endpoint("http://c:4318") == "http://c:4318/v1/metrics"
    assert metrics_endpoint("http://c:4318/") == "http://c:4318/v1/metrics"
    assert metrics_endpoint("https://c/otlp/v1/metrics") == "https://c/otlp/v1/metrics"
    assert metrics_endpoint(None) is None
    with pytest.raises(ExportError, match="expected an http:// or https:// URL"):
        metrics_endpoint("c:4317")
    assert metric_points({}) == []
