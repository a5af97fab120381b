"""``panda train``: run a built-in task under a Babysitter, in this process or in the background.

The loop is deliberately plain (nanoGPT style): the data order of every epoch depends only on
``(seed, epoch)``, so a resumed run skips exactly the batches it already trained on, and with the
RNG restored from the checkpoint it continues as if it had never been interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from trainer.babysitter import Babysitter
from trainer.config import TrainConfig
from trainer.export import TimedCommand
from trainer.optim import make_optimizer
from trainer.schedules import schedule_from
from trainer.task import Task
from trainer.tasks import make_task

log = logging.getLogger(__name__)


def build(cfg: TrainConfig) -> tuple[Task, torch.optim.Optimizer]:
    """The seeded task and its optimizer, as a run of ``cfg`` starts them (the runner, resume,
    branches and LR range tests all build them here)."""
    torch.manual_seed(cfg.seed)
    task = make_task(cfg.task, seed=cfg.seed, hidden=cfg.hidden)
    if task.threads:
        torch.set_num_threads(task.threads)
    optimizer = make_optimizer(cfg.optimizer, task.optim_params(), lr=cfg.lr,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return task, optimizer


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), turned into an exception: the Babysitter closes the run as
    ``stopped``; ``panda demo`` stops what it started."""


def raise_terminated(signum, frame):
    """A signal handler: the signal becomes :class:`Terminated` in the main thread."""
    raise Terminated(f"signal {signum}")


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          replay: list[TimedCommand] | None = None, store: str | None = None,
          checkpoint_knobs: bool = False,
          on_validation: Callable[[Babysitter, dict[str, float]], None] | None = None) -> str:
    """Train ``cfg`` into ``run_dir`` and return the final status.

    ``replay`` re-enacts a recorded timeline (see :mod:`trainer.export`) at its exact steps.
    ``store`` is a PostgreSQL URL for the run's metrics (see :class:`Babysitter`).

    SIGTERM stops the run cleanly (status ``stopped``, final checkpoint written).
    """
    cfg.validate()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if threading_is_main() else None
    try:
        return _train(cfg, run_dir, resume=resume, replay=replay, store=store,
                      checkpoint_knobs=checkpoint_knobs, on_validation=on_validation)
    except Terminated:  # a clean stop, not a crash: the Babysitter already closed the run
        log.info("SIGTERM: run %s stopped", run_dir)
        return "stopped"
    finally:
        if previous is not None:  # in-process callers get their own handler back
            signal.signal(signal.SIGTERM, previous)


def _train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool,
           replay: list[TimedCommand] | None, store: str | None,
           checkpoint_knobs: bool = False,
           on_validation: Callable[[Babysitter, dict[str, float]], None] | None = None) -> str:
    if replay is not None:
        # A replay re-enacts the recorded rescues at their steps; its own guard must not act
        # again (it could notice the same blow-up a step earlier or later, or pause forever).
        cfg = replace(cfg, on_diverge="ignore")
    task, optimizer = build(cfg)
    steps_per_epoch = task.steps_per_epoch(cfg.batch_size)
    # The run's LR schedule is this loop's own, written into the param groups before every
    # update as nanoGPT's train.py does (`lr = get_lr(it)`); Panda's live knobs compose on top
    # of it like on any user's schedule (trainer.composition).
    schedule = schedule_from(cfg.schedule or {})
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    with Babysitter(optimizer, run_dir, model=task.model, config=asdict(cfg),
                    task=task.info["description"], steps_per_epoch=steps_per_epoch,
                    checkpoint_every=cfg.checkpoint_every, resume=resume, replay=replay,
                    on_diverge=cfg.on_diverge, early_stop=cfg.early_stop, store=store,
                    checkpoint_knobs=checkpoint_knobs, on_validation=on_validation) as bs:
        start_epoch, first_batch = divmod(bs.step_count, steps_per_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            bs.epoch = epoch
            start = first_batch if epoch == start_epoch else 0
            for x, y in task.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start):
                if schedule.shape != "constant":
                    factor = schedule.factor(bs.step_count / steps_per_epoch)
                    for group, base in zip(optimizer.param_groups, base_lrs):
                        group["lr"] = base * factor
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
            _record_samples(task, bs)
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


def _record_samples(task: Task, bs: Babysitter) -> None:
    """Generated text (charlm) for the dashboard: results of kind ``sample``, seeded by step
    (at validation time, once an epoch: not the hot path)."""
    for sample in task.samples(seed=bs.step_count):
        bs.store.add_result("sample", {"step": bs.step_count, **sample})


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()
