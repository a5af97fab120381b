"""Knob definitions: what can be turned, within which bounds, and on which scale.

Every value a person types (UI, CLI, API, or a raw row in the store's command table) passes
through :func:`validate_knobs` twice (inside :func:`trainer.commands.validate_command`): where it
is entered and where the trainer applies it. A refused value raises :class:`KnobError` with a
one-line reason and changes nothing. Each knob declares its range once (:mod:`trainer.ranges`).

Scales follow the tuning literature (Bergstra & Bengio 2012; Ng, "Improving Deep Neural
Networks", week 3): the learning rate and weight decay are searched on a log scale, and momentum
on a log scale of 1−β, because β near 1 is extremely sensitive (β = 0.999 averages ~1000 steps,
β = 0.9995 ~2000).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.ranges import KnobError, Range, as_number


@dataclass(frozen=True)
class Knob:
    """One tunable hyperparameter and its valid range."""

    name: str
    label: str
    range: Range
    help: str

    def validate(self, value: Any, *, allow_text: bool = True) -> float:
        """Return ``value`` as a float, or raise :class:`KnobError` saying why not.

        ``allow_text`` accepts what a person types ("3e-4"); command payloads are stricter and
        must hold JSON numbers.
        """
        return self.range.check(self.name, as_number(self.name, value, allow_text=allow_text))


# Bounds are what is *meaningful*, not what is wise: an LR of 50 is allowed (a divergence guard,
# not the validator, protects from it), an LR of 0 or below is not an LR.
LR = Knob("lr", "learning rate", Range(0.0, 1e3, low_open=True), "step size; > 0")
MOMENTUM = Knob("momentum", "momentum β", Range(0.0, 1.0, high_open=True),
                "SGD momentum or Adam β1; in [0, 1)")
WEIGHT_DECAY = Knob("weight_decay", "weight decay λ", Range(0.0, 10.0),
                    "L2 / decoupled weight decay; >= 0")

KNOBS: dict[str, Knob] = {k.name: k for k in (LR, MOMENTUM, WEIGHT_DECAY)}


def validate_knobs(values: Mapping[str, Any], *, allow_text: bool = True) -> dict[str, float]:
    """Validate a ``{knob: value}`` mapping; unknown knobs and empty mappings are refused.

    Values may be typed text ("3e-4") unless ``allow_text`` is False (command payloads).
    """
    if not isinstance(values, Mapping):
        raise KnobError(f"knob values must be a mapping, got {type(values).__name__}")
    if not values:
        raise KnobError("nothing to set: give at least one of " + ", ".join(KNOBS))
    unknown = sorted(str(k) for k in set(values) - set(KNOBS))
    if unknown:
        raise KnobError(f"unknown knob {unknown[0][:40]!r}; known knobs: {', '.join(KNOBS)}")
    return {name: KNOBS[name].validate(value, allow_text=allow_text)
            for name, value in values.items()}


# --- log-scale ladders for sliders -------------------------------------------------------------

LADDER_MANTISSAS = (1.0, 2.0, 5.0)  # the 1-2-5 series (IEC 60063 E3-like), familiar from plots
FINE_MANTISSAS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)  # finer steps between the 1-2-5 stops


def log_ladder(low_exp: int, high_exp: int, *, fine: bool = True) -> list[float]:
    """Values ``m·10^e`` for e in [low_exp, high_exp], m from the 1-2-5 (or finer) series.

    The list ends exactly at ``10^high_exp``; values are rounded to 12 significant digits so
    that 3e-4 is 0.0003, not 0.00030000000000000003.
    """
    mantissas = FINE_MANTISSAS if fine else LADDER_MANTISSAS
    values = [float(f"{m * 10.0 ** e:.12g}") for e in range(low_exp, high_exp) for m in mantissas]
    return [*values, float(f"{10.0 ** high_exp:.12g}")]


def nearest_on_ladder(value: float, ladder: list[float]) -> float:
    """The ladder value closest to ``value`` in log space (0 maps to the smallest value)."""
    if value <= 0:
        return ladder[0]
    return min(ladder, key=lambda v: abs(math.log(v) - math.log(value)) if v > 0 else math.inf)


def format_sci(value: float) -> str:
    """Scientific notation for knob values: 0.003 → '3e-03', 0.0015 → '1.5e-03', 0 → '0'."""
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    mantissa = float(f"{value / 10.0 ** exponent:.4g}")
    if abs(mantissa) >= 10:  # rounding carried over, e.g. 9.99995 → 10
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:g}e{exponent:+03d}"
