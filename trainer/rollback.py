"""Where a run can roll back to: checkpoint files plus the newest snapshots still in memory.

The newest snapshot may not be on disk yet (the flusher writes it a moment later), so the
in-memory copies compete with the files, and on a tie they win (no read needed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer import checkpoint


def _step(state: dict[str, Any]) -> int:
    return int(state["babysitter"]["step"])


class RollbackPoints:
    """Remembers the latest snapshot and the one taken just before the latest knob change."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.latest: dict[str, Any] | None = None
        self.pre_change: dict[str, Any] | None = None

    def remember(self, state: dict[str, Any], *, before_change: bool = False) -> None:
        self.latest = state
        if before_change:
            self.pre_change = state

    def target(self, *, before: int | None = None,
               at_or_before: int | None = None) -> dict[str, Any] | None:
        """The state to restore.

        With no explicit step, the state just before the latest knob change that preceded the
        trouble: that change is what gets undone. Otherwise (or without such a change), the
        newest checkpoint with step < ``before`` and step <= ``at_or_before``.
        """
        if at_or_before is None and self.pre_change is not None and (
                before is None or _step(self.pre_change) <= before):
            return self.pre_change
        return self._newest(before, at_or_before)

    def _newest(self, before: int | None, at_or_before: int | None) -> dict[str, Any] | None:
        memory = self.latest
        if memory is not None and not (
                (before is None or _step(memory) < before) and
                (at_or_before is None or _step(memory) <= at_or_before)):
            memory = None
        on_disk = checkpoint.find(self.run_dir, before=before, at_or_before=at_or_before)
        if on_disk is None or (memory is not None and _step(memory) >= on_disk.step):
            return memory
        try:
            return checkpoint.load(on_disk.path)
        except FileNotFoundError:  # pruned from the ring a moment ago
            return memory
