"""Commands: what a person (page, CLI, API) asks a running trainer to do, and their validation.

A command is a row of the run store's command table: a kind and a JSON payload. It is validated
where it is entered and again where the trainer applies it (a raw row may hold anything), by
:func:`validate_command`; a refused command raises :class:`~trainer.ranges.KnobError` with a
one-line reason and changes nothing. Validated commands travel to the training thread as
:class:`ValidCommand`.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from trainer.knobs import validate_knobs
from trainer.ranges import STEP, Choice, KnobError
from trainer.schedules import validate_schedule

# "set" carries knob values; "schedule" an LR decay (trainer.schedules); "rollback" an optional
# step; the rest carry nothing. "diverged" and "worker_failed" are not commands anyone sends:
# they are the divergence guard's and a failed worker's news, handed to the training thread the
# same way.
CONTROL_KINDS = ("pause", "resume", "stop", "checkpoint", "rollback")
COMMAND_KINDS = ("set", "schedule", *CONTROL_KINDS)
GUARD_KIND = "diverged"
FAILURE_KIND = "worker_failed"  # a worker's failure, raised on the training thread


class ValidCommand(NamedTuple):
    """A validated command on its way to the training thread. ``id`` is its row in the store's
    command table, None for one that did not come through the table (``bs.set``, replay, the
    divergence guard); ``source`` says where it came from."""

    id: int | None
    kind: str
    payload: dict
    source: str = "store"


def validate_command(kind: Any, payload: Any) -> dict:
    """Validate a command and return its normalized payload.

    ``payload`` may be a dict or its JSON text (as stored in the command table).
    """
    if kind not in COMMAND_KINDS:
        raise KnobError(f"unknown command {str(kind)[:40]!r}; known commands: "
                        f"{', '.join(COMMAND_KINDS)}")
    if isinstance(payload, (str, bytes)):
        try:
            payload = json.loads(payload) if payload else {}
        except json.JSONDecodeError as err:
            raise KnobError(f"malformed command payload: {err.msg}") from None
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise KnobError(f"command payload must be an object, got {type(payload).__name__}")
    if kind == "set":
        return validate_knobs(payload, allow_text=False)
    if kind == "schedule":
        return validate_schedule(payload)
    if kind == "rollback":
        return _validate_rollback(payload)
    if kind == "stop" and set(payload) <= {"reason"}:  # why, for the record (a search's pruning)
        reason = payload.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise KnobError(f"stop reason must be text, got {type(reason).__name__}")
        return {"reason": reason[:500]} if reason else {}
    if payload:
        raise KnobError(f"{kind} takes no arguments, got {sorted(payload)}")
    return {}


ROLLBACK_KNOBS = Choice(("keep", "checkpoint"))


def _validate_rollback(payload: dict) -> dict:
    """``{}`` is Undo (the state before the latest knob change, or before a divergence);
    ``{"step": S}`` restores the newest checkpoint at or before S and keeps the knobs a person
    chose since (``"knobs": "checkpoint"``: the checkpoint's knobs instead)."""
    unknown = sorted(set(payload) - {"step", "knobs"})
    if unknown:
        raise KnobError(f"rollback takes only 'step' and 'knobs', got {unknown[0]!r}")
    if "step" not in payload:
        if "knobs" in payload:
            raise KnobError("rollback 'knobs' needs a 'step' (Undo restores the knobs too)")
        return {}
    return {"step": STEP.check("rollback step", payload["step"]),
            "knobs": ROLLBACK_KNOBS.check("rollback knobs", payload.get("knobs", "keep"))}
