"""On a CUDA device, read back where it happens: the Babysitter never makes the host wait for
the device, the LR it reports is the one the updates used, device losses are kept exactly (and
folded without a wait), the range test and checkpoints put back the device's own random
generator (dropout on a GPU draws from it, not from the CPU's), and a DDP close on the device
(NCCL) waits for the backend to let go of its tensors without reaching its timeout.

Skipped where CUDA is missing (CI has no GPU); run on a GPU machine with
``pytest tests/test_cuda.py`` (or ``bash benchmarks/gpu_checks.sh``). ``PANDA_TEST_DEVICE=cpu``
runs them on the CPU, to try a change to them where no GPU is at hand: there the wait detector
sees nothing (a CPU never waits for a device) and the fused and fp16 tests are skipped.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from helpers import square_loss_steps
from torch import nn

from trainer import Babysitter
from trainer.lr_range.finder import lr_find, momentum_find
from trainer.rng import rng_state
from trainer.store import SqliteStore
from trainer.tasks import make_task

DEVICE = torch.device(os.environ.get("PANDA_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

STEPS, CHANGE_AT, X = 40, 15, 0.02
DECAY_RATE, STEPS_PER_EPOCH = 0.5, 10   # Panda's exponential decay: × 0.5 an epoch
# Panda's threads wait for close() unless a command nudges the flusher: the rows stay on the
# device all the while (the fold path included).
QUIET = {"flush_interval": 3600.0, "poll_interval": 3600.0}
FAST = {"flush_interval": 0.02, "poll_interval": 0.01, "on_diverge": "ignore"}


@contextmanager
def waits_of_this_thread() -> Iterator[list[str]]:
    """Yields a list that gets one entry for every wait for the device this thread makes
    inside (torch's sync debug mode, which warns in the thread that waited; on a CPU the list
    stays empty). Other threads may wait: Panda's flusher reads the losses once a flush, off
    the training thread, by design (and a command nudges it to flush at once)."""
    waits: list[str] = []
    if DEVICE.type != "cuda":
        yield waits
        return
    here = threading.current_thread().name

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" not in str(message):
            shown(message, category, filename, lineno, file, line)
        elif threading.current_thread().name == here:
            waits.append(str(message))

    torch.cuda.synchronize()
    with warnings.catch_warnings():  # puts showwarning back too
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.ones(1, device=DEVICE).item()
            assert len(waits) == 1, "the detector must see a wait (else the test is void)"
            waits.clear()
            yield waits
        finally:
            torch.cuda.set_sync_debug_mode("default")


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Data made on the CPU from a seeded generator, then moved: the same numbers on every
    device, and no draw from the device's generator."""
    return [t.to(DEVICE) for t in tensors]


def linear_problem(seed: int = 0):
    """A float64 linear model trained with plain SGD: the LR of an update is −Δw·g / g·g."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Linear(8, 1, dtype=torch.float64).to(DEVICE)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 1, generator=g, dtype=torch.float64)
    return model, *on_device(x, y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """cuBLAS's first call (its handle, its workspace) outside the window, on a throwaway."""
    copy.deepcopy(model)(x).sum().backward()


def test_a_babysat_loop_never_waits_for_the_device_and_reports_the_lr_its_updates_used(
        tmp_path):
    """A torch scheduler, Panda's own decay and a live `set lr` all at once, on the device; the
    LR each update used is recovered from the update itself (float64) after the window."""
    model, x, y = linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * STEPS)
    params = list(model.parameters())
    warm_up(model, x)
    losses, before, grads, after, user = [], [], [], [], []
    with Babysitter(opt, tmp_path / "run", steps_per_epoch=STEPS_PER_EPOCH,
                    schedule={"shape": "exponential", "rate": DECAY_RATE}, **QUIET) as bs, \
            waits_of_this_thread() as waits:
        for step in range(STEPS):
            if step == CHANGE_AT:
                bs.set(lr=X)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            user.append(opt.param_groups[0]["lr"])  # the user's own, between steps
            before.append(flat(params))
            grads.append(flat(p.grad for p in params))
            opt.step()
            after.append(flat(params))
            scheduler.step()
            bs.step(loss)
            losses.append(loss.detach())
    assert waits == []
    used = [float(-((a - b) @ g) / (g @ g)) for b, g, a in zip(before, grads, after)]
    with SqliteStore(tmp_path / "run") as store:
        rows = store.metrics_since()
    assert rows["step"] == list(range(STEPS))
    assert rows["loss"] == torch.stack(losses).tolist()  # float64 losses, kept exactly
    for step, (reported, true) in enumerate(zip(rows["lr"], used)):
        assert reported == pytest.approx(true, rel=1e-9), step
    assert used[CHANGE_AT] == pytest.approx(X, rel=1e-9)
    # Before and after the change, each update's LR is the last one's times the user's
    # cosine step times one step of Panda's decay: nothing compounds, nothing is lost.
    decay_per_step = DECAY_RATE ** (1 / STEPS_PER_EPOCH)
    for step in [*range(1, CHANGE_AT), *range(CHANGE_AT + 1, STEPS)]:
        expected = used[step - 1] * user[step] / user[step - 1] * decay_per_step
        assert used[step] == pytest.approx(expected, rel=1e-9), step


def test_half_precision_device_losses_are_kept_and_folded_without_a_wait(tmp_path):
    """bf16 losses on the device, more of them than may wait for the store: the first rows are
    kept as they were, the rest folded into their mean (summed in float32 on the device)."""
    torch.manual_seed(0)
    model = nn.Linear(16, 1).to(DEVICE, torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    (x,) = on_device(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)
                                 ).to(torch.bfloat16))
    warm_up(model, x)
    limit, steps = 8, 30
    with Babysitter(opt, tmp_path / "run", row_limit=limit, on_diverge="ignore",
                    **QUIET) as bs, waits_of_this_thread() as waits:
        losses = square_loss_steps(bs, model, opt, x, steps)
    assert waits == []
    assert losses[0].dtype == torch.bfloat16
    values = torch.stack(losses).double().tolist()
    with SqliteStore(tmp_path / "run") as store:
        kept = store.metrics_since()["loss"]
    assert bs.folded_steps == steps - limit - 1
    assert kept[:limit] == values[:limit]
    assert kept[limit] == pytest.approx(sum(values[limit:]) / (steps - limit), rel=1e-6)


def bitwise_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of nested state (tensors compared with torch.equal, on any device)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.device == b.device and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(u, v) for u, v in zip(a, b))
    return a == b


def test_the_range_test_leaves_a_device_model_its_optimizer_and_its_generators_as_they_were():
    task = make_task("spirals", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(16, 2)).to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [on_device(x, y) for x, y in list(task.batches(64, seed=0, epoch=0))[:5]]
    for x, y in batches:  # optimizer state (Adam's moments) and dropout draws on the device
        optimizer.zero_grad()
        task.loss_fn(model(x), y).backward()
        optimizer.step()
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), rng_state()))
    if DEVICE.type == "cuda":
        assert "cuda_rng" in before[2]  # the device's generator is part of what must stay

    result = lr_find(model, optimizer, task.loss_fn, batches, start_lr=1e-5, end_lr=100.0,
                     num_iter=30, probe_steps=10)
    momentum_find(model, optimizer, task.loss_fn, batches, lr=1e-2, num_iter=5)

    assert result.lrs and result.suggestion_probes
    assert bitwise_equal(before, (model.state_dict(), optimizer.state_dict(), rng_state()))


def test_a_resumed_device_run_draws_the_same_dropout_masks(tmp_path):
    """A run crashes after its checkpoint; resumed into other weights with other generator
    seeds, its next steps are bitwise those of the run it continues."""
    (x,) = on_device(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))

    def fresh(seed: int):
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
        model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 1)).to(DEVICE)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train(bs: Babysitter, model: nn.Module, opt: torch.optim.Optimizer, n: int):
        return torch.stack(square_loss_steps(bs, model, opt, x, n)).tolist()

    model, opt = fresh(0)
    with pytest.raises(RuntimeError, match="crash"), \
            Babysitter(opt, tmp_path / "run", model=model, checkpoint_every=10, **FAST) as bs:
        train(bs, model, opt, 10)
        expected = train(bs, model, opt, 5)  # what the run did after its checkpoint
        raise RuntimeError("crash")
    model, opt = fresh(1)
    with Babysitter(opt, tmp_path / "run", model=model, resume=True, **FAST) as bs:
        assert bs.step_count == 10
        assert train(bs, model, opt, 5) == expected


def adam_with_a_tensor_lr(**options):
    """The LR a fused or compiled Adam takes: a CPU tensor (see trainer.optim)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x, y = on_device(torch.randn(128, 16, generator=g), torch.randn(128, 1, generator=g))
    return model, torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), **options), x, y


def train_adam(model, opt, x, y, steps: int, bs: Babysitter | None = None, *,
               step_fn=None, amp: bool = False) -> list[str]:
    """``steps`` steps with a LinearLR warm-up and, under ``bs``, `set lr 0.003` at step 5;
    returns the waits for the device the training thread made. ``amp``: torch.amp's loop,
    fp16 autocast and a GradScaler (whose step reads its overflow flag: torch's own wait,
    once a step)."""
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=steps)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=amp)
    step_fn = step_fn or (lambda: scaler.step(opt))
    with waits_of_this_thread() as waits:
        for step in range(steps):
            if bs is not None and step == 5:
                bs.set(lr=0.003)
            with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=amp):
                loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            step_fn()
            scaler.update()
            scheduler.step()
            if bs is not None:
                bs.step(loss)
    return waits


def bare_and_babysat(tmp_path, *, amp: bool = False, **options) -> list[list[str]]:
    """The training thread's waits for the device in 20 steps of ``train_adam``, bare and then
    babysat, each on a fresh model after 3 steps (kernels loaded, states made)."""
    waits = []
    for babysat in (False, True):
        model, opt, x, y = adam_with_a_tensor_lr(**options)
        train_adam(model, opt, x, y, 3, amp=amp)
        if not babysat:
            waits.append(train_adam(model, opt, x, y, 20, amp=amp))
            continue
        with Babysitter(opt, tmp_path / "run", **QUIET) as bs:
            waits.append(train_adam(model, opt, x, y, 20, bs, amp=amp))
    return waits


@pytest.mark.skipif(DEVICE.type != "cuda", reason="fused Adam needs a device")
def test_fused_adam_with_a_tensor_lr_waits_no_more_babysat_than_bare(tmp_path):
    bare, babysat = bare_and_babysat(tmp_path, fused=True)
    assert len(babysat) == len(bare), (bare, babysat)
    with SqliteStore(tmp_path / "run") as store:
        lrs = store.metrics_since()["lr"]
    assert lrs[5] == pytest.approx(0.003, rel=1e-6) and lrs[6] > lrs[5]  # the warm-up goes on


@pytest.mark.skipif(DEVICE.type != "cuda", reason="fp16 autocast needs a device")
def test_a_mixed_precision_loop_waits_no_more_babysat_than_bare(tmp_path):
    bare, babysat = bare_and_babysat(tmp_path, amp=True)
    assert bare and len(babysat) == len(bare), (bare, babysat)
    with SqliteStore(tmp_path / "run") as store:
        (command,) = store.commands()
        lrs = store.metrics_since()["lr"]
    assert command.status == "applied"  # on an update the scaler let through
    assert lrs[command.applied_step] == pytest.approx(0.003, rel=1e-6)


def test_a_compiled_optimizer_step_with_a_tensor_lr_takes_a_live_change(tmp_path):
    """PyTorch's recipe for an LR scheduler with ``torch.compile``: the LR a CPU tensor.
    Panda's hooks run beside the compiled step (a graph break, see trainer.composition); the
    change lands, the warm-up goes on."""
    model, opt, x, y = adam_with_a_tensor_lr()
    step = torch.compile(opt.step)
    with Babysitter(opt, tmp_path / "run", **FAST) as bs:
        train_adam(model, opt, x, y, 12, bs, step_fn=step)
    with SqliteStore(tmp_path / "run") as store:
        rows = store.metrics_since(-1, columns=("lr", "user_lr"))
        (command,) = store.commands()
    assert command.status == "applied" and command.applied_step == 5
    assert rows["lr"][5] == pytest.approx(0.003, rel=1e-6)
    factor = 0.003 / rows["user_lr"][5]
    for lr, user in zip(rows["lr"][5:], rows["user_lr"][5:]):
        assert lr == pytest.approx(user * factor, rel=1e-6)
    assert rows["user_lr"][11] > rows["user_lr"][5]  # the user's warm-up, still going


def test_a_ddp_close_on_the_device_waits_for_the_backend_without_the_timeout(tmp_path, caplog):
    """Under NCCL the last meeting's loss all-reduce stays on the device (asynchronous) and the
    close waits until the backend has let go of its tensor (see trainer.distributed): the NCCL
    watchdog must let go well within the wait's 5 s, else every GPU run's close would stall
    and warn. One rank, in this process (gloo where PANDA_TEST_DEVICE=cpu)."""
    import torch.distributed as dist

    from trainer.distributed import DistributedCoordinator

    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo",
                            init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        model, x, y = linear_problem()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        coordinator = DistributedCoordinator()
        with caplog.at_level("WARNING", logger="trainer.distributed"), \
                Babysitter(optimizer, tmp_path / "run", model=model, checkpoint_every=5,
                           coordinator=coordinator, **FAST) as bs:
            for _ in range(12):  # meetings at steps 10 and 12 (the close's)
                loss = (model(x) - y).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bs.step(loss)
        assert "still holds" not in caplog.text
    finally:
        dist.destroy_process_group()
