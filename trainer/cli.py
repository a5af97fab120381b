"""The ``panda`` command.

Every command takes ``--help``; commands that report something take ``--json``. Exit codes: 0 on
success, 2 on bad input (one-line reason on stderr, nothing changed), 1 when a command was sent
but the trainer did not act on it in time.

``RUN`` is a run directory path, or a run name under ``--runs-dir`` (default ``./runs``). With
``--store postgresql://…`` (or ``$PANDA_STORE``) runs live in that PostgreSQL database instead,
and ``RUN`` is a run's name there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainer.checkpoint_files import list_checkpoints
from trainer.commands import validate_command
from trainer.config import (
    CHECKS,
    ON_DIVERGE,
    TASK_DEFAULTS,
    TASKS,
    TrainConfig,
    config_values,
)
from trainer.export import FORMATS
from trainer.knobs import KNOBS, format_sci, validate_knobs
from trainer.launch import (
    branch_run,
    dashboard_command,
    dashboard_cwd,
    open_when_serving,
    resume_hint,
    start_demo_run,
    stop_run,
    stored_config,
)
from trainer.lr_range.options import MEASURES, PURPOSES
from trainer.lr_range.options import OPTIONS as LR_FIND_OPTIONS
from trainer.ranges import NON_NEGATIVE, STEP, KnobError, Range
from trainer.search.cli import add_search_parser
from trainer.store.address import child_env, list_runs, open_run, shown, store_for, store_url
from trainer.store.base import FINAL_STATES, RunStore, StoreError, first_line

log = logging.getLogger("panda")

DEFAULT_RUNS_DIR = "runs"
DEFAULT_WAIT_S = 5.0
WAIT_POLL_S = 0.02


class CliError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a malformed command line is one line on stderr (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"panda: error: {message} (see `{self.prog} --help`)\n")


# --- helpers --------------------------------------------------------------------------------------

def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, default=str) if getattr(args, "json", False) else text)


def _store(args: argparse.Namespace) -> str | None:
    """The PostgreSQL URL from ``--store`` or $PANDA_STORE; None for SQLite files."""
    try:
        return store_url(args.store)
    except ValueError as err:
        raise CliError(str(err)) from None


def _open_run(args: argparse.Namespace) -> RunStore:
    try:
        return open_run(args.run, args.runs_dir, _store(args))
    except (StoreError, ValueError) as err:
        raise CliError(str(err)) from None


def _send(args: argparse.Namespace, kind: str, payload: dict) -> int:
    """Validate, submit a command to a live run, and wait for the trainer's verdict."""
    try:
        if kind == "set":  # typed text ("3e-4") becomes numbers here, once
            payload = validate_knobs(payload)
        payload = validate_command(kind, payload)
    except KnobError as err:
        raise CliError(str(err)) from None
    with _open_run(args) as store:
        summary = store.summary()
        if summary["state"] in (*FINAL_STATES, "interrupted"):
            raise CliError(f"run {summary['run']} is {summary['state']}: it takes no commands")
        supported = store.meta().get("supported_knobs")
        if kind == "set" and supported:
            missing = [k for k in payload if k not in supported]
            if missing:
                raise CliError(f"{summary['optimizer']} has no {missing[0]} knob (it has "
                               f"{', '.join(supported)})")
        command_id = store.submit_command(kind, payload, source="cli")
        if args.no_wait:
            _emit(args, {"command": command_id, "status": "pending"},
                  f"sent {kind} as command {command_id}")
            return 0
        return _wait_for(args, store, command_id, summary)


def _wait_for(args, store: RunStore, command_id: int, before: dict) -> int:
    deadline = time.monotonic() + args.wait
    command = store.command(command_id)
    while command.status == "pending" and time.monotonic() < deadline:
        time.sleep(WAIT_POLL_S)
        command = store.command(command_id)
    result = {"command": command_id, "status": command.status,
              "applied_step": command.applied_step, "error": command.error}
    if command.status == "applied":
        changes = [e["message"] for e in store.events_since(0) if e["command_id"] == command_id]
        _emit(args, result, "; ".join(changes) or f"{command.kind} applied at step "
              f"{command.applied_step}")
        return 0
    if command.status == "rejected":
        print(f"panda: error: trainer refused it: {command.error}", file=sys.stderr)
        return 2
    if command.status != "pending":  # taken, but no update used it: not holding, superseded
        _emit(args, result, f"command {command_id} {command.status}: {command.error}")
        return 1
    _emit(args, result, f"command {command_id} sent but not applied within {args.wait:g} s "
          f"(the run is {before['state']}); it stays queued")
    return 1


# --- commands -------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from trainer.runner import train  # torch: only when training

    run_dir, store = Path(args.run_dir), _store(args)
    replay = None
    if args.resume:
        try:
            cfg = stored_config(run_dir, store)
        except ValueError as err:
            raise CliError(str(err)) from None
        if args.epochs is not None:  # extend (or shorten) the run as asked
            cfg.epochs = args.epochs
    elif args.replay:
        from trainer.export import ExportError, load_export, replay_commands

        try:
            export = load_export(args.replay)
        except (ExportError, KnobError) as err:
            raise CliError(str(err)) from None
        cfg, replay = TrainConfig.from_dict(export["initial"]), replay_commands(export)
    elif args.config_json:
        cfg = TrainConfig.from_dict(json.loads(args.config_json))
    else:
        # What is not given comes from the task's defaults (config.TASK_DEFAULTS), then
        # TrainConfig's.
        cfg = TrainConfig(**config_values(
            args.task, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
            seed=args.seed, checkpoint_every=args.checkpoint_every, step_delay=args.step_delay,
            on_diverge=args.on_diverge, early_stop=args.early_stop))
    try:
        cfg.validate()
    except KnobError as err:
        raise CliError(str(err)) from None
    if not args.resume and _started(run_dir, store):
        raise CliError(f"{run_dir.name} already holds a run; use --resume or another --run-dir")
    status = train(cfg, run_dir, resume=args.resume, replay=replay, store=store,
                   checkpoint_knobs=args.checkpoint_knobs)
    log.info("run %s %s", run_dir, status)
    if args.json:
        _emit(args, {"run": run_dir.name, "run_dir": str(run_dir), "status": status}, "")
    return 0


def _started(run_dir: Path, store: str | None) -> bool:
    """Whether the run in ``run_dir`` (or named so in ``store``) has trained already."""
    if store is None and not (run_dir / "run.db").exists():
        return False
    try:
        with store_for(run_dir, store) as existing:
            return existing.summary()["step"] > 0
    except StoreError:
        if store is None:
            raise
        return False  # no such run in the database yet


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import ExportError, build_export, render, safe_output_path, write_atomic

    with _open_run(args) as store:
        export = build_export(store)
    try:
        text = render(export, args.format)
        if args.out is None:
            sys.stdout.write(text)
            return 0
        target = safe_output_path(args.out)
        write_atomic(target, text)
    except (ExportError, OSError) as err:
        raise CliError(str(err)) from None
    if args.json:
        _emit(args, {"run": export["run"], "out": str(target), "format": args.format,
                     "interventions": len(export["timeline"])}, "")
    else:
        print(f"exported {export['run']} ({len(export['timeline'])} interventions) to {target}",
              file=sys.stderr)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    if args.to is None:
        if args.checkpoint_knobs:
            raise CliError("--checkpoint-knobs needs --to STEP (Undo restores the knobs too)")
        return _send(args, "rollback", {})
    return _send(args, "rollback", {"step": args.to, "knobs": "checkpoint"
                                    if args.checkpoint_knobs else "keep"})


def cmd_checkpoints(args: argparse.Namespace) -> int:
    with _open_run(args) as store:
        found = [c.to_dict() for c in list_checkpoints(store.run_dir)]
    lines = [f"step {c['step']:>8}  {c['reason']:<12} {'pinned' if c['pinned'] else 'ring':<6} "
             f"{c['size'] / 1024:8.1f} KiB  {time.strftime('%H:%M:%S', time.localtime(c['mtime']))}"
             for c in found]
    _emit(args, found, "\n".join(lines) or "no checkpoints")
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    knobs = {name: getattr(args, name) for name in ("lr", "momentum", "weight_decay")
             if getattr(args, name) is not None}
    with _open_run(args) as store:
        parent = store.run_dir
        where = store.url  # the parent's PostgreSQL store, however it was named
    try:
        child, proc = branch_run(parent, args.from_step, knobs, name=args.name, store=where)
    except (KnobError, ValueError) as err:
        raise CliError(str(err)) from None
    _emit(args, {"run": child.name, "run_dir": str(child), "pid": proc.pid},
          f"branched {parent.name} into {child} (pid {proc.pid})")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    values = {name: getattr(args, name) for name in ("lr", "momentum", "weight_decay")
              if getattr(args, name) is not None}
    return _send(args, "set", values)


def _control(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _send(args, kind, {})
    return run


def cmd_status(args: argparse.Namespace) -> int:
    with _open_run(args) as store:
        summary, meta = store.summary(), store.meta()
    line = _status_line(summary)
    if summary["state"] == "interrupted":  # the trainer is gone: say how to go on
        line += f"; its trainer is gone. {resume_hint(meta, store.address)}"
    _emit(args, summary, line)
    return 0


def _status_line(s: dict) -> str:
    def fmt(v):
        return "-" if v is None else format_sci(v)
    loss = "-" if s.get("loss") is None or not math.isfinite(s["loss"]) else f"{s['loss']:.4g}"
    line = (f"{s['run']}: {s['state']}, step {s['step']}, epoch {s['epoch']}, loss {loss}, "
            f"lr {fmt(s['lr'])}, momentum {fmt(s['momentum'])}, "
            f"weight_decay {fmt(s['weight_decay'])}")
    return f"{line}; failed with {s['failure']}" if s.get("failure") else line


def cmd_runs(args: argparse.Namespace) -> int:
    root = _store(args) or args.runs_dir
    try:
        runs = list_runs(root)
    except StoreError as err:
        raise CliError(str(err)) from None
    if args.json:
        print(json.dumps(runs, default=str))
    elif not runs:
        print(f"no runs in {shown(root)}")
    else:
        for summary in runs:
            error = summary.get("error")
            print(f"{summary['run']}: unreadable ({error})" if error else _status_line(summary))
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from trainer.lr_range import job as lr_job
    from trainer.lr_range.job import LRJobError

    options = {"num_iter": args.num_iter, "start_lr": args.start_lr, "end_lr": args.end_lr,
               "refine": not args.no_refine, "measure": args.measure, "purpose": args.purpose}
    if (args.run is None) == (args.task is None):
        raise CliError("give either RUN (a run started by `panda train`) or --task TASK")
    if args.task is not None and (args.background or args.job_id is not None):
        raise CliError("--background needs a RUN; --task runs in the foreground")
    try:
        if args.task is not None:
            result = lr_job.lr_find_for_task(args.task, **options).to_dict()
            where = f"task {args.task} (fresh model)"
        else:
            with _open_run(args) as store:
                address, name = store.address, store.name
            if args.job_id is not None:
                lr_job.run_job(address, args.job_id, **options)
                return 0
            if args.background:
                result_id = lr_job.start_lr_find_job(address, **options)
                _emit(args, {"id": result_id, "status": "running", "run": name},
                      f"started LR range test {result_id} on {name} in the background "
                      "(the dashboard shows its progress and result)")
                return 0
            result = lr_job.run_lr_find_for_run(address, **options)
            where = f"{name} from its checkpoint at step {result['checkpoint_step']}"
    except LRJobError as err:
        raise CliError(str(err)) from None
    except (CliError, StoreError):
        raise
    except Exception as err:  # a failure during the test: recorded in the run, reported here
        print(f"panda: error: LR range test failed: {err}", file=sys.stderr)
        return 1
    _emit(args, result, _lr_find_text(where, result))
    return 0


def _lr_find_text(where: str, r: dict) -> str:
    from trainer.lr_range.job import describe_result

    lines = [f"LR range test on {where}: {len(r['lrs'])} steps from {format_sci(r['lrs'][0])}"]
    lines += [f"  {label:<14} {text}" for label, text in describe_result(r)]
    return "\n".join(lines)


def _dashboard(args: argparse.Namespace) -> tuple[list[str], dict[str, str], str | None]:
    """The dashboard's command line, environment and working directory (where
    ``.streamlit/config.toml``, the theme, lives)."""
    cmd = dashboard_command(args.runs_dir, host=args.host, port=args.port)
    env = child_env(_store(args))
    if args.token:  # passed in the environment, not argv, so `ps` does not show it
        env["PANDA_TOKEN"] = args.token
    cwd = dashboard_cwd()
    return cmd, env, None if cwd is None else str(cwd)


def cmd_dashboard(args: argparse.Namespace) -> int:
    cmd, env, cwd = _dashboard(args)
    if args.json:  # where it will answer, before this process becomes the server
        _emit(args, {"url": f"http://{args.host}:{args.port}"}, "")
        sys.stdout.flush()
    if cwd is not None:
        os.chdir(cwd)
    os.execve(cmd[0], cmd, env)  # replace this process: Ctrl-C goes straight to Streamlit
    return 0  # pragma: no cover


DEMO_STOP_WAIT_S = 15.0  # the demo's trainer (and dashboard) get this long to stop cleanly


def cmd_demo(args: argparse.Namespace) -> int:
    """A training run in the background and the dashboard on it, opened in the browser where
    there is one (the URL is printed either way); Ctrl-C stops both (the run cleanly, with its
    final checkpoint) and says so."""
    import signal
    import subprocess
    import threading

    from trainer.runner import Terminated, raise_terminated

    run_dir, proc = start_demo_run(args.runs_dir, store=_store(args))
    url = f"http://{_browsable(args.host)}:{args.port}"
    _emit(args, {"run": run_dir.name, "run_dir": str(run_dir), "pid": proc.pid, "url": url},
          f"training {run_dir.name} in the background (pid {proc.pid}); dashboard: {url}  "
          "(Ctrl-C stops both)")
    sys.stdout.flush()
    cmd, env, cwd = _dashboard(args)
    dashboard = subprocess.Popen(cmd, env=env, cwd=cwd)
    if not args.no_browser:
        # Beside the wait below, so Ctrl-C is never held up by a slow start.
        threading.Thread(target=_open_browser, args=(args, url, dashboard),
                         daemon=True).start()
    # `kill` and a closed terminal stop the demo as Ctrl-C does, never leaving the trainer
    # and the dashboard behind.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_terminated)
    try:
        return dashboard.wait()
    except (Terminated, KeyboardInterrupt):
        # A terminal's Ctrl-C reaches the dashboard too (the whole process group), but a
        # signal sent to this process alone (kill, kill -INT, an IDE's stop button) does not:
        # the dashboard is stopped from here either way (a second SIGTERM to a server already
        # shutting down changes nothing).
        dashboard.terminate()
        try:
            dashboard.wait(DEMO_STOP_WAIT_S)
        except subprocess.TimeoutExpired:  # a server that does not stop is not left behind
            dashboard.kill()
            dashboard.wait()
        return 0
    finally:
        how = stop_run(run_dir, proc, store=_store(args), wait_s=DEMO_STOP_WAIT_S)
        _emit(args, {"stopped": run_dir.name, "how": how},
              f"stopped the demo's training run {run_dir.name} ({how})")
        sys.stdout.flush()


def _browsable(host: str) -> str:
    """The address a browser on this machine reaches a server bound to ``host`` at."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _open_browser(args: argparse.Namespace, url: str, server) -> None:
    if open_when_serving(url, server):
        _emit(args, {"opened": url}, f"opened {url} in your browser")
        sys.stdout.flush()


# --- parser ---------------------------------------------------------------------------------------
# Every argument's type and choices come from the declarations (trainer.ranges): one place says
# what a value may be, for the API, the page and here.

PORT = Range(1, 65535, integer=True)


def _typed(name: str) -> dict[str, Any]:
    """``type=`` for a TrainConfig field, or ``choices=`` for a named choice."""
    declared = CHECKS[name]
    if isinstance(declared, Range):
        return {"type": declared.parser(name)}
    return {"choices": declared.options}


def _default_help(name: str) -> str:
    """``default 0.01; charlm: 0.003``: TrainConfig's default and the tasks' own."""
    def shown(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    default = getattr(TrainConfig, name)
    own = [f"; {task}: {shown(values[name])}" for task, values in TASK_DEFAULTS.items()
           if values.get(name, default) != default]
    return f"default {shown(default)}" + "".join(own)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="panda", description="Babysit one PyTorch training run from the "
                     "browser.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = TrainConfig()

    def add(name: str, func, help_text: str, *, run: bool = False, json_flag: bool = False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR,
                       help=f"directory holding runs (default ./{DEFAULT_RUNS_DIR})")
        p.add_argument("--store", metavar="URL", help="keep runs in this PostgreSQL database "
                       "(postgresql://user@host/db) instead of SQLite files under --runs-dir "
                       "(default $PANDA_STORE); checkpoints stay under --runs-dir")
        if run:
            p.add_argument("run", metavar="RUN", help="run directory, or run name under "
                           "--runs-dir")
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    def add_wait(p):
        p.add_argument("--wait", type=NON_NEGATIVE.parser("--wait"), default=DEFAULT_WAIT_S,
                       help=f"seconds to wait for the trainer to apply it (default "
                       f"{DEFAULT_WAIT_S:g})")
        p.add_argument("--no-wait", action="store_true", help="send and return at once")

    p = add("train", cmd_train, "train a built-in task under a Babysitter (settings not given "
            "are the task's defaults: charlm has its own, the others share TrainConfig's)",
            json_flag=True)
    p.add_argument("--task", default=defaults.task, **_typed("task"))
    p.add_argument("--run-dir", required=True, help="where the run is stored, e.g. runs/NAME")
    p.add_argument("--optimizer", help=_default_help("optimizer"), **_typed("optimizer"))
    p.add_argument("--lr", help=f"learning rate, {_default_help('lr')}", **_typed("lr"))
    p.add_argument("--momentum", help=f"SGD momentum or Adam β1, {_default_help('momentum')}",
                   **_typed("momentum"))
    p.add_argument("--weight-decay", help=_default_help("weight_decay"),
                   **_typed("weight_decay"))
    p.add_argument("--batch-size", help=_default_help("batch_size"), **_typed("batch_size"))
    p.add_argument("--epochs", **_typed("epochs"), help=_default_help("epochs") +
                   "; with --resume, extends or shortens the run")
    p.add_argument("--seed", default=defaults.seed, **_typed("seed"))
    p.add_argument("--checkpoint-every", default=defaults.checkpoint_every,
                   help="steps between rolling checkpoints", **_typed("checkpoint_every"))
    p.add_argument("--step-delay", default=0.0, **_typed("step_delay"),
                   help="seconds to sleep per step (slows a demo to watching speed)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its newest checkpoint, re-applying "
                   "the knob changes made after it")
    p.add_argument("--checkpoint-knobs", action="store_true",
                   help="with --resume: keep the checkpoint's knobs, dropping later changes")
    p.add_argument("--on-diverge", choices=ON_DIVERGE.options,
                   default=defaults.on_diverge, help="when the loss turns NaN or blows up: pause "
                   "and wait (default), roll back to the last good checkpoint and halve the LR, "
                   "or ignore")
    p.add_argument("--early-stop", metavar="PATIENCE", **_typed("early_stop"),
                   help="stop after PATIENCE epochs without a better validation loss")
    p.add_argument("--replay", metavar="EXPORT",
                   help="re-run an exported run (JSON/YAML) with its timeline at the same steps")
    p.add_argument("--config-json", help=argparse.SUPPRESS)

    def add_knob_flags(p):
        for name, knob in KNOBS.items():
            p.add_argument(f"--{name.replace('_', '-')}", dest=name,
                           type=knob.range.parser(name), help=f"{knob.label}: {knob.help}")

    p = add("set", cmd_set, "change knobs of a live run", run=True, json_flag=True)
    add_knob_flags(p)
    add_wait(p)
    p = add("rollback", cmd_rollback, "restore a live run to the state just before its latest "
            "knob change (or its newest checkpoint at or before --to STEP)", run=True,
            json_flag=True)
    p.add_argument("--to", type=STEP.parser("--to"), metavar="STEP",
                   help="newest checkpoint at or before STEP (the knobs you chose since stay)")
    p.add_argument("--checkpoint-knobs", action="store_true",
                   help="with --to: take the checkpoint's knobs too")
    add_wait(p)
    add("checkpoints", cmd_checkpoints, "list a run's checkpoints", run=True, json_flag=True)
    p = add("branch", cmd_branch, "start a new run from a checkpoint with different knobs",
            run=True, json_flag=True)
    p.add_argument("--from", dest="from_step", type=STEP.parser("--from"), required=True,
                   metavar="STEP",
                   help="branch from the newest checkpoint at or before STEP")
    p.add_argument("--name", help="name of the new run (default PARENT-bSTEP-TIME)")
    add_knob_flags(p)
    for kind, text in (("pause", "pause a live run (the trainer blocks without using CPU)"),
                       ("resume", "resume a paused run"),
                       ("stop", "stop a live run after the current step")):
        add_wait(add(kind, _control(kind), text, run=True, json_flag=True))
    p = add("export", cmd_export, "export a run's settings and intervention timeline", run=True,
            json_flag=True)
    p.add_argument("--format", choices=FORMATS, default="json")
    p.add_argument("--out", metavar="FILE", help="write here (inside the current directory) "
                   "instead of stdout; written atomically")
    add("status", cmd_status, "show a run's state, step and knobs", run=True, json_flag=True)
    add("runs", cmd_runs, "list runs under --runs-dir (or in --store)", json_flag=True)
    p = add("lr-find", cmd_lr_find, "LR range test on a copy of a run's newest checkpoint "
            "(the run keeps training), or on a fresh built-in --task", json_flag=True)
    p.add_argument("run", metavar="RUN", nargs="?", help="run directory, or run name under "
                   "--runs-dir (a run started by `panda train`)")
    p.add_argument("--task", choices=TASKS.options,
                   help="test a fresh built-in task instead of a run")
    p.add_argument("--background", action="store_true",
                   help="start the test in a detached process and print its result id")
    for flag, name, text in (("--num-iter", "num_iter", "steps of the LR ramp (default 100)"),
                             ("--start-lr", "start_lr", "first LR of the ramp (default 1e-7)"),
                             ("--end-lr", "end_lr", "last LR of the ramp (default 10)")):
        p.add_argument(flag, type=LR_FIND_OPTIONS[name].parser(name), help=text)
    p.add_argument("--no-refine", action="store_true", help="skip the constant-LR probes "
                   "that refine the max stable LR")
    p.add_argument("--measure", choices=MEASURES.options, help="loss recorded after each "
                   "step: on a fixed set of training samples (default; robust mid-training) or "
                   "of the mini-batch just trained on (cheaper, noisy)")
    p.add_argument("--purpose", choices=PURPOSES.options, help="what the suggested LR is for: "
                   "to continue the run with from its checkpoint (default with RUN) or to "
                   "start training with (default with --task)")
    p.add_argument("--job-id", type=int, help=argparse.SUPPRESS)
    add_search_parser(add)  # trainer/search/cli.py: caviar mode on Optuna
    for name, func, text in (("dashboard", cmd_dashboard, "open the dashboard on --runs-dir"),
                             ("demo", cmd_demo, "start a charlm run in the background and "
                              "open the dashboard on it")):
        p = add(name, func, text, json_flag=True)
        p.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=PORT.parser("--port"), default=8501,
                       help="port to serve on (default 8501)")
        p.add_argument("--token", help="ask for this token before the page lets anyone "
                       "change a run or start work (or set PANDA_TOKEN)")
        if name == "demo":
            p.add_argument("--no-browser", action="store_true",
                           help="only print the dashboard's URL (by default it is also opened "
                                "in the browser, where there is one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0), or a malformed command line: one line, exit 2
        return done.code if isinstance(done.code, int) else 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except (CliError, StoreError, *_driver_errors()) as err:
        print(f"panda: error: {first_line(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`panda runs --json | head`): not an error of ours. Point
        # stdout at devnull so the interpreter's final flush does not fail again
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _driver_errors() -> tuple[type[Exception], ...]:
    """PostgreSQL's errors, if its driver is loaded: a server that fails mid-command (a
    dropped connection, a missing permission) is a one-line message too, not a traceback."""
    psycopg = sys.modules.get("psycopg")
    return (psycopg.Error,) if psycopg is not None else ()


if __name__ == "__main__":
    sys.exit(main())
