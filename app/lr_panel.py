"""Dashboard panel: an LR range test beside the live run, and applying its suggestion.

The panel only reads and writes the run store: the test runs in its own detached process
(:func:`trainer.lr_range.job.start_lr_find_job`) on a copy of the run's newest checkpoint, and every
render (the page's fragment re-runs about once a second) reads the newest ``lr_find`` row. The
suggested LR is applied as an ordinary ``set`` command (:mod:`app.actions`), validated where it
is entered and again where the trainer applies it, logged and drawn like any other
intervention. Starting a test and applying its suggestion check the access token first
(:mod:`app.actions`), and what became of them is the run's one message, beside the knobs.

A suggestion is not always one to trust with one click: an LR more than
:data:`CONFIRM_FACTOR` × the run's current one needs a second click that names the factor; a
flat curve, or one with no stability limit, is said so; a result measured long before the run's
current step is marked stale with its age (:func:`stale_age`), and re-running is one click.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import actions
from app.axes import linear_axis, log_axis
from app.stream_chart import figure_json, stream_chart
from trainer.knobs import format_sci, validate_knobs
from trainer.lr_range.job import (
    describe_result,
    flat_note,
    readiness,
    start_lr_find_job,
)
from trainer.lr_range.suggestions import KEEP_RULES
from trainer.ranges import KnobError
from trainer.store import FINAL_STATES, RunStore

RAW_OPACITY = 0.3            # raw per-step losses: faint behind the smoothed curve
BAND_COLOR = "rgba(44, 160, 44, 0.15)"
Y_PAD = 0.05                 # share of the loss span added above and below the curve
HEIGHT = 340                 # px
# What plotly's automargin settles on for this chart (Chromium, the page's font): starting
# there spares its first draw a second layout pass (see app.charts.MARGIN).
MARGIN = {"l": 46, "r": 18, "t": 44, "b": 46}
PLOT_PX = (560, 250)         # about the plot area's width and height in the page's chart column
X_LABEL_GAP_PX = 24          # log x axis: "10⁻⁵" labels are wider than they are tall
# Applying more than CONFIRM_FACTOR × the current LR takes a second click that names the factor
# (the knobs' own one-click step is ×2). A converged run's flat curve once suggested 83×.
CONFIRM_FACTOR = 2.0
# A result is stale once the run has trained STALE_STEPS steps past its checkpoint, and at least
# STALE_FRACTION more than it had then: a model changes fastest early on, so 1,000 steps matter
# at step 500 and not at step 50,000.
STALE_STEPS = 1000
STALE_FRACTION = 0.25


def stale_age(checkpoint_step: Any, run_step: Any) -> int | None:
    """Steps the run has trained since the checkpoint a result was measured from, when that
    makes the result stale (see :data:`STALE_STEPS`); None while it is fresh or unknown."""
    if checkpoint_step is None or run_step is None:
        return None
    age = int(run_step) - int(checkpoint_step)
    return age if age > max(STALE_STEPS, STALE_FRACTION * int(checkpoint_step)) else None


def lr_factor(suggested: float, current: Any) -> float | None:
    """``suggested`` / the run's current LR, or None when the current LR is unknown."""
    if current is None or not float(current) > 0:
        return None
    return float(suggested) / float(current)


def needs_confirmation(suggested: float, current: Any) -> bool:
    """Does applying ``suggested`` take a second click? Above CONFIRM_FACTOR × the current LR,
    or when the current LR is unknown (the factor cannot be shown)."""
    factor = lr_factor(suggested, current)
    return factor is None or factor > CONFIRM_FACTOR


def format_factor(factor: float) -> str:
    """83.0 -> "83×", 2.5 -> "2.5×", 0.25 -> "0.25×"."""
    return f"{factor:.2g}×" if factor < 10 else f"{factor:,.0f}×"


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


def _on_curve(lrs: list[float], values: list[float], lr: float) -> float | None:
    """The curve's value at ``lr``, interpolated in log LR between its finite points (a
    suggestion from probes need not be one of the ramp's LRs); None off the curve."""
    points = [(math.log(x), v) for x, v in zip(lrs, values) if math.isfinite(v)]
    if not points or not points[0][0] <= math.log(lr) <= points[-1][0]:
        return None
    xs, ys = zip(*points)
    return float(np.interp(math.log(lr), xs, ys))


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
        y = _on_curve(lrs, smoothed, suggested)
        y = (y0 + y1) / 2 if y is None else y
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
    fig.update_layout(height=HEIGHT, margin=MARGIN,
                      legend={"orientation": "h", "y": 1.12})
    return fig


def lr_find_summary(payload: dict[str, Any]) -> str:
    """The numbers of a finished test as short Markdown."""
    return "  \n".join(f"**{label}** {text}" for label, text in describe_result(payload))


def _apply_block(store: RunStore, row: dict[str, Any], key: str, current: Any,
                 allowed: bool) -> None:
    """Apply suggested LR, asking first for a big jump (see the module). ``allowed`` False (no
    access token) disables the buttons; the callbacks refuse anyway."""
    payload = row["payload"]
    suggested = payload.get("suggested_lr")
    if suggested is None:
        return
    if payload.get("suggestion_rule") in KEEP_RULES:
        # Applying it would set the LR the run had at its checkpoint, which its own schedule
        # may have left since: a factor on the schedule, where the answer is to leave it be.
        st.success(f"Keep the run's LR: the test showed no better LR than its "
                   f"{format_sci(suggested)} at the checkpoint.")
        return
    state = store.summary()["state"]
    refusal = None
    if state in (*FINAL_STATES, "interrupted"):
        refusal = f"the run is {state}: it takes no commands"
    try:
        knobs = validate_knobs({"lr": suggested})
    except (KnobError, TypeError, ValueError) as err:
        knobs, refusal = None, str(err)
    confirm_key = f"lrfind_confirm_{key}_{row['id']}"
    factor = lr_factor(suggested, current)
    ask = needs_confirmation(suggested, current)
    lr = knobs["lr"] if knobs else None
    st.button(f"Apply suggested LR ({format_sci(suggested)})",
              key=f"lrfind_apply_{key}_{row['id']}", disabled=refusal is not None or not allowed,
              help=refusal, on_click=_ask if ask else _send,
              args=(confirm_key,) if ask else (store.address, store.name, lr, confirm_key))
    if st.session_state.get(confirm_key) and refusal is None:
        times = (f"{format_factor(factor)} the current LR" if factor is not None
                 else "the current LR is unknown")
        st.warning(f"Apply {format_sci(suggested)} ({times})?")
        st.button("Yes, apply", key=f"lrfind_yes_{key}_{row['id']}", type="primary",
                  disabled=not allowed, on_click=_send,
                  args=(store.address, store.name, lr, confirm_key))
        st.button("Cancel", key=f"lrfind_no_{key}_{row['id']}", on_click=_cancel,
                  args=(confirm_key,))
    if refusal:
        st.caption(f"Cannot apply: {refusal}")


# Button callbacks run on the script thread before the re-run, so the re-run already shows
# the outcome (no confirmation left over, the sent command's status in the run's message).

def _ask(confirm_key: str) -> None:
    st.session_state[confirm_key] = True


def _cancel(confirm_key: str) -> None:
    st.session_state[confirm_key] = False


def _send(address: str, run: str, lr: float, confirm_key: str) -> None:
    st.session_state[confirm_key] = False
    actions.apply_suggested_lr(address, run, lr)


def _figure(row: dict[str, Any]) -> str:
    """The finished test's plot as the chart's JSON, built once per result (a refresh that
    finds the same result sends the same text)."""
    cache = st.session_state.setdefault("lrfind_figures", {})
    if row["id"] not in cache:
        cache.clear()  # one result is shown at a time
        cache[row["id"]] = figure_json(lr_find_figure(row["payload"]))
    return cache[row["id"]]


def _cautions(payload: dict[str, Any], run_step: Any) -> list[str]:
    """What to know before trusting this result: stale, flat curve, no limit."""
    notes = []
    age = stale_age(payload.get("checkpoint_step"), run_step)
    if age is not None:
        notes.append(f"Stale: measured from the checkpoint at step {payload['checkpoint_step']:,}"
                     f"; the run is at step {int(run_step):,} now, {age:,} steps later. "
                     "Re-run the test for a current answer.")
    flat = flat_note(payload)
    if flat:
        notes.append(f"Flat curve: {flat}")
    if payload.get("max_stable_lr") is None:
        notes.append("No stability limit was found, so nothing bounds the suggestion from "
                     "above.")
    return notes


def _start(address: str, run: str) -> None:
    """Run LR range test's callback (on the script thread before the re-run, so the re-run
    already sees the new ``running`` row and disables the button); the access token is
    checked in :mod:`app.actions`."""
    actions.start_range_test(address, run, start_lr_find_job)


def render_lr_panel(store: RunStore, row: dict[str, Any] | None, *,
                    allowed: bool = True) -> None:
    """The LR range test panel for one run (call it inside the page's ~1 s fragment); ``row``:
    its newest test (:func:`trainer.lr_range.job.latest_lr_find`, read once a refresh by the
    page). ``allowed`` False (no access token) disables its buttons (their callbacks refuse
    anyway)."""
    key = store.name
    st.markdown("**LR range test**")
    reason = readiness(store)
    summary = store.summary()
    stale = row is not None and row["status"] == "done" and stale_age(
        row["payload"].get("checkpoint_step"), summary.get("step")) is not None
    st.button("Re-run LR range test" if stale else "Run LR range test",
              key=f"lrfind_start_{key}", disabled=reason is not None or not allowed,
              on_click=_start, args=(store.address, store.name), help=reason or
              "Ramp the LR on a copy of the newest checkpoint in a separate process; the run "
              "keeps training")
    if reason:
        st.caption(reason)
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
        for note in _cautions(payload, summary.get("step")):
            st.warning(note)
        current = summary.get("lr")
        if current is not None:
            st.caption(f"The run's LR now: {format_sci(float(current))}")
        _apply_block(store, row, key, current, allowed)
