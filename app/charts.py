"""Plotly figures for the live run, and the numerics behind them (smoothing, downsampling).

Everything here is pure: arrays in, figures out. The page (``app/main.py``) fetches rows from
the run store incrementally and hands the accumulated arrays over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy.signal import lfilter

from trainer.knobs import format_sci

MAX_POINTS = 4000          # per trace after downsampling: plenty for a 1280 px wide chart
RAW_OPACITY = 0.25         # raw loss is drawn faint behind its smoothed curve
EVENT_COLOR = "rgba(214, 39, 40, 0.55)"
LOSS_COLOR, SMOOTH_COLOR, VAL_COLOR, LR_COLOR = "#1f77b4", "#1f77b4", "#ff7f0e", "#2ca02c"
METRIC_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf")
UIREVISION = "panda"       # a constant uirevision keeps zoom and legend state across updates


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard's smoothing: s_t = w·s_{t-1} + (1−w)·x_t, debiased by 1 − w^(t+1).

    The debiasing (Kingma & Ba 2015, §3) removes the pull towards 0 at the start. Non-finite
    values are skipped (the previous smoothed value carries on), so a NaN does not erase the
    rest of the curve. ``weight`` in [0, 1); 0 returns the values unchanged.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0 or weight <= 0:
        return x.copy()
    finite = np.isfinite(x)
    out = np.full(x.size, np.nan)
    if not finite.any():
        return out
    compact = lfilter([1.0 - weight], [1.0, -weight], x[finite])
    compact /= 1.0 - weight ** np.arange(1, compact.size + 1)
    counts = np.cumsum(finite)  # finite points seen up to and including each index
    seen = counts > 0
    out[seen] = compact[counts[seen] - 1]
    return out


def downsample(x: Sequence[float], y: Sequence[float],
               max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Min-max downsampling: per bucket keep the lowest and the highest point, in x order.

    Unlike striding, a single spike (a divergence, a bad batch) always survives. Buckets are
    equal runs of consecutive points; the result has at most ``max_points`` points.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    size = -(-x.size // buckets)  # ceil division
    padded = np.full(buckets * size, np.nan)
    padded[:y.size] = y
    rows = padded.reshape(buckets, size)
    # NaN never wins: +inf for the minimum, -inf for the maximum (padding included).
    lowest = np.argmin(np.where(np.isnan(rows), np.inf, rows), axis=1)
    highest = np.argmax(np.where(np.isnan(rows), -np.inf, rows), axis=1)
    base = np.arange(buckets) * size
    keep = np.unique(np.concatenate([base + lowest, base + highest]))
    keep = keep[keep < x.size]
    return x[keep], y[keep]


def _event_shapes(events: list[dict[str, Any]]) -> tuple[list[dict], dict[str, list]]:
    shapes, hover = [], {"x": [], "text": []}
    for event in events:
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": event["step"],
                       "x1": event["step"], "y0": 0, "y1": 1,
                       "line": {"color": EVENT_COLOR, "width": 1.5, "dash": "dot"}})
        hover["x"].append(event["step"])
        hover["text"].append(event["message"])
    return shapes, hover


def training_figure(metrics: dict[str, np.ndarray], validation: dict[str, tuple],
                    events: list[dict[str, Any]], *, smoothing: float = 0.6,
                    log_y: bool = False, overlays: dict[str, dict[str, np.ndarray]] | None = None,
                    height: int = 560) -> go.Figure:
    """Loss (raw, smoothed), validation metrics and LR on one step axis, with event markers.

    ``metrics``: arrays ``step``, ``loss``, ``lr``. ``validation``: name → (steps, values);
    ``loss`` is drawn with the training loss, other metrics on a right-hand axis (0…1 for
    accuracy-like metrics). ``overlays``: other runs' ``step``/``loss`` to compare with.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        row_heights=[0.74, 0.26], specs=[[{"secondary_y": True}],
                                                         [{"secondary_y": False}]])
    steps, loss = metrics["step"], metrics["loss"]
    x, y = downsample(steps, loss)
    fig.add_trace(go.Scattergl(x=x, y=y, name="train loss", mode="lines", opacity=RAW_OPACITY,
                               line={"color": LOSS_COLOR, "width": 1}), row=1, col=1)
    if smoothing > 0:
        sx, sy = downsample(steps, ema(loss, smoothing))
        fig.add_trace(go.Scattergl(x=sx, y=sy, name=f"train loss (EMA {smoothing:g})",
                                   mode="lines", line={"color": SMOOTH_COLOR, "width": 2}),
                      row=1, col=1)
    for i, (name, (vsteps, values)) in enumerate(sorted(validation.items())):
        is_loss = name == "loss"
        fig.add_trace(go.Scatter(x=vsteps, y=values, name=f"val {name}", mode="lines+markers",
                                 line={"color": VAL_COLOR if is_loss else
                                       METRIC_COLORS[i % len(METRIC_COLORS)],
                                       "width": 2, "dash": "solid" if is_loss else "dash"}),
                      row=1, col=1, secondary_y=not is_loss)
    for j, (run, other) in enumerate((overlays or {}).items()):
        ox, oy = downsample(other["step"], ema(other["loss"], smoothing))
        fig.add_trace(go.Scattergl(x=ox, y=oy, name=f"{run} (EMA)", mode="lines",
                                   line={"width": 1.5, "dash": "dot",
                                         "color": METRIC_COLORS[(j + 2) % len(METRIC_COLORS)]}),
                      row=1, col=1)
    lx, ly = downsample(steps, metrics["lr"])
    fig.add_trace(go.Scattergl(x=lx, y=ly, name="learning rate", mode="lines",
                               line={"color": LR_COLOR, "width": 2, "shape": "hv"}), row=2, col=1)
    shapes, hover = _event_shapes(events)
    if hover["x"] and len(steps):
        # Markers sit on the LR curve at the step of each intervention; hover tells the story.
        at = np.clip(np.searchsorted(steps, hover["x"]), 0, len(steps) - 1)
        fig.add_trace(go.Scatter(x=hover["x"], y=np.asarray(metrics["lr"])[at],
                                 name="interventions", mode="markers", text=hover["text"],
                                 hovertemplate="%{text}<extra></extra>",
                                 marker={"symbol": "triangle-up", "size": 11,
                                         "color": EVENT_COLOR}), row=2, col=1)
    fig.update_layout(shapes=shapes, height=height, uirevision=UIREVISION,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, hovermode="x unified",
                      legend={"orientation": "h", "y": 1.06, "x": 0})
    fig.update_yaxes(title_text="loss", type="log" if log_y else "linear", row=1, col=1,
                     secondary_y=False)
    fig.update_yaxes(title_text="metric", row=1, col=1, secondary_y=True, showgrid=False)
    fig.update_yaxes(title_text="lr", type="log", row=2, col=1, exponentformat="power")
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig


def describe_event(event: dict[str, Any]) -> str:
    """One line per intervention for the timeline table."""
    return f"step {event['step']}: {event['message']}"


def format_knob(value: float | None) -> str:
    return "–" if value is None else format_sci(value)
