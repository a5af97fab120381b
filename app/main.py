"""Panda's dashboard: one page to watch a run and turn its knobs.

Served by ``panda dashboard`` (``streamlit run app/main.py -- --runs-dir DIR``). It reads and
writes only through the run store; the live parts are ``st.fragment(run_every=…)`` blocks that
fetch only rows newer than the ones they already hold.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from app.charts import training_figure
from app.controls import command_outcome, knobs_panel, pending_knobs
from app.lr_panel import render_lr_panel
from trainer.export import build_export, render
from trainer.knobs import format_sci, log_ladder
from trainer.launch import launch_training, new_run_name
from trainer.optim import OPTIMIZERS
from trainer.runner import TrainConfig
from trainer.store import RUNNING_STATES, RunStore, StoreError, list_runs, sanitize_run_name
from trainer.tasks import TASK_NAMES

REFRESH_S = 1.0            # live parts re-render about once a second
RATE_WINDOW = 50           # steps/s is measured over the last this many steps
PATIENCE_HINT = 5          # epochs without a better val loss before the page suggests stopping


def runs_dir() -> Path:
    """``--runs-dir`` after ``--`` on the streamlit command line, else $PANDA_RUNS_DIR, else
    ./runs."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs-dir", default=os.environ.get("PANDA_RUNS_DIR", "runs"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.runs_dir)


# --- incremental data ------------------------------------------------------------------------

def _empty_cache() -> dict[str, Any]:
    return {"step": np.empty(0), "loss": np.empty(0), "lr": np.empty(0), "wall": np.empty(0),
            "last_step": -1, "val": {}, "last_val": 0, "events": [], "last_event": 0}


def fetch(store: RunStore) -> dict[str, Any]:
    """This session's copy of a run's curves, extended with rows newer than it holds."""
    caches = st.session_state.setdefault("curves", {})
    cache = caches.setdefault(str(store.run_dir), _empty_cache())
    new_events = store.events_since(cache["last_event"])
    if any(e["kind"] == "restart" for e in new_events):
        cache = caches[str(store.run_dir)] = _empty_cache()  # resumed: old rows were replaced
        new_events = store.events_since(0)
    rows = store.metrics_since(cache["last_step"], columns=("step", "wall", "loss", "lr"))
    if rows["step"]:
        for name in ("step", "wall", "loss", "lr"):
            cache[name] = np.concatenate([cache[name], np.asarray(rows[name], dtype=float)])
        cache["last_step"] = rows["step"][-1]
    for row in store.validation_since(cache["last_val"]):
        steps, values = cache["val"].setdefault(row["name"], ([], []))
        steps.append(row["step"])
        values.append(math.nan if row["value"] is None else row["value"])
        cache["last_val"] = row["id"]
    if new_events:
        cache["events"] = cache["events"] + new_events
        cache["last_event"] = new_events[-1]["id"]
    return cache


def steps_per_second(cache: dict[str, Any]) -> float | None:
    steps, wall = cache["step"][-RATE_WINDOW:], cache["wall"][-RATE_WINDOW:]
    if steps.size < 2 or wall[-1] <= wall[0]:
        return None
    return float((steps[-1] - steps[0]) / (wall[-1] - wall[0]))


def early_stop_hint(val: dict[str, tuple]) -> str | None:
    """A hint when validation loss has not improved for PATIENCE_HINT evaluations."""
    steps, values = val.get("loss", ([], []))
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if len(finite) <= PATIENCE_HINT:
        return None
    best = min(range(len(finite)), key=lambda i: finite[i][1])
    waited = len(finite) - 1 - best
    if waited < PATIENCE_HINT:
        return None
    return (f"Validation loss has not improved for {waited} evaluations (best "
            f"{finite[best][1]:.4g} at step {finite[best][0]}): consider stopping, or lowering "
            "the LR.")


# --- page parts --------------------------------------------------------------------------------

def status_row(summary: dict[str, Any], cache: dict[str, Any], meta: dict[str, Any]) -> None:
    rate = steps_per_second(cache) if summary["state"] == "running" else None
    elapsed = (meta.get("ended") or time.time()) - (meta.get("created") or time.time())
    schedule = (summary.get("schedule") or {}).get("shape", "constant")
    cells = [("state", summary["state"]), ("step", f"{summary['step']:,}"),
             ("epoch", str(summary["epoch"])),
             ("steps/s", "–" if rate is None else f"{rate:,.0f}"),
             ("elapsed", time.strftime("%H:%M:%S", time.gmtime(max(0.0, elapsed)))),
             ("lr", format_sci(summary["lr"]) if summary["lr"] is not None else "–"),
             ("momentum", "–" if summary["momentum"] is None else f"{summary['momentum']:.4g}"),
             ("weight decay", "–" if summary["weight_decay"] is None
              else format_sci(summary["weight_decay"])), ("decay", schedule)]
    # One wrapping line: nine st.metric cells do not fit beside the knobs at 1280 px.
    st.markdown("  ·  ".join(f"{label} **{value}**" for label, value in cells))


def _overlay_curves(root: Path, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    overlays = {}
    for name in names:
        try:
            with RunStore(root / name) as other:
                cache = fetch(other)
        except (StoreError, ValueError):
            continue
        overlays[name] = {"step": cache["step"], "loss": cache["loss"]}
    return overlays


@st.fragment(run_every=REFRESH_S)
def live_view(run_dir: str, compare: list[str]) -> None:
    """Status, curves, pending vs applied and the LR range test: re-rendered every second."""
    try:
        store = RunStore(run_dir)
    except StoreError as err:
        st.error(str(err))
        return
    with store:
        summary, meta = store.summary(), store.meta()
        cache = fetch(store)
        status_row(summary, cache, meta)
        hint = early_stop_hint(cache["val"])
        if hint:
            st.warning(hint)
        if summary["state"] == "diverged":
            st.error(f"Diverged: {(meta.get('diverged') or {}).get('cause', '')}. Roll back "
                     f"with `panda rollback {summary['run']}` or resume to continue.")
        smoothing = st.session_state.get("smoothing", 0.6)
        log_y = st.session_state.get("log_y", False)
        compare = [*compare, *([meta["parent"]["run"]] if meta.get("parent") else [])]
        figure = training_figure(cache, {k: tuple(v) for k, v in cache["val"].items()},
                                 cache["events"], smoothing=smoothing, log_y=log_y,
                                 overlays=_overlay_curves(Path(run_dir).parent, compare))
        st.plotly_chart(figure, key="curves", config={"displaylogo": False})
        command_outcome(store, summary["run"])
        supported = meta.get("supported_knobs") or ["lr"]
        pending = pending_knobs(summary["run"], supported)
        differs = [k for k in supported if pending.get(k) is not None and
                   summary.get(k) is not None and str(pending[k]) != str(summary[k])]
        if differs:
            st.caption("Pending (not applied yet): " + ", ".join(
                f"{k} {pending[k] if isinstance(pending[k], str) else format_sci(pending[k])}"
                for k in differs))
        with st.expander("LR range test", expanded=bool(store.results("lr_find"))):
            render_lr_panel(store, Path(run_dir))
        if cache["events"]:
            with st.expander(f"Interventions ({len(cache['events'])})"):
                st.dataframe([{"step": e["step"], "what": e["message"]} for e in
                              reversed(cache["events"])], hide_index=True, width="stretch")


def new_run_form(root: Path) -> None:
    with st.sidebar.expander("Start a new run"):
        task = st.selectbox("task", TASK_NAMES, key="new_task")
        optimizer = st.selectbox("optimizer", OPTIMIZERS, key="new_optimizer")
        lr = st.select_slider("learning rate", options=log_ladder(-5, 0), value=0.01,
                              format_func=format_sci, key="new_lr")
        momentum = st.select_slider("momentum β", options=[0.0, 0.5, 0.8, 0.9, 0.95, 0.99,
                                                           0.999], value=0.9, key="new_mom")
        epochs = st.number_input("epochs", min_value=1, max_value=100_000, value=50,
                                 key="new_epochs")
        delay = st.number_input("seconds per step (slow it down to watch)", min_value=0.0,
                                max_value=1.0, value=0.01, step=0.01, key="new_delay")
        name = st.text_input("run name", value=new_run_name(task), key="new_name")
        if st.button("Start training", key="new_start", width="stretch"):
            try:
                sanitize_run_name(name)
                if (root / name / "run.db").exists():
                    raise ValueError(f"run {name} already exists")
                cfg = TrainConfig(task=task, optimizer=optimizer, lr=lr, momentum=momentum,
                                  epochs=int(epochs), step_delay=float(delay)).validate()
                proc = launch_training(cfg, root / name)
            except ValueError as err:
                st.error(str(err))
            else:
                st.success(f"started {name} (pid {proc.pid})")
                st.session_state["run_picker"] = name


def export_block(store: RunStore) -> None:
    with st.expander("Export settings"):
        fmt = st.radio("format", ("json", "yaml", "python"), horizontal=True, key="export_fmt")
        if st.button("Prepare export", key="export_prepare"):
            st.session_state["export_text"] = (fmt, render(build_export(store), fmt))
        prepared = st.session_state.get("export_text")
        if prepared:
            suffix = {"json": "json", "yaml": "yaml", "python": "py"}[prepared[0]]
            st.download_button(f"Download {prepared[0]}", prepared[1],
                               file_name=f"{store.run_dir.name}-settings.{suffix}",
                               key="export_download")


def main() -> None:
    st.set_page_config(page_title="Panda", page_icon=":material/monitoring:", layout="wide")
    root = runs_dir()
    st.sidebar.title("Panda")
    st.sidebar.caption(f"runs in `{root}`")
    new_run_form(root)
    runs = [r for r in list_runs(root) if r.get("state") != "unreadable"]
    if not runs:
        st.info(f"No runs in {root} yet: start one from the sidebar, or run "
                "`panda train --task digits --run-dir runs/first`.")
        return
    names = [r["run"] for r in runs]
    if st.session_state.get("run_picker") not in names:
        live = [r["run"] for r in runs if r["state"] in RUNNING_STATES]
        st.session_state["run_picker"] = (live or names)[0]
    run = st.sidebar.selectbox("run", names, key="run_picker")
    compare = st.sidebar.multiselect("compare with", [n for n in names if n != run],
                                     key="compare")
    st.sidebar.slider("smoothing (EMA)", 0.0, 0.99, 0.6, 0.01, key="smoothing")
    st.sidebar.toggle("log-scale loss", key="log_y")
    try:
        store = RunStore(root / run)
    except StoreError as err:
        st.error(str(err))
        return
    with store:
        summary, meta = store.summary(), store.meta()
        st.subheader(f"{run}  ·  {meta.get('task') or 'custom model'}  ·  "
                     f"{meta.get('optimizer', '')}")
        chart, knobs = st.columns([3, 1], gap="medium")
        with chart:
            live_view(str(root / run), compare)
        with knobs:
            st.markdown("#### Knobs")
            knobs_panel(store, summary, meta)
            export_block(store)


if __name__ == "__main__":
    main()
