"""Guardrails: a bad knob turn at 3 a.m. must be detected, survivable and undoable."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque

import numpy as np
import pytest
import torch
from helpers import holds_for, wait_until

from trainer import checkpoint, checkpoint_files
from trainer.babysitter import Babysitter
from trainer.ema import exponential_moving_average
from trainer.guard import DivergenceGuard, EarlyStopping
from trainer.store import RunStore, SqliteStore
from trainer.tasks import make_task

torch.set_num_threads(1)

SAFE_LR, CRAZY_LR = 0.01, 10.0  # 1000× too high for the digits MLP
TIMEOUT_S = 60


def _until(predicate, what: str, timeout: float = TIMEOUT_S):
    return wait_until(predicate, timeout=timeout, interval=0.1, what=what)


# --- the detector on its own -----------------------------------------------------------------

def test_the_shared_ema_runs_its_recurrence_from_the_given_state():
    """s_t = β·s_{t−1} + (1−β)·x_t, worked by hand: from 0, from a carried state, and β = 0."""
    x = np.array([1.0, 2.0, 3.0])
    assert exponential_moving_average(x, 0.5).tolist() == [0.5, 1.25, 2.125]
    assert exponential_moving_average(x, 0.5, start=4.0).tolist() == [2.5, 2.25, 2.625]
    assert exponential_moving_average(x, 0.0, start=9.0).tolist() == [1.0, 2.0, 3.0]
    assert exponential_moving_average(np.array([]), 0.9).size == 0
    # Two batches with the state carried are one batch (the guard feeds it flush by flush).
    y = np.random.default_rng(0).random(300)
    first = exponential_moving_average(y[:120], 0.9)
    rest = exponential_moving_average(y[120:], 0.9, start=first[-1])
    whole = exponential_moving_average(y, 0.9)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=1e-14)


def test_guard_fires_on_nan_at_once():
    guard = DivergenceGuard(warmup=0)
    assert guard.update([0, 1], [1.0, 0.9]) is None
    divergence = guard.update([2, 3], [float("nan"), 1.0])
    assert divergence.first_bad_step == 2 and "nan" in divergence.cause


def test_guard_needs_a_sustained_blow_up_not_one_spike():
    guard = DivergenceGuard(factor=4, patience=5, smoothing=0.0, warmup=3)
    steady = [1.0] * 10
    assert guard.update(range(10), steady) is None
    assert guard.update([10], [100.0]) is None            # one noisy batch
    assert guard.update(range(11, 20), steady[:9]) is None
    divergence = guard.update(range(20, 30), [100.0] * 10)
    assert divergence.first_bad_step == 20 and divergence.detected_step == 24
    assert "4× its best 1" in divergence.cause


def test_guard_ignores_a_loss_wandering_near_zero_late_in_training():
    """10× its best, but far below where the run started: overfitting noise, not divergence."""
    rng = np.random.default_rng(0)
    steps = np.arange(5000)
    losses = 2.3 * np.exp(-steps / 300) + 1e-4 * 10 ** rng.uniform(0, 1.5, steps.size)
    assert DivergenceGuard().update(steps.tolist(), losses.tolist()) is None
    blow_up = DivergenceGuard().update(range(5100), [*losses.tolist(), *[50.0] * 100])
    assert blow_up is not None and blow_up.first_bad_step == 5000


def test_early_stopping_counts_evaluations_without_improvement():
    stopper = EarlyStopping(patience=2)
    assert [stopper.update(v) for v in (1.0, 0.5, 0.6, 0.5, 0.4, 0.7, 0.9)] == [
        "improved", "improved", "wait", "stop", "improved", "wait", "stop"]
    with pytest.raises(ValueError):
        EarlyStopping(0)


# --- a live digits run, 1000× too high an LR -------------------------------------------------

def _train_in_thread(bs: Babysitter, task, optimizer, keep: deque, stop_after: int):
    """The training loop, keeping copies of recent (step_count → params, momentum) states."""
    epoch = 0
    while not bs.should_stop and bs.step_count < stop_after:
        for x, y in task.batches(32, seed=0, epoch=epoch):
            loss = task.loss_fn(task.model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            keep.append((bs.step_count + 1, [p.detach().clone() for p in task.model.parameters()],
                         [optimizer.state[p]["momentum_buffer"].clone()
                          for p in task.model.parameters()]))
            bs.step(loss)
            if bs.should_stop or bs.step_count >= stop_after:
                break
        bs.log_validation(**task.evaluate())
        epoch += 1


def _start(tmp_path, on_diverge: str, stop_after: int = 100_000):
    task = make_task("digits", seed=0)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=SAFE_LR, momentum=0.9)
    bs = Babysitter(optimizer, tmp_path / "run", model=task.model, steps_per_epoch=45,
                    on_diverge=on_diverge)
    keep: deque = deque(maxlen=2000)
    thread = threading.Thread(target=_train_in_thread,
                              args=(bs, task, optimizer, keep, stop_after))
    thread.start()
    store = SqliteStore(tmp_path / "run")
    _until(lambda: store.summary()["step"] > 60, "training to start")
    return task, optimizer, bs, keep, thread, store


def _crank_lr(store: RunStore) -> int:
    command_id = store.submit_command("set", {"lr": CRAZY_LR}, source="test")
    _until(lambda: store.command(command_id).status == "applied", "the LR change")
    return store.command(command_id).applied_step


def test_divergence_pauses_and_rollback_restores_the_pre_change_state_bitwise(tmp_path):
    task, optimizer, bs, keep, thread, store = _start(tmp_path, "pause")
    try:
        changed_at = _crank_lr(store)
        _until(lambda: store.summary()["state"] == "diverged", "divergence to be detected")
        detected = next(e for e in store.events_since() if e["kind"] == "diverged")
        assert detected["step"] - changed_at < 2000  # bounded: patience + one flush interval
        # The last rows before the pause reach the store; then nothing moves: the trainer
        # waits for a person.
        paused_step = _until(lambda: bs.paused and bs.step_count, "the pause")
        _until(lambda: store.summary()["step"] == paused_step, "the last rows")
        holds_for(lambda: store.summary()["step"] == paused_step, 0.3, what="the pause")

        command_id = store.submit_command("rollback", {}, source="test")
        _until(lambda: store.command(command_id).status == "applied", "the rollback")
        # The trainer is still paused (blocked), so its model can be read safely here.
        step, params, momentum = next(k for k in keep if k[0] == changed_at)
        assert step == changed_at
        assert all(torch.equal(a, b) for a, b in zip(params, task.model.parameters()))
        assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"])
                   for a, p in zip(momentum, task.model.parameters()))
        assert bs.lr == SAFE_LR  # the LR the next update will use
        _until(lambda: store.summary()["lr"] == SAFE_LR, "the restored LR in the store")
        assert store.summary()["state"] == "paused"

        store.submit_command("resume", {}, source="test")
        _until(lambda: store.summary()["step"] > paused_step + 50, "training to go on")
        assert math.isfinite(store.last_metric()["loss"])
    finally:
        bs.should_stop = True
        store.submit_command("stop", {}, source="test")
        thread.join(TIMEOUT_S)
        bs.close()
    kinds = [e["kind"] for e in SqliteStore(tmp_path / "run").events_since()]
    assert kinds[:4] == ["set", "diverged", "rollback", "resume"]


def test_on_diverge_rollback_recovers_with_no_person_involved(tmp_path):
    _, _, bs, _, thread, store = _start(tmp_path, "rollback")
    try:
        changed_at = _crank_lr(store)
        # Detection runs on the flusher's cadence, so in steps it comes whenever this machine
        # lets it: wait for the rescue (rollback, then a halved LR), then for training on.
        rescue = _until(lambda: [e for e in store.events_since()
                                 if e["kind"] == "set" and e["new"] == SAFE_LR / 2],
                        "the automatic rescue")
        _until(lambda: store.summary()["step"] > rescue[0]["step"] + 300, "training on")
    finally:
        bs.should_stop = True
        thread.join(TIMEOUT_S)
        bs.close()
    store = SqliteStore(tmp_path / "run")
    events = store.events_since()
    assert [e["kind"] for e in events][:4] == ["set", "diverged", "rollback", "set"]
    assert f"checkpoint of step {changed_at}" in events[2]["message"]
    assert events[3]["new"] == SAFE_LR / 2  # the undone change, then a halved LR
    assert store.summary()["state"] == "finished"
    losses = store.metrics_since(events[3]["step"])["loss"]
    assert all(math.isfinite(v) for v in losses[-100:]) and losses[-1] < 1.0


# --- checkpoints survive kill -9 ---------------------------------------------------------------

_WRITER = """
import sys, torch
from trainer import checkpoint
run_dir = sys.argv[1]
big = torch.randn(4_000_000)  # 16 MB: the write takes long enough to be interrupted
for step in range(1, 10_000):
    checkpoint.save(run_dir, {"babysitter": {"step": step}, "weights": big * step}, keep=3)
    print(step, flush=True)
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # at least one checkpoint is complete
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = checkpoint_files.list_checkpoints(tmp_path)
    assert found, "the ring must still hold checkpoints"
    for info in found:  # every listed checkpoint is whole: temp files are never listed
        state = checkpoint.load(info.path)
        assert state["babysitter"]["step"] == info.step
        assert state["weights"].numel() == 4_000_000


def test_checkpoint_ring_is_bounded_and_pins_are_kept(tmp_path):
    for step in range(1, 8):
        checkpoint.save(tmp_path, {"babysitter": {"step": step}}, keep=3)
    checkpoint.save(tmp_path, {"babysitter": {"step": 2}}, reason="manual", pinned=True, keep=3)
    checkpoint.save(tmp_path, {"babysitter": {"step": 8}}, keep=3)
    found = [(c.step, c.pinned) for c in checkpoint_files.list_checkpoints(tmp_path)]
    assert found == [(2, True), (6, False), (7, False), (8, False)]
    assert checkpoint_files.find(tmp_path, at_or_before=5).step == 2
    assert checkpoint_files.find(tmp_path, before=7).step == 6
    assert checkpoint_files.find(tmp_path, before=2) is None
    with pytest.raises(ValueError, match="reason"):
        checkpoint.save(tmp_path, {"babysitter": {"step": 9}}, reason="whenever")


# --- branches -----------------------------------------------------------------------------------

def test_a_branch_starts_from_a_checkpoint_with_other_knobs_and_links_its_parent(tmp_path):
    from trainer.config import TrainConfig
    from trainer.launch import branch_run
    from trainer.runner import train

    parent = tmp_path / "runs" / "parent"
    cfg = TrainConfig(task="spirals", epochs=3, checkpoint_every=50)  # 50 steps per epoch
    assert train(cfg, parent) == "finished"
    with pytest.raises(ValueError, match="no checkpoint at or before step 10"):
        branch_run(parent, 10, {"lr": 0.1})
    child, proc = branch_run(parent, 120, {"lr": 0.1}, name="what-if")
    assert proc.wait(TIMEOUT_S) == 0
    with SqliteStore(child) as store:
        meta, events = store.meta(), store.events_since()
        first_step = store.metrics_since()["step"][0]
        lrs = set(store.metrics_since()["lr"])
    assert meta["parent"] == {"run": "parent", "run_dir": str(parent.resolve()), "step": 100}
    assert meta["status"] == "finished" and first_step == 100 and lrs == {0.1}
    branch_set = next(e for e in events if e["kind"] == "set")
    assert (branch_set["step"], branch_set["old"], branch_set["new"]) == (100, 0.01, 0.1)
    with pytest.raises(ValueError, match="already exists"):
        branch_run(parent, 120, {"lr": 0.2}, name="what-if")


class _ReferenceGuard:
    """The guard's rule, one step at a time (the straightforward reading of the module
    docstring), to check the vectorized DivergenceGuard against."""

    def __init__(self, factor=4.0, patience=10, smoothing=0.9, warmup=20):
        self.factor, self.patience, self.smoothing, self.warmup = (factor, patience, smoothing,
                                                                   warmup)
        self.best, self.avg, self.count, self.over, self.since, self.start = (
            math.inf, 0.0, 0, 0, None, 0.0)

    def update(self, steps, losses):
        for step, loss in zip(steps, losses):
            if not math.isfinite(loss):
                return (step, step)
            self.count += 1
            self.avg = self.smoothing * self.avg + (1 - self.smoothing) * loss
            smoothed = self.avg / (1 - self.smoothing ** self.count)
            if self.count <= max(self.warmup, 1):
                self.start = smoothed
            if self.count > self.warmup and smoothed > max(self.factor * self.best, self.start):
                self.since = step if self.over == 0 else self.since
                self.over += 1
                if self.over >= self.patience:
                    return (self.since, step)
            else:
                self.over = 0
                self.best = min(self.best, smoothed)
        return None


@pytest.mark.parametrize("seed", range(12))
def test_the_vectorized_guard_decides_like_the_rule_read_step_by_step(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    losses = 2.0 * np.exp(-np.arange(n) / 400) + 0.05 * rng.random(n)
    if seed % 3 == 0:       # a sustained blow-up
        at = int(rng.integers(200, 2500))
        losses[at:] *= np.exp(np.arange(n - at) / rng.uniform(5, 50))
    elif seed % 3 == 1:     # a NaN somewhere, and one isolated spike
        losses[int(rng.integers(100, 2900))] = math.nan
        losses[int(rng.integers(100, 2900))] *= 100
    settings = {"factor": rng.uniform(2, 6), "patience": int(rng.integers(1, 20)),
                "smoothing": float(rng.choice([0.0, 0.5, 0.9, 0.98])),
                "warmup": int(rng.integers(0, 50))}
    guard, reference = DivergenceGuard(**settings), _ReferenceGuard(**settings)
    steps = list(range(n))
    cuts = sorted(set(rng.integers(1, n, size=20).tolist()))  # batches of any size
    expected = reference.update(steps, losses.tolist())
    found = None
    for lo, hi in itertools.pairwise([0, *cuts, n]):
        found = guard.update(steps[lo:hi], losses[lo:hi].tolist())
        if found is not None:
            break
    assert (None if found is None else (found.first_bad_step, found.detected_step)) == expected
