"""A live knob change holds in the loops people already have, read back from the updates.

Every loop here trains a float64 linear model with plain SGD, so the LR an update used is
recovered from the update itself: ``lr = −Δw·g / g·g`` (float64), never from ``param_groups``.
After a live ``set lr X`` (a command through the run store, as ``panda set`` sends it) the
update at the step the store reports uses X, and every later update uses the user's own LR
times one constant factor ``k = X / user_lr(landing)``: the user's schedule goes on from the
new level, without compounding (issue #13).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from helpers import wait_until

from trainer import Babysitter
from trainer.store import SqliteStore

torch.set_num_threads(1)

STEPS = 60
CHANGE_AT = 20        # the loop sends `set lr X` at this boundary
X = 3e-3
RATIO_TOL = 1e-9      # the factor k is constant to this relative tolerance
FAST = {"flush_interval": 0.02, "poll_interval": 0.005, "on_diverge": "ignore"}
EPS64 = torch.finfo(torch.float64).eps


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)  # the initial weights too: every run computes the same numbers
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(8, 1, dtype=torch.float64)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 1, generator=g, dtype=torch.float64)
    return model, x, y


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


class Recorder:
    """Per update: the LR the update used (from Δw), how finely Δw tells it, the user's LR."""

    def __init__(self, model: torch.nn.Module):
        self.params = list(model.parameters())
        self.used: list[float] = []
        self.user: list[float] = []
        # Relative resolution of each recovered LR: w + Δw is rounded to w's precision, so Δw_i
        # is off by up to eps·|w_i| and lr = −Δw·g / g·g by up to eps·Σ|w_i·g_i| / |Δw·g|
        # (a 1e-9 check is finer than that where the LR is tiny, e.g. OneCycleLR's last steps:
        # ~1.5e-9 there, and which side of the check it fell on moved with BLAS's rounding).
        self.resolution: list[float] = []

    def before(self, optimizer) -> None:
        self.w = flat(self.params)
        self.g = flat(p.grad for p in self.params)
        self.user.append(float(optimizer.param_groups[0]["lr"]))  # the user's, between steps

    def after(self) -> None:
        delta = flat(self.params) - self.w
        self.used.append(float(-(delta @ self.g) / (self.g @ self.g)))
        spread = self.w.abs() @ self.g.abs()
        self.resolution.append(EPS64 * float(spread / (delta @ self.g).abs()))


def run_loop(tmp_path, make_schedule: Callable | None, *, write_lr: str | None = None,
             lr: float | torch.Tensor = 0.01, steps: int = STEPS):
    """Train ``steps`` updates under a Babysitter; at CHANGE_AT send `set lr X` through the
    store. ``make_schedule(optimizer)`` returns (step_fn) called after each update;
    ``write_lr`` = "before" writes the LR at the top of each iteration (nanoGPT), "after"
    right after ``bs.step``. ``lr`` may be a tensor (a compiled optimizer's). Returns
    (recorder, the command's applied step, run_dir)."""
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    schedule_step = make_schedule(optimizer) if make_schedule else None
    rec = Recorder(model)
    run_dir = tmp_path / "run"

    def nano_lr(it: int) -> float:  # nanoGPT's get_lr: linear warm-up, then cosine
        warm = 10
        if it < warm:
            return float(lr) * (it + 1) / warm
        return float(lr) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it - warm) / steps)))

    with Babysitter(optimizer, run_dir, **FAST) as bs, SqliteStore(run_dir) as store:
        command = None
        for it in range(steps):
            if write_lr == "before":
                for group in optimizer.param_groups:
                    group["lr"] = nano_lr(it)
            i = it % 4
            loss = torch.nn.functional.mse_loss(model(x[i * 64:(i + 1) * 64]),
                                                y[i * 64:(i + 1) * 64])
            optimizer.zero_grad()
            loss.backward()
            rec.before(optimizer)
            optimizer.step()
            rec.after()
            if schedule_step:
                schedule_step(loss)
            if it + 1 == CHANGE_AT:
                command = store.submit_command("set", {"lr": X}, source="test")
                wait_until(lambda: bs.channels.commands, what="the poller")
            bs.step(loss)
            if write_lr == "after":
                for group in optimizer.param_groups:
                    group["lr"] = nano_lr(it + 1)
        wait_until(lambda: store.command(command).status != "pending", what="the verdict")
        verdict = store.command(command)
        assert verdict.status == "applied", verdict
    with SqliteStore(run_dir) as store:  # after close(): every row and the final meta
        logged = store.metrics_since(-1, columns=("step", "lr", "user_lr"))
        summary = store.summary()
    assert summary["lr"] == pytest.approx(rec.used[-1], rel=1e-12)  # status: the effective LR
    assert logged["lr"] == pytest.approx(rec.used, rel=1e-9)          # stored: what was used
    return rec, verdict.applied_step, logged


def assert_holds(rec: Recorder, applied: int, rel: float = RATIO_TOL) -> float:
    """The update at ``applied`` used X; later ones the user's LR × one constant k (each to
    ``rel``, or to what Δw can tell where that is coarser; a float32 LR rounds every composed
    value to float32)."""
    assert applied == CHANGE_AT, "lands at the first update after the change was taken"
    assert rec.used[applied] == pytest.approx(X, rel=max(rel, 1e-9))
    k = X / rec.user[applied]
    for t in range(applied, len(rec.used)):
        if rec.user[t] == 0:  # e.g. a cosine at its end: 0 × k
            assert abs(rec.used[t]) < 1e-15, t
            continue
        assert rec.used[t] / rec.user[t] == pytest.approx(
            k, rel=max(rel, 2 * rec.resolution[t])), t
    for t in range(applied):  # before the change: exactly the user's LR
        assert rec.used[t] == pytest.approx(rec.user[t], rel=max(rel, 1e-9)), t
    return k


def lambda_warmup_cosine(optimizer):
    """The shape of Hugging Face's get_cosine_schedule_with_warmup."""
    warm = 10

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / STEPS))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return lambda loss: sched.step()


def _plain(cls, **kwargs):
    def make(optimizer):
        sched = cls(optimizer, **kwargs)
        return lambda loss: sched.step()
    make.__name__ = cls.__name__
    return make


def sequential(optimizer):
    sched = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10),
        torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.97)], milestones=[10])
    return lambda loss: sched.step()


def plateau(optimizer):
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
    return lambda loss: sched.step(1.0)  # never improves: halves every few steps


SCHEDULES = {
    "none": None,
    "LambdaLR": lambda_warmup_cosine,
    "OneCycleLR": _plain(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.02, total_steps=STEPS,
                         cycle_momentum=False),
    "LinearLR": _plain(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.2,
                       total_iters=STEPS),
    "SequentialLR": sequential,
    "StepLR": _plain(torch.optim.lr_scheduler.StepLR, step_size=7, gamma=0.5),
    "ExponentialLR": _plain(torch.optim.lr_scheduler.ExponentialLR, gamma=0.95),
    "CosineAnnealingLR": _plain(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=25),
    "ReduceLROnPlateau": plateau,
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_live_lr_change_holds_under_every_torch_scheduler(tmp_path, name):
    rec, applied, logged = run_loop(tmp_path, SCHEDULES[name])
    assert_holds(rec, applied)
    if name != "none":  # the user's schedule really moved, and Panda did not stop it
        assert len({round(u, 15) for u in rec.user[applied:]}) > 1
    assert logged["user_lr"] == pytest.approx(rec.user, rel=1e-12)


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_live_lr_change_holds_in_a_loop_that_writes_the_lr_itself(tmp_path, where):
    """nanoGPT writes `g["lr"] = get_lr(it)` before the forward pass; other loops write it
    after `bs.step`. Either way the next update uses X and then get_lr(it) × k."""
    rec, applied, _ = run_loop(tmp_path, None, write_lr=where)
    assert_holds(rec, applied)


FLOAT32_REL = 2 * torch.finfo(torch.float32).eps  # one rounding of the user's, one of Panda's


@pytest.mark.parametrize("name", ["none", "CosineAnnealingLR", "OneCycleLR", "StepLR"])
def test_a_live_lr_change_holds_with_a_tensor_lr(tmp_path, name):
    """``lr=torch.tensor(0.01)``, PyTorch's recipe for an LR scheduler driving a compiled
    optimizer step (the scheduler fills the tensor in place): the change holds to float32's
    rounding, what is stored is what the updates used, and the verdict is "applied"."""
    rec, applied, logged = run_loop(tmp_path, SCHEDULES[name], lr=torch.tensor(0.01))
    assert_holds(rec, applied, rel=FLOAT32_REL)
    assert logged["user_lr"] == pytest.approx(rec.user, rel=1e-12)


def test_a_tensor_lr_reaches_the_update_as_a_tensor_of_its_dtype(tmp_path):
    """A compiled step is specialised on its LR being a tensor: Panda's composed value and
    its landing value are tensors like the user's, and the user's own tensor is put back."""
    model, x, y = model_and_data()
    user_lr = torch.tensor(0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=user_lr)
    seen = []
    with Babysitter(optimizer, tmp_path / "run", **FAST) as bs:
        optimizer.register_step_pre_hook(  # runs after Panda's: what the update gets
            lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
        for it in range(6):
            if it == 2:
                bs.set(lr=X)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            bs.step(0.0)
            assert optimizer.param_groups[0]["lr"] is user_lr
    assert all(type(lr) is torch.Tensor and lr.dtype == torch.float32 for lr in seen), seen
    assert float(seen[2]) == pytest.approx(X, rel=FLOAT32_REL) and seen[2] is not user_lr


def test_panda_never_makes_a_compiled_optimizer_step_recompile(tmp_path):
    """``torch.compile(optimizer.step)`` with a tensor LR: after its first steps, LR changes
    and Panda's decay (a new factor at every step) compile nothing more. Traced into the
    graph, the hooks would guard it on the factors: a recompile at every change, and the
    whole step back to eager at torch's recompile limit (trainer.composition, _compiling).
    (A momentum change does recompile it once, as the user's own would: torch specialises
    the step on Adam's float betas.)"""
    graphs = []

    def counting_backend(graph, example_inputs):  # one call per graph compiled, run eagerly
        graphs.append(graph)
        return graph.forward

    torch.compiler.reset()  # another test may have compiled Adam.step already
    model, x, y = model_and_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=40)
    step = torch.compile(optimizer.step, backend=counting_backend)
    with Babysitter(optimizer, tmp_path / "run", steps_per_epoch=5,
                    schedule={"shape": "exponential", "rate": 0.5}, **FAST) as bs:
        for it in range(30):
            if it == 3:
                first = len(graphs)
            if it % 6 == 4:
                bs.set(lr=0.003 + 1e-4 * it)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
            scheduler.step()
            bs.step(0.0)
    assert first > 0 and len(graphs) == first, f"{len(graphs) - first} graphs after step 3"
    with SqliteStore(tmp_path / "run") as store:
        assert {c.status for c in store.commands()} == {"applied"}


def test_a_change_lands_on_the_next_update_a_grad_scaler_lets_through(tmp_path):
    """Mixed precision: ``GradScaler.step`` skips the update when the gradients overflow (as
    fp16 does at the start of a run). A change taken before a skipped update lands on the next
    real one, which uses exactly X; the verdict names that step; the schedule goes on."""
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    rec, skipped, overflow_at = Recorder(model), [], {3, CHANGE_AT, CHANGE_AT + 1}
    with Babysitter(optimizer, tmp_path / "run", **FAST) as bs:
        for it in range(STEPS):
            if it == CHANGE_AT:
                bs.set(lr=X)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            scaler.scale(loss * (math.inf if it in overflow_at else 1.0)).backward()
            scaler.unscale_(optimizer)  # the grads the update would use (as for clipping)
            rec.before(optimizer)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            rec.after()
            if scaler.get_scale() < scale:
                skipped.append(it)
            scheduler.step()
            bs.step(loss)
    assert skipped == sorted(overflow_at)
    with SqliteStore(tmp_path / "run") as store:
        (command,) = store.commands()
    landed = CHANGE_AT + 2  # the first update the scaler let through after the change
    assert command.status == "applied" and command.applied_step == landed
    assert rec.used[landed] == pytest.approx(X, rel=1e-9)
    k = X / rec.user[landed]
    for t in range(landed, STEPS):
        assert rec.used[t] / rec.user[t] == pytest.approx(k, rel=RATIO_TOL), t
    for t in set(range(landed)) - overflow_at:  # before: the user's own LR, skips aside
        assert rec.used[t] == pytest.approx(rec.user[t], rel=1e-9), t


@pytest.mark.parametrize("knob, target", [("momentum", 0.5), ("momentum", 0.1),
                                           ("momentum", 1e-3), ("weight_decay", 0.03)])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_change_holds_on_knobs_held_as_tensors(tmp_path, knob, target, groups):
    """β1 and the weight decay may be float32 CPU tensors too (Adam takes ``betas`` as
    tensors): a change lands to float32's rounding of the value asked (β is composed in
    float64: 1 − (1 − β)·s in float32 would cancel), is confirmed "applied", and the update
    gets tensors like the user's. With two groups the first is the usual one without decay
    (a float 0), so the decay checked, the largest, is the second's tensor."""
    model, x, y = model_and_data()
    params = list(model.parameters()) if groups == 1 else [
        {"params": [model.bias], "weight_decay": 0.0}, {"params": [model.weight]}]
    optimizer = torch.optim.AdamW(params, lr=0.01,
                                  betas=(torch.tensor(0.9), torch.tensor(0.999)),
                                  weight_decay=torch.tensor(0.01))
    seen = []
    with Babysitter(optimizer, tmp_path / "run", **FAST) as bs:
        optimizer.register_step_pre_hook(  # runs after Panda's: what the update gets
            lambda opt, args, kwargs: seen.append(dict(opt.param_groups[-1])))
        for it in range(6):
            if it == 2:
                bs.set(**{knob: target})
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            bs.step(0.0)
    with SqliteStore(tmp_path / "run") as store:
        (command,) = store.commands()
    assert command.status == "applied" and command.applied_step == 2, command
    used = seen[2]["betas"][0] if knob == "momentum" else seen[2]["weight_decay"]
    assert type(used) is torch.Tensor and used.dtype == torch.float32
    assert float(used) == float(torch.tensor(target))  # float32's rounding of the target
    assert bs.composition.in_force()[knob] == pytest.approx(target, rel=FLOAT32_REL)


def test_a_knob_held_on_a_device_is_refused_with_the_reason(tmp_path):
    """Panda reads the knobs at every update; a device tensor would make that a wait."""
    model, _, _ = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.01, device="meta")
    with pytest.raises(ValueError, match=r"tensor on meta: .*keep them on the CPU"):
        Babysitter(optimizer, tmp_path / "run", **FAST)
    assert not (tmp_path / "run").exists()


def test_recursive_schedulers_never_see_the_factor(tmp_path):
    """StepLR halves the LR it finds in the group: were Panda's value left there, the factor
    would be halved into the user's schedule again at every drop (compounding)."""
    rec, _, _ = run_loop(tmp_path, SCHEDULES["StepLR"])
    drops = [u for t, u in enumerate(rec.user[1:], 1) if u != rec.user[t - 1]]
    assert drops == pytest.approx([0.01 * 0.5 ** n for n in range(1, len(drops) + 1)])


def test_two_group_ratios_are_kept_and_momentum_and_decay_compose(tmp_path):
    """nanoGPT's AdamW groups: decay and no-decay. A live LR change keeps the groups' LR
    ratio; a weight-decay change leaves the no-decay group at 0; a momentum change lands on
    β1 and OneCycle-style cycling of β1 goes on from there on the 1−β scale."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                torch.nn.Linear(8, 1))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1, "lr": 1e-3},
                                   {"params": no_decay, "weight_decay": 0.0, "lr": 5e-4}],
                                  betas=(0.9, 0.95))
    used, seen = [], []

    def spy(opt, args, kwargs):  # a pre-hook registered after Panda's: the values in effect
        seen.append([(g["lr"], g["betas"][0], g["weight_decay"]) for g in opt.param_groups])
    with Babysitter(optimizer, tmp_path / "adamw", **FAST) as bs:
        optimizer.register_step_pre_hook(spy)
        x = torch.randn(32, 4)
        for it in range(30):
            for group, base in zip(optimizer.param_groups, (1e-3, 5e-4)):
                group["lr"] = base * (1 + it)              # the user's own schedule
                group["betas"] = (0.9 + 0.002 * it, 0.95)  # and a cycling β1
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if it == 9:
                bs.set(lr=2e-3, momentum=0.8, weight_decay=0.05)
            bs.step(loss)
            used.append(seen[-1])
    lr0, beta0, wd0 = used[10][0]
    lr1, _, wd1 = used[10][1]
    assert (lr0, beta0, wd0) == pytest.approx((2e-3, 0.8, 0.05), rel=1e-12)
    assert lr1 / lr0 == pytest.approx(0.5, rel=1e-12) and wd1 == 0.0
    k = 2e-3 / (1e-3 * 11)
    s = (1 - 0.8) / (1 - (0.9 + 0.002 * 10))
    for it in range(10, 30):
        (lr, beta, wd), _ = used[it]
        assert lr == pytest.approx(1e-3 * (1 + it) * k, rel=1e-12)
        assert 1 - beta == pytest.approx((1 - (0.9 + 0.002 * it)) * s, rel=1e-12)
        assert wd == pytest.approx(0.05, rel=1e-12)
    # The user's own values were put back after every update.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 30)
    assert optimizer.param_groups[0]["betas"][0] == pytest.approx(0.9 + 0.002 * 29)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_an_lr_warm_up_from_zero_takes_the_change_once_it_is_positive(tmp_path):
    """A user LR of 0 gives no factor: the update uses X, and the factor is taken at the
    first update where the user's LR is positive."""
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recorder(model)
    user = [0.0, 0.0, 0.0, 0.004, 0.006, 0.008, 0.01, 0.01]
    with Babysitter(optimizer, tmp_path / "warm", **FAST) as bs:
        bs.set(lr=0.002)
        for lr in user:
            optimizer.param_groups[0]["lr"] = lr
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            rec.before(optimizer)
            optimizer.step()
            rec.after()
            bs.step(loss)
    assert rec.used[:4] == pytest.approx([0.002] * 4, rel=1e-9)
    k = 0.002 / 0.004
    assert rec.used[4:] == pytest.approx([u * k for u in user[4:]], rel=1e-9)


def test_a_change_that_something_else_overrides_ends_as_not_holding(tmp_path):
    """A pre-step hook registered after Panda's rewrites the LR: the update does not use X,
    so the command must say so, never `applied`."""
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    run_dir = tmp_path / "fight"
    with Babysitter(optimizer, run_dir, **FAST) as bs, SqliteStore(run_dir) as store:
        def stubborn(opt, args, kwargs):
            for group in opt.param_groups:
                group["lr"] = 0.01
        optimizer.register_step_pre_hook(stubborn)
        command = store.submit_command("set", {"lr": X}, source="test")
        wait_until(lambda: bs.channels.commands, what="the poller")
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bs.step(loss)
        wait_until(lambda: store.command(command).status != "pending", what="the verdict")
        verdict = store.command(command)
    assert verdict.status == "not holding" and "used lr 1e-02, not 3e-03" in verdict.error


def test_a_loop_that_never_steps_the_optimizer_does_not_hold(tmp_path):
    model, _, _ = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    run_dir = tmp_path / "idle"
    with Babysitter(optimizer, run_dir, **FAST) as bs, SqliteStore(run_dir) as store:
        bs.set(lr=X)
        for _ in range(101):
            bs.step(0.0)
        wait_until(lambda: any(c.status != "pending" for c in store.commands()),
                   what="the verdict")
        (command,) = store.commands()
    assert command.status == "not holding" and "no optimizer update" in command.error
