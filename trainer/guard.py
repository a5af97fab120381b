"""Divergence detection, run on the flusher's batches: never a host sync on the training thread.

Two triggers, both common in practice:

* a non-finite loss (NaN or ±inf): the run is broken now;
* a sustained blow-up: the debiased EMA of the loss stays above ``factor`` × its best value for
  ``patience`` consecutive steps. The same criterion ends an LR range test (Smith 2017; fastai
  and torch-lr-finder use 4× / 5× the best smoothed loss); requiring it for several steps keeps a
  single noisy batch from pausing a healthy run. The smoothed loss must also exceed where the
  run started (its level after warm-up): a loss wandering between 1e-4 and 1e-3 late in
  training is 10× its best but nowhere near diverging.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.ema import exponential_moving_average

DEFAULT_FACTOR = 4.0      # smoothed loss above this multiple of its best counts as blow-up
DEFAULT_PATIENCE = 10     # consecutive blown-up steps before the guard fires
DEFAULT_SMOOTHING = 0.9   # EMA β: averages over ~10 steps
DEFAULT_WARMUP = 20       # steps before the best value is trusted (early losses are noisy)


@dataclass(frozen=True)
class Divergence:
    """Why and where a run diverged; ``first_bad_step`` is where the trouble began."""

    first_bad_step: int
    detected_step: int
    cause: str


class DivergenceGuard:
    """Feed it ``(steps, losses)`` batches; it returns a :class:`Divergence` once it fires."""

    def __init__(self, factor: float = DEFAULT_FACTOR, patience: int = DEFAULT_PATIENCE,
                 smoothing: float = DEFAULT_SMOOTHING, warmup: int = DEFAULT_WARMUP):
        if not factor > 1 or patience < 1 or not 0 <= smoothing < 1 or warmup < 0:
            raise ValueError("guard needs factor > 1, patience >= 1, smoothing in [0, 1), "
                             "warmup >= 0")
        self.factor, self.patience = factor, patience
        self.smoothing, self.warmup = smoothing, warmup
        self.best = math.inf
        self.reset()

    def reset(self) -> None:
        """Forget the smoothing state (after a rollback or resume); keep the best value."""
        self._avg, self._count, self._over_since, self._over = 0.0, 0, None, 0
        self._start_level = 0.0  # smoothed loss at the end of warm-up

    def update(self, steps: Sequence[int], losses: Sequence[float]) -> Divergence | None:
        """Feed a batch; the divergence it reveals, if any (then the guard's state is spent:
        :meth:`reset` before feeding it again).

        Vectorized (NumPy, and the EMA of :mod:`trainer.ema` in C): the flusher runs this on
        every batch while the training thread waits for the GIL, so no Python loop per row.
        """
        x = np.asarray(losses, dtype=float)
        bad = ~np.isfinite(x)
        if bad.any():
            k = int(np.argmax(bad))
            found = self._update_finite(steps[:k], x[:k])
            if found is not None:
                return found
            return Divergence(steps[k], steps[k], f"loss is {x[k]} at step {steps[k]}")
        return self._update_finite(steps, x)

    def _update_finite(self, steps: Sequence[int], x: np.ndarray) -> Divergence | None:
        n = x.size
        if n == 0:
            return None
        beta = self.smoothing
        # Debiased EMA (Kingma & Ba 2015, §3), unbiased from the first step:
        # avg_t = β·avg_{t−1} + (1−β)·x_t as a first-order IIR filter, carried across batches.
        averaged = exponential_moving_average(x, beta, start=self._avg)
        counts = self._count + np.arange(1, n + 1)
        smoothed = averaged / (1.0 - beta ** counts)
        self._avg, self._count = float(averaged[-1]), self._count + n
        warm = counts <= max(self.warmup, 1)
        if warm.any():  # the level the run started at: its smoothed loss at the end of warm-up
            self._start_level = float(smoothed[np.flatnonzero(warm)[-1]])
        # The best smoothed loss seen before each step (a blown-up step never lowers it).
        lowest = np.minimum.accumulate(smoothed)
        best_before = np.minimum(self.best, np.concatenate([[np.inf], lowest[:-1]]))
        threshold = np.maximum(self.factor * best_before, self._start_level)
        over = (counts > self.warmup) & (smoothed > threshold)
        # Length of the run of consecutive blown-up steps ending at each step, continuing the
        # previous batch's run where this batch starts with one.
        index = np.arange(n)
        last_calm = np.maximum.accumulate(np.where(over, -1, index))
        run = index - last_calm + np.where(last_calm < 0, self._over, 0)
        hits = np.flatnonzero(run >= self.patience)
        if hits.size:
            t = int(hits[0])
            start = t - int(run[t]) + 1
            first = self._over_since if start < 0 else steps[start]
            self.best = float(best_before[t])
            return Divergence(first, steps[t], f"smoothed loss {smoothed[t]:.4g} above "
                              f"{self.factor:g}× its best {self.best:.4g} for {int(run[t])} "
                              "steps")
        self.best = min(self.best, float(lowest[-1]))
        self._over = int(run[-1])
        if self._over and n - self._over >= 0:
            self._over_since = steps[n - self._over]
        return None


class EarlyStopping:
    """Patience on the validation loss (Prechelt, "Early Stopping — But When?", 1998)."""

    MIN_IMPROVEMENT = 1e-12  # smaller gains are rounding, not progress

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"early-stopping patience must be at least 1, got {patience}")
        self.patience = patience
        self.best = math.inf
        self.evals_since_best = 0

    def update(self, val_loss: float) -> str:
        """``improved`` (a new best), ``stop`` (patience exhausted) or ``wait``."""
        if val_loss < self.best - self.MIN_IMPROVEMENT:
            self.best, self.evals_since_best = val_loss, 0
            return "improved"
        self.evals_since_best += 1
        return "stop" if self.evals_since_best >= self.patience else "wait"
