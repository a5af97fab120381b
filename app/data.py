"""This page session's copy of each run's curves, extended with only the rows it lacks.

A dashboard refreshes about once a second, so a refresh asks the store only for rows newer
than the ones this session holds. The first read of a run is a level-of-detail read
(:meth:`trainer.store.RunStore.metrics_view`): the run's history as a few thousand buckets,
summarized by the store, and its last :data:`RAW_TAIL` steps as raw rows; opening a run of a
million steps reads thousands of rows, not a million. Refreshes then append raw rows; once
:data:`RAW_LIMIT` of them have piled up, the history is read coarse again. Zooming into the
history reads that range in full detail (:func:`chart_view`).

The curves are three series, each sorted by step, because a bucket summarizes its steps
differently for each use:

* ``step``, ``loss``, ``wall``: the points of the loss curve. A bucket gives its first and last
  point, its lowest and highest finite loss at their own steps (M4: Jugel et al., VLDB 2014)
  and a NaN at its first non-finite step, so one bad step survives at every level.
* ``lr_step``, ``lr``, ``user_lr``: the knob curves, drawn as steps (``hv``). A bucket gives its
  first and last step and the steps where its last values began, so a change of LR is drawn
  at the step it happened.
* ``mean_step``, ``mean``: what the smoothed curve smooths. A bucket gives the mean of its
  finite losses, at its middle: smoothing then runs over bucket means, as TensorBoard's
  runs over the points it sampled.

For raw rows the three series are the rows themselves.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import numpy as np

from trainer.store import RunStore

METRIC_COLUMNS = ("step", "wall", "loss", "lr", "user_lr")  # user_lr: the user's own LR
SERIES = {"step": ("step", "loss", "wall"), "lr_step": ("lr_step", "lr", "user_lr"),
          "mean_step": ("mean_step", "mean")}   # each series' step column, and its columns
RAW_TAIL = 10_000          # steps read raw on opening a run: the page's longest "Steps shown"
RAW_LIMIT = 100_000        # raw rows held before the history is read coarse again
ZOOM_MARGIN = 0.25         # a zoom reads this share of its width more on each side (panning)
RATE_WINDOW = 50           # steps/s is measured over the last this many steps
PATIENCE_HINT = 5          # evaluations without a better val loss before the page suggests stopping
# A live trainer (heartbeat fresh) whose newest step is older than both of these is said to have
# stopped stepping: the heartbeat alone would keep showing "running" for a loop stuck in a data
# loader or a debugger, or one that ended without closing the run (a notebook cell that raised).
STALL_MIN_S = 30.0         # seconds without a new step, at least
STALL_INTERVALS = 20       # ... and at least this many of its recent step intervals (slow steps)
RESTART_EVENT = "restart"  # a resumed run rewrote rows after its checkpoint: start over


def empty_cache() -> dict[str, Any]:
    """A cache that holds nothing yet."""
    return {**_empty_series(), "last_step": -1, "raw_from": -1, "raw_rows": 0,
            "detail": None, "val": {}, "last_val": 0, "events": [], "last_event": 0}


def _empty_series() -> dict[str, np.ndarray]:
    return {name: np.empty(0) for columns in SERIES.values() for name in columns}


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
    if cache["last_step"] < 0 or cache["raw_rows"] > RAW_LIMIT:
        _read_history(store, cache)
    rows = store.metrics_since(cache["last_step"], columns=METRIC_COLUMNS)
    if rows["step"]:
        raw = {name: np.asarray(values, dtype=float)  # None (no lr logged) becomes NaN
               for name, values in rows.items()}
        _append(cache, _raw_series(raw))
        if cache["raw_from"] < 0:
            cache["raw_from"] = rows["step"][0]
        cache["raw_rows"] += len(rows["step"])
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


def _read_history(store: RunStore, cache: dict[str, Any]) -> None:
    """Replace the cached curves by a level-of-detail read of all but the last RAW_TAIL steps;
    the refresh then reads those raw (``metrics_since(last_step)``)."""
    extent = store.metrics_extent()
    cache.update(_empty_series(), last_step=-1, raw_from=-1, raw_rows=0)
    if extent is None or extent[1] - RAW_TAIL < extent[0]:
        return  # nothing logged, or a short run: read whole, raw
    cut = extent[1] - RAW_TAIL
    view = store.metrics_view(extent[0], cut)
    if view["level"] > 0:  # a bucket that reaches past the cut is read raw instead
        whole = int(np.searchsorted(np.asarray(view["last_step"]), cut, side="right"))
        view = {k: v[:whole] if isinstance(v, list) else v for k, v in view.items()}
        if not whole:
            return
        cache["last_step"] = view["last_step"][-1]
    else:
        cache["last_step"] = view["step"][-1]
    _append(cache, view_series(view))


def _append(cache: dict[str, Any], series: dict[str, np.ndarray]) -> None:
    for name, values in series.items():
        cache[name] = np.concatenate([cache[name], values])


def _raw_series(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw rows as the three series: every row is a point of each."""
    return {"step": raw["step"], "loss": raw["loss"], "wall": raw["wall"],
            "lr_step": raw["step"], "lr": raw["lr"], "user_lr": raw["user_lr"],
            "mean_step": raw["step"], "mean": raw["loss"]}


def view_series(view: dict[str, Any]) -> dict[str, np.ndarray]:
    """A :meth:`~trainer.store.RunStore.metrics_view` as the three series (see the module's
    docstring), each in step order."""
    if view["level"] == 0:
        return _raw_series({name: np.asarray(view[name], dtype=float)
                            for name in METRIC_COLUMNS})
    col = {name: np.asarray(values, dtype=float) for name, values in view.items()
           if isinstance(values, list)}   # NULL (a step of nothing) becomes NaN
    first, last = col["first_step"], col["last_step"]
    # Loss: per bucket up to five candidate points; the same step is the same row, so
    # duplicates carry the same value and one is kept.
    loss_steps = np.stack([first, col["min_loss_step"], col["max_loss_step"],
                           col["nonfinite_step"], last], axis=1)
    loss = np.stack([col["first_loss"], col["min_loss"], col["max_loss"],
                     np.full(first.size, np.nan), col["last_loss"]], axis=1)
    wall = np.repeat(col["wall"][:, None], 5, axis=1)  # known at the bucket's last step only
    steps, (loss, wall) = _points(loss_steps, loss, wall)
    # Knobs: the value in force at each point (exact when a knob changed at most once in a
    # bucket; the since steps are where the last values began).
    knob_steps = np.stack([first, col["lr_since"], col["user_lr_since"], last], axis=1)
    lr = np.where(knob_steps < col["lr_since"][:, None], col["lr_first"][:, None],
                  col["lr_last"][:, None])
    user_lr = np.where(knob_steps < col["user_lr_since"][:, None],
                       col["user_lr_first"][:, None], col["user_lr_last"][:, None])
    lr_steps, (lr, user_lr) = _points(knob_steps, lr, user_lr)
    finite = col["steps"] - col["nonfinite"]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite > 0, col["loss_sum"] / finite, np.nan)
    return {"step": steps, "loss": loss, "wall": wall, "lr_step": lr_steps, "lr": lr,
            "user_lr": user_lr, "mean_step": (first + last) / 2, "mean": mean}


def _points(steps: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Flatten per-bucket candidate points (one row per bucket) into one series in step
    order: points without a step (NaN) dropped, a step given twice kept once."""
    order = np.argsort(steps, axis=1, kind="stable")  # inside a bucket; buckets are in order
    steps = np.take_along_axis(steps, order, axis=1).ravel()
    values = [np.take_along_axis(v, order, axis=1).ravel() for v in values]
    keep = ~np.isnan(steps)
    keep[1:] &= steps[1:] != steps[:-1]
    return steps[keep], [v[keep] for v in values]


StepRange = tuple[float, float]   # (first, last) step, inclusive; ±inf for open ends


def chart_view(store: RunStore, cache: dict[str, Any], x_range: StepRange | None, *,
               follow: bool = False) -> tuple[dict[str, Any], StepRange | None]:
    """The curves to draw, and the steps to draw in full detail (``focus`` of
    :func:`app.charts.training_figure`; None: none).

    ``x_range``: the steps the chart shows while zoomed (None: not zoomed); ``follow``: the
    chart slides a zoom to the newest step (the component does it and does not report it), so
    the zoom's width ends there. While zoomed, the history inside the zoom and a margin either
    side (for panning) is read again in the finest detail that fits (raw rows for a short
    range) and spliced into the curves, and that span is the focus. The detail is read once
    per span and kept in ``cache["detail"]`` (the history does not change; a restart starts a
    new cache); the raw tail is already in full detail.
    """
    focus = _zoom_span(x_range, cache["last_step"] if follow else None)
    history_end = cache["raw_from"] - 1 if cache["raw_from"] >= 0 else cache["last_step"]
    if focus is None or cache["step"].size == 0 or focus[0] > history_end:
        return cache, focus
    span = (max(0, math.floor(focus[0])), min(history_end, math.ceil(focus[1])))
    detail = cache.get("detail")
    if detail is None or detail["span"] != span:
        view = store.metrics_view(*span)
        series = view_series(view)
        if view["level"] > 0:  # a bucket reaching into the raw tail: the tail is finer
            series = _until(series, history_end)
        detail = cache["detail"] = {"span": span, "level": view["level"], "series": series}
    return {**cache, **_spliced(cache, detail["series"])}, focus


def _zoom_span(x_range: StepRange | None, latest: float | None) -> StepRange | None:
    """The steps to draw for a zoom: its range (ending at ``latest`` when following) and
    ZOOM_MARGIN of its width either side."""
    if x_range is None:
        return None
    low, high = sorted(float(v) for v in x_range)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    if latest is not None and latest >= 0:
        low, high = latest - (high - low), float(latest)
    margin = ZOOM_MARGIN * (high - low)
    return low - margin, high + margin


def _until(series: dict[str, np.ndarray], last: float) -> dict[str, np.ndarray]:
    """Each series cut to its steps ≤ ``last``."""
    out = {}
    for step_name, names in SERIES.items():
        end = int(np.searchsorted(series[step_name], last, side="right"))
        out.update({name: series[name][:end] for name in names})
    return out


def visible_range(chart_value: Any) -> StepRange | None:
    """The step range a ``stream_chart`` shows, from its value (``{"x_range": [lo, hi]}``
    while zoomed, else None)."""
    x_range = chart_value.get("x_range") if isinstance(chart_value, dict) else None
    return (float(x_range[0]), float(x_range[1])) if x_range and len(x_range) == 2 else None


def _spliced(cache: dict[str, Any], detail: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each series of ``cache`` with the steps that ``detail`` covers replaced by it."""
    out = {}
    for step_name, names in SERIES.items():
        steps, inner = cache[step_name], detail[step_name]
        if inner.size == 0:
            out.update({name: cache[name] for name in names})
            continue
        lo = int(np.searchsorted(steps, inner[0], side="left"))
        hi = int(np.searchsorted(steps, inner[-1], side="right"))
        for name in names:
            out[name] = np.concatenate([cache[name][:lo], detail[name], cache[name][hi:]])
    return out


def steps_per_second(cache: dict[str, Any]) -> float | None:
    """Training speed over the last RATE_WINDOW logged steps, from their wall-clock times."""
    steps, wall = cache["step"][-RATE_WINDOW:], cache["wall"][-RATE_WINDOW:]
    if steps.size < 2 or wall[-1] <= wall[0]:
        return None
    return float((steps[-1] - steps[0]) / (wall[-1] - wall[0]))


def elapsed_seconds(meta: dict[str, Any], state: str, now: float) -> float:
    """How long the run has run: from its creation to its end, or to its trainer's last
    heartbeat when the trainer is gone without ending it ("interrupted": a run killed two
    days ago did not run for two more days), else to now."""
    end = meta.get("ended") or (meta.get("heartbeat") if state == "interrupted" else None)
    return (end or now) - (meta.get("created") or now)


def duration(seconds: float) -> str:
    """``HH:MM:SS`` with the hours not wrapped at a day (a 30-hour run reads 30:00:00, where
    ``time.strftime`` on ``gmtime`` reads 06:00:00); negative reads as zero."""
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def stall_note(cache: dict[str, Any], now: float, started: float | None = None) -> str | None:
    """For a running trainer: "No training step for 00:02:10 …" when its newest logged step, or
    ``started`` (when the trainer took the run, its meta ``trainer_started``: a resumed run's
    last rows are older than its trainer) if later, is older than :data:`STALL_MIN_S` and than
    :data:`STALL_INTERVALS` of its recent step interval (:func:`steps_per_second`); else None."""
    wall = cache["wall"]
    last = float(wall[-1]) if len(wall) else None
    since = max((t for t in (last, started) if t is not None), default=None)
    if since is None:
        return None
    rate = steps_per_second(cache)
    idle = now - since
    if idle < max(STALL_MIN_S, STALL_INTERVALS / rate if rate else 0.0):
        return None
    return (f"No training step for {duration(idle)} although the "
            "trainer is alive: an evaluation, a slow data loader, a debugger, or a loop that "
            "ended without closing the run.")


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
