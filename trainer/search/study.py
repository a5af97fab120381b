"""The Optuna study behind a search: where it lives, how it starts, its rounds and its trials.

Storage: beside Panda's runs. With SQLite runs the study is one file next to them,
``<runs-dir>/<study>.optuna.db`` (WAL mode and a long busy timeout, so a few worker processes
can share it: Optuna's docs advise a server database for heavy parallelism, and that is the
PostgreSQL store). With ``--store postgresql://…`` it is in that database, in a schema of its
own (``panda_optuna``), so ``panda search --join`` on another machine adds workers to it.

Trials are *slots*: each round enqueues exactly its share of the budget as waiting trials
(``study.enqueue_trial({}, user_attrs={"slot": …})``, empty parameters, so the sampler draws
them), and workers take waiting trials, which Optuna hands to exactly one worker each. A trial
cut by a dead worker (kill -9, a lost machine) is found by its worker's pid (same host) or its
Optuna heartbeat (elsewhere), failed, and enqueued again with its parameters and slot, so
``--resume`` re-runs exactly the cut trials and keeps every finished one.

A trial's story is in its user attributes: ``slot``, ``round``, ``run`` (its Panda run),
``settings``, ``worker``, ``epoch`` (reached), ``best`` (validation loss), ``outcome``
(complete, pruned, diverged, stopped, failed, cut, surplus), ``reason``, ``interventions`` and
``manual`` (a person changed its settings), ``rerun_of``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from trainer.search.config import SearchConfig
from trainer.search.rounds import Scored, first_plan, plan, split_budget
from trainer.search.space import LOG_PARAMS
from trainer.store.address import is_server_url, list_runs, shown
from trainer.store.base import StoreError, first_line, pid_alive

log = logging.getLogger(__name__)

CONFIG_ATTR = "panda_search"   # study user attribute: the SearchConfig, as a dict
LR_RANGE_ATTR = "lr_range"     # study user attribute: where the LR range came from
ROUND_ATTR = "round_{}"        # study user attribute per round: box, from_trials, why
WORKER_PREFIX = "worker:"   # study user attributes, one per worker process that ever ran:
WORKER_ATTR = WORKER_PREFIX + "{host}:{pid}"
STUDY_FILE = "{}.optuna.db"
OPTUNA_SCHEMA = "panda_optuna"
OPTUNA_SETUP_LOCK = -1  # second key of the advisory lock on setting up OPTUNA_SCHEMA (runs: ≥ 0)
HEARTBEAT_S = 5       # Optuna records a running trial's heartbeat this often
GRACE_S = 30          # ... and fails it (then re-runs it) when the heartbeat is this old
SQLITE_TIMEOUT_S = 60  # a worker waits this long for SQLite's write lock before failing
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudyError(ValueError):
    """A study that cannot be created or found, with a one-line reason."""


# --- storage ------------------------------------------------------------------------------------

def storage_url(root: str | os.PathLike, study: str) -> str:
    """The SQLAlchemy URL of ``study``'s storage under store root ``root`` (a runs directory,
    or Panda's PostgreSQL URL)."""
    if is_server_url(root):
        return "postgresql+psycopg://" + str(root).split("://", 1)[1]
    return f"sqlite:///{(Path(root) / STUDY_FILE.format(study)).resolve()}"


def shown_storage(root: str | os.PathLike, study: str) -> str:
    """Where the study lives, as a person may see it (a password hidden)."""
    if is_server_url(root):
        return f"{shown(root)} (schema {OPTUNA_SCHEMA})"
    return str(study_file(root, study))


def study_file(runs_dir: str | os.PathLike, study: str) -> Path:
    return Path(runs_dir) / STUDY_FILE.format(study)


def open_storage(root: str | os.PathLike, study: str, *, create: bool = False,
                 writer: bool = True) -> RDBStorage:
    """Optuna's storage for ``study`` under ``root``, with heartbeats (a dead worker's trial is
    found and re-run). SQLite: refuses a missing file unless ``create``; a ``writer`` (a
    worker, not the dashboard) takes SQLite's write lock at the start of every transaction
    (:func:`_immediate_transactions`)."""
    url = storage_url(root, study)
    setup: contextlib.AbstractContextManager = contextlib.nullcontext()
    if is_server_url(root):
        setup = _schema_setup(str(root))
        engine = {"pool_pre_ping": True,
                  "connect_args": {"options": f"-c search_path={OPTUNA_SCHEMA}"}}
    else:
        path = study_file(root, study)
        if not path.exists():
            if not create:
                raise StudyError(f"no study {study!r} in {root} (no {path.name})")
            _new_sqlite_file(path)
        engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        with setup, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Only the creator makes tables: a reader racing it would insert them twice.
            storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                 grace_period=GRACE_S, skip_table_creation=not create)
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        # no tables yet (a reader before any study), a server that cannot be reached
        raise StudyError(f"cannot open the study storage {shown_storage(root, study)}: "
                         f"{first_line(err)}") from None
    if writer and not is_server_url(root):
        _immediate_transactions(storage.engine)
    return storage


def _new_sqlite_file(path: Path) -> None:
    """Make the study file with Optuna's tables in a temporary file, then move it into place:
    a reader never finds a file without its tables. Then WAL mode, so readers (the dashboard)
    never block the workers' writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f"{path.name}.{os.getpid()}.draft")
    RDBStorage(f"sqlite:///{draft.resolve()}").engine.dispose()
    os.replace(draft, path)  # atomic; a concurrent creator's file is replaced by an equal one
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _immediate_transactions(engine) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE``.

    Optuna hands a waiting trial to one worker by reading its state and updating it in one
    transaction, with ``SELECT … FOR UPDATE``, which SQLite ignores; and Python's sqlite3
    starts the transaction only at the UPDATE. Two workers could then both take the same
    waiting trial (seen here: two processes training trial 0). Taking the write lock at BEGIN
    serializes the read and the update (SQLAlchemy's documented recipe for pysqlite:
    https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl).
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections opened before the hooks: closed, reopened with them


@contextlib.contextmanager
def _schema_setup(url: str):
    """Hold Panda's advisory lock for Optuna's schema while a storage is opened: Optuna creates
    its tables (the creator) and stamps its schema version (``alembic_version``, every opener
    when it is missing), and two processes doing either at once fail on PostgreSQL's catalog
    (``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``, seen here
    when a search started while a reader polled for its study). The lock ends with the
    connection (session-level)."""
    from trainer.store.postgres import LOCK_CLASS, connect

    try:
        conn = connect(url)
    except StoreError as err:
        raise StudyError(str(err)) from None
    with contextlib.closing(conn):
        try:
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, OPTUNA_SETUP_LOCK))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}")
        except Exception as err:  # e.g. no right to create a schema: one line, not a traceback
            raise StudyError(f"cannot set up the study storage's schema {OPTUNA_SCHEMA}: "
                             f"{first_line(err)}") from None
        yield


def study_names(root: str | os.PathLike) -> list[str]:
    """The studies under store root ``root``, newest file first (SQLite) or by name."""
    if is_server_url(root):
        try:
            storage = open_storage(root, "")
            return sorted(optuna.get_all_study_names(storage))
        except Exception as err:  # no schema yet, server down: no studies to show
            log.debug("no studies in %s: %s", shown(root), err)
            return []
    files = sorted(Path(root).glob(STUDY_FILE.format("*")), key=lambda p: p.stat().st_mtime,
                   reverse=True) if Path(root).is_dir() else []
    return [p.name[: -len(STUDY_FILE.format(""))] for p in files]


def exists(storage: RDBStorage, name: str) -> bool:
    return name in optuna.get_all_study_names(storage)


def check_free(root: str | os.PathLike, name: str) -> None:
    """StudyError when store root ``root`` already holds a study called ``name``, or runs
    named like its trials (``<name>-<number>``: an earlier study of that name, deleted)."""
    pattern = re.compile(rf"{re.escape(name)}-\d+")
    if any(pattern.fullmatch(run["run"]) for run in list_runs(root)):
        raise StudyError(f"runs named {name}-<number> already exist in {shown(root)}: choose "
                         "another --study name")
    if not is_server_url(root) and not study_file(root, name).exists():
        return
    try:
        storage = open_storage(root, name, writer=False)
    except StudyError:  # PostgreSQL without Optuna's tables yet: no study at all
        return
    if exists(storage, name):
        raise StudyError(f"a study named {name!r} already exists: `panda search --resume "
                         f"{name}` continues it, --study NAME starts another")


# --- samplers and pruners (Optuna's own; none is written here) ------------------------------------

def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """Hyperband over epochs (Li et al. 2018): one unit of resource is one epoch, from 1 to the
    trial's ``epochs``, brackets at reduction factor 3."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs),
                                              reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


# --- creating and loading -------------------------------------------------------------------------

def create(cfg: SearchConfig, storage: RDBStorage, *, lr_range: dict | None = None,
           sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study for a validated ``cfg`` and enqueue round 1's trials; StudyError when a
    study of that name exists."""
    if exists(storage, cfg.study):
        raise StudyError(f"a study named {cfg.study!r} already exists: `panda search --resume "
                         f"{cfg.study}` continues it, --study NAME starts another")
    study = optuna.create_study(storage=storage, study_name=cfg.study, direction="minimize",
                                sampler=sampler or make_sampler(cfg.sampler, cfg.seed),
                                pruner=make_pruner(cfg.prune, cfg.epochs))
    study.set_user_attr(CONFIG_ATTR, cfg.to_dict())
    if lr_range:
        study.set_user_attr(LR_RANGE_ATTR, lr_range)
    plan_round(study, 1)
    return study


def load(name: str, storage: RDBStorage, *, seed_offset: int = 0,
         sampler: optuna.samplers.BaseSampler | None = None) -> tuple[optuna.Study, SearchConfig]:
    """The study ``name`` and its config, with this worker's sampler and the study's pruner.

    Each worker seeds its sampler from the study's seed, ``seed_offset`` (its index) and the
    number of trials already there: reproducible for a fresh search with one worker, and a
    resumed or joined worker does not draw the same settings again.
    """
    if not exists(storage, name):
        raise StudyError(f"no study named {name!r} in this store")
    summary = optuna.load_study(study_name=name, storage=storage)
    config = summary.user_attrs.get(CONFIG_ATTR)
    if config is None:
        raise StudyError(f"study {name!r} was not made by `panda search`")
    cfg = SearchConfig.from_dict(config)
    if sampler is None:
        started = sum(t.state != TrialState.WAITING for t in summary.trials)
        state = np.random.SeedSequence([cfg.seed, seed_offset, len(summary.trials), started])
        sampler = make_sampler(cfg.sampler, int(state.generate_state(1)[0]))
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                              pruner=make_pruner(cfg.prune, cfg.epochs))
    return study, cfg


def config_of(study: optuna.Study) -> SearchConfig:
    return SearchConfig.from_dict(study.user_attrs[CONFIG_ATTR])


# --- rounds ---------------------------------------------------------------------------------------

def round_plans(study: optuna.Study) -> list[dict[str, Any]]:
    """The plans of the rounds started so far, in order."""
    attrs = study.user_attrs
    plans, number = [], 1
    while ROUND_ATTR.format(number) in attrs:
        plans.append(attrs[ROUND_ATTR.format(number)])
        number += 1
    return plans


def plan_round(study: optuna.Study, number: int) -> dict[str, Any]:
    """Record round ``number``'s box (round 1: the whole space; later: around the best of the
    previous round) and enqueue its trials. Idempotent: two workers that do it at once
    compute the same box from the same finished trials, and a slot enqueued twice runs once
    (the second copy ends as ``surplus``)."""
    cfg = config_of(study)
    outer = cfg.space.outer_box()
    key = ROUND_ATTR.format(number)
    record = study.user_attrs.get(key)
    if record is None:
        if number == 1:
            record = first_plan(outer)
        else:
            previous = study.user_attrs[ROUND_ATTR.format(number - 1)]
            scored = [scored_trial(t) for t in study.get_trials(deepcopy=False)
                      if t.user_attrs.get("round") == number - 1 and counts_for_rounds(t)]
            record = plan(number, previous["box"], outer, scored, top=cfg.top,
                          margin=cfg.margin)
        study.set_user_attr(key, record)
        log.info("study %s round %d: %s", study.study_name, number, record["why"])
    taken = {t.user_attrs.get("slot") for t in study.get_trials(deepcopy=False)}
    size = split_budget(cfg.trials, cfg.rounds)[number - 1]
    # A grid fixes each slot's point; otherwise the sampler draws it (empty parameters).
    points = cfg.space.grid(size) if cfg.sampler == "grid" else [{}] * size
    for index, point in enumerate(points):
        slot = f"{number}.{index}"
        if slot not in taken:
            study.enqueue_trial(point, user_attrs={"slot": slot, "round": number})
    return record


def counts_for_rounds(trial: FrozenTrial) -> bool:
    """Whether a finished trial may steer the next round: it ran as sampled (no person changed
    its settings) and reached a validation loss."""
    return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and not trial.user_attrs.get("manual")
            and math.isfinite(trial.user_attrs.get("best", math.inf)))


def scored_trial(trial: FrozenTrial) -> Scored:
    params = dict(trial.params)
    return Scored(trial.number, trial.state == TrialState.COMPLETE,
                  float(trial.user_attrs.get("best", math.inf)),
                  {name: params[name] for name in LOG_PARAMS if name in params})


# --- trial bookkeeping ----------------------------------------------------------------------------

def is_cut(trial: FrozenTrial) -> bool:
    """Failed because its worker died (or was interrupted), not because of its settings."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get("outcome") in (None, "cut")


def is_surplus(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get("outcome") == "surplus"


def slot_owner(trials: list[FrozenTrial], slot: str) -> int | None:
    """The trial number that holds ``slot``: the lowest one that is neither cut nor surplus."""
    holders = [t.number for t in trials if t.user_attrs.get("slot") == slot
               and not is_cut(t) and not is_surplus(t)]
    return min(holders) if holders else None


def register_worker(study: optuna.Study) -> None:
    """Record this worker process in the study, so that a trial it took but was killed before
    it named its worker (a few milliseconds) can still be told apart from a live one's."""
    host, pid = socket.gethostname(), os.getpid()
    study.set_user_attr(WORKER_ATTR.format(host=host, pid=pid),
                        {"host": host, "pid": pid, "started": time.time()})


def every_other_worker_dead(study: optuna.Study) -> bool:
    """Whether every worker that ever ran this study, this process aside, is a dead process on
    this host (one elsewhere may be alive: its trials are left to Optuna's heartbeat)."""
    here, me = socket.gethostname(), os.getpid()
    workers = [value for key, value in study.user_attrs.items()
               if key.startswith(WORKER_PREFIX)]
    return all(w.get("host") == here and (w.get("pid") == me or not pid_alive(w.get("pid")))
               for w in workers)


def requeue_cut_trials(study: optuna.Study, storage: RDBStorage) -> list[int]:
    """Fail the running trials whose worker is gone and enqueue each cut trial once more, with
    its parameters, slot and round; returns the numbers of the trials re-queued.

    A worker on this host is gone when its process is (at once); one elsewhere when Optuna's
    heartbeat is older than :data:`GRACE_S` (``fail_stale_trials``).
    """
    study_id = storage.get_study_id_from_name(study.study_name)
    here = socket.gethostname()
    orphans_cut = every_other_worker_dead(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None and not orphans_cut:  # a live worker may be starting it right now
            continue
        worker = worker or {}
        if worker.get("host", here) == here and not pid_alive(worker.get("pid")):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_user_attr(trial_id, "outcome", "cut")
                storage.set_trial_user_attr(trial_id, "reason",
                                            f"its worker (pid {worker.get('pid')}) died")
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get("rerun_of") for t in trials}
    requeued = []
    for trial in trials:
        if is_cut(trial) and trial.number not in rerun and "slot" in trial.user_attrs:
            study.enqueue_trial(dict(trial.params), user_attrs={
                "slot": trial.user_attrs["slot"], "round": trial.user_attrs.get("round", 1),
                "rerun_of": trial.number})
            requeued.append(trial.number)
    if requeued:
        log.info("study %s: re-running cut trial(s) %s", study.study_name,
                 ", ".join(f"#{n}" for n in requeued))
    return requeued


def is_done(trials: list[FrozenTrial], cfg: SearchConfig) -> bool:
    """Whether every slot of every round has a finished trial."""
    by_number = {t.number: t for t in trials}
    for round_index, size in enumerate(split_budget(cfg.trials, cfg.rounds)):
        for index in range(size):
            owner = slot_owner(trials, f"{round_index + 1}.{index}")
            if owner is None or by_number[owner].state not in FINISHED:
                return False
    return True


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial with the lowest value among those that ran as sampled; if a person
    changed every complete trial, the best of those (its ``manual`` attribute says so)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    untouched = [t for t in complete if not t.user_attrs.get("manual")]
    pool = untouched or complete
    return min(pool, key=lambda t: t.value) if pool else None


def outcome_of(trial: FrozenTrial) -> str:
    """complete, pruned, diverged, stopped, failed, cut, surplus, running or waiting."""
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.state == TrialState.WAITING:
        return "waiting"
    if is_cut(trial):
        return "cut"
    return trial.user_attrs.get("outcome") or trial.state.name.lower()


def summary(study: optuna.Study, root: str | os.PathLike) -> dict[str, Any]:
    """What ``panda search`` reports: counts per outcome and the best trial's settings."""
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for trial in trials:
        if not is_surplus(trial):
            counts[outcome_of(trial)] = counts.get(outcome_of(trial), 0) + 1
    best = best_trial(trials)
    cfg = config_of(study)
    return {
        "study": study.study_name, "storage": shown_storage(root, study.study_name),
        "task": cfg.task, "trials": cfg.trials, "outcomes": counts,
        "done": is_done(trials, cfg), "rounds": round_plans(study),
        "best": None if best is None else {
            "trial": best.number, "run": best.user_attrs.get("run"), "value": best.value,
            "epoch": best.user_attrs.get("epoch"), "settings": best.user_attrs.get("settings"),
            "manual": bool(best.user_attrs.get("manual"))},
    }


def trial_records(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    """One plain dict per trial (surplus copies left out), for tables, plots and JSON: its
    settings, outcome and reason, best validation loss, epoch reached, its validation curve
    (``curve``: loss per epoch as reported to Optuna) and its Panda run."""
    records = []
    for trial in trials:
        if is_surplus(trial):
            continue
        attrs = trial.user_attrs
        settings = attrs.get("settings") or {}
        momentum = settings.get("momentum")
        curve = trial.intermediate_values
        best = attrs.get("best")
        records.append({
            "trial": trial.number, "round": attrs.get("round"), "outcome": outcome_of(trial),
            "run": attrs.get("run"), "lr": settings.get("lr"), "momentum": momentum,
            "one_minus_beta": None if momentum is None else 1.0 - momentum,
            "weight_decay": settings.get("weight_decay"),
            "batch_size": settings.get("batch_size"), "hidden": settings.get("hidden"),
            "decay": settings.get("decay"),
            "best": best if best is not None and math.isfinite(best) else None,
            "epoch": attrs.get("epoch", 0), "pruned_at": attrs.get("pruned_at"),
            "reason": attrs.get("reason"), "manual": bool(attrs.get("manual")),
            "interventions": len(attrs.get("interventions") or []),
            "rerun_of": attrs.get("rerun_of"),
            "curve": [curve[k] for k in sorted(curve)]})
    return records
