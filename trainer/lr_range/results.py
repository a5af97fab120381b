"""What range tests return: plain dataclasses that round-trip through JSON.

NaN and ±inf (a diverged loss) are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``,
so ``json.dumps(result.to_dict(), allow_nan=False)`` works and the run store can hold them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


def _enc(value):
    """JSON-safe float: NaN and ±inf become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    if isinstance(value, dict):
        return {k: _enc(v) for k, v in value.items()}
    return value


def _dec(value):
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, list):
        return [_dec(v) for v in value]
    return value


class _JsonMixin:
    def to_dict(self) -> dict:
        """Plain, JSON-safe dict (``json.dumps(..., allow_nan=False)`` works)."""
        return {k: _enc(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        """Inverse of :meth:`to_dict`."""
        return cls(**{f.name: _dec(data[f.name]) for f in fields(cls) if f.name in data})


@dataclass
class Probe(_JsonMixin):
    """One constant-LR run from the initial state."""

    lr: float
    stable: bool
    first_loss: float
    final_loss: float
    steps: int


@dataclass
class LRFindResult(_JsonMixin):
    """Outcome of :func:`lr_find`; a diverged run is a result, see ``stop_reason``."""

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    stop_reason: str
    suggested_lr: float | None = None
    suggestion_rule: str | None = None    # which rule produced it (suggestions.RULES)
    suggestion_range: tuple[float, float] | None = None
    suggestion_reason: str | None = None
    max_stable_lr: float | None = None
    diverged_at: float | None = None
    refine_probes: list[Probe] = field(default_factory=list)
    validation: bool = False
    purpose: str = "start"                # "start" or "continue" (see lr_find)
    current_lr: float | None = None       # the LR a "continue" suggestion is compared with
    flat: bool | None = None              # the ramp said nothing about the LR (is_flat)
    suggestion_probes: list[Probe] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> LRFindResult:
        """Inverse of :meth:`to_dict`; results stored before a field existed load with its
        default (``suggestion_method`` was the name of ``suggestion_rule``)."""
        result = super().from_dict(data)
        if "suggestion_rule" not in data:
            result.suggestion_rule = data.get("suggestion_method")
        result.refine_probes = [Probe.from_dict(p) for p in data.get("refine_probes", [])]
        result.suggestion_probes = [Probe.from_dict(p)
                                    for p in data.get("suggestion_probes", [])]
        if result.suggestion_range is not None:
            result.suggestion_range = tuple(result.suggestion_range)
        return result


@dataclass
class SweepResult(_JsonMixin):
    """Outcome of a momentum or weight-decay sweep at a fixed LR."""

    knob: str
    lr: float
    values: list[float]
    losses: list[float]          # final loss per value (mean of a probe's last steps)
    mean_losses: list[float]
    best: float | None
