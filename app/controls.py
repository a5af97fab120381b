"""The knobs panel: log-scale sliders, pending vs applied, one Apply, pause / resume / stop.

Widgets hold *pending* values; the run store holds *applied* ones (the trainer's own report).
A widget the user has not moved since it was seeded follows the applied value (an LR decay or
a change from the CLI moves it), so only knobs the user actually turned count as pending.
Apply validates the pending values (``trainer.knobs``; the trainer validates them again) and
sends one ``set`` command with only the knobs that changed (:mod:`app.actions`: the access token
is checked there, and the outcome becomes the run's one message).

The page never writes a widget's value through session state. It refreshes every second, and
each refresh request carries the browser's widget values: one sent before the browser had
taken a value the server set would put the old value back, and fire the widget's on_change as
if the user had moved it. Instead, a widget the page moves is a new widget: its key gets the
next *generation* number and its ``value=`` is the new value (:func:`_seed`, :func:`_set_exact`);
the old widget, and anything the browser still says about it, is gone. A browser that has not
drawn the new widget yet still reports the old one (a click right after ×½), and Streamlit
takes that for a change and calls the old widget's on_change: each callback is given its
widget's generation and does nothing for one that is no longer shown.

A click on Apply right after ×½ (or ×2) may reach the server before the ×½ rerun has started;
Streamlit then merges the two requests into one rerun and calls Apply's callback first (the
older trigger is appended after the newer request's widgets). Apply would send the value from
before ×½, and ×½ would then halve the field after the fact. So when both are in one rerun,
Apply does the scaling first whichever callback comes first, and it is done once: the first of
the two callbacks leaves a mark that the second consumes in the same pass (:data:`SCALES`).
"""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from app import actions
from trainer.knobs import format_sci, log_ladder, nearest_on_ladder, validate_knobs
from trainer.ranges import KnobError
from trainer.store import Command
from trainer.store.address import open_store

LR_LADDER = log_ladder(-6, 1)                              # 1e-6 … 10
ONE_MINUS_BETA = sorted(log_ladder(-3, 0), reverse=True)   # 1 … 1e-3, i.e. β 0 … 0.999
MOMENTUM_OPTIONS = [round(1.0 - v, 12) for v in ONE_MINUS_BETA]
WD_OPTIONS = [0.0, *log_ladder(-6, 0)]                     # an explicit 0, then 1e-6 … 1
KNOB_ORDER = ("lr", "momentum", "weight_decay")            # the literature's priority
LOCKED_STATES = actions.LOCKED_STATES
SAME_REL_TOL = 1e-9        # pending within this relative distance of applied is "no change"
KNOB_LABELS = {"lr": "learning rate", "momentum": "momentum β", "weight_decay": "weight decay"}
TABLE_LABELS = {"lr": "LR", "momentum": "momentum β", "weight_decay": "weight decay"}
SCALES = {"half": 0.5, "double": 2.0}  # the LR buttons: ×½, ×2 (their keys' names)


def key(run: str, name: str) -> str:
    """Session-state key of one run's value (knobs are remembered per run); of its widget
    too, for buttons and until the page first moves the widget (see :func:`widget_key`)."""
    return f"knob:{run}:{name}"


def _generation(run: str, name: str) -> int:
    return st.session_state.get(key(run, f"gen_{name}"), 1)


def widget_key(run: str, name: str) -> str:
    """The key of the widget now showing ``name`` (``key(run, name)``, then ``…#2``, ``…#3``
    each time the page moved it)."""
    generation = _generation(run, name)
    return key(run, name) if generation == 1 else f"{key(run, name)}#{generation}"


def _renew(run: str, name: str) -> None:
    """Replace the widget showing ``name`` by a new one (drawn with its new ``value=``)."""
    state = st.session_state
    state[key(run, f"gen_{name}")] = state.get(key(run, f"gen_{name}"), 1) + 1


def widget_value(run: str, name: str) -> Any:
    """What the widget showing ``name`` holds: the user's value, else the one it was drawn
    with."""
    state = st.session_state
    default = state.get(key(run, "exact_text"), "") if name == "exact" else \
        state.get(key(run, f"seed_{name}"))
    return state.get(widget_key(run, name), default)


def _set_exact(run: str, text: str) -> None:
    """Put ``text`` in the exact-LR field (a new field, see the module's docstring)."""
    st.session_state[key(run, "exact_text")] = text
    _renew(run, "exact")


def is_locked(state: str) -> bool:
    """Whether a run in ``state`` can take no commands (knobs shown read-only)."""
    return state in LOCKED_STATES


def supported_knobs(meta: dict[str, Any], applied: dict[str, Any]) -> list[str]:
    """The knobs the run's optimizer has (meta ``supported_knobs``; else those it reports)."""
    names = meta.get("supported_knobs") or [k for k in KNOB_ORDER if applied.get(k) is not None]
    return [k for k in KNOB_ORDER if k in names]


def format_beta(beta: float) -> str:
    """Momentum slider label: β, with the 1−β the slider is spaced by."""
    return f"β {beta:.6g} (1−β {format_sci(round(1.0 - beta, 12))})"


def _on_widget_scale(name: str, value: float) -> float:
    """The option of ``name``'s slider nearest to ``value`` (log scale)."""
    if name == "lr":
        return nearest_on_ladder(value, LR_LADDER)
    if name == "momentum":
        return round(1.0 - nearest_on_ladder(1.0 - value, ONE_MINUS_BETA), 12)
    return 0.0 if value == 0 else nearest_on_ladder(value, WD_OPTIONS[1:])


def _seed(run: str, name: str, value: float, basis: float | None = None) -> None:
    """Show ``value`` on the knob's slider as its untouched state (a new slider). ``basis`` is
    the applied value it was seeded for (``value`` itself unless a change is in flight)."""
    state = st.session_state
    shown_before = key(run, f"seed_{name}") in state
    state[key(run, f"seed_{name}")] = _on_widget_scale(name, value)
    state[key(run, f"basis_{name}")] = value if basis is None else basis
    if shown_before:
        _renew(run, name)


def _touched(run: str, name: str) -> bool:
    if name == "lr" and (widget_value(run, "exact") or "").strip():
        return True
    return widget_value(run, name) != st.session_state.get(key(run, f"seed_{name}"))


def sync_widgets(run: str, applied: dict[str, Any], supported: list[str]) -> None:
    """Seed the sliders with applied values; move an untouched one when the applied value
    moved to another stop of it (an LR decay, a change from the CLI).

    An applied value that moved within the slider's stop (a decaying LR, mostly) is only
    noted. Call before the widgets are drawn.
    """
    state = st.session_state
    for name in supported:
        value = applied.get(name)
        if value is None:
            continue
        if key(run, f"seed_{name}") not in state:
            _seed(run, name, value)
        elif not _touched(run, name) and state.get(key(run, f"basis_{name}")) != value:
            if _on_widget_scale(name, value) == widget_value(run, name):
                state[key(run, f"basis_{name}")] = value
            else:
                _seed(run, name, value)


def pending_knobs(run: str, applied: dict[str, Any], supported: list[str]) -> dict[str, Any]:
    """What Apply would send for each knob: the user's value if touched, else the applied one.

    A typed exact LR wins over the LR slider and may be invalid text (validated on Apply).
    """
    pending: dict[str, Any] = {}
    for name in supported:
        pending[name] = widget_value(run, name) if _touched(run, name) else applied.get(name)
    exact = (widget_value(run, "exact") or "").strip()
    if exact and "lr" in supported:
        pending["lr"] = exact
    return pending


def _same(a: float, b: float | None) -> bool:
    return b is not None and math.isclose(a, b, rel_tol=SAME_REL_TOL, abs_tol=0.0)


def changed_knobs(pending: dict[str, Any], applied: dict[str, Any]) -> dict[str, float]:
    """Validate pending values; return those that differ from the applied ones.

    Raises :class:`KnobError` (nothing is sent then).
    """
    present = {k: v for k, v in pending.items() if v is not None}
    valid = validate_knobs(present) if present else {}
    return {k: v for k, v in valid.items() if not _same(v, applied.get(k))}


def format_knob(name: str, value: float | None) -> str:
    """A knob value as the page shows it: β plainly (0.99), LR and decay in 1e-03 form."""
    if value is None:
        return "–"
    return f"{value:.6g}" if name == "momentum" else format_sci(value)


def describe_changes(changes: dict[str, float]) -> str:
    """``lr 3e-03, momentum β 0.95``: what a set command asks for."""
    return ", ".join(f"{KNOB_LABELS.get(k, k)} {format_knob(k, v)}" for k, v in changes.items())


# --- callbacks (run before the script re-runs, so they may reset widget values) -------------

def _applied(address: str) -> tuple[str, dict[str, Any]]:
    """The run's state and applied knobs, read fresh (callback arguments are as old as the
    last render of the knobs, which has no timer)."""
    with open_store(address) as store:
        summary = store.summary()
    return summary["state"], {k: summary.get(k) for k in KNOB_ORDER}


def _current_lr(run: str, applied: dict[str, Any]) -> float | None:
    value = pending_knobs(run, applied, ["lr"]).get("lr")
    try:
        return validate_knobs({"lr": value})["lr"]
    except KnobError:
        return None


def _scale_lr(address: str, run: str, button: str) -> None:
    """×½ / ×2's callback: :func:`_scale`, unless Apply did it in this rerun already; with
    Apply's callback still to come in this rerun, it tells Apply so (module docstring)."""
    state = st.session_state
    if state.pop(key(run, f"{button}_by_apply"), False):
        return
    _scale(address, run, button)
    if state.get(key(run, "apply")):
        state[key(run, f"{button}_before_apply")] = True


def _scale(address: str, run: str, button: str) -> None:
    """×½ / ×2: the exact result goes into the text field, the slider to its nearest stop."""
    base = _current_lr(run, _applied(address)[1])
    if base is None:  # an invalid typed LR: its hint under the field says so
        return
    target = float(f"{base * SCALES[button]:.6g}")
    _set_exact(run, f"{target:.6g}")
    _show_on_slider(run, target)


def _show_on_slider(run: str, lr: float) -> None:
    """Move the LR slider to the stop nearest a typed LR (the typed value is what is sent;
    the slider stays seeded for the applied LR it followed)."""
    state = st.session_state
    state[key(run, "seed_lr")] = nearest_on_ladder(lr, LR_LADDER)
    _renew(run, "lr")


def _slider_moved(run: str, generation: int) -> None:
    if generation != _generation(run, "lr"):  # a slider no longer shown (module docstring)
        return
    if (widget_value(run, "exact") or "").strip():
        _set_exact(run, "")  # the slider wins over an older typed value


def typed_lr_problem(run: str) -> str | None:
    """Why the typed exact LR is not valid (None when it is, or when nothing is typed): read
    from the field at each render, so the hint goes as soon as the field changes."""
    text = (widget_value(run, "exact") or "").strip()
    if not text:
        return None
    try:
        validate_knobs({"lr": text})
    except KnobError as err:
        return f"Not a valid learning rate: {err}"
    return None


def _exact_typed(run: str, generation: int) -> None:
    """A valid typed LR moves the slider to its nearest stop (the typed value is sent); an
    emptied field gives the slider back to the applied LR."""
    state = st.session_state
    if generation != _generation(run, "exact"):  # a field no longer shown (module docstring)
        return
    text = (widget_value(run, "exact") or "").strip()
    if text and typed_lr_problem(run) is None:
        _show_on_slider(run, validate_knobs({"lr": text})["lr"])
    elif not text and key(run, "basis_lr") in state:
        _seed(run, "lr", state[key(run, "basis_lr")])


def _apply(address: str, run: str, supported: list[str]) -> None:
    """Apply: validate, send one ``set`` command with the changed knobs, re-seed widgets. A
    ×½ / ×2 in the same rerun is done first (module docstring)."""
    state = st.session_state
    for button in SCALES:
        if state.get(key(run, button)) and not state.pop(key(run, f"{button}_before_apply"),
                                                         False):
            _scale(address, run, button)
            state[key(run, f"{button}_by_apply")] = True  # its own callback comes next
    if not actions.permitted(run):
        return
    run_state, applied = _applied(address)
    if is_locked(run_state):
        actions.say(run, "error", f"Not sent: the run is {run_state}.")
        return
    try:
        changes = changed_knobs(pending_knobs(run, applied, supported), applied)
    except KnobError as err:
        actions.say(run, "error", f"Not sent: {err}")
        return
    if not changes:
        actions.say(run, "error", "Nothing to apply: every pending value equals the applied one.")
        return
    _set_exact(run, "")
    for name, value in changes.items():
        # Untouched again, showing the sent value; it follows the applied one from the moment
        # the trainer has applied it (basis: the value in force until then).
        _seed(run, name, value, basis=applied.get(name))
    actions.send(address, run, "set", changes, describe_changes(changes))


# --- rendering ------------------------------------------------------------------------------

def knob_widgets(address: str, summary: dict[str, Any], meta: dict[str, Any],
                 *, allowed: bool = True) -> None:
    """LR, momentum and weight decay widgets for one run, ×½ / ×2, exact LR, and Apply.

    ``allowed`` False (no access token) shows them disabled, like a finished run (and the
    callbacks refuse anyway).
    """
    run = summary["run"]
    for button in SCALES:  # a backstop: the marks live within one pass of callbacks
        st.session_state.pop(key(run, f"{button}_by_apply"), None)
        st.session_state.pop(key(run, f"{button}_before_apply"), None)
    applied = {k: summary.get(k) for k in KNOB_ORDER}
    if applied["lr"] is None:
        st.info("Waiting for the trainer to report its knobs…")
        return
    supported = supported_knobs(meta, applied)
    locked = is_locked(summary["state"]) or not allowed
    with st.container():  # a fixed slot (see app.main.run_view)
        if is_locked(summary["state"]):
            st.caption(f"The run is {summary['state']}: knobs are read-only.")
    sync_widgets(run, applied, supported)
    st.select_slider("Learning rate (log scale)", options=LR_LADDER, format_func=format_sci,
                     key=widget_key(run, "lr"), value=widget_value(run, "lr"), disabled=locked,
                     on_change=_slider_moved, args=(run, _generation(run, "lr")),
                     help="equal effort per decade: 1e-6 … 10")
    half, double, exact = st.columns([1, 1, 2], vertical_alignment="bottom")
    half.button("×½", key=key(run, "half"), on_click=_scale_lr, args=(address, run, "half"),
                disabled=locked, width="stretch", help="halve the pending learning rate")
    double.button("×2", key=key(run, "double"), on_click=_scale_lr, args=(address, run, "double"),
                  disabled=locked, width="stretch", help="double the pending learning rate")
    exact.text_input("exact LR", key=widget_key(run, "exact"), value=widget_value(run, "exact"),
                     placeholder="exact LR",
                     label_visibility="collapsed", disabled=locked, on_change=_exact_typed,
                     args=(run, _generation(run, "exact")))
    problem = typed_lr_problem(run)
    with st.container():  # a fixed slot
        if problem:
            st.error(problem)
    if "momentum" in supported:
        st.select_slider("Momentum (log scale of 1−β)", options=MOMENTUM_OPTIONS,
                         format_func=format_beta, key=widget_key(run, "momentum"),
                         value=widget_value(run, "momentum"), disabled=locked,
                         help="β near 1 is sensitive: the slider is spaced by 1−β")
    if "weight_decay" in supported:
        st.select_slider("Weight decay (log scale)", options=WD_OPTIONS, format_func=format_sci,
                         key=widget_key(run, "weight_decay"),
                         value=widget_value(run, "weight_decay"), disabled=locked)
    st.button("Apply", type="primary", key=key(run, "apply"), disabled=locked, width="stretch",
              on_click=_apply, args=(address, run, supported))


def pending_table(run: str, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """Applied vs pending, one row per supported knob; changed rows are marked."""
    applied = {k: summary.get(k) for k in KNOB_ORDER}
    if applied["lr"] is None:
        return
    supported = supported_knobs(meta, applied)
    pending = pending_knobs(run, applied, supported)
    lines = ["| knob | applied | pending |", "|---|---|---|"]
    waiting = False
    for name in supported:
        value = pending.get(name)
        try:
            number = validate_knobs({name: value})[name] if value is not None else None
        except KnobError:
            shown, waiting = f":red[{str(value)[:12]} (invalid)]", True
        else:
            shown = format_knob(name, number)
            if number is not None and not _same(number, applied[name]):
                shown, waiting = f":orange[**{shown}**]", True
        lines.append(f"| {TABLE_LABELS[name]} | {format_knob(name, applied[name])} | {shown} |")
    st.markdown("\n".join(lines))
    if waiting:
        st.caption("Orange: pending, not sent yet. Press Apply to send.")


def show_outcome(run: str, command: Command | None) -> None:
    """The run's one message (:mod:`app.actions`): for a command, what became of it (applied
    at step N, waiting, refused), from the same snapshot as the rest of the page."""
    said = actions.outcome(run)
    if said is None:
        return
    if said.command_id is None:
        {"success": st.success, "error": st.error}.get(said.level, st.info)(said.text)
        return
    if command is None:
        return
    if command.status == "applied":
        st.success(f"✓ {said.text}: applied at step {command.applied_step}")
    elif command.status == "pending":
        st.info(f"… {said.text}: sent (command {command.id}), waiting for the trainer")
    else:
        st.error(f"✗ {said.text}: {command.status} by the trainer: {command.error}")
        if st.session_state.get(key(run, "resynced")) != command.id:
            # The widgets still show the refused values: forget what they were seeded for,
            # so they go back to the applied values on the next refresh.
            st.session_state[key(run, "resynced")] = command.id
            for name in KNOB_ORDER:
                st.session_state.pop(key(run, f"basis_{name}"), None)


ROLLBACK_HELP = ("Roll back to the state just before the latest knob change (model, optimizer "
                 "and knobs); a paused or diverged run stays paused")


def run_buttons(address: str, run: str, state: str, *, allowed: bool = True) -> None:
    """Pause / Resume / Undo (roll back) / Stop, enabled by the run's state.

    Roll back restores the state just before the latest knob change (the trainer picks the
    checkpoint; see ``panda rollback``); a paused or diverged run stays paused afterwards.
    """
    live = allowed and not is_locked(state)
    choices = (("pause", "Pause", state in ("running", "starting")),
               ("resume", "Resume", state in ("paused", "diverged")),
               ("rollback", "Undo", state in ("running", "paused", "diverged")),
               ("stop", "Stop", True))
    for column, (kind, label, enabled) in zip(st.columns(len(choices)), choices):
        column.button(label, key=key(run, kind), disabled=not (live and enabled),
                      help=ROLLBACK_HELP if kind == "rollback" else None, width="stretch",
                      on_click=actions.run_command, args=(address, run, kind))
