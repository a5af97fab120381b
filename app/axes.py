"""Honest axes: round ticks, log ranges that do not exaggerate, and a loss range that one
diverged step cannot take over.

Pure functions (arrays in, numbers and plotly axis settings out), used by :mod:`app.charts`
and :mod:`app.lr_panel`. Plotly ranges on log axes are in log10 units, as plotly wants them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NICE_MANTISSAS = (1.0, 2.0, 5.0, 10.0)  # 1-2-5 steps (Heckbert, "Nice numbers for graph
                                        # labels", Graphics Gems, 1990)
TICK_GAP_PX = 40           # at least this far apart: vertical tick labels, ~14 px tall, breathe
LOG_LABEL_GAP_PX = 18      # log axis: the closest labels (1→2 and 5→10, 0.3 decade) this far
MIN_DECADES = 1.0          # a log axis spans at least a decade: a 0.1 % change stays flat
RANGE_PAD = 0.05           # share of the span added on each side, so no point sits on the frame
LOG_PAD_DECADES = 0.05     # the same on log axes, in decades
# The loss body: TensorBoard's "ignore outliers in chart scaling" takes the 5th-95th
# percentiles; a wider 1-99 % body keeps the steep start of a long run on the chart.
BODY_QUANTILES = (0.01, 0.99)
# "Far out" beyond the body by more than this many body widths (Tukey's outer fence is 3 IQR:
# Tukey, Exploratory Data Analysis, 1977, ch. 2).
FAR_OUT = 3.0
MIN_BODY_SHARE = 0.25      # a flat body is at least this share of its level wide (a plateau
                           # at 1.0 with a step at 1.5 is not an outlier)
MIN_BODY_DECADES = 0.1     # the same floor on a log axis
LR_PANEL_SHARE = 0.3       # the LR panel takes at least this share of the plot height …
LR_PANEL_MIN_PX = 120      # … and at least this many pixels: its labels must not overlap
LR_PANEL_MAX_SHARE = 0.5

Range = tuple[float, float]


def nice_step(span: float, max_ticks: int) -> float:
    """The smallest 1, 2 or 5 × 10^k that cuts ``span`` into at most ``max_ticks`` steps."""
    if not (math.isfinite(span) and span > 0):
        return 1.0
    rough = span / max(1, max_ticks)
    power = 10.0 ** math.floor(math.log10(rough))
    for mantissa in NICE_MANTISSAS:
        step = mantissa * power
        if step >= rough * (1 - 1e-9):  # the tolerance absorbs float error in span / n
            return step
    return 10.0 * power  # not reached: the last mantissa is 10


def nice_ticks(low: float, high: float, max_ticks: int) -> list[float]:
    """The multiples of :func:`nice_step` inside ``[low, high]`` (what plotly draws for
    ``tickmode="linear", tick0=0, dtick=step``)."""
    step = nice_step(high - low, max_ticks)
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    return [float(f"{k * step:.12g}") for k in range(first, last + 1)]


def max_ticks(pixels: float, gap: float = TICK_GAP_PX) -> int:
    """How many tick intervals fit ``pixels`` with labels ``gap`` apart (at least 2)."""
    return max(2, int(pixels // gap))


def linear_axis(span: Range | None, pixels: float) -> dict[str, Any]:
    """Plotly settings for a linear axis showing ``span``: that range, with 1-2-5 ticks.

    Plotly's automatic ticks are 1-2-5 as well; these are explicit so the first view is known
    (and tested) and the tick density follows the axis' height. A zoomed axis falls back to
    plotly's own ticks (the chart component drops ``dtick`` for a range the user chose).
    """
    if span is None:
        return {}
    return {"range": list(span), "tickmode": "linear", "tick0": 0,
            "dtick": nice_step(span[1] - span[0], max_ticks(pixels))}


def padded(values: Sequence[float] | np.ndarray, pad: float = RANGE_PAD) -> Range | None:
    """The finite values' [min, max], widened by ``pad`` of the span on each side (a single
    value gets ``pad`` of its size, or ±1 for zero). None when nothing is finite."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    low, high = float(v.min()), float(v.max())
    margin = (high - low) * pad if high > low else abs(high) * pad or 1.0
    return low - margin, high + margin


def log_range(values: Sequence[float] | np.ndarray) -> Range | None:
    """A log axis range (log10 units) around the positive finite values, spanning at least
    :data:`MIN_DECADES` centred on them (geometric centre), else their span padded by
    :data:`LOG_PAD_DECADES` each side. None when no value is positive and finite.

    Plotly autoranges 0.0099985–0.01 edge to edge, so a 0.015 % change looks like a cliff; a
    decade around it draws the same data as the near-flat line it is.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return None
    low, high = math.log10(float(v.min())), math.log10(float(v.max()))
    if high - low < MIN_DECADES:
        centre = (low + high) / 2
        return centre - MIN_DECADES / 2, centre + MIN_DECADES / 2
    return low - LOG_PAD_DECADES, high + LOG_PAD_DECADES


def log_dtick(span: Range, pixels: float, gap: float = LOG_LABEL_GAP_PX) -> str | int:
    """Plotly's ``dtick`` for a log axis of ``span`` (log10 units) over ``pixels``: "D2"
    (each decade labelled, with small 2 and 5 between) when those labels fit, else every
    decade (1), else every n-th decade."""
    decades = max(span[1] - span[0], 1e-9)
    per_decade = pixels / decades
    if per_decade * math.log10(2) >= gap:  # 1→2 (and 5→10) is the tightest pair: 0.3 decade
        return "D2"
    return max(1, math.ceil(gap / per_decade))


def log_axis(values: Sequence[float] | np.ndarray, pixels: float,
             gap: float = LOG_LABEL_GAP_PX) -> dict[str, Any]:
    """Plotly settings for a log axis over ``values``: :func:`log_range` and
    :func:`log_dtick`, decades written as powers of ten."""
    span = log_range(values)
    if span is None:
        return {"type": "log", "exponentformat": "power"}
    return {"type": "log", "range": list(span), "dtick": log_dtick(span, pixels, gap),
            "exponentformat": "power"}


def robust_range(values: Sequence[float] | np.ndarray, *, log: bool = False) -> Range | None:
    """An axis range for noisy data that a few far-out values cannot take over.

    The body is the :data:`BODY_QUANTILES` of the finite values (positive ones when ``log``,
    measured in decades), and leaves out at least two values on each side; values more than
    :data:`FAR_OUT` body widths beyond it are far out.
    The range spans the rest, padded; in log10 units when ``log``. Far-out and non-finite
    values are for the caller to mark at the edge (:func:`off_scale`). None when nothing is
    finite.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if v.size == 0:
        return None
    if log:
        v = np.log10(v)
    # With few points the 1 % quantile is the minimum itself: leave at least two points out
    # on each side, so one spike among 50 steps cannot widen the body.
    tail = min(0.5, max(BODY_QUANTILES[0], 2 / v.size))
    low_q, high_q = (float(q) for q in np.quantile(v, (tail, 1 - tail)))
    floor = MIN_BODY_DECADES if log else MIN_BODY_SHARE * max(abs(low_q), abs(high_q))
    # A body of zeros has no scale to protect: then nothing is far out.
    width = max(high_q - low_q, floor) or math.inf
    inside = v[(v >= low_q - FAR_OUT * width) & (v <= high_q + FAR_OUT * width)]
    low, high = float(inside.min()), float(inside.max())
    if log:
        if high - low < MIN_DECADES:  # as for the LR: a decade at least, or noise looks huge
            centre = (low + high) / 2
            return centre - MIN_DECADES / 2, centre + MIN_DECADES / 2
        return low - LOG_PAD_DECADES, high + LOG_PAD_DECADES
    margin = (high - low) * RANGE_PAD or abs(high) * RANGE_PAD or 1.0
    return low - margin, high + margin


def off_scale(values: Sequence[float] | np.ndarray, span: Range | None, *,
              log: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Which values an axis of ``span`` cannot show, and on which edge they belong.

    Returns (mask, above): non-finite values, values outside ``span`` (log10 units when
    ``log``) and, on a log axis, values ≤ 0. ``above`` is True where the value belongs at the
    top edge: above the range, +inf and NaN (no direction, so the edge where trouble
    usually shows); False for below the range, -inf and non-positive values on a log axis.
    """
    v = np.asarray(values, dtype=float)
    nan = np.isnan(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.log10(np.where(v > 0, v, np.nan)) if log else v
    below = (v == -np.inf) | (log & ~nan & (v <= 0))
    above = nan | (v == np.inf)
    if span is not None:
        finite = np.isfinite(scaled)
        below |= finite & (scaled < span[0])
        above |= finite & (scaled > span[1])
    return below | above, above


def lr_panel_share(plot_px: float) -> float:
    """The LR panel's share of the plot height: :data:`LR_PANEL_SHARE`, but at least
    :data:`LR_PANEL_MIN_PX` (so its decade labels do not overlap), at most half."""
    if plot_px <= 0:
        return LR_PANEL_SHARE
    return min(LR_PANEL_MAX_SHARE, max(LR_PANEL_SHARE, LR_PANEL_MIN_PX / plot_px))


def run_edges(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the first and last point of each run of equal values (NaN counts as a
    value of its own), in order.

    A step-shaped curve drawn ``line.shape="hv"`` through these points is the same curve: an
    LR that changes a handful of times needs a handful of points, not one per step. Keeping
    both ends of each run also keeps hover exact (the nearest point is in the same run).
    """
    v = np.asarray(values, dtype=float)
    if v.size <= 2:
        return np.arange(v.size)
    same = (v[1:] == v[:-1]) | (np.isnan(v[1:]) & np.isnan(v[:-1]))
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    ends = np.flatnonzero(np.concatenate([~same, [True]]))
    return np.union1d(starts, ends)
