"""Dashboard page logic through Streamlit's AppTest, and the chart numerics (EMA, downsampling).

Run stores are prepared in tmp_path (see ``make_run`` in conftest.py): they look like a live
Babysitter's, but no trainer runs, so a test plays the trainer's part where it needs one.
"""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    APP,
    APP_TIMEOUT_S,
    dead_pid,
    knob_widget,
    open_panels,
    stream_charts,
    wait_until,
)
from streamlit.testing.v1 import AppTest

from app.charts import MAX_POINTS, downsample, ema, training_figure
from app.controls import key
from app.data import (
    RAW_TAIL,
    chart_view,
    duration,
    elapsed_seconds,
    empty_cache,
    fetch,
    stall_note,
    steps_per_second,
    view_series,
    visible_range,
)
from app.main import LR_PANEL, runs_dir
from app.panels import DECAY_PANEL, NEW_RUN_PANEL
from trainer.store import SqliteStore


@pytest.fixture
def page(open_page):
    """Factory: prepare a run, open the dashboard on its runs dir, return (AppTest, run_dir)."""
    return open_page


def commands(run_dir: Path):
    with SqliteStore(run_dir) as store:
        return store.commands()


def knobs_table(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("| knob |"))


# --- knobs: pending vs applied, Apply ---------------------------------------------------------

def test_moving_lr_and_apply_sends_exactly_one_set_command(page):
    at, run_dir = page()
    knob_widget(at, "lr").set_value(0.003).run()
    assert ":orange[**3e-03**]" in knobs_table(at)
    assert commands(run_dir) == []  # moving a slider alone sends nothing
    at.button(key=key("live", "apply")).click().run()
    sent = commands(run_dir)
    assert [(c.kind, json.loads(c.payload), c.source) for c in sent] == [
        ("set", {"lr": 0.003}, "dashboard")]
    assert not at.error


def test_apply_sends_only_the_changed_knobs(page):
    at, run_dir = page()
    knob_widget(at, "momentum").set_value(0.99)
    knob_widget(at, "lr").set_value(0.02).run()
    table = knobs_table(at)
    assert "| LR | 1e-02 | :orange[**2e-02**] |" in table
    assert "| momentum β | 0.9 | :orange[**0.99**] |" in table
    assert "| weight decay | 0 | 0 |" in table
    at.button(key=key("live", "apply")).click().run()
    (command,) = commands(run_dir)
    assert json.loads(command.payload) == {"lr": 0.02, "momentum": 0.99}


@pytest.mark.parametrize("typed", ["-1", "abc", "0", "nan", "1e9"])
def test_bad_typed_lr_shows_error_and_sends_nothing(page, typed):
    at, run_dir = page()
    knob_widget(at, "exact").input(typed).run()
    assert at.error, "a bad LR is reported as soon as it is typed"
    at.button(key=key("live", "apply")).click().run()
    assert any("Not sent" in e.value for e in at.error)
    assert commands(run_dir) == []


def test_exact_lr_and_halving_buttons(page):
    at, run_dir = page()
    knob_widget(at, "exact").input("3.2e-4").run()
    assert ":orange[**3.2e-04**]" in knobs_table(at)
    at.button(key=key("live", "half")).click().run()
    assert knob_widget(at, "exact").value == "0.00016"
    at.button(key=key("live", "apply")).click().run()
    (command,) = commands(run_dir)
    assert json.loads(command.payload) == {"lr": 0.00016}
    assert knob_widget(at, "exact").value == ""  # sent: the field is cleared


@pytest.mark.parametrize("apply_first", [True, False], ids=["apply first", "halving first"])
def test_halving_and_apply_in_one_rerun_send_the_halved_lr_once(page, apply_first):
    """A click on Apply that reaches the server before the ×½ rerun started: Streamlit merges
    the two requests into one rerun and appends ×½'s trigger after Apply's
    (``_coalesce_widget_states``), so Apply's callback runs first. Either order must send the
    halved LR (not the one from before ×½), not halve the field again after it, and leave no
    mark behind: the next ×½ halves again."""
    from streamlit.proto.WidgetStates_pb2 import WidgetStates

    at, run_dir = page()
    knob_widget(at, "exact").input("3.2e-4").run()
    at.button(key=key("live", "half")).click()
    at.button(key=key("live", "apply")).click()
    clicked = at._tree.get_widget_states()  # both triggers, as the merged request holds them
    half = [w for w in clicked.widgets if w.id.endswith(key("live", "half"))]
    others = [w for w in clicked.widgets if w not in half]
    assert len(half) == 1 and half[0].trigger_value
    at._run(WidgetStates(widgets=others + half if apply_first else half + others))
    assert [json.loads(c.payload) for c in commands(run_dir)] == [{"lr": 0.00016}]
    assert knob_widget(at, "exact").value == "" and not at.error  # sent; not halved again
    at.button(key=key("live", "half")).click().run()
    assert knob_widget(at, "exact").value != ""  # a later ×½ is not swallowed


def test_doubling_from_the_applied_lr(page):
    at, run_dir = page()
    at.button(key=key("live", "double")).click().run()
    at.button(key=key("live", "apply")).click().run()
    assert [json.loads(c.payload) for c in commands(run_dir)] == [{"lr": 0.02}]


def test_apply_without_changes_sends_nothing(page):
    at, run_dir = page()
    at.button(key=key("live", "apply")).click().run()
    assert commands(run_dir) == []
    assert any("Nothing to apply" in e.value for e in at.error)


def test_outcome_applied_and_rejected(page):
    at, run_dir = page()
    knob_widget(at, "lr").set_value(0.005)
    at.button(key=key("live", "apply")).click().run()
    assert any("waiting for the trainer" in i.value for i in at.info)
    assert knob_widget(at, "lr").value == 0.005  # in flight: keeps the sent
    (command,) = commands(run_dir)
    with SqliteStore(run_dir) as store:  # the trainer's part: apply it at step 25
        store.resolve_commands([(command.id, "applied", 25, None)])
        store.set_meta(knobs={"lr": 0.005, "momentum": 0.9, "weight_decay": 0.0})
    at.run()
    assert any("applied at step 25" in s.value for s in at.success)
    assert "| LR | 5e-03 | 5e-03 |" in knobs_table(at)
    knob_widget(at, "lr").set_value(0.002)
    at.button(key=key("live", "apply")).click().run()
    with SqliteStore(run_dir) as store:
        store.resolve_commands([(commands(run_dir)[-1].id, "rejected", None, "lr too spicy")])
    at.run()
    assert any("lr too spicy" in e.value for e in at.error)
    at.run()  # the refused value leaves the slider: it shows the applied LR again
    assert knob_widget(at, "lr").value == 0.005
    assert ":orange" not in knobs_table(at)


def test_untouched_knob_follows_the_applied_value(page):
    at, run_dir = page()
    with SqliteStore(run_dir) as store:  # e.g. an LR decay or `panda set` moved the LR
        store.set_meta(knobs={"lr": 0.0123, "momentum": 0.9, "weight_decay": 0.0})
    at.run()
    assert "| LR | 1.23e-02 | 1.23e-02 |" in knobs_table(at)
    assert ":orange" not in knobs_table(at)
    assert knob_widget(at, "lr").value == 0.015  # nearest stop (log scale)


def test_pause_writes_a_pause_command(page):
    at, run_dir = page()
    assert at.button(key=key("live", "resume")).disabled  # running: nothing to resume
    at.button(key=key("live", "pause")).click().run()
    assert [(c.kind, json.loads(c.payload)) for c in commands(run_dir)] == [("pause", {})]


def test_resume_enabled_when_paused(page):
    at, run_dir = page(status="paused")
    assert at.button(key=key("live", "pause")).disabled
    at.button(key=key("live", "resume")).click().run()
    assert [c.kind for c in commands(run_dir)] == ["resume"]


def test_a_diverged_run_offers_roll_back_and_resume(page):
    at, run_dir = page(status="diverged")
    assert any("Diverged" in e.value and "Undo" in e.value for e in at.error)
    assert at.button(key=key("live", "pause")).disabled
    at.button(key=key("live", "rollback")).click().run()
    at.button(key=key("live", "resume")).click().run()
    assert [(c.kind, json.loads(c.payload)) for c in commands(run_dir)] == [
        ("rollback", {}), ("resume", {})]


def test_finished_run_shows_knobs_disabled(page):
    at, _ = page(status="finished")
    open_panels(at, key("live", DECAY_PANEL))
    for name in ("lr", "momentum", "weight_decay"):
        assert knob_widget(at, name).disabled
    for name in ("apply", "half", "double", "pause", "resume", "stop", "apply_decay"):
        assert at.button(key=key("live", name)).disabled, name
    assert knob_widget(at, "exact").disabled
    assert any(m.label == "state" and m.value == "finished" for m in at.metric)


def test_only_supported_knobs_are_shown(page):
    at, _ = page(supported=("lr", "weight_decay"))
    keys = {s.key for s in at.select_slider}
    assert key("live", "lr") in keys and key("live", "weight_decay") in keys
    assert key("live", "momentum") not in keys


def test_decay_is_sent_as_one_schedule_command(page):
    at, run_dir = page()
    open_panels(at, key("live", DECAY_PANEL))
    at.selectbox(key=key("live", "shape")).select("exponential").run()
    at.button(key=key("live", "apply_decay")).click().run()
    (command,) = commands(run_dir)
    payload = json.loads(command.payload)
    assert command.kind == "schedule"
    assert payload["shape"] == "exponential" and payload["rate"] == pytest.approx(0.95)
    assert "origin_epoch" not in payload


def test_status_row_and_preselected_live_run(make_run, tmp_path, monkeypatch):
    make_run("older-live", status="running")
    newer = make_run("newer-done", status="finished")
    with SqliteStore(newer) as store:
        store.set_meta(created=time.time() + 60)
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    picker = at.selectbox(key="run_picker")
    assert picker.options[0].startswith("newer-done")  # newest first …
    assert picker.value == "older-live"                 # … but the live one is shown
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["step"] == "20" and metrics["learning rate"] == "1e-02"
    assert metrics["decay"] == "constant" and float(metrics["steps/s"]) > 0


def test_stall_note_on_hand_made_walls():
    """Said once the newest step is older than 30 s and than 20 recent step intervals."""
    def cache(interval: float, last: float) -> dict:
        walls = last - interval * np.arange(60)[::-1]
        return {"step": np.arange(60), "wall": walls}
    now = 1_000_000.0
    assert stall_note(cache(0.01, now - 29), now) is None           # 29 s: not yet
    assert "00:00:31" in stall_note(cache(0.01, now - 31), now)     # fast steps: 30 s
    assert stall_note(cache(2.0, now - 39), now) is None            # 2 s steps: 40 s
    assert "00:00:41" in stall_note(cache(2.0, now - 41), now)
    assert stall_note(empty_cache(), now) is None                   # no step, no start: silent
    # A resumed run: its rows predate its trainer, whose silence counts from its start.
    assert stall_note(cache(0.01, now - 3600), now, started=now - 10) is None
    assert "00:00:40" in stall_note(cache(0.01, now - 3600), now, started=now - 40)
    assert "00:00:40" in stall_note(empty_cache(), now, started=now - 40)  # no step at all yet
    # A trainer stuck since yesterday: the hours go on past a day.
    assert "No training step for 30:00:00 " in stall_note(cache(0.01, now - 30 * 3600), now)


def test_elapsed_time_ends_where_the_run_or_its_trainer_did():
    now = 1_000_000.0
    meta = {"created": now - 7200, "heartbeat": now - 3600}
    assert elapsed_seconds(meta, "running", now) == 7200
    assert elapsed_seconds(meta, "interrupted", now) == 3600   # killed an hour ago
    assert elapsed_seconds({**meta, "ended": now - 5400}, "finished", now) == 1800
    assert elapsed_seconds({}, "starting", now) == 0


def test_durations_count_hours_past_a_day():
    """Elapsed time and silences read HH:MM:SS with the hours not wrapped at 24."""
    assert duration(0) == "00:00:00" and duration(59.9) == "00:00:59"
    assert duration(3661) == "01:01:01" and duration(-5) == "00:00:00"
    assert duration(30 * 3600 + 61) == "30:01:01"
    assert duration(125 * 3600) == "125:00:00"


@pytest.mark.parametrize("status, age, said", [
    ("running", 120.0, True), ("running", 1.0, False), ("paused", 120.0, False)])
def test_a_live_trainer_that_stopped_stepping_is_said_so(open_page, status, age, said):
    """A trainer alive (heartbeat fresh) whose newest step is two minutes old: the page says
    so under the status row and shows 0 steps/s instead of the rate it had; a paused run, or
    one stepping, gets no such note."""
    at, _ = open_page(status=status, last_step_age=age)
    notes = [m.value for m in at.markdown if "No training step for" in m.value]
    metrics = {m.label: m.value for m in at.metric}
    assert bool(notes) is said, notes
    if said:
        assert "No training step for 00:02:" in notes[0] and "trainer is alive" in notes[0]
        assert metrics["steps/s"] == "0.0"
    elif status == "running":
        assert float(metrics["steps/s"]) > 0


def test_a_failed_run_says_why(make_run, monkeypatch, tmp_path):
    """A run whose trainer raised: the page says the exception under the status row."""
    run_dir = make_run(status="failed")
    with SqliteStore(run_dir) as store:
        store.set_meta(error="RuntimeError: CUDA out of memory", ended=time.time())
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    assert [e.value for e in at.error] == ["The run failed: RuntimeError: CUDA out of memory"]
    assert {m.label: m.value for m in at.metric}["state"] == "failed"


def test_an_interrupted_run_says_how_to_resume(open_page):
    """A run whose trainer died without closing it (its pid is gone): the page says so, keeps
    the steps, and says how to resume (a user's loop here: no `panda train` config)."""
    at, _ = open_page(pid=dead_pid())
    (warning,) = [w.value for w in at.warning]
    assert warning.startswith("The trainer stopped without closing the run: killed, out of "
                              "memory, or its machine went down. Its steps up to 20 are kept.")
    assert "Resume it with `resume=True` where your loop makes its Babysitter" in warning
    assert {m.label: m.value for m in at.metric}["state"] == "interrupted"


def test_new_run_form_refuses_bad_and_existing_names(page):
    at, _ = page()
    open_panels(at, NEW_RUN_PANEL)
    for name, reason in (("../escape", "invalid run name"), ("live", "already exists")):
        at.text_input(key="new_name").input(name)
        at.button(key="FormSubmitter:new_run-Start training").click().run()
        assert any(reason in e.value for e in at.error), [e.value for e in at.error]


def test_new_run_form_starts_a_run_that_outlives_the_page(page, tmp_path):
    at, _ = page()
    open_panels(at, NEW_RUN_PANEL)
    at.selectbox(key="new_task").select("quadratic")
    at.number_input(key="new_epochs").set_value(1)
    at.number_input(key="new_delay").set_value(0.0)
    at.text_input(key="new_name").input("fresh")
    at.button(key="FormSubmitter:new_run-Start training").click().run()
    assert any("Started fresh" in m.value for m in at.success), [e.value for e in at.error]
    assert at.selectbox(key="run_picker").value == "fresh"
    with SqliteStore(tmp_path / "runs" / "fresh") as store:
        assert store.meta()["config"]["task"] == "quadratic"
        wait_until(lambda: store.summary()["state"] in ("finished", "failed", "stopped",
                                                          "interrupted"),
                   timeout=APP_TIMEOUT_S, what="the launched run to end")
        assert store.summary()["state"] == "finished"


def test_empty_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "nothing-here"))
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    assert not at.exception and "No runs" in at.info[0].value


def test_a_store_that_is_not_postgresql_is_an_error_on_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PANDA_STORE", "sqlite:///runs.db")
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    assert not at.exception and "must be a postgresql:// URL" in at.error[0].value
    assert not (tmp_path / "runs").exists()


def test_runs_dir_from_argv_and_env(monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", "/from/env")
    assert runs_dir(["app/main.py"]) == Path("/from/env")
    assert runs_dir(["app/main.py", "--runs-dir", "/from/argv"]) == Path("/from/argv")


# --- incremental fetch ------------------------------------------------------------------------

def test_fetch_reads_only_new_rows_and_keeps_nan(make_run):
    run_dir = make_run(steps=10)
    caches: dict = {}
    with SqliteStore(run_dir) as store:
        assert fetch(store, caches)["step"].size == 10
        store.append_metrics([(10, 0, time.time(), math.nan, 0.01, 0.9, 0.0)])
        store.add_events([(10, time.time(), "set", "lr", 0.01, 0.003, None, "lr 1e-02 → 3e-03")])
        cache = fetch(store, caches)
    assert cache["step"].size == 11 and math.isnan(cache["loss"][-1])
    assert [e["message"] for e in cache["events"]] == ["lr 1e-02 → 3e-03"]
    assert steps_per_second(cache) == pytest.approx(1.0, rel=0.5)


def test_fetch_starts_over_after_a_restart_event(make_run):
    run_dir = make_run(steps=10)
    caches: dict = {}
    with SqliteStore(run_dir) as store:
        fetch(store, caches)
        store.truncate_after(5)  # a resume from the checkpoint at step 5 rewrites later rows
        store.add_events([(5, time.time(), "restart", None, None, None, None, "resumed")])
        assert fetch(store, caches)["step"].tolist() == [0, 1, 2, 3, 4]
    assert steps_per_second(empty_cache()) is None


# --- level-of-detail reads ----------------------------------------------------------------------

LONG = 60_000  # steps of the long run below: 50,000 of history (level 1: 32 a bucket), then raw


@pytest.fixture
def long_run(tmp_path):
    """A run of LONG steps with a NaN, an inf and a finite spike in its history, and an LR
    change at a step that is no bucket's edge (20,003): (store, loss)."""
    loss = [1.0 + (s * 7919 % 101) / 100 for s in range(LONG)]
    loss[5_000], loss[7_001], loss[12_345] = math.nan, math.inf, 1e6
    lr = [0.01 if s < 20_003 else 0.005 for s in range(LONG)]
    with SqliteStore(tmp_path / "runs" / "long", create=True) as store:
        store.append_metrics([(s, 0, 1000.0 + s, loss[s], lr[s], 0.9, 0.0, 0.01)
                              for s in range(LONG)])
        yield store, loss


def _at(cache, step_name, names, step):
    """The values of series ``names`` at ``step`` (the step must be a point of the series)."""
    index = int(np.searchsorted(cache[step_name], step))
    assert cache[step_name][index] == step, f"no point at step {step}"
    return tuple(float(cache[name][index]) for name in names)


def test_a_long_run_opens_from_its_levels_and_its_last_steps_raw(long_run):
    store, loss = long_run
    cache = fetch(store, {})
    # History: the whole 32-step buckets before the last RAW_TAIL steps; then raw rows.
    raw_from = (LONG - 1 - RAW_TAIL + 1) // 32 * 32
    assert (cache["raw_from"], cache["raw_rows"]) == (raw_from, LONG - raw_from)
    tail = slice(-(LONG - raw_from), None)
    assert cache["step"][tail].tolist() == list(range(raw_from, LONG))
    assert cache["loss"][tail].tolist() == loss[raw_from:]
    assert cache["step"].size < raw_from // 32 * 5 + LONG - raw_from  # ≤ 5 points a bucket
    assert np.all(np.diff(cache["step"]) > 0) and np.all(np.diff(cache["lr_step"]) > 0)
    # Spikes keep their own steps; the LR change its own step.
    assert math.isnan(_at(cache, "step", ["loss"], 5_000)[0])
    assert math.isnan(_at(cache, "step", ["loss"], 7_001)[0])
    assert _at(cache, "step", ["loss"], 12_345) == (1e6,)
    assert _at(cache, "lr_step", ["lr"], 20_000) == (0.01,)  # drawn hv: until 20,003
    assert _at(cache, "lr_step", ["lr"], 20_003) == (0.005,)
    assert _at(cache, "mean_step", ["mean"], 15.5) == pytest.approx((np.mean(loss[:32]),))
    # Refreshes append raw rows, as before.
    store.append_metrics([(s, 0, 1000.0 + s, 0.5, 0.005, 0.9, 0.0, 0.01)
                          for s in range(LONG, LONG + 100)])
    cache = fetch(store, {store.address: cache})
    assert cache["step"][-101:].tolist() == list(range(LONG - 1, LONG + 100))
    assert cache["mean"][-1] == 0.5 and cache["last_step"] == LONG + 99


def test_a_zoom_into_the_history_reads_it_in_full_detail(long_run):
    store, loss = long_run
    cache = fetch(store, {})
    series, focus = chart_view(store, cache, (12_000, 12_400))
    assert focus == (11_900, 12_500)  # the zoom and a quarter of its width either side
    inside = (series["step"] >= 11_900) & (series["step"] <= 12_500)
    assert series["step"][inside].tolist() == list(range(11_900, 12_501))
    assert series["loss"][inside].tolist() == loss[11_900:12_501]
    assert cache["detail"]["level"] == 0 and cache["step"].size < series["step"].size
    assert np.all(np.diff(series["step"]) > 0)
    assert series["step"][0] == 0 and series["step"][-1] == LONG - 1  # the rest stays
    # The same zoom again: read once, kept (a store that cannot be read would fail).
    again, _ = chart_view(None, cache, (12_000, 12_400))
    assert again["step"].tolist() == series["step"].tolist()
    # Inside the raw tail there is nothing more to read.
    assert chart_view(None, cache, (55_100, 55_000)) == (cache, (54_975, 55_125))
    assert chart_view(None, cache, None) == (cache, None)
    # Following the newest step: the zoom's width, ending there.
    assert chart_view(None, cache, (100, 200), follow=True)[1] == (
        LONG - 1 - 100 - 25, LONG - 1 + 25)
    assert visible_range({"x_range": [3, 1.5]}) == (3.0, 1.5)
    assert visible_range({"x_range": None}) is None and visible_range(None) is None


def test_a_wide_zoom_reads_a_finer_level_than_the_first_view(tmp_path):
    with SqliteStore(tmp_path / "runs" / "wide", create=True) as store:
        with store.transaction() as tx:  # 400,000 steps, written with SQL
            tx.execute("INSERT INTO metrics(step, epoch, wall, loss, lr) WITH RECURSIVE "
                       "t(s) AS (SELECT 0 UNION ALL SELECT s + 1 FROM t WHERE s < 399999) "
                       "SELECT s, 0, s, 1.0 + (s % 7), 0.01 FROM t")
            store._build_levels(tx)
        cache = fetch(store, {})
        assert cache["step"].size < 20_000 + RAW_TAIL
        series, focus = chart_view(store, cache, (100_000, 200_000))
        assert cache["detail"]["level"] == 1  # 150,000 steps at 32 a bucket
        inside = (series["step"] >= focus[0]) & (series["step"] <= focus[1])
        for extreme in (1.0, 7.0):  # every bucket's min and max (each bucket holds both)
            assert (series["loss"][inside] == extreme).sum() >= 150_000 // 32


def test_the_history_is_read_coarse_again_once_raw_rows_pile_up(long_run, monkeypatch):
    store, _ = long_run
    monkeypatch.setattr("app.data.RAW_LIMIT", 15_000)
    cache = fetch(store, {})
    caches = {store.address: cache}
    store.append_metrics([(s, 0, 1000.0 + s, 0.5, 0.005, 0.9, 0.0, 0.01)
                          for s in range(LONG, LONG + 6_000)])
    cache = fetch(store, caches)
    assert cache["raw_rows"] == LONG + 6_000 - cache["raw_from"]  # > RAW_LIMIT: next time …
    cache = fetch(store, caches)
    assert cache["raw_rows"] < RAW_TAIL + 32 and cache["raw_from"] > LONG - RAW_TAIL
    assert cache["step"][-1] == LONG + 5_999 and np.all(np.diff(cache["step"]) > 0)


def test_view_series_of_hand_made_buckets():
    """Two 32-step buckets: the loss points (first, min, max, first non-finite, last at their
    steps), the knob points (exact change step) and the means, exactly."""
    nan = math.nan
    view = {"level": 1, "size": 32, "first_step": [0, 32], "last_step": [31, 63],
            "steps": [32, 32], "nonfinite": [1, 2], "nonfinite_step": [12, 32],
            "first_loss": [3.0, nan], "last_loss": [2.0, 4.0], "min_loss": [1.0, 4.0],
            "min_loss_step": [7, 40], "max_loss": [5.0, 4.0], "max_loss_step": [20, 40],
            "loss_sum": [93.0, 120.0], "lr_first": [0.1, 0.05], "lr_last": [0.05, 0.05],
            "lr_since": [17, 32], "user_lr_first": [0.2, 0.2], "user_lr_last": [0.2, 0.3],
            "user_lr_since": [0, 50], "wall": [10.0, 20.0]}
    series = view_series(view)
    assert series["step"].tolist() == [0, 7, 12, 20, 31, 32, 40, 63]
    assert np.array_equal(series["loss"], [3, 1, nan, 5, 2, nan, 4, 4], equal_nan=True)
    assert series["wall"].tolist() == [10.0] * 5 + [20.0] * 3
    assert series["lr_step"].tolist() == [0, 17, 31, 32, 50, 63]
    assert series["lr"].tolist() == [0.1, 0.05, 0.05, 0.05, 0.05, 0.05]
    assert series["user_lr"].tolist() == [0.2, 0.2, 0.2, 0.2, 0.3, 0.3]
    assert series["mean_step"].tolist() == [15.5, 47.5]
    assert series["mean"].tolist() == [93.0 / 31, 120.0 / 30]


def test_zooming_the_chart_draws_the_zoomed_steps_in_full_detail(page):
    """The chart's value (its zoom) reaches the next render: every step of it is drawn."""
    at, _ = page(steps=50_000)

    def drawn(name):
        trace = next(t for t in stream_charts(at)["training_chart"]["figure"]["data"]
                     if t["name"] == name)
        return np.frombuffer(base64.b64decode(trace["x"]["bdata"]), dtype=trace["x"]["dtype"])

    x = drawn("train loss")
    assert ((x >= 1_000) & (x <= 1_200)).sum() < 100  # the first view: the run's buckets
    at.session_state["training_chart"] = {"x_range": [1_000, 1_200]}
    at.run()
    assert not at.exception
    x = drawn("train loss")
    assert x[(x >= 950) & (x <= 1_250)].tolist() == list(range(950, 1_251))
    assert x[0] == 0 and x[-1] == 49_999  # and the whole curve, for a pan or a reset


# --- chart numerics ---------------------------------------------------------------------------

def test_ema_known_values():
    # β = 0.5: biased 0, 0.5, 0.75 … debiased by 1 − 0.5^t → 0, 2/3, 6/7
    assert ema([0.0, 1.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3, 6 / 7])
    assert ema([3.0] * 5, 0.9) == pytest.approx([3.0] * 5)  # debiased: no pull towards 0
    assert ema([1.0, 2.0], 0.0) == pytest.approx([1.0, 2.0])
    # NaN is skipped: the smoothed value carries on, later points are not lost
    smoothed = ema([math.nan, 0.0, math.nan, 1.0], 0.5)
    assert math.isnan(smoothed[0])
    assert smoothed[1:] == pytest.approx([0.0, 0.0, 2 / 3])


def test_ema_matches_the_recurrence_over_a_long_series():
    x = np.random.default_rng(0).normal(size=5000)
    expected, s = [], 0.0
    for t, value in enumerate(x, start=1):
        s = 0.99 * s + 0.01 * value
        expected.append(s / (1 - 0.99 ** t))
    assert ema(x, 0.99) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_downsample_keeps_a_single_spike_in_a_million_points():
    n = 1_000_000
    x = np.arange(n, dtype=float)
    y = np.sin(x / 1000.0)
    y[654_321] = 1e6
    y[123_457] = -1e6
    dx, dy = downsample(x, y)
    assert dx.size <= MAX_POINTS
    assert dy.max() == 1e6 and dy.min() == -1e6
    assert 654_321 in dx and 123_457 in dx
    assert np.all(np.diff(dx) > 0)


def test_downsample_bounds_and_nan():
    x = np.arange(10_001, dtype=float)
    y = np.where(x % 7 == 0, np.nan, x)
    for limit in (10, 101, 2000):
        dx, dy = downsample(x, y, limit)
        assert dx.size <= limit and np.all(np.diff(dx) > 0)
        assert not np.isnan(dy).any()
    small_x, small_y = downsample([1, 2, 3], [3, 1, 2])
    assert small_x.tolist() == [1, 2, 3] and small_y.tolist() == [3, 1, 2]


def test_figure_has_marker_per_event_and_survives_nan():
    steps = np.arange(100, dtype=float)
    loss = np.where(steps == 50, np.nan, 1.0 / (steps + 1))
    events = [{"step": 30, "kind": "set", "message": "lr 1e-02 → 3e-03 at step 30"}]
    fig = training_figure({"step": steps, "loss": loss, "lr": np.full(100, 0.01)},
                          {"loss": ([44], [0.5]), "accuracy": ([44], [0.9])}, events,
                          log_y=True)
    names = [t.name for t in fig.data]
    assert "val loss" in names and "val accuracy" in names and "learning rate" in names
    (markers,) = [t for t in fig.data if t.name == "interventions"]
    assert list(markers.text) == ["lr 1e-02 → 3e-03 at step 30"]
    assert [s.x0 for s in fig.layout.shapes] == [30]
    assert fig.layout.yaxis.type == "log"


def test_figure_window_keeps_only_recent_steps():
    steps = np.arange(100, dtype=float)
    events = [{"step": 10, "kind": "set", "message": "early"},
              {"step": 80, "kind": "set", "message": "late"}]
    fig = training_figure({"step": steps, "loss": np.ones(100), "lr": np.full(100, 0.01)},
                          {"loss": ([9, 89], [0.5, 0.4])}, events,
                          steps_shown=(50, math.inf))
    train = next(t for t in fig.data if t.name == "train loss")
    assert min(train.x) == 50 and max(train.x) == 99
    assert list(next(t for t in fig.data if t.name == "val loss").x) == [89]
    assert [s.x0 for s in fig.layout.shapes] == [80]


def test_the_training_chart_is_the_stream_chart_component(page):
    at, _ = page()
    chart = stream_charts(at)["training_chart"]
    names = [t["name"] for t in chart["figure"]["data"]]
    assert names[:2] == ["train loss", "train loss (EMA 0.6)"] and "learning rate" in names
    assert chart["follow"] is False and chart["latest"] == 19.0
    assert chart["plotly_js"].startswith("../app.stream_chart.plotly_js/plotly.min.js?v=")
    assert not at.get("plotly_chart")  # nothing is drawn by st.plotly_chart any more
    assert not [t for t in at.toggle if t.key == "freeze"]


def test_a_finished_lr_range_test_is_drawn_by_the_stream_chart_component(page):
    at, run_dir = page()
    lrs = np.geomspace(1e-6, 1.0, 40).tolist()
    losses = np.linspace(2.3, 0.4, 40).tolist()
    with SqliteStore(run_dir) as store:
        result = store.add_result("lr_find", {"lrs": lrs, "losses": losses,
                                              "smoothed_losses": losses, "suggested_lr": 1e-3,
                                              "suggestion_range": [3e-4, 3e-3],
                                              "max_stable_lr": 0.1})
    at.run()
    assert not at.exception, at.exception
    chart = stream_charts(at)[f"lrfind_chart_live_{result}"]
    names = [t["name"] for t in chart["figure"]["data"]]
    assert "smoothed loss" in names and "suggested lr" in names
    assert chart["figure"]["layout"]["xaxis"]["type"] == "log"


def test_window_log_scale_and_follow_settings_reach_the_chart(page):
    at, _ = page()
    before = stream_charts(at)["training_chart"]["revision"]
    at.selectbox(key="window").select("last 500")
    at.toggle(key="follow").set_value(True)
    at.toggle(key="log_y").set_value(True).run()
    assert not at.exception
    chart = stream_charts(at)["training_chart"]
    assert chart["follow"] is True
    assert chart["revision"] != before  # a log axis is another view: the zoom starts over
    assert chart["figure"]["layout"]["yaxis"]["type"] == "log"


def test_the_decay_shown_names_the_users_schedule_under_pandas_decay():
    from app.main import decay_shown

    assert decay_shown(None, None) == "constant"
    assert decay_shown({"shape": "cosine"}, {"user_schedule": False}) == "cosine"
    assert decay_shown({"shape": "constant"}, {"user_schedule": True}) == "yours"
    assert decay_shown({"shape": "cosine"}, {"user_schedule": True}) == "cosine"


def test_the_lr_composition_is_said_in_words():
    from app.main import lr_composition

    assert lr_composition(None) is None
    assert lr_composition({"user_lr": 0.01, "lr": 0.01, "factor": 1.0}) is None
    assert lr_composition({"user_lr": 6.4e-4, "lr": 1.6e-4, "factor": 0.25,
                           "user_schedule": True}) == "LR: your schedule × 0.25 → 1.6e-04 now"
    assert lr_composition({"user_lr": 0.01, "lr": 0.005, "factor": 0.5,
                           "user_schedule": False}) == "LR: your 1e-02 × 0.5 → 5e-03 now"


# --- the LR range test panel: flat curves, big jumps, stale results -------------------------------

def _lr_result(run_dir: Path, **payload) -> int:
    """A finished range test in the run's store, as a job beside it would leave it."""
    lrs = np.geomspace(1e-6, 10.0, 40).tolist()
    losses = np.linspace(2.3, 0.4, 40).tolist()
    base = {"lrs": lrs, "losses": losses, "smoothed_losses": losses, "stop_reason": "completed",
            "suggested_lr": 0.015, "suggestion_range": [0.01, 0.02], "max_stable_lr": 0.1,
            "suggestion_rule": "continue_probes", "purpose": "continue", "current_lr": 0.01,
            "flat": False, "checkpoint_step": 10, "options": {"measure": "train"}}
    with SqliteStore(run_dir) as store:
        return store.add_result("lr_find", {**base, **payload})


def _warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning]


def test_a_flat_curve_jump_takes_a_second_click_that_names_the_factor(page):
    """The issue's converged run: a flat curve, no limit, 8.3 suggested at LR 0.1."""
    at, run_dir = page(knobs={"lr": 0.1})
    flat = [1.8e-5] * 40
    result = _lr_result(run_dir, losses=flat, smoothed_losses=flat, suggested_lr=8.3,
                        suggestion_range=[4.751, 10.0], suggestion_rule="steepest",
                        max_stable_lr=None, flat=True)
    at.run()
    notes = _warnings(at)
    assert any(n.startswith("Flat curve") for n in notes), notes
    assert any(n.startswith("No stability limit") for n in notes), notes
    at.button(key=f"lrfind_apply_live_{result}").click().run()
    assert commands(run_dir) == []                       # the first click only asks
    assert "Apply 8.3e+00 (83× the current LR)?" in _warnings(at)
    at.button(key=f"lrfind_yes_live_{result}").click().run()
    sent = commands(run_dir)
    assert [(c.kind, json.loads(c.payload)) for c in sent] == [("set", {"lr": 8.3})]
    assert not any(n.startswith("Apply 8.3e+00") for n in _warnings(at))


@pytest.mark.parametrize("rule", ["keep_current", "keep_flat"])
def test_a_keep_answer_says_keep_the_runs_lr_and_offers_nothing_to_apply(page, rule):
    """"No LR beat the run's own" is not a change to send: applying the LR the run had at its
    checkpoint would pin it against the run's own schedule."""
    at, run_dir = page()
    result = _lr_result(run_dir, suggested_lr=0.01, suggestion_range=[0.01, 0.01],
                        suggestion_rule=rule)
    at.run()
    assert all(not (b.key or "").startswith("lrfind_apply") for b in at.button)
    assert [s.value for s in at.success] == [
        "Keep the run's LR: the test showed no better LR than its 1e-02 at the checkpoint."], result
    assert commands(run_dir) == []


def test_the_range_test_panel_opens_for_a_new_test_and_stays_closed_once_closed(page):
    """Closed, it builds nothing; a test this session has not shown opens it (one started
    from a terminal, say); closed by the person, it stays closed until the next test."""
    at, run_dir = page()
    assert all(b.key != "lrfind_start_live" for b in at.button)
    first = _lr_result(run_dir)
    at.run()
    assert at.button(key=f"lrfind_apply_live_{first}").label.startswith("Apply suggested LR")
    at.session_state[key("live", LR_PANEL)] = False  # as a click on its header does
    at.run()
    at.run()
    assert all(not b.key.startswith("lrfind_") for b in at.button if b.key)
    second = _lr_result(run_dir, suggested_lr=0.012)
    at.run()
    assert at.button(key=f"lrfind_apply_live_{second}").label.startswith("Apply suggested LR")


def test_a_big_jump_can_be_cancelled(page):
    at, run_dir = page()                                 # the run's LR: 0.01
    result = _lr_result(run_dir, suggested_lr=0.05, suggestion_range=[0.03, 0.1])
    at.run()
    at.button(key=f"lrfind_apply_live_{result}").click().run()
    assert "Apply 5e-02 (5× the current LR)?" in _warnings(at)
    at.button(key=f"lrfind_no_live_{result}").click().run()
    assert commands(run_dir) == []
    assert not any(n.startswith("Apply") for n in _warnings(at))


def test_a_small_step_is_one_click_and_a_fresh_result_has_no_cautions(page):
    at, run_dir = page()
    result = _lr_result(run_dir, suggested_lr=0.015)     # 1.5× the run's LR
    at.run()
    assert _warnings(at) == []
    assert at.button(key="lrfind_start_live").label == "Run LR range test"
    at.button(key=f"lrfind_apply_live_{result}").click().run()
    assert [json.loads(c.payload) for c in commands(run_dir)] == [{"lr": 0.015}]


def test_a_stale_result_says_its_age_and_re_running_is_one_click(page):
    at, run_dir = page()
    with SqliteStore(run_dir) as store:
        store.set_meta(step=52_000)                      # the run trained on meanwhile
    _lr_result(run_dir, checkpoint_step=26_800)
    at.run()
    assert ("Stale: measured from the checkpoint at step 26,800; the run is at step 52,000 "
            "now, 25,200 steps later. Re-run the test for a current answer.") in _warnings(at)
    button = at.button(key="lrfind_start_live")
    assert button.label == "Re-run LR range test"
    # This run was not started by `panda train`: the button says why it cannot run here (a
    # real run's re-run is the start job's one click, tested in test_lr_job and the browser).
    assert button.disabled


# Hand-made curves (as torch-lr-finder's tests pin its suggestion on made-up losses): a range
# test's loss against 60 LRs from 1e-6 to 10.
CURVE_LRS = np.geomspace(1e-6, 10.0, 60).tolist()
# A real descent: level, falling by 80 % between 1e-4 and 1e-2, then blowing up.
DESCENT = [2.3 - 1.9 / (1 + math.exp(-(math.log10(lr) + 3) * 3)) + 8 * max(0, lr - 1) for lr in
           CURVE_LRS]
# The converged run: 2.8e-5 with noise of 1e-7 and no trend, over 7 decades.
CONVERGED = (2.8e-5 + 1e-7 * np.random.default_rng(0).standard_normal(60)).tolist()


@pytest.mark.parametrize(("losses", "flat"), [(CONVERGED, True), (DESCENT, False)])
def test_a_result_stored_without_its_flatness_is_judged_from_its_curve(page, losses, flat):
    at, run_dir = page()
    _lr_result(run_dir, lrs=CURVE_LRS, losses=losses, smoothed_losses=losses, flat=None)
    at.run()
    assert not at.exception, at.exception
    said = any(n.startswith("Flat curve") for n in _warnings(at))
    assert said == flat, _warnings(at)


def test_no_limit_is_said_and_a_big_jump_still_asks(page):
    """A real descent that never blew up: not flat, but nothing bounds the suggestion."""
    at, run_dir = page()                                 # the run's LR: 0.01
    result = _lr_result(run_dir, lrs=CURVE_LRS, losses=DESCENT, smoothed_losses=DESCENT,
                        max_stable_lr=None, flat=None, suggested_lr=0.1,
                        suggestion_range=[0.05, 0.2])
    at.run()
    notes = _warnings(at)
    assert [n.split(":")[0].split(" was")[0] for n in notes] == ["No stability limit"], notes
    at.button(key=f"lrfind_apply_live_{result}").click().run()
    assert commands(run_dir) == []
    assert "Apply 1e-01 (10× the current LR)?" in _warnings(at)


def test_the_summary_says_the_rule_and_what_the_suggestion_is_for(page):
    at, run_dir = page()
    _lr_result(run_dir)
    at.run()
    text = "\n".join(m.value for m in at.markdown)
    assert ("**rule** continue_probes: lowest loss after short constant-LR probes around the "
            "current LR") in text
    assert "**for** continuing the run from its checkpoint, compared with its LR 1e-02" in text


@pytest.mark.parametrize(("run_step", "age"), [(3_000, None), (3_001, 1_001)])
def test_a_result_turns_stale_after_stale_steps_and_re_running_is_one_click(
        page, monkeypatch, run_step, age):
    """At the checkpoint of step 2,000, staleness starts past STALE_STEPS (1,000) steps."""
    import app.lr_panel as panel

    started = []
    monkeypatch.setattr(panel, "readiness", lambda store: None)   # as a `panda train` run
    monkeypatch.setattr(panel, "start_lr_find_job", lambda address: started.append(address) or 7)
    at, run_dir = page()
    with SqliteStore(run_dir) as store:
        store.set_meta(step=run_step)
    _lr_result(run_dir, checkpoint_step=2_000)
    at.run()
    stale = [n for n in _warnings(at) if n.startswith("Stale")]
    button = at.button(key="lrfind_start_live")
    if age is None:
        assert stale == [] and button.label == "Run LR range test"
    else:
        assert stale == [f"Stale: measured from the checkpoint at step 2,000; the run is at step "
                         f"{run_step:,} now, {age:,} steps later. Re-run the test for a current "
                         "answer."]
        assert button.label == "Re-run LR range test"
    assert not button.disabled
    button.click().run()
    assert started == [str(run_dir)]                     # one click, one job
