"""``panda train``: run a built-in task under a Babysitter, in this process or in the background.

The loop is deliberately plain (nanoGPT style): the data order of every epoch depends only on
``(seed, epoch)``, so a resumed run skips exactly the batches it already trained on, and with the
RNG restored from the checkpoint it continues as if it had never been interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from trainer.babysitter import ON_DIVERGE, Babysitter
from trainer.knobs import KNOBS
from trainer.optim import OPTIMIZERS, make_optimizer
from trainer.store.address import store_for
from trainer.tasks import TASK_NAMES, Task, make_task

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a built-in training run. Defaults follow the literature."""

    task: str = "digits"        # digits | spirals | quadratic
    optimizer: str = "sgd"      # sgd | adam | adamw; SGD is the well-understood baseline
    lr: float = 0.01            # a sensible start on normalized inputs (Ng, DLS course 2)
    momentum: float = 0.9       # β (β1 for Adam): averages over ~1/(1−β) = 10 steps
    weight_decay: float = 0.0   # regularization comes after LR and momentum in priority
    batch_size: int = 32        # small batches generalize well (Masters & Luschi 2018)
    hidden: int = 64            # units per hidden layer (digits, spirals; quadratic has none)
    epochs: int = 20
    seed: int = 0
    checkpoint_every: int = 200   # steps between rolling checkpoints
    step_delay: float = 0.0     # seconds slept per step: slows a demo to watching speed
    schedule: dict | None = None  # LR decay, see trainer.schedules.Schedule
    on_diverge: str = "pause"   # pause | rollback | ignore | stop (see Babysitter)
    early_stop: int | None = None  # stop after this many epochs without a better val loss

    def validate(self) -> TrainConfig:
        """Raise ValueError with a one-line reason for any value that cannot be trained."""
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_NAMES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        for name in KNOBS:
            KNOBS[name].validate(getattr(self, name))
        for name in ("batch_size", "epochs", "checkpoint_every", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.on_diverge not in ON_DIVERGE:
            raise ValueError(f"on_diverge must be one of {', '.join(ON_DIVERGE)}")
        if self.early_stop is not None and self.early_stop < 1:
            raise ValueError(f"early_stop must be at least 1 epoch, got {self.early_stop}")
        if not 0 <= self.step_delay <= 10:
            raise ValueError(f"step_delay must be in [0, 10] seconds, got {self.step_delay}")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def of_run(cls, meta: dict[str, Any]) -> TrainConfig:
        """The config a `panda train` run recorded in its store meta; ValueError for a run that
        `panda train` did not start (a user's own loop) or an unusable config."""
        config = meta.get("config")
        if not isinstance(config, dict) or "task" not in config:
            raise ValueError("it was not started by `panda train` (no built-in task in its "
                             "config)")
        try:
            return cls.from_dict(config).validate()
        except TypeError as err:
            raise ValueError(f"its config is unusable: {err}") from None

    def build(self) -> tuple[Task, torch.optim.Optimizer]:
        """The seeded task and its optimizer, as a run of this config starts them."""
        torch.manual_seed(self.seed)
        task = make_task(self.task, seed=self.seed, hidden=self.hidden)
        optimizer = make_optimizer(self.optimizer, task.model.parameters(), lr=self.lr,
                                   momentum=self.momentum, weight_decay=self.weight_decay)
        return task, optimizer


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception: the Babysitter closes the run as ``stopped``."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          replay: list[tuple[int, str, dict]] | None = None, store: str | None = None,
          on_validation: Callable[[Babysitter, dict[str, float]], None] | None = None) -> str:
    """Train ``cfg`` into ``run_dir`` and return the final status.

    ``replay`` re-enacts a recorded timeline (see :mod:`trainer.export`) at its exact steps.
    ``store`` is a PostgreSQL URL for the run's metrics; ``on_validation`` is called after
    every epoch's evaluation (both: see :class:`Babysitter`; a search reports to Optuna there).

    SIGTERM stops the run cleanly (status ``stopped``, final checkpoint written).
    """
    cfg.validate()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading_is_main() else None
    try:
        return _train(cfg, run_dir, resume=resume, replay=replay, store=store,
                      on_validation=on_validation)
    except Terminated:  # a clean stop, not a crash: the Babysitter already closed the run
        log.info("SIGTERM: run %s stopped", run_dir)
        return "stopped"
    finally:
        if previous is not None:  # in-process callers get their own handler back
            signal.signal(signal.SIGTERM, previous)


def _train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool,
           replay: list[tuple[int, str, dict]] | None, store: str | None,
           on_validation: Callable[[Babysitter, dict[str, float]], None] | None = None) -> str:
    task, optimizer = cfg.build()
    steps_per_epoch = task.steps_per_epoch(cfg.batch_size)
    with Babysitter(optimizer, run_dir, model=task.model, config=asdict(cfg),
                    task=task.info["description"], steps_per_epoch=steps_per_epoch,
                    schedule=cfg.schedule, checkpoint_every=cfg.checkpoint_every,
                    resume=resume, replay=replay, on_diverge=cfg.on_diverge,
                    early_stop=cfg.early_stop, store=store, on_validation=on_validation) as bs:
        start_epoch, first_batch = divmod(bs.step_count, steps_per_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            bs.epoch = epoch
            start = first_batch if epoch == start_epoch else 0
            for x, y in task.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start):
                loss = task.loss_fn(task.model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bs.step(loss)
                if bs.should_stop:
                    break
                if cfg.step_delay:
                    time.sleep(cfg.step_delay)
            if bs.should_stop:
                break
            bs.log_validation(**_validation_metrics(task))
            if bs.should_stop:  # early stopping decides at validation time
                break
    return bs.final_status


def _validation_metrics(task) -> dict[str, float]:
    metrics = task.evaluate()
    if metrics:
        return metrics
    # No held-out split (quadratic): report the full-batch training loss, the quantity that
    # the closed-form analysis is about.
    with torch.no_grad():
        return {"loss": float(task.loss_fn(task.model(task.train_x), task.train_y))}


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stored_config(run_dir: str | os.PathLike, store: str | None = None) -> TrainConfig:
    """The TrainConfig a run was started with (for ``--resume``); ``store`` as in train()."""
    with store_for(run_dir, store) as run_store:
        meta = run_store.meta()
    try:
        return TrainConfig.of_run(meta)
    except ValueError as err:
        raise ValueError(f"cannot resume {run_dir} here: {err}") from None
