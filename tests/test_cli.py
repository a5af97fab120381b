"""The `panda` command line.

Specification: every command has --help (exit 0); bad input exits 2 with a one-line reason on
stderr and changes nothing (no command row is created); an unknown run exits 2; `status --json`
holds run, state, step, epoch, lr, momentum, weight_decay; `runs --json` lists runs; a command
to a finished run exits 2; a command the trainer applies exits 0 with the step it applied at.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import REPO, dead_pid, holds_for, panda, subprocess_env, summary_of, wait_until

from trainer import Babysitter, cli
from trainer.checkpoint_files import checkpoint_path
from trainer.config import TrainConfig, config_values
from trainer.launch import resume_hint
from trainer.store import SqliteStore

torch.set_num_threads(1)

REQUIRED = ("demo", "train", "dashboard", "runs", "set", "pause", "resume", "stop", "status",
            "lr-find", "export")


def subcommands() -> list[str]:
    parser = cli.build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``panda ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([os.fspath(a) for a in argv])
    except SystemExit as exit_:  # argparse: --help, or a malformed command line
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("panda: error: "), err
    assert "Traceback" not in err
    return lines[0]


class LiveRun:
    """A Babysitter training a toy model in a background thread, like a real trainer."""

    def __init__(self, run_dir: Path, optimizer: str = "sgd"):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        params = self.model.parameters()
        self.opt = (torch.optim.SGD(params, lr=0.01, momentum=0.9) if optimizer == "sgd"
                    else torch.optim.Adagrad(params, lr=0.01))
        self.bs = Babysitter(self.opt, run_dir, flush_interval=0.02, poll_interval=0.01,
                             on_diverge="ignore")
        self.run_dir = run_dir
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        wait_until(lambda: self.bs.step_count > 3, what="the live run to start")
        wait_until(lambda: summary_of(run_dir)["step"] > 3, what="the first flush")

    def _loop(self):
        x = torch.randn(8, 3)
        while not self.bs.should_stop and not self.bs._closed:
            loss = self.model(x).pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.bs.step(loss)
            time.sleep(0.002)

    def commands(self) -> list:
        with SqliteStore(self.run_dir) as store:
            return store.commands()

    def close(self):
        self.bs.should_stop = True
        self.thread.join(timeout=30)
        self.bs.close()


@pytest.fixture
def runs_dir(tmp_path):
    return tmp_path / "runs"


@pytest.fixture
def live(runs_dir):
    run = LiveRun(runs_dir / "live")
    yield run
    run.close()


@pytest.fixture
def finished(runs_dir):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Babysitter(opt, runs_dir / "done", flush_interval=0.02) as bs:
        for _ in range(5):
            bs.step(1.0)
    return runs_dir / "done"


# --- help ---------------------------------------------------------------------------------------

def test_the_documented_commands_exist():
    assert set(REQUIRED) <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_every_command_has_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: panda {command}")


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in REQUIRED:
        assert command in out


@pytest.mark.slow
def test_installed_entry_point_runs(tmp_path):
    exe = Path(sys.executable).parent / "panda"
    exe = str(exe) if exe.exists() else shutil.which("panda")
    assert exe, "the `panda` script is not installed"
    result = subprocess.run([exe, "runs", "--runs-dir", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=60, env=subprocess_env(),
                            cwd=REPO)
    assert result.returncode == 0 and json.loads(result.stdout) == []


# --- bad input ----------------------------------------------------------------------------------

BAD_SETS = [
    (["--lr", "0"], "lr must be in"),
    (["--lr", "-0.1"], "lr must be in"),
    (["--lr", "nan"], "finite"),
    (["--lr", "inf"], "finite"),
    (["--lr", "fast"], "must be a number"),
    (["--lr", ""], "must be a number"),
    (["--momentum", "1"], "momentum must be in"),
    (["--momentum", "-0.5"], "momentum must be in"),
    (["--weight-decay=-1e-4"], "weight_decay must be in"),
    (["--weight-decay", "-1e-4"], "expected one argument"),  # argparse reads -1e-4 as a flag
    (["--lr"], "expected one argument"),
    (["--learning-rate", "0.1"], "unrecognized arguments"),
    (["--lr", "0.1", "--momentum", "2"], "momentum must be in"),
    ([], "nothing to set"),
]


def test_bad_values_exit_2_with_one_line_and_create_no_command(capsys, live, runs_dir):
    knobs = live.bs.knobs.values()
    for args, reason in BAD_SETS:
        code, out, err = run_cli(capsys, "set", "live", "--runs-dir", runs_dir, *args)
        assert code == 2, args
        assert reason in one_line_error(err), (args, err)
        assert out == ""
    assert live.commands() == []
    assert live.bs.knobs.values() == knobs


def test_a_knob_the_optimizer_lacks_exits_2_and_creates_no_command(capsys, runs_dir):
    run = LiveRun(runs_dir / "adagrad", optimizer="adagrad")
    try:
        code, _, err = run_cli(capsys, "set", run.run_dir, "--momentum", "0.9")
        assert code == 2 and "has no momentum knob" in one_line_error(err)
        assert run.commands() == []
    finally:
        run.close()


@pytest.mark.parametrize("spec", ["nope", "../nope", ".hidden", "a/b/c", "/nonexistent/run"])
@pytest.mark.parametrize("command", [["status"], ["set", "--lr", "0.1"], ["pause"], ["stop"],
                                     ["export"]])
def test_an_unknown_run_exits_2(capsys, runs_dir, command, spec):
    code, _, err = run_cli(capsys, command[0], spec, "--runs-dir", runs_dir, *command[1:])
    assert code == 2
    one_line_error(err)
    assert not runs_dir.exists()  # nothing was created while looking


def test_a_command_to_a_finished_run_exits_2(capsys, finished):
    for command in (["set", "--lr", "0.1"], ["pause"], ["resume"], ["stop"]):
        code, _, err = run_cli(capsys, command[0], finished, *command[1:])
        assert code == 2
        assert "is finished" in one_line_error(err)
    with SqliteStore(finished) as store:
        assert store.commands() == []


@pytest.mark.slow
def test_bad_input_in_a_real_process_is_one_line_not_a_traceback(finished):
    result = panda("set", finished, "--lr", "-3")
    assert result.returncode == 2 and result.stdout == ""
    assert "lr must be in" in one_line_error(result.stderr)
    result = panda("status", finished.parent / "missing")
    assert result.returncode == 2
    assert "no run at" in one_line_error(result.stderr)


# --- status and runs ----------------------------------------------------------------------------

def test_status_json_of_a_live_run(capsys, live, runs_dir):
    code, out, _ = run_cli(capsys, "status", "live", "--runs-dir", runs_dir, "--json")
    assert code == 0
    status = json.loads(out)
    assert {"run", "state", "step", "epoch", "lr", "momentum", "weight_decay"} <= set(status)
    assert (status["run"], status["state"], status["epoch"]) == ("live", "running", 0)
    assert (status["lr"], status["momentum"], status["weight_decay"]) == (0.01, 0.9, 0.0)
    assert isinstance(status["step"], int) and status["step"] > 3


def test_status_text_is_one_readable_line(capsys, finished):
    code, out, _ = run_cli(capsys, "status", finished)
    assert code == 0
    assert out.strip() == "done: finished, step 5, epoch 0, loss 1, lr 1e-01, momentum 0, " \
        "weight_decay 0"  # no failure, none said
    assert len(out.strip().splitlines()) == 1


def test_the_status_of_a_failed_run_says_why(capsys, runs_dir):
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="out of memory"), \
            Babysitter(opt, runs_dir / "crashed", flush_interval=0.02) as bs:
        bs.step(1.0)
        raise RuntimeError("CUDA out of memory")
    code, out, _ = run_cli(capsys, "status", runs_dir / "crashed")
    assert code == 0
    assert out.strip().startswith("crashed: failed, step 1,")
    assert out.strip().endswith("; failed with RuntimeError: CUDA out of memory")
    code, out, _ = run_cli(capsys, "status", runs_dir / "crashed", "--json")
    assert json.loads(out)["failure"] == "RuntimeError: CUDA out of memory"


def test_the_status_of_an_interrupted_run_says_how_to_resume(capsys, make_run):
    """A trainer killed without closing its run: `panda status` says so and how to go on."""
    run_dir = make_run("killed", pid=dead_pid())
    with SqliteStore(run_dir) as store:
        store.set_meta(run_dir=str(run_dir), config=asdict(TrainConfig(**config_values("digits"))))
    checkpoint_path(run_dir, 120, "periodic", pinned=False).parent.mkdir()
    checkpoint_path(run_dir, 120, "periodic", pinned=False).write_bytes(b"")
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and out.startswith("killed: interrupted, step 20,")
    assert out.strip().endswith(
        f"; its trainer is gone. Resume it with `panda train --resume --run-dir {run_dir}` from "
        "its checkpoint of step 120 (the steps after it are trained again).")


def test_the_resume_hint_fits_the_run(tmp_path):
    """`panda train` runs get the command, a user's loop the Babysitter argument; the
    checkpoint is named only where its files are on this machine."""
    built_in = {"config": asdict(TrainConfig(**config_values("digits"))),
                "run_dir": str(tmp_path / "a"), "host": socket.gethostname()}
    (tmp_path / "a").mkdir()
    assert resume_hint(built_in, tmp_path / "a") == (
        f"Resume it with `panda train --resume --run-dir {tmp_path / 'a'}` (it has no checkpoint "
        "yet, so it starts again from step 0).")
    assert "--store $PANDA_STORE`" in resume_hint(built_in, "postgresql://panda@db/panda#a")
    elsewhere = {**built_in, "host": "gpu-node-7"}
    assert resume_hint(elsewhere).endswith(f"--run-dir {tmp_path / 'a'}`.")
    assert resume_hint({"run_dir": str(tmp_path / "a")}).startswith(
        "Resume it with `resume=True` where your loop makes its Babysitter (or its Lightning")


def test_runs_json_lists_every_run(capsys, runs_dir, finished, live):
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "run.db").write_bytes(b"junk" * 100)
    code, out, _ = run_cli(capsys, "runs", "--runs-dir", runs_dir, "--json")
    assert code == 0
    runs = {r["run"]: r for r in json.loads(out)}
    assert set(runs) == {"done", "live", "broken"}
    assert runs["done"]["state"] == "finished" and runs["live"]["state"] == "running"
    assert runs["broken"]["state"] == "unreadable"
    code, out, _ = run_cli(capsys, "runs", "--runs-dir", runs_dir)
    assert code == 0 and len(out.strip().splitlines()) == 3


def test_runs_of_an_empty_directory(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "runs", "--runs-dir", tmp_path / "none", "--json")
    assert code == 0 and json.loads(out) == []


# --- commands that work -------------------------------------------------------------------------

def test_set_waits_for_the_trainer_and_reports_the_step(capsys, live, runs_dir):
    code, out, err = run_cli(capsys, "set", "live", "--runs-dir", runs_dir, "--lr", "0.05",
                             "--momentum", "0.8", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["status"] == "applied" and answer["error"] is None
    used = live.bs.composition.last_used()  # what the update at the applied step used
    assert (used["lr"], used["momentum"]) == pytest.approx((0.05, 0.8), rel=1e-12)
    (cmd,) = live.commands()
    assert (cmd.id, cmd.source, cmd.applied_step) == (answer["command"], "cli",
                                                      answer["applied_step"])
    code, out, _ = run_cli(capsys, "set", live.run_dir, "--weight-decay", "1e-3")
    assert code == 0 and "weight_decay 0 → 1e-03 at step" in out


def test_pause_resume_and_stop_through_the_cli(capsys, live, runs_dir):
    code, out, _ = run_cli(capsys, "pause", "live", "--runs-dir", runs_dir, "--json")
    assert code == 0 and json.loads(out)["status"] == "applied"
    assert live.bs.paused
    frozen = live.bs.step_count
    holds_for(lambda: live.bs.step_count == frozen, 0.1, what="the pause")
    code, _, _ = run_cli(capsys, "resume", "live", "--runs-dir", runs_dir)
    assert code == 0
    wait_until(lambda: live.bs.step_count > frozen, what="steps after resume")
    code, _, _ = run_cli(capsys, "stop", "live", "--runs-dir", runs_dir)
    assert code == 0
    live.thread.join(timeout=30)
    assert live.bs.should_stop and not live.thread.is_alive()


def test_no_wait_queues_the_command_and_returns(capsys, live, runs_dir):
    code, out, _ = run_cli(capsys, "pause", "live", "--runs-dir", runs_dir, "--no-wait",
                           "--json")
    assert code == 0
    answer = json.loads(out)
    assert answer["status"] == "pending"
    with SqliteStore(live.run_dir) as store:
        wait_until(lambda: store.command(answer["command"]).status == "applied",
                   what="the queued command")


def test_a_trainer_that_does_not_answer_exits_1_and_keeps_the_command(capsys, runs_dir):
    with SqliteStore(runs_dir / "silent", create=True) as store:  # alive, but never polls
        store.set_meta(name="silent", status="running", pid=os.getpid(), heartbeat=time.time())
    code, out, _ = run_cli(capsys, "set", runs_dir / "silent", "--lr", "0.1", "--wait", "0.2")
    assert code == 1 and "stays queued" in out
    with SqliteStore(runs_dir / "silent") as store:
        assert [c.status for c in store.commands()] == ["pending"]


def test_a_malformed_wait_is_refused(capsys, live):
    code, _, err = run_cli(capsys, "set", live.run_dir, "--lr", "0.1", "--wait", "-1")
    assert code == 2 and "--wait" in err
    assert live.commands() == []


def test_train_refuses_bad_settings_before_starting(capsys, tmp_path):
    for args, reason in ((["--lr", "0"], "lr must be in"), (["--lr", "nan"], "finite"),
                         (["--momentum", "1"], "momentum must be in"),
                         (["--epochs", "0"], "epochs must be a whole number >= 1"),
                         (["--step-delay", "-1"], "step_delay")):
        code, _, err = run_cli(capsys, "train", "--run-dir", tmp_path / "r", *args)
        assert code == 2, args
        assert reason in one_line_error(err), (args, err)
    assert not (tmp_path / "r").exists()


def test_train_refuses_to_overwrite_an_existing_run(capsys, finished):
    code, _, err = run_cli(capsys, "train", "--run-dir", finished, "--epochs", "1")
    assert code == 2 and "already holds a run" in one_line_error(err)


def test_every_command_has_help_and_json():
    """DESIGN.md: every `panda` command has --help and --json."""
    from trainer.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"demo", "train", "dashboard", "runs", "set", "pause", "resume", "stop", "status",
            "rollback", "checkpoints", "branch", "lr-find", "export"} <= set(commands.choices)
    for name, sub in commands.choices.items():
        flags = {flag for action in sub._actions for flag in action.option_strings}
        assert {"--help", "--json"} <= flags, name
