"""The page in a real browser (issues #13, #15, #18): the access token covers every action, the
page stays consistent after each action, and a charlm run shows its own schedule beside the LR
Panda's knob sets.

Like ``test_browser.py``: Playwright drives Debian's Chromium (never ``playwright install``)
against real ``panda dashboard`` and ``panda train`` processes.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from browsing import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    TIMEOUT_S,
    VIEWPORT,
    answers,
    child_env,
    free_port,
    metric,
    plot,
    sync_api,
    wait,
    wait_for_knobs,
)
from helpers import holds_for

from trainer.knobs import format_sci
from trainer.store import StoreError
from trainer.store.address import open_store

pytestmark = [pytest.mark.browser, pytest.mark.slow]

QUIET_S = 3.0      # how long "nothing reaches the store" is watched
TOKEN = "s3cret-7d1e"
# Controls that may stay enabled without the token, because they change nothing: the token
# field itself, help icons, views (chart settings, the runs table's filter and tools, the run
# picker), the fields of the new-run form (its Start training is what acts, and it is
# disabled) and preparing an export (it only reads).
HARMLESS = re.compile("|".join([
    r"button:submit: Collapse sidebar", r"button:button: Help for .*",
    r"input:password: Access token", r"button:button: (Show|Hide) password",
    r"input:text: (task|optimizer|run name)", r"input:range: (learning rate|momentum β|weight "
    r"decay)", r"input:number: (epochs|seconds per step.*)",
    r"button:button: (Open|Decrement|Increment)", r"input:text: Run", r"input:radio: .*",
    r"button:submit: Prepare export", r"input:text: filter",
    r"button:submit: (Show/hide columns|Download as CSV|Search|Fullscreen)",
    r"input:range: Smoothing \(EMA β\)", r"input:text: Steps shown",
    r"input:checkbox: (log-scale loss|follow latest)"]))
ACTIONS = ("Apply", "Pause", "Resume", "Undo", "Stop", "×½", "×2", "Run LR range test",
           "Start training", "Apply decay")


def _opened(run_dir: Path):
    try:
        return open_store(run_dir)
    except StoreError:
        return None


@contextmanager
def _serve(root: Path, train: list[str], dashboard: list[str] = ()):
    """``panda train ARGS`` on ``root/runs/<name>`` and ``panda dashboard`` on ``root/runs``;
    yields (url, the run's store, the dashboard's log)."""
    runs, port = root / "runs", free_port()
    run_dir = runs / train[0]
    panda = [sys.executable, "-m", "trainer.cli"]
    logs = [open(root / name, "w") for name in ("train.log", "dashboard.log")]  # noqa: SIM115
    procs = [subprocess.Popen([*panda, "train", "--run-dir", str(run_dir), *train[1:]],
                              stdout=logs[0], stderr=subprocess.STDOUT, env=child_env(), cwd=REPO),
             subprocess.Popen([*panda, "dashboard", "--runs-dir", str(runs), "--port",
                               str(port), *dashboard], stdout=logs[1],
                              stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)]
    store = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: answers(url + "/_stcore/health"), "the dashboard to answer")
        store = wait(lambda: _opened(run_dir), "the trainer to create its store")
        wait(lambda: store.summary()["state"] == "running", "the trainer to run")
        yield url, store, root / "dashboard.log"
    finally:
        if store is not None:
            store.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser):
    """A browser profile of its own (its own tabs, sessionStorage and cache)."""
    context = browser.new_context(viewport=VIEWPORT)
    yield context
    context.close()


@contextmanager
def _tab(context, url: str):
    """A tab on the dashboard at ``url``, once its knobs are drawn."""
    tab = context.new_page()
    try:
        tab.set_default_timeout(TIMEOUT_S * 1000)
        tab.goto(url)
        wait_for_knobs(tab)
        yield tab
    finally:
        tab.close()


# --- the access token --------------------------------------------------------------------------

def _open_everything(page) -> None:
    """Expand every collapsed panel, so the controls inside are on the page."""
    for summary in page.locator("details > summary").all():
        if summary.is_visible() and not summary.evaluate("s => s.parentElement.open"):
            summary.click()


def _enabled_controls(page) -> list[str]:
    """Every enabled control shown on the page (main document): ``kind: name``."""
    return page.evaluate("""() => {
        const out = [];
        const name = (e) => (e.getAttribute('aria-label') || e.getAttribute('placeholder')
            || e.closest('[data-testid]')?.querySelector('[data-testid="stWidgetLabel"]')
                ?.innerText || e.innerText || '').trim();
        for (const e of document.querySelectorAll('button, input, textarea, [role="combobox"]')) {
            if (e.disabled || e.getAttribute('aria-disabled') === 'true') continue;
            if (e.closest('[data-testid="stToolbar"], [data-testid="stHeader"]')) continue;
            if (e.type !== 'range' && !e.offsetParent) continue;  // not shown
            if (e.closest('[data-testid="stSlider"]')?.querySelector('[data-disabled]')) continue;
            const where = name(e) ? '' : ` (in ${e.closest('[data-testid]')?.dataset.testid})`;
            out.push(`${e.tagName.toLowerCase()}${e.type ? ':' + e.type : ''}: ${name(e)}${where}`);
        }
        return out; }""")


def test_with_a_token_nothing_acts_until_it_is_given(context, tmp_path):
    """The issue's scenario: Apply suggested LR, Start training and the range test all worked
    without the token. Now no enabled control can change anything, forced clicks reach
    nothing, a wrong token is refused with a message, and the right one unlocks the tab,
    survives a reload there and appears in no URL and no log."""
    with _serve(tmp_path, ["live", "--task", "digits", "--epochs", "200", "--step-delay",
                           "0.01"], ["--token", TOKEN]) as (url, store, log):
        store.add_result("lr_find", {  # a finished range test: "Apply suggested LR" shows
            "lrs": [1e-4, 1e-2, 1.0], "losses": [2.0, 1.0, 9.0],
            "smoothed_losses": [2.0, 1.0, 9.0], "suggested_lr": 8.3, "suggestion_range": [1, 9]})
        with _tab(context, url) as page:
            page.get_by_role("button", name=re.compile("Apply suggested LR")).wait_for()
            _open_everything(page)
            page.get_by_role("button", name="Start training").wait_for()
            assert [c for c in _enabled_controls(page) if not HARMLESS.fullmatch(c)] == []
            suggested = page.get_by_role("button", name=re.compile("Apply suggested LR"))
            acting = [page.get_by_role("button", name=n, exact=True) for n in ACTIONS]
            for control in [*acting, suggested, page.get_by_placeholder("exact LR"),
                            page.get_by_role("slider", name="Learning rate (log scale)")]:
                assert control.is_disabled()
            for control in [*acting, suggested]:  # pressed anyway
                control.click(force=True)
            runs = tmp_path / "runs"
            holds_for(lambda: store.commands() == [] and len(store.results()) == 1
                      and [p.name for p in runs.iterdir()] == ["live"],
                      QUIET_S, what="nothing reaching the store")

            field = page.get_by_role("textbox", name="Access token")
            field.fill("wrong-token")
            field.press("Enter")
            page.get_by_text("Wrong token: the page stays locked.").wait_for()
            assert page.get_by_role("button", name="Apply", exact=True).is_disabled()
            field.fill(TOKEN)
            field.press("Enter")
            apply = page.get_by_role("button", name="Apply", exact=True)
            wait(apply.is_enabled, "the knobs to unlock")
            page.get_by_role("button", name="×½").click()
            apply.click()
            wait(lambda: store.summary()["lr"] == 0.005, "the trainer to apply lr 0.005")
            assert TOKEN not in page.url

            page.reload()  # the same tab: unlocked again from its sessionStorage
            wait_for_knobs(page)
            wait(page.get_by_role("button", name="Apply", exact=True).is_enabled,
                  "the reloaded tab to unlock itself")
            assert TOKEN not in page.url
        with _tab(context, url) as other:  # another tab holds no token
            other.get_by_role("textbox", name="Access token").wait_for()
            assert other.get_by_role("button", name="Apply", exact=True).is_disabled()
        assert TOKEN not in log.read_text()


# --- one consistent page -----------------------------------------------------------------------

def _page_state(page) -> dict:
    """Header LR and decay, the knobs table's applied LR, the decay panel's label and the
    messages, read in one go (one moment of the page)."""
    return page.evaluate("""() => {
        const metric = (label) => {
            for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
                const l = m.querySelector('[data-testid="stMetricLabel"]');
                const v = m.querySelector('[data-testid="stMetricValue"]');
                if (l && v && l.innerText.trim() === label) return v.innerText.trim();
            }
            return null; };
        let tableLr = null;
        for (const row of document.querySelectorAll('table tr')) {
            const cells = Array.from(row.querySelectorAll('td')).map(c => c.innerText.trim());
            if (cells[0] === 'LR') tableLr = cells[1];
        }
        // the summary's text after its icon (an icon font's ligature name, e.g. 'expand_more')
        const decay = Array.from(document.querySelectorAll('summary'))
            .map(s => s.innerText).filter(t => t.includes('LR decay:'))
            .map(t => t.slice(t.indexOf('LR decay:')).trim())[0] || null;
        const messages = Array.from(document.querySelectorAll('[data-testid="stAlert"]'))
            .map(a => a.innerText.trim());
        return {lr: metric('learning rate'), decay: metric('decay'), tableLr, decayPanel: decay,
                messages}; }""")


def _choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox ``label``: click it until its menu is open (a click
    while the panel around it is still sliding open can miss, as a person's can), then click
    the option."""
    box = page.get_by_label(label)

    def menu_open() -> bool:
        if box.get_attribute("aria-expanded") != "true":
            box.click()
        return page.get_by_role("option", name=option).is_visible()

    wait(menu_open, f"the {label} menu to open")
    page.get_by_role("option", name=option).click()


def _panel_open(page, label: str) -> bool:
    return page.locator("details", has=page.locator("summary", has_text=label)).evaluate(
        "d => d.open")


def test_after_each_action_the_page_agrees_with_itself(context, tmp_path):
    """A stale error is cleared by the next action; after each action the header, the knobs
    table, the decay panel and the message say the same thing at the same moment; a panel
    left open stays open while notes come and go above it."""
    with _serve(tmp_path, ["live", "--task", "digits", "--epochs", "200", "--step-delay",
                           "0.01"]) as (url, store, _), _tab(context, url) as page:
        page.locator("summary", has_text="LR decay:").click()
        exact = page.get_by_placeholder("exact LR")
        exact.fill("0")
        exact.press("Enter")
        page.get_by_role("button", name="Apply", exact=True).click()
        page.get_by_text(re.compile(r"Not sent: lr must be in \(0, 1000\], got 0")).wait_for()
        exact.fill("0.006")
        exact.press("Enter")
        page.get_by_role("button", name="Apply", exact=True).click()
        page.get_by_text(re.compile(r"learning rate 6e-03: applied at step \d+")).wait_for()
        page.get_by_text(re.compile(r"LR: your 1e-02 × 0\.6 → 6e-03 now")).wait_for()
        state = _page_state(page)
        assert not [m for m in state["messages"] if "Not sent" in m], state
        assert state["lr"] == state["tableLr"] == "6e-03", state
        assert store.summary()["lr"] == 0.006
        # The message, the typed-LR hint and the note above came and went: the panel stayed.
        assert _panel_open(page, "LR decay:")

        _choose(page, "shape", "cosine to a floor")
        page.get_by_role("button", name="Apply decay").click()
        page.get_by_text(re.compile(r"decay cosine: applied at step \d+")).wait_for()
        state = _page_state(page)
        assert state["decay"] == "cosine" and state["decayPanel"] == "LR decay: cosine to a floor"
        assert state["lr"] == state["tableLr"], state  # a decaying LR: both from one read
        assert not [m for m in state["messages"] if "learning rate 6e-03" in m], state


# --- many runs ---------------------------------------------------------------------------------

ROW_PX = 35   # st.dataframe's row height (and its header's)


def _title(page) -> str:
    return page.locator("h4").first.inner_text()


def test_the_runs_table_filters_and_a_click_opens_a_run(context, tmp_path, make_run):
    """The runs table lists every run; its filter keeps the matching ones; one click on a
    row opens that run (title, status row, knobs and the run picker), and it stays open
    through the refreshes that follow (the picker's old value in the browser must not bring
    the last run back). The table's panel builds nothing while closed (app/folding.py), and
    stays open across the runs' refreshes until closed."""
    make_run("other", status="paused", knobs={"lr": 0.003})
    with _serve(tmp_path, ["live", "--task", "digits", "--epochs", "200", "--step-delay",
                           "0.01"]) as (url, _, _log), _tab(context, url) as page:
        wait(lambda: _title(page).startswith("live ·"), "the live run on show")
        tables = page.locator('[data-testid="stDataFrame"]')
        assert tables.count() == 0 and page.get_by_text("2 of 2 runs").count() == 0
        runs_panel = page.locator("summary").filter(has_text=re.compile(r"Runs$"))
        runs_panel.click()
        page.get_by_text("2 of 2 runs").wait_for()
        words = page.get_by_placeholder(re.compile("^filter: words"))
        words.fill("paused")
        words.press("Enter")
        page.get_by_text("1 of 2 runs").wait_for()
        table = page.locator('[data-testid="stDataFrame"]').first
        table.scroll_into_view_if_needed()
        box = table.bounding_box()
        page.mouse.click(box["x"] + 18, box["y"] + ROW_PX * 1.5)  # the row's selection box
        wait(lambda: _title(page).startswith("other ·"), "the clicked run to open")
        wait(lambda: metric(page, "state") == "paused"
              and metric(page, "learning rate") == "3e-03", "its status row")
        picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(
            has=page.get_by_text("Run", exact=True))
        assert picker.locator("input").input_value() == "other · paused"
        holds_for(lambda: _title(page).startswith("other ·"), QUIET_S,
                  what="the opened run to stay on show")
        assert page.get_by_text("1 of 2 runs").count() == 1  # still open, filter kept
        runs_panel.click()
        wait(lambda: tables.count() == 0, "the closed panel's table to go")

        def closed_and_empty() -> bool:
            return tables.count() == 0 and not runs_panel.evaluate("s => s.parentElement.open")

        # Quick double-clicks (two clicks 50 and 150 ms apart): open, then closed, and it stays
        # so (the second click was once taken for the panel's previous identity, and left it
        # drawn open and empty).
        for gap_ms in (50, 150):
            runs_panel.click()
            page.wait_for_timeout(gap_ms)
            runs_panel.click()
            wait(closed_and_empty, "the panel closed again")
            holds_for(closed_and_empty, 2.0, what="the panel to stay closed and empty")
        runs_panel.click()
        page.get_by_text("1 of 2 runs").wait_for()  # it opens again, its filter kept


# --- a charlm run ------------------------------------------------------------------------------

def test_a_charlm_run_shows_its_schedule_and_a_change_lands_and_is_marked(context, tmp_path):
    """charlm writes its own warm-up + cosine (the user's schedule); the chart draws it
    dashed beside the LR in force, ×½ + Apply sends half the LR the run was using and lands
    as a factor on the schedule (the status row says which), and the change is marked on the
    chart.

    The factor is the sent LR over the schedule's LR at the landing, a little later than the
    LR that was halved was used: on a moving schedule it is near ½, not ½.
    """
    with _serve(tmp_path, ["lm", "--task", "charlm", "--epochs", "1"]) as (url, store, _), \
            _tab(context, url) as page:
        def lr_traces():
            return plot(page, "p => p._fullData.filter(t => t.uid === 'lr' || "
                               "t.uid === 'user lr').map(t => t.uid).sort()", "learning rate")

        wait(lambda: lr_traces() == ["lr", "user lr"], "the schedule and the LR drawn")
        page.get_by_role("button", name="×½").click()
        page.get_by_role("button", name="Apply", exact=True).click()
        page.get_by_text(re.compile(r"learning rate [0-9.e+-]+: applied at step \d+")).wait_for()
        command = store.commands()[-1]
        sent, landed = json.loads(command.payload)["lr"], command.applied_step

        def halved_from() -> list[float]:  # LRs used before the landing that ×½ halved
            used = store.metrics_since(-1, columns=["step", "lr"])
            return [lr for step, lr in zip(used["step"], used["lr"])
                    if step < landed and math.isclose(sent, lr / 2, rel_tol=1e-5)]

        wait(halved_from, "the LR that was halved among those used before the landing")
        factor = store.meta()["lr_composition"]["factor"]
        assert 0.25 < factor < 1.0, factor
        page.get_by_text(re.compile(
            rf"LR: your schedule × {re.escape(f'{factor:.3g}')} → [0-9.e+-]+ now")).wait_for()
        # Panda's own decay is constant; the status row says the LR follows the user's.
        wait(lambda: metric(page, "decay") == "yours", "the decay shown")
        markers = wait(lambda: plot(page, "p => { const t = p._fullData.find("
                                      "t => t.name === 'interventions'); return t ? "
                                      "Array.from(t.text) : null; }", "learning rate"),
                        "an intervention marker")
        assert re.search(rf"lr \S+ → {re.escape(format_sci(sent))} at step {landed}\b",
                         markers[-1]), (markers, sent, landed)

        def newest_lrs():  # (LR in force, the user's own) at the newest step drawn
            return plot(page, """p => {
                const lr = p._fullData.find(t => t.uid === 'lr');
                const user = p._fullData.find(t => t.uid === 'user lr');
                const at = (t) => t.y[t._length - 1];
                return [at(lr), at(user)]; }""", "learning rate")

        def on_the_schedule_times_the_factor() -> bool:
            lr, user = newest_lrs()
            return math.isclose(lr, user * factor, rel_tol=1e-3)

        wait(on_the_schedule_times_the_factor, "the chart's LR at the factor × the schedule's")
