"""Where a run's checkpoints lie and which one to take: names, listing, finding.

No torch here, so that the dashboard, the CLI and ``panda train --help`` can ask about
checkpoints without loading it (``import torch`` takes over a second; the writing and reading of
checkpoints is :mod:`trainer.checkpoint`).

Files live in ``run_dir/checkpoints/``: automatic ones (``ckpt-<step>-<reason>.pt``) form a
bounded ring, newest kept; pinned ones (``pin-<step>-<reason>.pt``) are never pruned.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^(ckpt|pin)-(\d{9})-([a-z]+)\.pt$")


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file: the step it was taken at (steps completed), why, and where."""

    step: int
    reason: str
    pinned: bool
    path: Path
    size: int
    mtime: float

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "reason": self.reason, "pinned": self.pinned,
                "path": str(self.path), "size": self.size, "mtime": self.mtime}


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | os.PathLike, step: int, reason: str, *,
                    pinned: bool) -> Path:
    """Where the checkpoint of ``step`` taken for ``reason`` goes (the name :data:`_NAME` reads)."""
    return checkpoint_dir(run_dir) / f"{'pin' if pinned else 'ckpt'}-{step:09d}-{reason}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every checkpoint of a run, oldest first (by step, then time)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            stat = path.stat()
            found.append(CheckpointInfo(int(match[2]), match[3], match[1] == "pin", path,
                                        stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda c: (c.step, c.mtime))


def find(run_dir: str | os.PathLike, *, before: int | None = None,
         at_or_before: int | None = None) -> CheckpointInfo | None:
    """The newest checkpoint with step < ``before`` / step <= ``at_or_before`` (or newest)."""
    for info in reversed(list_checkpoints(run_dir)):
        if before is not None and info.step >= before:
            continue
        if at_or_before is not None and info.step > at_or_before:
            continue
        return info
    return None
