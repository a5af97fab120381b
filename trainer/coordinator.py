"""How a Babysitter meets its environment: alone in its process, or one of several DDP ranks.

The Babysitter asks its coordinator these things, and nothing else touches its insides:

* :meth:`Coordinator.channels`: the channels its training thread uses and the ones its workers
  use (the same object when alone; under DDP rank 0's workers see averaged losses and commands
  handed out at meetings, and the other ranks run no workers at all);
* :meth:`Coordinator.open_store`: the run store, or None where this process records nothing;
* :meth:`Coordinator.meet`, every :attr:`Coordinator.meet_every` steps (never when alone);
* :meth:`Coordinator.share`: a value one process loads and every process gets (a checkpoint
  to restore), and :meth:`Coordinator.close` at the end, then :meth:`Coordinator.retire` once
  the last collective (the final checkpoint's) is done;
* :meth:`Coordinator.agree` and :meth:`Coordinator.gather`: whether a setting is the same in
  every process, and every process's value at the leader (each rank's random generators for a
  checkpoint).

The training loop reaches back only through the :class:`TrainingLoop` protocol.
:class:`Coordinator` itself is the single-process case; :mod:`trainer.distributed` has DDP's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from trainer.channels import Channels
from trainer.commands import ValidCommand
from trainer.store.address import store_for
from trainer.store.base import RunStore

T = TypeVar("T")


class TrainingLoop(Protocol):
    """What a coordinator may read and do on the Babysitter it serves."""

    step_count: int
    paused: bool
    should_stop: bool

    def apply_command(self, command: ValidCommand) -> None: ...


class Coordinator:
    """A Babysitter alone in its process: nothing to meet, nothing to share."""

    leader = True       # this process records the run (store, checkpoints, guard)
    meet_every = 0      # steps between meetings; 0: never
    rank, world_size = 0, 1

    def channels(self) -> tuple[Channels, Channels | None]:
        """(the training thread's channels, the workers' channels or None for no workers)."""
        channels = Channels()
        return channels, channels

    def open_store(self, run_dir: str | os.PathLike, url: str | None) -> RunStore | None:
        """The run's store (created if new), or None in a process that records nothing."""
        return store_for(run_dir, url, create=True)

    def describe(self) -> dict[str, Any] | None:
        """What the run's meta says about this process group (None: a single process)."""
        return None

    def meet(self, loop: TrainingLoop) -> None:
        """Called by ``step()`` every :attr:`meet_every` steps (never for a single process)."""

    def share(self, load: Callable[[], T]) -> T:
        """``load()``'s value, the same in every process of the group."""
        return load()

    def agree(self, value: Any) -> bool:
        """Whether ``value`` is the same in every process of the group (a collective)."""
        return True

    def gather(self, take: Callable[[], T]) -> list[T] | None:
        """Every process's ``take()`` in rank order, at the leader; None elsewhere and when
        alone (then ``take`` is not called: a single process pays nothing)."""
        return None

    def close(self, loop: TrainingLoop, *, collective: bool) -> None:
        """The run ends (``collective``: every process ends it at the same step)."""

    def retire(self) -> None:
        """After the last collective: return once the communication backend holds nothing of
        this process's (alone: there is no backend)."""
