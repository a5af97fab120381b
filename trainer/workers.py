"""The Babysitter's two background threads: the flusher (writes) and the poller (reads commands).

Neither ever touches the model or optimizer: they talk to the training thread only through its
:class:`~trainer.channels.Channels`. The poller hands validated commands over; the training
thread hands everything that needs I/O to the flusher.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainer import checkpoint
from trainer.channels import (
    Channels,
    OutboxItem,
    RecordCommand,
    WriteCheckpoint,
    WriteEvents,
    WriteMeta,
    WriteValidation,
    WriteVerdicts,
    drain,
)
from trainer.commands import FAILURE_KIND, GUARD_KIND, ValidCommand, validate_command
from trainer.guard import DivergenceGuard
from trainer.optim import OptimizerKnobs
from trainer.ranges import KnobError
from trainer.store.base import RunStore, first_line
from trainer.store.records import Event, MetricRow, Verdict

log = logging.getLogger(__name__)

_STEP, _LOSS = MetricRow._fields.index("step"), MetricRow._fields.index("loss")

STORE_GIVE_UP_S = 60.0  # a store unreachable for longer than this fails the run (loudly)


class WorkerError(RuntimeError):
    """A background worker of the Babysitter failed; raised at the training thread's next
    ``bs.step()`` with the worker's reason (the original exception is its ``__cause__``
    where it can be)."""


def to_floats(values: Sequence[Any]) -> list[float]:
    """Turn a batch of scalar tensors / numbers into floats with one device sync at most.

    Tensors (device losses, DDP's averaged losses, validation metrics) are stacked and read in
    one go (on a device, the copy is the one sync of a flush). Not ``item()`` per value,
    although on CPU that is the cheaper loop on its own: torch's bindings release the GIL
    around every op, ``item()`` included, and the training thread, which runs torch ops all the
    time, takes it at each release; the flusher then waits for it back. (Measured on the fast
    loop of ``benchmarks/overhead.py``, with the rows then holding CPU tensors: 4,459 futex
    calls per 5,000 steps with ``item()`` per value and ``executemany``, which releases the GIL
    per row; 2,001 with one stack and multi-row inserts; ``strace -f -c``.) A value that is
    not one number fails the stack's ``reshape`` and then ``float()``, with torch's message.
    The kind of batch is told by its first value: ``isinstance`` on every value of a batch
    costs more than reading them (``torch.Tensor``'s metaclass makes it slow).
    """
    if not values:
        return []
    first = values[0]
    if isinstance(first, torch.Tensor):
        try:
            if first.device.type == "cpu":
                return torch.stack(list(values)).double().reshape(len(values)).tolist()
            return torch.stack([t.reshape(()).to(first.device) for t in values]
                               ).double().cpu().tolist()
        except (RuntimeError, TypeError, AttributeError):
            pass  # numbers among the tensors, or scalar tensors of different shapes
    return [float(v) for v in values]  # float() reads a number or a one-value tensor


class _Worker(threading.Thread):
    """A daemon thread that calls ``tick()`` every ``interval`` seconds until stopped.

    A worker's failure is never silent (TensorBoard's event writer re-raises its worker's error
    at the next write; so does Panda). A store that is briefly unreachable (its driver's errors,
    an ``OSError``) is retried every tick, its data kept; one that stays unreachable for
    ``give_up_s``, or any other exception, is a failure: logged once with its traceback,
    recorded in the run (event ``failed``, status ``failed`` with the reason) where the store
    still takes it, and handed to the training thread, whose next ``bs.step()`` raises
    :class:`WorkerError`.
    """

    def __init__(self, name: str, store: RunStore, interval: float, channels: Channels,
                 give_up_s: float = STORE_GIVE_UP_S):
        super().__init__(name=name, daemon=True)
        self.store, self.interval, self.channels = store, interval, channels
        self.give_up_s = give_up_s
        self.failure: BaseException | None = None
        self._unavailable_since: float | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._wait():
            self._safe_tick()
        self._safe_tick()  # one last pass after stop(): nothing buffered is lost

    def _wait(self) -> bool:
        """Sleep until the next tick is due; True once stopped."""
        return self._stop_event.wait(self.interval)

    def _safe_tick(self) -> None:
        try:
            self.tick()
            self._unavailable_since = None
        except (*self.store.errors, OSError) as err:
            # A locked or briefly unavailable store must not kill training; the data stays
            # queued and the next tick retries, until it has been down for too long.
            now = time.monotonic()
            if self._unavailable_since is None:
                self._unavailable_since = now
                log.warning("%s: store unavailable, will retry: %s", self.name, first_line(err))
            elif now - self._unavailable_since > self.give_up_s:
                self.fail(err, f"the run store has been unavailable for over "
                          f"{self.give_up_s:g} s")
        except Exception as err:
            self.fail(err)

    def fail(self, err: BaseException, context: str | None = None) -> None:
        """Report a failure once: log, record in the run, tell the training thread."""
        if self.failure is not None:
            return
        self.failure = err
        reason = f"{self.name} failed: " + (f"{context}: " if context else "") + \
            f"{type(err).__name__}: {first_line(err)}"
        log.error("%s", reason, exc_info=err)
        with contextlib.suppress(Exception):  # the store itself may be what failed
            self.store.add_events([Event(-1, time.time(), "failed", message=reason)])
            self.store.set_meta(status="failed", error=reason)
        self.channels.commands.append(ValidCommand(None, FAILURE_KIND, {"error": reason},
                                                   source="worker"))
        self.channels.wake.set()

    def tick(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()


class Flusher(_Worker):
    """Writes buffered metric rows and outbox items to the store in batches.

    It is also where losses become numbers, so the divergence guard runs here: when it fires,
    the news goes to the training thread like a command (``diverged``), and the guard disarms
    until the training thread re-arms it (after a rollback or a resume).
    """

    def __init__(self, store: RunStore, channels: Channels, interval: float,
                 live_meta: Callable[[], dict[str, Any]], *, keep_checkpoints: int,
                 guard: DivergenceGuard | None = None, give_up_s: float = STORE_GIVE_UP_S):
        super().__init__("panda-flusher", store, interval, channels, give_up_s)
        self.live_meta = live_meta
        self.keep_checkpoints = keep_checkpoints
        self.guard = guard
        self._armed, self._rearm_at = guard is not None, None
        self._nudged = threading.Event()
        self._handlers: dict[type, Callable[[Any], None]] = {
            WriteValidation: self._write_validation,
            WriteVerdicts: lambda item: store.resolve_commands(item.verdicts, item.events,
                                                               batch=item.batch),
            RecordCommand: lambda item: store.record_command(
                item.kind, item.payload, item.source, item.step, item.events,
                status=item.status, error=item.error, batch=item.batch),
            WriteEvents: lambda item: store.add_events(item.events, batch=item.batch),
            WriteMeta: lambda item: store.set_meta(**item.values),
            WriteCheckpoint: self._write_checkpoint,
        }

    def nudge(self) -> None:
        """Write now rather than at the next interval: a command's verdict is waiting (the CLI
        and the page wait for it). Commands are rare, so this costs the hot path nothing."""
        self._nudged.set()

    def _wait(self) -> bool:
        self._nudged.wait(self.interval)
        self._nudged.clear()
        return self._stop_event.is_set()

    def stop(self) -> None:
        self._stop_event.set()
        self._nudged.set()
        super().stop()

    def arm_guard(self, from_step: int) -> None:
        """Re-arm the guard with fresh smoothing for rows from ``from_step`` on (called from the
        training thread; rows logged before a rollback must not fire it again)."""
        if self.guard is not None:
            self._rearm_at = from_step

    def _watch(self, steps: Sequence[int], losses: Sequence[float]) -> None:
        rearm_at = self._rearm_at
        if rearm_at is not None:
            self._rearm_at, self._armed = None, True
            self.guard.reset()
            keep = bisect.bisect_left(steps, rearm_at)  # steps rise within a batch
            steps, losses = steps[keep:], losses[keep:]
        if not self._armed:
            return
        divergence = self.guard.update(steps, losses)
        if divergence is not None:
            self._armed = False
            self.channels.commands.append(ValidCommand(None, GUARD_KIND, {
                "first_bad_step": divergence.first_bad_step, "cause": divergence.cause},
                source="guard"))
            self.channels.wake.set()

    def tick(self) -> None:
        rows = drain(self.channels.rows)
        if rows:
            # Columns, not rows: the transpose runs in C, and so does each later step (the
            # guard in NumPy, the insert in the driver), so the GIL the training loop needs is
            # held for little Python work per row.
            columns = list(zip(*rows))
            columns[_LOSS] = to_floats(columns[_LOSS])
            self._watch(columns[_STEP], columns[_LOSS])
            try:
                self.store.append_metric_columns(columns, meta=self.live_meta())
            except self.store.errors:
                self.channels.rows.extendleft(reversed(rows))
                raise
        else:
            self.store.set_meta(**self.live_meta())  # heartbeat, also while paused
        outbox = self.channels.outbox
        while outbox:
            try:
                self.write(outbox[0])
            except (*self.store.errors, OSError):
                raise  # the store: retried next tick, the item kept
            except Exception as err:  # the item itself: reported, dropped, the rest written
                self.fail(err, f"could not write {type(outbox[0]).__name__}")
            outbox.popleft()  # only once written (or refused): nothing is written twice

    def write(self, item: OutboxItem) -> None:
        """Write one outbox item through its handler."""
        handler = self._handlers.get(type(item))
        if handler is None:
            raise TypeError(f"unknown outbox item {type(item).__name__}")
        handler(item)

    def _write_validation(self, item: WriteValidation) -> None:
        values = to_floats([r.value for r in item.rows])
        self.store.append_validation([r._replace(value=v) for r, v in zip(item.rows, values,
                                                                            strict=True)],
                                     batch=item.batch)

    def _write_checkpoint(self, item: WriteCheckpoint) -> None:
        """Write a checkpoint file; a write that fails (a full disk) is reported as an event and
        dropped, so it never holds up the verdicts queued behind it. The snapshot stays in
        memory for a rollback."""
        try:
            checkpoint.save(self.store.run_dir, item.state, reason=item.reason,
                            pinned=item.pinned, keep=self.keep_checkpoints)
        except OSError as err:
            step = int(item.state["babysitter"]["step"])
            log.warning("checkpoint of step %d not written: %s", step, err)
            self.store.add_events([Event(step, time.time(), "checkpoint_failed", message=(
                f"checkpoint of step {step} not written: {first_line(err)}"))])


class Poller(_Worker):
    """Reads new commands, validates them (second time) and hands them to the training thread."""

    def __init__(self, store: RunStore, channels: Channels, knobs: OptimizerKnobs,
                 interval: float, flusher: Flusher, give_up_s: float = STORE_GIVE_UP_S):
        super().__init__("panda-poller", store, interval, channels, give_up_s)
        self.knobs = knobs
        self.flusher = flusher  # writes a refusal at once
        self.last_id = 0

    def _wait(self) -> bool:
        # A server store wakes this thread when a command is committed (and otherwise only
        # now and then): every wake-up costs the training thread a GIL hand-over.
        try:
            self.store.wait_for_commands(self.interval, self._stop_event)
        except self.store.errors:
            log.warning("%s: store unavailable, will retry", self.name)
            self._stop_event.wait(self.interval)
        return self._stop_event.is_set()

    def stop(self) -> None:
        self._stop_event.set()
        with contextlib.suppress(*self.store.errors):  # else it notices at its next wake-up
            self.store.wake_command_waiters()
        super().stop()

    def tick(self) -> None:
        for command in self.store.pending_commands(self.last_id):
            self.last_id = command.id
            try:
                payload = validate_command(command.kind, command.payload)
                if command.kind == "set":
                    self.knobs.check(payload)
            except KnobError as err:
                self.channels.outbox.append(WriteVerdicts(
                    [Verdict(command.id, "rejected", None, str(err))]))
                self.flusher.nudge()
                continue
            self.channels.commands.append(ValidCommand(command.id, command.kind, payload))
            self.channels.wake.set()


class Workers:
    """A Babysitter's flusher and poller, or none at all (a DDP rank other than 0 records
    nothing); the training thread starts, nudges, re-arms and stops them through this."""

    def __init__(self, flusher: Flusher | None = None, poller: Poller | None = None):
        self.flusher, self.poller = flusher, poller

    def start(self) -> None:
        for worker in (self.poller, self.flusher):
            if worker is not None:
                worker.start()

    def nudge(self) -> None:
        if self.flusher is not None:
            self.flusher.nudge()

    def arm_guard(self, from_step: int) -> None:
        if self.flusher is not None:
            self.flusher.arm_guard(from_step)

    def stop_polling(self) -> None:
        if self.poller is not None:
            self.poller.stop()

    def stop(self) -> None:
        """Stop polling, then flush everything and join (the flusher goes last)."""
        self.stop_polling()
        if self.flusher is not None:
            self.flusher.stop()
