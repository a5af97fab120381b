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
   and, if any, broadcasts the commands themselves (pickled, as ``broadcast_object_list``
   does: https://pytorch.org/docs/stable/distributed.html#torch.distributed.broadcast_object_list).
   On the CPU, steps 1 and 2 are one ``all_gather`` of ``[losses…, count]``: a meeting without
   commands costs a single small collective;
3. every rank applies them, in order, through :meth:`Babysitter.apply_command` (rank 0 records
   them in the store exactly as without DDP; the other ranks' outboxes discard their records).

Between meetings the hot path costs one attribute check and one integer modulo: no collective,
no host-device sync. The price is latency: a command waits for the next multiple of
``sync_every`` (at 10 steps, a fraction of a second for typical step times).

The command channel runs on a gloo process group. With an NCCL default group, an object
broadcast would copy through the GPU and block the host in a CUDA synchronize (which spins);
on gloo it is a CPU message, and a paused rank sleeps in a socket wait instead of burning a
core. The loss all-reduce stays on the default group and device (asynchronous under NCCL).

Pause and stop are commands like any other, so they reach every rank at the same step. While
paused, all ranks meet every ``PAUSE_WAKE_S`` (:mod:`trainer.babysitter`) at most (rank 0 sleeps
on the poller's wake event in between, the others in the broadcast) until a ``resume`` or
``stop`` arrives.

Rank-0 concerns (by design, documented in the Babysitter):

* the divergence guard watches the averaged losses in rank 0's flusher; its verdict is handed
  to the other ranks like a command, so with ``on_diverge="pause"`` all ranks pause together;
* checkpoints, in memory and on disk, are taken by rank 0 only (the replicas are identical,
  one copy is enough); a rollback or resume broadcasts the state rank 0 restores. The random
  generators are not identical (each rank draws its own dropout masks), so where every rank
  takes a checkpoint at the same step (periodic, a command's, the final one) rank 0 gathers
  every rank's state into it (pickled, as ``all_gather_object`` does) and each rank puts back
  its own; a checkpoint taken from code (``bs.checkpoint()``, the best model) may be taken on
  rank 0 alone, so it gathers nothing and holds rank 0's state only (a resume from it gives
  every rank that);
* validation metrics and early stopping use whatever each rank passes to ``log_validation``:
  pass a value that is identical on all ranks (e.g. all-reduced) so early stopping decides the
  same on every rank; only rank 0's values are stored.

Resume and rollback restore rank 0's choice on every rank: rank 0 picks the state (the newest
checkpoint file, or a snapshot in memory) and broadcasts it, so the ranks need no shared file
system and can never restore different states.

Every tensor given to a collective is kept until the backend has let go of it, and ``close``
waits for that (:meth:`DistributedCoordinator.retire`). Why: gloo runs a collective on a worker
thread, which lets go of the work (and its tensors) a moment after the caller's ``wait()``
returned; a ``dist.barrier()`` called right after holds it until the barrier is done. While C++
code holds a tensor Python made, torch (2.13) keeps its Python object alive, so the thread that
lets go takes the GIL to drop that reference (an older torch takes it where it frees the tensor
last). A thread that asks for the GIL while the interpreter exits is ended inside a C++
destructor: ``std::terminate``, SIGABRT, "terminate called without an active exception" (core
dump: ``runLoop`` → ``~AsyncBarrierWork`` → ``~AsyncAllgatherWork`` → ``decref_pyobject`` →
``take_gil``; https://github.com/pytorch/pytorch/pull/179291 describes the same). A script
that ended with ``dist.barrier()`` and ``destroy_process_group()`` right after the Babysitter's
close died that way now and then (4 of about 56 launches on 2 busy cores). The object collectives
are written here for the same reason: ``all_gather_object`` and ``broadcast_object_list`` make
and drop their tensors inside torch.

Limits: all ranks must call ``step()`` the same number of times (DDP requires it too) and
construct the Babysitter at the same point. Whether the ranks take their checkpoints at the same
steps (the same ``checkpoint_every``, model or none, ``replay``) is checked once, then: if not,
no state is gathered (a rank waiting in a gather no other rank calls would hang).
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trainer.channels import Channels, drain
from trainer.coordinator import Coordinator, TrainingLoop
from trainer.store.address import store_for
from trainer.store.base import RunStore

log = logging.getLogger(__name__)

DEFAULT_SYNC_EVERY = 10  # steps between meetings of all ranks (loss reduce + command hand-over)
LEADER = 0               # the rank that owns the run store
RETIRE_TIMEOUT_S = 5.0   # the longest close() waits for the backend to let go of our tensors
                         # (then it logs a warning and returns)
SHARE_RELEASE_S = 1.0    # the longest a share waits for it (a whole checkpoint's bytes)
PENDING_RELEASE_S = 0.1  # how long an extra reference to a tensor no C++ code holds may be a
                         # release under way (it needs the GIL for a moment, then it is gone)
T = TypeVar("T")


class DistributedCoordinator(Coordinator):
    """Keeps the Babysitters of all ranks of one ``torch.distributed`` job in lockstep.

    Built by :meth:`detect` (``None`` outside a multi-process job, so a single process pays
    nothing). See the module docstring for what a meeting does.
    """

    def __init__(self, every: int = DEFAULT_SYNC_EVERY, group: Any = None, *,
                 pause_wake_s: float = 0.5):
        if every < 1:
            raise ValueError("sync_every must be a positive number of steps")
        self.meet_every = every
        self.pause_wake_s = pause_wake_s
        self.group = group  # the default group unless given
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.leader = self.rank == LEADER
        self.backend = str(dist.get_backend(group))
        self.control = self._control_group(group)
        self.applied: list[tuple[int, str]] = []  # (step, kind) of each command applied here
        self._apart = False  # a peer was gone at close(): no more collectives
        self._staged: deque = deque()         # the training thread's rows, until a meeting
        self._inbox: deque = deque()          # rank 0: commands from the poller and the guard
        self._flush_rows: deque = deque()     # rank 0: the flusher's rows (averaged losses)
        self._handed: list[torch.Tensor] = []  # given to collectives, maybe still held there
        self._wake = None

    @classmethod
    def detect(cls, every: int = DEFAULT_SYNC_EVERY) -> DistributedCoordinator | None:
        """A coordinator for the current job, or ``None`` when this is not a multi-process
        job."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(every)

    def _control_group(self, group: Any) -> Any:
        # A collective: every rank builds its Babysitter at the same point, so this lines up.
        if "gloo" in self.backend:
            return group
        return dist.new_group(ranks=list(range(self.world_size)), backend="gloo")

    # --- wiring (while the Babysitter is built) ---------------------------------------------------

    def channels(self) -> tuple[Channels, Channels | None]:
        """Every rank's ``step()`` stages its rows here until a meeting, and takes commands only
        at meetings (its own command queue stays empty). Rank 0's workers see the averaged rows
        and hand commands to the meetings' inbox; the other ranks run no workers and discard
        their records."""
        training = Channels(rows=self._staged, outbox=deque() if self.leader
                            else deque(maxlen=0))  # maxlen 0: appends are dropped
        self._wake = training.wake
        if not self.leader:
            return training, None
        return training, Channels(rows=self._flush_rows, commands=self._inbox,
                                  outbox=training.outbox, wake=training.wake)

    def open_store(self, run_dir, url: str | None) -> RunStore | None:
        """Rank 0 opens (creates) the run store; the other ranks never touch it."""
        return store_for(run_dir, url, create=True) if self.leader else None

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend,
                "sync_every": self.meet_every}

    # --- meetings ---------------------------------------------------------------------------------

    def meet(self, loop: TrainingLoop) -> None:
        """All ranks, at the same step: average the buffered losses, then share the commands."""
        commands = drain(self._inbox) if self.leader else []
        count = self._meet(drain(self._staged), len(commands))
        self._receive(loop, commands, count)
        if loop.paused and not loop.should_stop:
            self._wait_while_paused(loop)

    def _meet(self, rows: list, count: int) -> int:
        """Average the rows' losses (rank 0 keeps them); return rank 0's command count.

        On the CPU (gloo) one ``all_gather`` of ``[losses…, count]`` does both: every rank
        learns rank 0's count, rank 0 averages the gathered losses (a gloo all-gather of a few
        numbers costs about half an all-reduce plus a broadcast). With losses on a GPU the
        all-reduce stays on the device (asynchronous, no host sync) and the count travels on
        the gloo control group.
        """
        values = [r.loss for r in rows]
        device = self._device(values)
        losses = [torch.as_tensor(v).detach().reshape(()).to(device, torch.float64)
                  for v in values]
        if device.type == "cpu" and self.control is self.group:
            mine = torch.cat([*(t.reshape(1) for t in losses),
                              torch.tensor([count], dtype=torch.float64)])
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            self._hand(mine, *gathered)
            dist.all_gather(gathered, mine, group=self.group)
            if self.leader and rows:
                self._hand_to_flusher(rows, torch.stack(gathered)[:, :-1].sum(0))
            return int(gathered[LEADER][-1])
        if rows:
            stacked = torch.stack(losses)
            self._hand(stacked)
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group)
            if self.leader:
                self._hand_to_flusher(rows, stacked)
        return self._broadcast_count(count)

    def _hand_to_flusher(self, rows: list, loss_sums: torch.Tensor) -> None:
        means = loss_sums / self.world_size
        # CPU means are read now (the gather has finished: a memory read), as Babysitter.step
        # reads a CPU loss: tensors kept for the flusher slow the training loop. A device's
        # stay tensors (reading them would wait for the device).
        losses = means.tolist() if means.device.type == "cpu" else means.unbind()
        self._flush_rows.extend(r._replace(loss=loss) for r, loss in zip(rows, losses))

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
        self._hand(box)
        dist.broadcast(box, src=LEADER, group=self.control)
        return int(box)

    def _receive(self, loop: TrainingLoop, commands: list, count: int) -> None:
        """Rank 0 sends its ``count`` commands (if any); every rank applies them in order."""
        if not count:
            return
        for command in self._from_leader(commands):
            self.applied.append((loop.step_count, command.kind))
            loop.apply_command(command)

    def share(self, load: Callable[[], T]) -> T:
        """Rank 0's ``load()`` on every rank (a collective: all ranks call it at the same point).

        Used for the states that resume and rollback restore: only rank 0 writes checkpoint
        files, so the other ranks may have none (another node, no shared file system). If
        rank 0's ``load()`` fails, every rank raises (the others would wait in the broadcast
        forever otherwise)."""
        if self.leader:
            try:
                outcome = ("ok", load())
            except Exception as err:
                self._from_leader(("error", f"{type(err).__name__}: {err}"))
                raise
        else:
            outcome = None
        outcome, value = self._from_leader(outcome)
        self._let_go(SHARE_RELEASE_S)  # a whole checkpoint's bytes: not kept past the backend
        if outcome == "error":
            raise RuntimeError(f"rank 0 could not load the state to restore: {value}")
        return value

    def agree(self, value: Any) -> bool:
        """Whether ``value`` is the same on every rank (a collective: all ranks call it at the
        same point, once, while the Babysitter is built)."""
        values = self._all_gathered(value)
        return all(v == values[LEADER] for v in values)

    def gather(self, take: Callable[[], T]) -> list[T] | None:
        """Every rank's ``take()`` in rank order at rank 0, None on the others (a collective:
        all ranks call it at the same step). A peer gone (at the end of the run) costs the
        gathered values, not the caller: rank 0 then keeps its own alone."""
        if self._apart:
            return None
        try:  # to every rank, not only rank 0: all the control group's collectives are symmetric
            values = self._all_gathered(take())
        except (RuntimeError, ValueError):
            log.exception("could not gather every rank's value on rank %d", self.rank)
            return None
        return values if self.leader else None

    def _all_gathered(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (the control group): what
        ``all_gather_object`` does (gather the sizes, then the bytes padded to the longest),
        on tensors handed over as the module docstring says."""
        mine = _bytes_of(value)
        size = torch.tensor([mine.numel()], dtype=torch.int64)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        self._hand(size, *sizes)
        dist.all_gather(sizes, size, group=self.control)
        padded = torch.zeros(max(int(s) for s in sizes), dtype=torch.uint8)
        padded[:mine.numel()] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._hand(padded, *parts)
        dist.all_gather(parts, padded, group=self.control)
        return [_value_of(part[:int(s)]) for part, s in zip(parts, sizes)]

    def _from_leader(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the control group; the others pass anything):
        what ``broadcast_object_list`` does, on tensors handed over as the module docstring
        says."""
        data = _bytes_of(value) if self.leader else None
        size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64)
        self._hand(size)
        dist.broadcast(size, src=LEADER, group=self.control)
        if data is None:
            data = torch.empty(int(size), dtype=torch.uint8)
        self._hand(data)
        dist.broadcast(data, src=LEADER, group=self.control)
        return value if self.leader else _value_of(data)

    def _hand(self, *tensors: torch.Tensor) -> None:
        """Keep ``tensors``, about to be given to a collective (before it, so one that raises
        is kept too), until the backend has let go of them; drop those it has let go of since
        the last call (see the module docstring)."""
        self._let_go()
        self._handed.extend(tensors)

    def _let_go(self, wait_s: float = 0.0) -> bool:
        """Drop the kept tensors the backend has let go of, waiting up to ``wait_s`` for the
        others (the sleeps release the GIL, which a thread letting go may be waiting for);
        whether none is left. While waiting, a tensor no C++ code holds any more whose Python
        object still has another holder after :data:`PENDING_RELEASE_S` is not waited for:
        that holder is not the backend (a traceback's frame, of a collective that raised)."""
        start = time.monotonic()
        while True:
            self._handed = _still_held(self._handed)
            waited = time.monotonic() - start
            if wait_s and waited >= PENDING_RELEASE_S:
                self._handed = [t for t in self._handed if _held_in_cpp(t)]
            if not self._handed or waited >= wait_s:
                return not self._handed
            time.sleep(0.001)

    def retire(self, timeout_s: float = RETIRE_TIMEOUT_S) -> None:
        """Wait until the backend has let go of every tensor this rank gave a collective (at
        the end of the run: after this, the process may exit at any moment)."""
        if not self._let_go(timeout_s):
            log.warning("the process group still holds %d of Panda's tensors after %.1f s; "
                        "exiting now may abort the process", len(self._handed), timeout_s)

    def _wait_while_paused(self, loop: TrainingLoop) -> None:
        # Rank 0 sleeps on the wake event (set by its poller when a command arrives); the
        # others sleep in the broadcast. Every rank leaves the loop after the same meeting.
        while loop.paused and not loop.should_stop:
            if self.leader:
                self._wake.wait(self.pause_wake_s)
                self._wake.clear()
            commands = drain(self._inbox) if self.leader else []
            self._receive(loop, commands, self._broadcast_count(len(commands)))

    # --- end of the run ---------------------------------------------------------------------------

    def close(self, loop: TrainingLoop, *, collective: bool) -> None:
        """Hand the last, not yet averaged losses to the flusher.

        ``collective`` (a normal end, where every rank closes at the same step): average them
        like at a meeting. Otherwise (an exception on this rank, Ctrl-C) the other ranks may not
        come, so rank 0 logs its own losses rather than wait for them.
        """
        rows = drain(self._staged)
        if collective:
            try:
                self._meet(rows, 0)  # commands sent now stay pending: the run is over
                return
            except (RuntimeError, ValueError):  # a peer is gone: keep what this rank has
                log.exception("could not average the last losses; logging rank %d's own",
                              self.rank)
        self._apart = True  # the peers may be gone: the final checkpoint gathers nothing
        if self.leader:
            self._flush_rows.extend(rows)


def _bytes_of(value: Any) -> torch.Tensor:
    """``value`` pickled into a uint8 tensor (torch's object collectives pickle too)."""
    return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)


def _value_of(data: torch.Tensor) -> Any:
    """The value :func:`_bytes_of` pickled into ``data`` (a peer rank's, of this job)."""
    return pickle.loads(data.numpy().tobytes())  # the job's own ranks: trusted as torch does


def _still_held(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Those of ``tensors`` that something besides this list holds: more than one C++
    reference (``_use_count``: a collective's work), or more Python references than a tensor
    held by this list alone (while C++ holds a tensor, torch keeps a reference to its Python
    object; the thread that lets go drops it under the GIL, after lowering the count). Pass a
    list that is the tensors' only holder. A torch without ``_use_count`` holds nothing."""
    tensors.append(torch.empty(0))  # held by this list alone: the reference count to compare
    refs = [sys.getrefcount(t) for t in tensors]  # each +1 for t, the probe's too
    alone = refs.pop()
    tensors.pop()
    return [t for t, n in zip(tensors, refs) if n > alone or _held_in_cpp(t)]


def _held_in_cpp(tensor: torch.Tensor) -> bool:
    """Whether C++ code (a collective's work) holds ``tensor`` besides its Python object."""
    return getattr(tensor, "_use_count", lambda: 1)() > 1


def coordinator_for(sync_every: int = DEFAULT_SYNC_EVERY) -> Coordinator:
    """The coordinator for this process: DDP's in a multi-process ``torch.distributed`` job,
    else the single-process one."""
    return DistributedCoordinator.detect(sync_every) or Coordinator()


__all__ = ["DEFAULT_SYNC_EVERY", "DistributedCoordinator", "coordinator_for"]
