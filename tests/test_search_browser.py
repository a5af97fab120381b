"""A search in a real browser: ``panda search`` trains several trials, ``panda dashboard``
shows its study, and a person opens one trial from the table and changes its LR.

Playwright drives Debian's Chromium (never ``playwright install``); without it the module is
skipped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from browsing import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    TIMEOUT_S,
    answers,
    chart_frames,
    child_env,
    free_port,
    sync_api,
    wait,
)
from helpers import SCREENSHOTS_ENV, screenshot, wait_until

from trainer.search import study as studies
from trainer.store import SqliteStore, StoreError

pytestmark = [pytest.mark.browser, pytest.mark.slow]

STUDY = "web"
ROW_PX = 35      # st.dataframe's row height (and its header's)
OPEN_TRY_S = 6   # a click that opened nothing by then is tried again


def _trials(runs: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        storage = studies.open_storage(runs, STUDY)
        return optuna.load_study(study_name=STUDY, storage=storage).trials
    except (studies.StudyError, KeyError):
        return []


def _running(runs: Path) -> list[optuna.trial.FrozenTrial]:
    return [t for t in _trials(runs) if t.state == optuna.trial.TrialState.RUNNING
            and "run" in t.user_attrs]


@contextmanager
def _serve(root: Path):
    """A slow search (two workers, three trials) and the dashboard on its runs directory."""
    runs, port = root / "runs", free_port()
    panda = [sys.executable, "-m", "trainer.cli"]
    logs = [open(root / name, "w") for name in ("search.log", "dashboard.log")]  # noqa: SIM115
    search = subprocess.Popen(
        [*panda, "search", "--task", "digits", "--trials", "3", "--parallel", "2",
         "--epochs", "1000", "--step-delay", "0.02", "--prune", "none", "--lr", "1e-2:3e-2",
         "--beta", "0.9",
         "--batch-size", "32", "--decay", "constant",
         "--study", STUDY, "--runs-dir", str(runs)],
        stdout=logs[0], stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
        start_new_session=True)
    dashboard = subprocess.Popen([*panda, "dashboard", "--runs-dir", str(runs), "--port",
                                  str(port)], stdout=logs[1], stderr=subprocess.STDOUT,
                                 env=child_env(), cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: answers(url + "/_stcore/health"), "the dashboard to answer")
        wait(lambda: len(_running(runs)) == 2, "two trials to train")
        yield url, runs, root / "dashboard.log"
    finally:
        for proc in (search, dashboard):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the search stops its workers
        for proc in (search, dashboard):
            try:
                proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL) if proc is search else proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def _lr_of(runs: Path, run: str) -> float | None:
    try:
        with SqliteStore(runs / run) as store:
            return store.summary()["lr"]
    except StoreError:
        return None


def _title(page) -> str:
    return page.locator("h4").first.inner_text()


def _click_row(page, row: int, run: str, shown: str) -> None:
    """Click the selection box of the table's ``row`` until ``run`` opens. The page above the
    table grows and shrinks as it refreshes (a hint line, an expander), so each try measures
    the table again; a click that missed leaves the page on ``shown``."""
    deadline = time.monotonic() + TIMEOUT_S
    while not _title(page).startswith(f"{run} ·"):
        assert _title(page).startswith(f"{shown} ·"), f"opened {_title(page)}, not {run}"
        assert time.monotonic() < deadline, f"could not open {run} from the table"
        table = page.locator('[data-testid="stTabs"] [data-testid="stDataFrame"]').first
        table.scroll_into_view_if_needed()
        box = table.bounding_box()
        page.mouse.click(box["x"] + 18, box["y"] + ROW_PX * (row + 1) + ROW_PX / 2)
        try:
            wait_until(lambda: not _title(page).startswith(f"{shown} ·"), OPEN_TRY_S, 0.1)
        except AssertionError:
            continue


def _log_lr_chart_width(page) -> int:
    """The drawn width of the chart whose x axis is logarithmic (the study's loss vs LR)."""
    for frame in chart_frames(page):
        try:
            width = frame.evaluate("""() => {
                const p = document.querySelector('.js-plotly-plot');
                return p && p._fullLayout && p._fullLayout.xaxis.type === 'log'
                    && p.getBoundingClientRect().width; }""")
        except sync_api.Error:  # the frame is still loading
            continue
        if width:
            return width
    return 0


def _pending_equals_applied(page) -> bool:
    """The knobs table shows nothing pending (the widgets sit on the run's values)."""
    text = page.locator("table").filter(has_text="pending").first.inner_text()
    return all(cells[1] == cells[2] for cells in
               (line.split("\t") for line in text.splitlines()[1:]) if len(cells) == 3)


@contextmanager
def _browse(url: str, shots: Path):
    """A tab on ``url``; on a failure, a full-page screenshot in ``shots`` shows why."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.set_default_timeout(TIMEOUT_S * 1000)
        page.goto(url)
        try:
            yield page
        except BaseException:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_open_a_trial_from_the_study_table_and_change_its_lr(tmp_path):
    with _serve(tmp_path) as (url, runs, dashboard_log), _browse(url, tmp_path) as page:
        page.get_by_text(f"Study {STUDY}", exact=True).wait_for()
        shown = wait(lambda: re.match(rf"({STUDY}-\d+) ·", _title(page)), "a trial's run")[1]
        # The table lists trials newest first: trial 2 (waiting), 1, 0. Open the running
        # trial that is not shown, by clicking its row's selection box.
        other = next(t for t in _running(runs) if t.user_attrs["run"] != shown)
        name = other.user_attrs["run"]
        _click_row(page, 2 - other.number, name, shown)
        # While the page switches runs, the last run's faded widgets stay until replaced.
        wait(lambda: page.get_by_text("Learning rate (log scale)").count() == 1,
              "the trial's knobs alone")
        wait(lambda: _pending_equals_applied(page), "the knobs to show the trial's values")
        before = _lr_of(runs, name)
        # One stop down the LR slider, from the keyboard, as a person would.
        page.locator('[data-testid="stSlider"]').filter(
            has_text="Learning rate (log scale)").get_by_role("slider").press("ArrowLeft")
        pending = page.locator("td strong").first  # pending, in the knobs table
        pending.wait_for()
        wanted = float(pending.inner_text())
        assert wanted < before
        page.get_by_role("button", name="Apply", exact=True).click()
        wait(lambda: _lr_of(runs, name) == pytest.approx(wanted), "the trial to take it")
        page.get_by_text(re.compile(r"learning rate \S+: applied at step \d+")).wait_for()
        # The change is on the Optuna trial too: its result is marked as babysat.
        trial = wait(lambda: next((t for t in _trials(runs) if t.number == other.number
                                    and t.user_attrs.get("manual")), None),
                      "the trial to record the change")
        (change,) = trial.user_attrs["interventions"]
        assert change["kind"] == "set" and change["source"] == "dashboard"
        # The study's charts are the chart component too, drawn at full width once their tab
        # is opened (plotly.js sizes a plot drawn while its tab was hidden when it shows).
        page.get_by_role("tab", name="Loss vs LR").click()
        wait(lambda: _log_lr_chart_width(page) > 400, "the loss-vs-LR chart at full width")
        page.get_by_role("tab", name="Trials").click()
        if os.environ.get(SCREENSHOTS_ENV):  # the README's picture: the curve past the marker
            time.sleep(2.5)
        # The README's picture (`make screenshots`, helpers.screenshot).
        screenshot(page.locator('[data-testid="stMainBlockContainer"]'),
                   tmp_path / "dashboard-study.png")
    log = dashboard_log.read_text()
    assert "Traceback" not in log, log
