"""``search()``: caviar mode from Python, and the steps ``panda search`` shares with it.

    from trainer.search import search

    def objective(settings, babysitter):
        model = make_model(hidden=settings["hidden"])
        opt = torch.optim.SGD(model.parameters(), lr=settings["lr"],
                              momentum=settings["momentum"],
                              weight_decay=settings["weight_decay"])
        with babysitter(opt, model=model) as bs:      # the trial's run, ready to babysit
            for epoch in range(10):
                for x, y in loader(settings["batch_size"]):
                    ...; bs.step(loss)
                    if bs.should_stop: break         # pruned, diverged or stopped by a person
                if bs.should_stop: break
                bs.log_validation(val_loss)          # reported to Optuna for pruning

    result = search(objective, {"lr": (1e-4, 1), "beta": (0.9, 0.999)}, trials=30,
                    epochs=10, study="mnist-lr")
    result["best"]["settings"]

``search()`` runs its trials in this process (``parallel`` threads); ``panda search`` runs a
built-in task's trials in ``--parallel`` processes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.search import study as studies
from trainer.search.config import SearchConfig
from trainer.search.space import DEFAULT_LR, SearchSpace
from trainer.search.worker import Objective, work
from trainer.store.address import store_url

log = logging.getLogger(__name__)

LR_TEST_SPAN = 100.0  # an LR range seeded by the range test spans [max stable / 100, max stable]


def lr_range_from_test(cfg: SearchConfig) -> tuple[tuple[float, float], dict[str, Any]]:
    """The LR range for a built-in task when none is given: ``[max_stable_lr / 100,
    max_stable_lr]`` from an LR range test (:mod:`trainer.lr_range`), so a first search starts
    in the right decades; returns the range and the record of why."""
    from trainer.lr_range.job import lr_find_for_task

    space = cfg.space
    box = space.outer_box()
    # The least momentum searched: its limit is the highest; trials with a larger β near the
    # top of the range may diverge, which is a result (recorded, the study goes on).
    momentum = 1.0 - box["one_minus_beta"][1] if "one_minus_beta" in box else float(space.beta)
    batch = sorted(space.batch_size)[(len(space.batch_size) - 1) // 2]
    result = lr_find_for_task(cfg.task, seed=cfg.seed, optimizer=cfg.optimizer,
                              momentum=momentum, batch_size=batch, suggest=False)
    limit = result.max_stable_lr
    where = f"LR range test on {cfg.task} (β {momentum:.4g}, batch {batch})"
    if limit is None or not math.isfinite(limit):
        return DEFAULT_LR, {"low": DEFAULT_LR[0], "high": DEFAULT_LR[1], "max_stable_lr": None,
                            "why": f"{where} found no limit: the default 10^U(−4, 0)"}
    lr = (float(f"{limit / LR_TEST_SPAN:.4g}"), float(f"{limit:.4g}"))
    return lr, {"low": lr[0], "high": lr[1], "max_stable_lr": limit,
                "why": f"{where}: max stable LR {limit:.3g}, so LR in [{lr[0]:.3g}, {lr[1]:.3g}]"}


def prepare(cfg: SearchConfig, root: str | os.PathLike, *, sampler=None):
    """Validate ``cfg``, fill the LR range, create the study and enqueue round 1. Returns the
    config as stored and the study. Raises ValueError (one line) and starts nothing on bad
    input or a taken study name."""
    cfg = cfg.validate()
    studies.check_free(root, cfg.study)  # before spending a range test on it
    lr_note = None
    if cfg.space.lr is None:
        if cfg.task is None:
            cfg = replace(cfg, space=cfg.space.with_lr(DEFAULT_LR))
        else:
            lr, lr_note = lr_range_from_test(cfg)
            cfg = replace(cfg, space=cfg.space.with_lr(lr)).validate()  # e.g. a grid's size
    storage = studies.open_storage(root, cfg.study, create=True)
    study = studies.create(cfg, storage, lr_range=lr_note, sampler=sampler)
    return cfg, study


def search(objective: Objective | None = None, space: SearchSpace | dict | None = None, *,
           task: str | None = None, trials: int = 20, parallel: int = 1, rounds: int = 1,
           sampler: Any = "random", prune: str = "hyperband", epochs: int = 10,
           optimizer: str = "sgd", seed: int = 0, train_seed: int | None = None,
           study: str | None = None,
           runs_dir: str | os.PathLike = "runs", store: str | None = None,
           step_delay: float = 0.0, top: float | None = None,
           margin: float | None = None) -> dict[str, Any]:
    """Search ``space`` with Optuna; every trial is a babysat Panda run. Returns the study's
    summary (:func:`trainer.search.study.summary`): counts per outcome, the rounds and the best
    trial's ``settings``.

    ``objective(settings, babysitter)`` trains one trial: ``settings`` holds ``lr, momentum,
    weight_decay, batch_size, hidden, decay``, and ``babysitter(optimizer, model=...)`` is a
    :class:`~trainer.Babysitter` for the trial's run (its ``log_validation`` reports to Optuna;
    ``should_stop`` turns true when the trial is pruned). Return the value to minimize, or
    nothing to minimize the best validation loss. Without ``objective``, a built-in ``task``
    is trained. ``sampler`` is ``"random"`` (default), ``"tpe"`` or an Optuna sampler;
    ``prune`` ``"hyperband"``, ``"median"`` or ``"none"``; ``epochs`` is the number of
    evaluations a trial makes (Hyperband's maximum resource). ``seed`` seeds the sampler and
    the built-in task's training, unless ``train_seed`` is given. ``store``: a PostgreSQL URL
    (default ``$PANDA_STORE``); else the study and runs are SQLite files under ``runs_dir``.
    """
    if objective is None and task is None:
        raise ValueError("give an objective function or a built-in task")
    given = {k: v for k, v in (("top", top), ("margin", margin)) if v is not None}
    cfg = SearchConfig(task=task if objective is None else None, trials=trials,
                       parallel=parallel, rounds=rounds,
                       sampler=sampler if isinstance(sampler, str) else "random", prune=prune,
                       epochs=epochs, optimizer=optimizer, seed=seed,
                       train_seed=train_seed, study=study,
                       step_delay=step_delay, space=_space(space), **given)
    url = store_url(store)
    root = url or str(runs_dir)
    custom = None if isinstance(sampler, str) else sampler
    cfg, created = prepare(cfg, root, sampler=custom)
    run_workers(cfg.study, root, runs_dir, url, cfg.parallel, objective=objective,
                sampler=custom)
    return studies.summary(created, root)


def _space(space: SearchSpace | dict | None) -> SearchSpace:
    if isinstance(space, SearchSpace):
        return space
    return SearchSpace.from_dict(space)


def run_workers(study: str, root: str | os.PathLike, runs_dir: str | os.PathLike,
                store: str | None, parallel: int, *, objective: Objective | None = None,
                sampler: Any = None) -> None:
    """``parallel`` workers in this process (threads); the first error is raised after all
    of them stopped."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    if parallel == 1:
        work(study, root, runs_dir, store, objective=objective, sampler=sampler)
        return
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            work(study, root, runs_dir, store, index=index, objective=objective,
                 sampler=sampler)
        except BaseException as err:  # reported below, on the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,), name=f"panda-search-{i}")
               for i in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
