"""Babysitter: the hook into any PyTorch training loop.

    with Babysitter(optimizer, run_dir="runs/mnist-1", model=model) as bs:
        for epoch in range(epochs):
            for x, y in loader:
                ...; optimizer.step()
                bs.step(loss)               # log, apply pending knobs, honour pause/stop
                if bs.should_stop: break
            bs.log_validation(val_loss, accuracy=acc)

The hot path (:meth:`Babysitter.step`) never waits on I/O or the GPU: it appends the detached
loss tensor to a deque and reads one attribute for pending commands. Two daemon threads do the
rest (see :mod:`trainer.workers`): a flusher turns buffered tensors into numbers and writes them in
batches about every 100 ms, and a poller reads new commands about every 50 ms, validates them
and hands them over. Knob changes are applied by the training thread between two steps, so a
step never sees half a change.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.distributed import DEFAULT_SYNC_EVERY, DistributedSync
from trainer.guard import DivergenceGuard, EarlyStopping
from trainer.knobs import KnobError, format_sci, validate_command
from trainer.optim import OptimizerKnobs, ScheduledLR
from trainer.rollback import RollbackPoints
from trainer.schedules import Schedule, schedule_from
from trainer.store.address import store_for, store_url
from trainer.store.base import sanitize_run_name
from trainer.workers import Flusher, Poller

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.1   # metrics reach the store at most this late (kill -9 loses ≤ this)
POLL_INTERVAL_S = 0.05   # a command waits at most this long before the trainer sees it
PAUSE_WAKE_S = 0.5       # a paused trainer re-checks for stop/close at least this often
ON_DIVERGE = ("pause", "rollback", "ignore", "stop")
RESCUE_LR_FACTOR = 0.5   # --on-diverge rollback halves the LR that diverged


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
        resume: continue from ``run_dir/checkpoint.pt`` (model, optimizer, knobs, step, RNG).
        replay: ``(step, kind, payload)`` commands to apply at exactly those step boundaries
            (see :func:`trainer.export.replay_commands`): a recorded session, re-enacted.
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
                 on_validation: Callable[[Babysitter, dict[str, float]], None] | None = None):
        self.run_dir = Path(run_dir)
        sanitize_run_name(self.run_dir.name)
        if checkpoint_every is not None and (model is None or checkpoint_every < 1):
            raise ValueError("checkpoint_every needs a model and a positive step count")
        if on_diverge not in ON_DIVERGE:
            raise ValueError(f"on_diverge must be one of {', '.join(ON_DIVERGE)}")
        self.on_diverge, self.early_stop = on_diverge, early_stop
        self.on_validation = on_validation
        self.keep_checkpoints = keep_checkpoints
        self.optimizer, self.model = optimizer, model
        self.knobs = OptimizerKnobs(optimizer)
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint_every = checkpoint_every
        self.lr_plan = ScheduledLR(self.knobs, schedule_from(schedule or {}))
        self.step_count = 0          # optimizer steps completed (the next row's step number)
        self.epoch = 0
        self.should_stop = False
        self.paused = False
        self.extra_state: dict[str, Any] = {}  # restored from a checkpoint on resume
        self._rows: deque = deque()         # (step, epoch, wall, loss, lr, momentum, wd)
        self._pending: deque = deque()      # validated commands, handed over by the poller
        self._outbox: deque = deque()       # (kind, payload) for the flusher: I/O off-thread
        self._closed = False
        self._stopped_by_command = False
        self.final_status: str | None = None  # set by close()
        self._wake = threading.Event()      # set when a command arrives (ends a pause's wait)
        self._rollback_points = RollbackPoints(self.run_dir)
        self._early_stopping = EarlyStopping(early_stop) if early_stop else None
        self._replay = deque(sorted(replay or [], key=lambda c: c[0]))
        for _, kind, payload in self._replay:
            validate_command(kind, payload)
        self._next_replay = self._replay[0][0] if self._replay else None

        self._dist = DistributedSync.detect(sync_every)  # None unless DDP with world size > 1
        url = store_url(store)
        self.store = (store_for(self.run_dir, url, create=True) if self._dist is None
                      else self._dist.open_store(self.run_dir, url))
        resumed_from = self._restore() if resume else None
        self._init_meta(config or {}, task, resumed_from)
        self.lr_plan.write(self._epoch_position())
        self._flusher = Flusher(self.store, self._rows, self._outbox, flush_interval,
                                live_meta=self._live_meta, keep_checkpoints=keep_checkpoints,
                                guard=None if on_diverge == "ignore" else (
                                    guard or DivergenceGuard()),
                                on_divergence=self._on_divergence)
        self._poller = Poller(self.store, self._pending, self._outbox, self.knobs,
                              poll_interval, self._wake, self._flusher)
        if self._dist is not None:
            self._dist.attach(self)  # rank 0: hand-overs via the meetings; others: no threads
        self._poller.start()
        self._flusher.start()
        branch_knobs = self.store.meta().get("branch_knobs") if resumed_from is not None else None
        if branch_knobs:  # a "what if" branch: its different knobs apply before its first step
            self.store.set_meta(branch_knobs=None)
            self._apply("set", validate_command("set", branch_knobs), None, source="branch")

    # --- the hot path ---------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float) -> None:
        """Record one optimizer step's loss, then apply pending knob changes at this boundary.

        Call it after ``optimizer.step()``. No host-device sync, no I/O, no lock.
        """
        knobs = self.knobs
        value = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
        self._rows.append((self.step_count, self.epoch, time.time(), value, knobs.lr(),
                           knobs.momentum(), knobs.weight_decay()))
        self.step_count += 1
        if self._dist is not None and self.step_count % self._dist.every == 0:
            self._dist.sync(self)  # all ranks, same step: mean loss, shared commands
        if self._next_replay == self.step_count:
            self._apply_replay()
        if self._pending:
            self._apply_pending()
        if self.lr_plan.active:
            self.lr_plan.write(self._epoch_position())
        if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
            self.checkpoint("periodic")

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
        rows = [(self.step_count, self.epoch, wall, name,
                 v.detach() if isinstance(v, torch.Tensor) else v) for name, v in values.items()]
        self._outbox.append(("validation", rows))
        if self._early_stopping and loss is not None:
            self._check_early_stop(float(loss))
        if self.on_validation is not None:
            self.on_validation(self, {name: float(v) for name, v in values.items()})
        if end_epoch:
            self.epoch += 1
            if self.lr_plan.active:
                self.lr_plan.write(self._epoch_position())

    # --- knobs ----------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.knobs.lr()

    def set(self, **knobs: float) -> None:
        """Change knobs from code, exactly like a command (validated, logged, marked)."""
        payload = validate_command("set", knobs)
        self.knobs.check(payload)
        self._apply("set", payload, command_id=None, source="api")

    def stop(self, reason: str | None = None) -> None:
        """Stop the run from code at this step boundary, like a ``stop`` command (recorded, with
        ``reason`` in its event); the loop sees :attr:`should_stop`, the run ends ``stopped``."""
        self._apply("stop", {}, command_id=None, source="api", note=reason)

    def rollback(self, step: int | None = None) -> None:
        """Restore the newest checkpoint (at or before ``step``) now, from code. Under DDP every
        rank must call it at the same step (rank 0's state is sent to all)."""
        self._apply("rollback", validate_command("rollback", {} if step is None else
                                                 {"step": step}), None, source="api")

    def _apply_replay(self) -> None:
        while self._replay and self._replay[0][0] == self.step_count:
            _, kind, payload = self._replay.popleft()
            self._apply(kind, payload, command_id=None, source="replay")
        self._next_replay = self._replay[0][0] if self._replay else None

    def _apply_pending(self) -> None:
        while self._pending:
            command_id, kind, payload = self._pending.popleft()
            self._apply(kind, payload, command_id)
        if self.paused and not self.should_stop:
            self._wait_while_paused()

    def _apply(self, kind: str, payload: dict, command_id: int | None,
               source: str = "store", note: str | None = None) -> None:
        """Apply one validated command now, at a step boundary; queue its record for the store.

        Commands that did not come through the store (``bs.set``, replay) are recorded as
        applied commands too, so the timeline and exports see every intervention.
        """
        step, wall = self.step_count, time.time()
        try:
            events = self._effects(kind, payload, command_id, step, wall)
        except KnobError as err:  # valid command, impossible now (e.g. nothing to roll back to)
            if command_id is None:
                raise
            self._outbox.append(("resolve", ([(command_id, "rejected", None, str(err))], [])))
            self._flusher.nudge()
            return
        if note:  # why it was done, in the event's message ("stop at step 90: pruned …")
            events = [(*event[:-1], f"{event[-1]}: {note}") for event in events]
        if kind == "diverged":  # the guard's own news, not a command anyone sent
            self._outbox.append(("events", events))
        elif command_id is None:
            self._outbox.append(("record", (kind, payload, source, step, events)))
        else:
            self._outbox.append(("resolve", ([(command_id, "applied", step, None)], events)))
        self._flusher.nudge()  # whoever sent it sees the verdict now, not at the next flush

    def _effects(self, kind: str, payload: dict, command_id: int | None, step: int,
                 wall: float) -> list[tuple]:
        """Carry out one command; return its intervention events."""
        events: list[tuple] = []
        if kind in ("set", "schedule") and self.model is not None:
            self.checkpoint("intervention")  # the state to roll back to if this goes wrong
        if kind == "set":
            for name, new in payload.items():
                old = self.knobs.values()[name]
                self._set_knob(name, new)
                events.append((step, wall, "set", name, old, new, command_id,
                               f"{name} {format_sci(old)} → {format_sci(new)} at step {step}"))
        elif kind == "schedule":
            old_shape = self.schedule.shape
            self.lr_plan.set_schedule(schedule_from(payload), self._epoch_position())
            events.append((step, wall, "schedule", "schedule", None, None, command_id,
                           f"decay {old_shape} → {self.schedule.shape} at step {step}"))
        elif kind in ("pause", "resume", "stop"):
            self.paused = kind == "pause"
            if kind == "stop":
                self.should_stop = self._stopped_by_command = True
            if kind == "resume":
                self._flusher.arm_guard(self.step_count)
            self._outbox.append(("meta", {"status": "paused" if self.paused else "running"}))
            events.append((step, wall, kind, None, None, None, command_id,
                           f"{kind} at step {step}"))
        elif kind == "checkpoint":
            self.checkpoint("manual", pin=True)
            events.append((step, wall, "checkpoint", None, None, None, command_id,
                           f"pinned checkpoint at step {step}"))
        elif kind == "rollback":
            events.append(self._rollback_event(step, wall, command_id,
                                               at_or_before=payload.get("step")))
        elif kind == "diverged":
            events.extend(self._handle_divergence(step, wall, payload))
        return events

    def _set_knob(self, name: str, value: float) -> None:
        if name == "lr":
            self.lr_plan.set_lr(value, self._epoch_position())
        elif name == "momentum":
            self.knobs.set_momentum(value)
        else:
            self.knobs.set_weight_decay(value)

    def _epoch_position(self) -> float:
        if self.steps_per_epoch:
            return self.step_count / self.steps_per_epoch
        return float(self.epoch)

    @property
    def schedule(self) -> Schedule:
        """The LR decay in force (change it with a ``schedule`` command)."""
        return self.lr_plan.schedule

    def apply_schedule(self) -> None:
        """Write the scheduled LR for the current position (for loops that move ``epoch``
        themselves, e.g. the Lightning callback without a batch count)."""
        self.lr_plan.write(self._epoch_position())

    # --- pause / stop ---------------------------------------------------------------------------

    def _wait_while_paused(self) -> None:
        # Blocks the training thread on an Event: no CPU is burnt while paused.
        while self.paused and not self.should_stop and not self._closed:
            self._wake.wait(PAUSE_WAKE_S)
            self._wake.clear()
            while self._pending:
                command_id, kind, payload = self._pending.popleft()
                self._apply(kind, payload, command_id)

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, reason: str = "manual", *, pin: bool = False, **extra: Any) -> None:
        """Snapshot model, optimizer, knobs, step and RNG now; write it in the background.

        The snapshot is a CPU copy taken on the training thread (a sync on GPU, but only at
        checkpoint time); the file is written atomically by the flusher. Automatic reasons
        go to a bounded ring; ``pin=True`` keeps the file forever.
        """
        if self.model is None:
            raise ValueError("checkpoints need the model: Babysitter(..., model=model)")
        self.extra_state.update(extra)
        if self._dist is not None and not self._dist.leader:
            return  # rank 0's snapshots serve every rank (see _leader_state)
        state = checkpoint.snapshot(self.model, self.optimizer, {
            "step": self.step_count, "epoch": self.epoch, **self.lr_plan.state(),
            "extra": dict(self.extra_state)})
        self._rollback_points.remember(state, before_change=reason == "intervention")
        self._outbox.append(("checkpoint", (state, reason, pin)))

    def _load_state(self, state: dict) -> int:
        """Put a checkpoint back into model, optimizer (incl. its knobs) and our knob state."""
        sitter = checkpoint.restore(state, self.model, self.optimizer)
        self.lr_plan.load(sitter)
        self.extra_state = dict(sitter.get("extra", {}))
        return int(sitter["step"])

    def _restore(self) -> int | None:
        if self.model is None:
            raise ValueError("resume needs the model: Babysitter(..., model=model, resume=True)")
        def newest() -> dict | None:
            found = checkpoint.find(self.run_dir)
            return None if found is None else checkpoint.load(found.path)

        state = self._leader_state(newest)
        if state is None:
            log.warning("no checkpoint in %s: starting from scratch", self.run_dir)
            return None
        self.step_count = self._load_state(state)
        self.epoch = state["babysitter"]["epoch"]
        # Steps logged after the checkpoint are trained again, so their rows are replaced.
        self.store.truncate_after(self.step_count)
        return self.step_count

    def _leader_state(self, load: Callable[[], dict | None]) -> dict | None:
        """``load()``'s state; under DDP, rank 0's sent to every rank, so all ranks restore the
        same state whatever their own disks hold (only rank 0 writes checkpoint files)."""
        if self._dist is None:
            return load()
        if not self._dist.leader:
            outcome = self._dist.share(None)
        else:
            try:
                outcome = self._dist.share(("ok", load()))
            except Exception as err:  # tell the other ranks, or they wait in the broadcast
                self._dist.share(("error", f"{type(err).__name__}: {err}"))
                raise
        if outcome[0] == "error":
            raise RuntimeError(f"rank 0 could not load the state to restore: {outcome[1]}")
        return outcome[1]

    # --- divergence, rollback, early stopping ---------------------------------------------------

    def _on_divergence(self, divergence) -> None:
        """Called on the flusher thread: hand the news to the training thread like a command."""
        self._pending.append((None, "diverged", {
            "first_bad_step": divergence.first_bad_step, "cause": divergence.cause}))
        self._wake.set()

    def _handle_divergence(self, step: int, wall: float, payload: dict) -> list[tuple]:
        cause = payload["cause"]
        events = [(step, wall, "diverged", None, None, None, None, f"diverged: {cause}")]
        if self.on_diverge == "rollback" and self.model is not None:
            try:
                events.append(self._rollback_event(step, wall, None,
                                                   before=payload["first_bad_step"]))
            except KnobError as err:  # nothing to roll back to: wait for a person instead
                self.paused = True
                self._outbox.append(("meta", {"status": "diverged", "diverged": payload}))
                return [*events, (step, wall, "rollback", None, None, None, None,
                                  f"automatic rollback impossible: {err}")]
            new_lr = self.knobs.lr() * RESCUE_LR_FACTOR
            events.append((step, wall, "set", "lr", self.knobs.lr(), new_lr, None,
                           f"lr {format_sci(self.knobs.lr())} → {format_sci(new_lr)} "
                           f"at step {step} (rescue)"))
            self._set_knob("lr", new_lr)
            self._outbox.append(("meta", {"status": "running"}))
            self._flusher.arm_guard(self.step_count)
        elif self.on_diverge == "stop":  # a result, not a wait (search trials): end the run
            self.should_stop = self._stopped_by_command = True
            self._outbox.append(("meta", {"diverged": payload}))
        else:
            self.paused = True
            self._outbox.append(("meta", {"status": "diverged", "diverged": payload}))
        return events

    def _rollback_event(self, step: int, wall: float, command_id: int | None, *,
                        before: int | None = None, at_or_before: int | None = None) -> tuple:
        """Restore the newest checkpoint matching the bound; return the event describing it.

        The step counter keeps counting up (rows are never overwritten): the chart shows the
        blow-up, the rollback marker, and the recovery.
        """
        if self.model is None:
            raise KnobError("rollback needs the model: Babysitter(..., model=model)")
        old_lr = self.knobs.lr()
        target = self._leader_state(lambda: self._rollback_points.target(
            before=before, at_or_before=at_or_before))
        if target is None:
            bound = before if before is not None else at_or_before
            raise KnobError("no checkpoint to roll back to" +
                            (f" at or before step {bound}" if bound is not None else ""))
        restored_step = self._load_state(target)
        self._flusher.arm_guard(self.step_count)
        self._outbox.append(("meta", {"status": "paused" if self.paused else "running"}))
        return (step, wall, "rollback", "lr", old_lr, self.knobs.lr(), command_id,
                f"rolled back to the checkpoint of step {restored_step} "
                f"(lr {format_sci(old_lr)} → {format_sci(self.knobs.lr())})")

    def _check_early_stop(self, val_loss: float) -> None:
        verdict = self._early_stopping.update(val_loss)
        if verdict == "improved" and self.model is not None:
            self.checkpoint("best", pin=True)
        elif verdict == "stop":
            self.should_stop = True
            self._outbox.append(("events", [(
                self.step_count, time.time(), "early_stop", None, None, None, None,
                f"early stop: validation loss has not improved for {self.early_stop} "
                f"evaluations (best {self._early_stopping.best:.4g})")]))

    # --- run metadata ---------------------------------------------------------------------------

    def _init_meta(self, config: dict, task: str | None, resumed_from: int | None) -> None:
        meta = self.store.meta()
        now = time.time()
        values: dict[str, Any] = {
            "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
            "heartbeat": now,
            "optimizer": self.knobs.name, "supported_knobs": list(self.knobs.supported),
            "knobs": self.knobs.values(), "schedule": self.schedule.to_dict(),
            "steps_per_epoch": self.steps_per_epoch, "step": self.step_count,
            "run_dir": str(self.run_dir.resolve())}
        if "created" not in meta:
            values.update(name=self.run_dir.name, created=now)
        if config:
            values["config"] = config
        if task:
            values["task"] = task
        self.store.set_meta(**values)
        if resumed_from is not None:
            self.store.add_events([(resumed_from, now, "restart", None, None, None, None,
                                    f"resumed from checkpoint at step {resumed_from}")])

    def _live_meta(self) -> dict[str, Any]:
        """What the flusher writes with every batch (read from the flusher thread)."""
        return {"heartbeat": time.time(), "step": self.step_count, "epoch": self.epoch,
                "knobs": self.knobs.values(), "schedule": self.schedule.to_dict()}

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self, status: str | None = None, error: str | None = None) -> None:
        """Flush everything, write a final checkpoint (if a model is known) and the status."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._dist is not None:  # the last, not yet averaged losses
            self._dist.close(self, collective=status is None)
        self._poller.stop()
        if self.model is not None and status != "failed":
            self.checkpoint("final")
        final = status or ("stopped" if self._stopped_by_command else "finished")
        self.final_status = final
        meta = {"status": final, "ended": time.time()}
        if error:
            meta["error"] = error
        self._outbox.append(("meta", meta))
        self._flusher.stop()   # drains rows and outbox, then joins
        self.store.close()

    def __enter__(self) -> Babysitter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("stopped")
        else:
            self.close("failed", error=f"{exc_type.__name__}: {exc}")
        return False


__all__ = ["Babysitter", "KnobError"]
