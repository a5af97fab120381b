"""The dashboard in a real browser: Playwright drives Debian's Chromium against a real
``panda dashboard`` server and a real ``panda train`` process, clicking like a person would.

Never runs ``playwright install``: the browser is the system's ``chromium``; without it the
module is skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from browsing import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    TIMEOUT_S,
    VIEWPORT,
    answers,
    chart_frames,
    child_env,
    free_port,
    metric,
    plot,
    sync_api,
    wait,
    wait_for_knobs,
)
from helpers import dead_pid, screenshot

from app.lr_panel import format_factor, lr_factor, needs_confirmation
from trainer import Babysitter
from trainer.checkpoint_files import checkpoint_path
from trainer.config import TrainConfig, config_values
from trainer.lr_range.suggestions import KEEP_RULES
from trainer.store import SqliteStore, StoreError
from trainer.store.address import open_store, run_address

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REFRESHES_S = 2.5   # a few of the page's ~1 s refreshes
RUN = "live"











@contextmanager
def _serve(root: Path, store: str | None = None):
    """A digits run training slowly and the dashboard, both on ``root/runs`` (or, with a
    PostgreSQL ``store``, both on that database: the run's directory then only holds its
    checkpoints, and the dashboard is given an empty runs directory of its own)."""
    runs, port = root / "runs", free_port()
    panda = [sys.executable, "-m", "trainer.cli"]
    where = [] if store is None else ["--store", store]
    dashboard_runs = runs if store is None else root / "dashboard-runs"
    logs = [open(root / name, "w") for name in ("train.log", "dashboard.log")]  # noqa: SIM115
    trainer = subprocess.Popen([*panda, "train", "--task", "digits", "--run-dir",
                                str(runs / RUN), "--epochs", "200", "--step-delay", "0.01",
                                *where], stdout=logs[0], stderr=subprocess.STDOUT, env=child_env(),
                               cwd=REPO)
    dashboard = subprocess.Popen([*panda, "dashboard", "--runs-dir", str(dashboard_runs),
                                  "--host", "127.0.0.1", "--port", str(port), *where],
                                 stdout=logs[1], stderr=subprocess.STDOUT, env=child_env(),
                                 cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: answers(url + "/_stcore/health"), "the dashboard to answer")
        address = run_address(store or runs, RUN)
        store_ = wait(lambda: _opened(address), "the trainer to create its store")
        wait(lambda: store_.summary()["state"] == "running", "the trainer to run")
        yield url, store_, root / "dashboard.log"
        store_.close()
    finally:
        for proc in (trainer, dashboard):
            proc.terminate()
        for proc in (trainer, dashboard):
            try:
                proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def _opened(address: str):
    try:
        return open_store(address)
    except StoreError:
        return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with _serve(tmp_path_factory.mktemp("browser")) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextmanager
def _browse(browser, url: str):
    """A tab on the dashboard at ``url``, once its knobs are drawn."""
    tab = browser.new_page(viewport=VIEWPORT)
    try:
        tab.set_default_timeout(TIMEOUT_S * 1000)
        tab.goto(url)
        wait_for_knobs(tab)
        yield tab
    finally:
        tab.close()


@pytest.fixture(scope="module")
def page(browser, servers):
    with _browse(browser, servers[0]) as tab:
        yield tab




def _shown_step(page) -> int:
    text = metric(page, "step").replace(",", "")
    return int(text) if text.isdigit() else -1






def _loss_points(page) -> int:
    # _fullData holds the decoded arrays (the component sends typed arrays, base64-encoded).
    return plot(page, "p => { const t = p._fullData.find(t => t.name === 'train loss');"
                       " return t ? t._length : 0; }") or 0


def _markers(page) -> list[str]:
    return plot(page, "p => { const t = p._fullData.find(t => t.name === 'interventions');"
                       " return t ? Array.from(t.text) : []; }") or []


def _view(page) -> dict:
    """The training chart as the user sees it: axis ranges, draws done, the newest step drawn,
    hidden traces, and whether the component holds a zoom."""
    return plot(page, """p => {
        const L = p._fullLayout, chart = window.streamChart;
        const loss = p._fullData.find(t => t.name === 'train loss');
        return {renders: chart.status.renders, latest: chart.status.latest,
                zoomed: 'xaxis' in chart.view.ranges, x: L.xaxis.range.slice(),
                y: L.yaxis.range.slice(), last: Math.max(...loss.x), points: loss._length,
                hidden: p._fullData.filter(t => t.visible === 'legendonly').map(t => t.name)};
        }""") or {}


def _refreshes(page, count: int = 5) -> dict:
    """Wait until the chart has been redrawn ``count`` more times (new data each time)."""
    start = wait(lambda: _view(page).get("renders"), "the chart to be drawn")
    return wait(lambda: _view(page)["renders"] >= start + count and _view(page),
                 f"{count} refreshes of the chart")


def _screenshot(page, path: Path, target=None) -> None:
    """Screenshot once the chart is drawn (the component redraws in place: no blank frames);
    ``make screenshots`` keeps it for the README (helpers.screenshot)."""
    wait(lambda: _loss_points(page), "the chart to be drawn")
    screenshot(target or page, path)


def test_the_chart_shows_new_points_over_time(page):
    first_step = wait(lambda: _shown_step(page) > 0 and _shown_step(page), "a first step")
    first_points = wait(lambda: _loss_points(page), "points on the chart")
    wait(lambda: _shown_step(page) > first_step + 20, "the step counter to move")
    wait(lambda: _loss_points(page) > first_points, "the chart to grow")
    assert metric(page, "state").endswith("running")


def _plot_area(page) -> dict:
    """The loss panel's drag layer, in page coordinates."""
    frame = wait(lambda: next((f for f in chart_frames(page) if f.query_selector(".nsewdrag")),
                               None), "the chart's drag layer")
    return wait(frame.locator(".nsewdrag").first.bounding_box, "the chart's drag layer")


def _drag_box(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag a zoom box across the loss panel, from ``start`` to ``end`` (fractions of its width
    and height), as a person would."""
    box = _plot_area(page)
    page.mouse.move(box["x"] + box["width"] * start[0], box["y"] + box["height"] * start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end[0], box["y"] + box["height"] * end[1],
                    steps=8)
    page.mouse.up()


def _double_click(page) -> None:
    box = _plot_area(page)
    page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def test_the_training_chart_is_the_stream_chart_component(page):
    wait(lambda: _loss_points(page), "the chart to be drawn")
    assert _view(page)["renders"] >= 1
    assert page.locator(".js-plotly-plot").count() == 0  # no st.plotly_chart on the page
    assert page.get_by_text("freeze chart").count() == 0


def test_plotly_js_is_a_static_file_the_browser_keeps(page):
    """plotly.js comes from the app's static files, which carry an ETag: after a reload (as
    for another tab, or the LR range test's chart) the browser revalidates the 4.8 MB bundle
    instead of downloading it again, and V8 may reuse the code it compiled."""
    wait(lambda: _loss_points(page), "the chart to be drawn")
    page.reload()
    wait_for_knobs(page)
    wait(lambda: _loss_points(page), "the chart to be drawn again")
    loaded = [entry for frame in chart_frames(page) for entry in frame.evaluate(
        "performance.getEntriesByType('resource').map(e => [e.name, e.transferSize])")
        if "plotly" in entry[0]]
    assert loaded and all("/app/static/plotly-" in name for name, _ in loaded), loaded
    assert all(size < 100_000 for _, size in loaded), loaded  # headers at most: not the bundle


def test_the_chart_draws_when_the_static_plotly_js_cannot_be_loaded(browser, servers):
    """A proxy that does not pass /app/static/, or the file removed under a running
    dashboard: the chart's frame loads plotly.js through the component route instead."""
    tab = browser.new_page(viewport=VIEWPORT)
    try:
        tab.set_default_timeout(TIMEOUT_S * 1000)
        refused = []
        tab.route("**/app/static/**", lambda route: (refused.append(route.request.url),
                                                      route.abort()))
        tab.goto(servers[0])
        wait_for_knobs(tab)
        wait(lambda: _loss_points(tab), "the chart to be drawn through the component route")
        assert refused  # the static file was asked for first
        assert _view(tab)["renders"] >= 1
    finally:
        tab.close()


def test_a_zoom_survives_refreshes_while_points_keep_arriving(page):
    """The issue's "zoom is thrown away every second": zoom into a box of a live run; five
    refreshes later the ranges are exactly the same while new steps keep arriving, and
    neither plotly.js nor the chart's page was fetched again. Double-click goes back."""
    wait(lambda: _loss_points(page) > 200, "a curve to zoom into")
    fetched = []

    def record(request):
        fetched.append(request)

    page.on("request", record)
    _drag_box(page, (0.3, 0.3), (0.6, 0.8))
    zoomed = wait(lambda: _view(page).get("zoomed") and _view(page), "the zoom to take")
    after = _refreshes(page, 5)
    page.remove_listener("request", record)
    assert after["x"] == zoomed["x"] and after["y"] == zoomed["y"]
    assert after["last"] > zoomed["last"] > after["x"][1]  # appended, right of the zoomed view
    assert not [r.url for r in fetched if "plotly.min.js" in r.url or "index.html" in r.url]
    _double_click(page)
    reset = wait(lambda: not _view(page)["zoomed"] and _view(page), "the view to reset")
    assert reset["x"][0] == 0 and reset["x"][1] >= after["last"]


def test_follow_latest_keeps_the_right_edge_at_the_newest_step(page):
    follow = page.get_by_text("follow latest")
    follow.click()
    _drag_box(page, (0.5, 0.2), (0.8, 0.7))
    zoomed = wait(lambda: _view(page).get("zoomed") and _view(page), "the zoom to take")
    after = _refreshes(page, 5)
    width = zoomed["x"][1] - zoomed["x"][0]
    assert after["x"][1] == pytest.approx(after["latest"]) and after["latest"] > zoomed["last"]
    assert after["x"][1] - after["x"][0] == pytest.approx(width)
    assert after["y"] == zoomed["y"]  # the loss zoom stays
    follow.click()
    _double_click(page)
    wait(lambda: not _view(page)["zoomed"], "the view to reset")


def test_a_hidden_legend_entry_stays_hidden(page):
    frame = next(f for f in chart_frames(page) if f.query_selector(".legend"))
    entry = frame.locator(".legend .traces").filter(
        has=frame.locator(".legendtext", has_text=re.compile(r"^train loss$")))
    entry.locator(".legendtoggle").click()
    wait(lambda: _view(page)["hidden"] == ["train loss"], "the raw loss to be hidden")
    assert _refreshes(page, 5)["hidden"] == ["train loss"]
    entry.locator(".legendtoggle").click()
    wait(lambda: _view(page)["hidden"] == [], "the raw loss to be shown again")


def _is_125(step: float) -> bool:
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 5, 10))


def _axes(page) -> dict:
    """The training chart's drawn axes: type, range, length (px), tick values, positions (px)
    and labels."""
    return plot(page, """p => {
        const L = p._fullLayout, out = {};
        for (const name of ['xaxis2', 'yaxis', 'yaxis2', 'yaxis3']) {
            const a = L[name];
            if (!a || !a._vals) continue;
            out[name] = {type: a.type, range: a.range.slice(), length: a._length,
                         ticks: a._vals.map(v => v.x),
                         pixels: a._vals.map(v => a.l2p(v.x)), text: a._vals.map(v => v.text)};
        }
        return out; }""")


def _assert_round_ticks(axes: dict) -> None:
    """Every linear axis drawn has evenly spaced ticks, 1, 2 or 5 × 10^k apart."""
    for name, axis in axes.items():
        if axis["type"] != "linear":
            continue
        steps = np.diff(axis["ticks"])
        assert len(steps) and all(_is_125(s) for s in steps), (name, axis["ticks"])
        assert np.allclose(steps, steps[0]), (name, axis["ticks"])


def test_the_axes_are_readable(page):
    """Round ticks on every linear axis, also zoomed in; an LR panel tall enough for its
    labels; an LR axis spanning at least a decade around a constant LR."""
    wait(lambda: "yaxis2" in (_axes(page) or {}), "a validation metric's axis")
    axes = _axes(page)
    _assert_round_ticks(axes)
    lr = axes["yaxis3"]
    assert lr["type"] == "log" and lr["range"][1] - lr["range"][0] >= 1 - 1e-9
    assert lr["length"] >= 110  # px (the issue measured ~50)
    assert min(np.diff(sorted(lr["pixels"]))) >= 12, lr  # labels do not overlap
    assert {"2", "5"} <= set(lr["text"]), lr["text"]
    _drag_box(page, (0.35, 0.1), (0.55, 0.9))
    wait(lambda: _view(page).get("zoomed"), "the zoom to take")
    _refreshes(page, 1)
    _assert_round_ticks(_axes(page))
    _double_click(page)
    wait(lambda: not _view(page)["zoomed"], "the view to reset")


def test_a_bad_typed_lr_shows_an_error_and_sends_nothing(page, servers):
    _, store, _ = servers
    before = len(store.commands())
    exact = page.get_by_placeholder("exact LR")
    exact.fill("-3")
    exact.press("Enter")
    page.get_by_text(re.compile("Not a valid learning rate: lr must be")).wait_for()
    page.get_by_role("button", name="Apply", exact=True).click()
    page.get_by_text(re.compile("Not sent: lr must be")).wait_for()
    time.sleep(REFRESHES_S)
    assert len(store.commands()) == before
    exact.fill("")
    exact.press("Enter")
    page.get_by_text(re.compile("Not a valid learning rate")).wait_for(state="detached")


def test_halving_the_lr_and_apply_changes_the_trainer_and_draws_a_marker(page, servers,
                                                                          tmp_path):
    _, store, _ = servers
    assert store.summary()["lr"] == 0.01
    page.get_by_role("button", name="×½").click()
    page.locator("td strong", has_text="5e-03").wait_for()  # pending, in the knobs table
    page.get_by_role("button", name="Apply", exact=True).click()
    wait(lambda: store.summary()["lr"] == 0.005, "the trainer to apply lr 0.005")
    page.get_by_text(re.compile(r"learning rate 5e-03: applied at step \d+")).wait_for()
    markers = wait(lambda: _markers(page), "an intervention marker on the chart")
    assert re.search(r"lr 1e-02 → 5e-03", markers[-1]), markers
    wait(lambda: metric(page, "learning rate") == "5e-03", "the status row to follow")
    time.sleep(REFRESHES_S)  # let the curve run on past the marker for the screenshot
    _screenshot(page, tmp_path / "dashboard.png")


def test_pause_stops_the_step_counter_and_resume_restarts_it(page, servers):
    _, store, _ = servers
    page.get_by_role("button", name="Pause").click()
    wait(lambda: store.summary()["state"] == "paused", "the trainer to pause")
    wait(lambda: metric(page, "state").endswith("paused"), "the page to show the pause")
    paused_at = _shown_step(page)
    time.sleep(REFRESHES_S)
    assert _shown_step(page) == paused_at == store.summary()["step"]
    page.get_by_role("button", name="Resume").click()
    wait(lambda: store.summary()["state"] == "running", "the trainer to resume")
    wait(lambda: _shown_step(page) > paused_at, "the step counter to move again")


def test_the_knobs_panel_screenshot(page, tmp_path):
    page.get_by_role("button", name="×2").click()
    page.locator("td strong", has_text="1e-02").wait_for()
    page.mouse.move(0, 0)  # no tooltip over the panel
    time.sleep(REFRESHES_S)
    column = page.locator('[data-testid="stColumn"]').filter(
        has=page.get_by_text("Learning rate (log scale)")).last
    _screenshot(page, tmp_path / "dashboard-knobs.png", column)


def _range_test_plotted(page) -> bool:
    """The loss-vs-LR plot is drawn, by the stream_chart component."""
    return bool(plot(page, "p => p._fullData.length", trace="smoothed loss"))


def _apply_the_suggestion(page, store, suggested: float, current: float,
                          sent_before: int) -> None:
    """Apply suggested LR, confirming a big jump, and wait for the live run to take it."""
    page.get_by_role("button", name=re.compile(r"Apply suggested LR")).click()
    if needs_confirmation(suggested, current):
        # More than CONFIRM_FACTOR × the run's LR: a second click that names the factor.
        factor = format_factor(lr_factor(suggested, current))
        page.get_by_text(f"({factor} the current LR)?", exact=False).wait_for()
        assert len(store.commands()) == sent_before
        page.get_by_role("button", name="Yes, apply").click()
    wait(lambda: len(store.commands()) > sent_before, "the suggested LR to be sent")
    wait(lambda: math.isclose(store.summary()["lr"], suggested, rel_tol=1e-9),
          "the live run to take the suggested LR")
    command = store.commands()[-1]
    assert command.kind == "set" and command.source == "dashboard"
    assert json.loads(command.payload) == {"lr": suggested}


def test_lr_range_test_beside_the_live_run_and_applying_its_suggestion(page, servers,
                                                                         tmp_path):
    _, store, _ = servers
    page.locator("summary", has_text="LR range test").click()  # open the panel
    page.get_by_role("button", name="Run LR range test").click()
    result = wait(lambda: [r for r in store.results("lr_find") if r["status"] == "done"],
                   "the range test to finish")[-1]["payload"]
    assert store.summary()["state"] == "running"  # the live run went on training meanwhile
    wait(lambda: _range_test_plotted(page), "the loss-vs-LR plot")
    suggested = result["suggested_lr"]
    assert result["purpose"] == "continue"  # beside a live run: what to continue with
    page.get_by_text(f"{result['suggestion_rule']}: ", exact=False).first.wait_for()
    sent_before, current = len(store.commands()), store.summary()["lr"]
    if result["suggestion_rule"] in KEEP_RULES:  # no LR beat the run's own: nothing to apply
        page.get_by_text("Keep the run's LR: the test showed no better LR than its",
                         exact=False).wait_for()
        assert page.get_by_role("button", name=re.compile(r"Apply suggested LR")).count() == 0
        assert len(store.commands()) == sent_before
    else:
        _apply_the_suggestion(page, store, suggested, current, sent_before)
    assert page.locator(".js-plotly-plot").count() == 0  # both charts are components
    _screenshot(page, tmp_path / "lr-range-test.png")


def test_stop_ends_the_run_and_locks_the_knobs(page, servers):
    _, store, _ = servers
    page.get_by_role("button", name="Stop").click()
    wait(lambda: store.summary()["state"] == "stopped", "the trainer to stop")
    apply = page.get_by_role("button", name="Apply", exact=True)
    wait(apply.is_disabled, "the knobs to lock")
    page.get_by_text("The run is stopped: knobs are read-only.").wait_for()
    assert page.get_by_role("button", name="Pause").is_disabled()


def _pick_run(tab, name: str) -> None:
    """Open run ``name`` from the sidebar's run picker, as a person would."""
    tab.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(
        has=tab.get_by_text("Run", exact=True)).click()
    tab.get_by_role("option", name=re.compile(rf"^{re.escape(name)} ")).click()


def test_a_trainer_that_stopped_stepping_is_said_so(browser, servers):
    """A run whose trainer is alive (this process) but whose newest step is two minutes old,
    picked in the sidebar as a person would: the page says it has stopped stepping and shows
    0 steps/s, not the rate it last had."""
    url, store, _ = servers
    runs = Path(store.address).parent
    now = time.time()
    with SqliteStore(runs / "stuck", create=True) as stuck:
        stuck.set_meta(name="stuck", created=now - 600, status="running", heartbeat=now,
                       pid=os.getpid(), host=socket.gethostname(), task="digits",
                       optimizer="SGD", supported_knobs=["lr"], knobs={"lr": 0.01},
                       step=200, epoch=0, schedule={"shape": "constant"})
        stuck.append_metrics([(s, 0, now - 120 - (199 - s) * 0.5, 1.0, 0.01, 0.9, 0.0)
                              for s in range(200)])
    with _browse(browser, url) as tab:
        _pick_run(tab, "stuck")
        note = tab.get_by_text(re.compile(r"^No training step for 00:0[23]:"))
        note.wait_for()
        assert "although the trainer is alive" in note.inner_text()
        assert metric(tab, "steps/s") == "0.0" and metric(tab, "state").endswith("running")


def test_a_run_that_failed_says_why(browser, servers):
    """A loop that raised inside its Babysitter, picked in the sidebar: the page says the run
    failed and with which exception."""
    url, store, _ = servers
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="out of memory"), \
            Babysitter(opt, Path(store.address).parent / "crashed", flush_interval=0.05) as bs:
        for _ in range(20):
            bs.step(1.0)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with _browse(browser, url) as tab:
        _pick_run(tab, "crashed")
        tab.get_by_text("The run failed: RuntimeError: CUDA out of memory. Tried to allocate "
                        "2.00 GiB", exact=True).wait_for()
        assert metric(tab, "state").endswith("failed") and metric(tab, "step") == "20"


def test_an_interrupted_run_says_how_to_resume(browser, servers):
    """A `panda train` run whose trainer was killed (kill -9: its pid is gone, its status still
    "running"), picked in the sidebar: the page says what happened and the command to resume,
    from its newest checkpoint."""
    url, store, _ = servers
    killed = Path(store.address).parent / "killed"
    with SqliteStore(killed, create=True) as run:
        now = time.time()
        run.set_meta(name="killed", created=now - 60, status="running", heartbeat=now - 5,
                     pid=dead_pid(), host=socket.gethostname(), run_dir=str(killed),
                     config=asdict(TrainConfig(**config_values("digits"))), task="digits",
                     optimizer="SGD", supported_knobs=["lr"], knobs={"lr": 0.01}, step=40,
                     epoch=0, schedule={"shape": "constant"})
        run.append_metrics([(s, 0, now - 60 + s, 1.0, 0.01, 0.9, 0.0) for s in range(40)])
    checkpoint_path(killed, 30, "periodic", pinned=False).parent.mkdir()
    checkpoint_path(killed, 30, "periodic", pinned=False).write_bytes(b"")
    with _browse(browser, url) as tab:
        _pick_run(tab, "killed")
        note = tab.get_by_text(re.compile(r"^The trainer stopped without closing the run"))
        note.wait_for()
        assert "Its steps up to 40 are kept." in note.inner_text()
        assert (f"panda train --resume --run-dir {killed} from its checkpoint of step 30"
                in note.inner_text())
        assert metric(tab, "state").endswith("interrupted")


def test_the_server_log_has_no_warnings(servers):
    _, _, log = servers
    text = log.read_text()
    assert "Traceback" not in text, text
    assert not re.search(r"(?i)\bwarn(ing)?\b|deprecat", text), text


def test_a_dashboard_on_postgresql_watches_and_steers_a_trainer_writing_there(browser, pg_server,
                                                                              tmp_path):
    """The two-machine setup on one machine: trainer and dashboard share nothing but the
    database (the dashboard's runs directory is empty). The page shows the run's curve growing,
    and ×½ + Apply reaches the trainer through PostgreSQL."""
    with _serve(tmp_path, pg_server.new_database()) as (url, store, log), \
            _browse(browser, url) as tab:
        assert store.backend == "postgresql"
        tab.get_by_text(re.compile(r"runs in postgresql://panda@127\.0\.0\.1")).wait_for()
        first = wait(lambda: _loss_points(tab), "points on the chart")
        wait(lambda: _loss_points(tab) > first, "the chart to grow")
        tab.get_by_role("button", name="×½").click()
        tab.locator("td strong", has_text="5e-03").wait_for()
        tab.get_by_role("button", name="Apply", exact=True).click()
        wait(lambda: store.summary()["lr"] == 0.005, "the trainer to apply lr 0.005")
        markers = wait(lambda: _markers(tab), "an intervention marker on the chart")
        assert re.search(r"lr 1e-02 → 5e-03", markers[-1]), markers
        time.sleep(REFRESHES_S)
        _screenshot(tab, tmp_path / "dashboard-postgres.png")
        assert "Traceback" not in log.read_text()
