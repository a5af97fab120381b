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
from scipy.signal import lfilter

MAX_POINTS = 3000          # per trace after downsampling: ~2 points per pixel column at 1280 px
RAW_OPACITY = 0.3          # raw loss is drawn faint behind its smoothed curve
DEBIAS_FLOOR = 1e-17       # below this, β^t no longer changes 1 − β^t in float64
EVENT_COLOR = "rgba(214, 39, 40, 0.6)"
LOSS_COLOR, VAL_COLOR, LR_COLOR = "#1f77b4", "#ff7f0e", "#2e7d32"
METRIC_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf")
OVERLAY_COLORS = ("#7f7f7f", "#bcbd22", "#17becf", "#e377c2")
UIREVISION = "panda"       # a constant uirevision keeps zoom and legend state across updates
LOSS_ROW_SHARE = 0.74      # the LR panel below takes the rest of the height


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
    smoothed = lfilter([1.0 - weight], [1.0, -weight], compact)
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
    markers = go.Scatter(x=at_steps, y=y, name="interventions", mode="markers",
                         text=[e.get("message") or e.get("kind", "") for e in events],
                         hovertemplate="step %{x}: %{text}<extra></extra>",
                         marker={"symbol": "triangle-up", "size": 11, "color": EVENT_COLOR})
    return shapes, markers


StepRange = tuple[float, float]  # (first, last) step shown, inclusive; ±inf for open ends


def _within(steps: Sequence[float], values: Sequence[float], span: StepRange
            ) -> tuple[list, list]:
    kept = [(s, v) for s, v in zip(steps, values) if span[0] <= s <= span[1]]
    return [s for s, _ in kept], [v for _, v in kept]


def _cut(steps: np.ndarray, span: StepRange) -> slice:
    """The index slice of sorted ``steps`` inside ``span``."""
    return slice(int(np.searchsorted(steps, span[0], side="left")),
                 int(np.searchsorted(steps, span[1], side="right")))


def training_figure(metrics: dict[str, np.ndarray], validation: dict[str, tuple],
                    events: list[dict[str, Any]], *, smoothing: float = 0.6,
                    log_y: bool = False, overlays: dict[str, dict[str, np.ndarray]] | None = None,
                    steps_shown: StepRange | None = None, height: int = 540) -> go.Figure:
    """Loss (raw, smoothed), validation metrics and LR on one step axis, with event markers.

    ``metrics``: arrays ``step``, ``loss``, ``lr``. ``validation``: name → (steps, values);
    ``loss`` is drawn with the training loss, other metrics on a right-hand axis.
    ``overlays``: other runs' ``step``/``loss`` to compare with. The LR is a linked panel
    below, on a log axis. ``steps_shown`` keeps only the steps in that range (smoothing still
    sees all), so the y axes fit what is shown; this is how the page zooms on the server.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        row_heights=[LOSS_ROW_SHARE, 1 - LOSS_ROW_SHARE],
                        specs=[[{"secondary_y": True}], [{"secondary_y": False}]])
    steps = np.asarray(metrics["step"], dtype=float)
    loss, lr = np.asarray(metrics["loss"], dtype=float), np.asarray(metrics["lr"], dtype=float)
    smooth = ema(loss, smoothing) if smoothing > 0 else None
    if steps_shown is not None:
        cut = _cut(steps, steps_shown)
        steps, loss, lr = steps[cut], loss[cut], lr[cut]
        smooth = None if smooth is None else smooth[cut]
        validation = {name: _within(vs, vals, steps_shown)
                      for name, (vs, vals) in validation.items()}
        events = [e for e in events if steps_shown[0] <= e["step"] <= steps_shown[1]]
    x, y = downsample(steps, loss)
    fig.add_trace(_line(x, y, "train loss", LOSS_COLOR, width=1, opacity=RAW_OPACITY),
                  row=1, col=1)
    if smooth is not None:
        sx, sy = downsample(steps, smooth)
        fig.add_trace(_line(sx, sy, f"train loss (EMA {smoothing:g})", LOSS_COLOR), row=1, col=1)
    for i, (name, (vsteps, values)) in enumerate(sorted(validation.items())):
        is_loss = name == "loss"
        color = VAL_COLOR if is_loss else METRIC_COLORS[i % len(METRIC_COLORS)]
        fig.add_trace(go.Scatter(x=vsteps, y=values, name=f"val {name}", mode="lines+markers",
                                 marker={"size": 5}, line={"color": color, "width": 2,
                                                           "dash": "solid" if is_loss else "dash"}),
                      row=1, col=1, secondary_y=not is_loss)
    for j, (run, other) in enumerate((overlays or {}).items()):
        osteps, oloss = np.asarray(other["step"], dtype=float), ema(other["loss"], smoothing)
        if steps_shown is not None:
            cut = _cut(osteps, steps_shown)
            osteps, oloss = osteps[cut], oloss[cut]
        ox, oy = downsample(osteps, oloss)
        fig.add_trace(_line(ox, oy, f"{run} (EMA)", OVERLAY_COLORS[j % len(OVERLAY_COLORS)],
                            width=1.5, line={"dash": "dot"}), row=1, col=1)
    lx, ly = downsample(steps, lr)
    fig.add_trace(_line(lx, ly, "learning rate", LR_COLOR, line={"shape": "hv"}), row=2, col=1)
    shapes, markers = _event_layer(events, steps, lr)
    if markers is not None:
        fig.add_trace(markers, row=2, col=1)
    fig.update_layout(shapes=shapes, height=height, uirevision=UIREVISION,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10}, hovermode="x unified",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.01, "x": 0})
    fig.update_yaxes(title_text="loss" + (" (log)" if log_y else ""),
                     type="log" if log_y else "linear", row=1, col=1, secondary_y=False)
    if any(name != "loss" for name in validation):
        fig.update_yaxes(title_text="val metric", row=1, col=1, secondary_y=True,
                         showgrid=False, tickformat=".3~f")
    fig.update_yaxes(title_text="lr (log)", type="log", row=2, col=1, exponentformat="power")
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig
