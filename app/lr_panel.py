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

from app.axes import linear_axis, log_axis
from app.stream_chart import stream_chart
from trainer.knobs import format_sci, validate_knobs
from trainer.lr_range.job import (
    LRJobError,
    describe_result,
    latest_lr_find,
    readiness,
    start_lr_find_job,
)
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


def _apply_block(store: RunStore, row: dict[str, Any], key: str) -> None:
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
    sent_key = f"lrfind_sent_{key}_{row['id']}"
    if st.button(f"Apply suggested LR ({format_sci(float(suggested))})",
                 key=f"lrfind_apply_{key}_{row['id']}", disabled=refusal is not None,
                 help=refusal):
        st.session_state[sent_key] = store.submit_command("set", knobs, source="dashboard")
    if refusal:
        st.caption(f"Cannot apply: {refusal}")
    command_id = st.session_state.get(sent_key)
    if command_id is not None:
        command = store.command(command_id)
        status = command.status if command else "unknown"
        detail = f": {command.error}" if command is not None and command.error else ""
        st.caption(f"Sent lr = {format_sci(knobs['lr'])} as command {command_id} "
                   f"({status}{detail})")


def _start(address: str, key: str) -> None:
    """Button callback (runs on the script thread before the re-run, so the re-run already
    sees the new ``running`` row and disables the button)."""
    try:
        st.session_state[f"lrfind_job_{key}"] = start_lr_find_job(address)
        st.session_state.pop(f"lrfind_error_{key}", None)
    except (LRJobError, OSError) as err:
        st.session_state[f"lrfind_error_{key}"] = f"Could not start the LR range test: {err}"


def render_lr_panel(store: RunStore) -> None:
    """The LR range test panel for one run (call it inside the page's ~1 s fragment)."""
    key = store.name
    st.markdown("**LR range test**")
    reason = readiness(store)
    st.button("Run LR range test", key=f"lrfind_start_{key}", disabled=reason is not None,
              on_click=_start, args=(store.address, key), help=reason or
              "Ramp the LR on a copy of the newest checkpoint in a separate process; the run "
              "keeps training")
    if st.session_state.get(f"lrfind_error_{key}"):
        st.error(st.session_state[f"lrfind_error_{key}"])
    elif reason:
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
        stream_chart(lr_find_figure(payload), key=f"lrfind_chart_{key}_{row['id']}",
                     revision=str(row["id"]))
        st.markdown(lr_find_summary(payload))
        current = store.summary().get("lr")
        if current is not None:
            st.caption(f"The run's LR now: {format_sci(float(current))}")
        _apply_block(store, row, key)
