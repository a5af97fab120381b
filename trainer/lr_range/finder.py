"""Range tests: learning rate (Smith 2017, "Cyclical Learning Rates", §3.3), momentum, weight decay.

:func:`lr_find` ramps the LR exponentially over ``num_iter`` steps and records the loss (results
are the dataclasses of :mod:`~trainer.lr_range.results`). Because a ramp overshoots the true
stability limit (the loss needs a few steps to blow up, and the smoothed loss lags further), the
limit is then refined coarse-to-fine with short constant-LR probes bisected on a log scale.
The suggestion then comes from a second, cheaper set of constant-LR probes from the same
snapshot, below the limit, chosen by what it is for (``purpose``; the rules are in
:mod:`~trainer.lr_range.suggestions`):

* ``"start"``, the LR to start training with: a coarse-to-fine search over a few decades below
  the limit for the LR where the probes' loss ends lowest (interpolated between probes), halved
  (README, "LR suggestions");
* ``"continue"``, the LR to continue a run with from its checkpoint: probes around the current
  LR, which is kept unless another ends clearly lower.

These probes measure the loss only over their last few steps, so they cost less than the
refinement's (``benchmarks/lr_suggestion.py timing``). Without ``refine`` there are no probes
and the suggestion is the curve's steepest descent, unless the curve is flat when continuing a
run: then the run's own LR (rule ``keep_flat``), as long as it is below the limit.
:func:`momentum_find` and :func:`weight_decay_find` run the same constant-LR probe per value.

Everything runs on deep copies of ``(model, optimizer)``: the caller's parameters, buffers,
optimizer state and torch RNG state are bitwise unchanged afterwards. Every run starts from the
caller's objects and RNG state, so runs see the same data and randomness. The copies do not keep
the optimizer's hooks; AMP grad scalers are not supported.

Batches (``train_batches``, ``val_batches``): an iterable of ``(x, y)`` pairs, restarted (cycled)
when shorter than a run; or a zero-argument callable returning a fresh iterator per pass. A
one-shot iterator (generator) is cached as it is consumed so later passes replay it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch

from trainer.knobs import MOMENTUM, WEIGHT_DECAY
from trainer.lr_range import options
from trainer.lr_range.results import LRFindResult, Probe, SweepResult
from trainer.lr_range.suggestions import (
    Suggestion,
    continue_suggestion,
    is_flat,
    start_suggestion,
    suggest,
)
from trainer.optim import OptimizerKnobs
from trainer.ranges import COUNT, POSITIVE
from trainer.rng import rng_state, set_rng_state

logger = logging.getLogger(__name__)

# Loss values are copied to the host once per chunk, not per step (no `.item()` in the loop). The
# divergence/NaN check therefore runs every CHECK_EVERY steps: a run that blows up wastes at most
# CHECK_EVERY - 1 steps, which is cheap next to a host sync per step on a GPU.
CHECK_EVERY = 16
STABLE_FRACTION = 3.0  # suggestions stay at or below max_stable_lr / 3 (Smith 2017, §3.3)
PROBE_STEPS = 40              # constant-LR probe length: a few momentum time constants at β=0.9
PROBE_WINDOW = 5              # a probe's final loss is the mean of its last PROBE_WINDOW losses
PROBE_GROWTH = 1.0            # a probe is unstable when final loss > PROBE_GROWTH × first loss
BRACKET_FACTOR = 10.0         # step down from the ramp's divergence point to find a stable LR
MAX_BRACKET_STEPS = 4         # ... at most this many times (4 decades)
BISECTIONS = 7                # log-scale bisections: a 10× bracket shrinks to 10^(1/128) ≈ 1.02×
ONE_MINUS_BETA = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)   # momentum grid on a 1-β log scale
WEIGHT_DECAYS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PLANNED_PROBES = 1 + 1 + BISECTIONS   # typical refinement: upper probe, one bracket, bisections
# Suggestion probes, on a log scale (half a decade coarse, a quarter fine). "start": COARSE_STEPS
# probes from the ceiling down (3 decades), then one either side of the best. "continue": the
# current LR and CONTINUE_STEPS half-decades either side of it (÷10 … ×10), then one either side
# of the best.
COARSE_STEP, FINE_STEP = 10 ** 0.5, 10 ** 0.25
COARSE_STEPS = 6
CONTINUE_STEPS = 2
PLANNED_SUGGESTION_PROBES = COARSE_STEPS + 2

Batch = tuple[torch.Tensor, torch.Tensor]


# --- pure functions -------------------------------------------------------------------------------

def exp_ramp(start: float, end: float, pos: float) -> float:
    """Exponential schedule: ``start·(end/start)^pos`` for ``pos`` in [0, 1] (Smith 2017)."""
    return start * (end / start) ** pos


# --- the machinery: snapshot, batches, training runs ----------------------------------------------

class _Replay:
    """A restartable source of batches (see the module docstring)."""

    def __init__(self, source: Iterable | Callable[[], Iterator]):
        self.source = source
        # Not `iter(source) is source`: that would start a DataLoader's worker processes.
        self.one_shot = isinstance(source, Iterator)
        self.cache: list = []

    def one_pass(self) -> Iterator:
        if callable(self.source):
            return iter(self.source())
        if self.one_shot:
            return self._replay()
        return iter(self.source)

    def _replay(self) -> Iterator:
        yield from list(self.cache)
        for item in self.source:
            self.cache.append(item)
            yield item

    def cycle(self, n: int) -> Iterator:
        """Exactly ``n`` batches, restarting the source as often as needed."""
        produced = 0
        while True:
            empty = True
            for item in self.one_pass():
                empty = False
                yield item
                produced += 1
                if produced == n:
                    return
            if empty:
                raise ValueError("train_batches yielded no batches")


class _Progress:
    """Reports the share of planned training steps done to a callback, once per chunk.

    The plan is the ramp plus :data:`PLANNED_PROBES` probes; refinement can take a few more
    probes, so the fraction is capped below 1 until :meth:`finish`. Never decreases.
    """

    def __init__(self, callback: Callable[[float], None] | None = None, planned: int = 1):
        self.callback, self.planned, self.done = callback, max(planned, 1), 0

    def advance(self, steps: int) -> None:
        self.done += steps
        if self.callback is not None:
            self.callback(min(self.done / self.planned, 0.99))

    def skip_to(self, steps: int) -> None:
        self.done = max(self.done, steps)

    def finish(self) -> None:
        if self.callback is not None:
            self.callback(1.0)


class _Session:
    """The caller's objects (never modified) plus what every run needs."""

    def __init__(self, model, optimizer, loss_fn, train_batches, val_batches, check_every):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.train = _Replay(train_batches)
        self.val = None if val_batches is None else _Replay(val_batches)
        self.check_every = check_every
        self.progress = _Progress()
        self.rng = rng_state()

    def restore_rng(self) -> None:
        set_rng_state(self.rng)

    def fresh(self):
        """A deep copy of (model, optimizer), with the RNG reset to the caller's state.
        One deepcopy call with a shared memo keeps the optimizer pointing at the copied params."""
        self.restore_rng()
        model, optimizer = copy.deepcopy((self.model, self.optimizer))
        model.train()
        return model, optimizer

    def chunks(self, model, optimizer, lrs: Sequence[float], overrides=None,
               measure_from: int = 0):
        """Train one step per LR; yield (first index, losses) per chunk of check_every steps.
        With a measurement set, steps before ``measure_from`` record their training loss
        instead (enough to see a blow-up, at no extra cost)."""
        knobs = OptimizerKnobs(optimizer)
        knobs.check(overrides or {})
        for name, value in (overrides or {}).items():
            getattr(knobs, f"set_{name}")(value)
        base = knobs.lrs()
        ratios = [b / base[0] for b in base] if base[0] > 0 else [1.0] * len(base)
        device = next(model.parameters()).device
        pending, first = [], 0
        for i, (lr, batch) in enumerate(zip(lrs, self.train.cycle(len(lrs)))):
            knobs.write_lrs([lr * r for r in ratios])
            loss = _train_step(model, optimizer, self.loss_fn, batch, device)
            measured = self.val is not None and i >= measure_from
            pending.append(self._val_loss(model, device) if measured else loss)
            if len(pending) == self.check_every or i == len(lrs) - 1:
                values = torch.stack([p.float() for p in pending]).cpu().tolist()
                self.progress.advance(len(values))   # after the chunk's one host sync
                yield first, values
                pending, first = [], i + 1

    @torch.no_grad()
    def _val_loss(self, model, device) -> torch.Tensor:
        model.eval()
        total, count = torch.zeros((), device=device), 0
        for x, y in self.val.one_pass():
            x, y = _to(x, device), _to(y, device)
            n = int(x.shape[0]) if hasattr(x, "shape") and x.dim() else 1
            total += self.loss_fn(model(x), y).detach().float() * n
            count += n
        model.train()
        return total / max(count, 1)


def _to(value, device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _train_step(model, optimizer, loss_fn, batch: Batch, device) -> torch.Tensor:
    x, y = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(_to(x, device)), _to(y, device))
    loss.backward()
    optimizer.step()
    return loss.detach()


def _constant_run(session: _Session, lr: float, steps: int, overrides=None,
                  measure_from: int = 0) -> list[float]:
    """Losses of ``steps`` constant-LR steps from the snapshot; stops at the first non-finite
    chunk (the list is then shorter and ends with the non-finite value)."""
    model, optimizer = session.fresh()
    losses: list[float] = []
    for _, values in session.chunks(model, optimizer, [lr] * steps, overrides, measure_from):
        losses.extend(values)
        if not all(math.isfinite(v) for v in values):
            break
    return losses


def _probe(session: _Session, lr: float, steps: int) -> Probe:
    """Is ``lr`` stable? Unstable when the loss goes non-finite or ends above where it began."""
    losses = _constant_run(session, lr, steps)
    final = float(np.mean(losses[-PROBE_WINDOW:]))
    stable = len(losses) == steps and math.isfinite(final) and final <= PROBE_GROWTH * losses[0]
    return Probe(lr, bool(stable), losses[0], final, len(losses))


def _scored_probe(session: _Session, lr: float, steps: int, before: float) -> Probe:
    """Where does ``steps`` steps at ``lr`` end? The mean of the last PROBE_WINDOW measured
    losses (only those steps are measured); inf when the run blew up. ``before`` is the loss at
    the snapshot (the ramp's first point), the probe's ``first_loss``."""
    losses = _constant_run(session, lr, steps, measure_from=max(0, steps - PROBE_WINDOW))
    final = float(np.mean(losses[-PROBE_WINDOW:])) if len(losses) == steps else math.inf
    final = final if math.isfinite(final) else math.inf
    return Probe(lr, bool(final <= PROBE_GROWTH * before), before, final, len(losses))


# --- public API -----------------------------------------------------------------------------------

def lr_find(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            train_batches: Iterable[Batch] | Callable[[], Iterator[Batch]], *,
            val_batches: Iterable[Batch] | Callable[[], Iterator[Batch]] | None = None,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100,
            smooth: float = 0.98, diverge: float = 4.0, refine: bool = True,
            probe_steps: int = PROBE_STEPS, check_every: int = CHECK_EVERY,
            purpose: str = "start", current_lr: float | None = None, suggest: bool = True,
            progress: Callable[[float], None] | None = None) -> LRFindResult:
    """LR range test: ramp the LR from ``start_lr`` to ``end_lr``, find the limit, suggest one.

    The ramp stops early when the smoothed loss exceeds ``diverge`` × its best, or a loss is
    non-finite (checked every ``check_every`` steps). With ``val_batches`` the curve is the
    validation loss after each step. With ``refine`` the largest stable LR is bisected with
    ``probe_steps``-step constant-LR probes; without it, it is the ramp's last LR before the stop.
    It is None when no LR up to ``end_lr`` proved unstable (raise ``end_lr``) or none stable.
    ``purpose``: ``"start"`` (the LR to start training with) or ``"continue"`` (the LR to go on
    with from here, compared with ``current_lr``, by default the optimizer's LR now); the
    result's ``suggestion_rule`` names the rule that produced the number. ``suggest=False``:
    only the limit is wanted (``panda search`` seeding its LR range from it), so no suggestion
    probes are run and the suggestion is the ramp's own (:func:`curve_suggestion`).
    ``progress``, if given, is called with the fraction done (0..1, non-decreasing) once per
    ``check_every`` steps, right after the chunk's host sync, and with 1.0 at the end.
    The caller's model, optimizer and RNG state are left bitwise unchanged.
    """
    options.check({"start_lr": start_lr, "end_lr": end_lr, "num_iter": num_iter,
                   "smooth": smooth, "diverge": diverge, "probe_steps": probe_steps,
                   "check_every": check_every, "purpose": purpose})
    if current_lr is None:
        current_lr = float(optimizer.param_groups[0]["lr"])
    POSITIVE.check("current_lr", current_lr)
    session = _Session(model, optimizer, loss_fn, train_batches, val_batches, check_every)
    planned = (PLANNED_PROBES + PLANNED_SUGGESTION_PROBES * suggest) * probe_steps \
        if refine else 0
    session.progress = _Progress(progress, num_iter + planned)
    probes: list[Probe] = []
    try:
        result = _ramp(session, start_lr, end_lr, num_iter, smooth, diverge)
        result.purpose, result.current_lr = purpose, float(current_lr)
        session.progress.skip_to(num_iter)   # an early stop skips the rest of the ramp
        if refine and any(math.isfinite(v) for v in result.losses):
            upper = result.diverged_at if result.diverged_at is not None else end_lr
            _refine(session, result, upper, probe_steps)
            if suggest:
                probes = _suggestion_probes(session, result, probe_steps)
    finally:
        session.restore_rng()
    _attach_suggestion(result, probes)
    session.progress.finish()
    return result


def _ramp(session, start_lr, end_lr, num_iter, smooth, diverge) -> LRFindResult:
    plan = [exp_ramp(start_lr, end_lr, i / (num_iter - 1)) for i in range(num_iter)]
    model, optimizer = session.fresh()
    losses, smoothed = [], []
    avg, best, stop = 0.0, math.inf, None
    for first, values in session.chunks(model, optimizer, plan):
        for i, loss in enumerate(values, start=first):
            # Debiased EMA (as in Adam's bias correction; fastai's lr_find smoothing).
            avg = smooth * avg + (1 - smooth) * loss
            smoothed.append(avg / (1 - smooth ** (i + 1)))
            losses.append(loss)
            best = min(best, smoothed[-1])
            if not math.isfinite(loss):
                stop = f"non-finite loss at step {i} (lr={plan[i]:.3g})"
            elif i > 0 and smoothed[-1] > diverge * best:
                stop = (f"diverged at step {i}: smoothed loss > {diverge:g} × best "
                        f"(lr={plan[i]:.3g})")
            if stop:
                break
        if stop:
            break
    n = len(losses)
    stopped = stop is not None
    result = LRFindResult(plan[:n], losses, smoothed, stop or f"completed {num_iter} steps",
                          diverged_at=plan[n - 1] if stopped else None,
                          max_stable_lr=plan[n - 2] if stopped and n > 1 else None,
                          validation=session.val is not None)
    logger.info("lr_find: %s", result.stop_reason)
    return result


def _refine(session: _Session, result: LRFindResult, upper: float, steps: int) -> None:
    """Coarse-to-fine: bracket [stable, unstable] below ``upper``, then bisect in log space."""
    def stable(lr: float) -> bool:
        result.refine_probes.append(_probe(session, lr, steps))
        return result.refine_probes[-1].stable

    if stable(upper):
        # Stable from the initial state for `steps` steps: keep the ramp's own estimate.
        logger.info("lr_find: probe at %.3g was stable; keeping the ramp's estimate", upper)
        return
    hi, lo = upper, None
    for _ in range(MAX_BRACKET_STEPS):
        if stable(hi / BRACKET_FACTOR):
            lo = hi / BRACKET_FACTOR
            break
        hi /= BRACKET_FACTOR
    if lo is None:
        logger.warning("lr_find: no stable LR found down to %.3g", hi)
        result.max_stable_lr = None
        return
    for _ in range(BISECTIONS):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    result.max_stable_lr = lo


def _probe_ceiling(result: LRFindResult) -> float | None:
    """Where the start probes begin: the lower of the largest stable LR and the LR of the
    ramp's lowest smoothed loss (past it, a higher LR only did worse), or None."""
    finite = [(v, lr) for v, lr in zip(result.smoothed_losses, result.lrs) if math.isfinite(v)]
    if not finite:
        return None
    lowest = min(finite)[1]
    limit = result.max_stable_lr
    return lowest if limit is None else min(limit, lowest)


def _suggestion_probes(session: _Session, result: LRFindResult, steps: int) -> list[Probe]:
    """Coarse-to-fine constant-LR probes for the suggestion (see the module docstring); every
    one starts from the snapshot, as the refinement's do."""
    before = next((v for v in result.losses if math.isfinite(v)), math.inf)
    limit = result.max_stable_lr
    done: dict[float, Probe] = {}

    def run(lrs) -> None:
        for lr in lrs:
            if lr not in done:
                done[lr] = _scored_probe(session, lr, steps, before)

    if result.purpose == "continue":
        now = result.current_lr
        run([now * COARSE_STEP ** j for j in range(-CONTINUE_STEPS, CONTINUE_STEPS + 1)
             if j <= 0 or limit is None or now * COARSE_STEP ** j < limit])
    else:
        ceiling = _probe_ceiling(result)
        if ceiling is None:
            return []
        run([ceiling / COARSE_STEP ** j for j in range(1, COARSE_STEPS + 1)])
    best = min(done.values(), key=lambda p: p.final_loss)
    if math.isfinite(best.final_loss):
        top = limit if result.purpose == "continue" else _probe_ceiling(result)
        run([lr for lr in (best.lr * FINE_STEP, best.lr / FINE_STEP)
             if top is None or lr < top])
    return sorted(done.values(), key=lambda p: p.lr)


def curve_suggestion(result: LRFindResult) -> Suggestion:
    """The ramp's own suggestion: steepest descent (or valley), capped by the limit."""
    s = suggest(result.lrs, result.smoothed_losses)
    limit = result.max_stable_lr
    if limit is not None and (s.lr is None or not _stable(result, s.lr)):
        # A flat curve (e.g. from a well-trained checkpoint) puts the "steepest" point right at
        # the blow-up. Never suggest what the probes showed to be near unstable: fall back to
        # Smith's rule of a third of the largest stable LR (Smith 2017, §3.3).
        s = Suggestion(limit / STABLE_FRACTION, None, "max_stable/3", limit / 4, limit / 3,
                       reason=f"the ramp's suggestion {s.lr} was not below max_stable_lr / 3"
                       if s.lr is not None else s.reason)
    elif limit is not None and s.high > limit / STABLE_FRACTION:
        # The suggestion is safe, but a steep stretch can run on towards the blow-up: the range
        # of good LRs ends where the suggestions' own cap does.
        s = replace(s, high=limit / STABLE_FRACTION)
    return s


def _stable(result: LRFindResult, lr: float) -> bool:
    """At or below the suggestions' cap (max_stable_lr / 3); with no limit found, only where
    the ramp never diverged (a ramp that diverged at its first step has no limit either)."""
    limit = result.max_stable_lr
    if limit is None:
        return result.diverged_at is None
    return lr <= limit / STABLE_FRACTION


def _attach_suggestion(result: LRFindResult, probes: list[Probe]) -> None:
    result.flat = is_flat(result.lrs, result.losses)
    result.suggestion_probes = probes
    s = curve_suggestion(result)
    lrs, finals = [p.lr for p in probes], [p.final_loss for p in probes]
    if probes and result.purpose == "continue":
        s = continue_suggestion(lrs, finals, lrs.index(result.current_lr))
    elif probes:
        s = start_suggestion(s, lrs, finals, probes[0].first_loss)
    elif result.purpose == "continue" and result.flat and s.lr is not None and \
            _stable(result, result.current_lr):
        # A flat ramp's "steepest" point is noise (a converged checkpoint: 3× below or above
        # the run's LR for no reason), and without probes nothing else compares LRs. A ramp
        # with too few finite losses for any rule (s.lr None) says nothing, not "keep".
        now = result.current_lr
        s = Suggestion(now, None, "keep_flat", now, now,
                       reason=f"instead of {s.method} {s.lr:.3g} on a flat ramp")
    result.suggested_lr, result.suggestion_rule = s.lr, s.method
    result.suggestion_reason = s.reason
    result.suggestion_range = (s.low, s.high) if s.lr is not None else None
    if s.lr is None:
        logger.warning("lr_find: no suggestion: %s", s.reason)


def _sweep(model, optimizer, loss_fn, train_batches, *, knob: str, lr: float,
           values: Sequence[float], num_iter: int) -> SweepResult:
    """One constant-LR run per knob value from the same snapshot; best = lowest final loss."""
    POSITIVE.check("lr", lr)
    COUNT.check("num_iter", num_iter)
    if not values:
        raise ValueError(f"no {knob} values to try")
    session = _Session(model, optimizer, loss_fn, train_batches, None, CHECK_EVERY)
    finals, means = [], []
    try:
        for value in values:
            losses = _constant_run(session, lr, num_iter, {knob: value})
            complete = len(losses) == num_iter
            finals.append(float(np.mean(losses[-PROBE_WINDOW:])) if complete else math.nan)
            means.append(float(np.mean(losses)) if complete else math.nan)
    finally:
        session.restore_rng()
    ranked = [(f, v) for f, v in zip(finals, values) if math.isfinite(f)]
    best = min(ranked)[1] if ranked else None
    return SweepResult(knob, lr, list(values), finals, means, best)


def momentum_find(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, train_batches,
                  *, lr: float, one_minus_beta: Sequence[float] = ONE_MINUS_BETA,
                  num_iter: int = PROBE_STEPS) -> SweepResult:
    """Momentum range test at a fixed LR on a 1-β log grid. ``values`` and ``best`` are β
    (``momentum`` for SGD, ``betas[0]`` for Adam/AdamW)."""
    betas = [MOMENTUM.validate(1.0 - float(m)) for m in one_minus_beta]
    return _sweep(model, optimizer, loss_fn, train_batches, knob="momentum", lr=lr,
                  values=betas, num_iter=num_iter)


def weight_decay_find(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn,
                      train_batches, *, lr: float, values: Sequence[float] = WEIGHT_DECAYS,
                      num_iter: int = PROBE_STEPS) -> SweepResult:
    """Weight-decay range test at a fixed LR (log grid with an explicit 0)."""
    decays = [WEIGHT_DECAY.validate(v) for v in values]
    return _sweep(model, optimizer, loss_fn, train_batches, knob="weight_decay", lr=lr,
                  values=decays, num_iter=num_iter)
