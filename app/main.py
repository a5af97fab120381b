"""Panda's dashboard: one page to watch a run and turn its knobs.

Served by ``panda dashboard`` (``streamlit run app/main.py -- --runs-dir DIR``; with
``$PANDA_STORE`` set to a PostgreSQL URL it shows the runs in that database). It reads and
writes only through the run store, and names a run by its address
(:mod:`trainer.store.address`).

The run on show is one ``st.fragment(run_every=REFRESH_S)``: each refresh reads the run once
(:mod:`app.snapshot`, only the rows this session does not hold yet) and draws the header, the
chart, the knobs, the applied-vs-pending table, the message of the last action and the decay
panel from that one read, so they never disagree. A refresh that finds nothing new sends the
chart's previous text again instead of rebuilding it. Widgets keep what the user is typing
across refreshes; the page moves a knob's widget (by drawing a new one, see
:mod:`app.controls`) only when the applied value moved to another stop of its slider.
Everything that acts is a callback in :mod:`app.actions` (the access token is checked there).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import streamlit as st

from app import access, actions
from app.charts import training_figure
from app.controls import is_locked, key, knob_widgets, pending_table, run_buttons, show_outcome
from app.data import (
    chart_view,
    duration,
    early_stop_hint,
    elapsed_seconds,
    stall_note,
    steps_per_second,
    visible_range,
)
from app.folding import folding
from app.lr_panel import render_lr_panel
from app.panels import decay_controls, export_block, new_run_form, sample_panel
from app.runs_table import open_clicked_run, runs_table
from app.snapshot import Snapshot, take
from app.stream_chart import figure_json, stream_chart
from app.study import open_clicked_trial, study_section
from trainer.knobs import format_sci
from trainer.launch import resume_hint
from trainer.lr_range.job import latest_lr_find
from trainer.store import RUNNING_STATES, RunStore, StoreError
from trainer.store.address import (
    is_server_url,
    list_runs,
    open_store,
    root_of,
    run_address,
    shown,
    store_url,
)

REFRESH_S = 1.0            # the run on show re-reads its store about once a second
DEFAULT_SMOOTHING = 0.6    # TensorBoard's default EMA weight
RUNS_DIR_ENV = "PANDA_RUNS_DIR"
TOKEN_ENV = access.TOKEN_ENV
WINDOWS = {"all": None, "last 500": 500, "last 2,000": 2_000, "last 10,000": 10_000}
LR_PANEL, INTERVENTIONS_PANEL = "lr_panel_open", "interventions_open"  # app.folding keys
KEPT_SERVER_STORES = 4     # PostgreSQL runs a session keeps open (the run shown, recent others)
CHART_HEIGHT = 480        # px: loss and LR panels fit a 1280×800 window under the status row
# Compact metrics and narrower page margins, so nine status cells fit beside the sidebar at
# 1280 px. (No emoji anywhere: headless and minimal Linux browsers often lack the font.)
PAGE_CSS = """<style>
[data-testid="stMetricValue"] { font-size: 1.15rem; }
[data-testid="stMetricLabel"] p { font-size: 0.8rem; }
[data-testid="stMainBlockContainer"], .block-container {
    padding: 2.5rem 1.8rem 1rem 1.8rem; }
</style>"""


def runs_dir(argv: list[str] | None = None) -> Path:
    """``--runs-dir`` after ``--`` on the streamlit command line, else $PANDA_RUNS_DIR, else
    ./runs."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs-dir", default=os.environ.get(RUNS_DIR_ENV, "runs"))
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return Path(args.runs_dir)


@contextmanager
def _opened(address: str) -> Iterator[RunStore | None]:
    """The run's store for one render; None (the reason on the page) when it cannot be read.

    A SQLite file opens in well under a millisecond, so each render opens and closes it. A
    PostgreSQL run stays open for the session (one connection, shared by the session's
    re-runs, each a new thread): opening costs a new server connection (~20 ms here).
    """
    try:
        store = _session_store(address) if is_server_url(address) else open_store(address)
    except StoreError as err:
        st.error(str(err))
        yield None
        return
    try:
        yield store
    except store.errors as err:  # e.g. the database restarted: shown, retried next render
        st.error(f"The run store is unavailable: {err}")
    finally:
        if not is_server_url(address):
            store.close()


def _session_store(address: str) -> RunStore:
    stores = st.session_state.setdefault("server_stores", {})
    if address not in stores:
        while len(stores) >= KEPT_SERVER_STORES:  # the oldest run looked at goes first
            stores.pop(next(iter(stores))).close()
        stores[address] = open_store(address, per_thread=False)
    return stores[address]


def _fmt(value: float | None, fmt=format_sci) -> str:
    return "–" if value is None else fmt(value)


# --- the run on show ----------------------------------------------------------------------------

@st.fragment(run_every=REFRESH_S)
def run_view(address: str, compare: tuple[str, ...], allowed: bool) -> None:
    """The run on show, drawn from one snapshot per refresh."""
    with _opened(address) as store:
        if store is None:
            return
        said = actions.outcome(store.name)
        snap = take(store, st.session_state.setdefault("curves", {}),
                    command_id=said.command_id if said else None, compare=compare,
                    root=root_of(address))
        _header(snap, allowed)
        chart, side = st.columns([2.55, 1.45], gap="medium")
        # A part that draws more or fewer elements from one refresh to the next sits in a
        # container of its own (a fixed slot): in the browser an element is known by its place
        # among its siblings, and one whose place moved is drawn anew, closing an open
        # expander or menu below it.
        with side:  # first: the browser shows an action's outcome before the chart is built
            st.markdown("##### Knobs")
            with st.container():
                knob_widgets(address, snap.summary, snap.meta, allowed=allowed)
            with st.container():
                pending_table(snap.run, snap.summary, snap.meta)
            with st.container():
                show_outcome(snap.run, snap.command)
            decay_controls(address, snap.run, snap.summary.get("schedule"),
                           is_locked(snap.state) or not allowed)
        with chart:
            chart_settings()
            _training_chart(snap, store)
            with st.container():
                _interventions(snap)
            _lr_range_panel(snap, store, allowed)
            sample_panel(snap.samples)  # charlm's generated text, newest first


def _header(snap: Snapshot, allowed: bool) -> None:
    """Title with pause / resume / undo / stop; the status row; what the LR is made of."""
    meta = snap.meta
    title = f"{snap.run} · {meta.get('task') or 'custom model'} · {meta.get('optimizer', '')}"
    heading, buttons = st.columns([3, 2], vertical_alignment="center")
    heading.markdown(f"#### {title}")
    with buttons:
        run_buttons(snap.address, snap.run, snap.state, allowed=allowed)
    _status_row(snap)


def _status_row(snap: Snapshot) -> None:
    summary, meta, state = snap.summary, snap.meta, snap.state
    stalled = rate = None
    if state == "running":
        stalled = stall_note(snap.curves, time.time(), meta.get("trainer_started"))
        rate = 0.0 if stalled else steps_per_second(snap.curves)
    cells = [("state", state), ("step", f"{summary['step']:,}"),
             ("epoch", str(summary["epoch"])),
             ("steps/s", "–" if rate is None else f"{rate:,.1f}"),
             ("elapsed", duration(elapsed_seconds(meta, state, time.time()))),
             ("learning rate", _fmt(summary["lr"])),
             ("momentum β", _fmt(summary["momentum"], lambda v: f"{v:.4g}")),
             ("weight decay", _fmt(summary["weight_decay"])),
             ("decay", decay_shown(summary.get("schedule"), meta.get("lr_composition")))]
    for column, (label, value) in zip(st.columns(len(cells)), cells):
        column.metric(label, value)
    with st.container():  # a fixed slot for what comes and goes (see run_view)
        _notes(snap, stalled)


def _notes(snap: Snapshot, stalled: str | None) -> None:
    """Under the status row: why the run failed, or how to resume one whose trainer is gone;
    what the LR is made of, a trainer that stopped stepping, an early-stop hint, a
    divergence."""
    meta, state = snap.meta, snap.state
    if snap.summary.get("failure"):
        st.error(f"The run failed: {snap.summary['failure']}")
    if state == "interrupted":
        st.warning("The trainer stopped without closing the run: killed, out of memory, or its "
                   f"machine went down. Its steps up to {snap.summary['step']:,} are kept. "
                   f"{resume_hint(meta, snap.address)}")
    composition = lr_composition(meta.get("lr_composition"))
    if composition:
        st.caption(composition)
    if stalled:
        st.markdown(f":orange[{stalled}]")
    hint = early_stop_hint(snap.curves["val"])
    if hint:
        st.markdown(f":orange[{hint}]")
    if state == "diverged":
        st.error(f"Diverged: {(meta.get('diverged') or {}).get('cause', '')}. Press Undo "
                 f"(or `panda rollback {snap.run}`) to go back to the last good state "
                 "(before the latest change), then change the knobs and resume.")


def decay_shown(schedule: dict[str, Any] | None, described: dict[str, Any] | None) -> str:
    """The status row's decay: Panda's own decay shape, or "yours" when Panda adds none and the
    user's own schedule moves the LR (a warm-up, a scheduler; the LR is the user's × Panda's
    factor, see trainer.composition): "constant" would read as an LR that does not decay. The
    cell is narrow (nine in a row): the line under the row says "LR: your schedule × k"."""
    shape = (schedule or {}).get("shape", "constant")
    return "yours" if shape == "constant" and (described or {}).get("user_schedule") else shape


def lr_composition(described: dict[str, Any] | None) -> str | None:
    """"LR: your schedule × 0.25 → 1.6e-04 now" when Panda's factor is not 1 (see
    trainer.composition), else None."""
    if not described or described.get("lr") is None or described.get("user_lr") is None:
        return None
    factor = described.get("factor", 1.0)
    if math.isclose(factor, 1.0, rel_tol=1e-9):
        return None
    mine = "your schedule" if described.get("user_schedule") else \
        f"your {format_sci(described['user_lr'])}"
    return f"LR: {mine} × {factor:.3g} → {format_sci(described['lr'])} now"


def _steps_shown(last_step: int) -> tuple[float, float] | None:
    """The "Steps shown" window (None: all steps)."""
    window = WINDOWS.get(st.session_state.get("window", "all"))
    return None if window is None or last_step < 0 else (last_step - window, math.inf)


def _chart_text(snap: Snapshot, store: RunStore) -> str:
    """The training chart's JSON for this refresh: rebuilt only when its data, the chart
    settings or the zoom changed since the last refresh (kept per session)."""
    state = st.session_state
    settings = (state.get("smoothing", DEFAULT_SMOOTHING), state.get("log_y", False),
                state.get("window", "all"))
    # While zoomed (the chart's value, from its previous render), the zoomed steps are drawn
    # in full detail: the zoom is part of what the chart is drawn from.
    zoom, follow = visible_range(state.get("training_chart")), state.get("follow", False)
    wanted = (snap.chart_key(), settings, zoom, follow)
    kept = state.get("chart_text")
    if kept is not None and kept[0] == wanted:
        return kept[1]
    curves = snap.curves
    series, focus = chart_view(store, curves, zoom, follow=follow)
    figure = training_figure(series, curves["val"], curves["events"], smoothing=settings[0],
                             log_y=settings[1], overlays=snap.overlays,
                             steps_shown=_steps_shown(curves["last_step"]), focus=focus,
                             height=CHART_HEIGHT)
    text = figure_json(figure)
    state["chart_text"] = (wanted, text)
    return text


def chart_settings() -> None:
    """Smoothing, the steps shown, log-y and follow: one row above the chart."""
    smooth, window, toggles = st.columns([2.1, 1.3, 1.2], vertical_alignment="bottom")
    smooth.slider("Smoothing (EMA β)", 0.0, 0.99, DEFAULT_SMOOTHING, 0.01, key="smoothing")
    window.selectbox("Steps shown", tuple(WINDOWS), key="window")
    toggles.toggle("log-scale loss", key="log_y")
    toggles.toggle("follow latest", key="follow",
                   help="while zoomed in, slide the step axis so the newest step stays at the "
                        "right edge (the loss zoom stays)")


def _training_chart(snap: Snapshot, store: RunStore) -> None:
    """Loss, validation metrics, LR and intervention markers.

    Drag to zoom, double-click to go back: the chart component keeps the view while points
    arrive. A new run, window or loss scale is a new ``revision``: the zoom starts over.
    """
    state = st.session_state
    revision = f"{snap.address}|{state.get('window', 'all')}|{state.get('log_y', False)}"
    stream_chart(_chart_text(snap, store), key="training_chart", height=CHART_HEIGHT,
                 follow=state.get("follow", False), latest=float(snap.curves["last_step"]),
                 revision=revision)


def _lr_range_panel(snap: Snapshot, store: RunStore, allowed: bool) -> None:
    """The LR range test's panel. It opens by itself for a test this session has not shown
    yet (one started from a terminal with ``panda lr-find``, or finished since the page was
    opened), and the person may close it again."""
    state, panel = st.session_state, key(snap.run, LR_PANEL)
    newest, seen = latest_lr_find(store), key(snap.run, "lr_find_seen")  # one read a refresh
    if newest is not None and state.get(seen) != newest["id"]:
        state[seen], state[panel] = newest["id"], True
    with folding("LR range test", panel) as open_:
        if open_:
            render_lr_panel(store, newest, allowed=allowed)


def _interventions(snap: Snapshot) -> None:
    events = snap.curves["events"]
    if events:
        with folding(f"Interventions ({len(events)})", INTERVENTIONS_PANEL) as open_:
            if open_:
                st.dataframe([{"step": e["step"], "what": e["message"] or e["kind"]}
                              for e in reversed(events)], hide_index=True, width="stretch")


# --- page ---------------------------------------------------------------------------------------

def pick_run(runs: list[dict[str, Any]]) -> str:
    """Sidebar run picker, newest first; the newest live run is preselected."""
    names = [r["run"] for r in runs]
    states = {r["run"]: r["state"] for r in runs}
    if st.session_state.get("run_picker") not in names:
        live = [r["run"] for r in runs if r["state"] in RUNNING_STATES]
        st.session_state["run_picker"] = (live or names)[0]
    return st.sidebar.selectbox("Run", names, key="run_picker",
                                format_func=lambda n: f"{n} · {states.get(n, '')}")


def main() -> None:
    """The whole page."""
    st.set_page_config(page_title="Panda", page_icon="🐼", layout="wide")
    st.markdown(PAGE_CSS, unsafe_allow_html=True)
    local = runs_dir()
    try:  # $PANDA_STORE, set by `panda dashboard --store`
        url = store_url()
    except ValueError as err:
        st.error(str(err))
        return
    root = url or str(local)
    st.sidebar.title("Panda")
    st.sidebar.caption("babysit one training run")
    allowed = access.gate()  # first: whatever acts below is drawn locked or not
    new_run_form(local, url, allowed=allowed)  # before the picker: a new run is selected there
    try:
        runs = [r for r in list_runs(root) if r.get("state") != "unreadable"]
    except StoreError as err:
        st.error(str(err))
        return
    if not runs:
        st.info(f"No runs in `{shown(root)}` yet: start one from the sidebar, or run "
                "`panda train --task digits --run-dir runs/first`.")
        return
    open_clicked_run()    # a run clicked in the runs table (app/runs_table.py)
    open_clicked_trial()  # a trial clicked in a study's table (app/study.py)
    run = pick_run(runs)
    compare = st.sidebar.multiselect("Compare with", [r["run"] for r in runs if r["run"] != run],
                                     key="compare",
                                     help="draw their loss, validation loss and LR beside this "
                                          "run's (dotted)")
    st.sidebar.caption(f"runs in `{shown(root)}`")
    address = run_address(root, run)
    run_view(address, tuple(compare), allowed)
    # Below the run on show, so that its chart keeps the top of a 1280×800 window.
    runs_table(root)
    with _opened(address) as store:
        if store is not None:
            with st.sidebar:
                export_block(store)
            study_section(root, store.meta())  # a trial of a search: its study (app/study.py)


if __name__ == "__main__":
    main()
