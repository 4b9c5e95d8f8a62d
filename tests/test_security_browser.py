"""Hostile names in a real headless Chromium: a run name made of ``</title><script>`` and friends
runs nothing in ``traceml replay FILE --ui web`` (alone and in compare mode) nor in ``report.html``;
the page shows it as text.  Also the dashboards' Host check, over real HTTP (DNS rebinding)."""

from __future__ import annotations

import contextlib
import http.client
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import write_hostile

from replay.dashboard import build_dashboard
from replay.report import write_report
from traceml.drivers.web import FIGURE_IDS, WebServer, allowed_hosts, build_app
from traceml.store import ColumnStore

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
#: each part tries another way to run script; any that runs sets window.__pwned
PAYLOAD = (
    "</title><script>window.__pwned='title'</script>"
    "<img src=x onerror=\"window.__pwned='img'\"><svg onload=\"window.__pwned='svg'\">"
    "<a href=\"javascript:window.__pwned='link'\">x</a>[/bold]\x1b[31m"
)
DRAWN_JS = """(ids) => ids.every(id => {
  const gd = document.querySelector('#' + id + ' .js-plotly-plot');
  return gd && gd._fullLayout && gd.data && !document.querySelector('[data-dash-is-loading="true"]');
})"""


@pytest.fixture(scope="module")
def hostile_tml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("xss")
    return write_hostile(root / "run.tml", run_id=PAYLOAD, run_name=PAYLOAD, host=PAYLOAD, text=PAYLOAD, steps=60)


@contextlib.contextmanager
def dashboard(path: Path, compare: Path | None = None) -> Iterator[WebServer]:
    app, close = build_dashboard(path, compare, progress=False)
    server = WebServer(app, "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()
        close()


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page()
        pg.set_default_timeout(60_000)
        try:
            # Chromium starts its network and storage helpers with the first page and keeps them:
            # start them here, so they are not taken for a test's leaked children
            warm = WebServer(build_app(lambda: ColumnStore().snapshot(), live=False), "127.0.0.1", 0).start()
            try:
                pg.goto(warm.url)
                pg.wait_for_function(DRAWN_JS, arg=list(FIGURE_IDS))
                pg.goto("about:blank")
            finally:
                warm.stop()
            yield pg
        finally:
            pg.close()
            browser.close()


def assert_inert(page: Any) -> None:
    assert page.evaluate("window.__pwned === undefined"), page.evaluate("String(window.__pwned)")
    assert page.evaluate("document.querySelectorAll('script:not([src])').length") <= 8  # Dash's own only
    assert page.evaluate("document.querySelector('img[src=x], svg[onload]') === null")


@pytest.mark.browser
def test_replay_dashboard_runs_no_script_from_a_run_name(page: Any, hostile_tml: Path) -> None:
    with dashboard(hostile_tml) as server:
        page.goto(server.url)
        page.wait_for_function(DRAWN_JS, arg=list(FIGURE_IDS))
        assert_inert(page)
        title = page.title()
        assert "</title><script>" in title and "\x1b" not in title  # shown as text, ESC as an escape
        heading = page.inner_text("#run-title")
        assert "<script>window.__pwned='title'</script>" in heading and "\\x1b[31m" in heading
        page.goto("about:blank")


@pytest.mark.browser
def test_live_dashboard_runs_no_script_from_a_run_name(page: Any) -> None:
    store = ColumnStore()
    store.set_meta(run_name=PAYLOAD, run_id=PAYLOAD)
    server = WebServer(build_app(store.snapshot, live=True), "127.0.0.1", 0).start()
    try:
        page.goto(server.url)
        page.wait_for_function(DRAWN_JS, arg=list(FIGURE_IDS))
        assert_inert(page)
        assert "</title><script>" in page.title()
    finally:
        page.goto("about:blank")
        server.stop()


@pytest.mark.browser
def test_compare_dashboard_runs_no_script_from_either_run(page: Any, hostile_tml: Path, tmp_path: Path) -> None:
    other = write_hostile(tmp_path / "b.tml", run_name="<b>B</b><img src=x onerror=\"window.__pwned='b'\">", steps=60)
    with dashboard(hostile_tml, other) as server:
        page.goto(server.url)
        page.wait_for_function(DRAWN_JS, arg=list(FIGURE_IDS))
        assert_inert(page)
        legend = page.evaluate("Array.from(document.querySelectorAll('.legendtext')).map(e => e.textContent).join('|')")
        assert "<img src=x" in legend  # plotly shows the name as text, never as markup
        page.goto("about:blank")


@pytest.mark.browser
def test_report_html_runs_no_script_from_a_run_name(page: Any, hostile_tml: Path, tmp_path: Path) -> None:
    files = write_report(hostile_tml, tmp_path / "rep")
    page.set_content(files.html.read_text(encoding="utf-8"), wait_until="load")
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0")
    assert_inert(page)
    assert "</title><script>" in page.title()
    page.goto("about:blank")


def request(port: int, host_header: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/", skip_host=True)
        conn.putheader("Host", host_header)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_dashboard_refuses_a_rebinding_host(hostile_tml: Path) -> None:
    with dashboard(hostile_tml) as server:
        for good in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST.", "127.0.0.1"):
            status, _ = request(server.port, good)
            assert status == 200, good
        for bad in (f"evil.example:{server.port}", "attacker.com", "127.0.0.1.evil.example", "", "localhost.evil"):
            status, body = request(server.port, bad)
            assert status == 403 and b"loopback name" in body, bad
        # the Dash API the page polls is guarded too, not only the page
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.putrequest("GET", "/_dash-layout", skip_host=True)
            conn.putheader("Host", "rebind.example")
            conn.endheaders()
            assert conn.getresponse().status == 403
        finally:
            conn.close()


def test_allowed_hosts_follow_the_bind_address() -> None:
    assert allowed_hosts("127.0.0.1", "127.0.0.1") == {"localhost", "127.0.0.1"}
    assert "dash.internal" in allowed_hosts("dash.internal", "10.1.2.3")
    assert "10.1.2.3" in allowed_hosts("dash.internal", "10.1.2.3")
    wildcard = allowed_hosts("0.0.0.0", "0.0.0.0")
    assert "localhost" in wildcard and "127.0.0.1" in wildcard and "evil.example" not in wildcard


def test_live_dashboard_refuses_a_rebinding_host() -> None:
    from traceml.drivers.web import serve_live

    store = ColumnStore()
    store.set_meta(run_name="live", run_id="r")
    server = serve_live(store.snapshot, host="127.0.0.1", port=0)
    try:
        assert request(server.port, f"127.0.0.1:{server.port}")[0] == 200
        assert request(server.port, f"[::1]:{server.port}")[0] == 200
        assert request(server.port, f"rebind.attacker.example:{server.port}")[0] == 403
    finally:
        server.stop()
