"""Specification of the range tests in ``trainer.lr_range.finder``."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer.lr_range.finder import (
    PLANNED_SUGGESTION_PROBES,
    PROBE_WINDOW,
    exp_ramp,
    lr_find,
    momentum_find,
    weight_decay_find,
)
from trainer.lr_range.results import LRFindResult, Probe, SweepResult
from trainer.lr_range.suggestions import (
    RULES,
    Suggestion,
    continue_suggestion,
    is_flat,
    noise_level,
    probe_best,
    probe_vertex,
    start_suggestion,
    steepest,
    suggest,
    valley,
)
from trainer.tasks import make_task

torch.set_num_threads(1)

CLOSED_FORM_TOLERANCE = 1.5   # refined max_stable_lr must be within this factor of 2(1+β)/L


def full_batch(task):
    return [(task.train_x, task.train_y)]


def quadratic_sgd(condition: float = 10.0, momentum: float = 0.0):
    task = make_task("quadratic", seed=0, condition=condition)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01, momentum=momentum)
    return task, optimizer


# --- suggestion rules on a pinned curve -----------------------------------------------------------

PINNED_LRS = [1e-4, 1e-3, 1e-2, 1e-1, 1e0, 1e1]    # 6 log-spaced LRs, one decade apart
PINNED_LOSSES = [10.0, 8.0, 4.0, 1.0, 4.0, 16.0]


def test_steepest_descent_of_pinned_curve_is_at_index_2():
    # Central differences per decade: [8-10, (4-10)/2, (1-8)/2, (4-4)/2, (16-1)/2, 16-4]
    #                               = [-2,   -3,        -3.5,    0,         7.5,       12]
    # The most negative slope is at index 2 (loss 4, between the 8 → 1 drop).
    slopes = np.gradient(PINNED_LOSSES, np.log(PINNED_LRS)) * math.log(10)
    np.testing.assert_allclose(slopes, [-2, -3, -3.5, 0, 7.5, 12])
    assert steepest(PINNED_LRS, PINNED_LOSSES) == (1e-2, 2)


def test_valley_of_pinned_curve_is_the_middle_of_the_longest_descent():
    # The longest descent is indices 0..3 (10 → 8 → 4 → 1); its middle rounds to index 2.
    assert valley(PINNED_LRS, PINNED_LOSSES) == (1e-2, 2)


def test_suggest_prefers_steepest_and_gives_a_range_around_it():
    s = suggest(PINNED_LRS, PINNED_LOSSES)
    assert (s.lr, s.index, s.method) == (1e-2, 2, "steepest")
    # Slopes at least half of -3.5 (<= -1.75): indices 0, 1, 2 (index 3 is flat).
    assert (s.low, s.high) == (1e-4, 1e-2)
    assert s.reason is None


def test_suggest_falls_back_to_valley_when_the_minimum_is_in_the_trimmed_start():
    lrs = list(np.logspace(-5, 0, 20))
    losses = [1.0, 0.5, 0.6, 0.58, 0.56, 0.5, 0.45, 0.44, 0.43, 0.42] + [0.7] * 10
    losses[1] = 0.1   # global minimum inside the skipped start: steepest has no window
    s = suggest(lrs, losses)
    assert s.method == "valley"
    assert s.low <= s.lr <= s.high


def test_too_few_finite_points_give_no_suggestion_and_a_reason():
    assert steepest([1e-3, 1e-2, 1e-1], [3.0, 2.0, 1.0]) == (None, None)
    assert valley([1e-3, 1e-2, 1e-1], [3.0, 2.0, 1.0]) == (None, None)
    s = suggest([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], [3.0, 2.0, 1.0, math.nan, math.inf, math.nan])
    assert s.lr is None
    assert "only 3 finite" in s.reason


def test_exp_ramp_hits_both_ends_and_is_geometric():
    assert exp_ramp(1e-7, 10.0, 0.0) == pytest.approx(1e-7)
    assert exp_ramp(1e-7, 10.0, 1.0) == pytest.approx(10.0)
    assert exp_ramp(1e-6, 1.0, 0.5) == pytest.approx(1e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=5, max_size=40))
def test_any_suggestion_lies_inside_its_range(losses):
    lrs = list(np.logspace(-6, 1, len(losses)))
    s = suggest(lrs, losses)
    if s.lr is None:
        assert s.reason
    else:
        assert s.low <= s.lr <= s.high


# --- the caller's objects are untouched -----------------------------------------------------------

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(16, 2))


def snapshot(model, optimizer):
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in optimizer.state_dict()["state"].items()}
    groups = json.dumps(optimizer.state_dict()["param_groups"], default=str)
    return params, state, groups, torch.get_rng_state()


def assert_bitwise_equal(before, after):
    params, state, groups, rng = before
    params2, state2, groups2, rng2 = after
    assert params.keys() == params2.keys()
    for key in params:
        assert torch.equal(params[key], params2[key]), key
    assert state.keys() == state2.keys()
    for p in state:
        for key, value in state[p].items():
            other = state2[p][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert groups == groups2
    assert torch.equal(rng, rng2)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    lambda params: torch.optim.Adam(params, lr=1e-3),
], ids=["sgd-momentum", "adam"])
def test_model_optimizer_and_rng_are_bitwise_unchanged_and_no_files_written(
        make_optimizer, tmp_path, monkeypatch):
    task = make_task("spirals", seed=0)
    model = small_net()
    optimizer = make_optimizer(model.parameters())
    batches = list(task.batches(64, seed=0, epoch=0))[:5]
    for x, y in batches:  # warm-up so the optimizer has state tensors (momentum, Adam moments)
        optimizer.zero_grad()
        task.loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    before = snapshot(model, optimizer)
    # After the warm-up: torch itself creates a compiler cache dir on a first optimizer step.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    result = lr_find(model, optimizer, task.loss_fn, batches, start_lr=1e-5, end_lr=100.0,
                     num_iter=30, probe_steps=10)
    again = lr_find(model, optimizer, task.loss_fn, batches, start_lr=1e-5, end_lr=100.0,
                    num_iter=30, probe_steps=10, purpose="continue")
    momentum_find(model, optimizer, task.loss_fn, batches, lr=1e-2, num_iter=5)

    assert result.lrs and result.suggestion_probes and again.suggestion_probes
    assert not model.training
    assert_bitwise_equal(before, snapshot(model, optimizer))
    assert os.listdir(tmp_path) == []


HOST_COPIES = {"item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu",
               "numpy", "__array__"}  # every way a tensor's value reaches Python


class LossSpy(torch.Tensor):
    """A loss tensor that records every host copy made of it or of anything computed from it."""

    copies: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_COPIES:
            LossSpy.copies.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("check_every", [1, 8])
def test_no_host_sync_per_step(check_every):
    """Losses stay tensors and reach the host once per chunk of ``check_every`` steps, by any
    route (.item(), float(), .tolist(), .cpu(), numpy), never once per step."""
    task, optimizer = quadratic_sgd()
    LossSpy.copies.clear()
    num_iter = 40
    lr_find(task.model, optimizer, lambda out, y: task.loss_fn(out, y).as_subclass(LossSpy),
            full_batch(task), num_iter=num_iter, refine=False, end_lr=1e-3,
            check_every=check_every)
    chunks = math.ceil(num_iter / check_every)
    assert LossSpy.copies, "the spy must see the chunk copies (else it checks nothing)"
    assert len(LossSpy.copies) <= 2 * chunks, LossSpy.copies  # .cpu() + .tolist() per chunk
    if check_every > 1:
        assert len(LossSpy.copies) < num_iter


# --- failures are results, not exceptions ---------------------------------------------------------

def test_diverging_run_stops_early_with_a_clear_reason():
    task, optimizer = quadratic_sgd()
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), start_lr=1e-4,
                     end_lr=1e6, num_iter=100)
    assert len(result.lrs) < 100
    assert result.stop_reason.startswith(("diverged", "non-finite"))
    assert result.diverged_at == result.lrs[-1]
    assert result.suggested_lr is not None
    assert result.max_stable_lr < result.diverged_at


def test_nan_loss_from_step_one_gives_a_result_without_suggestion(caplog):
    task, optimizer = quadratic_sgd()

    def nan_loss(output, target):
        return task.loss_fn(output, target) * math.nan

    with caplog.at_level(logging.WARNING, logger="trainer.lr_range.finder"):
        result = lr_find(task.model, optimizer, nan_loss, full_batch(task), num_iter=50)
    assert result.stop_reason.startswith("non-finite loss at step 0")
    assert result.suggested_lr is None and result.max_stable_lr is None
    assert "finite loss points" in result.suggestion_reason
    assert "no suggestion" in caplog.text


def test_a_run_that_never_diverges_completes():
    task, optimizer = quadratic_sgd()
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), start_lr=1e-6,
                     end_lr=1e-2, num_iter=30)
    assert result.stop_reason == "completed 30 steps"
    assert len(result.lrs) == 30 and result.diverged_at is None
    assert result.lrs[0] == pytest.approx(1e-6) and result.lrs[-1] == pytest.approx(1e-2)


# --- the largest stable LR against the closed form ------------------------------------------------

@pytest.mark.parametrize("condition", [10.0, 100.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_refined_max_stable_lr_matches_closed_form(condition, momentum):
    task, optimizer = quadratic_sgd(condition, momentum)
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), start_lr=1e-5,
                     end_lr=10.0, num_iter=100)
    ratio = result.max_stable_lr / task.max_stable_lr(momentum)
    assert 1 / CLOSED_FORM_TOLERANCE <= ratio <= CLOSED_FORM_TOLERANCE
    assert len(result.refine_probes) >= 6
    assert all(isinstance(p, Probe) for p in result.refine_probes)


def test_the_coarse_ramp_alone_overshoots_the_limit():
    # Why refinement exists: the ramp only notices divergence after it has happened.
    task, optimizer = quadratic_sgd(10.0, 0.0)
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), start_lr=1e-5,
                     end_lr=10.0, num_iter=100, refine=False)
    assert result.diverged_at > 1.5 * task.max_stable_lr(0.0)
    assert result.refine_probes == []


# --- batches and validation mode ------------------------------------------------------------------

def test_short_generators_and_callables_are_cycled():
    task, optimizer = quadratic_sgd()
    generator = task.batches(128, seed=0, epoch=0)          # 4 batches, one-shot
    from_generator = lr_find(task.model, optimizer, task.loss_fn, generator, start_lr=1e-6,
                             end_lr=1e-3, num_iter=20, refine=False)
    from_callable = lr_find(task.model, optimizer, task.loss_fn,
                            lambda: task.batches(128, seed=0, epoch=0), start_lr=1e-6,
                            end_lr=1e-3, num_iter=20, refine=False)
    assert len(from_generator.lrs) == 20
    assert from_generator.losses == from_callable.losses


def test_validation_mode_records_validation_loss():
    task = make_task("spirals", seed=0)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    result = lr_find(task.model, optimizer, task.loss_fn, list(task.batches(64, seed=0, epoch=0)),
                     val_batches=[(task.val_x, task.val_y)], start_lr=1e-4, end_lr=1.0,
                     num_iter=20, refine=False)
    assert result.validation
    assert all(math.isfinite(v) for v in result.losses)


# --- JSON -----------------------------------------------------------------------------------------

def test_json_round_trip_keeps_nan_inf_and_probes():
    task, optimizer = quadratic_sgd()
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), start_lr=1e-4,
                     end_lr=1e3, num_iter=60, probe_steps=20)
    result.losses[-1] = math.nan
    result.smoothed_losses[-1] = math.inf
    text = json.dumps(result.to_dict(), allow_nan=False)
    back = LRFindResult.from_dict(json.loads(text))
    assert back.to_dict() == result.to_dict()
    assert math.isnan(back.losses[-1]) and back.smoothed_losses[-1] == math.inf
    assert isinstance(back.refine_probes[0], Probe)
    assert isinstance(back.suggestion_range, tuple)


# --- momentum and weight-decay sweeps -------------------------------------------------------------

def test_momentum_sweep_picks_a_stabilising_momentum():
    task, optimizer = quadratic_sgd(100.0, 0.0)
    lr = 1.5 * task.max_stable_lr(0.0)    # unstable without momentum, stable with β >= 0.5
    sweep = momentum_find(task.model, optimizer, task.loss_fn, full_batch(task), lr=lr,
                          one_minus_beta=(1.0, 0.3, 0.1, 0.01), num_iter=40)
    assert sweep.values == pytest.approx([0.0, 0.7, 0.9, 0.99])
    assert sweep.best in (0.7, 0.9)
    assert not sweep.losses[0] < 1e3 * min(sweep.losses[1:])    # β = 0 blew up (or went NaN)
    round_trip = SweepResult.from_dict(json.loads(json.dumps(sweep.to_dict(), allow_nan=False)))
    assert round_trip.to_dict() == sweep.to_dict()


def test_momentum_sweep_sets_adam_beta1():
    task = make_task("spirals", seed=0)
    optimizer = torch.optim.Adam(task.model.parameters(), lr=0.01, betas=(0.5, 0.999))
    sweep = momentum_find(task.model, optimizer, task.loss_fn,
                          list(task.batches(64, seed=0, epoch=0)), lr=0.01, num_iter=10)
    assert len(set(sweep.losses)) > 1             # β1 really changed between runs
    assert sweep.best in sweep.values
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.999)


def test_weight_decay_sweep_prefers_little_decay_on_a_well_posed_problem():
    task, optimizer = quadratic_sgd(10.0, 0.0)
    sweep = weight_decay_find(task.model, optimizer, task.loss_fn, full_batch(task),
                              lr=0.5 * task.max_stable_lr(0.0), num_iter=30)
    assert sweep.values[0] == 0.0
    assert sweep.best <= 1e-3
    assert sweep.losses[-1] > sweep.losses[0]     # λ = 0.1 visibly hurts the training loss


# --- bad inputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"start_lr": 1.0, "end_lr": 1.0}, "start_lr must be below end_lr"),
    ({"start_lr": 10.0, "end_lr": 1.0}, "start_lr must be below end_lr"),
    ({"start_lr": 0.0}, "start_lr must be > 0"),
    ({"start_lr": -1e-3}, "start_lr must be > 0"),
    ({"start_lr": math.nan}, "start_lr must be finite"),
    ({"end_lr": math.inf}, "end_lr must be finite"),
    ({"num_iter": 1}, "num_iter must be a whole number >= 2"),
    ({"num_iter": 2.5}, "num_iter must be a whole number"),
    ({"smooth": 1.0}, "smooth must be in"),
    ({"diverge": 0.5}, "diverge must be > 1"),
])
def test_bad_lr_find_arguments_are_refused(kwargs, message):
    task, optimizer = quadratic_sgd()
    with pytest.raises(ValueError, match=message):
        lr_find(task.model, optimizer, task.loss_fn, full_batch(task), **kwargs)


def test_bad_sweep_arguments_are_refused():
    task, optimizer = quadratic_sgd()
    args = (task.model, optimizer, task.loss_fn, full_batch(task))
    with pytest.raises(ValueError, match="lr must be finite"):
        momentum_find(*args, lr=math.nan)
    with pytest.raises(ValueError, match="momentum must be in"):
        momentum_find(*args, lr=0.01, one_minus_beta=(0.0,))
    with pytest.raises(ValueError, match="weight_decay must be in"):
        weight_decay_find(*args, lr=0.01, values=(-1e-3,))
    with pytest.raises(ValueError, match="has no momentum knob"):
        momentum_find(task.model, torch.optim.Adagrad(task.model.parameters()), task.loss_fn,
                      full_batch(task), lr=0.01)


def test_empty_batches_are_refused():
    task, optimizer = quadratic_sgd()
    with pytest.raises(ValueError, match="yielded no batches"):
        lr_find(task.model, optimizer, task.loss_fn, [], num_iter=10)


def test_a_flat_curve_never_yields_a_suggestion_near_the_stability_limit():
    """From a converged model the loss is flat until it blows up, so the "steepest" point sits
    at the blow-up; the suggestion must fall back to a third of the largest stable LR."""
    task = make_task("quadratic", condition=10.0)
    with torch.no_grad():
        solution = torch.linalg.lstsq(task.train_x, task.train_y).solution
        task.model.weight.copy_(solution.T)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    result = lr_find(task.model, optimizer, task.loss_fn, [(task.train_x, task.train_y)],
                     num_iter=80)
    assert result.max_stable_lr is not None
    # Whatever rule picks it on this noise-flat curve, it stays well inside the stable region.
    assert result.suggested_lr <= result.max_stable_lr / 3 * (1 + 1e-12)
    low, high = result.suggestion_range
    assert low <= result.suggested_lr <= high < result.max_stable_lr


# --- suggestion rules on constant-LR probes (pinned numbers) --------------------------------------

PROBE_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
PROBE_LOSSES = [2.0, 1.2, 0.4, 0.25, 0.9]     # after k steps from a snapshot at loss 2.3


def test_probe_best_is_the_lowest_finite_final_loss():
    assert probe_best(PROBE_LRS, PROBE_LOSSES) == (3e-2, 3)
    assert probe_best([1e-3, 1e-2, 1e-1], [1.0, math.inf, math.nan]) == (1e-3, 0)
    assert probe_best([1e-3, 1e-2], [math.inf, math.nan]) == (None, None)


def test_probe_vertex_finds_the_lowest_point_between_probes():
    # A parabola in log LR with its vertex at 10^-1.5 is found exactly from three probes.
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    losses = [(math.log10(lr) + 1.5) ** 2 + 1 for lr in lrs]
    assert probe_vertex(lrs, losses) == (pytest.approx(10 ** -1.5), 1)
    # Pinned: the parabola through (ln 1e-2, 0.4), (ln 3e-2, 0.25), (ln 1e-1, 0.9) (np.polyfit).
    assert probe_vertex(PROBE_LRS, PROBE_LOSSES) == (pytest.approx(2.1852e-2, rel=1e-4), 3)
    # Kept between the neighbours; the best probe itself at an end, beside a diverged probe,
    # or when all three ended alike.
    assert probe_vertex(lrs, [3.0, 2.0, 1.0, 0.5]) == (1.0, 3)
    assert probe_vertex(lrs, [3.0, 1.0, math.inf, 2.0]) == (1e-2, 1)
    assert probe_vertex(lrs, [3.0, 1.0, 1.0, 1.0])[0] == pytest.approx(10 ** -1.5)  # flat bottom
    assert probe_vertex([1e-3, 1e-2, 1e-1], [1.0, 1.0, 1.0]) == (1e-3, 0)
    assert probe_vertex([1e-3, 1e-2], [math.inf, math.nan]) == (None, None)


def test_start_suggestion_is_the_best_probe_halved_with_the_range_between_its_neighbours():
    curve = Suggestion(0.05, 40, "steepest", 0.01, 0.08)
    s = start_suggestion(curve, PROBE_LRS, PROBE_LOSSES, snapshot_loss=2.3)
    # The probes' lowest point 2.18e-2 (between 1e-2 and 1e-1, near the best probe 3e-2); only
    # 3e-2 ends within 10 % of 0.25, so the range runs from its neighbours 1e-2 to 1e-1, all
    # halved (PROBE_BACKOFF = 2).
    assert (s.lr, s.method) == (pytest.approx(2.1852e-2 / 2, rel=1e-4), "probes")
    assert (s.low, s.high) == (pytest.approx(5e-3), pytest.approx(5e-2))
    assert s.reason is None


def test_start_suggestion_keeps_the_curves_when_that_is_lower():
    curve = Suggestion(4e-3, 30, "steepest", 1e-3, 6e-3)
    s = start_suggestion(curve, PROBE_LRS, PROBE_LOSSES, snapshot_loss=2.3)
    assert (s.lr, s.method, s.low, s.high) == (4e-3, "steepest", 1e-3, 6e-3)
    assert "below the probes' best LR ÷ 2 (0.0109)" in s.reason


def test_start_suggestion_keeps_the_curves_when_the_probes_cannot_tell():
    # A plateau: every probe ends within a few % of the loss before training (0.69).
    curve = Suggestion(0.2, 50, "steepest", 0.03, 0.2)
    s = start_suggestion(curve, PROBE_LRS, [0.69, 0.68, 0.66, 0.65, 0.67], snapshot_loss=0.69)
    assert (s.lr, s.method) == (0.2, "steepest")
    assert "cannot tell" in s.reason and "0.65" in s.reason
    none = start_suggestion(curve, PROBE_LRS, [math.inf] * 5, snapshot_loss=0.69)
    assert none.lr == 0.2 and "no probe finished" in none.reason


def test_continue_suggestion_keeps_the_current_lr_unless_another_is_clearly_better():
    current = 2                                   # PROBE_LRS[2] = 1e-2 is the run's LR now
    flat = [1.00, 0.995, 1.00, 0.99, math.inf]    # 1 % better at 3e-2: within KEEP_MARGIN
    s = continue_suggestion(PROBE_LRS, flat, current)
    assert (s.lr, s.method) == (1e-2, "keep_current")
    assert s.low <= s.lr <= s.high
    better = [1.00, 0.95, 1.00, 0.90, math.inf]   # 10 % better at 3e-2
    s = continue_suggestion(PROBE_LRS, better, current)
    assert (s.lr, s.method) == (3e-2, "continue_probes")
    # 0.90 and 0.95 end within 10 % of the best: the range runs between their neighbours.
    assert (s.low, s.high) == (1e-3, 1e-1)
    assert continue_suggestion(PROBE_LRS, [math.inf] * 5, current).lr is None


CONVERGED = [2.828e-5] * 80 + list(np.linspace(2.828e-5, 2.757e-5, 20))  # -2.5 %, measured shape


def test_flat_curves_are_recognised():
    lrs = list(np.logspace(-7, 1, 100))
    assert is_flat(lrs, CONVERGED)                                     # converged checkpoint
    assert not is_flat(lrs, list(np.linspace(2.3, 0.5, 100)))          # a real descent
    assert is_flat(lrs, list(np.linspace(1.0, 3.0, 100)))              # only rises
    assert is_flat(lrs[:4], [3.0, 2.0, 1.0, 0.5])                      # too few points
    noisy = 1.0 + 0.05 * np.random.default_rng(0).standard_normal(100)
    # 5 % below the start, but only 1σ of the noise: flat; a 50 % fall (10σ) is not.
    assert is_flat(lrs, list(noisy - np.linspace(0, 0.05, 100)))
    assert not is_flat(lrs, list(noisy - np.linspace(0, 0.5, 100)))
    # A descent cut short by divergence: only the finite prefix counts.
    assert not is_flat(lrs, [*np.linspace(2.3, 1.0, 60), math.inf, *[math.nan] * 39])


def test_noise_level_of_white_noise_and_of_a_trend():
    rng = np.random.default_rng(1)
    assert noise_level(0.1 * rng.standard_normal(2000)) == pytest.approx(0.1, rel=0.1)
    assert noise_level(np.linspace(5, 1, 100)) == pytest.approx(0.0, abs=1e-12)


# --- lr_find's suggestion, by purpose -------------------------------------------------------------

def test_start_suggestion_comes_from_probes_below_the_limit():
    task, optimizer = quadratic_sgd(10.0, 0.9)
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), start_lr=1e-5,
                     num_iter=80)
    assert result.purpose == "start" and result.suggestion_rule in RULES
    probes = result.suggestion_probes
    assert len(probes) == PLANNED_SUGGESTION_PROBES
    assert [p.lr for p in probes] == sorted(p.lr for p in probes)
    assert all(p.lr < result.max_stable_lr for p in probes)
    assert result.suggested_lr <= result.max_stable_lr / 2
    low, high = result.suggestion_range
    assert low <= result.suggested_lr <= high
    assert result.flat is False


def test_continue_from_a_converged_model_keeps_the_current_lr():
    """The issue's live-run case: from a solved model every LR ends alike over the probes, and
    the ramp's "steepest" point is noise; the answer is the LR the run already has."""
    task = make_task("quadratic", condition=10.0)
    with torch.no_grad():
        task.model.weight.copy_(torch.linalg.lstsq(task.train_x, task.train_y).solution.T)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=80,
                     purpose="continue")
    assert (result.purpose, result.current_lr) == ("continue", 0.01)
    assert (result.suggested_lr, result.suggestion_rule) == (0.01, "keep_current")
    assert result.flat
    # Candidates: ÷10 … ×10 around the current LR (and a quarter decade either side of the
    # best). (Its max_stable_lr is noise here: at the minimum, any step changes the loss only
    # by rounding, so "ended above where it began" is a coin toss.)
    assert min(p.lr for p in result.suggestion_probes) >= 1e-3 / 10 ** 0.25 * (1 - 1e-9)
    assert max(p.lr for p in result.suggestion_probes) <= 1e-1 * 10 ** 0.25 * (1 + 1e-9)


def test_continue_without_probes_on_a_flat_ramp_keeps_the_current_lr():
    """``refine=False`` (``panda lr-find --no-refine``): no probes compare LRs, and a converged
    model's ramp is flat, so its "steepest" point is noise; the run's LR is the answer. Starting
    training, the curve's rule still answers (README, "LR suggestions")."""
    task = make_task("quadratic", condition=10.0)
    with torch.no_grad():
        task.model.weight.copy_(torch.linalg.lstsq(task.train_x, task.train_y).solution.T)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    kept = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=80,
                   purpose="continue", refine=False)
    assert kept.flat and kept.suggestion_probes == []
    assert (kept.suggested_lr, kept.suggestion_rule) == (0.01, "keep_flat")
    assert kept.suggestion_range == (0.01, 0.01)
    assert "on a flat ramp" in kept.suggestion_reason
    start = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=80,
                    refine=False)
    assert start.flat and start.suggestion_rule in ("steepest", "valley")
    # A run's LR above the cap (max_stable_lr / 3) is never kept.
    above = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=80,
                    purpose="continue", refine=False, current_lr=1.0)
    assert above.flat and above.max_stable_lr / 3 < 1.0
    assert above.suggestion_rule != "keep_flat" and above.suggested_lr < 1.0
    # No finite loss at all (diverged at the first step, so no limit either): no suggestion.
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    nothing = lr_find(model, torch.optim.SGD(model.parameters(), lr=0.01),
                      lambda out, y: nn.functional.mse_loss(out, y) * math.nan,
                      [(torch.randn(8, 4), torch.randn(8, 1))], num_iter=40,
                      purpose="continue", refine=False)
    assert nothing.max_stable_lr is None and nothing.suggested_lr is None


def test_continue_from_far_away_prefers_a_higher_lr():
    task, optimizer = quadratic_sgd(10.0, 0.0)
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=60,
                     purpose="continue", current_lr=1e-4)
    assert result.current_lr == 1e-4
    assert result.suggestion_rule == "continue_probes" and result.suggested_lr > 1e-4


def test_without_refinement_the_suggestion_is_the_curves():
    task, optimizer = quadratic_sgd()
    result = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=60,
                     refine=False)
    assert result.suggestion_probes == [] and result.refine_probes == []
    assert result.suggestion_rule in ("steepest", "valley")


def test_the_limit_alone_runs_no_suggestion_probes_and_finds_the_same_limit():
    """``suggest=False`` (``panda search`` wants only ``max_stable_lr``): the same refinement,
    so the same limit to the bit, without the suggestion probes' cost."""
    task, optimizer = quadratic_sgd()
    both = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=60)
    limit_only = lr_find(task.model, optimizer, task.loss_fn, full_batch(task), num_iter=60,
                         suggest=False)
    assert both.suggestion_probes and limit_only.suggestion_probes == []
    assert limit_only.refine_probes and limit_only.max_stable_lr == both.max_stable_lr
    assert limit_only.suggestion_rule in ("steepest", "valley", "max_stable/3")


def test_suggestion_probes_measure_only_their_last_steps():
    """Why the suggestion costs less than the refinement: a refinement probe measures the fixed
    set after every step, a suggestion probe only over its last PROBE_WINDOW steps."""
    task = make_task("spirals", seed=0)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01, momentum=0.9)
    val_x = task.train_x[:256]
    measured = []

    def loss_fn(output, target):
        if output.shape[0] == val_x.shape[0] and not torch.is_grad_enabled():
            measured.append(1)
        return task.loss_fn(output, target)

    result = lr_find(task.model, optimizer, loss_fn, list(task.batches(64, seed=0, epoch=0)),
                     val_batches=[(val_x, task.train_y[:256])], num_iter=40, probe_steps=20)
    refine_steps = sum(p.steps for p in result.refine_probes)
    suggestion = sum(min(p.steps, PROBE_WINDOW) for p in result.suggestion_probes)
    assert result.suggestion_probes
    assert len(measured) == len(result.lrs) + refine_steps + suggestion


def test_bad_purpose_and_current_lr_are_refused():
    task, optimizer = quadratic_sgd()
    with pytest.raises(ValueError, match="unknown purpose 'finish'"):
        lr_find(task.model, optimizer, task.loss_fn, full_batch(task), purpose="finish")
    with pytest.raises(ValueError, match="current_lr must be > 0"):
        lr_find(task.model, optimizer, task.loss_fn, full_batch(task), current_lr=0.0)


def test_results_stored_before_the_suggestion_rule_existed_still_load():
    old = {"lrs": [1e-3, 1e-2], "losses": [1.0, 0.5], "smoothed_losses": [1.0, 0.6],
           "stop_reason": "completed 2 steps", "suggested_lr": 1e-3,
           "suggestion_method": "steepest", "suggestion_range": [1e-3, 1e-2],
           "refine_probes": [{"lr": 0.1, "stable": True, "first_loss": 1.0,
                              "final_loss": 0.5, "steps": 40}]}
    result = LRFindResult.from_dict(old)
    assert result.suggestion_rule == "steepest" and result.purpose == "start"
    assert result.flat is None and result.suggestion_probes == []
    assert result.suggestion_range == (1e-3, 1e-2)
