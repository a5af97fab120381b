"""Where an LR range test says to train: pure functions of ``(lrs, losses)``.

Every rule shares one signature, ``(lrs, losses) -> (lr, index)`` with ``(None, None)`` when
the losses cannot tell (after fastai's ``callback/schedule.py`` suggestion functions). On the
ramp's curve:

* :func:`steepest`: the most negative slope of the loss against log LR, the point where the
  loss responds fastest to the LR (Smith 2017, "Cyclical Learning Rates", §3.3);
* :func:`valley`: the middle of the longest descent (after fastai's ``valley``), the fallback;
* :func:`suggest`: steepest first, valley second, with a range of good LRs around the choice.

On constant-LR probes from the same snapshot (``lrs`` the probes' LRs, ``losses`` the loss each
ended at):

* :func:`probe_best`: the LR whose probe ended lowest; :func:`probe_vertex`: where between the
  probes the loss is lowest;
* :func:`start_suggestion` ("the LR to start training with") and :func:`continue_suggestion`
  ("the LR to continue this run with") turn probes into the suggestion; every suggestion names
  the rule that produced it (:data:`RULES`).

:func:`is_flat` says when a ramp carries no information about the LR (a converged checkpoint,
a plateau). Non-finite losses (a diverged tail) are skipped; the LRs must rise strictly.

Why the start rule is what it is, with the evidence: README, "LR suggestions"
(``benchmarks/lr_suggestion.py``): on the built-in tasks, the final validation loss of a fixed
training budget at each rule's LR against the best LR of a dense grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

MIN_FINITE_POINTS = 5         # fewer finite points than this give no suggestion
SKIP_START_FRACTION = 0.1     # leading share of the curve ignored by `steepest` (noisy, tiny LRs)
RANGE_SLOPE_FRACTION = 0.5    # suggestion range: where the slope is >= half the steepest slope
VALLEY_POSITION = 0.5         # where in the longest descent `valley` points (fastai: about half)
# A ramp is flat when its loss falls by less than FLAT_DROP of its starting level, or by less than
# FLAT_NOISE times its own step-to-step noise: a converged checkpoint measured 2.828e-5 → 2.757e-5
# over 8 decades of LR (2.5 %), a plateau (spirals from its initial weights) 0.694 → 0.685.
FLAT_DROP = 0.05
FLAT_NOISE = 3.0
# Probes can tell LRs apart when the best one ended at least PROBE_PROGRESS below the snapshot's
# loss; on a plateau (spirals: 0.69 → 0.65 at every LR) they compare noise, and the curve's rule
# is kept.
PROBE_PROGRESS = 0.2
# The best probe's LR is divided by PROBE_BACKOFF: a probe is a few dozen steps, and the LR that
# is best over a few steps is higher than the one that is best over a few hundred (short-horizon
# bias; Wu et al. 2018, "Understanding Short-Horizon Bias in Stochastic Meta-Optimization").
# 2 is measured, not derived: README, "LR suggestions" has ÷1, ÷1.5 and ÷2 side by side. On the
# digits MLP, AdamW's 40-step best (0.016-0.024) is 1.6-3.6× its 400-step best (0.0056-0.01);
# SGD's is not (0.06-0.1 against 0.03-0.1), but SGD blows up at 0.18, 2-6× its 400-step best
# (20-90× the loss), so a shortfall costs it a few % and an overshoot everything.
PROBE_BACKOFF = 2.0
PROBE_RANGE = 0.1   # probe range: LRs whose probe ended within 10 % of the best one
KEEP_MARGIN = 0.02  # continue: another LR must end ≥ 2 % below the current LR's probe to win
Suggester = Callable[[Sequence[float], Sequence[float]], tuple[float | None, int | None]]


def _finite_curve(lrs: Sequence[float], losses: Sequence[float]):
    """Finite points of a curve as (indices, log lrs, losses); checks lrs rise strictly."""
    lr_arr, loss_arr = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lr_arr.shape != loss_arr.shape:
        raise ValueError(f"lrs and losses differ in length: {lr_arr.size} vs {loss_arr.size}")
    if np.any(lr_arr <= 0) or np.any(np.diff(lr_arr) <= 0):
        raise ValueError("lrs must be positive and strictly increasing")
    idx = np.flatnonzero(np.isfinite(loss_arr))
    return idx, np.log(lr_arr[idx]), loss_arr[idx]


def _steepest_window(y: np.ndarray) -> tuple[int, int]:
    """Indices [start, stop] where steepest descent may lie: skip the noisy start and
    everything after the minimum (the unstable end, where the loss only rises or explodes)."""
    return int(len(y) * SKIP_START_FRACTION), int(np.argmin(y))


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float | None, int | None]:
    """LR of the most negative d loss / d log lr (central differences), or ``(None, None)``."""
    idx, x, y = _finite_curve(lrs, losses)
    if len(idx) < MIN_FINITE_POINTS:
        return None, None
    grads = np.gradient(y, x)
    start, stop = _steepest_window(y)
    if stop <= start:
        return None, None
    k = start + int(np.argmin(grads[start:stop + 1]))
    if grads[k] >= 0:
        return None, None
    return float(lrs[idx[k]]), int(idx[k])


def _longest_descent(y: np.ndarray) -> tuple[int, int]:
    """(first, last) positions of the longest run of consecutive decreases of ``y``."""
    best, run_start = (0, 0), 0
    for k in range(1, len(y)):
        if y[k] >= y[k - 1]:
            run_start = k
        elif k - run_start > best[1] - best[0]:
            best = (run_start, k)
    return best


def valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float | None, int | None]:
    """Midpoint (in log lr) of the longest descent of the curve (after fastai's ``valley``)."""
    idx, _, y = _finite_curve(lrs, losses)
    if len(idx) < MIN_FINITE_POINTS:
        return None, None
    first, last = _longest_descent(y)
    if last == first:
        return None, None
    k = first + round((last - first) * VALLEY_POSITION)
    return float(lrs[idx[k]]), int(idx[k])


@dataclass
class Suggestion:
    """A suggested LR, the rule that chose it, a (low, high) range, or why there is none."""

    lr: float | None = None
    index: int | None = None
    method: str | None = None
    low: float | None = None
    high: float | None = None
    reason: str | None = None


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Steepest descent first, valley as the fallback.

    Steepest descent wins when it finds a falling slope: it is the point where the loss responds
    fastest to the LR (Smith 2017) and it depends on local slopes only. It needs a descent
    between the trimmed start and the minimum; when the minimum sits in the trimmed start (a
    short or flat-then-noisy curve), ``valley`` still finds the longest descent anywhere.
    """
    idx, x, y = _finite_curve(lrs, losses)
    if len(idx) < MIN_FINITE_POINTS:
        return Suggestion(reason=f"only {len(idx)} finite loss points, need {MIN_FINITE_POINTS}")
    lr, k = steepest(lrs, losses)
    if lr is not None:
        pos = int(np.searchsorted(idx, k))
        lo, hi = _steep_range(np.gradient(y, x), pos, _steepest_window(y))
        return Suggestion(lr, k, "steepest", float(lrs[idx[lo]]), float(lrs[idx[hi]]))
    lr, k = valley(lrs, losses)
    if lr is not None:
        first, last = _longest_descent(y)
        return Suggestion(lr, k, "valley", float(lrs[idx[first]]), float(lrs[idx[last]]))
    return Suggestion(reason="the loss never decreased over the ramp")


def _steep_range(grads: np.ndarray, k: int, window: tuple[int, int]) -> tuple[int, int]:
    """Widen around ``k`` while the slope stays at least RANGE_SLOPE_FRACTION of the steepest."""
    limit = RANGE_SLOPE_FRACTION * grads[k]
    lo, hi = k, k
    while lo > window[0] and grads[lo - 1] <= limit:
        lo -= 1
    while hi < window[1] and grads[hi + 1] <= limit:
        hi += 1
    return lo, hi


# --- constant-LR probes ---------------------------------------------------------------------------

#: Every rule a suggestion can come from (``LRFindResult.suggestion_rule``), in words.
RULES = {
    "probes": "best of short constant-LR probes from the same weights (interpolated), ÷ 2",
    "steepest": "steepest descent of the ramp's smoothed loss",
    "valley": "middle of the ramp's longest descent",
    "max_stable/3": "a third of the largest stable LR",
    "continue_probes": "lowest loss after short constant-LR probes around the current LR",
    "keep_current": "no LR beat the current one over the probes",
    "keep_flat": "the ramp is flat and no probes ran: nothing shows another LR is better",
}
PROBE_RULES = ("probes", "continue_probes", "keep_current")  # the rules that compare probes
KEEP_RULES = ("keep_current", "keep_flat")  # the answer is the run's own LR: nothing to apply


def probe_best(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float | None, int | None]:
    """The LR whose probe ended at the lowest finite loss (a diverged probe never wins)."""
    idx, _, y = _finite_curve(lrs, losses)
    if not len(idx):
        return None, None
    k = int(idx[int(np.argmin(y))])
    return float(lrs[k]), k


def probe_vertex(lrs: Sequence[float],
                 losses: Sequence[float]) -> tuple[float | None, int | None]:
    """Where the probes' loss is lowest between probes: the vertex of the parabola through the
    best probe and its two neighbours, in log LR (parabolic interpolation, Press et al.,
    "Numerical Recipes", 3rd ed., §10.3, eq. 10.3.1), kept between the neighbours. The index is
    the best probe's. The best probe's own LR when it is an end of the probes, a neighbour
    diverged, or the three ended alike.

    Why: the probes are a quarter of a decade apart (1.78×), so the best one can be a third off
    the LR the probes point at. On the digits MLP with SGD, where 1.78× too low costs 10-20 %
    after 400 steps, this took the suggestion from 1.050 to 1.024 × the grid's best (README,
    "LR suggestions", "probes ÷2" against "Panda now").
    """
    lr, k = probe_best(lrs, losses)
    if lr is None or k == 0 or k == len(lrs) - 1 or \
            not (np.isfinite(losses[k - 1]) and np.isfinite(losses[k + 1])):
        return lr, k
    (a, b, c), (fa, fb, fc) = np.log(lrs[k - 1:k + 2]), losses[k - 1:k + 2]
    p, q = (b - a) * (fb - fc), (b - c) * (fb - fa)
    denominator = p - q
    if denominator >= 0:     # < 0 whenever the middle is lowest, unless all three ended alike
        return lr, k
    vertex = b - 0.5 * ((b - a) * p - (b - c) * q) / denominator
    return float(np.exp(np.clip(vertex, a, c))), k


def _probe_range(lrs: Sequence[float], losses: Sequence[float], best: int) -> tuple[float, float]:
    """Where the best LR lies: from the probe below the lowest to the probe above the highest
    LR whose probe ended within PROBE_RANGE of the best one (the neighbours did worse)."""
    close = [i for i, loss in enumerate(losses)
             if np.isfinite(loss) and loss <= losses[best] + PROBE_RANGE * abs(losses[best])]
    return float(lrs[max(min(close) - 1, 0)]), float(lrs[min(max(close) + 1, len(lrs) - 1)])


def start_suggestion(curve: Suggestion, lrs: Sequence[float], losses: Sequence[float],
                     snapshot_loss: float) -> Suggestion:
    """"The LR to start training with": the probes' best LR (:func:`probe_vertex`) ÷
    :data:`PROBE_BACKOFF`, unless the probes cannot tell (none ended :data:`PROBE_PROGRESS`
    below ``snapshot_loss``, the loss before training) or the curve's suggestion ``curve`` is
    lower (then that one).

    Two short-horizon estimates that both err high over a longer run: the lower one is kept.
    ``lrs`` rise strictly; ``losses`` are the probes' final losses.
    """
    lr, k = probe_vertex(lrs, losses)
    if lr is None or not np.isfinite(snapshot_loss) or \
            losses[k] > (1 - PROBE_PROGRESS) * snapshot_loss:
        why = "no probe finished" if lr is None else (
            f"the probes cannot tell LRs apart: the best ended at {losses[k]:.4g}, less than "
            f"{PROBE_PROGRESS:.0%} below the loss before training ({snapshot_loss:.4g})")
        return replace(curve, reason=why if curve.reason is None else f"{curve.reason}; {why}")
    choice = lr / PROBE_BACKOFF
    if curve.lr is not None and curve.lr < choice:
        return replace(curve, reason=f"below the probes' best LR ÷ {PROBE_BACKOFF:g} "
                                     f"({choice:.3g})")
    low, high = _probe_range(lrs, losses, k)
    return Suggestion(choice, None, "probes", low / PROBE_BACKOFF, high / PROBE_BACKOFF)


def continue_suggestion(lrs: Sequence[float], losses: Sequence[float],
                        current: int) -> Suggestion:
    """"The LR to continue this run with": the LR whose probe from the run's checkpoint ended
    lowest, but the current LR (``lrs[current]``) unless another ended at least
    :data:`KEEP_MARGIN` below it. Over a converged checkpoint every probe ends alike, and the
    answer is to keep the LR, not to jump to the noisiest one."""
    lr, k = probe_best(lrs, losses)
    if lr is None:
        return Suggestion(reason="every probe diverged")
    now = losses[current]
    if np.isfinite(now) and losses[k] >= (1 - KEEP_MARGIN) * now:
        low, high = _probe_range(lrs, losses, current)
        return Suggestion(float(lrs[current]), None, "keep_current", min(low, lrs[current]),
                          max(high, lrs[current]))
    low, high = _probe_range(lrs, losses, k)
    return Suggestion(lr, None, "continue_probes", low, high)


# --- flat curves ----------------------------------------------------------------------------------

def noise_level(losses: Sequence[float]) -> float:
    """Robust step-to-step noise (σ) of a curve: the median absolute second difference, scaled
    so that white noise of σ gives σ (a second difference of white noise has variance 6σ²; the
    median absolute deviation of a normal is 0.6745σ). Second differences cancel any locally
    linear trend, so a steep descent is not taken for noise."""
    y = np.asarray([v for v in losses if np.isfinite(v)], dtype=float)
    if len(y) < 3:
        return 0.0
    return float(np.median(np.abs(np.diff(y, 2))) / 0.6745 / np.sqrt(6))


def is_flat(lrs: Sequence[float], losses: Sequence[float]) -> bool:
    """Does the ramp say nothing about the LR? True when the loss (finite prefix) falls by less
    than :data:`FLAT_DROP` of its starting level or less than :data:`FLAT_NOISE` × its noise,
    or when there are too few finite points to tell. The fall is measured from the median of
    the first tenth of the curve to the lowest running median over a tenth (at least five
    points), so one lucky batch is no descent."""
    _finite_curve(lrs, losses)  # checks the shapes and the LRs
    y = np.asarray(losses, dtype=float)
    bad = np.flatnonzero(~np.isfinite(y))
    y = y[:bad[0]] if len(bad) else y
    if len(y) < MIN_FINITE_POINTS:
        return True
    window = max(MIN_FINITE_POINTS, len(y) // 10)
    start = float(np.median(y[:window]))
    running = [float(np.median(y[i:i + window])) for i in range(len(y) - window + 1)]
    drop = start - min(running)
    return bool(drop < max(FLAT_DROP * abs(start), FLAT_NOISE * noise_level(y)))
