"""Panda's dashboard: one page to watch a run and turn its knobs.

Served by ``panda dashboard`` (``streamlit run app/main.py -- --runs-dir DIR``; with
``$PANDA_STORE`` set to a PostgreSQL URL it shows the runs in that database). It reads and
writes only through the run store, and names a run by its address
(:mod:`trainer.store.address`). The live parts are ``st.fragment(run_every=…)`` blocks that
fetch only rows newer than the ones this session already holds (:mod:`app.data`); the knob
widgets live in a fragment without a timer, so a refresh never resets what the user is typing.
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

from app.charts import training_figure
from app.controls import (
    KNOB_ORDER,
    command_outcome,
    is_locked,
    knob_widgets,
    pending_table,
    run_buttons,
    supported_knobs,
    widgets_behind,
)
from app.data import chart_view, early_stop_hint, fetch, steps_per_second, visible_range
from app.lr_panel import render_lr_panel
from app.panels import decay_controls, export_block, new_run_form, sample_panel
from app.stream_chart import stream_chart
from app.study import open_clicked_trial, study_section
from trainer.knobs import format_sci
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

REFRESH_S = 1.0            # live parts re-render about once a second
DEFAULT_SMOOTHING = 0.6    # TensorBoard's default EMA weight
RUNS_DIR_ENV = "PANDA_RUNS_DIR"
TOKEN_ENV = "PANDA_TOKEN"
WINDOWS = {"all": None, "last 500": 500, "last 2,000": 2_000, "last 10,000": 10_000}
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


def _curves(store: RunStore) -> dict[str, Any]:
    return fetch(store, st.session_state.setdefault("curves", {}))


def _fmt(value: float | None, fmt=format_sci) -> str:
    return "–" if value is None else fmt(value)


# --- live fragments ---------------------------------------------------------------------------

@st.fragment(run_every=REFRESH_S)
def live_status(address: str, title: str, allowed: bool) -> None:
    """Title with pause / resume / stop; state, step, epoch, speed, elapsed time and the
    knobs in force."""
    with _opened(address) as store:
        if store is None:
            return
        summary, meta = store.summary(), store.meta()
        cache = _curves(store)
        heading, buttons = st.columns([3, 2], vertical_alignment="center")
        heading.markdown(f"#### {title}")
        with buttons:
            run_buttons(store, summary["run"], summary["state"], allowed=allowed)
        _status_row(address, summary, meta, cache)


def _status_row(address: str, summary: dict[str, Any], meta: dict[str, Any],
                cache: dict[str, Any]) -> None:
    state = summary["state"]
    seen = st.session_state.setdefault("seen_state", {})
    if address in seen and is_locked(seen[address]) != is_locked(state):
        seen[address] = state
        st.rerun(scope="app")  # the knob widgets (outside this fragment) lock or unlock
    seen[address] = state
    rate = steps_per_second(cache) if state == "running" else None
    elapsed = (meta.get("ended") or time.time()) - (meta.get("created") or time.time())
    cells = [("state", state), ("step", f"{summary['step']:,}"),
             ("epoch", str(summary["epoch"])),
             ("steps/s", "–" if rate is None else f"{rate:,.1f}"),
             ("elapsed", time.strftime("%H:%M:%S", time.gmtime(max(0.0, elapsed)))),
             ("learning rate", _fmt(summary["lr"])),
             ("momentum β", _fmt(summary["momentum"], lambda v: f"{v:.4g}")),
             ("weight decay", _fmt(summary["weight_decay"])),
             ("decay", (summary.get("schedule") or {}).get("shape", "constant"))]
    for column, (label, value) in zip(st.columns(len(cells)), cells):
        column.metric(label, value)
    composition = lr_composition(meta.get("lr_composition"))
    if composition:
        st.caption(composition)
    hint = early_stop_hint(cache["val"])
    if hint:
        st.markdown(f":orange[{hint}]")
    if state == "diverged":
        st.error(f"Diverged: {(meta.get('diverged') or {}).get('cause', '')}. Press Undo "
                 f"(or `panda rollback {summary['run']}`) to go back to the last good state "
                 "(before the latest change), then change the knobs and resume.")


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


def _overlays(root: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Other runs' loss curves to draw beside this one (compare / branch parent)."""
    overlays = {}
    for name in names:
        try:
            with open_store(run_address(root, name)) as other:
                cache = _curves(other)
        except (StoreError, ValueError):
            continue
        overlays[name] = {k: cache[k] for k in ("step", "loss", "mean_step", "mean")}
    return overlays


def _steps_shown(last_step: int) -> tuple[float, float] | None:
    """The "Steps shown" window (None: all steps)."""
    window = WINDOWS.get(st.session_state.get("window", "all"))
    return None if window is None or last_step < 0 else (last_step - window, math.inf)


def _figure(address: str, store: RunStore, compare: list[str]):
    """The chart for this refresh (the component keeps the user's zoom across refreshes)."""
    state = st.session_state
    meta = store.meta()
    cache = _curves(store)
    parent = meta.get("parent") or {}
    names = [*compare, *([parent["run"]] if parent.get("run") else [])]
    # While zoomed (the chart's value, from its previous render), the zoomed steps in detail.
    series, focus = chart_view(store, cache, visible_range(state.get("training_chart")),
                               follow=state.get("follow", False))
    return training_figure(series, cache["val"], cache["events"],
                           smoothing=state.get("smoothing", DEFAULT_SMOOTHING),
                           log_y=state.get("log_y", False),
                           overlays=_overlays(root_of(address), names),
                           steps_shown=_steps_shown(cache["last_step"]), focus=focus,
                           height=CHART_HEIGHT)


def chart_settings() -> None:
    """Smoothing, the steps shown, log-y and follow: one row above the chart."""
    smooth, window, toggles = st.columns([2.1, 1.3, 1.2], vertical_alignment="bottom")
    smooth.slider("Smoothing (EMA β)", 0.0, 0.99, DEFAULT_SMOOTHING, 0.01, key="smoothing")
    window.selectbox("Steps shown", tuple(WINDOWS), key="window")
    toggles.toggle("log-scale loss", key="log_y")
    toggles.toggle("follow latest", key="follow",
                   help="while zoomed in, slide the step axis so the newest step stays at the "
                        "right edge (the loss zoom stays)")


@st.fragment(run_every=REFRESH_S)
def live_chart(address: str, compare: list[str]) -> None:
    """Loss, validation metrics, LR and intervention markers; the LR range test below.

    Drag to zoom, double-click to go back: the chart component keeps the view while points
    arrive. A new run, window or loss scale is a new ``revision``: the zoom starts over.
    """
    with _opened(address) as store:
        if store is None:
            return
        state = st.session_state
        revision = f"{address}|{state.get('window', 'all')}|{state.get('log_y', False)}"
        stream_chart(_figure(address, store, compare), key="training_chart",
                     height=CHART_HEIGHT, follow=state.get("follow", False),
                     latest=float(_curves(store)["last_step"]), revision=revision)
        events = _curves(store)["events"]
        if events:
            with st.expander(f"Interventions ({len(events)})"):
                st.dataframe([{"step": e["step"], "what": e["message"] or e["kind"]}
                              for e in reversed(events)], hide_index=True, width="stretch")
        with st.expander("LR range test", expanded=bool(store.results("lr_find"))):
            render_lr_panel(store)
        sample_panel(store)  # charlm's generated text, newest first


@st.fragment(run_every=REFRESH_S)
def live_knob_state(address: str, allowed: bool) -> None:
    """Applied vs pending, the last command's outcome, and pause / resume / stop."""
    with _opened(address) as store:
        if store is None:
            return
        summary, meta = store.summary(), store.meta()
        applied = {k: summary.get(k) for k in KNOB_ORDER}
        if widgets_behind(summary["run"], applied, supported_knobs(meta, applied)):
            st.rerun(scope="app")  # move untouched sliders to the newly applied values
        pending_table(summary["run"], summary, meta)
        command_outcome(store, summary["run"])


@st.fragment
def knobs(address: str, allowed: bool) -> None:
    """The knob widgets: interacting re-runs only this fragment, never on a timer."""
    with _opened(address) as store:
        if store is None:
            return
        summary, meta = store.summary(), store.meta()
        knob_widgets(store, summary, meta, allowed=allowed)


@st.fragment
def decay(address: str, allowed: bool) -> None:
    """The LR decay shape (its own fragment: below the live applied-vs-pending table)."""
    with _opened(address) as store:
        if store is None:
            return
        summary, meta = store.summary(), store.meta()
        decay_controls(store, summary["run"], meta, is_locked(summary["state"]) or not allowed)


# --- page ---------------------------------------------------------------------------------------

def token_ok() -> bool:
    """With ``PANDA_TOKEN`` set (``panda dashboard --token``), knobs stay locked until the page
    is given that token."""
    expected = os.environ.get(TOKEN_ENV)
    if not expected:
        return True
    given = st.sidebar.text_input("Access token", type="password", key="panda_token",
                                  help="this dashboard was started with --token")
    if given and given != expected:
        st.sidebar.error("Wrong token: knobs stay locked.")
    return given == expected


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
    new_run_form(local, url)  # first: starting a run selects it in the picker below
    try:
        runs = [r for r in list_runs(root) if r.get("state") != "unreadable"]
    except StoreError as err:
        st.error(str(err))
        return
    if not runs:
        st.info(f"No runs in `{shown(root)}` yet: start one from the sidebar, or run "
                "`panda train --task digits --run-dir runs/first`.")
        return
    open_clicked_trial()  # a trial clicked in a study's table (app/study.py)
    run = pick_run(runs)
    compare = st.sidebar.multiselect("Compare with", [r["run"] for r in runs if r["run"] != run],
                                     key="compare")
    allowed = token_ok()
    st.sidebar.caption(f"runs in `{shown(root)}`")
    address = run_address(root, run)
    with _opened(address) as store:
        if store is None:
            return
        meta = store.meta()
        title = f"{run} · {meta.get('task') or 'custom model'} · {meta.get('optimizer', '')}"
        live_status(address, title, allowed)
        chart, side = st.columns([2.55, 1.45], gap="medium")
        with chart:
            chart_settings()
            live_chart(address, compare)
        with side:
            st.markdown("##### Knobs")
            knobs(address, allowed)
            live_knob_state(address, allowed)
            decay(address, allowed)
        with st.sidebar:
            export_block(store)
        study_section(root, meta)  # a trial of a search: its study below (app/study.py)


if __name__ == "__main__":
    main()
