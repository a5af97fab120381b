"""Where a run can roll back to: checkpoint files plus the newest snapshots still in memory.

The newest snapshot may not be on disk yet (the flusher writes it a moment later), so the
in-memory copies compete with the files, and on a tie they win (no read needed). Only finite
states are ever remembered or written (:func:`trainer.checkpoint.finite`), so a rollback can
never restore the NaN it is meant to escape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer import checkpoint, checkpoint_files


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

    def undo(self, diverged_at: int | None = None) -> dict[str, Any] | None:
        """The state Undo restores: the one just before the latest knob change (forgotten once
        used: an undone change is not undone twice), else after a divergence the newest state
        before it, else None (nothing to undo)."""
        if self.pre_change is not None and (diverged_at is None or
                                            _step(self.pre_change) <= diverged_at):
            state, self.pre_change = self.pre_change, None
            return state
        if diverged_at is not None:
            return self._newest(diverged_at, None)
        return None

    def newest(self, *, at_or_before: int | None = None) -> dict[str, Any] | None:
        """The newest state at or before a step (a file, or a snapshot still in memory)."""
        return self._newest(None, at_or_before)

    def _newest(self, before: int | None, at_or_before: int | None) -> dict[str, Any] | None:
        memory = self.latest
        if memory is not None and not (
                (before is None or _step(memory) < before) and
                (at_or_before is None or _step(memory) <= at_or_before)):
            memory = None
        on_disk = checkpoint_files.find(self.run_dir, before=before, at_or_before=at_or_before)
        if on_disk is None or (memory is not None and _step(memory) >= on_disk.step):
            return memory
        try:
            return checkpoint.load(on_disk.path)
        except FileNotFoundError:  # pruned from the ring a moment ago
            return memory
