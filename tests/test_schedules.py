"""LR decay shapes against their closed forms, and live changes on top of a decay.

Specification: every shape equals the textbook formula (exponential a0*r^e, inverse-time
a0/(1+k*e), step a0*g^floor(e/N), cosine from a0 down to a floor, optional linear warm-up); a
manual LR change in the middle of a decay rescales the base and keeps the shape; a live change of
the decay continues from the current LR.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import square_loss_steps, wait_until

from trainer.babysitter import Babysitter
from trainer.ranges import KnobError
from trainer.schedules import (
    Schedule,
    anneal_cos,
    anneal_linear,
    lr_at,
    rebased,
    schedule_from,
    validate_schedule,
)
from trainer.store import SqliteStore

torch.set_num_threads(1)

EPOCHS = [0.0, 0.25, 1.0, 2.5, 7.0, 10.0, 33.3, 100.0, 250.0]


@pytest.mark.parametrize("e", EPOCHS)
def test_constant(e):
    assert Schedule().factor(e) == 1.0


@pytest.mark.parametrize("e", EPOCHS)
@pytest.mark.parametrize("r", [0.5, 0.9, 0.95, 1.0])
def test_exponential_is_a0_times_r_to_the_epoch(e, r):
    assert lr_at(round(e * 40), 0.1, schedule_from({"shape": "exponential", "rate": r}), 40) == \
        pytest.approx(0.1 * r ** (round(e * 40) / 40), rel=1e-12)


@pytest.mark.parametrize("e", EPOCHS)
@pytest.mark.parametrize("k", [0.0, 0.1, 1.0, 5.0])
def test_inverse_time_is_a0_over_1_plus_k_epoch(e, k):
    s = schedule_from({"shape": "inverse_time", "rate": k})
    assert 0.3 * s.factor(e) == pytest.approx(0.3 / (1 + k * e), rel=1e-12)


def test_step_drops_by_gamma_every_n_epochs():
    s = schedule_from({"shape": "step", "rate": 0.1, "step_epochs": 30})
    expected = {0: 1.0, 29.99: 1.0, 30: 0.1, 59: 0.1, 60: 0.01, 95: 0.001}
    for e, f in expected.items():
        assert s.factor(e) == pytest.approx(f, rel=1e-12), e


def test_cosine_falls_from_base_to_its_floor_and_stays_there():
    s = schedule_from({"shape": "cosine", "rate": 0.1, "total_epochs": 20})
    assert s.factor(0) == 1.0
    assert s.factor(10) == pytest.approx((1 + 0.1) / 2)              # halfway: the mean
    assert s.factor(5) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert s.factor(20) == pytest.approx(0.1)
    assert s.factor(500) == pytest.approx(0.1)
    factors = [s.factor(e / 4) for e in range(0, 81)]
    assert all(a >= b for a, b in itertools.pairwise(factors))            # never rises
    zero_floor = schedule_from({"shape": "cosine", "total_epochs": 4})  # default floor 0
    assert zero_floor.factor(4) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("shape", ["constant", "exponential", "inverse_time", "step", "cosine"])
def test_linear_warmup_ramps_from_zero_then_follows_the_shape(shape):
    plain = schedule_from({"shape": shape})
    warm = schedule_from({"shape": shape, "warmup_epochs": 2})
    assert warm.factor(0) == 0.0
    for e in (0.5, 1.0, 1.5):
        assert warm.factor(e) == pytest.approx(e / 2 * plain.factor(e))
    for e in (2.0, 3.0, 10.0):
        assert warm.factor(e) == pytest.approx(plain.factor(e))


def test_origin_shifts_the_schedule_and_clamps_before_it():
    s = rebased(schedule_from({"shape": "exponential", "rate": 0.5}), 3.0)
    assert s.factor(0) == 1.0 and s.factor(3.0) == 1.0
    assert s.factor(5.0) == pytest.approx(0.25)


def test_annealing_helpers_follow_fastai_convention():
    assert anneal_linear(1.0, 3.0, 0.0) == 1.0
    assert anneal_linear(1.0, 3.0, 0.5) == 2.0
    assert anneal_cos(1.0, 0.0, 0.0) == 1.0
    assert anneal_cos(1.0, 0.0, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert anneal_cos(1.0, 0.0, 0.5) == pytest.approx(0.5)


# --- validation ---------------------------------------------------------------------------------

def test_validation_fills_defaults_and_round_trips():
    out = validate_schedule({"shape": "step", "rate": 0.5})
    assert out["shape"] == "step" and out["rate"] == 0.5 and out["step_epochs"] == 10.0
    assert validate_schedule(out) == out
    assert schedule_from(out) == Schedule(**out)
    assert validate_schedule(Schedule("cosine", 0.0, total_epochs=5)) == \
        Schedule("cosine", 0.0, total_epochs=5).to_dict()
    assert validate_schedule({})["shape"] == "constant"
    assert validate_schedule({"shape": "exponential"})["rate"] == 0.95  # a sensible default


@pytest.mark.parametrize(("payload", "reason"), [
    ({"shape": "zigzag"}, "unknown decay shape"),
    ({"shape": "exponential", "rate": 0}, "exponential rate"),
    ({"shape": "exponential", "rate": 1.1}, "exponential rate"),
    ({"shape": "exponential", "rate": -0.5}, "exponential rate"),
    ({"shape": "step", "rate": 0}, "step rate"),
    ({"shape": "inverse_time", "rate": -1}, "inverse_time rate"),
    ({"shape": "cosine", "rate": 1.5}, "cosine rate"),
    ({"shape": "exponential", "rate": math.nan}, "must be finite"),
    ({"shape": "exponential", "rate": math.inf}, "must be finite"),
    ({"shape": "exponential", "rate": "0.9"}, "must be a number"),
    ({"shape": "exponential", "rate": True}, "must be a number"),
    ({"shape": "step", "step_epochs": 0}, "step_epochs must be > 0"),
    ({"shape": "cosine", "total_epochs": -1}, "total_epochs must be > 0"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ({"shape": "constant", "speed": 3}, "unknown schedule field 'speed'"),
    ("exponential", "must be an object"),
])
def test_bad_schedules_are_refused(payload, reason):
    with pytest.raises(KnobError, match=reason):
        validate_schedule(payload)


# --- live changes on top of a decay -------------------------------------------------------------

def _model_and_opt(lr: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _train(bs: Babysitter, model, opt, steps: int) -> None:
    square_loss_steps(bs, model, opt, torch.randn(8, 3), steps)


def test_manual_lr_change_mid_decay_rescales_the_base_and_keeps_the_shape(tmp_path):
    spe, r, base, new = 10, 0.5, 0.1, 0.02
    model, opt = _model_and_opt(base)
    with Babysitter(opt, tmp_path / "decay", steps_per_epoch=spe,
                    schedule={"shape": "exponential", "rate": r}) as bs:
        _train(bs, model, opt, 25)
        assert bs.lr == pytest.approx(base * r ** 2.5)
        bs.set(lr=new)                         # the person turns the LR knob at step 25
        assert bs.lr == new
        _train(bs, model, opt, 35)
    with SqliteStore(tmp_path / "decay") as store:
        lrs = store.metrics_since()["lr"]
        events = store.events_since()
    assert len(lrs) == 60
    for t in range(25):
        assert lrs[t] == pytest.approx(base * r ** (t / spe), rel=1e-12), t
    new_base = new / r ** (25 / spe)
    for t in range(25, 60):
        assert lrs[t] == pytest.approx(new_base * r ** (t / spe), rel=1e-12), t
    assert lrs[25] == pytest.approx(new)
    assert [(e["step"], e["knob"], e["new"]) for e in events] == [(25, "lr", new)]
    assert events[0]["old"] == pytest.approx(base * r ** 2.5)


def test_live_decay_change_continues_from_the_current_lr(tmp_path):
    spe, base = 10, 0.1
    model, opt = _model_and_opt(base)
    with Babysitter(opt, tmp_path / "switch", steps_per_epoch=spe,
                    schedule={"shape": "step", "rate": 0.5, "step_epochs": 1}) as bs:
        _train(bs, model, opt, 15)             # one drop: LR is base/2
        store = SqliteStore(tmp_path / "switch")
        store.submit_command("schedule", {"shape": "inverse_time", "rate": 1.0})
        # Hold the loop at this step boundary until the poller has handed the command over,
        # so it is applied by the very next step.
        wait_until(lambda: bs.channels.commands, timeout=30,
                   what="the poller to pick the command up")
        assert bs.lr == pytest.approx(base / 2)
        _train(bs, model, opt, 20)
    lrs = store.metrics_since()["lr"]
    switch = store.events_since()[0]["step"]
    store.close()
    assert switch == 16
    for t in range(switch, 35):
        assert lrs[t] == pytest.approx(base / 2 / (1 + (t - switch) / spe), rel=1e-12), t


def test_param_group_ratios_are_kept_under_a_schedule(tmp_path):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": a.parameters(), "lr": 0.1},
                           {"params": b.parameters(), "lr": 0.01}], lr=0.1)
    with Babysitter(opt, tmp_path / "groups", steps_per_epoch=4,
                    schedule={"shape": "exponential", "rate": 0.5}) as bs:
        seen = []
        opt.register_step_pre_hook(  # after Panda's: the LRs each update uses
            lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
        for _ in range(10):
            opt.step()
            bs.step(1.0)
            g0, g1 = seen[-1]
            assert g1 / g0 == pytest.approx(0.1)
        bs.set(lr=0.3)
        opt.step()
        assert seen[-1] == pytest.approx([0.3, 0.03])
