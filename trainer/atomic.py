"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The content goes to a temporary file in the same directory, is fsynced, and is renamed over the
target (POSIX ``rename`` is atomic); the directory is fsynced too so the rename survives a power
cut. A kill -9 mid-write leaves the previous file intact and at worst a stray temporary file,
which the ``finally`` removes when the process lives to run it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
