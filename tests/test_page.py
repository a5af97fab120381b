"""The page as one consistent view (issue #18): one snapshot per refresh, one message per run,
no rebuilt chart when nothing changed, the runs table, and overlays of compared runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import APP, APP_TIMEOUT_S, click_panel, knob_widget, open_panels
from streamlit.testing.v1 import AppTest

import app.charts
from app.charts import training_figure
from app.controls import key
from app.panels import DECAY_PANEL, NEW_RUN_PANEL
from app.runs_table import PANEL_KEY, matches
from trainer.store import SqliteStore


@pytest.fixture
def page(open_page):
    """Factory: prepare a run, open the dashboard on its runs dir, return (AppTest, run_dir)."""
    return open_page


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _table(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("| knob |"))


def _trainer_applies(run_dir: Path, **knobs) -> None:
    """Play the trainer: apply the pending set command, knobs first, verdict last (its order)."""
    with SqliteStore(run_dir) as store:
        (command,) = store.pending_commands()
        store.set_meta(knobs={"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, **knobs})
        store.resolve_commands([(command.id, "applied", 21, None)])


def test_a_message_is_replaced_by_the_next_action(page):
    at, run_dir = page(status="paused")
    knob_widget(at, "exact").input("0").run()
    at.button(key=key("live", "apply")).click().run()
    assert any(e.value.startswith("Not sent: lr must be") for e in at.error)
    knob_widget(at, "exact").input("0.006").run()
    assert not any("Not a valid" in e.value for e in at.error)  # the field's hint went
    at.button(key=key("live", "apply")).click().run()
    assert not any("Not sent" in e.value for e in at.error)  # the older error went too
    _trainer_applies(run_dir, lr=0.006)
    at.run()
    assert any("learning rate 6e-03: applied at step 21" in s.value for s in at.success)
    assert _metric(at, "learning rate") == "6e-03"   # header, table and message agree
    assert "| LR | 6e-03 | 6e-03 |" in _table(at)
    at.button(key=key("live", "resume")).click().run()  # a command the trainer refuses …
    with SqliteStore(run_dir) as store:
        (command,) = store.pending_commands()
        store.resolve_commands([(command.id, "rejected", None, "not now")])
    at.run()
    assert not at.success  # … replaces the success message
    assert any("resume: rejected by the trainer: not now" in e.value for e in at.error)


def test_a_click_before_the_browser_drew_the_moved_widgets_does_not_undo_them(page):
    """×½ replaces the LR slider and the exact-LR field by new widgets (app.controls). A
    browser that has not drawn them yet still reports the old ones with the next click (Apply
    right after ×½), and Streamlit calls the old widgets' on_change: that must change nothing
    (it emptied the field and Apply said "Nothing to apply")."""
    at, run_dir = page(status="paused")
    old_ids = {knob_widget(at, "lr").id, knob_widget(at, "exact").id}
    # AppTest sends the widgets of the last run only; these are what the browser still holds.
    old = [w for w in at._tree.get_widget_states().widgets if w.id in old_ids]
    at.button(key=key("live", "half")).click().run()
    assert knob_widget(at, "exact").value == "0.005"
    at.button(key=key("live", "apply")).click()
    states = at._tree.get_widget_states()
    fresh = list(states.widgets)
    del states.widgets[:]
    states.widgets.extend([*old, *fresh])  # in the page's order: the knobs above Apply
    at._run(states)
    assert not at.exception, at.exception
    with SqliteStore(run_dir) as store:
        assert [json.loads(c.payload) for c in store.commands()] == [{"lr": 0.005}]


def test_the_decay_panel_reads_the_schedule_in_force(page):
    at, run_dir = page()
    assert any(e.label == "LR decay: constant" for e in at.expander)
    open_panels(at, key("live", DECAY_PANEL))
    at.selectbox(key=key("live", "shape")).select("cosine")
    at.button(key=key("live", "apply_decay")).click().run()
    with SqliteStore(run_dir) as store:
        (command,) = store.pending_commands()
        store.set_meta(schedule={"shape": "cosine", "rate": 0.1, "total_epochs": 100.0})
        store.resolve_commands([(command.id, "applied", 21, None)])
    at.run()
    assert any(e.label == "LR decay: cosine to a floor" for e in at.expander)
    assert _metric(at, "decay") == "cosine"
    assert any("decay cosine: applied at step 21" in s.value for s in at.success)
    at.session_state[key("live", DECAY_PANEL)] = False  # closed, then the shape changes …
    at.run()
    assert all(s.key != key("live", "shape") for s in at.selectbox)  # not built while closed
    with SqliteStore(run_dir) as store:
        store.set_meta(schedule={"shape": "step", "rate": 0.5, "step_epochs": 10.0})
    open_panels(at, key("live", DECAY_PANEL))  # … reopened: it starts at the shape in force
    assert at.selectbox(key=key("live", "shape")).value == "step"


def test_a_refresh_with_nothing_new_does_not_rebuild_the_chart(page, monkeypatch):
    at, run_dir = page(status="paused")
    built = []

    def counting(*args, **kwargs):
        built.append(1)
        return training_figure(*args, **kwargs)

    # The page's script imports it afresh at each run (AppTest runs the file, not the module).
    monkeypatch.setattr(app.charts, "training_figure", counting)
    at.run()
    at.run()
    assert built == []  # nothing new: the same chart text again
    with SqliteStore(run_dir) as store:
        store.append_metrics([(20, 0, time.time(), 0.05, 0.01, 0.9, 0.0)])
    at.run()
    assert built == [1]


def test_the_decay_shape_starts_at_the_one_in_force_after_another_run_was_shown(
        make_run, tmp_path, monkeypatch):
    """The panel stays open for a run while another is shown; back on it, the shape shown is
    the one now in force, not the one the selectbox started at before (Apply decay would
    have sent that)."""
    make_run("other", status="paused")
    live = make_run("live")
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    at = open_panels(AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run(),
                     key("live", DECAY_PANEL))
    assert at.selectbox(key=key("live", "shape")).value == "constant"
    at.selectbox(key="run_picker").select("other").run()
    with SqliteStore(live) as store:
        store.set_meta(schedule={"shape": "step", "rate": 0.5, "step_epochs": 10.0})
    at.selectbox(key="run_picker").select("live").run()
    assert not at.exception, at.exception
    assert at.selectbox(key=key("live", "shape")).value == "step"


def test_a_panel_opens_and_closes_with_clicks_on_its_header_and_builds_only_while_open(page):
    """The expander's own state, as the browser sends it, opens and closes the panel (the
    callback of app.folding), and what is inside is built only while it is open."""
    at, _ = page()
    assert not at.dataframe and at.session_state[PANEL_KEY] is False
    click_panel(at, "Runs", True)
    assert not at.exception, at.exception
    assert at.session_state[PANEL_KEY] is True and len(at.dataframe[0].value) == 1
    at.run()  # a refresh keeps it open
    assert len(at.dataframe) == 1
    click_panel(at, "Runs", False)
    assert at.session_state[PANEL_KEY] is False and not at.dataframe


def test_the_new_run_form_keeps_its_entries_while_closed(page):
    """Closing the panel drops its widgets from the page (app.folding); what the person had
    chosen comes back with it (the task, and the knobs it filled in). Entries typed into the
    form and not yet submitted live in the browser until Start training, and go with it."""
    at, _ = page()
    open_panels(at, NEW_RUN_PANEL)
    at.selectbox(key="new_task").select("charlm").run()
    at.session_state[NEW_RUN_PANEL] = False
    at.run()
    assert all(s.key != "new_task" for s in at.selectbox)
    open_panels(at, NEW_RUN_PANEL)
    assert at.selectbox(key="new_task").value == "charlm"
    assert at.selectbox(key="new_optimizer").value == "adamw"  # charlm's, filled in
    assert at.select_slider(key="new_lr").value == 3e-3


def test_the_runs_table_sorts_filters_and_opens_a_run(make_run, tmp_path, monkeypatch):
    make_run("first", status="paused")
    second = make_run("second", status="running", knobs={"lr": 0.003})
    with SqliteStore(second) as store:
        store.set_meta(created=time.time() + 60, tags=["sweep-a"],
                       parent={"run": "first", "step": 10})
        store.append_validation([(5, 0, time.time(), "loss", 0.7),
                                 (10, 0, time.time(), "loss", 0.4),
                                 (15, 0, time.time(), "loss", math.nan)])
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    assert not at.exception, at.exception
    assert not at.dataframe  # nothing built, nor any run read, while the panel is closed
    open_panels(at, PANEL_KEY)
    table = at.dataframe[0].value
    assert list(table.columns) == ["run", "state", "step", "best val loss", "LR now",
                                   "started", "tags"]
    rows = table.set_index("run")
    assert rows.loc["second", "best val loss"] == pytest.approx(0.4)
    assert rows.loc["second", "LR now"] == pytest.approx(0.003)
    assert rows.loc["second", "tags"] == "digits, branch of first, sweep-a"
    assert list(table["run"]) == ["second", "first"]  # newest first
    at.text_input(key="runs_filter").input("paused").run()
    assert list(at.dataframe[0].value["run"]) == ["first"]
    assert matches({"run": "a", "state": "running", "tags": "charlm, sweep-a"}, "SWEEP charlm")


def test_compare_draws_the_other_runs_validation_and_lr():
    steps = np.arange(100, dtype=float)
    other = {"step": steps, "loss": np.linspace(2, 1, 100), "lr": np.where(steps < 50, 0.1, 0.05),
             "val": {"loss": ([49, 99], [1.5, 1.2])}}
    fig = training_figure({"step": steps, "loss": np.ones(100), "lr": np.full(100, 0.01)},
                          {}, [], overlays={"other": other})
    traces = {t.uid: t for t in fig.data}
    assert list(traces["overlay val other"].y) == [1.5, 1.2]
    lr = traces["overlay lr other"]
    assert lr.yaxis == "y3" and set(np.asarray(lr.y)) == {0.1, 0.05}
    assert traces["overlay other"].line.dash == "dot"
    assert fig.layout.yaxis3.range[1] >= math.log10(0.1)  # the LR axis holds both runs


def test_compare_reaches_the_chart(make_run, tmp_path, monkeypatch):
    make_run("first")
    make_run("second")
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    shown = at.selectbox(key="run_picker").value
    other = "first" if shown == "second" else "second"
    at.multiselect(key="compare").select(other).run()
    chart = next(c for c in at.get("component_instance")
                 if c.proto.component_name == "app.stream_chart.stream_chart")
    uids = [t.get("uid") for t in json.loads(json.loads(chart.proto.json_args)["figure"])["data"]]
    assert {f"overlay {other}", f"overlay lr {other}"} <= set(uids)
