"""The rows that travel from a trainer to its run store, as small named types.

They are ``NamedTuple``s: a database driver takes them as parameter tuples unchanged, and code
reads them by name (``row.loss``, ``event.command_id``), never by position.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class MetricRow(NamedTuple):
    """One optimizer step: its loss and the knob values its update used. ``loss`` is a float,
    or a device loss's detached tensor, which becomes a float in the flusher (see
    :meth:`trainer.babysitter.Babysitter.step` and :func:`trainer.workers.to_floats`);
    ``user_lr`` is the LR the user's own code had set, which
    Panda's factor multiplied (see :mod:`trainer.composition`)."""

    step: int
    epoch: int
    wall: float
    loss: Any
    lr: float | None
    momentum: float | None
    weight_decay: float | None
    user_lr: float | None = None


class ValidationRow(NamedTuple):
    """One named validation metric at one evaluation (``value`` may still be a tensor)."""

    step: int
    epoch: int
    wall: float
    name: str
    value: Any


class Event(NamedTuple):
    """An intervention (a knob change, a rollback, a divergence …), drawn as a chart marker."""

    step: int
    wall: float
    kind: str
    knob: str | None = None
    old: float | None = None
    new: float | None = None
    command_id: int | None = None
    message: str | None = None


class Verdict(NamedTuple):
    """What became of one command: ``applied`` at a step, or ``rejected`` with the reason."""

    command_id: int
    status: str
    applied_step: int | None = None
    error: str | None = None
