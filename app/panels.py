"""The less frequent panels: LR decay, starting a run, exporting settings, generated text.

What acts (Apply decay, Start training) runs as a callback that checks the access token first
(:mod:`app.access`, :mod:`app.actions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from app import access, actions
from app.controls import key
from app.folding import folding
from trainer.config import OPTIMIZERS, TASKS, TrainConfig, config_values
from trainer.export import ExportError, build_export, render
from trainer.knobs import format_sci, log_ladder
from trainer.launch import launch_training, new_run_name
from trainer.ranges import KnobError
from trainer.schedules import DEFAULT_RATES, SHAPES, validate_schedule
from trainer.store import RunStore, sanitize_run_name
from trainer.store.address import run_exists, shown

SHAPE_LABELS = {"constant": "constant", "exponential": "exponential  α0·r^epoch",
                "inverse_time": "inverse time  α0/(1+k·epoch)", "step": "step  ×γ every N epochs",
                "cosine": "cosine to a floor"}
RATE_LABELS = {"exponential": "r per epoch", "inverse_time": "k", "step": "γ per drop",
               "cosine": "floor (fraction of the base LR)"}
NEW_RUN_LR_LADDER = log_ladder(-5, 0)
NEW_RUN_BETAS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
NEW_RUN_WD = (0.0, 1e-5, 1e-4, 5e-4, 1e-3, 1e-2, 1e-1)  # 0.1: AdamW's usual (charlm)
DEFAULT_EPOCHS = 50
DEFAULT_STEP_EPOCHS = 10.0
DEFAULT_COSINE_EPOCHS = 100.0
DEFAULT_STEP_DELAY = 0.01  # seconds per step: slow enough to watch the curves move
EXPORT_SUFFIX = {"json": "json", "yaml": "yaml", "python": "py"}
KEEP = "page"  # persist_state: a form's entries outlive its panel closing (see app.folding)
# Keys of the panels' open state (app.folding); the decay panel's is per run: key(run, DECAY_PANEL).
NEW_RUN_PANEL, EXPORT_PANEL, SAMPLES_PANEL, DECAY_PANEL = (
    "new_run_open", "export_open", "samples_open", "decay_open")


def decay_controls(address: str, run: str, schedule: dict[str, Any] | None,
                   locked: bool) -> None:
    """LR decay shape and its rate, sent as one ``schedule`` command. The expander's label is
    the shape in force (``schedule``: the run's, from the page's snapshot)."""
    current = (schedule or {}).get("shape", "constant")
    shown_first = key(run, "shape_shown_first")
    with folding(f"LR decay: {SHAPE_LABELS.get(current, current)}", key(run, DECAY_PANEL)) \
            as open_:
        if not open_:
            return
        # The selectbox starts at the shape in force whenever it is drawn anew (the panel
        # opened, another run shown and back), and keeps the user's choice while drawn (its
        # value is never written from here: see app.controls on why).
        start = current if current in SHAPES else SHAPES[0]
        if key(run, "shape") not in st.session_state:
            st.session_state[shown_first] = start
        first = st.session_state.setdefault(shown_first, start)
        shape = st.selectbox("shape", SHAPES, format_func=SHAPE_LABELS.get,
                             index=SHAPES.index(first), key=key(run, "shape"), disabled=locked)
        if shape != "constant":
            st.number_input(RATE_LABELS[shape], value=DEFAULT_RATES[shape], format="%.4g",
                            key=key(run, f"rate_{shape}"), disabled=locked)
        if shape == "step":
            st.number_input("epochs between drops", value=DEFAULT_STEP_EPOCHS,
                            key=key(run, "step_n"), disabled=locked)
        if shape == "cosine":
            st.number_input("epochs to the floor", value=DEFAULT_COSINE_EPOCHS,
                            key=key(run, "cos_t"), disabled=locked)
        st.button("Apply decay", key=key(run, "apply_decay"), disabled=locked,
                  on_click=_apply_decay, args=(address, run))


def _apply_decay(address: str, run: str) -> None:
    """Apply decay's callback: validate the shape and its numbers, send one command."""
    state = st.session_state
    shape = state.get(key(run, "shape"), "constant")
    payload: dict[str, Any] = {"shape": shape}
    if shape != "constant":
        payload["rate"] = state.get(key(run, f"rate_{shape}"), DEFAULT_RATES[shape])
    if shape == "step":
        payload["step_epochs"] = state.get(key(run, "step_n"), DEFAULT_STEP_EPOCHS)
    if shape == "cosine":
        payload["total_epochs"] = state.get(key(run, "cos_t"), DEFAULT_COSINE_EPOCHS)
    if not actions.permitted(run):
        return
    try:
        schedule = validate_schedule(payload)
    except KnobError as err:
        actions.say(run, "error", f"Not sent: {err}")
        return
    schedule.pop("origin_epoch")  # the trainer rebases the shape at the current epoch
    actions.send(address, run, "schedule", schedule, f"decay {shape}")


def _start_run(runs_dir: Path, store: str | None) -> None:
    """Start training's callback: validate the form and launch the run in its own process (it
    outlives the page).

    Its checkpoints go under ``runs_dir``; its metrics there too, or to PostgreSQL ``store``.
    """
    state = st.session_state
    if not access.granted():
        state["new_run_message"] = ("error", access.REFUSAL)
        return
    task = state["new_task"]
    values = {"task": task, "optimizer": state["new_optimizer"], "lr": state["new_lr"],
              "momentum": state["new_momentum"], "weight_decay": state["new_wd"],
              "epochs": int(state["new_epochs"]), "step_delay": float(state["new_delay"])}
    name = (state.get("new_name") or "").strip() or new_run_name(task)
    root = store or runs_dir
    try:
        sanitize_run_name(name)
        if run_exists(root, name):
            raise ValueError(f"a run named {name!r} already exists in {shown(root)}")
        cfg = TrainConfig(**config_values(values.pop("task"), **values)).validate()
        proc = launch_training(cfg, runs_dir / name, store=store)
    except (ValueError, OSError) as err:
        state["new_run_message"] = ("error", str(err))
        return
    state["new_run_message"] = ("success", f"Started {name} (pid {proc.pid}).")
    state["run_picker"] = name  # show the new run


def _task_knobs_to_form() -> None:
    """A newly chosen task puts its own defaults (config.TASK_DEFAULTS) into the form's
    optimizer and knobs; its schedule and batch size are added when the run starts."""
    state = st.session_state
    values = TrainConfig(**config_values(state["new_task"]))
    state["new_optimizer"], state["new_lr"] = values.optimizer, values.lr
    state["new_momentum"], state["new_wd"] = values.momentum, values.weight_decay


def new_run_form(runs_dir: Path, store: str | None = None, *, allowed: bool = True) -> None:
    """Sidebar form: task, optimizer, starting knobs, epochs and a name. ``allowed`` False (no
    access token) disables Start training (and its callback refuses anyway)."""
    with folding("Start a new run", NEW_RUN_PANEL, where=st.sidebar) as open_:
        if not open_:
            return
        # Outside the form, so that choosing a task can fill in its defaults at once.
        task = st.selectbox("task", TASKS.options, key="new_task", persist_state=KEEP,
                            on_change=_task_knobs_to_form)
        _new_run_fields(runs_dir, store, task, allowed)


def _new_run_fields(runs_dir: Path, store: str | None, task: str, allowed: bool) -> None:
    if "new_optimizer" not in st.session_state:  # first render: the first task's defaults
        _task_knobs_to_form()
    with st.form("new_run", border=False):
        st.selectbox("optimizer", OPTIMIZERS.options, key="new_optimizer", persist_state=KEEP)
        st.select_slider("learning rate", options=NEW_RUN_LR_LADDER, format_func=format_sci,
                         key="new_lr", persist_state=KEEP)
        st.select_slider("momentum β", options=NEW_RUN_BETAS, key="new_momentum",
                         persist_state=KEEP)
        st.select_slider("weight decay", options=NEW_RUN_WD, format_func=format_sci,
                         key="new_wd", persist_state=KEEP)
        st.number_input("epochs", min_value=1, max_value=100_000, value=DEFAULT_EPOCHS,
                        key="new_epochs", persist_state=KEEP)
        st.number_input("seconds per step (slows it down to watch)", min_value=0.0,
                        max_value=1.0, value=DEFAULT_STEP_DELAY, step=0.01, key="new_delay",
                        persist_state=KEEP)
        st.text_input("run name", placeholder=f"{task}-YYYYMMDD-HHMMSS", key="new_name",
                      persist_state=KEEP)
        st.form_submit_button("Start training", width="stretch", disabled=not allowed,
                              on_click=_start_run, args=(runs_dir, store))
        message = st.session_state.get("new_run_message")
        if message:
            (st.error if message[0] == "error" else st.success)(message[1])


def export_block(store: RunStore) -> None:
    """Download exactly what was chosen (config + knob timeline) to reproduce the run.

    Built on request: an export reads every metric row, too slow for every page refresh.
    """
    with folding("Export settings", EXPORT_PANEL) as open_:
        if not open_:
            return
        fmt = st.radio("format", tuple(EXPORT_SUFFIX), horizontal=True, key="export_fmt",
                       persist_state=KEEP)
        if st.button("Prepare export", key="export_prepare", width="stretch"):
            try:
                st.session_state["export_text"] = (store.name, fmt,
                                                   render(build_export(store), fmt))
            except ExportError as err:
                st.session_state["export_text"] = None
                st.error(f"Cannot export this run: {err}")
        prepared = st.session_state.get("export_text")
        if prepared and prepared[0] == store.name:
            run, chosen, text = prepared
            st.download_button(f"Download {chosen}", text,
                               file_name=f"{run}-settings.{EXPORT_SUFFIX[chosen]}",
                               key="export_download", width="stretch")


def newest_samples(store: RunStore) -> list[dict[str, Any]]:
    """The generated text of the newest validation (results kind ``sample``, which the trainer
    stores for tasks that sample, charlm); [] for other runs."""
    samples = store.results("sample")
    if not samples:
        return []
    step = samples[-1]["payload"].get("step")
    return [row["payload"] for row in samples if row["payload"].get("step") == step]


def sample_panel(newest: list[dict[str, Any]]) -> None:
    """The newest generated text (:func:`newest_samples`) in an expander; nothing when there
    is none."""
    if not newest:
        return
    step = newest[0].get("step")
    with folding(f"Generated text at step {step:,}" if isinstance(step, int) else
                 "Generated text", SAMPLES_PANEL) as open_:
        for payload in newest if open_ else ():
            st.code(str(payload.get("text", "")), language="python", wrap_lines=True)
