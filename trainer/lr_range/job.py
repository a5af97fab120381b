"""LR range tests beside a live run, or on a built-in task alone.

A range test on a run never touches the run's training process or files: it copies the run's
newest checkpoint (``checkpoint_files.find``) to a temporary directory, rebuilds the model and the
optimizer from the run's stored :class:`~trainer.config.TrainConfig`, loads the copy into them
and runs :func:`trainer.lr_range.finder.lr_find` on the task's training batches (same batch size) in
its own process, while the run goes on training. By default the curve is the loss on a fixed
set of training samples after each step, not the noisy loss of each mini-batch (see
:func:`check_options`). The only trace in the run is one row of its
``results`` table (kind ``lr_find``):

* ``running``: payload ``{"progress": 0..1, "pid", "checkpoint_step", "options", ...}``,
  updated about once per second;
* ``done``: ``LRFindResult.to_dict()`` plus ``checkpoint_step``, ``checkpoint_epoch``,
  ``options``, ``elapsed_s``;
* ``failed``: ``{"error": "one-line reason", ...}``.

A job process that dies without saying so (kill -9) leaves a ``running`` row behind; readers use
:func:`latest_lr_find` / :func:`effective_status`, which report such a row as failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer import checkpoint_files
from trainer.config import TrainConfig, config_values
from trainer.knobs import format_sci
from trainer.lr_range import options
from trainer.lr_range.suggestions import PROBE_RULES, RULES, is_flat
from trainer.ranges import KnobError
from trainer.store.address import child_env, is_server_url, open_store
from trainer.store.base import RunStore, pid_alive

RESULT_KIND = "lr_find"
# Beside a live run the question is what to continue with; on a fresh task, what to start with.
DEFAULT_OPTIONS = {"num_iter": 100, "start_lr": 1e-7, "end_lr": 10.0, "refine": True,
                   "measure": "train", "purpose": "continue"}
MEASURE_MAX_SAMPLES = 2048  # the fixed measurement set: the training set, or a seeded subset
PROGRESS_EVERY_S = 0.5      # at most this often a running job writes its progress
START_GRACE_S = 60.0        # a running row without a pid older than this: the job never started
COPY_ATTEMPTS = 3           # the checkpoint ring may prune the file we picked; pick again


class LRJobError(ValueError):
    """Bad input for a range test (unknown task, bad option, run that cannot do it)."""


# --- options and run checks -----------------------------------------------------------------------

def check_options(num_iter: Any = None, start_lr: Any = None, end_lr: Any = None,
                  refine: Any = None, measure: Any = None,
                  purpose: Any = None) -> dict[str, Any]:
    """Fill defaults and validate; return the options dict or raise :class:`LRJobError`.

    ``measure``: what the curve records after each training step. ``"train"`` (default): the
    loss on a fixed set of training samples (:data:`MEASURE_MAX_SAMPLES` at most). ``"batch"``:
    the loss of the mini-batch just trained on (Smith's original), which is cheaper but, once
    a run is past its first steeps, is dominated by batch-to-batch noise: the probes then cannot
    tell stable from unstable and the steepest-descent suggestion lands on noise.

    ``purpose``: what the suggestion is for, ``"continue"`` (default: the LR to go on with from
    the run's checkpoint) or ``"start"`` (the LR to start training with); see ``lr_find``.
    """
    opts = dict(DEFAULT_OPTIONS)
    given = {"num_iter": num_iter, "start_lr": start_lr, "end_lr": end_lr, "refine": refine,
             "measure": measure, "purpose": purpose}
    opts.update({k: v for k, v in given.items() if v is not None})
    try:
        opts = options.check(opts)
    except KnobError as err:
        raise LRJobError(str(err)) from None
    opts["refine"] = bool(opts["refine"])
    return opts


def _measurement_set(task, opts: dict[str, Any], seed: int):
    """``val_batches`` for :func:`lr_find`: None (mini-batch losses) or one fixed batch of
    training samples."""
    if opts["measure"] == "batch":
        return None
    x, y = task.train_x, task.train_y
    cap = task.measure_samples or MEASURE_MAX_SAMPLES  # a task may ask for fewer (charlm)
    if task.num_train > cap:
        import torch

        generator = torch.Generator().manual_seed(seed)
        idx = torch.randperm(task.num_train, generator=generator)[:cap]
        x, y = x[idx], y[idx]
    return [(x, y)]


def run_config(store: RunStore):
    """The run's :class:`TrainConfig`, or :class:`LRJobError` for a run `panda train` did not
    start (a user's own loop: Panda cannot rebuild its model, data or loss)."""
    meta = store.meta()
    name = meta.get("name", store.name)
    try:
        return TrainConfig.of_run(meta)
    except ValueError as err:
        raise LRJobError(f"run {name} cannot be rebuilt: {err}; Panda cannot rebuild a model "
                         "and data it did not create, so call trainer.lr_find(model, optimizer, "
                         "loss_fn, batches) in your own code") from None


def readiness(store: RunStore) -> str | None:
    """Why a range test cannot start on this run now, or None when it can."""
    try:
        cfg = run_config(store)
    except LRJobError as err:
        return str(err)
    host = store.meta().get("host")
    if not store.run_dir.is_dir() and host not in (None, socket.gethostname()):
        return (f"run {store.name} trains on {host}, which holds its checkpoints: start the "
                f"range test there (panda lr-find {store.name})")
    if checkpoint_files.find(store.run_dir) is None:
        return (f"run {store.name} has no checkpoint yet (it writes one every "
                f"{cfg.checkpoint_every} steps and at each epoch end)")
    running = latest_lr_find(store)
    if running is not None and running["status"] == "running":
        return f"an LR range test is already running (result {running['id']})"
    return None


# --- reading results ------------------------------------------------------------------------------


def effective_status(row: dict[str, Any], now: float | None = None) -> tuple[str, str | None]:
    """A results row's status, with a ``running`` row whose job died reported as failed."""
    status, payload = row["status"], row.get("payload") or {}
    if status != "running":
        return status, payload.get("error")
    pid = payload.get("pid")
    if pid is None:
        if (now or time.time()) - row["created"] > START_GRACE_S:
            return "failed", "the range test process never started"
        return status, None
    if not pid_alive(pid):
        return "failed", f"the range test process (pid {pid}) exited without a result"
    return status, None


def latest_lr_find(store: RunStore) -> dict[str, Any] | None:
    """The newest ``lr_find`` row with its effective status (and ``error``), or None."""
    rows = store.results(RESULT_KIND)
    if not rows:
        return None
    row = dict(rows[-1])
    row["status"], error = effective_status(row)
    if error and not row["payload"].get("error"):
        row["payload"] = {**row["payload"], "error": error}
    return row


# --- building the model ---------------------------------------------------------------------------

def _build(cfg, model_state=None, optimizer_state=None):
    """(task, optimizer) for ``cfg``, with checkpointed states loaded when given."""
    from trainer.runner import build  # torch: only where a model is built

    task, optimizer = build(cfg)
    if model_state is not None:
        task.model.load_state_dict(model_state)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return task, optimizer


def _copy_newest_checkpoint(run_dir: Path, into: Path):
    """Copy the run's newest checkpoint into ``into``; return (info, copy path)."""
    for _ in range(COPY_ATTEMPTS):
        found = checkpoint_files.find(run_dir)
        if found is None:
            raise LRJobError(f"run {run_dir.name} has no checkpoint yet; try again once it "
                             "has trained a little")
        target = into / found.path.name
        try:
            shutil.copyfile(found.path, target)
            return found, target
        except FileNotFoundError:
            continue  # pruned from the ring between find and copy: take the newer one
    raise RuntimeError(f"could not copy a checkpoint of {run_dir.name}: the ring kept changing")


class _Reporter:
    """Throttled progress writes into the results row."""

    def __init__(self, store: RunStore, result_id: int, base: dict[str, Any]):
        self.store, self.result_id, self.base = store, result_id, base
        self.last = 0.0

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        self.write(round(float(fraction), 4))

    def write(self, fraction: float) -> None:
        self.store.update_result(self.result_id, {**self.base, "progress": fraction},
                                 status="running")


# --- public API -----------------------------------------------------------------------------------

def lr_find_for_task(task_name: str, *, seed: int = 0, batch_size: int | None = None,
                     optimizer: str | None = None, momentum: float | None = None,
                     weight_decay: float | None = None,
                     num_iter: int | None = None, start_lr: float | None = None,
                     end_lr: float | None = None, refine: bool | None = None,
                     measure: str | None = None, purpose: str | None = None,
                     suggest: bool = True, progress: Callable[[float], None] | None = None):
    """Range test on a fresh built-in task (no run), with ``panda train``'s defaults for that
    task (optimizer, momentum, weight decay, batch size; see ``tasks.TASK_DEFAULTS``). The
    suggestion is for starting training (``purpose="start"``) unless asked otherwise;
    ``suggest=False`` wants the limit only (see :func:`~trainer.lr_range.finder.lr_find`).

    ``batch_size`` defaults to ``panda train``'s (32), except for ``quadratic``, whose default is
    the full batch: the setting its closed-form limit ``Task.max_stable_lr(momentum)`` describes.
    Returns an :class:`~trainer.lr_range.results.LRFindResult`.
    """
    from trainer.lr_range.finder import lr_find

    opts = check_options(num_iter, start_lr, end_lr, refine, measure, purpose or "start")
    try:
        cfg = TrainConfig(**config_values(task_name, optimizer=optimizer, momentum=momentum,
                                          weight_decay=weight_decay, seed=seed,
                                          batch_size=batch_size)).validate()
    except (TypeError, ValueError) as err:
        raise LRJobError(str(err)) from None
    task, opt = _build(cfg)
    size = batch_size or (task.num_train if task_name == "quadratic" else cfg.batch_size)
    return lr_find(task.model, opt, task.loss_fn,
                   lambda: task.batches(size, seed=seed, epoch=0),
                   val_batches=_measurement_set(task, opts, seed), start_lr=opts["start_lr"],
                   end_lr=opts["end_lr"], num_iter=opts["num_iter"], refine=opts["refine"],
                   purpose=opts["purpose"], suggest=suggest, progress=progress)


def run_lr_find_for_run(address: str | os.PathLike, result_id: int | None = None,
                        **options: Any) -> dict[str, Any]:
    """Range test from a run's newest checkpoint, in this process; return the stored payload.

    ``address`` is the run's directory, or its address in a PostgreSQL store
    (:func:`trainer.store.address.open_store`); the checkpoints must be on this host.

    With ``result_id`` (a ``running`` row made by :func:`start_lr_find_job`) that row is
    filled in; otherwise a new row is added. Bad input raises :class:`LRJobError` before any
    row is written (when ``result_id`` is None). A failure during the test marks the row
    ``failed`` with the reason and re-raises.
    """
    opts = check_options(**options)
    with open_store(address) as store:
        if result_id is None:
            reason = readiness(store)
            if reason:
                raise LRJobError(reason)
            result_id = store.add_result(RESULT_KIND, {"progress": 0.0, "options": opts,
                                                       "pid": os.getpid()}, status="running")
        base: dict[str, Any] = {"options": opts, "pid": os.getpid(), "started": time.time()}
        reporter = _Reporter(store, result_id, base)
        reporter.write(0.0)
        try:
            payload = _run(store, opts, base, reporter)
        except BaseException as err:
            reason = str(err) if isinstance(err, Exception) else f"interrupted ({err!r})"
            store.update_result(result_id, {**base, "error": reason or type(err).__name__},
                                status="failed")
            raise
        store.update_result(result_id, payload, status="done")
    return {"id": result_id, "status": "done", **payload}


def _run(store: RunStore, opts: dict, base: dict, reporter: _Reporter) -> dict[str, Any]:
    from trainer import checkpoint
    from trainer.lr_range.finder import lr_find

    cfg = run_config(store)
    with tempfile.TemporaryDirectory(prefix="panda-lr-find-") as tmp:
        found, copy = _copy_newest_checkpoint(store.run_dir, Path(tmp))
        state = checkpoint.load(copy)
    epoch = int(state["babysitter"].get("epoch", 0))
    task, optimizer = _build(cfg, state["model"], state["optimizer"])
    # The live run's LR now (knob factors and schedule included), what "continue" compares
    # with; the checkpointed optimizer holds the user's own value, without Panda's factor.
    current = store.summary().get("lr")
    base.update(checkpoint_step=found.step, checkpoint_epoch=epoch, batch_size=cfg.batch_size)
    reporter.write(0.0)
    started = time.monotonic()
    result = lr_find(task.model, optimizer, task.loss_fn,
                     lambda: task.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch),
                     val_batches=_measurement_set(task, opts, cfg.seed),
                     start_lr=opts["start_lr"], end_lr=opts["end_lr"],
                     num_iter=opts["num_iter"], refine=opts["refine"],
                     purpose=opts["purpose"],
                     current_lr=float(current) if current is not None else None,
                     progress=reporter)
    return {**result.to_dict(), **{k: v for k, v in base.items() if k != "pid"},
            "progress": 1.0, "elapsed_s": round(time.monotonic() - started, 3)}


def start_lr_find_job(address: str | os.PathLike, **options: Any) -> int:
    """Start a range test on a run in a detached process; return its results row id at once.

    Checks the run and options first (:class:`LRJobError`, nothing written). The job runs
    ``python -m trainer.cli lr-find RUN --job-id ID``, in its own session and at a lower
    CPU priority than the training, so it outlives the page or terminal that started it.
    A PostgreSQL URL reaches the job in its environment, so ``ps`` shows no password.
    """
    if not is_server_url(address):
        address = str(Path(address).resolve())
    opts = check_options(**options)
    with open_store(address) as store:
        reason = readiness(store)
        if reason:
            raise LRJobError(reason)
        result_id = store.add_result(RESULT_KIND, {"progress": 0.0, "options": opts},
                                     status="running")
        server = is_server_url(address)
        run, env = (store.name, child_env(store.url)) if server else (address, child_env(None))
    cmd = [sys.executable, "-m", "trainer.cli", "lr-find", run,
           "--job-id", str(result_id), "--num-iter", str(opts["num_iter"]),
           "--start-lr", repr(opts["start_lr"]), "--end-lr", repr(opts["end_lr"])]
    if not opts["refine"]:
        cmd.append("--no-refine")
    cmd += ["--measure", opts["measure"], "--purpose", opts["purpose"]]
    try:
        # No preexec_fn (unsafe in threaded callers such as Streamlit): the job lowers its own
        # priority in run_job.
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    except OSError as err:
        with open_store(address) as store:
            store.update_result(result_id, {"options": opts, "error": f"could not start the "
                                            f"range test: {err}"}, status="failed")
        raise
    return result_id


def run_job(address: str | os.PathLike, result_id: int, **options: Any) -> dict[str, Any]:
    """The detached job's body: fill in row ``result_id`` (which must be ``running``), at a
    lower CPU priority than the training it runs beside."""
    with contextlib.suppress(OSError):
        os.nice(10)
    with open_store(address) as store:
        rows = {row["id"]: row for row in store.results(RESULT_KIND)}
        name = store.name
    row = rows.get(result_id)
    if row is None or row["status"] != "running":
        raise LRJobError(f"no running lr_find result {result_id} in {name}")
    return run_lr_find_for_run(address, result_id=result_id, **options)


__all__ = ["RESULT_KIND", "LRJobError", "check_options", "curve_is_flat", "describe_result",
           "effective_status", "flat_note", "latest_lr_find", "lr_find_for_task", "readiness",
           "run_config", "run_job", "run_lr_find_for_run", "start_lr_find_job"]


def _float(value: Any) -> float:
    return float(value)  # stored numbers: floats, or "nan"/"inf" strings (results.py)


def curve_is_flat(payload: dict[str, Any]) -> bool:
    """Did the ramp say nothing about the LR? Stored with the result; computed from the curve
    for results stored before it was."""
    if payload.get("flat") is not None:
        return bool(payload["flat"])
    lrs, losses = payload.get("lrs") or [], payload.get("losses") or []
    try:
        return is_flat([_float(v) for v in lrs], [_float(v) for v in losses])
    except ValueError:
        return True


def flat_note(payload: dict[str, Any]) -> str | None:
    """Why the ramp's curve says little about the LR, for the CLI and the dashboard; None when
    it is not flat. A ramp that only rose until it diverged is flat too (a converged
    checkpoint), and a suggestion from the probes does not rest on the curve."""
    if not curve_is_flat(payload):
        return None
    what = ("the loss barely fell before the ramp diverged" if payload.get("diverged_at")
            is not None else "the loss barely changed over the whole ramp")
    rule = payload.get("suggestion_rule") or payload.get("suggestion_method")
    source = (" The suggestion comes from the probes, which trained at each LR."
              if rule in PROBE_RULES else "")
    return f"{what}, so the curve says little about the LR.{source}"


def describe_result(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """A finished test's numbers as ``(label, text)`` lines, for the CLI and the dashboard:
    the suggestion, the rule that produced it and what it is for, the limit, the stop."""
    rule = payload.get("suggestion_rule") or payload.get("suggestion_method")
    if payload.get("suggested_lr") is not None:
        low, high = payload["suggestion_range"]
        suggestion = (f"{format_sci(_float(payload['suggested_lr']))} "
                      f"({rule}; range {format_sci(_float(low))} – "
                      f"{format_sci(_float(high))})")
    else:
        suggestion = f"none: {payload.get('suggestion_reason')}"
    lines = [("suggested LR", suggestion)]
    if rule in RULES:
        why = payload.get("suggestion_reason")
        lines.append(("rule", f"{rule}: {RULES[rule]}" + (f" ({why})" if why else "")))
    current = payload.get("current_lr")
    if payload.get("purpose") == "continue":
        lines.append(("for", "continuing the run from its checkpoint" + (
            f", compared with its LR {format_sci(_float(current))}" if current else "")))
    elif payload.get("purpose") == "start":
        lines.append(("for", "starting training from these weights"))
    flat = flat_note(payload)
    if flat:
        lines.append(("curve", f"flat: {flat}"))
    if payload.get("max_stable_lr") is not None:
        limit = format_sci(_float(payload["max_stable_lr"]))
    elif payload.get("diverged_at") is None:
        limit = "not found: no LR in the range was unstable (raise the end LR)"
    else:
        limit = "not found: no LR in the range was stable"
    where = payload.get("checkpoint_step")
    stopped = str(payload.get("stop_reason")) + (
        f" · from the checkpoint at step {where}" if where is not None else "")
    return [*lines, ("max stable LR", limit), ("stopped", stopped)]
