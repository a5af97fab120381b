"""Plotly figures for the live run, and the numerics behind them (smoothing, downsampling).

Everything here is pure: arrays in, figures out. The page (``app/main.py``) fetches rows from
the run store incrementally and hands the accumulated arrays over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.axes import (
    Range,
    linear_axis,
    log_axis,
    log_dtick,
    lr_panel_share,
    off_scale,
    padded,
    robust_range,
    run_edges,
)
from trainer.ema import exponential_moving_average

MAX_POINTS = 3000          # per trace after downsampling: ~2 points per pixel column at 1280 px
AROUND_POINTS = 500        # while zoomed: per trace on each side of the zoom (it gets MAX_POINTS)
StepRange = tuple[float, float]  # (first, last) step, inclusive; ±inf for open ends
RAW_OPACITY = 0.3          # raw loss is drawn faint behind its smoothed curve
DEBIAS_FLOOR = 1e-17       # below this, β^t no longer changes 1 − β^t in float64
EVENT_COLOR = "rgba(214, 39, 40, 0.6)"
LOSS_COLOR, VAL_COLOR, LR_COLOR = "#1f77b4", "#ff7f0e", "#2e7d32"
USER_LR_COLOR = "#8c8c8c"  # the user's own schedule, under the effective LR
METRIC_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf")
OVERLAY_COLORS = ("#7f7f7f", "#bcbd22", "#17becf", "#e377c2")
OFF_SCALE_COLOR = "#d62728"
MAX_MARKERS = 500          # off-scale markers per chart (a run that stayed NaN needs only a few)
# Room for the axes' tick labels and titles and, at the top, the legend (three rows in a
# 1280 px window) and the modebar plotly shows on hover: what plotly's automargin settled on
# for the usual chart (a linear loss axis, a validation metric; Chromium, the page's font).
# A margin still grows where its labels or legend need more (automargin, app/stream_chart),
# but growing costs plotly a second layout and draw: the page's first draw took 210–260 ms
# from margins of 10 px, 136–165 ms from these.
MARGIN = {"l": 56, "r": 24, "t": 84, "b": 44}
LOSS_HOVER = "%{y:.4g}"    # hover labels: 4 significant digits, not 0.01652575
ROW_GAP = 0.05             # share of the plot height between the loss and the LR panels


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard's smoothing: s_t = β·s_{t-1} + (1−β)·x_t with s_0 = 0, divided by 1 − β^t.

    The debiasing (Kingma & Ba 2015, §3) removes the pull towards 0 at the start; t counts the
    finite points seen so far. Non-finite values are skipped (the previous smoothed value carries
    on), so one NaN does not erase the rest of the curve. ``weight`` β in [0, 1); 0 returns the
    values unchanged.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0 or weight <= 0:
        return x.copy()
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    compact = x if all_finite else x[finite]
    if compact.size == 0:
        return np.full(x.size, np.nan)
    smoothed = exponential_moving_average(compact, weight)
    # Only the first few hundred terms need debiasing: after that β^t underflows past 1e-17.
    horizon = min(compact.size, math.ceil(math.log(DEBIAS_FLOOR) / math.log(weight)))
    smoothed[:horizon] /= 1.0 - weight ** np.arange(1, horizon + 1)
    if all_finite:
        return smoothed
    counts = np.cumsum(finite)  # finite points seen up to and including each index
    out = np.full(x.size, np.nan)
    seen = counts > 0
    out[seen] = smoothed[counts[seen] - 1]
    return out


def downsample(x: Sequence[float], y: Sequence[float],
               max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Min-max downsampling: per bucket keep the lowest and the highest point, in x order.

    Unlike striding, a single spike (a divergence, a bad batch) always survives. Buckets are
    equal runs of consecutive points; the result has at most ``max_points`` points and keeps
    the order of ``x``. NaN values only survive in buckets that hold nothing else.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    size = -(-x.size // buckets)  # ceil division
    padded = np.full(buckets * size, np.nan)
    padded[:y.size] = y
    rows = padded.reshape(buckets, size)
    nan = np.isnan(rows)
    # NaN never wins: +inf for the minimum, -inf for the maximum (padding included).
    lowest = np.argmin(np.where(nan, np.inf, rows), axis=1)
    highest = np.argmax(np.where(nan, -np.inf, rows), axis=1)
    base = np.arange(buckets) * size
    keep = np.unique(np.concatenate([base + lowest, base + highest]))
    keep = keep[keep < x.size]
    return x[keep], y[keep]


def downsample_focused(x: Sequence[float], y: Sequence[float], focus: StepRange | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`downsample`, spending MAX_POINTS on the steps in ``focus`` (sorted ``x``; None:
    all) and AROUND_POINTS on each side of it: a zoomed chart shows its zoom in full detail,
    and still holds the whole curve for a pan or a reset."""
    if focus is None:
        return downsample(x, y)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    cut = _cut(x, focus)
    parts = [downsample(x[:cut.start], y[:cut.start], AROUND_POINTS),
             downsample(x[cut], y[cut]), downsample(x[cut.stop:], y[cut.stop:], AROUND_POINTS)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _line(x, y, name: str, color: str, **extra: Any) -> go.Scatter:
    """An SVG line trace (not WebGL: downsampled traces are small, and SVG renders anywhere,
    headless browsers without a GPU included)."""
    style = {"color": color, "width": extra.pop("width", 2), **extra.pop("line", {})}
    return go.Scatter(x=x, y=y, name=name, mode="lines", line=style, **extra)


def _event_layer(events: list[dict[str, Any]], steps: np.ndarray, lr: np.ndarray
                 ) -> tuple[list[dict], go.Scatter | None]:
    """A dotted vertical line per intervention across both panels, and hoverable markers on
    the LR curve (shapes cannot carry a hover label)."""
    if not events:
        return [], None
    shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": e["step"], "x1": e["step"],
               "y0": 0, "y1": 1, "layer": "below",
               "line": {"color": EVENT_COLOR, "width": 1.5, "dash": "dot"}} for e in events]
    at_steps = np.asarray([e["step"] for e in events], dtype=float)
    if steps.size:
        index = np.clip(np.searchsorted(steps, at_steps), 0, steps.size - 1)
        y = lr[index]
    else:
        y = np.full(at_steps.size, np.nan)
    markers = go.Scatter(x=at_steps, y=y, name="interventions", uid="interventions",
                         mode="markers",
                         text=[e.get("message") or e.get("kind", "") for e in events],
                         hovertemplate="step %{x}: %{text}<extra></extra>",
                         marker={"symbol": "triangle-up", "size": 11, "color": EVENT_COLOR})
    return shapes, markers


def _within(steps: Sequence[float], values: Sequence[float], span: StepRange
            ) -> tuple[np.ndarray, np.ndarray]:
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    kept = (steps >= span[0]) & (steps <= span[1])
    return steps[kept], values[kept]


def _cut(steps: np.ndarray, span: StepRange) -> slice:
    """The index slice of sorted ``steps`` inside ``span``."""
    return slice(int(np.searchsorted(steps, span[0], side="left")),
                 int(np.searchsorted(steps, span[1], side="right")))


def _off_scale_markers(steps: np.ndarray, loss: np.ndarray, span: Range | None, log_y: bool
                       ) -> go.Scatter | None:
    """The losses the loss axis cannot show (non-finite, far out): a marker each at the edge
    they are beyond (▲ top, ▼ bottom), the true value in the hover text."""
    mask, above = off_scale(loss, span, log=log_y)
    index = np.flatnonzero(mask)
    if index.size == 0 or span is None:
        return None
    if index.size > MAX_MARKERS:  # evenly spaced, first and last kept
        index = index[np.unique(np.linspace(0, index.size - 1, MAX_MARKERS).round().astype(int))]
    edges = 10.0 ** np.asarray(span) if log_y else np.asarray(span)
    top, finite = above[index], np.isfinite(loss[index])
    # A finite value beyond the range (the steep start of a long run, a spike) is data: an
    # open triangle in the loss colour. NaN / inf is trouble: a red cross.
    symbol = np.where(finite, np.where(top, "triangle-up-open", "triangle-down-open"), "x")
    return go.Scatter(
        x=steps[index], y=np.where(top, edges[1], edges[0]), name="off-scale loss",
        uid="loss_off_scale", mode="markers", cliponaxis=False,
        text=[f"loss {v:.4g} (off scale)" for v in loss[index]],
        hovertemplate="step %{x}: %{text}<extra></extra>",
        marker={"symbol": symbol, "size": 8,
                "color": np.where(finite, LOSS_COLOR, OFF_SCALE_COLOR)})


def _plot_px(height: int) -> float:
    """The panels' height inside a figure ``height`` px tall (less margins, x axis and the
    gap between the panels)."""
    return max(1.0, (height - MARGIN["t"] - MARGIN["b"]) * (1 - ROW_GAP))


def shows_user_schedule(lr: np.ndarray, user_lr: np.ndarray) -> bool:
    """Whether to draw the user's own LR beside the effective one: when the user's code set an
    LR that moved (a schedule), or that Panda's factor changed (a live change)."""
    known = np.isfinite(user_lr) & np.isfinite(lr)
    if not known.any():
        return False
    users, used = user_lr[known], lr[known]
    moved = bool(np.any(users != users[0]))
    scaled = bool(np.any(np.abs(used - users) > 1e-9 * np.abs(users)))
    return moved or scaled


def _overlay_loss(fig: go.Figure, run: str, other: dict[str, Any], color: str,
                  smoothing: float, steps_shown: StepRange | None,
                  focus: StepRange | None) -> np.ndarray:
    """Another run's smoothed training loss and validation loss (dotted, in ``color``), in
    the loss panel; returns the loss values drawn (for the loss axis' range)."""
    osteps = np.asarray(other.get("mean_step", other["step"]), dtype=float)
    oloss = ema(other.get("mean", other["loss"]), smoothing)
    if steps_shown is not None:
        cut = _cut(osteps, steps_shown)
        osteps, oloss = osteps[cut], oloss[cut]
    ox, oy = downsample_focused(osteps, oloss, focus)
    fig.add_trace(_line(ox, oy, f"{run} (EMA)", color, width=1.5, line={"dash": "dot"},
                        uid=f"overlay {run}", hovertemplate=LOSS_HOVER), row=1, col=1)
    vsteps, values = (other.get("val") or {}).get("loss", ((), ()))
    if steps_shown is not None:
        vsteps, values = _within(vsteps, values, steps_shown)
    if len(vsteps):
        fig.add_trace(go.Scatter(x=list(vsteps), y=list(values), name=f"{run} val loss",
                                 uid=f"overlay val {run}", mode="lines+markers",
                                 marker={"size": 4, "symbol": "circle-open"},
                                 hovertemplate=LOSS_HOVER + " (step %{x})",
                                 line={"color": color, "width": 1.5, "dash": "dot"}),
                      row=1, col=1)
    return np.concatenate([oy, np.asarray(values, dtype=float)])


def _overlay_lr(fig: go.Figure, run: str, other: dict[str, Any], color: str,
                steps_shown: StepRange | None, focus: StepRange | None) -> np.ndarray:
    """Another run's LR (dotted, in ``color``) in the LR panel; returns the values drawn."""
    if other.get("lr") is None:
        return np.empty(0)
    osteps = np.asarray(other.get("lr_step", other["step"]), dtype=float)
    olr = np.asarray(other["lr"], dtype=float)
    if steps_shown is not None:
        cut = _cut(osteps, steps_shown)
        osteps, olr = osteps[cut], olr[cut]
    keep = run_edges(olr)
    lx, ly = downsample_focused(osteps[keep], olr[keep], focus)
    if lx.size:
        fig.add_trace(_line(lx, ly, f"{run} lr", color, width=1.5,
                            line={"shape": "hv", "dash": "dot"}, uid=f"overlay lr {run}",
                            hovertemplate="%{y:.3g}"), row=2, col=1)
    return ly


def training_figure(metrics: dict[str, np.ndarray], validation: dict[str, tuple],
                    events: list[dict[str, Any]], *, smoothing: float = 0.6,
                    log_y: bool = False, overlays: dict[str, dict[str, np.ndarray]] | None = None,
                    steps_shown: StepRange | None = None, focus: StepRange | None = None,
                    height: int = 540) -> go.Figure:
    """Loss (raw, smoothed), validation metrics and LR on one step axis, with event markers.

    ``metrics``: arrays ``step``, ``loss``, ``lr`` (what each update used) and optionally
    ``user_lr`` (the user's own schedule, drawn dashed when it differs). A level-of-detail
    read (:mod:`app.data`) gives the knobs their own steps (``lr_step``) and the smoothing its
    own series (``mean_step``, ``mean``: bucket means); by default both are ``step``,
    ``loss``. ``validation``:
    name → (steps, values); ``loss`` is drawn with the training loss, other metrics on a
    right-hand axis.
    ``overlays``: other runs to compare with, name → ``step``, ``loss`` (or ``mean_step``,
    ``mean``), optionally ``lr`` (at ``lr_step``, by default ``step``) and ``val`` (like
    ``validation``): their smoothed loss and validation loss are drawn dotted in the loss
    panel, their LR dotted in the LR panel, each run in its own colour. The LR is a linked
    panel below, on a log axis. ``steps_shown`` keeps only the steps in that range (smoothing
    still sees all), so the y axes fit what is shown (the "Steps shown" window). ``focus``:
    the steps the chart is zoomed to, drawn in full detail (:func:`downsample_focused`).

    Axes are honest (:mod:`app.axes`): 1-2-5 ticks; the loss range comes from the body of
    the data, with non-finite and far-out losses drawn as markers at its edge; the LR axis
    spans at least a decade. Every trace has a stable ``uid``, so the chart component keeps
    a hidden legend entry hidden when a trace name changes (e.g. the EMA weight).
    """
    plot_px = _plot_px(height)
    lr_share = lr_panel_share(plot_px)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=ROW_GAP,
                        row_heights=[1 - lr_share, lr_share],
                        specs=[[{"secondary_y": True}], [{"secondary_y": False}]])
    loss_px, lr_px = plot_px * (1 - lr_share), plot_px * lr_share
    steps = np.asarray(metrics["step"], dtype=float)
    loss, lr = np.asarray(metrics["loss"], dtype=float), np.asarray(metrics["lr"], dtype=float)
    user_lr = np.asarray(metrics.get("user_lr", np.full(lr.shape, np.nan)), dtype=float)
    lr_steps = np.asarray(metrics.get("lr_step", steps), dtype=float)
    mean_steps = np.asarray(metrics.get("mean_step", steps), dtype=float)
    mean = np.asarray(metrics.get("mean", loss), dtype=float)
    smooth = ema(mean, smoothing) if smoothing > 0 else None
    if steps_shown is not None:
        cut, lr_cut, mean_cut = (_cut(s, steps_shown) for s in (steps, lr_steps, mean_steps))
        steps, loss = steps[cut], loss[cut]
        lr_steps, lr, user_lr = lr_steps[lr_cut], lr[lr_cut], user_lr[lr_cut]
        mean_steps = mean_steps[mean_cut]
        smooth = None if smooth is None else smooth[mean_cut]
        validation = {name: _within(vs, vals, steps_shown)
                      for name, (vs, vals) in validation.items()}
        events = [e for e in events if steps_shown[0] <= e["step"] <= steps_shown[1]]
    x, y = downsample_focused(steps, loss, focus)
    curves, overlay_lrs = [], []
    for j, (run, other) in enumerate((overlays or {}).items()):
        color = OVERLAY_COLORS[j % len(OVERLAY_COLORS)]
        curves.append(_overlay_loss(fig, run, other, color, smoothing, steps_shown, focus))
        overlay_lrs.append(_overlay_lr(fig, run, other, color, steps_shown, focus))
    val_loss = validation.get("loss", ((), ()))[1]
    span = robust_range(np.concatenate([y, np.asarray(val_loss, dtype=float), *curves]),
                        log=log_y)
    y = np.where(off_scale(y, span, log=log_y)[0], np.nan, y)  # a gap; a marker shows it
    fig.add_trace(_line(x, y, "train loss", LOSS_COLOR, width=1, opacity=RAW_OPACITY,
                        uid="loss", hovertemplate=LOSS_HOVER), row=1, col=1)
    if smooth is not None:
        sx, sy = downsample_focused(mean_steps, smooth, focus)
        fig.add_trace(_line(sx, sy, f"train loss (EMA {smoothing:g})", LOSS_COLOR,
                            uid="loss ema", hovertemplate=LOSS_HOVER), row=1, col=1)
    metric_values = [np.empty(0)]
    for i, (name, (vsteps, values)) in enumerate(sorted(validation.items())):
        is_loss = name == "loss"
        color = VAL_COLOR if is_loss else METRIC_COLORS[i % len(METRIC_COLORS)]
        # Arrays, not lists: plotly validates a list element by element (10,000 evaluations
        # of a long run cost ~0.1 s a refresh).
        vsteps, values = np.asarray(vsteps, dtype=float), np.asarray(values, dtype=float)
        if not is_loss:
            metric_values.append(values)
        fig.add_trace(go.Scatter(x=vsteps, y=values, name=f"val {name}", uid=f"val {name}",
                                 mode="lines+markers", marker={"size": 5},
                                 hovertemplate=LOSS_HOVER + " (step %{x})",
                                 line={"color": color, "width": 2,
                                       "dash": "solid" if is_loss else "dash"}),
                      row=1, col=1, secondary_y=not is_loss)
    markers = _off_scale_markers(steps, loss, span, log_y)
    if markers is not None:
        fig.add_trace(markers, row=1, col=1)
    if shows_user_schedule(lr, user_lr):
        # The user's own schedule, which Panda's factor multiplies (trainer.composition).
        keep = run_edges(user_lr)
        ux, uy = downsample_focused(lr_steps[keep], user_lr[keep], focus)
        fig.add_trace(_line(ux, uy, "your schedule", USER_LR_COLOR, width=1.5,
                            line={"shape": "hv", "dash": "dash"}, uid="user lr",
                            hovertemplate="%{y:.3g}"), row=2, col=1)
    keep = run_edges(lr)  # LR is piecewise constant under most schedules: a point per change
    lx, ly = downsample_focused(lr_steps[keep], lr[keep], focus)
    fig.add_trace(_line(lx, ly, "learning rate", LR_COLOR, line={"shape": "hv"}, uid="lr",
                        hovertemplate="%{y:.3g}"), row=2, col=1)
    shapes, events_trace = _event_layer(events, lr_steps, lr)
    if events_trace is not None:
        fig.add_trace(events_trace, row=2, col=1)
    fig.update_layout(shapes=shapes, height=height, margin=MARGIN, hovermode="x unified",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.01, "x": 0})
    if log_y:
        loss_axis = {"type": "log", "exponentformat": "power"}
        if span is not None:
            loss_axis.update(range=list(span), dtick=log_dtick(span, loss_px))
    else:
        loss_axis = {"type": "linear", **linear_axis(span, loss_px)}
    fig.update_yaxes(title_text="loss" + (" (log)" if log_y else ""), row=1, col=1,
                     secondary_y=False, **loss_axis)
    if any(name != "loss" for name in validation):
        metric_axis = linear_axis(padded(np.concatenate(metric_values)), loss_px)
        fig.update_yaxes(title_text="val metric", row=1, col=1, secondary_y=True,
                         showgrid=False, **metric_axis)
    lr_values = np.concatenate([lr, user_lr[np.isfinite(user_lr)], *overlay_lrs])
    fig.update_yaxes(title_text="lr (log)", row=2, col=1, **log_axis(lr_values, lr_px))
    fig.update_xaxes(title_text="step", row=2, col=1)
    # The steps drawn, edge to edge: plotly's autorange pads for markers (down to step −500
    # on a long run). Markers on the edges are drawn whole (cliponaxis=False).
    xs = [np.asarray(t.x, dtype=float) for t in fig.data if t.x is not None and len(t.x)]
    fig.update_xaxes(range=padded(np.concatenate(xs), pad=0.0) if xs else None)
    fig.update_traces(cliponaxis=False, selector={"mode": "lines+markers"})
    return fig
