"""Dashboard panel: an LR range test beside the live run, and applying its suggestion.

The panel only reads and writes the run store: the test runs in its own detached process
(:func:`trainer.lr_range.job.start_lr_find_job`) on a copy of the run's newest checkpoint, and every
render (the page's fragment re-runs about once a second) reads the newest ``lr_find`` row. The
suggested LR is applied as an ordinary ``set`` command, validated where it is entered and again
where the trainer applies it, logged and drawn like any other intervention.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from app import actions
from app.axes import linear_axis, log_axis
from app.stream_chart import figure_json, stream_chart
from trainer.knobs import format_sci, validate_knobs
from trainer.lr_range.job import describe_result, latest_lr_find, readiness
from trainer.ranges import KnobError
from trainer.store import FINAL_STATES, RunStore

RAW_OPACITY = 0.3            # raw per-step losses: faint behind the smoothed curve
BAND_COLOR = "rgba(44, 160, 44, 0.15)"
Y_PAD = 0.05                 # share of the loss span added above and below the curve
HEIGHT = 340                 # px
PLOT_PX = (560, 250)         # about the plot area's width and height in the page's chart column
X_LABEL_GAP_PX = 24          # log x axis: "10⁻⁵" labels are wider than they are tall


def _num(value: Any) -> float:
    """A stored number ("nan"/"inf" strings included, see lr_finder's JSON) as a float."""
    return math.nan if value is None else float(value)


def _y_extent(smoothed: list[float], raw: list[float]) -> tuple[float, float]:
    """Y span of the plot: the smoothed curve (which stops at divergence) and the raw losses
    within it, so one exploding raw loss does not flatten the rest."""
    finite_smooth = [v for v in smoothed if math.isfinite(v)]
    if not finite_smooth:
        return 0.0, 1.0
    top = max(finite_smooth)
    values = finite_smooth + [v for v in raw if math.isfinite(v) and v <= top]
    low, high = min(values), max(values)
    pad = (high - low) * Y_PAD or abs(high) * Y_PAD or 1.0
    return low - pad, high + pad


def lr_find_figure(payload: dict[str, Any]) -> go.Figure:
    """Loss vs LR (log x): raw loss faint, smoothed curve, the suggestion as a marker with its
    range as a shaded band, and ``max_stable_lr`` as a vertical dashed line.

    Every element is a trace in data coordinates (named "raw loss", "smoothed loss",
    "suggested range", "suggested lr", "max stable lr"), so positions are easy to check.
    """
    lrs = [float(v) for v in payload.get("lrs", [])]
    raw = [_num(v) for v in payload.get("losses", [])]
    smoothed = [_num(v) for v in payload.get("smoothed_losses", [])]
    y0, y1 = _y_extent(smoothed, raw)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=lrs, y=[v if math.isfinite(v) else None for v in raw],
                             name="raw loss", mode="lines", opacity=RAW_OPACITY,
                             line={"width": 1, "color": "#1f77b4"}))
    fig.add_trace(go.Scatter(x=lrs, y=[v if math.isfinite(v) else None for v in smoothed],
                             name="smoothed loss", mode="lines",
                             line={"width": 2.5, "color": "#1f77b4"}))
    suggested, band = payload.get("suggested_lr"), payload.get("suggestion_range")
    if band:
        low, high = float(band[0]), float(band[1])
        fig.add_trace(go.Scatter(x=[low, high, high, low, low], y=[y0, y0, y1, y1, y0],
                                 name="suggested range", mode="lines", fill="toself",
                                 fillcolor=BAND_COLOR, line={"width": 0}, hoverinfo="skip"))
    if suggested is not None:
        suggested = float(suggested)
        at = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggested)), default=None)
        y = smoothed[at] if at is not None and math.isfinite(smoothed[at]) else (y0 + y1) / 2
        fig.add_trace(go.Scatter(x=[suggested], y=[y], name="suggested lr",
                                 mode="markers", marker={"size": 12, "color": "#2ca02c",
                                                         "symbol": "diamond"},
                                 hovertemplate="suggested lr %{x:.3g}<extra></extra>"))
    stable = payload.get("max_stable_lr")
    if stable is not None:
        stable = float(stable)
        fig.add_trace(go.Scatter(x=[stable, stable], y=[y0, y1], name="max stable lr",
                                 mode="lines", line={"color": "#d62728", "dash": "dash"},
                                 hovertemplate="max stable lr %{x:.3g}<extra></extra>"))
    fig.update_xaxes(title_text="learning rate (log scale)",
                     **log_axis(lrs, PLOT_PX[0], X_LABEL_GAP_PX))
    measured = "mini-batch loss" if payload.get("options", {}).get("measure") == "batch" \
        else "training loss (fixed samples)"
    fig.update_yaxes(title_text=measured, **linear_axis((y0, y1), PLOT_PX[1]))
    fig.update_layout(height=HEIGHT, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "y": 1.12})
    return fig


def lr_find_summary(payload: dict[str, Any]) -> str:
    """The numbers of a finished test as short Markdown."""
    return "  \n".join(f"**{label}** {text}" for label, text in describe_result(payload))


def _apply_block(store: RunStore, row: dict[str, Any], key: str, allowed: bool) -> None:
    """Apply suggested LR: an ordinary ``set`` command through :mod:`app.actions` (the access
    token is checked there; the outcome is the run's one message, beside the knobs)."""
    payload = row["payload"]
    suggested = payload.get("suggested_lr")
    if suggested is None:
        return
    state = store.summary()["state"]
    refusal = None
    if state in (*FINAL_STATES, "interrupted"):
        refusal = f"the run is {state}: it takes no commands"
    try:
        knobs = validate_knobs({"lr": float(suggested)})
    except (KnobError, TypeError, ValueError) as err:
        knobs, refusal = None, str(err)
    st.button(f"Apply suggested LR ({format_sci(float(suggested))})",
              key=f"lrfind_apply_{key}_{row['id']}", disabled=refusal is not None or not allowed,
              help=refusal, on_click=actions.apply_suggested_lr,
              args=(store.address, store.name, knobs["lr"] if knobs else None))
    if refusal:
        st.caption(f"Cannot apply: {refusal}")


def _figure(row: dict[str, Any]) -> str:
    """The finished test's plot as the chart's JSON, built once per result (a refresh that
    finds the same result sends the same text)."""
    cache = st.session_state.setdefault("lrfind_figures", {})
    if row["id"] not in cache:
        cache.clear()  # one result is shown at a time
        cache[row["id"]] = figure_json(lr_find_figure(row["payload"]))
    return cache[row["id"]]


def render_lr_panel(store: RunStore, *, allowed: bool = True) -> None:
    """The LR range test panel for one run (call it inside the page's ~1 s fragment).
    ``allowed`` False (no access token) disables its buttons (their callbacks refuse anyway)."""
    key = store.name
    st.markdown("**LR range test**")
    reason = readiness(store)
    st.button("Run LR range test", key=f"lrfind_start_{key}",
              disabled=reason is not None or not allowed, on_click=actions.start_range_test,
              args=(store.address, store.name), help=reason or
              "Ramp the LR on a copy of the newest checkpoint in a separate process; the run "
              "keeps training")
    if reason:
        st.caption(reason)
    row = latest_lr_find(store)
    if row is None:
        return
    payload = row["payload"]
    if row["status"] == "running":
        progress = min(max(float(payload.get("progress") or 0.0), 0.0), 1.0)
        where = payload.get("checkpoint_step")
        st.progress(progress, text=f"LR range test {row['id']}: " + (
            f"{progress:.0%} (from the checkpoint at step {where})" if where is not None
            else "starting"))
    elif row["status"] == "failed":
        st.error(f"LR range test {row['id']} failed: {payload.get('error', 'unknown error')}")
    elif row["status"] == "done":
        stream_chart(_figure(row), key=f"lrfind_chart_{key}_{row['id']}",
                     revision=str(row["id"]), height=HEIGHT)
        st.markdown(lr_find_summary(payload))
        current = store.summary().get("lr")
        if current is not None:
            st.caption(f"The run's LR now: {format_sci(float(current))}")
        _apply_block(store, row, key, allowed)
