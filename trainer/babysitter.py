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
rest (see :mod:`trainer.sync`): a flusher turns buffered tensors into numbers and writes them in
batches about every 100 ms, and a poller reads new commands about every 50 ms, validates them
and hands them over. Knob changes are applied by the training thread between two steps, so a
step never sees half a change.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.knobs import KnobError, format_sci, validate_command
from trainer.optim import OptimizerKnobs
from trainer.schedules import Schedule, rebased, schedule_from
from trainer.store import RunStore, sanitize_run_name
from trainer.sync import Flusher, Poller

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.1   # metrics reach the store at most this late (kill -9 loses ≤ this)
POLL_INTERVAL_S = 0.05   # a command waits at most this long before the trainer sees it
PAUSE_WAKE_S = 0.5       # a paused trainer re-checks for stop/close at least this often
TINY_FACTOR = 1e-12      # a schedule factor below this cannot be divided by safely


class Babysitter:
    """Log a training run to a run store and apply live knob changes between steps.

    Args:
        optimizer: any ``torch.optim`` optimizer, any number of param groups.
        run_dir: the run's directory; ``run.db`` (and ``checkpoint.pt``) live there.
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
    """

    def __init__(self, optimizer: torch.optim.Optimizer, run_dir: str | os.PathLike = "runs/run",
                 *, model: torch.nn.Module | None = None, config: dict | None = None,
                 task: str | None = None, steps_per_epoch: int | None = None,
                 schedule: Schedule | dict | None = None, checkpoint_every: int | None = None,
                 resume: bool = False, replay: list[tuple[int, str, dict]] | None = None,
                 flush_interval: float = FLUSH_INTERVAL_S,
                 poll_interval: float = POLL_INTERVAL_S):
        self.run_dir = Path(run_dir)
        sanitize_run_name(self.run_dir.name)
        if checkpoint_every is not None and (model is None or checkpoint_every < 1):
            raise ValueError("checkpoint_every needs a model and a positive step count")
        self.optimizer, self.model = optimizer, model
        self.knobs = OptimizerKnobs(optimizer)
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint_every = checkpoint_every
        self.schedule = schedule_from(schedule or {})
        self._lr_ratios = [lr / self.knobs.lr() if self.knobs.lr() > 0 else 1.0
                           for lr in self.knobs.lrs()]
        self._base_lr = self.knobs.lr()
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
        self._replay = deque(sorted(replay or [], key=lambda c: c[0]))
        for _, kind, payload in self._replay:
            validate_command(kind, payload)
        self._next_replay = self._replay[0][0] if self._replay else None

        self.store = RunStore(self.run_dir, create=True)
        resumed_from = self._restore() if resume else None
        self._init_meta(config or {}, task, resumed_from)
        self._apply_schedule_lr()
        self._poller = Poller(self.store, self._pending, self._outbox, self.knobs,
                              poll_interval)
        self._flusher = Flusher(self.store, self._rows, self._outbox, flush_interval,
                                live_meta=self._live_meta)
        self._poller.start()
        self._flusher.start()

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
        if self._next_replay == self.step_count:
            self._apply_replay()
        if self._pending:
            self._apply_pending()
        if self.schedule.shape != "constant":
            self._apply_schedule_lr()
        if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
            self.checkpoint()

    def log_validation(self, loss: torch.Tensor | float | None = None, *, end_epoch: bool = True,
                       **metrics: torch.Tensor | float) -> None:
        """Record validation metrics (any names) at the current step; ends the epoch by default.

        Tensor values are converted off the training thread, so this does not sync either.
        """
        values = dict(metrics)
        if loss is not None:
            values = {"loss": loss, **values}
        wall = time.time()
        rows = [(self.step_count, self.epoch, wall, name,
                 v.detach() if isinstance(v, torch.Tensor) else v) for name, v in values.items()]
        self._outbox.append(("validation", rows))
        if end_epoch:
            self.epoch += 1
            if self.schedule.shape != "constant":
                self._apply_schedule_lr()

    # --- knobs ----------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.knobs.lr()

    def set(self, **knobs: float) -> None:
        """Change knobs from code, exactly like a command (validated, logged, marked)."""
        payload = validate_command("set", knobs)
        self.knobs.check(payload)
        self._apply("set", payload, command_id=None, source="api")

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
               source: str = "store") -> None:
        """Apply one validated command now, at a step boundary; queue its record for the store.

        Commands that did not come through the store (``bs.set``, replay) are recorded as
        applied commands too, so the timeline and exports see every intervention.
        """
        step, wall = self.step_count, time.time()
        events: list[tuple] = []
        if kind == "set":
            for name, new in payload.items():
                old = self.knobs.values()[name]
                self._set_knob(name, new)
                events.append((step, wall, "set", name, old, new, command_id,
                               f"{name} {format_sci(old)} → {format_sci(new)} at step {step}"))
        elif kind == "schedule":
            old_shape = self.schedule.shape
            self._base_lr = self.knobs.lr()   # the new shape continues from the current LR
            self.schedule = rebased(schedule_from(payload), self._epoch_position())
            self._apply_schedule_lr()
            events.append((step, wall, "schedule", "schedule", None, None, command_id,
                           f"decay {old_shape} → {self.schedule.shape} at step {step}"))
        elif kind in ("pause", "resume", "stop"):
            self.paused = kind == "pause"
            if kind == "stop":
                self.should_stop = self._stopped_by_command = True
            status = "paused" if self.paused else "running"
            self._outbox.append(("meta", {"status": status}))
            events.append((step, wall, kind, None, None, None, command_id,
                           f"{kind} at step {step}"))
        elif kind == "checkpoint":
            self.checkpoint()
            events.append((step, wall, "checkpoint", None, None, None, command_id,
                           f"checkpoint at step {step}"))
        if command_id is None:
            self._outbox.append(("record", (kind, payload, source, step, events)))
        else:
            self._outbox.append(("resolve", ([(command_id, "applied", step, None)], events)))

    def _set_knob(self, name: str, value: float) -> None:
        if name == "lr":
            factor = self.schedule.factor(self._epoch_position())
            self._base_lr = value / factor if factor > TINY_FACTOR else value
            self.knobs.write_lrs([value * r for r in self._lr_ratios])
        elif name == "momentum":
            self.knobs.set_momentum(value)
        else:
            self.knobs.set_weight_decay(value)

    def _epoch_position(self) -> float:
        if self.steps_per_epoch:
            return self.step_count / self.steps_per_epoch
        return float(self.epoch)

    def _apply_schedule_lr(self) -> None:
        lr = self._base_lr * self.schedule.factor(self._epoch_position())
        self.knobs.write_lrs([lr * r for r in self._lr_ratios])

    # --- pause / stop ---------------------------------------------------------------------------

    def _wait_while_paused(self) -> None:
        # Blocks the training thread on an Event: no CPU is burnt while paused.
        while self.paused and not self.should_stop and not self._closed:
            self._wake_event.wait(PAUSE_WAKE_S)
            self._wake_event.clear()
            while self._pending:
                command_id, kind, payload = self._pending.popleft()
                self._apply(kind, payload, command_id)

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, **extra: Any) -> None:
        """Snapshot model, optimizer, knobs, step and RNG now; write it in the background.

        The snapshot is a CPU copy taken on the training thread (a sync on GPU, but only at
        checkpoint time); the file is written atomically by the flusher.
        """
        if self.model is None:
            raise ValueError("checkpoints need the model: Babysitter(..., model=model)")
        self.extra_state.update(extra)
        state = checkpoint.snapshot(self.model, self.optimizer, {
            "step": self.step_count, "epoch": self.epoch, "base_lr": self._base_lr,
            "lr_ratios": self._lr_ratios, "schedule": self.schedule.to_dict(),
            "extra": dict(self.extra_state)})
        self._outbox.append(("checkpoint", state))

    def _restore(self) -> int | None:
        path = checkpoint.path_in(self.run_dir)
        if self.model is None:
            raise ValueError("resume needs the model: Babysitter(..., model=model, resume=True)")
        if not path.exists():
            log.warning("no checkpoint at %s: starting from scratch", path)
            return None
        state = checkpoint.load_into(path, self.model, self.optimizer)
        self.step_count, self.epoch = state["step"], state["epoch"]
        self._base_lr, self._lr_ratios = state["base_lr"], state["lr_ratios"]
        self.schedule = schedule_from(state["schedule"])
        self.extra_state = dict(state.get("extra", {}))
        # Steps logged after the checkpoint are trained again, so their rows are replaced.
        self.store.truncate_after(self.step_count)
        return self.step_count

    # --- run metadata ---------------------------------------------------------------------------

    def _init_meta(self, config: dict, task: str | None, resumed_from: int | None) -> None:
        meta = self.store.meta()
        now = time.time()
        values: dict[str, Any] = {
            "status": "running", "pid": os.getpid(), "heartbeat": now,
            "optimizer": self.knobs.name, "supported_knobs": list(self.knobs.supported),
            "knobs": self.knobs.values(), "schedule": self.schedule.to_dict(),
            "steps_per_epoch": self.steps_per_epoch, "step": self.step_count}
        if "created" not in meta:
            values.update(name=self.run_dir.name, created=now)
        if config:
            values["config"] = config
        if task:
            values["task"] = task
        self.store.set_meta(**values)
        if resumed_from is not None:
            self.store.add_events([(resumed_from, now, "resume", None, None, None, None,
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
        self._wake_event.set()
        self._poller.stop()
        if self.model is not None and status != "failed":
            self.checkpoint()
        final = status or ("stopped" if self._stopped_by_command else "finished")
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

    @property
    def _wake_event(self):
        return self._poller.wake


__all__ = ["Babysitter", "KnobError"]
