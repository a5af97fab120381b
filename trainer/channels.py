"""The channels between the training thread and the Babysitter's background workers.

Three queues and one event, so that the training thread never waits on I/O and never takes a
lock: ``deque.append`` and ``popleft`` are atomic in CPython, and each queue has one kind of
writer and one kind of reader.

* ``rows``: one :class:`~trainer.store.records.MetricRow` per step, training thread → flusher;
* ``commands``: validated commands (:class:`~trainer.commands.ValidCommand`), poller and
  divergence guard → training thread;
* ``outbox``: everything else the training thread wants written (one of the item types below),
  training thread → flusher;
* ``wake``: set when a command is handed over, so a paused training thread wakes at once.

The outbox items are small named types; the flusher dispatches them through a table of
handlers (:class:`trainer.workers.Flusher`).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from trainer.store.records import Event, ValidationRow, Verdict


@dataclass
class Channels:
    rows: deque = field(default_factory=deque)
    commands: deque = field(default_factory=deque)
    outbox: deque = field(default_factory=deque)
    wake: threading.Event = field(default_factory=threading.Event)


def drain(queue: deque) -> list:
    """Pop what is in ``queue`` now, oldest first (safe against concurrent appends: only this
    thread pops, so the items counted are there to pop; later ones wait for the next drain)."""
    popleft = queue.popleft
    return [popleft() for _ in range(len(queue))]


# --- outbox items ---------------------------------------------------------------------------------
# Items that insert rows carry a batch id: a write retried after a dropped connection, whose
# first attempt may have committed, is then recognised by the store and not written twice.


def _batch_id() -> str:
    return uuid.uuid4().hex

@dataclass(frozen=True)
class WriteValidation:
    """Validation metrics of one evaluation (values may still be tensors)."""

    rows: list[ValidationRow]
    batch: str = field(default_factory=_batch_id)


@dataclass(frozen=True)
class WriteVerdicts:
    """Commands from the store's table, applied or rejected, with their events."""

    verdicts: list[Verdict]
    events: list[Event] = field(default_factory=list)
    batch: str = field(default_factory=_batch_id)


@dataclass(frozen=True)
class RecordCommand:
    """A command applied without passing through the store's table (``bs.set``, a replay, a
    branch's knobs): recorded as an applied command, its events linked to it."""

    kind: str
    payload: dict
    source: str
    step: int
    events: list[Event]
    status: str = "applied"           # or "not holding" (see trainer.composition)
    error: str | None = None
    batch: str = field(default_factory=_batch_id)


@dataclass(frozen=True)
class WriteEvents:
    """Events that belong to no command (a divergence, an early stop, a restart)."""

    events: list[Event]
    batch: str = field(default_factory=_batch_id)


@dataclass(frozen=True)
class WriteMeta:
    """Run metadata (status, …)."""

    values: dict[str, Any]


@dataclass(frozen=True)
class WriteCheckpoint:
    """An in-memory snapshot to write into the run's checkpoint ring (or pin)."""

    state: dict[str, Any]
    reason: str
    pinned: bool = False


OutboxItem = WriteValidation | WriteVerdicts | RecordCommand | WriteEvents | WriteMeta | \
    WriteCheckpoint
