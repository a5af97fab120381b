"""Babysitting a DistributedDataParallel run: one writer, identical knobs on every rank.

Why this is needed. DDP keeps the replicas identical only because every rank starts from the
same weights and then takes *the same optimizer step*: gradients are all-reduced in
``backward()`` and each rank applies them with its own optimizer
(https://pytorch.org/docs/stable/notes/ddp.html, "Internal Design"). Nothing re-synchronizes
the parameters afterwards. If one rank ran a step with a different learning rate, momentum or
weight decay, its replica would silently drift from the others for the rest of the run. A live
knob change must therefore land on every rank *at the same step boundary*.

How. Only rank 0 opens the run store and runs the flusher and poller threads; the other ranks
never touch the run directory. Every ``sync_every`` optimizer steps (a cadence every rank knows,
so no rank has to ask whether to sync) all ranks meet once:

1. the losses buffered since the last meeting are stacked into one tensor and summed over
   ranks, then divided by the world size (``ReduceOp.AVG`` exists only for NCCL); rank 0
   hands the averages to its flusher, so the logged curve is the mean over ranks;
2. rank 0 tells every rank how many commands its poller handed over since the last meeting
   and, if any, broadcasts the commands themselves (``broadcast_object_list``,
   https://pytorch.org/docs/stable/distributed.html#torch.distributed.broadcast_object_list).
   On the CPU, steps 1 and 2 are one ``all_gather`` of ``[losses…, count]``: a meeting without
   commands costs a single small collective;
3. every rank applies them, in order, through :meth:`Babysitter._apply` (rank 0 records them in
   the store exactly as without DDP; the other ranks' records go to a sink).

Between meetings the hot path costs one attribute check and one integer modulo: no collective,
no host-device sync. The price is latency: a command waits for the next multiple of
``sync_every`` (at 10 steps, a fraction of a second for typical step times).

The command channel runs on a gloo process group. With an NCCL default group, an object
broadcast would copy through the GPU and block the host in a CUDA synchronize (which spins);
on gloo it is a CPU message, and a paused rank sleeps in a socket wait instead of burning a
core. The loss all-reduce stays on the default group and device (asynchronous under NCCL).

Pause and stop are commands like any other, so they reach every rank at the same step. While
paused, all ranks meet every ``PAUSE_WAKE_S`` at most (rank 0 sleeps on the poller's wake event
in between, the others in the broadcast) until a ``resume`` or ``stop`` arrives.

Rank-0 concerns (by design, documented in the Babysitter):

* the divergence guard watches the averaged losses in rank 0's flusher; its verdict is handed
  to the other ranks like a command, so with ``on_diverge="pause"`` all ranks pause together;
* checkpoints, in memory and on disk, are taken by rank 0 only (the replicas are identical,
  one copy is enough); a rollback or resume broadcasts the state rank 0 restores;
* validation metrics and early stopping use whatever each rank passes to ``log_validation``:
  pass a value that is identical on all ranks (e.g. all-reduced) so early stopping decides the
  same on every rank; only rank 0's values are stored.

Resume and rollback restore rank 0's choice on every rank: rank 0 picks the state (the newest
checkpoint file, or a snapshot in memory) and broadcasts it, so the ranks need no shared file
system and can never restore different states.

Limits: all ranks must call ``step()`` the same number of times (DDP requires it too) and
construct the Babysitter at the same point.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from trainer.workers import drain

if TYPE_CHECKING:
    from trainer.babysitter import Babysitter

log = logging.getLogger(__name__)

DEFAULT_SYNC_EVERY = 10  # steps between meetings of all ranks (loss reduce + command hand-over)
PAUSE_WAKE_S = 0.5       # while paused, ranks meet at least this often
LEADER = 0               # the rank that owns the run store


class _Sink:
    """An outbox for ranks > 0: accepts the Babysitter's records and drops them."""

    def append(self, item: Any) -> None:
        pass

    def __bool__(self) -> bool:
        return False

    def __len__(self) -> int:
        return 0


class _NullStore:
    """Stands in for the run store on ranks > 0: reads are empty, writes go nowhere."""

    run_dir = None

    def meta(self) -> dict[str, Any]:
        return {}

    def set_meta(self, **values: Any) -> None:
        pass

    def add_events(self, events: Any) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _IdleWorker:
    """Stands in for the flusher and the poller on ranks > 0 (no thread is started)."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def arm_guard(self, from_step: int) -> None:
        pass

    def nudge(self) -> None:
        pass


class DistributedSync:
    """Keeps the Babysitters of all ranks of one ``torch.distributed`` job in lockstep.

    Built by :meth:`detect` (``None`` outside a multi-process job, so a single process pays
    nothing). The Babysitter calls :meth:`open_store` and :meth:`attach` while it is built,
    :meth:`sync` from ``step()`` every ``every`` steps, and :meth:`close` from ``close()``.
    """

    def __init__(self, every: int = DEFAULT_SYNC_EVERY, group: Any = None):
        if every < 1:
            raise ValueError("sync_every must be a positive number of steps")
        self.every = every
        self.group = group  # the default group unless given
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.leader = self.rank == LEADER
        self.backend = str(dist.get_backend(group))
        self.control = self._control_group(group)
        self.inbox: deque = deque()        # rank 0: commands from the poller and the guard
        self.flush_rows: deque | None = None  # rank 0: the flusher's rows (averaged losses)
        self.applied: list[tuple[int, str]] = []  # (step, kind) of each command applied here
        self._wake: threading.Event | None = None

    @classmethod
    def detect(cls, every: int = DEFAULT_SYNC_EVERY) -> DistributedSync | None:
        """A sync for the current job, or ``None`` when this is not a multi-process job."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(every)

    def _control_group(self, group: Any) -> Any:
        # A collective: every rank builds its Babysitter at the same point, so this lines up.
        if "gloo" in self.backend:
            return group
        return dist.new_group(ranks=list(range(self.world_size)), backend="gloo")

    # --- wiring (called while the Babysitter is built) -----------------------------------------

    def open_store(self, run_dir, store_url: str | None = None):
        """Rank 0 opens (creates) the run store; every other rank gets a store that is no-op."""
        from trainer.store.address import store_for

        return store_for(run_dir, store_url, create=True) if self.leader else _NullStore()

    def attach(self, bs: Babysitter) -> None:
        """Reroute the Babysitter's hand-overs through the meetings (before its threads start).

        Rank 0: the poller and the divergence guard hand commands to :attr:`inbox` instead of
        the Babysitter's pending queue (which ``step()`` would apply on rank 0 alone), and
        ``step()`` buffers rows in a staging queue whose losses are averaged before the flusher
        sees them. Other ranks: no threads, and every record goes to a sink.
        """
        self._wake = bs._wake
        self.flush_rows = bs._rows
        bs._rows = deque()  # staging: drained at every meeting
        if self.leader:
            bs._poller.pending = self.inbox
            bs._flusher.on_divergence = self._on_divergence
            bs.store.set_meta(distributed={"world_size": self.world_size,
                                           "backend": self.backend, "sync_every": self.every})
        else:
            bs._outbox = _Sink()
            bs._poller = bs._flusher = _IdleWorker()

    def _on_divergence(self, divergence) -> None:
        """Flusher thread (rank 0): the guard's verdict waits for the next meeting."""
        self.inbox.append((None, "diverged", {
            "first_bad_step": divergence.first_bad_step, "cause": divergence.cause}))
        self._wake.set()

    # --- meetings ---------------------------------------------------------------------------------

    def sync(self, bs: Babysitter) -> None:
        """All ranks, at the same step: average the buffered losses, then share the commands."""
        commands = drain(self.inbox) if self.leader else []
        count = self._meet(drain(bs._rows), len(commands))
        self._receive(bs, commands, count)
        if bs.paused and not bs.should_stop:
            self._wait_while_paused(bs)

    def _meet(self, rows: list, count: int) -> int:
        """Average the rows' losses (rank 0 keeps them); return rank 0's command count.

        On the CPU (gloo) one ``all_gather`` of ``[losses…, count]`` does both: every rank
        learns rank 0's count, rank 0 averages the gathered losses (a gloo all-gather of a few
        numbers costs about half an all-reduce plus a broadcast). With losses on a GPU the
        all-reduce stays on the device (asynchronous, no host sync) and the count travels on
        the gloo control group.
        """
        values = [r[3] for r in rows]
        device = self._device(values)
        losses = [torch.as_tensor(v).detach().reshape(()).to(device, torch.float64)
                  for v in values]
        if device.type == "cpu" and self.control is self.group:
            mine = torch.cat([*(t.reshape(1) for t in losses),
                              torch.tensor([count], dtype=torch.float64)])
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine, group=self.group)
            if self.leader and rows:
                self._hand_to_flusher(rows, torch.stack(gathered)[:, :-1].sum(0))
            return int(gathered[LEADER][-1])
        if rows:
            stacked = torch.stack(losses)
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group)
            if self.leader:
                self._hand_to_flusher(rows, stacked)
        return self._broadcast_count(count)

    def _hand_to_flusher(self, rows: list, loss_sums: torch.Tensor) -> None:
        means = (loss_sums / self.world_size).unbind()
        self.flush_rows.extend((*r[:3], loss, *r[4:]) for r, loss in zip(rows, means))

    def _device(self, values: list) -> torch.device:
        """Where to reduce: the losses' CUDA device under NCCL (no host sync), else the CPU."""
        first = values[0] if values else None
        if "nccl" not in self.backend:
            return torch.device("cpu")
        if isinstance(first, torch.Tensor) and first.is_cuda:
            return first.device
        if "gloo" in self.backend:  # e.g. "cpu:gloo,cuda:nccl": CPU numbers go through gloo
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def _broadcast_count(self, count: int) -> int:
        box = torch.tensor([count], dtype=torch.int64)
        dist.broadcast(box, src=LEADER, group=self.control)
        return int(box)

    def _receive(self, bs: Babysitter, commands: list, count: int) -> None:
        """Rank 0 sends its ``count`` commands (if any); every rank applies them in order."""
        if not count:
            return
        box = [commands]
        dist.broadcast_object_list(box, src=LEADER, group=self.control)
        for command_id, kind, payload in box[0]:
            self.applied.append((bs.step_count, kind))
            bs._apply(kind, payload, command_id)

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective: all ranks call it at the same point).

        Used for the states that resume and rollback restore: only rank 0 writes checkpoint
        files, so the other ranks may have none (another node, no shared file system)."""
        box = [obj]
        dist.broadcast_object_list(box, src=LEADER, group=self.control)
        return box[0]

    def _wait_while_paused(self, bs: Babysitter) -> None:
        # Rank 0 sleeps on the wake event (set by its poller when a command arrives); the
        # others sleep in the broadcast. Every rank leaves the loop after the same meeting.
        while bs.paused and not bs.should_stop:
            if self.leader:
                self._wake.wait(PAUSE_WAKE_S)
                self._wake.clear()
            commands = drain(self.inbox) if self.leader else []
            self._receive(bs, commands, self._broadcast_count(len(commands)))

    # --- end of the run ---------------------------------------------------------------------------

    def close(self, bs: Babysitter, *, collective: bool) -> None:
        """Hand the last, not yet averaged losses to the flusher.

        ``collective`` (a normal end, where every rank closes at the same step): average them
        like at a meeting. Otherwise (an exception on this rank, Ctrl-C) the other ranks may not
        come, so rank 0 logs its own losses rather than wait for them.
        """
        rows = drain(bs._rows)
        if collective:
            try:
                self._meet(rows, 0)  # commands sent now stay pending: the run is over
                return
            except (RuntimeError, ValueError):  # a peer is gone: keep what this rank has
                log.exception("could not average the last losses; logging rank %d's own",
                              self.rank)
        if self.leader:
            self.flush_rows.extend(rows)


__all__ = ["DEFAULT_SYNC_EVERY", "DistributedSync"]
