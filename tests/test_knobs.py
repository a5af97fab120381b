"""Knobs: which values Panda accepts, on which scale it offers them, and how it prints them.

Specification: a bad value (LR <= 0, NaN, inf, a string that is not a number, a bool, beta outside
[0, 1), negative weight decay, an unknown knob, a malformed payload) is refused with a KnobError
whose message says why; a good value comes back as a float. Ladders are 1-2-5 log scales ending
exactly at 10^k; format_sci prints the values people type.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trainer.commands import validate_command
from trainer.knobs import (
    KNOBS,
    KnobError,
    format_sci,
    log_ladder,
    nearest_on_ladder,
    validate_knobs,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(("knob", "value", "expected"), [
    ("lr", 0.01, 0.01),
    ("lr", 1, 1.0),
    ("lr", "3e-4", 3e-4),          # text as typed on the command line
    ("lr", 1e-12, 1e-12),
    ("lr", 1e3, 1e3),              # allowed upper bound (a divergence guard protects, not this)
    ("momentum", 0.0, 0.0),
    ("momentum", 0.9, 0.9),
    ("momentum", 0.999, 0.999),
    ("weight_decay", 0, 0.0),      # explicit zero
    ("weight_decay", 5e-4, 5e-4),
    ("weight_decay", 10, 10.0),
])
def test_good_values_are_accepted_as_floats(knob, value, expected):
    out = validate_knobs({knob: value})
    assert out == {knob: expected} and type(out[knob]) is float


@pytest.mark.parametrize(("knob", "value", "reason"), [
    ("lr", 0, r"lr must be in \(0"),
    ("lr", -0.01, r"lr must be in \(0"),
    ("lr", 1e4, "lr must be in"),
    ("lr", math.nan, "finite"),
    ("lr", math.inf, "finite"),
    ("lr", -math.inf, "finite"),
    ("lr", "nan", "finite"),
    ("lr", "inf", "finite"),
    ("lr", "fast", "must be a number"),
    ("lr", "", "must be a number"),
    ("lr", True, "must be a number, got bool"),
    ("lr", False, "must be a number, got bool"),
    ("lr", None, "must be a number"),
    ("lr", [0.1], "must be a number"),
    ("lr", {"v": 0.1}, "must be a number"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\)"),
    ("momentum", 1.5, "momentum must be in"),
    ("momentum", -0.1, "momentum must be in"),
    ("momentum", math.nan, "finite"),
    ("weight_decay", -1e-4, "weight_decay must be in"),
    ("weight_decay", math.inf, "finite"),
    ("weight_decay", 11, "weight_decay must be in"),
])
def test_bad_values_are_refused_with_a_reason(knob, value, reason):
    with pytest.raises(KnobError, match=reason) as info:
        validate_knobs({knob: value})
    assert "\n" not in str(info.value)  # one line: fits a CLI error or a UI toast


def test_unknown_and_empty_knob_sets_are_refused():
    with pytest.raises(KnobError, match="unknown knob 'dropout'"):
        validate_knobs({"lr": 0.1, "dropout": 0.5})
    with pytest.raises(KnobError, match="nothing to set"):
        validate_knobs({})
    with pytest.raises(KnobError, match="must be a mapping"):
        validate_knobs([("lr", 0.1)])


def test_one_bad_value_refuses_the_whole_set():
    with pytest.raises(KnobError, match="momentum"):
        validate_knobs({"lr": 0.1, "momentum": 1.0})


@pytest.mark.parametrize(("kind", "payload", "expected"), [
    ("set", '{"lr": 0.1}', {"lr": 0.1}),
    ("set", {"lr": 0.1, "momentum": 0}, {"lr": 0.1, "momentum": 0.0}),
    ("pause", "", {}),
    ("pause", "{}", {}),
    ("resume", None, {}),
    ("stop", {}, {}),
    ("checkpoint", "{}", {}),
    ("schedule", '{"shape": "exponential", "rate": 0.9}',
     {"shape": "exponential", "rate": 0.9}),
])
def test_good_commands_are_normalized(kind, payload, expected):
    out = validate_command(kind, payload)
    assert {k: out[k] for k in expected} == expected


@pytest.mark.parametrize(("kind", "payload", "reason"), [
    ("set", "{lr: 0.1", "malformed command payload"),
    ("set", "not json at all", "malformed command payload"),
    ("set", '{"lr": NaN}', "finite"),           # Python's json reads NaN; still refused
    ("set", '{"lr": Infinity}', "finite"),
    ("set", '{"lr": -1}', "lr must be in"),
    ("set", '{"lr": true}', "got bool"),
    ("set", '{"lr": "abc"}', "must be a number"),
    ("set", '{"lr": "0.1"}', "must be a number"),  # payloads hold JSON numbers, not text
    ("set", '{"momentum": 1}', "momentum must be in"),
    ("set", '{"weight_decay": -0.1}', "weight_decay must be in"),
    ("set", '{"beta2": 0.99}', "unknown knob"),
    ("set", "[0.1]", "must be an object"),
    ("set", '"0.1"', "must be an object"),
    ("set", "null", "nothing to set"),
    ("set", "{}", "nothing to set"),
    ("pause", '{"now": true}', "takes no arguments"),
    ("explode", "{}", "unknown command 'explode'"),
    (None, "{}", "unknown command"),
    ("schedule", '{"shape": "zigzag"}', "unknown decay shape"),
])
def test_bad_commands_are_refused_with_a_reason(kind, payload, reason):
    with pytest.raises(KnobError, match=reason):
        validate_command(kind, payload)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_lr_validation_agrees_with_its_definition(value):
    ok = math.isfinite(value) and 0 < value <= 1e3
    if ok:
        assert validate_knobs({"lr": value}) == {"lr": value}
    else:
        with pytest.raises(KnobError):
            validate_knobs({"lr": value})


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_momentum_validation_agrees_with_its_definition(value):
    ok = math.isfinite(value) and 0 <= value < 1
    if ok:
        assert KNOBS["momentum"].validate(value) == value
    else:
        with pytest.raises(KnobError):
            KNOBS["momentum"].validate(value)


# --- ladders ------------------------------------------------------------------------------------

def test_coarse_ladder_is_exactly_the_1_2_5_series():
    assert log_ladder(-4, 0, fine=False) == [
        1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


@pytest.mark.parametrize(("low", "high"), [(-4, 0), (-7, 1), (-3, -1), (0, 2)])
def test_fine_ladder_contains_1_2_5_values_is_increasing_and_ends_at_10_to_the_k(low, high):
    ladder = log_ladder(low, high)
    assert ladder[0] == float(f"1e{low}")
    assert ladder[-1] == float(f"1e{high}")          # exactly, not 0.9999999
    assert all(a < b for a, b in itertools.pairwise(ladder))
    for e in range(low, high):
        for m in (1, 2, 5):
            assert float(f"{m}e{e}") in ladder          # exact decimal values, e.g. 3e-4 == 0.0003
    assert 3e-4 in log_ladder(-4, 0)


def test_nearest_on_ladder_works_in_log_space():
    ladder = log_ladder(-4, 0, fine=False)
    assert nearest_on_ladder(0.0032, ladder) == 0.005   # log midpoint of 2e-3 and 5e-3 is 3.16e-3
    assert nearest_on_ladder(0.0031, ladder) == 0.002
    assert nearest_on_ladder(0.011, ladder) == 0.01
    assert nearest_on_ladder(0, ladder) == 1e-4
    assert nearest_on_ladder(-3, ladder) == 1e-4
    assert nearest_on_ladder(50, ladder) == 1.0


# --- formatting ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text"), [
    (0.003, "3e-03"),
    (0.0015, "1.5e-03"),
    (0, "0"),
    (0.0, "0"),
    (1.0, "1e+00"),
    (0.1, "1e-01"),
    (3e-4, "3e-04"),
    (250.0, "2.5e+02"),
    (0.999, "9.99e-01"),
    (0.0099999999, "1e-02"),      # rounding that carries over to the next decade
    (9.99996e-5, "1e-04"),
    (1.23456e-7, "1.235e-07"),
    (-0.02, "-2e-02"),
])
def test_format_sci_examples(value, text):
    assert format_sci(value) == text


@given(st.floats(min_value=1e-12, max_value=1e6))
def test_format_sci_round_trips_to_four_significant_digits(value):
    assert float(format_sci(value)) == pytest.approx(value, rel=5e-4)
