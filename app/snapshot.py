"""One read of a run per page refresh: every part of the page draws from the same snapshot, so
the header, the chart, the knobs table, the decay panel and the messages never disagree.

The order of the reads matters. The trainer writes a change's effects (the knobs in force, the
metric rows of the update that used them, the intervention event) before its verdict on the
command. So the command is read first: a snapshot that says "applied" already holds what the
change did. The run's summary and its meta are two reads; if a change landed between them
(their knobs or decay differ) both are read again.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from app.data import fetch
from app.panels import newest_samples
from trainer.store import Command, RunStore, StoreError
from trainer.store.address import open_store, run_address

CONSISTENT_READS = 3   # summary + meta read again at most this often (a change in between)
KNOB_NAMES = ("lr", "momentum", "weight_decay")


@dataclass(frozen=True)
class Snapshot:
    """A run as one refresh of the page shows it.

    ``summary`` and ``meta``: the store's; ``curves``: the session's cached curves after the
    newest rows (:mod:`app.data`); ``command``: the last command this page sent the run, as
    the store has it now (None when none); ``overlays``: the compared runs' curves;
    ``samples``: the newest generated text (charlm).
    """

    address: str
    summary: dict[str, Any]
    meta: dict[str, Any]
    curves: dict[str, Any]
    command: Command | None = None
    overlays: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run(self) -> str:
        return self.summary["run"]

    @property
    def state(self) -> str:
        return self.summary["state"]

    @property
    def applied(self) -> dict[str, Any]:
        """The knobs in force."""
        return {k: self.summary.get(k) for k in KNOB_NAMES}

    def chart_key(self) -> tuple:
        """What the training chart is drawn from: equal keys, equal charts (the page keeps
        the last chart's text and sends it again instead of rebuilding it)."""
        def marks(curves: dict[str, Any]) -> tuple:
            return curves["last_step"], curves["last_val"], curves["last_event"]

        return (self.address, marks(self.curves),
                tuple((name, *marks(c)) for name, c in self.overlays.items()))


def _agree(summary: dict[str, Any], meta: dict[str, Any]) -> bool:
    knobs = meta.get("knobs") or {}
    return (all(summary.get(k) == knobs.get(k) for k in KNOB_NAMES if k in knobs)
            and summary.get("schedule") == meta.get("schedule"))


def take(store: RunStore, caches: MutableMapping[str, dict[str, Any]], *,
         command_id: int | None = None, compare: tuple[str, ...] = (),
         root: str | None = None) -> Snapshot:
    """Read ``store`` once for this refresh. ``caches``: the session's curve caches;
    ``compare``: other runs (names under ``root``) to draw beside this one (a branch's parent
    is added)."""
    command = store.command(command_id) if command_id is not None else None
    for _ in range(CONSISTENT_READS):
        summary, meta = store.summary(), store.meta()
        if _agree(summary, meta):
            break
    curves = fetch(store, caches)
    parent = (meta.get("parent") or {}).get("run")  # a branch is drawn beside its parent
    overlays = {}
    for name in (*compare, *([parent] if parent and parent not in compare else [])):
        try:
            with open_store(run_address(root, name)) as other:
                overlays[name] = _overlay(fetch(other, caches))
        except (StoreError, ValueError):
            continue  # a run deleted meanwhile: nothing to draw
    return Snapshot(store.address, summary, meta, curves, command, overlays,
                    newest_samples(store))


def _overlay(curves: dict[str, Any]) -> dict[str, Any]:
    """What a compared run's curves give the chart (app.charts.training_figure's overlays)."""
    names = ("step", "loss", "mean_step", "mean", "lr_step", "lr", "val", "last_step",
             "last_val", "last_event")
    return {name: curves[name] for name in names}
