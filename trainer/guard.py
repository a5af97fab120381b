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
        for step, loss in zip(steps, losses):
            if not math.isfinite(loss):
                return Divergence(step, step, f"loss is {loss} at step {step}")
            self._count += 1
            # Debiased EMA (Kingma & Ba 2015, §3): unbiased from the first step.
            self._avg = self.smoothing * self._avg + (1 - self.smoothing) * loss
            smoothed = self._avg / (1 - self.smoothing ** self._count)
            if self._count <= max(self.warmup, 1):
                self._start_level = smoothed
            threshold = max(self.factor * self.best, self._start_level)
            if self._count > self.warmup and smoothed > threshold:
                self._over_since = step if self._over == 0 else self._over_since
                self._over += 1
                if self._over >= self.patience:
                    return Divergence(self._over_since, step,
                                      f"smoothed loss {smoothed:.4g} above {self.factor:g}× "
                                      f"its best {self.best:.4g} for {self._over} steps")
            else:
                self._over = 0
                self.best = min(self.best, smoothed)
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
