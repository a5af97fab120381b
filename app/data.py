"""This page session's copy of each run's curves, extended with only the rows it lacks.

A dashboard refreshes about once a second; re-reading a million metric rows each time would
cost about a second per refresh. The cache remembers, per run directory, the last step, the
last validation id and the last event id it holds, and asks the store only for newer rows.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import numpy as np

from trainer.store import RunStore

METRIC_COLUMNS = ("step", "wall", "loss", "lr", "user_lr")  # user_lr: the user's own LR
RATE_WINDOW = 50           # steps/s is measured over the last this many steps
PATIENCE_HINT = 5          # evaluations without a better val loss before the page suggests stopping
RESTART_EVENT = "restart"  # a resumed run rewrote rows after its checkpoint: start over


def empty_cache() -> dict[str, Any]:
    """A cache that holds nothing yet."""
    return {**{name: np.empty(0) for name in METRIC_COLUMNS}, "last_step": -1,
            "val": {}, "last_val": 0, "events": [], "last_event": 0}


def fetch(store: RunStore, caches: MutableMapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Return ``store``'s cached curves (``caches[address]``) after appending newer rows.

    ``caches`` is normally ``st.session_state["curves"]``; plain dicts work too (tests,
    benchmarks). Loss NaNs (stored as NULL) stay NaN.
    """
    key = store.address
    cache = caches.setdefault(key, empty_cache())
    new_events = store.events_since(cache["last_event"])
    if any(e["kind"] == RESTART_EVENT for e in new_events):
        cache = caches[key] = empty_cache()
        new_events = store.events_since(0)
    rows = store.metrics_since(cache["last_step"], columns=METRIC_COLUMNS)
    if rows["step"]:
        for name in METRIC_COLUMNS:
            column = np.asarray(rows[name], dtype=float)  # None (no lr logged) becomes NaN
            cache[name] = np.concatenate([cache[name], column])
        cache["last_step"] = rows["step"][-1]
    for row in store.validation_since(cache["last_val"]):
        steps, values = cache["val"].setdefault(row["name"], ([], []))
        steps.append(row["step"])
        values.append(math.nan if row["value"] is None else row["value"])
        cache["last_val"] = row["id"]
    if new_events:
        cache["events"] = cache["events"] + new_events
        cache["last_event"] = new_events[-1]["id"]
    return cache


def steps_per_second(cache: dict[str, Any]) -> float | None:
    """Training speed over the last RATE_WINDOW logged steps, from their wall-clock times."""
    steps, wall = cache["step"][-RATE_WINDOW:], cache["wall"][-RATE_WINDOW:]
    if steps.size < 2 or wall[-1] <= wall[0]:
        return None
    return float((steps[-1] - steps[0]) / (wall[-1] - wall[0]))


def early_stop_hint(val: dict[str, tuple]) -> str | None:
    """A hint when validation loss has not improved for PATIENCE_HINT evaluations."""
    steps, values = val.get("loss", ([], []))
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if len(finite) <= PATIENCE_HINT:
        return None
    best = min(range(len(finite)), key=lambda i: finite[i][1])
    waited = len(finite) - 1 - best
    if waited < PATIENCE_HINT:
        return None
    return (f"Validation loss has not improved for {waited} evaluations (best "
            f"{finite[best][1]:.4g} at step {finite[best][0]}): consider stopping, or lowering "
            "the LR.")
