"""Honest axes (app/axes.py) on hand-made inputs, how the training figure uses them, and the
chart component's figure encoding (app/stream_chart)."""

from __future__ import annotations

import base64
import json
import math
import os

import numpy as np
import pytest

import app.stream_chart as stream_chart
from app.axes import (
    LR_PANEL_MIN_PX,
    linear_axis,
    log_axis,
    log_dtick,
    log_range,
    lr_panel_share,
    nice_step,
    nice_ticks,
    off_scale,
    padded,
    robust_range,
    run_edges,
)
from app.charts import _plot_px, shows_user_schedule, training_figure
from app.lr_panel import lr_find_figure
from app.stream_chart import figure_json, latest_x


def is_125(step: float) -> bool:
    """Whether ``step`` is 1, 2 or 5 × 10^k."""
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m, rel_tol=1e-9) for m in (1, 2, 5, 10))


# --- linear ticks -------------------------------------------------------------------------------

@pytest.mark.parametrize(("span", "ticks", "step"), [
    (0.048, 5, 0.01),     # the 0.853 … 0.901 accuracy axis: 0.86, 0.87, …
    (2.4, 6, 0.5),
    (1.0, 5, 0.2),
    (1.0, 10, 0.1),
    (100, 4, 50),
    (7.0, 7, 1.0),        # exactly one per unit fits: 1, not 2
    (3e-7, 4, 1e-7),
    (12_345, 5, 5000),
])
def test_nice_step_is_the_smallest_125_step_that_fits(span, ticks, step):
    assert nice_step(span, ticks) == pytest.approx(step)
    assert span / nice_step(span, ticks) <= ticks + 1e-9


def test_nice_step_on_many_spans_is_always_1_2_5():
    for span in np.geomspace(1e-9, 1e9, 400):
        for ticks in (2, 3, 5, 8):
            step = nice_step(span, ticks)
            assert is_125(step) and span / step <= ticks * (1 + 1e-9), (span, ticks, step)


def test_nice_ticks_are_round_and_inside():
    assert nice_ticks(0.853, 0.901, 5) == [0.86, 0.87, 0.88, 0.89, 0.9]
    assert nice_ticks(-0.13, 2.92, 7) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert nice_ticks(0, 1, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_step(0, 5) == nice_step(math.nan, 5) == 1.0  # degenerate: no crash


def test_linear_axis_density_follows_the_axis_length():
    short, tall = linear_axis((0, 1), 80), linear_axis((0, 1), 400)
    assert short["tickmode"] == "linear" and short["range"] == [0, 1]
    assert short["dtick"] == 0.5 and tall["dtick"] == 0.1
    assert linear_axis(None, 100) == {}


# --- log axes -----------------------------------------------------------------------------------

def test_a_flat_lr_after_cosine_decay_gets_a_decade_not_a_cliff():
    low, high = log_range([0.0099985, 0.01, 0.01])
    assert high - low == pytest.approx(1.0)
    assert low < math.log10(0.0099985) and math.log10(0.01) < high
    # the data sits in the middle (geometric centre): a flat line, not at an edge
    centre = (low + high) / 2
    assert centre == pytest.approx(math.log10(math.sqrt(0.0099985 * 0.01)))


def test_log_range_of_a_wide_span_is_padded_and_ignores_non_positive_values():
    low, high = log_range([1e-7, 10.0, 0.0, -1.0, math.nan, math.inf])
    assert low == pytest.approx(-7.05) and high == pytest.approx(1.05)
    assert log_range([0.0, -1.0, math.nan]) is None


def test_log_ticks_label_2_and_5_when_they_fit_else_fewer_decades():
    assert log_dtick((-2.5, -1.5), 120) == "D2"   # 1 decade on the LR panel: 1, 2, 5
    assert log_dtick((-7, 1), 600, 24) == 1       # 8 decades, 75 px each: decades only
    assert log_dtick((-12, 0), 100) == 3          # 8 px per decade: every third decade
    axis = log_axis([1e-4, 1e-2], 200)
    assert axis["type"] == "log" and axis["dtick"] == "D2" and axis["exponentformat"] == "power"
    assert log_axis([], 200) == {"type": "log", "exponentformat": "power"}


def test_the_lr_panel_is_tall_enough_to_read():
    assert lr_panel_share(1000) == pytest.approx(0.3)
    assert lr_panel_share(300) * 300 == pytest.approx(LR_PANEL_MIN_PX)
    assert lr_panel_share(100) == 0.5  # never more than half
    fig = training_figure(_metrics(100), {}, [], height=480)
    lr_domain = fig.layout.yaxis3.domain
    assert (lr_domain[1] - lr_domain[0]) * _plot_px(480) / 0.95 >= LR_PANEL_MIN_PX * 0.99


# --- the loss range and off-scale points --------------------------------------------------------

def _decay(n: int = 2000, seed: int = 0) -> np.ndarray:
    steps = np.arange(n)
    return 2.3 / (1 + steps / 50) + 0.05 + np.random.default_rng(seed).normal(0, 0.01, n)


def test_one_diverged_step_does_not_rescale_the_loss_axis():
    loss = _decay()
    clean = robust_range(loss)
    loss[1500] = 3e31
    low, high = robust_range(loss)
    assert (low, high) == pytest.approx(clean)
    assert high < 3  # the history keeps the axis
    mask, above = off_scale(loss, (low, high))
    assert mask[1500] and above[1500]


def test_non_finite_values_are_off_scale_at_the_edge_they_belong_to():
    v = np.array([1.0, math.nan, math.inf, -math.inf, 0.5, 5.0, -3.0])
    mask, above = off_scale(v, (0.0, 2.0))
    assert mask.tolist() == [False, True, True, True, False, True, True]
    assert above[[1, 2, 5]].all() and not above[[3, 6]].any()
    log_mask, log_above = off_scale(np.array([0.1, 0.0, -1.0, 1e9]), (-2.0, 1.0), log=True)
    assert log_mask.tolist() == [False, True, True, True]
    assert log_above.tolist() == [False, False, False, True]


def test_robust_range_keeps_ordinary_data_whole():
    for values in (_decay(), np.linspace(-3, 7, 50), np.full(10, 0.7), [0.0, 0.0, 1.0]):
        low, high = robust_range(values)
        assert low < np.min(values) and np.max(values) < high, values
    assert robust_range([math.nan, math.inf]) is None
    # a plateau with a step half its height is data, not an outlier
    plateau = np.r_[np.full(500, 1.0), [1.5]]
    assert robust_range(plateau)[1] > 1.5


def test_one_spike_early_in_a_run_does_not_rescale_either():
    loss = _decay(50)
    loss[30] = 3e31
    assert robust_range(loss)[1] < 3


def test_robust_range_on_a_log_axis_spans_a_decade_and_drops_non_positive():
    low, high = robust_range([0.5, 0.52, 0.51, -1.0, 0.0, 1e30], log=True)
    assert high - low == pytest.approx(1.0)
    assert low < math.log10(0.5) and math.log10(0.52) < high < 30


def test_padded():
    assert padded([1.0, 3.0]) == pytest.approx((0.9, 3.1))
    assert padded([1.0, 3.0], pad=0.0) == (1.0, 3.0)
    assert padded([3.0], pad=0.0) == (2.0, 4.0)
    assert padded([math.nan]) is None


def test_run_edges_keeps_the_ends_of_each_constant_run():
    assert run_edges([1, 1, 1, 2, 2, math.nan, math.nan, 3]).tolist() == [0, 2, 3, 4, 5, 6, 7]
    assert run_edges(np.full(1000, 0.01)).tolist() == [0, 999]
    assert run_edges([5.0]).tolist() == [0]
    smooth = np.linspace(1, 0, 50)
    assert run_edges(smooth).tolist() == list(range(50))


# --- the training figure ------------------------------------------------------------------------

def _metrics(n: int, loss=None, lr=None) -> dict[str, np.ndarray]:
    steps = np.arange(n, dtype=float)
    return {"step": steps, "loss": _decay(n) if loss is None else loss,
            "lr": np.full(n, 0.01) if lr is None else lr}


def _trace(fig, uid):
    return next(t for t in fig.data if t.uid == uid)


def test_the_figure_marks_off_scale_losses_instead_of_rescaling():
    loss = _decay()
    loss[[700, 900]] = [3e31, math.nan]
    fig = training_figure(_metrics(2000, loss), {}, [])
    high = fig.layout.yaxis.range[1]
    assert high < 3 and is_125(fig.layout.yaxis.dtick)
    marks = _trace(fig, "loss_off_scale")
    assert 700 in marks.x and 900 in marks.x
    at = {x: (y, text, symbol) for x, y, text, symbol in
          zip(marks.x, marks.y, marks.text, marks.marker.symbol)}
    assert at[700] == (high, "loss 3e+31 (off scale)", "triangle-up-open")
    assert at[900] == (high, "loss nan (off scale)", "x")
    raw = _trace(fig, "loss")
    assert not np.any(np.asarray(raw.y, dtype=float) > high)  # the spike is a gap in the line
    assert marks.cliponaxis is False


def test_the_figure_lr_axis_spans_a_decade_and_compacts_a_constant_lr():
    lr = np.r_[np.full(1000, 0.01), 0.01 * (0.5 + 0.5 * np.cos(np.linspace(0, 1e-2, 1000)))]
    fig = training_figure(_metrics(2000, lr=lr), {}, [])
    low, high = fig.layout.yaxis3.range
    assert high - low == pytest.approx(1.0) and fig.layout.yaxis3.dtick == "D2"
    assert len(_trace(fig, "lr").x) < 1100  # the constant half is two points
    assert fig.layout.yaxis3.type == "log"


def test_the_figure_axes_are_round_and_the_step_axis_spans_the_data():
    fig = training_figure(_metrics(5000), {"accuracy": ([999, 1999, 2999], [0.853, 0.877, 0.901])},
                          [], height=480)
    assert fig.layout.yaxis.tickmode == "linear" and is_125(fig.layout.yaxis.dtick)
    assert fig.layout.yaxis2.tickmode == "linear" and is_125(fig.layout.yaxis2.dtick)
    assert fig.layout.yaxis2.tickformat is None  # labels follow dtick: 0.86, not 0.853
    assert tuple(fig.layout.xaxis.range) == tuple(fig.layout.xaxis2.range) == (0, 4999)
    assert fig.layout.uirevision is None  # the component keeps the view, not uirevision


def test_the_figure_on_a_log_loss_axis():
    loss = _decay()
    loss[10] = -1.0  # cannot be drawn on a log axis: a marker at the bottom
    fig = training_figure(_metrics(2000, loss), {}, [], log_y=True)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick in ("D2", 1)
    marks = _trace(fig, "loss_off_scale")
    assert list(marks.x) == [10] and marks.y[0] == pytest.approx(10 ** fig.layout.yaxis.range[0])


def test_every_trace_has_a_stable_uid():
    events = [{"step": 30, "kind": "set", "message": "lr"}]
    figures = [training_figure(_metrics(100), {"loss": ([50], [0.4])}, events, smoothing=s,
                               overlays={"other": {"step": np.arange(10.), "loss": np.ones(10)}})
               for s in (0.6, 0.9)]
    uids = [[t.uid for t in fig.data] for fig in figures]
    assert uids[0] == uids[1] and all(uids[0])
    assert len(set(uids[0])) == len(uids[0])
    assert [t.name for t in figures[0].data] != [t.name for t in figures[1].data]  # EMA name


def test_lr_find_figure_axes():
    lrs = list(np.geomspace(1e-7, 10, 100))
    payload = {"lrs": lrs, "losses": list(np.linspace(2.3, 0.5, 100)),
               "smoothed_losses": list(np.linspace(2.3, 0.5, 100)), "suggested_lr": 1e-3}
    fig = lr_find_figure(payload)
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.dtick == 1
    assert fig.layout.xaxis.range == pytest.approx((-7.05, 1.05))
    assert is_125(fig.layout.yaxis.dtick)


# --- the component's figure encoding ------------------------------------------------------------

def _decode(spec):
    return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=spec["dtype"])


def test_figure_json_packs_arrays_small_and_drops_the_template():
    n = 20_000
    fig = training_figure(_metrics(n), {"loss": ([100, 200], [0.5, 0.4])}, [])
    text = figure_json(fig)
    spec = json.loads(text)
    assert "template" not in spec["layout"]
    raw = next(t for t in spec["data"] if t["uid"] == "loss")
    assert raw["x"]["dtype"] == "i4" and raw["y"]["dtype"] == "f4"
    x, y = _decode(raw["x"]), _decode(raw["y"])
    assert x.size <= 3000 and np.all(np.diff(x) > 0)
    assert np.allclose(y, np.asarray(fig.data[0].y, dtype=float), rtol=1e-6, equal_nan=True)
    assert len(text) < 100_000  # a refresh of a 20k-step run: ~64 kB


def test_figure_json_keeps_precision_where_it_matters():
    import plotly.graph_objects as go

    wall = 1.7e9 + np.arange(5) * 0.25  # timestamps: float32 would round them to 128 s
    fig = go.Figure(go.Scatter(x=wall, y=np.array([1e300, 1.0, math.nan, 2.0, 3.0])))
    trace = json.loads(figure_json(fig))["data"][0]
    assert trace["x"]["dtype"] == "f8" and np.array_equal(_decode(trace["x"]), wall)
    assert trace["y"]["dtype"] == "f8"  # 1e300 does not fit a float32
    assert latest_x(fig) == wall[-1]
    plain = json.loads(figure_json({"data": [{"x": [1, 2], "y": [3, 4]}], "layout": {}}))
    assert plain["data"][0]["x"] == [1, 2]


def test_the_users_own_schedule_is_drawn_beside_the_effective_lr():
    steps = np.arange(100.0)
    user = 0.01 * np.cos(steps / 200)                          # a user's decaying schedule
    used = np.where(steps < 50, user, user * 0.25)             # a live change at step 50
    metrics = {"step": steps, "loss": np.ones(100), "lr": used, "user_lr": user}
    fig = training_figure(metrics, {}, [])
    names = [t.name for t in fig.data]
    assert "your schedule" in names and "learning rate" in names
    dashed = next(t for t in fig.data if t.name == "your schedule")
    assert dashed.line.dash == "dash" and max(dashed.y) == pytest.approx(0.01)
    # No user schedule and no factor: one LR line only.
    flat = {"step": steps, "loss": np.ones(100), "lr": np.full(100, 0.01),
            "user_lr": np.full(100, 0.01)}
    assert "your schedule" not in [t.name for t in training_figure(flat, {}, []).data]
    assert not shows_user_schedule(np.full(3, 0.1), np.full(3, np.nan))


def test_a_level_of_detail_read_gives_the_knobs_and_the_smoothing_their_own_steps():
    """Buckets (app.data.view_series): the LR drawn through its own points, its change at the
    exact step; the smoothed curve through the bucket means; a cut keeps each series' steps
    in range."""
    metrics = {"step": np.array([0.0, 7, 12, 31, 32, 63]),
               "loss": np.array([3.0, 1.0, math.nan, 2.0, 4.0, 4.0]),
               "lr_step": np.array([0.0, 17, 31, 32, 63]),
               "lr": np.array([0.1, 0.05, 0.05, 0.05, 0.05]),
               "user_lr": np.full(5, 0.1),
               "mean_step": np.array([15.5, 47.5]), "mean": np.array([3.0, 4.0])}
    fig = training_figure(metrics, {}, [{"step": 20, "kind": "set", "message": "lr"}],
                          smoothing=0.5)
    assert list(_trace(fig, "lr").x) == [0, 17, 63] and list(_trace(fig, "lr").y) == [
        0.1, 0.05, 0.05]
    assert list(_trace(fig, "user lr").x) == [0, 63]  # the factor changed: drawn beside
    assert list(_trace(fig, "loss ema").x) == [15.5, 47.5]
    assert list(_trace(fig, "loss ema").y) == pytest.approx([3.0, (0.25 * 3 + 0.5 * 4) / 0.75])
    assert list(_trace(fig, "interventions").y) == [0.05]  # the LR in force at step 20
    cut = training_figure(metrics, {}, [], steps_shown=(10, 40))
    assert list(_trace(cut, "lr").x) == [17, 32] and list(_trace(cut, "loss ema").x) == [15.5]


def test_a_focus_is_drawn_in_full_detail_and_the_rest_coarse():
    n = 100_000
    fig = training_figure(_metrics(n), {}, [], focus=(40_000, 41_999))
    x = np.asarray(_trace(fig, "loss").x)
    inside = (x >= 40_000) & (x <= 41_999)
    assert x[inside].tolist() == list(range(40_000, 42_000))  # 2,000 steps ≤ MAX_POINTS
    assert x[0] == 0 and x[-1] > n - 100 and x.size <= 2_000 + 2 * 500  # the rest: coarse
    ema_x = np.asarray(_trace(fig, "loss ema").x)
    assert ((ema_x >= 40_000) & (ema_x <= 41_999)).sum() == 2_000


@pytest.fixture
def static_dir(tmp_path, monkeypatch):
    """A fresh app/static/ for the chart's plotly.js, with the server's static serving on (the
    source is decided afresh, as by a new process, and forgotten after the test)."""
    monkeypatch.setattr(stream_chart, "STATIC_DIR", tmp_path / "static")
    stream_chart.plotly_js_source.cache_clear()
    monkeypatch.setattr(stream_chart.st, "get_option",
                        lambda name: name == "server.enableStaticServing")
    yield tmp_path / "static"
    stream_chart.plotly_js_source.cache_clear()


def test_plotly_js_is_placed_among_the_static_files_by_version(static_dir):
    """With static serving on (``panda dashboard``), the chart loads plotly.js as a static file
    named by its version: the package's own bytes, dated 1970 (so a browser keeps it fresh
    for years: its Last-Modified is all Streamlit sends); a half-written copy is replaced; an
    older version's file and a dead process's temporary copy go."""
    name = f"plotly-{stream_chart.plotly.__version__}.min.js"
    static_dir.mkdir()
    (static_dir / "plotly-0.1.0.min.js").write_text("old")
    (static_dir / name).write_text("half a copy")
    dead = static_dir / f".{name}.0123.tmp"
    dead.write_text("left by a crash")
    os.utime(dead, (1e9, 1e9))
    url, cacheable = stream_chart.plotly_js_source()
    assert (url, cacheable) == (f"../../app/static/{name}", True)
    placed = static_dir / name
    assert placed.read_bytes() == (stream_chart.PLOTLY_JS_DIR / "plotly.min.js").read_bytes()
    assert placed.stat().st_mtime == 0
    assert sorted(p.name for p in static_dir.iterdir()) == [name]


def test_plotly_js_falls_back_to_the_component_route(static_dir, monkeypatch, caplog):
    """Without static serving (a plain ``streamlit run``), or where app/static/ cannot be
    written, the chart loads plotly.js from the package through the component route (and
    keeps it in the Cache API), saying why in the log."""
    monkeypatch.setattr(stream_chart.st, "get_option", lambda name: False)
    assert stream_chart.plotly_js_source() == (stream_chart.PLOTLY_JS_URL, False)
    assert not static_dir.exists()
    monkeypatch.setattr(stream_chart.st, "get_option", lambda name: True)
    static_dir.write_text("a file where the directory should be")
    stream_chart.plotly_js_source.cache_clear()  # another dashboard process
    assert stream_chart.plotly_js_source() == (stream_chart.PLOTLY_JS_URL, False)
    assert "cannot write" in caplog.text
