"""The knobs panel: log-scale sliders, pending vs applied, one Apply, pause / resume / stop.

Widgets hold *pending* values; the run store holds *applied* ones (the trainer's own report).
Apply validates the pending values (``trainer.knobs``, the same rules the trainer applies
again) and sends one ``set`` command with only the knobs that changed.
"""

from __future__ import annotations

import os
from typing import Any

import streamlit as st

from trainer.knobs import KnobError, format_sci, log_ladder, nearest_on_ladder, validate_knobs
from trainer.schedules import DEFAULT_RATES, SHAPES, validate_schedule
from trainer.store import FINAL_STATES, RunStore

LR_LADDER = log_ladder(-6, 1)                        # 1e-6 … 10, 1-1.5-2-3-5-7 per decade
ONE_MINUS_BETA = sorted(log_ladder(-3, 0), reverse=True)  # 1 … 1e-3, i.e. β 0 … 0.999
MOMENTUM_OPTIONS = [round(1.0 - v, 12) for v in ONE_MINUS_BETA]
WD_OPTIONS = [0.0, *log_ladder(-6, -1)]              # an explicit 0, then 1e-6 … 0.1
SHAPE_LABELS = {"constant": "constant", "exponential": "exponential  α0·r^epoch",
                "inverse_time": "inverse time  α0/(1+k·epoch)", "step": "step  ×γ every N",
                "cosine": "cosine to a floor"}
RATE_LABELS = {"exponential": "r per epoch", "inverse_time": "k", "step": "γ per drop",
               "cosine": "floor (fraction of base LR)"}


def _momentum_label(beta: float) -> str:
    return f"β {beta:.6g}  (1−β {format_sci(1.0 - beta)})"


def _key(run: str, name: str) -> str:
    return f"knob_{run}_{name}"


def _init_pending(run: str, applied: dict[str, Any]) -> None:
    """Seed the widgets with the applied values the first time a run is shown."""
    if st.session_state.get(_key(run, "seeded")):
        return
    st.session_state[_key(run, "lr")] = nearest_on_ladder(applied["lr"], LR_LADDER)
    if applied.get("momentum") is not None:
        st.session_state[_key(run, "momentum")] = min(
            MOMENTUM_OPTIONS, key=lambda b: abs((1 - b) - (1 - applied["momentum"])))
    if applied.get("weight_decay") is not None:
        wd = applied["weight_decay"]
        st.session_state[_key(run, "weight_decay")] = 0.0 if wd == 0 else nearest_on_ladder(
            wd, WD_OPTIONS[1:])
    st.session_state[_key(run, "seeded")] = True


def _scale_lr(run: str, factor: float) -> None:
    key = _key(run, "lr")
    target = st.session_state[key] * factor
    st.session_state[key] = nearest_on_ladder(target, LR_LADDER)
    st.session_state[_key(run, "exact")] = ""


def pending_knobs(run: str, supported: list[str]) -> dict[str, float]:
    """The values the widgets hold now; an exact LR typed in the text field wins."""
    state = st.session_state
    pending: dict[str, Any] = {"lr": state.get(_key(run, "lr"))}
    exact = (state.get(_key(run, "exact")) or "").strip()
    if exact:
        pending["lr"] = exact
    for name in ("momentum", "weight_decay"):
        if name in supported and _key(run, name) in state:
            pending[name] = state[_key(run, name)]
    return pending


def changed_knobs(pending: dict[str, Any], applied: dict[str, Any]) -> dict[str, float]:
    """Validate pending values and keep those that differ from the applied ones.

    Raises :class:`KnobError` for a bad value (nothing is sent then).
    """
    valid = validate_knobs(pending)
    return {k: v for k, v in valid.items() if applied.get(k) is None or
            abs(v - applied[k]) > 1e-12 * max(1.0, abs(applied[k]))}


def token_ok() -> bool:
    """With ``PANDA_TOKEN`` set, knobs stay locked until the page is given that token."""
    expected = os.environ.get("PANDA_TOKEN")
    if not expected:
        return True
    given = st.sidebar.text_input("Access token", type="password", key="panda_token",
                                  help="this dashboard was started with --token")
    if given and given != expected:
        st.sidebar.error("Wrong token: knobs stay locked.")
    return given == expected


def knobs_panel(store: RunStore, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """Sliders and buttons for one run. Writes commands only through ``store``."""
    run = summary["run"]
    applied = {k: summary[k] for k in ("lr", "momentum", "weight_decay")}
    if applied["lr"] is None:
        st.info("Waiting for the trainer to report its knobs…")
        return
    supported = meta.get("supported_knobs") or ["lr", "momentum", "weight_decay"]
    locked = summary["state"] in (*FINAL_STATES, "interrupted") or not token_ok()
    if summary["state"] in (*FINAL_STATES, "interrupted"):
        st.caption(f"Run is {summary['state']}: knobs are read-only.")
    _init_pending(run, applied)

    st.select_slider("Learning rate (log scale)", options=LR_LADDER, format_func=format_sci,
                     key=_key(run, "lr"), disabled=locked)
    half, double = st.columns(2)
    half.button("LR ×½", key=_key(run, "half"), on_click=_scale_lr, args=(run, 0.5),
                disabled=locked, width="stretch")
    double.button("LR ×2", key=_key(run, "double"), on_click=_scale_lr, args=(run, 2.0),
                  disabled=locked, width="stretch")
    st.text_input("Exact LR (overrides the slider)", key=_key(run, "exact"),
                  placeholder="e.g. 3.2e-4", disabled=locked)
    if "momentum" in supported:
        st.select_slider("Momentum β (log scale of 1−β)", options=MOMENTUM_OPTIONS,
                         format_func=_momentum_label, key=_key(run, "momentum"),
                         disabled=locked)
    if "weight_decay" in supported:
        st.select_slider("Weight decay", options=WD_OPTIONS, format_func=format_sci,
                         key=_key(run, "weight_decay"), disabled=locked)

    pending = pending_knobs(run, supported)
    _pending_table(pending, applied, supported)
    if st.button("Apply", type="primary", key=_key(run, "apply"), disabled=locked,
                 width="stretch"):
        try:
            changes = changed_knobs(pending, applied)
        except KnobError as err:
            st.error(f"Not sent: {err}")
        else:
            if changes:
                command_id = store.submit_command("set", changes, source="dashboard")
                st.session_state[_key(run, "last_command")] = command_id
            else:
                st.info("Nothing to apply: pending equals applied.")
    _decay_controls(store, run, meta, locked)
    _run_buttons(store, run, summary["state"], locked)


def _pending_table(pending: dict[str, Any], applied: dict[str, Any], supported: list[str]):
    lines = []
    for name in supported:
        value = pending.get(name)
        try:
            shown = format_sci(float(value)) if value is not None else "–"
        except ValueError:
            shown = f"`{str(value)[:12]}` (invalid)"
        now = format_sci(applied[name]) if applied.get(name) is not None else "–"
        lines.append(f"{name} **{now}**" if shown == now else
                     f"{name} **{now}** → **{shown}** (pending)")
    st.markdown("  \n".join(lines))


def _decay_controls(store: RunStore, run: str, meta: dict[str, Any], locked: bool) -> None:
    current = (meta.get("schedule") or {}).get("shape", "constant")
    with st.expander(f"LR decay: {current}"):
        shape = st.selectbox("shape", SHAPES, index=SHAPES.index(current),
                             format_func=SHAPE_LABELS.get, key=_key(run, "shape"),
                             disabled=locked)
        payload: dict[str, Any] = {"shape": shape}
        if shape != "constant":
            payload["rate"] = st.number_input(RATE_LABELS[shape], value=DEFAULT_RATES[shape],
                                              format="%.4g", key=_key(run, f"rate_{shape}"),
                                              disabled=locked)
        if shape == "step":
            payload["step_epochs"] = st.number_input("epochs between drops", value=10.0,
                                                     min_value=0.0, key=_key(run, "step_n"))
        if shape == "cosine":
            payload["total_epochs"] = st.number_input("epochs to the floor", value=100.0,
                                                      min_value=0.0, key=_key(run, "cos_t"))
        if st.button("Apply decay", key=_key(run, "apply_decay"), disabled=locked):
            try:
                schedule = validate_schedule(payload)
            except KnobError as err:
                st.error(f"Not sent: {err}")
            else:
                schedule.pop("origin_epoch")  # the trainer sets where the new shape starts
                command_id = store.submit_command("schedule", schedule, source="dashboard")
                st.session_state[_key(run, "last_command")] = command_id


def _run_buttons(store: RunStore, run: str, state: str, locked: bool) -> None:
    pause, resume, stop = st.columns(3)
    for column, kind, enabled in ((pause, "pause", state == "running"),
                                  (resume, "resume", state in ("paused", "diverged")),
                                  (stop, "stop", True)):
        if column.button(kind.capitalize(), key=_key(run, kind), disabled=locked or not enabled,
                         width="stretch"):
            command_id = store.submit_command(kind, {}, source="dashboard")
            st.session_state[_key(run, "last_command")] = command_id


def command_outcome(store: RunStore, run: str) -> None:
    """Show what became of the last command this page sent (live: called in the fragment)."""
    command_id = st.session_state.get(_key(run, "last_command"))
    if command_id is None:
        return
    command = store.command(command_id)
    if command is None:
        return
    if command.status == "applied":
        st.success(f"Command {command.id} ({command.kind}) applied at step "
                   f"{command.applied_step}.")
    elif command.status == "rejected":
        st.error(f"Command {command.id} refused by the trainer: {command.error}")
    else:
        st.info(f"Command {command.id} ({command.kind}) sent; waiting for the trainer…")
