"""A search worker: takes the study's waiting trials one at a time and trains each as a Panda run.

Every trial is an ordinary babysat run, ``<runs-dir>/<study>-<number>`` (its meta names its
study and trial), so the dashboard and ``panda set / pause / stop / rollback / branch / export``
work on it unchanged. The run's Babysitter reports each epoch's validation loss to Optuna
(``on_validation``) and stops the run when the pruner says so.

What ends a trial, and how Optuna records it (the reason is in the trial's ``reason``):

* it trains to its last epoch: COMPLETE, value = its best validation loss;
* the pruner stops it: PRUNED (``pruned``), ``pruned_at`` the epoch;
* it diverges (NaN / blow-up, seen by the Babysitter's guard, or a non-finite validation
  loss): PRUNED (``diverged``). Policy: search trials run with ``on_diverge="stop"``, so a
  diverging trial is a result and never waits paused for a person; its run is ``stopped`` with
  its checkpoints, and a person can still continue it by hand (``panda train --resume`` or
  ``panda branch``);
* a person stops it: PRUNED (``stopped``);
* its code raises: FAIL (``failed``), the study goes on;
* its worker dies or is interrupted: FAIL (``cut``), re-run by :func:`requeue_cut_trials`.

Honest results: every command a person sent to the trial's run is copied to the trial
(``interventions``); once a person changed its settings (``manual``), the pruner leaves it
alone (it is being babysat) and it no longer steers the next round or counts as the best
unbabysat trial.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from trainer.babysitter import Babysitter
from trainer.runner import TrainConfig, train
from trainer.search import study as studies
from trainer.search.config import SearchConfig, trial_run_name
from trainer.search.space import schedule_for
from trainer.store.address import child_env, store_for
from trainer.store.base import first_line
from trainer.tasks import DEFAULT_HIDDEN

log = logging.getLogger(__name__)

POLL_S = 0.5  # an idle worker (its round waits for other workers' trials) looks again this often
AUTOMATIC_SOURCES = ("api", "replay", "branch")  # commands no person sent
SETTING_KINDS = ("set", "schedule", "rollback")  # commands that change what a trial trains
LOG_DIR = "{}.logs"

# objective(settings, babysitter) -> float | None: a user's training function; ``babysitter``
# is Babysitter with the trial's run already filled in (call it with optimizer and model).
Objective = Callable[[dict[str, Any], Callable[..., Babysitter]], float | None]


class TrialFailed(Exception):
    """The trial's own code failed: recorded (FAIL, with the reason); the study goes on."""


class Surplus(Exception):
    """Another worker holds this trial's slot (two took the last one at once): not run."""


class TrialCut(Exception):
    """The trial was interrupted (its worker is being stopped): re-run on ``--resume``."""


class TrialReporter:
    """The trial's ``on_validation`` hook: report each epoch's validation loss to Optuna, stop
    the run when the pruner says so (or when the loss is not finite), and copy a person's
    commands to the trial."""

    def __init__(self, trial: optuna.Trial, pruner: str, epochs: int):
        self.trial, self.pruner, self.epochs = trial, pruner, epochs
        self.epoch = 0
        self.best = math.inf
        self.pruned: str | None = None
        self.diverged: str | None = None
        self.manual = False
        self.seen: list[tuple[int, str]] = []  # (id, status) of the commands copied so far

    def __call__(self, bs: Babysitter, metrics: dict[str, float]) -> None:
        self.epoch += 1
        self.record_interventions(bs.store)
        loss = metrics.get("loss")
        if loss is None:  # a loop that logs other metrics only: nothing to prune on
            return
        if not math.isfinite(loss):
            self.diverged = f"validation loss {loss} at epoch {self.epoch}"
            bs.stop(f"diverged: {self.diverged}")
            return
        self.best = min(self.best, loss)
        self.trial.set_user_attr("epoch", self.epoch)
        self.trial.set_user_attr("best", self.best)
        if self.manual:  # babysat by a person now: its curve no longer speaks for its draw
            return
        self.trial.report(loss, self.epoch)
        # At the last epoch the trial is done: pruning it then would only hide its result.
        if self.epoch < self.epochs and self.trial.should_prune():
            self.pruned = (f"pruned by {self.pruner} at epoch {self.epoch}: validation loss "
                           f"{loss:.4g}")
            bs.stop(self.pruned)

    def record_interventions(self, store) -> None:
        """Copy the commands a person sent to this trial's run onto the Optuna trial."""
        commands = [c for c in store.commands() if c.source not in AUTOMATIC_SOURCES]
        seen = [(c.id, c.status) for c in commands]
        if seen == self.seen:
            return
        self.seen = seen
        self.trial.set_user_attr("interventions", [
            {"kind": c.kind, "payload": c.payload, "source": c.source, "status": c.status,
             "step": c.applied_step} for c in commands])
        # Sent counts (its verdict may not be written yet): the trial is being babysat.
        if any(c.kind in SETTING_KINDS and c.status in ("pending", "applied")
               for c in commands):
            self.manual = True
            self.trial.set_user_attr("manual", True)


def person_stopped(store) -> bool:
    return any(c.kind == "stop" and c.status == "applied" and c.source not in AUTOMATIC_SOURCES
               for c in store.commands())


class _Babysitters:
    """``Babysitter`` with a trial's run filled in, for a user's objective; remembers what it
    made, to read the run's outcome afterwards."""

    def __init__(self, **defaults: Any):
        self.defaults = defaults
        self.made: list[Babysitter] = []

    def __call__(self, optimizer, **kwargs: Any) -> Babysitter:
        bs = Babysitter(optimizer, **{**self.defaults, **kwargs})
        self.made.append(bs)
        return bs


class Trials:
    """The objective Optuna calls: one trial, from its slot to its outcome."""

    def __init__(self, cfg: SearchConfig, runs_dir: str | os.PathLike, store: str | None,
                 objective: Objective | None = None):
        self.cfg, self.runs_dir, self.store = cfg, Path(runs_dir), store
        self.objective = objective

    def __call__(self, trial: optuna.Trial) -> float:
        # first of all, so that a dead worker's trial is re-run (requeue_cut_trials)
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        self._claim(trial)
        record = trial.study.user_attrs[studies.ROUND_ATTR.format(trial.user_attrs["round"])]
        settings = self.cfg.space.suggest(trial, record["box"])
        name = trial_run_name(self.cfg.study, trial.number)
        run_dir = self.runs_dir / name
        for key, value in (("run", name), ("settings", settings)):
            trial.set_user_attr(key, value)
        with store_for(run_dir, self.store, create=True) as run_store:
            run_store.set_meta(name=name, created=time.time(), status="starting",
                               run_dir=str(run_dir.resolve()), study=self.cfg.study,
                               trial=trial.number, search_settings=settings,
                               **({"task": self.cfg.task} if self.cfg.task else {}))
        reporter = TrialReporter(trial, self.cfg.prune, self.cfg.epochs)
        started = time.process_time()
        try:
            status, value = self._train(settings, run_dir, reporter)
        except KeyboardInterrupt:
            _end(trial, "cut", "interrupted")
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {first_line(err)}"
            _end(trial, "failed", reason)
            raise TrialFailed(reason) from err
        finally:  # what the trial cost: CPU seconds of this worker process meanwhile
            trial.set_user_attr("cpu_s", round(time.process_time() - started, 4))
        return self._outcome(trial, run_dir, reporter, status, value)

    def _claim(self, trial: optuna.Trial) -> None:
        """Run only a trial that holds its slot (see :func:`studies.slot_owner`)."""
        slot = trial.user_attrs.get("slot")
        owner = None if slot is None else studies.slot_owner(
            trial.study.get_trials(deepcopy=False), slot)
        if owner != trial.number:
            _end(trial, "surplus", "another worker took this trial's slot")
            raise Surplus(f"slot {slot} is held by trial {owner}")

    def _train(self, settings: dict[str, Any], run_dir: Path,
               reporter: TrialReporter) -> tuple[str, float | None]:
        cfg = self.cfg
        if self.objective is None:
            config = TrainConfig(
                task=cfg.task, optimizer=cfg.optimizer, lr=settings["lr"],
                momentum=settings["momentum"], weight_decay=settings["weight_decay"],
                batch_size=settings["batch_size"], hidden=settings["hidden"] or DEFAULT_HIDDEN,
                epochs=cfg.epochs, step_delay=cfg.step_delay,
                seed=cfg.seed if cfg.train_seed is None else cfg.train_seed,
                schedule=schedule_for(settings["decay"], cfg.epochs), on_diverge="stop")
            return train(config, run_dir, store=self.store, on_validation=reporter), None
        babysitters = _Babysitters(run_dir=run_dir, store=self.store, on_diverge="stop",
                                   on_validation=reporter, config=dict(settings),
                                   schedule=schedule_for(settings["decay"], cfg.epochs))
        value = self.objective(dict(settings), babysitters)
        if not babysitters.made:
            raise RuntimeError("the objective never made its Babysitter")
        bs = babysitters.made[-1]
        bs.close()  # no-op when the objective's `with` block closed it
        return bs.final_status or "finished", None if value is None else float(value)

    def _outcome(self, trial: optuna.Trial, run_dir: Path, reporter: TrialReporter,
                 status: str, value: float | None) -> float:
        with store_for(run_dir, self.store) as run_store:
            reporter.record_interventions(run_store)
            diverged = run_store.meta().get("diverged")
            stopped_by_person = person_stopped(run_store)
        if diverged or reporter.diverged:
            cause = (f"{diverged.get('cause')} (step {diverged.get('first_bad_step')})"
                     if diverged else reporter.diverged)
            _end(trial, "diverged", f"diverged: {cause}", pruned_at=reporter.epoch)
            raise optuna.TrialPruned(f"diverged: {cause}")
        if reporter.pruned:
            _end(trial, "pruned", reporter.pruned, pruned_at=reporter.epoch)
            raise optuna.TrialPruned(reporter.pruned)
        if status == "stopped" and stopped_by_person:
            reason = f"stopped by a person after epoch {reporter.epoch}"
            _end(trial, "stopped", reason, pruned_at=reporter.epoch)
            raise optuna.TrialPruned(reason)
        if status == "stopped":  # SIGTERM: the worker is being stopped
            _end(trial, "cut", "interrupted")
            raise TrialCut(f"trial {trial.number} interrupted")
        if value is None:
            value = reporter.best
        if not math.isfinite(value):
            reason = "no finite validation loss was reported"
            _end(trial, "failed", reason)
            raise TrialFailed(reason)
        _end(trial, "complete", None)
        return value


def _end(trial: optuna.Trial, outcome: str, reason: str | None, **extra: Any) -> None:
    trial.set_user_attr("outcome", outcome)
    if reason:
        trial.set_user_attr("reason", reason)
    for key, value in extra.items():
        trial.set_user_attr(key, value)


# --- the worker loop ------------------------------------------------------------------------------

def work(study_name: str, root: str | os.PathLike, runs_dir: str | os.PathLike,
         store: str | None, *, index: int = 0, objective: Objective | None = None,
         sampler: optuna.samplers.BaseSampler | None = None) -> int:
    """Run the study's trials until every round is done; returns how many this worker ran.

    ``root`` is the store root (runs directory or PostgreSQL URL) the study lives under.
    SIGTERM (or Ctrl-C) cuts the running trial and raises :class:`TrialCut` (or
    KeyboardInterrupt): ``--resume`` re-runs it.
    """
    storage = studies.open_storage(root, study_name)
    study, cfg = studies.load(study_name, storage, seed_offset=index, sampler=sampler)
    studies.register_worker(study)
    trials = Trials(cfg, runs_dir, store, objective)
    ran = 0
    while True:
        studies.requeue_cut_trials(study, storage)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.WAITING in states:
            study.optimize(trials, n_trials=1, catch=(TrialFailed, Surplus))
            ran += 1
            continue
        started = len(studies.round_plans(study))
        if started >= cfg.rounds:
            return ran
        if TrialState.RUNNING in states:  # the next round is built from this one's results
            time.sleep(POLL_S)
            continue
        studies.plan_round(study, started + 1)


def log_dir(runs_dir: str | os.PathLike, study: str) -> Path:
    return Path(runs_dir) / LOG_DIR.format(study)


def start_workers(study: str, runs_dir: str | os.PathLike, store: str | None,
                  parallel: int, *, first_index: int = 0) -> list[subprocess.Popen]:
    """``parallel`` worker processes on this machine (``panda search --worker``), their output
    in ``<runs-dir>/<study>.logs/``; the store URL travels in their environment. Workers that
    join a running study take indices from ``first_index`` (their samplers' seeds differ)."""
    folder = log_dir(runs_dir, study)
    folder.mkdir(parents=True, exist_ok=True)
    procs = []
    for index in range(first_index, first_index + parallel):
        cmd = [sys.executable, "-m", "trainer.cli", "search", "--worker", study,
               "--worker-index", str(index), "--runs-dir", str(Path(runs_dir).resolve())]
        with open(folder / f"worker-{index}.log", "ab") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=child_env(store)))
    return procs

