"""Real processes: `panda train` controlled by `panda set/pause/resume/stop`, and kill -9.

Specification: a training process started by `panda train` obeys commands sent by separate
`panda` processes through the run store alone: a new LR is in the per-step metrics exactly from
the step the CLI reports; a paused trainer does not advance and uses (almost) no CPU; stop ends
the process with exit code 0 and status `stopped`. A trainer killed with SIGKILL leaves a store
that opens cleanly and holds metrics up to about a second before the kill, and
`panda train --resume` continues from the last checkpoint to the same losses an uninterrupted
run with the same seed produces.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
import torch
from helpers import (
    cpu_seconds,
    holds_for,
    panda,
    reaped,
    start_train,
    summary_of,
    train_log,
    wait_until,
)

from trainer.checkpoint_files import list_checkpoints
from trainer.store import SqliteStore
from trainer.store.sqlite import DB_NAME

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

OLD_LR, NEW_LR = 0.01, 0.03


def _step(run_dir) -> int:
    summary = summary_of(run_dir)
    return -1 if summary is None else summary["step"]


def _cli_json(*args) -> dict:
    result = panda(*args, "--json")
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_live_control_of_a_training_process(tmp_path):
    run_dir = tmp_path / "live"
    proc = start_train(run_dir, "--task", "digits", "--epochs", "100000", "--step-delay",
                       "0.002", "--lr", str(OLD_LR))
    with reaped(proc):
        wait_until(lambda: _step(run_dir) > 30 or proc.poll() is not None,
                   what="the trainer to take 30 steps")
        assert proc.poll() is None, train_log(run_dir)
        assert summary_of(run_dir)["state"] == "running"

        # --- set the LR from another process ---
        answer = _cli_json("set", run_dir, "--lr", str(NEW_LR))
        assert answer["status"] == "applied" and answer["error"] is None
        applied = answer["applied_step"]
        assert isinstance(applied, int) and applied > 30
        wait_until(lambda: _step(run_dir) > applied + 30, what="steps after the change")
        with SqliteStore(run_dir) as store:
            m = store.metrics_since(columns=("step", "lr"))
            events = store.events_since()
        assert m["step"][:applied + 30] == list(range(applied + 30))
        lr_by_step = dict(zip(m["step"], m["lr"]))
        assert {lr_by_step[s] for s in range(applied)} == {OLD_LR}
        assert {lr for s, lr in lr_by_step.items() if s >= applied} == {NEW_LR}
        sets = [e for e in events if e["kind"] == "set"]
        assert len(sets) == 1
        assert (sets[0]["step"], sets[0]["knob"], sets[0]["old"], sets[0]["new"]) == (
            applied, "lr", OLD_LR, NEW_LR)
        assert sets[0]["command_id"] == answer["command"]

        # --- pause: the step counter freezes and the process sleeps ---
        paused = _cli_json("pause", run_dir)
        assert paused["status"] == "applied"
        wait_until(lambda: summary_of(run_dir)["state"] == "paused", what="state paused")
        frozen = _step(run_dir)
        assert frozen == paused["applied_step"]
        cpu0 = cpu_seconds(proc.pid)
        time.sleep(1.0)
        cpu_paused = cpu_seconds(proc.pid) - cpu0
        assert _step(run_dir) == frozen
        holds_for(lambda: _step(run_dir) == frozen and proc.poll() is None, 0.3,
                  what="the pause")

        # --- resume: it advances again, and burns CPU doing so ---
        assert _cli_json("resume", run_dir)["status"] == "applied"
        wait_until(lambda: _step(run_dir) > frozen, what="steps after resume")
        cpu1 = cpu_seconds(proc.pid)
        time.sleep(1.0)
        cpu_running = cpu_seconds(proc.pid) - cpu1
        assert _step(run_dir) > frozen + 10
        assert summary_of(run_dir)["state"] == "running"
        # Relative, not absolute: the paused trainer's background threads (heartbeat, command
        # poll) cost a small fraction of what training costs over the same wall time.
        assert cpu_paused < 0.25 * cpu_running, (cpu_paused, cpu_running)

        # --- stop: the process ends cleanly ---
        stopped = _cli_json("stop", run_dir)
        assert stopped["status"] == "applied"
        assert proc.wait(timeout=60) == 0, train_log(run_dir)
    summary = summary_of(run_dir)
    assert summary["state"] == "stopped"
    assert summary["lr"] == NEW_LR
    with SqliteStore(run_dir) as store:
        kinds = [e["kind"] for e in store.events_since()]
        steps = store.metrics_since(columns=("step",))["step"]
    assert kinds == ["set", "pause", "resume", "stop"]
    assert steps == list(range(len(steps))) and summary["step"] == len(steps)


KILL_CFG = ("--task", "digits", "--epochs", "5", "--checkpoint-every", "25", "--seed", "3")


def test_sigkill_leaves_a_clean_store_and_resume_matches_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "killed"
    proc = start_train(run_dir, *KILL_CFG, "--step-delay", "0.01")
    # Meanwhile (2 cores): the reference run, same seed, never interrupted, no delay.
    ref_dir = tmp_path / "reference"
    ref = start_train(ref_dir, *KILL_CFG)
    with reaped(proc):
        wait_until(lambda: _step(run_dir) > 110 or proc.poll() is not None,
                   what="the trainer to pass step 110")
        assert proc.poll() is None, train_log(run_dir)
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL

    # The store survived: it opens, its pages are intact, and it holds the last second.
    conn = sqlite3.connect(run_dir / DB_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    with SqliteStore(run_dir) as store:
        before = store.metrics_since()
        assert store.meta()["status"] == "running"  # nobody had the chance to say otherwise
    assert before["step"] == list(range(len(before["step"])))
    assert len(before["step"]) > 100
    assert killed_at - before["wall"][-1] < 1.5

    ring = list_checkpoints(run_dir)
    assert ring, "no checkpoint survived"
    resume_step = ring[-1].step
    assert 0 < resume_step <= len(before["step"])

    # Resume in a new process: it continues from the checkpoint and finishes.
    resumed = panda("train", "--resume", "--run-dir", run_dir, timeout=150)
    assert resumed.returncode == 0, resumed.stderr
    assert ref.wait(timeout=150) == 0, train_log(ref_dir)

    with SqliteStore(run_dir) as store:
        after = store.metrics_since()
        events = store.events_since()
        summary = store.summary()
    total = 5 * 45  # 5 epochs of ceil(1438 / 32) batches
    assert summary["state"] == "finished" and summary["step"] == total
    assert after["step"] == list(range(total))
    resumes = [e for e in events if e["kind"] == "restart"]
    assert [e["step"] for e in resumes] == [resume_step]
    # Rows before the checkpoint are the killed process's, the rest the resumed one's.
    assert all(w < killed_at for w in after["wall"][:resume_step])
    assert all(w > killed_at for w in after["wall"][resume_step:])
    assert after["loss"][:resume_step] == before["loss"][:resume_step]

    # Determinism: the resumed run is the uninterrupted run, loss for loss, bit for bit.
    with SqliteStore(ref_dir) as store:
        reference = store.metrics_since()
        ref_val = store.validation_since()
    assert reference["step"] == after["step"]
    assert after["loss"] == reference["loss"]
    with SqliteStore(run_dir) as store:
        val = store.validation_since()
    assert [(v["step"], v["name"], v["value"]) for v in val] == \
        [(v["step"], v["name"], v["value"]) for v in ref_val]


def test_sigterm_stops_a_training_process_cleanly(tmp_path):
    run_dir = tmp_path / "term"
    proc = start_train(run_dir, "--task", "spirals", "--epochs", "100000", "--step-delay",
                       "0.002")
    with reaped(proc):
        wait_until(lambda: _step(run_dir) > 5 or proc.poll() is not None, what="steps")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, train_log(run_dir)
    summary = summary_of(run_dir)
    assert summary["state"] == "stopped"
    assert [c.reason for c in list_checkpoints(run_dir)][-1] == "final"
