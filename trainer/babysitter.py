"""Babysitter: the hook into any PyTorch training loop.

    with Babysitter(optimizer, run_dir="runs/mnist-1", model=model) as bs:
        for epoch in range(epochs):
            for x, y in loader:
                ...; optimizer.step()
                bs.step(loss)               # log, apply pending knobs, honour pause/stop
                if bs.should_stop: break
            bs.log_validation(val_loss, accuracy=acc)

The hot path (:meth:`Babysitter.step`) never waits on I/O or the GPU: it appends the loss (a
device loss as its detached tensor, a CPU loss read at once) to a deque and reads one attribute
for pending commands. Two daemon threads do the rest (see :mod:`trainer.workers`): a flusher
turns buffered tensors into numbers and writes them in batches about every 250 ms, and a poller
reads new commands about every 50 ms, validates them and hands them over. Knob changes are
taken by the training thread between two steps and land at the next optimizer update, as
factors on whatever the user's own code or scheduler sets (:mod:`trainer.composition`); their
verdict comes from the update that used them. Under DDP a
:class:`~trainer.distributed.DistributedCoordinator` keeps the ranks in lockstep
(:mod:`trainer.coordinator` says what it may do here).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, checkpoint_files
from trainer.channels import (
    RecordCommand,
    WriteCheckpoint,
    WriteEvents,
    WriteMeta,
    WriteValidation,
    WriteVerdicts,
)
from trainer.commands import FAILURE_KIND, GUARD_KIND, ValidCommand, validate_command
from trainer.composition import Composition, Landing
from trainer.config import ON_DIVERGE
from trainer.coordinator import Coordinator
from trainer.distributed import DEFAULT_SYNC_EVERY, coordinator_for
from trainer.export import TimedCommand, build_timeline, replay_commands
from trainer.guard import DivergenceGuard, EarlyStopping
from trainer.knobs import format_sci
from trainer.optim import OptimizerKnobs, same
from trainer.ranges import KnobError
from trainer.rng import rng_state
from trainer.rollback import RollbackPoints
from trainer.schedules import Schedule, schedule_from
from trainer.store.address import store_url
from trainer.store.base import RUNNING_STATES, sanitize_run_name
from trainer.store.records import Event, MetricRow, ValidationRow, Verdict
from trainer.workers import STORE_GIVE_UP_S, Flusher, Poller, WorkerError, Workers

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.25  # metrics reach the store at most this late (kill -9 loses ≤ this);
# a verdict is written at once (the flusher is nudged). Each flush has a fixed cost (a
# transaction, the heartbeat), so 4 a second instead of 10 halves the flusher's share of a
# fast loop; the page refreshes once a second anyway.
ROW_LIMIT = 50_000       # rows waiting for the flusher before they are folded (bounded memory)
# A MetricRow built by tuple's own constructor: the named type, at the cost of a plain tuple
# (NamedTuple's generated __new__ is a Python function, ~1 µs a call on the hot path).
_new_row = tuple.__new__
POLL_INTERVAL_S = 0.05   # a command waits at most this long before the trainer sees it
PAUSE_WAKE_S = 0.5       # a paused trainer re-checks for stop/close at least this often
RESCUE_LR_FACTOR = 0.5   # --on-diverge rollback halves the LR that diverged
NO_UPDATE_LIMIT = 100    # steps a knob change may wait for an update before it does not hold


@dataclass
class _Awaiting:
    """A knob change waiting for the update that uses it (see Babysitter._confirm_landings)."""

    command: ValidCommand
    wall: float
    before: dict[str, float | None]   # the values in force when it was asked for
    landing: Landing
    boundaries: int = 0               # step boundaries passed without an update using it


def _release(lock: Any) -> None:
    """Release a trainer lock from ``RunStore.lock_trainer`` (a file descriptor, or None)."""
    if lock is not None:
        os.close(lock)


# Babysitters started and not closed yet: what the program leaves open is closed at its exit.
_OPEN: weakref.WeakSet[Babysitter] = weakref.WeakSet()


@atexit.register
def _close_left_open() -> None:
    """Close every Babysitter the program did not close (a loop without ``with`` or
    ``bs.close()``, a script whose ``Trainer.train()`` raised): its flusher is a daemon thread,
    and without this the rows of the last flush interval were lost and the run read
    "interrupted". Exit handlers run before daemon threads are stopped (Py_FinalizeEx), so the
    flusher still drains. The status says how the program ended: an unhandled exception (which
    the interpreter keeps as ``sys.last_exc`` / ``sys.last_value``) is "failed" with its
    message, Ctrl-C "stopped"; otherwise as ``close()`` would say. Never a collective under DDP:
    another rank may already be gone."""
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    for bs in list(_OPEN):
        status, error = ("stopped" if bs._stopped_by_command else "finished", None) \
            if exc is None else ended_by(exc)
        log.warning("%s: closed at exit as %s (the program did not call bs.close())",
                    bs.run_dir.name, status)
        try:
            bs.close(status, error)
        except Exception:  # the others are still closed
            log.exception("%s: could not close at exit", bs.run_dir.name)


def ended_by(exc: BaseException) -> tuple[str, str | None]:
    """The status (and error) an exception ends a run with: Ctrl-C "stopped", anything else
    "failed" with its one-line message."""
    if isinstance(exc, KeyboardInterrupt):
        return "stopped", None
    return "failed", f"{type(exc).__name__}: {exc}"


def pinned_memory_possible() -> bool:
    """Whether a CPU tensor can be pinned (page-locked) here: pinning needs an accelerator's
    host allocator (CUDA, MPS, XPU, ...), so on a machine without one no loss is pinned."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or (xpu is not None and xpu.is_available()))


def _number(loss: Any) -> float:
    """A loss that is not a one-element tensor: a plain number, else a clear ValueError (a
    loss of shape [2] is a missing reduction, caught here instead of in the flusher)."""
    if isinstance(loss, torch.Tensor):
        raise ValueError(f"bs.step() takes the loss as one number; got a tensor of shape "
                         f"{tuple(loss.shape)}: reduce it first (e.g. loss.mean())")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise ValueError(f"bs.step() takes the loss as a tensor or a number, got "
                         f"{type(loss).__name__}")
    return float(loss)


def _kept(metric: torch.Tensor) -> torch.Tensor:
    """A validation metric as kept for the flusher: a device one copied (see step(): CUDA
    graphs reuse their outputs' memory), a CPU one as it is (a pinned one may still be the
    target of a copy in flight, which a copy now would read too early)."""
    metric = metric.detach()
    return metric if metric.is_cpu else metric.clone()


def _describe(payload: dict) -> str:
    return " ".join(f"{k}={_fmt(v) if isinstance(v, (int, float)) else v}"
                    for k, v in payload.items() if k != "origin_epoch")


def _fmt(value: float | None) -> str:
    return "-" if value is None else format_sci(float(value))


def _knob_changes(before: dict[str, float | None], after: dict[str, float | None]) -> str:
    """"lr 1e-02 → 3e-03, momentum 9.5e-01 → 9e-01": the knobs that differ (the LR alone
    when none does), in the order the optimizer's knobs are listed."""
    names = [name for name, value in after.items() if value is not None and
             value != before.get(name)] or ["lr"]
    return ", ".join(f"{name} {_fmt(before.get(name))} → {_fmt(after[name])}" for name in names)


def _source_note(command: ValidCommand) -> str:
    return {"branch": " (branch)", "replay": " (replay)"}.get(command.source, "")


class Babysitter:
    """Log a training run to a run store and apply live knob changes between steps.

    Args:
        optimizer: any ``torch.optim`` optimizer, any number of param groups.
        run_dir: the run's directory: its checkpoints (and, by default, its ``run.db``) live
            there; its name is the run's name.
        model: optional; needed for checkpoints and ``resume``.
        config: JSON-serializable settings to record with the run (batch size, …).
        task: a short description of what is trained, shown in the dashboard.
        steps_per_epoch: lets schedules advance smoothly within an epoch; without it the
            epoch counter (advanced by :meth:`log_validation`) drives them.
        schedule: an LR decay (:class:`~trainer.schedules.Schedule` or its dict).
        checkpoint_every: write a rolling checkpoint every this many steps (needs ``model``).
        resume: continue from the newest checkpoint (model, optimizer, knobs, step, RNG), and
            re-apply at their steps the knob changes recorded after it.
        checkpoint_knobs: with ``resume``, keep the checkpoint's knobs and drop the changes
            recorded after it (the restart event says which was done).
        replay: :class:`~trainer.export.TimedCommand` ``(step, kind, payload)`` commands to apply
            at exactly those step boundaries (see :func:`trainer.export.replay_commands`): a
            recorded session, re-enacted.
        on_diverge: what the divergence guard does when the loss turns NaN/inf or blows up:
            ``pause`` (mark the run diverged and wait for a person), ``rollback`` (restore the
            last good checkpoint, halve the LR, go on), ``stop`` (end the run as ``stopped``,
            the cause in its meta ``diverged``: a search trial's divergence is its result, and a
            person can still resume the run from its checkpoints), or ``ignore``.
        guard: a :class:`~trainer.guard.DivergenceGuard` with custom thresholds.
        early_stop: stop when the validation loss has not improved for this many evaluations
            (the best model is kept as a pinned checkpoint).
        keep_checkpoints: size of the ring of automatic checkpoints.
        sync_every: under ``torch.distributed`` (world size > 1), the ranks meet every this
            many steps to average the logged loss and share knob changes, so every rank
            applies a change at the same step; only rank 0 writes the run store, checkpoint
            files and the divergence guard (see :mod:`trainer.distributed`).
        store: a PostgreSQL URL (``postgresql://user@host/db``) to keep the run's metrics and
            commands in, so dashboards on other machines see it; default ``$PANDA_STORE``, and
            without either the run's own SQLite file in ``run_dir``.
        coordinator: how this process meets others (default: DDP's under a multi-process
            ``torch.distributed`` job, else none; see :mod:`trainer.coordinator`).
        row_limit: metric rows that may wait for the store before they are folded into one
            (memory stays bounded when the store is slower than training; the gap is counted).
        store_timeout: seconds the store may stay unreachable before the run fails; a failure
            of Panda's background threads is raised by the next ``step()``
            (:class:`~trainer.workers.WorkerError`).
        on_validation: called as ``on_validation(babysitter, metrics)`` at every
            :meth:`log_validation`, on the training thread, with the metrics as floats (one
            sync per evaluation); it may call :meth:`stop` (a search prunes a trial this way).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, run_dir: str | os.PathLike = "runs/run",
                 *, model: torch.nn.Module | None = None, config: dict | None = None,
                 task: str | None = None, steps_per_epoch: int | None = None,
                 schedule: Schedule | dict | None = None, checkpoint_every: int | None = None,
                 resume: bool = False, replay: list[tuple[int, str, dict]] | None = None,
                 on_diverge: str = "pause", guard: DivergenceGuard | None = None,
                 early_stop: int | None = None, keep_checkpoints: int = checkpoint.DEFAULT_KEEP,
                 flush_interval: float = FLUSH_INTERVAL_S,
                 poll_interval: float = POLL_INTERVAL_S,
                 sync_every: int = DEFAULT_SYNC_EVERY, store: str | None = None,
                 coordinator: Coordinator | None = None, row_limit: int = ROW_LIMIT,
                 store_timeout: float = STORE_GIVE_UP_S, checkpoint_knobs: bool = False,
                 on_validation: Callable[[Babysitter, dict[str, float]], None] | None = None):
        self.run_dir = Path(run_dir)
        sanitize_run_name(self.run_dir.name)
        if checkpoint_every is not None and (model is None or checkpoint_every < 1):
            raise ValueError("checkpoint_every needs a model and a positive step count")
        self.on_diverge = ON_DIVERGE.check("on_diverge", on_diverge)
        self.early_stop, self.on_validation = early_stop, on_validation
        self.keep_checkpoints = keep_checkpoints
        self.optimizer, self.model = optimizer, model
        self.knobs = OptimizerKnobs(optimizer)
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint_every = checkpoint_every
        self.composition = Composition(self.knobs, schedule_from(schedule or {}))
        self.step_count = 0          # optimizer steps completed (the next row's step number)
        self.epoch = 0
        self.should_stop = False
        self.paused = False
        self.extra_state: dict[str, Any] = {}  # restored from a checkpoint on resume
        self._closed = False
        self._stopped_by_command = False
        self._row_limit, self._folded = row_limit, None
        self._pinned_possible = pinned_memory_possible()  # read every step: a plain attribute
        self.folded_steps = 0        # steps logged inside a folded row (see _fold)
        self.final_status: str | None = None  # set by close()
        self._rollback_points = RollbackPoints(self.run_dir)
        self._awaiting: list[_Awaiting] = []  # knob changes waiting for the update using them
        self._skipped_non_finite = False      # a non-finite snapshot was refused (said once)
        self.diverged_at: int | None = None   # first bad step of a divergence not rolled back
        self._paused_at: int | None = None
        self._restored_at_update = 0  # composition.updates when a state was last restored
        self._early_stopping = EarlyStopping(early_stop) if early_stop else None
        for timed in replay or []:
            validate_command(timed[1], timed[2])
        self._replay = deque(sorted(replay or [], key=lambda c: c[0]))
        self._replay_source = "replay"
        self.checkpoint_knobs = checkpoint_knobs
        self._next_replay = self._replay[0][0] if self._replay else None

        self.coordinator = coordinator or coordinator_for(sync_every)
        self._meet_every = self.coordinator.meet_every  # read every step: a plain attribute
        # Under DDP the internal checkpoints gather every rank's generators (a collective), so
        # all ranks must take them at the same steps: checked once, here (alone: no cost).
        self._gather_rng = self.coordinator.agree((checkpoint_every, model is not None, replay))
        if not self._gather_rng:
            log.warning("%s: checkpoint_every, model or replay differ between ranks: "
                        "checkpoints keep rank 0's random state only", self.run_dir.name)
        self.channels, workers = self.coordinator.channels()
        self._rows, self._commands = self.channels.rows, self.channels.commands
        self.store = self.coordinator.open_store(self.run_dir, store_url(store))
        self._trainer_lock = self._claim() if self.store is not None else None
        self._workers = Workers()
        try:
            resumed_from = self._start(resume, config or {}, task)
        except BaseException:  # nothing half-started stays behind: threads, lock, hooks
            self.composition.remove()
            if self.store is not None:  # the run says what it said before
                self.store.set_meta(status=self._before["status"] or "created")
                self.store.close()
            _release(self._trainer_lock)
            raise
        if self.store is not None:  # this process records the run
            flusher = Flusher(self.store, workers, flush_interval, live_meta=self._live_meta,
                              keep_checkpoints=keep_checkpoints,
                              guard=None if on_diverge == "ignore" else (
                                  guard or DivergenceGuard()), give_up_s=store_timeout)
            poller = Poller(self.store, workers, self.knobs, poll_interval, flusher,
                            give_up_s=store_timeout)
            self._workers = Workers(flusher, poller)
            self._workers.start()
        _OPEN.add(self)
        branch_knobs = self.coordinator.share(self._take_branch_knobs) \
            if resumed_from is not None else None
        if branch_knobs:  # a "what if" branch: its different knobs apply before its first step
            self.apply_command(ValidCommand(None, "set", validate_command("set", branch_knobs),
                                            source="branch"))

    # --- the hot path ---------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float) -> None:
        """Record one optimizer step's loss, then apply pending knob changes at this boundary.

        Call it after ``optimizer.step()``. No host-device sync, no I/O, no lock.
        """
        used = self.composition  # what the update just taken used (see trainer.composition)
        if isinstance(loss, torch.Tensor):
            # A CPU loss is read now: a plain memory read, where a tensor kept until the
            # flusher reads it slows the training loop itself (its allocations no longer reuse
            # hot memory; measured with the fast loop of benchmarks/overhead.py, the training
            # thread's CPU a step: +0.8 µs keeping a row of floats, +11 µs keeping a row
            # holding loss.data). A device loss stays a tensor (reading it would wait for the
            # device): a copy of it, one device op queued after the one that made it, since
            # the tensor handed in may be overwritten before the flusher reads it
            # (torch.compile(mode="reduce-overhead") returns outputs in CUDA-graph memory that
            # the next replay reuses, and reading an overwritten one raises). A pinned CPU
            # loss, the target of a non_blocking copy that may not have landed yet, is kept as
            # it is (a copy now could read it before it lands). Pinned memory needs an
            # accelerator, so without one is_pinned() is not asked (it goes through torch's
            # dispatcher: ~2 µs a step in the fast loop, where the whole of step() is ~7).
            # .data is the tensor without its autograd graph, like detach() at half the cost.
            is_cpu = loss.is_cpu
            if is_cpu and not (self._pinned_possible and loss.is_pinned()):
                try:
                    value = loss.item()
                except RuntimeError:  # item() checks the size itself: no call beforehand
                    if loss.numel() == 1:
                        raise
                    value = _number(loss)  # raises the one-line error of a missing reduction
            elif loss.numel() == 1:  # metadata, no sync
                value = loss.data if is_cpu else loss.data.clone()
            else:
                value = _number(loss)
        else:
            value = _number(loss)
        row = _new_row(MetricRow, (self.step_count, self.epoch, time.time(), value,
                                   used.used_lr, used.used_momentum, used.used_weight_decay,
                                   used.user_lr))
        if len(self._rows) < self._row_limit and self._folded is None:
            self._rows.append(row)
        else:
            self._fold(row)  # the store is slower than training: bounded memory, see _fold
        self.step_count += 1
        if self._awaiting:
            self._confirm_landings()
        if self._meet_every and self.step_count % self._meet_every == 0:
            self.coordinator.meet(self)  # all ranks, same step: mean loss, shared commands
        if self._next_replay == self.step_count:
            self._apply_replay()
        if self._commands:
            self._apply_commands()
        if self.composition.decaying:
            self.composition.set_position(self._epoch_position())
        if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
            self._checkpoint("periodic", gather=True)  # every rank at this step

    def _fold(self, row: MetricRow) -> None:
        """Keep memory bounded while the store is slower than training: rows beyond
        ``row_limit`` waiting for the flusher are folded into one row (the mean loss: a lazy
        tensor op for a device loss, no sync) until the queue drains; the folded steps are
        counted in the run's meta and marked by an event, so a gap is never silent."""
        loss = row.loss
        if isinstance(loss, torch.Tensor):  # a half-precision sum of 10^4 losses overflows
            loss = loss.float()
        folded = self._folded
        if folded is None:
            self._folded = [row, loss, 1]  # first row, loss sum, count
        else:
            folded[1], folded[2] = folded[1] + loss, folded[2] + 1
        if len(self._rows) < self._row_limit // 2:  # the store caught up
            self._unfold()

    def _unfold(self) -> None:
        first, total, count = self._folded
        self._folded = None
        self._rows.append(first._replace(loss=total / count))
        self.folded_steps += count - 1
        self.channels.outbox.append(WriteMeta({"folded_steps": self.folded_steps}))
        self.channels.outbox.append(WriteEvents([Event(
            first.step, time.time(), "folded",
            message=f"steps {first.step}–{first.step + count - 1} logged as one row (mean "
            f"loss): the run store was slower than training")]))

    def log_validation(self, loss: torch.Tensor | float | None = None, *, end_epoch: bool = True,
                       **metrics: torch.Tensor | float) -> None:
        """Record validation metrics (any names) at the current step; ends the epoch by default.

        Tensor values are converted off the training thread, so this does not sync either
        (except the loss when ``early_stop`` is on: one number per evaluation).
        """
        values = dict(metrics)
        if loss is not None:
            values = {"loss": loss, **values}
        wall = time.time()
        rows = [ValidationRow(self.step_count, self.epoch, wall, name,
                              _kept(v) if isinstance(v, torch.Tensor) else v)
                for name, v in values.items()]
        self.channels.outbox.append(WriteValidation(rows))
        if self._early_stopping and loss is not None:
            self._check_early_stop(float(loss))
        if self.on_validation is not None:
            self.on_validation(self, {name: float(v) for name, v in values.items()})
        if end_epoch:
            self.epoch += 1
            if self.composition.decaying:
                self.composition.set_position(self._epoch_position())

    # --- knobs ----------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The LR the next update will use, as far as known now (a requested change, else the
        user's current LR times Panda's factor; see :mod:`trainer.composition`)."""
        return self.composition.in_force()["lr"]

    def set(self, **knobs: float) -> None:
        """Change knobs from code, exactly like a command (validated, logged, marked)."""
        payload = validate_command("set", knobs)
        self.knobs.check(payload)
        self.apply_command(ValidCommand(None, "set", payload, source="api"))

    def stop(self, reason: str | None = None) -> None:
        """Stop the run from code at this step boundary, like a ``stop`` command (recorded,
        with ``reason`` in its event); the loop sees :attr:`should_stop`, the run ends
        ``stopped``."""
        self.apply_command(ValidCommand(None, "stop", validate_command(
            "stop", {} if reason is None else {"reason": reason}), source="api"))

    def rollback(self, step: int | None = None) -> None:
        """Roll back now, from code: to the newest checkpoint at or before ``step``, or without
        it Undo (the state before the latest knob change; after a divergence, the newest state
        before it; :class:`KnobError` when there is nothing to undo). Under DDP every rank must
        call it at the same step (rank 0's state is sent to all)."""
        self.apply_command(ValidCommand(None, "rollback", validate_command(
            "rollback", {} if step is None else {"step": step}), source="api"))

    def _apply_replay(self) -> None:
        while self._replay and self._replay[0][0] <= self.step_count:
            _, kind, payload = self._replay.popleft()
            self.apply_command(ValidCommand(None, kind, payload, source=self._replay_source))
        self._next_replay = self._replay[0][0] if self._replay else None

    def _apply_commands(self) -> None:
        commands = self._commands
        while commands:
            self.apply_command(commands.popleft())
        if self.paused and not self.should_stop:
            self._wait_while_paused()

    def apply_command(self, command: ValidCommand) -> None:
        """Apply one validated command now, at a step boundary; queue its record for the store.

        Commands that did not come through the store (``bs.set``, replay) are recorded as
        applied commands too, so the timeline and exports see every intervention. A knob
        change's verdict waits for the update that uses it (:meth:`_confirm_landings`).
        """
        if command.kind == FAILURE_KIND:  # a worker failed: training must not go on unaware
            raise WorkerError(command.payload["error"])
        step, wall = self.step_count, time.time()
        outbox = self.channels.outbox
        try:
            events = self._effects(command, step, wall)
        except KnobError as err:  # valid command, impossible now (e.g. nothing to roll back to)
            if command.id is None:
                raise
            outbox.append(WriteVerdicts([Verdict(command.id, "rejected", None, str(err))]))
            self._workers.nudge()
            return
        if events is not None:
            self._settle(command, step, events)

    def _settle(self, command: ValidCommand, step: int, events: list[Event], *,
                status: str = "applied", error: str | None = None) -> None:
        """Queue a command's verdict and events for the store, and have them written now (the
        sender waits for them, not for the next flush)."""
        outbox = self.channels.outbox
        if command.kind == GUARD_KIND:  # the guard's own news, not a command anyone sent
            outbox.append(WriteEvents(events))
        elif command.id is None:
            outbox.append(RecordCommand(command.kind, command.payload, command.source, step,
                                        events, status, error))
        else:
            outbox.append(WriteVerdicts([Verdict(command.id, status,
                                                 step if status == "applied" else None, error)],
                                        events))
        self._workers.nudge()

    def _effects(self, command: ValidCommand, step: int, wall: float) -> list[Event] | None:
        """Carry out one command; return its intervention events (None: a knob change, whose
        events wait for the update that uses it)."""
        kind, payload, command_id = command.kind, command.payload, command.id
        events: list[Event] = []
        if kind in ("set", "schedule") and self.diverged_at is not None:
            raise KnobError(f"the run diverged at step {self.diverged_at}: roll back first "
                            "(Undo, or panda rollback), then change the knobs")
        if kind in ("set", "schedule") and self.model is not None:
            # The state to roll back to if this goes wrong. A command from a meeting, a replay
            # or a resume lands on every rank at this step; bs.set() from code may not.
            self._checkpoint("intervention", gather=command.source != "api")
        if kind == "set":
            self._supersede(command, payload)
            # What the next update would have used without it (and without a change it
            # replaces, which no update ever used).
            before = self.composition.in_force(requested=False)
            landing = self.composition.request(payload)
            self._awaiting.append(_Awaiting(command, wall, {k: before[k] for k in payload},
                                            landing))
            return None
        if kind == "schedule":
            old_shape = self.schedule.shape
            self.composition.set_schedule(schedule_from(payload), self._epoch_position())
            events.append(Event(step, wall, "schedule", "schedule", None, None, command_id,
                                f"decay {old_shape} → {self.schedule.shape} at step {step}"))
        elif kind in ("pause", "resume") and self.paused == (kind == "pause"):
            raise KnobError(f"the run is already paused (since step {self._paused_at})"
                            if self.paused else "the run is not paused")
        elif kind in ("pause", "resume", "stop"):
            self.paused = kind == "pause"
            self._paused_at = step if self.paused else None
            if kind == "stop":
                self.should_stop = self._stopped_by_command = True
            if kind == "resume":
                self._workers.arm_guard(self.step_count)
            self.channels.outbox.append(WriteMeta({"status": "paused" if self.paused
                                                   else "running"}))
            note = f": {payload['reason']}" if payload.get("reason") else ""
            events.append(Event(step, wall, kind, command_id=command_id,
                                message=f"{kind} at step {step}{note}"))
        elif kind == "checkpoint":
            self._checkpoint("manual", pin=True, gather=True)  # a command: every rank, now
            events.append(Event(step, wall, "checkpoint", command_id=command_id,
                                message=f"pinned checkpoint at step {step}"))
        elif kind == "rollback" and "step" not in payload:  # Undo
            events.append(self._rollback_event(step, wall, command_id, undo=True))
        elif kind == "rollback":
            events.append(self._rollback_event(step, wall, command_id,
                                               at_or_before=payload["step"],
                                               keep_knobs=payload["knobs"] == "keep"))
        elif kind == GUARD_KIND:
            events.extend(self._handle_divergence(step, wall, payload))
        return events

    def _supersede(self, command: ValidCommand, payload: dict) -> None:
        """An earlier change to the same knobs that no update has used yet never will: this one
        replaces it before the next update. It ends as ``superseded`` (all its knobs replaced)."""
        for item in self._awaiting:
            requested = item.landing.requested
            if item.landing.update is not None or not set(requested) & set(payload):
                continue
            for name in set(requested) & set(payload):
                del requested[name]
            if not requested:
                by = f"command {command.id}" if command.id is not None else command.source
                self._settle(item.command, self.step_count, [], status="superseded",
                             error=f"replaced by {by} before any update used it")
        self._awaiting = [item for item in self._awaiting if item.landing.requested]

    def _confirm_landings(self) -> None:
        """Give each knob change its verdict from the update that used it (the row just
        logged): ``applied`` when that update used exactly the values asked for, else
        ``not holding`` with the reason. A change no update uses within NO_UPDATE_LIMIT steps
        does not hold either (``optimizer.step()`` never ran on this optimizer)."""
        waiting = []
        for item in self._awaiting:
            landing = item.landing
            if landing.update is None:
                item.boundaries += 1
                if item.boundaries < NO_UPDATE_LIMIT:
                    waiting.append(item)
                else:
                    self._settle(item.command, self.step_count, [], status="not holding",
                                 error=f"no optimizer update used it within {NO_UPDATE_LIMIT} "
                                 "steps: is step() called on the optimizer given to the "
                                 "Babysitter?")
                continue
            step = self.step_count - 1  # the row just logged is the update that used it
            wrong = [name for name, asked in landing.requested.items()
                     if not same(landing.used.get(name), asked, self.knobs.tolerance(name))]
            if wrong:
                name = wrong[0]
                self._settle(item.command, step, [], status="not holding", error=(
                    f"the update at step {step} used {name} {_fmt(landing.used.get(name))}, "
                    f"not {_fmt(landing.requested[name])}: something outside Panda writes it "
                    "after Panda's pre-step hook"))
                continue
            events = [Event(step, item.wall, "set", name, item.before[name], used,
                            item.command.id, f"{name} {_fmt(item.before[name])} → {_fmt(used)} "
                            f"at step {step}" + _source_note(item.command))
                      for name, used in landing.used.items()]
            self._settle(item.command, step, events)
        self._awaiting = waiting

    def _epoch_position(self) -> float:
        if self.steps_per_epoch:
            return self.step_count / self.steps_per_epoch
        return float(self.epoch)

    @property
    def schedule(self) -> Schedule:
        """Panda's own LR decay in force, on top of the user's (change it with a ``schedule``
        command)."""
        return self.composition.schedule

    def apply_schedule(self) -> None:
        """Move Panda's decay to the current position (for loops that move ``epoch``
        themselves, e.g. the Lightning callback without a batch count)."""
        self.composition.set_position(self._epoch_position())

    # --- pause / stop ---------------------------------------------------------------------------

    def _wait_while_paused(self) -> None:
        # Blocks the training thread on an Event: no CPU is burnt while paused.
        wake = self.channels.wake
        while self.paused and not self.should_stop and not self._closed:
            wake.wait(PAUSE_WAKE_S)
            wake.clear()
            while self._commands:
                self.apply_command(self._commands.popleft())

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, reason: str = "manual", *, pin: bool = False, **extra: Any) -> None:
        """Snapshot model, optimizer, knobs, step and RNG now; write it in the background.

        The snapshot is a CPU copy taken on the training thread (a sync on GPU, but only at
        checkpoint time); the file is written atomically by the flusher. Automatic reasons
        go to a bounded ring; ``pin=True`` keeps the file forever. Under DDP it holds rank 0's
        random state only (rank 0 may be the only rank calling it now, so nothing is
        gathered): a resume from it gives every rank rank 0's generators.
        """
        self._checkpoint(reason, pin=pin, gather=False, extra=extra)

    def _checkpoint(self, reason: str, *, pin: bool = False, gather: bool,
                    extra: dict[str, Any] | None = None) -> None:
        """:meth:`checkpoint`; with ``gather`` (only where every rank takes it at this step),
        under DDP every rank's generators go into it (see :mod:`trainer.distributed`)."""
        if self.model is None:
            raise ValueError("checkpoints need the model: Babysitter(..., model=model)")
        self.extra_state.update(extra or {})
        ranks_rng = self.coordinator.gather(rng_state) if gather and self._gather_rng else None
        if not self.coordinator.leader:
            return  # the leader's snapshots serve every rank (see Coordinator.share)
        state = checkpoint.snapshot(self.model, self.optimizer, {
            "step": self.step_count, "epoch": self.epoch, **self.composition.state(),
            "extra": dict(self.extra_state)}, ranks_rng)
        if not checkpoint.finite(state):  # never a state to go back to (see RollbackPoints)
            if not self._skipped_non_finite:
                self._skipped_non_finite = True
                log.warning("%s: not checkpointing step %d: non-finite parameters or "
                            "optimizer state", self.run_dir.name, self.step_count)
                self.channels.outbox.append(WriteEvents([Event(
                    self.step_count, time.time(), "checkpoint_skipped",
                    message=f"no checkpoint at step {self.step_count}: non-finite parameters "
                    "or optimizer state")]))
            return
        self._skipped_non_finite = False
        self._rollback_points.remember(state, before_change=reason == "intervention")
        self.channels.outbox.append(WriteCheckpoint(state, reason, pin))

    def _load_state(self, state: dict) -> int:
        """Put a checkpoint back into model, optimizer (incl. its knobs) and our knob state."""
        # Each rank's own generators where the snapshot gathered them; else the leader's CPU
        # generator on every rank, and its CUDA ones on the leader only (they are its own).
        coordinator = self.coordinator
        sitter = checkpoint.restore(state, self.model, self.optimizer, rank=coordinator.rank,
                                    world_size=coordinator.world_size)
        self.composition.load(sitter)
        self.extra_state = dict(sitter.get("extra", {}))
        return int(sitter["step"])

    def _restore(self) -> int | None:
        if self.model is None:
            raise ValueError("resume needs the model: Babysitter(..., model=model, resume=True)")
        def newest() -> dict | None:
            found = checkpoint_files.find(self.run_dir)
            return None if found is None else checkpoint.load(found.path)

        state = self.coordinator.share(newest)  # under DDP: rank 0's, on every rank
        if state is None:
            log.warning("no checkpoint in %s: starting from scratch", self.run_dir)
            return None
        self.step_count = self._load_state(state)
        self.epoch = state["babysitter"]["epoch"]
        if self.store is not None:
            # Steps logged after the checkpoint are trained again, so their rows are replaced.
            self.store.truncate_after(self.step_count)
        return self.step_count

    def _take_branch_knobs(self) -> dict | None:
        """A branch's different knobs (written by ``panda branch``), taken once."""
        knobs = self.store.meta().get("branch_knobs") if self.store is not None else None
        if knobs:
            self.store.set_meta(branch_knobs=None)
        return knobs

    # --- divergence, rollback, early stopping ---------------------------------------------------

    def _handle_divergence(self, step: int, wall: float, payload: dict) -> list[Event]:
        cause = payload["cause"]
        events = [Event(step, wall, "diverged", message=f"diverged: {cause}")]
        outbox = self.channels.outbox
        if self.on_diverge == "rollback" and self.model is not None:
            self.diverged_at = payload["first_bad_step"]
            try:  # undo the change that preceded the trouble, else go back to before it
                events.append(self._rollback_event(step, wall, None, undo=True))
            except KnobError as err:  # nothing to roll back to: wait for a person instead
                self.paused, self._paused_at = True, step
                outbox.append(WriteMeta({"status": "diverged", "diverged": payload}))
                return [*events, Event(step, wall, "rollback",
                                       message=f"automatic rollback impossible: {err}")]
            lr = self.lr
            new_lr = lr * RESCUE_LR_FACTOR
            events.append(Event(step, wall, "set", "lr", lr, new_lr, None,
                                f"lr {format_sci(lr)} → {format_sci(new_lr)} "
                                f"at step {step} (rescue)"))
            self.composition.request({"lr": new_lr})
            outbox.append(WriteMeta({"status": "running"}))
            self._workers.arm_guard(self.step_count)
        elif self.on_diverge == "stop":  # a result, not a wait (search trials): end the run
            self.should_stop = self._stopped_by_command = True
            outbox.append(WriteMeta({"diverged": payload}))
        else:
            self.paused, self._paused_at = True, step
            self.diverged_at = payload["first_bad_step"]
            outbox.append(WriteMeta({"status": "diverged", "diverged": payload}))
        return events

    def _rollback_event(self, step: int, wall: float, command_id: int | None, *,
                        at_or_before: int | None = None, undo: bool = False,
                        keep_knobs: bool = False) -> Event:
        """Restore a state: Undo's (:meth:`RollbackPoints.undo`) or the newest checkpoint at or
        before a step; return the event describing it.

        The step counter keeps counting up (rows are never overwritten): the chart shows the
        blow-up, the rollback marker, and the recovery.
        """
        if self.model is None:
            raise KnobError("rollback needs the model: Babysitter(..., model=model)")
        before = self.composition.in_force()
        points = self._rollback_points
        target = self.coordinator.share(
            (lambda: points.undo(self.diverged_at)) if undo else
            (lambda: points.newest(at_or_before=at_or_before)))
        if target is None and undo:
            raise KnobError("nothing to undo: no knob change since the start or the last "
                            "rollback, and no divergence" if self.diverged_at is None else
                            f"no finite state before the divergence at step "
                            f"{self.diverged_at} to roll back to")
        if target is None:
            raise KnobError(f"no checkpoint to roll back to at or before step {at_or_before}")
        chosen = self.composition.state()
        restored_step = self._load_state(target)
        if keep_knobs:  # the model goes back; the knobs a person chose since stay
            self.composition.load(chosen)
        self.diverged_at = None
        self._restored_at_update = self.composition.updates
        self._workers.arm_guard(self.step_count)
        self.channels.outbox.append(WriteMeta({"status": "paused" if self.paused
                                               else "running"}))
        for item in self._awaiting:  # changes no update used yet: the rollback undid them
            if item.landing.update is None:
                self._settle(item.command, step, [], status="not holding", error=(
                    f"undone by the rollback at step {step} before any update used it"))
        self._awaiting = [item for item in self._awaiting if item.landing.update is not None]
        knobs = (f"knobs kept: lr {format_sci(self.lr)}" if keep_knobs else
                 f"knobs as at step {restored_step}: "
                 f"{_knob_changes(before, self.composition.in_force())}")
        # knob "step": old → new is the step rolled back from → the checkpoint's step, which
        # a replay needs to do the same (trainer.export).
        return Event(step, wall, "rollback", "step", step, restored_step, command_id,
                     f"rolled back to the checkpoint of step {restored_step} ({knobs})")

    def _check_early_stop(self, val_loss: float) -> None:
        verdict = self._early_stopping.update(val_loss)
        if verdict == "improved" and self.model is not None:
            self.checkpoint("best", pin=True)
        elif verdict == "stop":
            self.should_stop = True
            self.channels.outbox.append(WriteEvents([Event(
                self.step_count, time.time(), "early_stop",
                message=f"early stop: validation loss has not improved for {self.early_stop} "
                f"evaluations (best {self._early_stopping.best:.4g})")]))

    # --- run metadata ---------------------------------------------------------------------------

    def _record_start(self, config: dict, task: str | None, resumed_from: int | None,
                      later: list | None = None) -> None:
        meta = self.store.meta()
        now = time.time()
        values: dict[str, Any] = {
            "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
            "heartbeat": now, "trainer_started": now,  # a resumed run's silence counts from here
            "optimizer": self.knobs.name, "supported_knobs": list(self.knobs.supported),
            "knobs": self._knobs_now(), "schedule": self.schedule.to_dict(),
            "lr_composition": self.composition.describe(),
            "steps_per_epoch": self.steps_per_epoch, "step": self.step_count,
            "run_dir": str(self.run_dir.resolve()),
            # A resumed run is not ended and has not failed: the last end's time and reason go
            # (else the page's elapsed time stood still and an old failure was shown).
            "ended": None, "error": None}
        if "created" not in meta:
            values.update(name=self.run_dir.name, created=now)
        if config:
            values["config"] = config
        if task:
            values["task"] = task
        group = self.coordinator.describe()
        if group is not None:
            values["distributed"] = group
        self.store.set_meta(**values)
        if resumed_from is not None:
            message = f"resumed from the checkpoint of step {resumed_from}"
            if later:
                changes = ", ".join(f"{c.kind} {_describe(c.payload)} at step {c.step}"
                                    for c in later)
                message += (f"; with its own knobs (--checkpoint-knobs): dropped {changes}"
                            if self.checkpoint_knobs else f"; re-applying {changes}")
            self.store.add_events([Event(resumed_from, now, "restart", message=message)])

    def _start(self, resume: bool, config: dict, task: str | None) -> int | None:
        """Restore a checkpoint when resuming and record the start; the step resumed from.

        A resume re-applies, at their steps, the knob changes a person made after the
        checkpoint (they are in the store, the checkpoint predates them), unless
        ``checkpoint_knobs``: then the checkpoint's knobs stand and the changes are dropped.
        """
        later = self.coordinator.share(self._later_changes) if resume else []
        resumed_from = self._restore() if resume else None
        self.composition.set_position(self._epoch_position())
        later = [] if resumed_from is None else [c for c in later if c.step >= resumed_from]
        if self.store is not None:
            self._record_start(config, task, resumed_from, later)
        if later and not self.checkpoint_knobs:
            self._replay = deque(sorted([*self._replay, *(
                TimedCommand(c.step, c.kind, c.payload) for c in later)], key=lambda c: c.step))
            self._next_replay = self._replay[0].step
            self._replay_source = "resume"
            if self._next_replay <= self.step_count:  # a change at the checkpoint's own step
                self._apply_replay()
        return resumed_from

    def _later_changes(self) -> list[TimedCommand]:
        """Every knob change recorded in the store (set, schedule), in order."""
        if self.store is None:
            return []
        return replay_commands({"timeline": build_timeline(self.store, ("set", "schedule"))})

    def _claim(self) -> Any:
        """Make this process the run's only trainer (a lock file next to SQLite, a lease in
        the store either way); a live trainer already on it raises RunBusy naming it, before
        anything is changed. Taking over from one that died is recorded."""
        lock = self.store.lock_trainer()
        try:
            self._before = self.store.claim(os.getpid(), socket.gethostname())
        except BaseException:
            _release(lock)
            raise
        stale = self._before
        if stale["status"] in RUNNING_STATES and stale["pid"] is not None:
            message = (f"took over from pid {stale['pid']} on {stale['host']}, which had "
                       "stopped without closing the run")
            log.warning("%s: %s", self.run_dir.name, message)
            self.store.add_events([Event(self.step_count, time.time(), "takeover",
                                         message=message)])
        return lock

    def _live_meta(self) -> dict[str, Any]:
        """What the flusher writes with every batch (read from the flusher thread)."""
        return {"heartbeat": time.time(), "step": self.step_count, "epoch": self.epoch,
                "knobs": self._knobs_now(), "schedule": self.schedule.to_dict(),
                "lr_composition": self.composition.describe()}

    def _knobs_now(self) -> dict[str, float | None]:
        """The knobs as ``status`` reports them: what the last update used (before any update
        since the start or a rollback, what the next one will)."""
        composition = self.composition
        if composition.updates > self._restored_at_update:
            return composition.last_used()
        return composition.in_force(requested=False)  # none since the start or a rollback

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self, status: str | None = None, error: str | None = None) -> None:
        """Flush everything, write a final checkpoint (if a model is known) and the status."""
        if self._closed:
            return
        self._closed = True
        try:
            self._end_training(status)
        finally:
            self.coordinator.retire()  # no collective after this: the process may exit now
        final = status or ("stopped" if self._stopped_by_command else "finished")
        self.final_status = final
        meta = {"status": final, "ended": time.time()}
        if error:
            meta["error"] = error
        self.channels.outbox.append(WriteMeta(meta))
        self._workers.stop()   # the flusher drains rows and outbox, then joins
        if self.store is not None:
            self.store.close()
        _release(self._trainer_lock)

    def _end_training(self, status: str | None) -> None:
        """The training side of :meth:`close`: the last meeting, pending changes settled, the
        user's values back, the final checkpoint."""
        _OPEN.discard(self)
        self.channels.wake.set()
        # The last, not yet averaged losses under DDP (a normal end: every rank at this step).
        self.coordinator.close(self, collective=status is None)
        self._workers.stop_polling()
        if self._folded is not None:
            self._unfold()
        for item in self._awaiting:
            self._settle(item.command, self.step_count, [], status="not holding",
                         error="the run ended before an update used it")
        self._awaiting = []
        self.composition.remove()  # the user's values are back in the param groups
        if self.model is not None and status != "failed":
            # A normal end (no status) is at the same step on every rank, as close() above.
            self._checkpoint("final", gather=status is None)

    def __enter__(self) -> Babysitter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close()
        else:
            self.close(*ended_by(exc))
        return False


__all__ = ["Babysitter", "KnobError"]
