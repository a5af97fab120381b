"""Where an LR range test's curve says to train: pure functions of ``(lrs, losses)``.

Every rule shares one signature, ``(lrs, losses) -> (lr, index)`` with ``(None, None)`` when
the curve cannot tell (after fastai's ``callback/schedule.py`` suggestion functions):

* :func:`steepest`: the most negative slope of the loss against log LR, the point where the
  loss responds fastest to the LR (Smith 2017, "Cyclical Learning Rates", §3.3);
* :func:`valley`: the middle of the longest descent (fastai's ``valley``), the fallback;
* :func:`suggest`: steepest first, valley second, with a range of good LRs around the choice.

Non-finite losses (a diverged tail) are skipped; the LRs must rise strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_FINITE_POINTS = 5         # fewer finite points than this give no suggestion
SKIP_START_FRACTION = 0.1     # leading share of the curve ignored by `steepest` (noisy, tiny LRs)
RANGE_SLOPE_FRACTION = 0.5    # suggestion range: where the slope is >= half the steepest slope
VALLEY_POSITION = 0.5         # where in the longest descent `valley` points (fastai: about half)
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
