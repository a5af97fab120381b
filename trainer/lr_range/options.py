"""The options of an LR range test, declared once (:mod:`trainer.ranges`): :func:`lr_find`,
range-test jobs beside a live run, the CLI's ``panda lr-find`` and the dashboard check them here.
"""

from __future__ import annotations

from typing import Any

from trainer.ranges import COUNT, FRACTION, POSITIVE, Choice, KnobError, Range, check_fields

MEASURES = Choice(("train", "batch"))   # what the curve records after each step (see job.py)
PURPOSES = Choice(("start", "continue"))  # what the suggestion is for (see finder.lr_find)

OPTIONS = {
    "start_lr": POSITIVE,                      # first LR of the ramp
    "end_lr": POSITIVE,                        # last LR of the ramp
    "num_iter": Range(2, integer=True),        # steps of the ramp
    "smooth": FRACTION,                        # EMA β of the smoothed curve
    "diverge": Range(1.0, low_open=True),      # stop when smoothed loss > diverge × best
    "probe_steps": COUNT,                      # steps of each constant-LR probe
    "check_every": COUNT,                      # steps between host syncs of the losses
    "measure": MEASURES,
    "purpose": PURPOSES,
}


def check(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked against :data:`OPTIONS` (and the ramp must rise), normalized; a bad
    one raises :class:`~trainer.ranges.KnobError` with a one-line reason."""
    checked = check_fields(values, OPTIONS)
    if checked.get("start_lr", 0.0) >= checked.get("end_lr", float("inf")):
        raise KnobError(f"start_lr must be below end_lr, got {checked['start_lr']:g} >= "
                        f"{checked['end_lr']:g}")
    return checked
