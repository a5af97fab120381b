"""The dashboard's page logic through Streamlit's AppTest, and its chart numerics."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app.charts import downsample, ema, training_figure
from app.main import early_stop_hint
from trainer.store import RunStore

APP = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
RUN = "live"
TIMEOUT_S = 60


def _make_run(runs_dir, name=RUN, status="running", optimizer="SGD",
              supported=("lr", "momentum", "weight_decay")):
    """A run store as a live Babysitter leaves it (no trainer needed)."""
    now = time.time()
    with RunStore(runs_dir / name, create=True) as store:
        store.set_meta(name=name, created=now - 60, status=status, heartbeat=now,
                       pid=os.getpid(), host=socket.gethostname(), optimizer=optimizer,
                       supported_knobs=list(supported), task="digits MLP", step=50,
                       knobs={"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
                       schedule={"shape": "constant"}, config={"task": "digits"})
        store.append_metrics([(s, s // 10, now - 50 + s, 2.0 / (1 + s), 0.01, 0.9, 0.0)
                              for s in range(50)])
        store.append_validation([(45, 4, now, "loss", 0.3), (45, 4, now, "accuracy", 0.9)])
    return runs_dir / name


@pytest.fixture
def page(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path))
    monkeypatch.delenv("PANDA_TOKEN", raising=False)
    run_dir = _make_run(tmp_path)
    app = AppTest.from_file(APP, default_timeout=TIMEOUT_S).run()
    assert not app.exception, app.exception
    return app, RunStore(run_dir)


def _key(name: str) -> str:
    return f"knob_{RUN}_{name}"


def _commands(store: RunStore) -> list[tuple[str, dict, str]]:
    return [(c.kind, json.loads(c.payload), c.source) for c in store.commands()]


def test_page_shows_the_run_and_its_state(page):
    app, _ = page
    text = " ".join(m.value for m in app.markdown)
    assert "state **running**" in text and "step **50**" in text and "lr **1e-02**" in text
    assert app.selectbox(key="run_picker").value == RUN


def test_moving_the_lr_slider_and_apply_sends_exactly_one_set_command(page):
    app, store = page
    app.select_slider(key=_key("lr")).set_value(0.003).run()
    pending = " ".join(m.value for m in app.markdown)
    assert "lr **1e-02** → **3e-03** (pending)" in pending
    assert store.commands() == []  # moving a slider sends nothing
    app.button(key=_key("apply")).click().run()
    assert _commands(store) == [("set", {"lr": 0.003}, "dashboard")]


def test_half_and_double_buttons_move_along_the_ladder(page):
    app, store = page
    app.button(key=_key("double")).click().run()
    assert app.select_slider(key=_key("lr")).value == 0.02
    app.button(key=_key("half")).click().run()
    app.button(key=_key("half")).click().run()
    assert app.select_slider(key=_key("lr")).value == 0.005
    app.button(key=_key("apply")).click().run()
    assert _commands(store) == [("set", {"lr": 0.005}, "dashboard")]


def test_momentum_is_chosen_on_a_one_minus_beta_scale(page):
    app, store = page
    slider = app.select_slider(key=_key("momentum"))
    assert 0.999 in slider.options or "β 0.999" in str(slider.options)
    slider.set_value(0.99).run()
    app.button(key=_key("apply")).click().run()
    assert _commands(store) == [("set", {"momentum": 0.99}, "dashboard")]


@pytest.mark.parametrize("typed, reason", [("-1", "lr must be in (0"), ("fast", "number"),
                                           ("nan", "finite"), ("1e9", "lr must be in")])
def test_a_bad_typed_lr_shows_an_error_and_sends_nothing(page, typed, reason):
    app, store = page
    app.text_input(key=_key("exact")).input(typed).run()
    app.button(key=_key("apply")).click().run()
    errors = [e.value for e in app.error]
    assert any("Not sent" in e and reason in e for e in errors), errors
    assert store.commands() == []


def test_an_exact_lr_overrides_the_slider(page):
    app, store = page
    app.text_input(key=_key("exact")).input("3.2e-4").run()
    app.button(key=_key("apply")).click().run()
    assert _commands(store) == [("set", {"lr": 3.2e-4}, "dashboard")]


def test_apply_with_nothing_changed_sends_nothing(page):
    app, store = page
    app.button(key=_key("apply")).click().run()
    assert store.commands() == [] and any("Nothing to apply" in i.value for i in app.info)


def test_pause_and_stop_buttons_send_commands(page):
    app, store = page
    app.button(key=_key("pause")).click().run()
    app.button(key=_key("stop")).click().run()
    assert [kind for kind, _, _ in _commands(store)] == ["pause", "stop"]


def test_outcome_of_the_last_command_is_shown(page):
    app, store = page
    app.select_slider(key=_key("lr")).set_value(0.02).run()
    app.button(key=_key("apply")).click().run()
    command = store.commands()[0]
    store.resolve_commands([(command.id, "applied", 51, None)])
    app.run()
    assert any("applied at step 51" in s.value for s in app.success)


def test_a_decay_change_is_validated_and_sent_as_a_schedule_command(page):
    app, store = page
    app.selectbox(key=_key("shape")).set_value("exponential").run()
    app.number_input(key=_key("rate_exponential")).set_value(0.9).run()
    app.button(key=_key("apply_decay")).click().run()
    (kind, payload, _), = _commands(store)
    assert kind == "schedule" and payload["shape"] == "exponential" and payload["rate"] == 0.9
    app.number_input(key=_key("rate_exponential")).set_value(1.5).run()
    app.button(key=_key("apply_decay")).click().run()
    assert any("Not sent" in e.value for e in app.error) and len(store.commands()) == 1


def test_a_finished_run_shows_read_only_knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path))
    _make_run(tmp_path, status="finished")
    app = AppTest.from_file(APP, default_timeout=TIMEOUT_S).run()
    assert app.select_slider(key=_key("lr")).disabled
    assert app.button(key=_key("apply")).disabled


def test_knobs_the_optimizer_lacks_are_hidden(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path))
    _make_run(tmp_path, optimizer="Adagrad", supported=("lr", "weight_decay"))
    app = AppTest.from_file(APP, default_timeout=TIMEOUT_S).run()
    keys = {s.key for s in app.select_slider}
    assert _key("lr") in keys and _key("momentum") not in keys


def test_a_token_locks_the_knobs_until_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("PANDA_TOKEN", "s3cret")
    _make_run(tmp_path)
    app = AppTest.from_file(APP, default_timeout=TIMEOUT_S).run()
    assert app.button(key=_key("apply")).disabled
    app.text_input(key="panda_token").input("wrong").run()
    assert app.button(key=_key("apply")).disabled and app.sidebar.error
    app.text_input(key="panda_token").input("s3cret").run()
    assert not app.button(key=_key("apply")).disabled


def test_no_runs_yet_says_how_to_start_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path))
    app = AppTest.from_file(APP, default_timeout=TIMEOUT_S).run()
    assert any("No runs" in i.value for i in app.info)


def test_new_run_form_refuses_a_bad_name(page):
    app, _ = page
    app.text_input(key="new_name").input("../escape").run()
    app.button(key="new_start").click().run()
    assert any("invalid run name" in e.value for e in app.sidebar.error)


# --- chart numerics ------------------------------------------------------------------------------

def test_ema_is_debiased_and_skips_non_finite_values():
    np.testing.assert_allclose(ema([1.0, 2.0, 3.0], 0.5), [1.0, 5 / 3, 17 / 7])
    smoothed = ema([1.0, float("nan"), 3.0], 0.5)
    assert smoothed[1] == smoothed[0] == 1.0 and np.isfinite(smoothed[2])
    np.testing.assert_array_equal(ema([4.0, 5.0], 0.0), [4.0, 5.0])


def test_downsampling_keeps_a_single_spike_in_a_million_points():
    x = np.arange(1_000_000, dtype=float)
    y = np.random.default_rng(0).random(x.size)
    y[777_777] = 1e6
    y[333_333] = -1e6
    dx, dy = downsample(x, y, max_points=4000)
    assert len(dx) <= 4000
    assert 1e6 in dy and -1e6 in dy
    assert np.all(np.diff(dx) > 0)  # still in step order


def test_downsampling_leaves_short_series_alone():
    dx, dy = downsample([1, 2, 3], [3, 1, 2], max_points=10)
    assert list(dx) == [1, 2, 3] and list(dy) == [3, 1, 2]


def test_figure_has_markers_for_interventions_and_a_log_lr_axis():
    steps = np.arange(100, dtype=float)
    figure = training_figure({"step": steps, "loss": 1 / (1 + steps), "lr": np.full(100, 0.01)},
                             {"loss": ([50, 99], [0.3, 0.2])},
                             [{"step": 40, "message": "lr 1e-02 → 3e-03 at step 40"}])
    names = [trace.name for trace in figure.data]
    assert {"train loss", "val loss", "learning rate", "interventions"} <= set(names)
    marker = figure.data[names.index("interventions")]
    assert list(marker.x) == [40] and "lr 1e-02 → 3e-03" in marker.text[0]
    assert figure.layout.yaxis3.type == "log" and figure.layout.uirevision


def test_early_stop_hint_counts_evaluations_since_the_best():
    assert early_stop_hint({"loss": ([1, 2, 3], [1.0, 0.9, 0.8])}) is None
    hint = early_stop_hint({"loss": (list(range(8)), [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])})
    assert hint and "6 evaluations" in hint and "best 0.5 at step 1" in hint
