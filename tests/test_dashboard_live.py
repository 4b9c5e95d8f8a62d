"""The live dashboard as ``traceml run --ui web`` starts it: the real aggregator serves it over HTTP on
127.0.0.1 and stops it cleanly; Dash callbacks answer over the wire with the live rows."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

from traceml.aggregator.service import Aggregator, AggregatorOptions
from traceml.schema import STEP_TIME
from traceml.testing.synthetic import synthetic_run
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, hello, rank_finished

TOKEN = "web-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_callback(url: str, output: str, outputs: list[dict], inputs: list[dict]) -> dict:
    body = json.dumps({"output": output, "outputs": outputs, "inputs": inputs, "changedPropIds": [], "state": []})
    req = urllib.request.Request(
        url + "_dash-update-component", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_traceml_run_ui_web_serves_the_live_rows(tmp_path: Path) -> None:
    port = free_port()
    opts = AggregatorOptions(
        token=TOKEN,
        run_id="web-run",
        run_name="web",
        out=str(tmp_path / "run.tml"),
        expected_ranks=1,
        ui="web",
        web_port=port,
    )
    agg = Aggregator(opts)
    agg.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        ident = RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, host="h", pid=1)
        client = TelemetryClient("127.0.0.1", agg.server.port, hello("web-run", TOKEN, ident))
        cols = synthetic_run(ranks=1, steps=300, seed=1)[0]["step_time"]
        assert client.send(batch(1, {"step_time": encode_columns(STEP_TIME, cols)}))
        assert client.flush(timeout_s=10)
        for _ in range(200):  # the ingest thread appends asynchronously
            if agg.store.snapshot().rows("step_time", 0) == 300:
                break
            agg.ingest.activity.wait(0.05)
        with urllib.request.urlopen(url + "_dash-layout", timeout=30) as resp:
            layout = json.dumps(json.loads(resp.read()))
        assert "fig-rank-steps" in layout and '"disabled": false' in layout  # the refresh clock runs
        out = post_callback(
            url,
            "..fig-rank-steps.figure...fig-rank-heatmap.figure...charts-drawn.data..",
            [
                {"id": "fig-rank-steps", "property": "figure"},
                {"id": "fig-rank-heatmap", "property": "figure"},
                {"id": "charts-drawn", "property": "data"},
            ],
            [
                {"id": "rank-filter", "property": "value", "value": [0]},
                {"id": "step-range", "property": "data", "value": None},
                {"id": "data-version", "property": "data", "value": None},
                {"id": "first-chart", "property": "data", "value": 1},
            ],
        )
        fig = out["response"]["fig-rank-steps"]["figure"]
        assert [t["meta"]["rank"] for t in fig["data"]] == [0] and fig["data"][0]["meta"]["points"] == 300
        client.send(rank_finished("ok"))
        client.close(drain_timeout_s=5.0)
        agg.on_exit({"exit_code": 0, "signal": "", "duration_s": 1.0})
        agg.wait()
    finally:
        agg.finalize()
        agg.close_ui(None)
    with socket.socket() as s:  # the dashboard's port is free again
        s.bind(("127.0.0.1", port))
