"""Coarse to fine: where each round of a search samples, and why (pure functions, no Optuna).

Round 1 samples the whole space. Each later round samples a box, in log space, around the best
trials of the round before, widened by a margin, and never outside the space the person asked
for (Ng, "Improving Deep Neural Networks", week 3: "coarse to fine"; the same zoom Bergstra &
Bengio 2012 describe for manual search after a random one). Only the log-scale parameters
(LR, 1 − β, weight decay) are narrowed: Optuna cannot change a categorical parameter's choices
within a study, so batch size, hidden units and decay shape keep all their choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.search.space import Box

DEFAULT_TOP = 0.25     # a round is built around this share of the previous round's trials
MIN_TOP = 2            # ... and at least this many (one point says nothing about a region)
DEFAULT_MARGIN = 0.15  # widen by this share of the current box's width (in log space) per side


@dataclass(frozen=True)
class Scored:
    """One finished trial as a round sees it: its number, whether it ran to the end, its best
    validation loss, and its values of the log-scale parameters it drew."""

    number: int
    complete: bool
    value: float
    params: dict[str, float]


def split_budget(trials: int, rounds: int) -> list[int]:
    """Trials per round: an even split, the first rounds taking any remainder."""
    if rounds < 1 or trials < rounds:
        raise ValueError(f"{trials} trials cannot fill {rounds} rounds (at least one each)")
    base, extra = divmod(trials, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


def best_trials(scored: Sequence[Scored], top: float = DEFAULT_TOP,
                min_top: int = MIN_TOP) -> list[Scored]:
    """The trials a next round is built around: the best ``top`` share (at least ``min_top``),
    trials that ran to the end before pruned ones (a pruned trial's loss is from fewer
    epochs), each group by validation loss."""
    usable = [s for s in scored if math.isfinite(s.value)]
    ranked = sorted(usable, key=lambda s: (not s.complete, s.value))
    count = max(min_top, math.ceil(top * len(scored)))
    return ranked[:count]


def next_box(box: Box, outer: Box, best: Sequence[Scored],
             margin: float = DEFAULT_MARGIN) -> Box:
    """The box around ``best``: per parameter, the span of their values in log10, widened by
    ``margin`` × the current box's log width on each side, clipped to ``outer``. A parameter
    none of them drew (e.g. weight decay when all had 0) keeps its current range."""
    new: Box = {}
    for name, (low, high) in box.items():
        values = [math.log10(s.params[name]) for s in best
                  if s.params.get(name) is not None and s.params[name] > 0]
        if not values:
            new[name] = (low, high)
            continue
        pad = margin * (math.log10(high) - math.log10(low))
        outer_low, outer_high = outer.get(name, (low, high))
        lo = max(math.log10(outer_low), min(values) - pad)
        hi = min(math.log10(outer_high), max(values) + pad)
        new[name] = (_round(10.0 ** lo), _round(10.0 ** hi))
    return new


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def decades(box: Box) -> dict[str, float]:
    """Each parameter's width in decades (what "narrower" means on a log scale)."""
    return {name: math.log10(high) - math.log10(low) for name, (low, high) in box.items()}


def plan(round_number: int, box: Box, outer: Box, scored: Sequence[Scored], *,
         top: float = DEFAULT_TOP, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """The record of round ``round_number`` (≥ 2), built from the previous round's ``scored``
    trials sampled in ``box``: the new box, the trials it was built around, and why."""
    best = best_trials(scored, top)
    new = next_box(box, outer, best, margin)
    numbers = [s.number for s in best]
    if best:
        why = (f"around the best {len(best)} of {len(scored)} finished trials of round "
               f"{round_number - 1} (#{', #'.join(map(str, numbers))}), widened by "
               f"{margin:g} of the previous width on each side (log scale)")
    else:
        why = f"round {round_number - 1} left no finished trial: the previous box again"
    return {"round": round_number, "box": new, "previous": box, "from_trials": numbers,
            "why": why}


def first_plan(outer: Box) -> dict[str, Any]:
    return {"round": 1, "box": outer, "previous": None, "from_trials": [],
            "why": "coarse: the whole space"}
