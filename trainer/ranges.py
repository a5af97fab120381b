"""Declared ranges and choices: every number and name a person can give Panda, checked one way.

A setting declares its valid values once, as a :class:`Range` or a :class:`Choice`; the API,
the CLI (``argparse`` ``type=`` / ``choices=`` built from the declaration), the dashboard and the
LR-finder job all check through it, so a value is refused with the same one-line reason
wherever it is typed, and nothing changes.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class KnobError(ValueError):
    """A value Panda refuses (a knob, a command, a setting), with a one-line human reason."""


def as_number(name: str, value: Any, *, allow_text: bool = True) -> float:
    """``value`` as a finite float, or :class:`KnobError` saying why not.

    ``allow_text`` accepts what a person types ("3e-4"); command payloads are stricter and
    must hold JSON numbers. Booleans are not numbers here.
    """
    kinds = (int, float, str) if allow_text else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise KnobError(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise KnobError(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise KnobError(f"{name} must be finite, got {value}")
    return number


@dataclass(frozen=True)
class Range:
    """A number's valid interval: ``low``/``high`` inclusive unless marked open; integers only
    when ``integer``. ``None`` is allowed only when ``optional``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def describe(self) -> str:
        """The interval as a person reads it: ``in (0, 1000]``, ``>= 1``, ``a whole number >= 0``.
        """
        what = "a whole number " if self.integer else ""
        if math.isinf(self.high):
            bound = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
            return f"{what}{bound}" if not math.isinf(self.low) else f"{what}any".strip()
        if math.isinf(self.low):
            return f"{what}{'<' if self.high_open else '<='} {self.high:g}"
        return (f"{what}in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def contains(self, number: float) -> bool:
        too_low = number <= self.low if self.low_open else number < self.low
        too_high = number >= self.high if self.high_open else number > self.high
        return not (too_low or too_high)

    def check(self, name: str, value: Any, *, allow_text: bool = False) -> Any:
        """``value`` as a number inside the range (an ``int`` for integer ranges), or
        :class:`KnobError` with a one-line reason."""
        if value is None and self.optional:
            return None
        if self.integer:
            number = self._integer(name, value, allow_text)
        else:
            number = as_number(name, value, allow_text=allow_text)
        if not self.contains(number):
            raise KnobError(f"{name} must be {self.describe()}, got {number:g}")
        return number

    def _integer(self, name: str, value: Any, allow_text: bool) -> int:
        if isinstance(value, str) and allow_text:
            try:
                return int(value.strip())
            except ValueError:
                raise KnobError(f"{name} must be a whole number, got {value[:40]!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise KnobError(f"{name} must be a whole number, got {value!r}"[:120])
        return value

    def parser(self, name: str) -> Callable[[str], Any]:
        """An ``argparse`` ``type=`` that checks typed text against this range."""
        def parse(text: str) -> Any:
            try:
                return self.check(name, text, allow_text=True)
            except KnobError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        parse.__name__ = name  # argparse names the type in its messages
        return parse


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of names (a task, an optimizer, a format …)."""

    options: tuple[str, ...]

    def check(self, name: str, value: Any) -> str:
        if value not in self.options:
            raise KnobError(f"unknown {name} {str(value)[:40]!r}; choose one of "
                            f"{', '.join(self.options)}")
        return value


def check_fields(values: dict[str, Any], declared: dict[str, Range | Choice]) -> dict[str, Any]:
    """Check each of ``values`` that has a declaration; return them normalized."""
    return {name: declared[name].check(name, value) if name in declared else value
            for name, value in values.items()}


POSITIVE = Range(0.0, low_open=True)                 # a finite number > 0
NON_NEGATIVE = Range(0.0)                             # a finite number >= 0
COUNT = Range(1, integer=True)                        # a whole number >= 1
STEP = Range(0, integer=True)                         # a step index, >= 0
FRACTION = Range(0.0, 1.0, high_open=True)            # in [0, 1)
