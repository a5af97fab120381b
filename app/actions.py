"""What the page does to runs: every action is a widget callback that goes through here.

Each one checks the access token first (:func:`app.access.granted`, on the server, at the
moment of the action), does one thing, and leaves one message for its run: the message of the
previous action is replaced, so an old error never stays beside a newer success.

A command is submitted, then the callback waits up to :data:`CONFIRM_WAIT_S` for the trainer's
verdict (a running trainer gives it within ~0.1 s: it applies the command at the next step
boundary and confirms it from the update that used it). Callbacks run before the page's
refresh, so that refresh already shows the outcome, and the header, the knobs table and the
chart show its effect (the trainer writes the new knobs before its verdict).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from app import access
from trainer.store import FINAL_STATES, RunStore
from trainer.store.address import open_store

CONFIRM_WAIT_S = 1.0     # a slower trainer is confirmed by a later refresh instead
CONFIRM_POLL_S = 0.01
LOCKED_STATES = (*FINAL_STATES, "interrupted")
# Commands a paused trainer settles at once; a knob change waits for the next update.
SETTLED_WHILE_PAUSED = ("pause", "resume", "stop", "rollback")


@dataclass(frozen=True)
class Outcome:
    """The message of a run's latest action: ``level`` (success, info, error) and ``text``;
    for a command, ``command_id`` (its status is read fresh at each refresh) and ``text`` says
    what it asked for."""

    level: str
    text: str
    command_id: int | None = None


def _key(run: str) -> str:
    return f"outcome:{run}"


def say(run: str, level: str, text: str, command_id: int | None = None) -> None:
    """Replace ``run``'s message."""
    st.session_state[_key(run)] = Outcome(level, text, command_id)


def outcome(run: str) -> Outcome | None:
    """``run``'s latest message, if any."""
    return st.session_state.get(_key(run))


def permitted(run: str) -> bool:
    """Whether this session may act now; if not, says so (as ``run``'s message)."""
    if access.granted():
        return True
    say(run, "error", access.REFUSAL)
    return False


def wait_for_verdict(store: RunStore, command_id: int, timeout: float = CONFIRM_WAIT_S) -> None:
    """Return once the command is no longer pending, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        command = store.command(command_id)
        if command is None or command.status != "pending":
            return
        time.sleep(CONFIRM_POLL_S)


def send(address: str, run: str, kind: str, payload: dict[str, Any], what: str) -> int | None:
    """Submit one command to the run (after the token check); its outcome becomes the run's
    message. Returns the command id, or None when nothing was sent."""
    if not permitted(run):
        return None
    with open_store(address) as store:
        state = store.summary()["state"]
        if state in LOCKED_STATES:
            say(run, "error", f"Not sent: the run is {state}.")
            return None
        command_id = store.submit_command(kind, payload, source="dashboard")
        say(run, "info", what, command_id)
        if state != "paused" or kind in SETTLED_WHILE_PAUSED:
            wait_for_verdict(store, command_id)
    return command_id


def run_command(address: str, run: str, kind: str) -> None:
    """Pause / Resume / Undo (roll back) / Stop."""
    send(address, run, kind, {}, kind)


def apply_suggested_lr(address: str, run: str, lr: float) -> None:
    """The LR range test's suggestion, sent as an ordinary ``set`` command."""
    from trainer.knobs import format_sci

    send(address, run, "set", {"lr": lr}, f"suggested learning rate {format_sci(lr)}")


def start_range_test(address: str, run: str, start: Callable[[str], int]) -> None:
    """An LR range test on a copy of the run's newest checkpoint, in its own process
    (``start``: :func:`trainer.lr_range.job.start_lr_find_job`, as the panel names it)."""
    from trainer.lr_range.job import LRJobError

    if not permitted(run):
        return
    try:
        result_id = start(address)
    except (LRJobError, OSError) as err:
        say(run, "error", f"Could not start the LR range test: {err}")
        return
    say(run, "success", f"LR range test {result_id} started beside the run.")
