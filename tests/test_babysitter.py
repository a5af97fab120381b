"""The Babysitter: the hook into any training loop.

Specification: it logs every step's loss and knobs to the run store without ever syncing on the
training thread; it applies commands from the store exactly once, in order, at step boundaries,
on SGD, Adam and AdamW and any number of param groups (LR and weight decay keep their ratios);
bad commands are rejected with a reason and change nothing; pause blocks the loop, resume and
stop end the pause; an exception marks the run failed and still flushes everything; checkpoints
restore the model bitwise.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from typing import ClassVar

import pytest
import torch
from helpers import holds_for, wait_until

import trainer.babysitter as babysitter_module
from trainer import Babysitter, KnobError
from trainer.checkpoint_files import list_checkpoints
from trainer.coordinator import Coordinator
from trainer.rng import set_rng_state
from trainer.store import RunStore, SqliteStore
from trainer.workers import to_floats

torch.set_num_threads(1)

# Short intervals keep the tests quick. The divergence guard (tested on its own) is off here:
# these tests feed made-up losses such as 0.0 between real ones.
FAST = {"flush_interval": 0.02, "poll_interval": 0.01, "on_diverge": "ignore"}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def make(opt_name: str = "sgd", **kw):
    torch.manual_seed(0)
    model = Net()
    params = model.parameters()
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, **kw),
        "adam": lambda: torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), **kw),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), **kw),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=0.01, **kw),
    }[opt_name]()
    return model, opt


def train_steps(bs: Babysitter, model, opt, n: int, *, pause_s: float = 0.0) -> list[float]:
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bs.step(loss)
        losses.append(loss.item())  # the test's own bookkeeping, not the Babysitter's
        if pause_s:
            time.sleep(pause_s)
    return losses


def step_until(bs: Babysitter, predicate, *, timeout: float = 30.0, what: str = "it") -> None:
    """Keep taking (trivial) steps until ``predicate()``: commands are taken at step
    boundaries and knob changes land at the next update (an optimizer step with no gradients
    changes no parameter, but it is an update: its hooks run)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        bs.optimizer.step()
        bs.step(0.0)
        time.sleep(0.002)


class UpdateSpy:
    """A step pre-hook registered after the Babysitter's: the group values each update uses
    (Panda composes its knobs around the update; between updates the groups hold the user's
    own values, see trainer.composition)."""

    def __init__(self, opt):
        self.seen: list[list[dict]] = []
        opt.register_step_pre_hook(lambda o, a, k: self.seen.append(
            [{key: g.get(key) for key in ("lr", "momentum", "betas", "weight_decay")}
             for g in o.param_groups]))

    @property
    def last(self) -> list[dict]:
        return self.seen[-1]


def settled(store: RunStore, command_id: int):
    return lambda: store.command(command_id).status != "pending"


# --- logging ------------------------------------------------------------------------------------

def test_every_step_is_logged_with_its_knobs_and_close_flushes_everything(tmp_path):
    model, opt = make()
    # A flush interval far longer than the test: only close() can have written the rows.
    with Babysitter(opt, tmp_path / "run", model=model, config={"batch_size": 16},
                    task="toy", flush_interval=60, poll_interval=60) as bs:
        losses = train_steps(bs, model, opt, 300)
        bs.log_validation(0.5, accuracy=torch.tensor(0.75))
    with SqliteStore(tmp_path / "run") as store:
        m = store.metrics_since()
        meta = store.meta()
        val = store.validation_since()
    assert m["step"] == list(range(300))
    assert m["loss"] == pytest.approx(losses, rel=1e-6)
    assert set(m["lr"]) == {0.01} and set(m["momentum"]) == {0.9}
    assert set(m["weight_decay"]) == {1e-4}
    assert [(v["name"], v["value"], v["step"]) for v in val] == [("loss", 0.5, 300),
                                                                  ("accuracy", 0.75, 300)]
    assert meta["status"] == "finished" and meta["config"] == {"batch_size": 16}
    assert meta["task"] == "toy" and meta["optimizer"] == "SGD" and meta["step"] == 300
    assert meta["knobs"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    assert [c.reason for c in list_checkpoints(tmp_path / "run")] == ["final"]


def test_rows_reach_the_store_while_training_runs(tmp_path):
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", **FAST) as bs:
        train_steps(bs, model, opt, 20)
        reader = SqliteStore(tmp_path / "run")
        wait_until(lambda: len(reader.metrics_since()["step"]) == 20, what="rows to be flushed")
        assert reader.summary()["state"] == "running"
        reader.close()


def test_log_validation_records_any_named_metrics_and_ends_the_epoch(tmp_path):
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", **FAST) as bs:
        train_steps(bs, model, opt, 3)
        bs.log_validation(torch.tensor(1.25), accuracy=0.5, top5=torch.tensor([0.875]))
        assert bs.epoch == 1
        train_steps(bs, model, opt, 2)
        bs.log_validation(perplexity=float("nan"), end_epoch=False)
        assert bs.epoch == 1
        train_steps(bs, model, opt, 1)
    with SqliteStore(tmp_path / "run") as store:
        rows = [(r["step"], r["epoch"], r["name"], r["value"]) for r in store.validation_since()]
        epochs = store.metrics_since()["epoch"]
    assert rows == [(3, 0, "loss", 1.25), (3, 0, "accuracy", 0.5), (3, 0, "top5", 0.875),
                    (5, 1, "perplexity", None)]
    assert epochs == [0, 0, 0, 1, 1, 1]


class Spy(torch.Tensor):
    """A tensor that records, per thread, every torch operation done on it."""

    calls: ClassVar[list[tuple[str, int]]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        if name == "__get__":  # an attribute read: name the attribute (e.g. "data")
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        Spy.calls.append((name, threading.get_ident()))
        return super().__torch_function__(func, types, args, kwargs or {})


class DeviceSpy(Spy):
    """A Spy that says it lives on an accelerator: reading its value would wait for the
    device (``is_cpu`` is a plain property here, not a torch operation)."""

    @property
    def is_cpu(self) -> bool:
        return False


def test_step_never_syncs_on_the_training_thread(tmp_path):
    """``step`` and ``log_validation`` may check a device tensor's size and detach it, nothing
    more: no .item(), .tolist(), float() or .cpu() on the training thread; the flusher
    converts."""
    values = [0.5 + i / 64 for i in range(64)]
    losses = [torch.tensor(v).as_subclass(DeviceSpy) for v in values]
    val = torch.tensor(0.25).as_subclass(DeviceSpy)
    _, opt = make()
    main = threading.get_ident()
    with Babysitter(opt, tmp_path / "run", **FAST) as bs:
        Spy.calls.clear()
        for loss in losses:
            bs.step(loss)
        bs.log_validation(val)
        on_main = {name for name, thread in Spy.calls if thread == main}
        wait_until(lambda: any(t != main for _, t in Spy.calls), what="the flusher")
    # Metadata and device ops only on the training thread: the size check (numel), .data /
    # detach (the tensor without its graph), clone (a copy queued on the device); never a value.
    assert on_main <= {"data", "detach", "numel", "clone"}, \
        f"training thread touched the values: {on_main}"
    off_main = {name for name, thread in Spy.calls if thread != main}
    assert off_main & {"tolist", "item", "__float__"}  # converted, but elsewhere
    with SqliteStore(tmp_path / "run") as store:
        assert store.metrics_since()["loss"] == pytest.approx(values)
        assert store.validation_since()[0]["value"] == 0.25


def test_device_values_overwritten_in_place_keep_each_steps_value(tmp_path):
    """torch.compile(mode="reduce-overhead") returns its outputs in CUDA-graph memory that the
    next replay overwrites (reading an overwritten one raises): a device loss or metric is kept
    as a copy queued on the device, not as the tensor handed in."""
    _, opt = make()
    loss, metric = (torch.zeros(()).as_subclass(DeviceSpy) for _ in range(2))
    values = [0.5 + i / 8 for i in range(8)]
    with Babysitter(opt, tmp_path / "run", flush_interval=60, poll_interval=60) as bs:
        for v in values:
            loss.fill_(v)  # the next replay writes its loss where the last one was
            bs.step(loss)
            metric.fill_(v / 2)
            bs.log_validation(accuracy=metric, end_epoch=False)
    with SqliteStore(tmp_path / "run") as store:
        assert store.metrics_since()["loss"] == values
        assert [r["value"] for r in store.validation_since()] == [v / 2 for v in values]


def test_a_cpu_loss_is_read_at_once_and_not_kept(tmp_path):
    """A CPU loss is a number by the time ``step`` returns (reading it waits for nothing): the
    queue holds no tensor, whose keeping would slow the training loop (see Babysitter.step)."""
    _, opt = make()
    with Babysitter(opt, tmp_path / "run", flush_interval=60, poll_interval=60) as bs:
        for i in range(8):
            bs.step(torch.tensor(1.0 + i / 8, requires_grad=True) * 2)
        queued = [row.loss for row in bs.channels.rows]
        assert len(queued) == 8 and all(type(v) is float for v in queued)
    with SqliteStore(tmp_path / "run") as store:
        assert store.metrics_since()["loss"] == [2 * (1.0 + i / 8) for i in range(8)]


class PinnedSpy(Spy):
    """A CPU tensor that says it is pinned: the target of a non_blocking copy from a device,
    whose value may not have landed yet (pinned memory itself needs an accelerator)."""

    def is_pinned(self, *args) -> bool:
        return True


def test_a_pinned_cpu_loss_is_not_read_on_the_training_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(babysitter_module, "pinned_memory_possible", lambda: True)  # a GPU box
    _, opt = make()
    main = threading.get_ident()
    with Babysitter(opt, tmp_path / "run", flush_interval=60, poll_interval=60) as bs:
        Spy.calls.clear()
        bs.step(torch.tensor(0.75).as_subclass(PinnedSpy))
        assert isinstance(bs.channels.rows[0].loss, torch.Tensor)
        assert not {name for name, t in Spy.calls if t == main} & {"item", "tolist", "__float__"}
    with SqliteStore(tmp_path / "run") as store:
        assert store.metrics_since()["loss"] == [0.75]


def test_without_an_accelerator_a_cpu_loss_costs_no_pinning_check(tmp_path, monkeypatch):
    """No accelerator, no pinned memory: ``is_pinned()`` (a dispatcher call, ~2 µs a step in
    the fast loop) is not asked, and the loss is read at once; with one, it is asked."""
    for accelerator in (False, True):
        monkeypatch.setattr(babysitter_module, "pinned_memory_possible", lambda a=accelerator: a)
        _, opt = make()
        main = threading.get_ident()
        run = tmp_path / f"run{accelerator}"
        with Babysitter(opt, run, flush_interval=60, poll_interval=60) as bs:
            Spy.calls.clear()
            bs.step(torch.tensor(0.5).as_subclass(Spy))
            asked = {name for name, t in Spy.calls if t == main}
            assert type(bs.channels.rows[0].loss) is float
        assert ("is_pinned" in asked) is accelerator, asked
        with SqliteStore(run) as store:
            assert store.metrics_since()["loss"] == [0.5]


def test_folded_half_precision_losses_do_not_overflow(tmp_path):
    """Rows folded while the store lags (see Babysitter._fold) are summed in float32: 10 fp16
    device losses of 60,000 add up past fp16's largest value (65,504)."""
    _, opt = make()
    with Babysitter(opt, tmp_path / "run", flush_interval=60, poll_interval=60,
                    on_diverge="ignore", row_limit=2) as bs:
        for _ in range(12):
            bs.step(torch.tensor(60_000.0, dtype=torch.float16).as_subclass(DeviceSpy))
    with SqliteStore(tmp_path / "run") as store:
        losses = store.metrics_since()["loss"]
        assert bs.folded_steps == 9 and losses == [60_000.0, 60_000.0, 60_000.0]


@pytest.mark.parametrize(("values", "expected"), [
    ([torch.tensor(0.5), torch.tensor([0.25]), torch.tensor([[2.0]])], [0.5, 0.25, 2.0]),
    ([torch.tensor(0.5, dtype=torch.bfloat16), torch.tensor(3.0, dtype=torch.float16)],
     [0.5, 3.0]),
    ([torch.tensor(1.5), 2.5, 7], [1.5, 2.5, 7.0]),
    ([0.1, torch.tensor(0.2, dtype=torch.float64)], [0.1, 0.2]),
    ([float("nan"), torch.tensor(float("inf"))], [float("nan"), float("inf")]),
])
def test_to_floats_reads_any_mix_of_scalar_tensors_and_numbers(values, expected):
    got = to_floats(values)
    assert len(got) == len(expected) and all(type(v) is float for v in got)
    assert got[:-1] == expected[:-1] or math.isnan(got[0])
    assert got[-1] == expected[-1]


def test_to_floats_refuses_a_tensor_of_several_values():
    """A metric of two values never spreads over two rows: the stack cannot be reshaped to one
    value per row, and float() names the problem."""
    with pytest.raises((ValueError, RuntimeError), match=r"element|scalar|convert"):
        to_floats([torch.tensor(1.0), torch.tensor([2.0, 3.0])])


def test_non_finite_losses_are_logged_not_raised(tmp_path):
    _, opt = make()
    with Babysitter(opt, tmp_path / "run", **FAST) as bs:
        for v in (1.0, float("nan"), float("inf"), 2.0):
            bs.step(torch.tensor(v))
    with SqliteStore(tmp_path / "run") as store:
        losses = store.metrics_since()["loss"]
    assert losses[0] == 1.0 and losses[3] == 2.0
    assert all(v != v for v in losses[1:3])  # NaN


# --- knobs on each optimizer family -------------------------------------------------------------

@pytest.mark.parametrize(("name", "momentum_of"), [
    ("sgd", lambda g: g["momentum"]),
    ("adam", lambda g: g["betas"][0]),
    ("adamw", lambda g: g["betas"][0]),
])
def test_set_command_changes_lr_momentum_and_weight_decay(tmp_path, name, momentum_of):
    model, opt = make(name)
    beta2 = opt.param_groups[0].get("betas", (None, None))[1]
    user = [dict(g) for g in opt.param_groups]
    with Babysitter(opt, tmp_path / "run", model=model, **FAST) as bs, \
            SqliteStore(tmp_path / "run") as store:
        spy = UpdateSpy(opt)
        train_steps(bs, model, opt, 3)
        cid = store.submit_command("set", {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.01})
        step_until(bs, lambda: bs.channels.commands == deque() and bs.lr == 0.05,
                   what="the set command to be taken")
        train_steps(bs, model, opt, 1)  # the update that uses it
        used = spy.last[0]
        assert used["lr"] == 0.05 and momentum_of(used) == 0.5 and used["weight_decay"] == 0.01
        if beta2 is not None:
            assert used["betas"][1] == beta2  # β2 is not the momentum knob
        group = opt.param_groups[0]  # between updates: the user's own values, untouched
        assert (group["lr"], group["weight_decay"]) == (user[0]["lr"], user[0]["weight_decay"])
        train_steps(bs, model, opt, 2)
        wait_until(settled(store, cid), what="the verdict")
        cmd = store.command(cid)
        assert cmd.status == "applied" and cmd.applied_step >= 3 and cmd.error is None
    with SqliteStore(tmp_path / "run") as store:
        m = store.metrics_since(cmd.applied_step - 2)  # the last old row, then the new ones
        events = store.events_since()
    assert m["lr"][0] != 0.05 and set(m["lr"][1:]) == {0.05}
    assert set(m["momentum"][1:]) == {0.5} and set(m["weight_decay"][1:]) == {0.01}
    assert sorted(e["knob"] for e in events) == ["lr", "momentum", "weight_decay"]
    assert {e["step"] for e in events} == {cmd.applied_step}
    assert {e["command_id"] for e in events} == {cid}


def test_param_groups_keep_lr_ratios_and_excluded_decay_stays_zero(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([
        {"params": model.body.weight, "lr": 0.1, "weight_decay": 1e-3},
        {"params": model.head.weight, "lr": 0.01, "weight_decay": 5e-4},
        {"params": [model.body.bias, model.head.bias], "lr": 0.1, "weight_decay": 0.0},
    ], lr=0.1, momentum=0.9)
    with Babysitter(opt, tmp_path / "run", **FAST) as bs:
        spy = UpdateSpy(opt)

        def used(**knobs):
            bs.set(**knobs)
            train_steps(bs, model, opt, 1)
            return spy.last
        assert bs.lr == 0.1 and bs.knobs.weight_decay() == 1e-3
        assert [g["lr"] for g in used(lr=0.5)] == pytest.approx([0.5, 0.05, 0.5])
        assert [g["weight_decay"] for g in used(weight_decay=1e-2)] == pytest.approx(
            [1e-2, 5e-3, 0.0])
        assert [g["weight_decay"] for g in used(weight_decay=0.0)] == [0.0, 0.0, 0.0]
        # The user's exclusions (and ratios) come back with a new value.
        assert [g["weight_decay"] for g in used(weight_decay=2e-3)] == pytest.approx(
            [2e-3, 1e-3, 0.0])
        assert [g["momentum"] for g in used(momentum=0.5)] == pytest.approx([0.5, 0.5, 0.5])


def test_api_set_validates_and_is_recorded_like_a_command(tmp_path):
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", **FAST) as bs:
        for bad in ({"lr": 0}, {"lr": float("nan")}, {"momentum": 1.0},
                    {"weight_decay": -1}, {"dropout": 0.1}, {}):
            with pytest.raises(KnobError):
                bs.set(**bad)
        assert bs.composition.in_force() == {"lr": 0.01, "momentum": 0.9,
                                             "weight_decay": 1e-4}
        train_steps(bs, model, opt, 2)
        bs.set(lr=0.02)
        train_steps(bs, model, opt, 2)  # the first update uses it, the next step confirms
    with SqliteStore(tmp_path / "run") as store:
        (cmd,) = store.commands()
        assert (cmd.kind, cmd.source, cmd.status, cmd.applied_step) == ("set", "api",
                                                                         "applied", 2)
        assert json.loads(cmd.payload) == {"lr": 0.02}
        assert [e["command_id"] for e in store.events_since()] == [cmd.id]


# --- hostile and impossible commands ------------------------------------------------------------

BAD_RAW = [
    ("set", '{"lr": -1}', "lr must be in"),
    ("set", '{"lr": 0}', "lr must be in"),
    ("set", '{"lr": NaN}', "finite"),
    ("set", '{"lr": Infinity}', "finite"),
    ("set", '{"lr": "fast"}', "must be a number"),
    ("set", '{"lr": true}', "bool"),
    ("set", '{"momentum": 1.0}', "momentum must be in"),
    ("set", '{"weight_decay": -0.5}', "weight_decay must be in"),
    ("set", '{"dropout": 0.5}', "unknown knob"),
    ("set", "{lr: 0.1", "malformed"),
    ("set", "[1, 2]", "must be an object"),
    ("explode", "{}", "unknown command"),
    ("pause", '{"x": 1}', "takes no arguments"),
    ("schedule", '{"shape": "zigzag"}', "unknown decay shape"),
]


def test_rejected_commands_carry_a_reason_and_change_nothing(tmp_path):
    _, opt = make()
    with Babysitter(opt, tmp_path / "run", **FAST) as bs, \
            SqliteStore(tmp_path / "run") as store:
        before = (bs.composition.in_force(), bs.schedule, bs.paused, bs.should_stop)
        ids = [store.submit_raw_command(kind, text) for kind, text, _ in BAD_RAW]
        step_until(bs, lambda: all(settled(store, i)() for i in ids), what="verdicts")
        assert (bs.composition.in_force(), bs.schedule, bs.paused, bs.should_stop) == before
        for cid, (kind, text, reason) in zip(ids, BAD_RAW):
            cmd = store.command(cid)
            assert cmd.status == "rejected", (kind, text)
            assert reason in cmd.error, (kind, text, cmd.error)
            assert cmd.applied_step is None
    with SqliteStore(tmp_path / "run") as store:
        assert store.events_since() == []
        assert set(store.metrics_since()["lr"]) == {0.01}


def test_a_verdict_is_written_at_once_not_at_the_next_flush(tmp_path):
    """The CLI and the page wait for a command's verdict: it must not wait for the periodic
    flush (here a minute away, far beyond the test's timeout)."""
    _, opt = make()
    with Babysitter(opt, tmp_path / "run", flush_interval=60, poll_interval=0.01,
                    on_diverge="ignore") as bs, SqliteStore(tmp_path / "run") as store:
        good = store.submit_command("set", {"lr": 0.02})
        bad = store.submit_raw_command("set", '{"lr": -1}')
        step_until(bs, lambda: settled(store, good)() and settled(store, bad)(),
                   timeout=20, what="both verdicts")
        assert store.command(good).status == "applied"
        assert store.command(bad).status == "rejected"


def test_momentum_on_an_optimizer_without_it_is_rejected(tmp_path):
    _, opt = make("adagrad")
    with Babysitter(opt, tmp_path / "run", **FAST) as bs, \
            SqliteStore(tmp_path / "run") as store:
        assert store.meta()["supported_knobs"] == ["lr", "weight_decay"]
        bad = store.submit_command("set", {"lr": 0.5, "momentum": 0.9})
        good = store.submit_command("set", {"weight_decay": 0.01})
        step_until(bs, settled(store, good), what="the good command")
        assert store.command(bad).status == "rejected"
        assert "Adagrad has no momentum knob" in store.command(bad).error
        used = bs.composition.last_used()  # what the update used
        assert used["lr"] == 0.01   # the whole command refused, lr included
        assert used["weight_decay"] == 0.01
        with pytest.raises(KnobError, match="no momentum"):
            bs.set(momentum=0.5)
        assert "momentum" not in opt.param_groups[0]


def test_commands_apply_exactly_once_and_in_order(tmp_path):
    model, opt = make()
    lrs = [round(0.001 * (i + 1), 6) for i in range(30)]
    with Babysitter(opt, tmp_path / "run", **FAST) as bs, \
            SqliteStore(tmp_path / "run") as store:
        ids = []
        for i, lr in enumerate(lrs):
            ids.append(store.submit_command("set", {"lr": lr}))
            if i % 7 == 0:
                ids.append(store.submit_raw_command("set", '{"lr": -1}'))  # interleaved junk
            opt.step()
            bs.step(0.0)  # some are taken between steps, some in the same batch
            if i % 3 == 2:  # every third is taken (and lands) before the next is sent
                step_until(bs, settled(store, ids[-1]), what=f"command {ids[-1]}")
        step_until(bs, lambda: all(settled(store, i)() for i in ids), what="all commands")
        train_steps(bs, model, opt, 3)
        assert bs.lr == lrs[-1]
    with SqliteStore(tmp_path / "run") as store:
        cmds = [store.command(i) for i in ids]
        events = store.events_since()
    good = [c for c in cmds if json.loads(c.payload).get("lr", -1) > 0]
    assert sum(c.status == "rejected" for c in cmds) == 5
    # Each good command is applied once; one taken in the same batch as a later one is
    # replaced by it before any update could use it, and says so.
    assert {c.status for c in good} <= {"applied", "superseded"}
    applied = [c for c in good if c.status == "applied"]
    assert applied[-1].id == good[-1].id and len(applied) >= len(good) // 3
    for c in good:
        if c.status == "superseded":
            assert "replaced by command" in c.error and c.applied_step is None
    steps = [c.applied_step for c in applied]
    assert steps == sorted(steps)
    # One event per applied command, in command order, each one's old value the previous new.
    assert [e["command_id"] for e in events] == [c.id for c in applied]
    assert [e["new"] for e in events] == [json.loads(c.payload)["lr"] for c in applied]
    assert [e["old"] for e in events[1:]] == pytest.approx([e["new"] for e in events[:-1]])


# --- pause, resume, stop ------------------------------------------------------------------------

def test_pause_blocks_the_loop_and_resume_continues(tmp_path):
    _, opt = make()
    bs = Babysitter(opt, tmp_path / "run", **FAST)
    errors: list[BaseException] = []

    def loop():
        try:
            while not bs.should_stop:
                bs.step(torch.tensor(1.0))
                time.sleep(0.001)
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    worker = threading.Thread(target=loop)
    worker.start()
    store = SqliteStore(tmp_path / "run")
    try:
        wait_until(lambda: bs.step_count > 10, what="training to start")
        pause = store.submit_command("pause")
        wait_until(settled(store, pause), what="the pause")
        wait_until(lambda: store.meta()["status"] == "paused", what="status paused")
        frozen = bs.step_count
        assert bs.paused and store.command(pause).applied_step == frozen
        holds_for(lambda: bs.step_count == frozen and worker.is_alive(), 0.3,
                  what="the pause")
        assert store.summary()["state"] == "paused"

        resume = store.submit_command("resume")
        wait_until(settled(store, resume), what="the resume")
        wait_until(lambda: bs.step_count > frozen + 5, what="steps after resume")
        assert not bs.paused
        wait_until(lambda: store.meta()["status"] == "running", what="status running")

        # Stop also ends a pause, and ends the loop.
        wait_until(settled(store, store.submit_command("pause")), what="second pause")
        stop = store.submit_command("stop")
        worker.join(timeout=30)
        assert not worker.is_alive() and bs.should_stop and not errors
        wait_until(settled(store, stop), what="the stop verdict")
        assert store.command(stop).status == "applied"
    finally:
        bs.should_stop = True
        bs.close()
        worker.join(timeout=30)
    assert store.meta()["status"] == "stopped"
    kinds = [e["kind"] for e in store.events_since()]
    assert kinds == ["pause", "resume", "pause", "stop"]
    store.close()


def test_stop_command_sets_should_stop_and_the_run_ends_stopped(tmp_path):
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", model=model, **FAST) as bs, \
            SqliteStore(tmp_path / "run") as store:
        train_steps(bs, model, opt, 2)
        assert not bs.should_stop
        cid = store.submit_command("stop")
        step_until(bs, lambda: bs.should_stop, what="should_stop")
        stopped_at = bs.step_count
    with SqliteStore(tmp_path / "run") as store:
        assert store.meta()["status"] == "stopped"
        assert store.command(cid).applied_step == stopped_at


def test_close_while_paused_does_not_hang(tmp_path):
    _, opt = make()
    bs = Babysitter(opt, tmp_path / "run", **FAST)
    worker = threading.Thread(target=lambda: [bs.step(1.0) for _ in range(10**6)
                                              if not bs._closed])
    with SqliteStore(tmp_path / "run") as store:
        store.submit_command("pause")
        worker.start()
        wait_until(lambda: bs.paused, what="pause")
        bs.close()
        worker.join(timeout=30)
        assert not worker.is_alive()


# --- failures -----------------------------------------------------------------------------------

def test_an_exception_in_the_loop_marks_the_run_failed_and_keeps_its_rows(tmp_path):
    model, opt = make()
    with pytest.raises(RuntimeError, match="CUDA out of memory"), \
            Babysitter(opt, tmp_path / "run", model=model, flush_interval=60) as bs:
        train_steps(bs, model, opt, 50)
        bs.log_validation(0.3)
        raise RuntimeError("CUDA out of memory (pretend)")
    with SqliteStore(tmp_path / "run") as store:
        meta = store.meta()
        assert meta["status"] == "failed"
        assert meta["error"] == "RuntimeError: CUDA out of memory (pretend)"
        assert store.metrics_since()["step"] == list(range(50))
        assert len(store.validation_since()) == 1
    assert list_checkpoints(tmp_path / "run") == []  # no checkpoint of a failed state


def test_keyboard_interrupt_ends_the_run_stopped(tmp_path):
    model, opt = make()
    with pytest.raises(KeyboardInterrupt), Babysitter(opt, tmp_path / "run", **FAST) as bs:
        train_steps(bs, model, opt, 3)
        raise KeyboardInterrupt
    with SqliteStore(tmp_path / "run") as store:
        assert store.meta()["status"] == "stopped"


@pytest.mark.parametrize("name", [".hidden", ".."])
def test_unsafe_run_directory_names_are_refused(tmp_path, name):
    _, opt = make()
    with pytest.raises(ValueError, match="invalid run name"):
        Babysitter(opt, tmp_path / name)


def test_checkpoint_every_needs_a_model(tmp_path):
    _, opt = make()
    with pytest.raises(ValueError, match="needs a model"):
        Babysitter(opt, tmp_path / "run", checkpoint_every=10)


# --- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_round_trip_restores_model_and_optimizer_bitwise(tmp_path):
    model, opt = make()
    saved = {}
    with pytest.raises(RuntimeError, match="crash"), \
            Babysitter(opt, tmp_path / "run", model=model, checkpoint_every=10,
                       schedule={"shape": "exponential", "rate": 0.5}, steps_per_epoch=4,
                       **FAST) as bs:
        train_steps(bs, model, opt, 10)
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                 "buf": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
                 "lr": bs.lr, "rng": torch.get_rng_state()}
        train_steps(bs, model, opt, 7)  # trained past the checkpoint, then it crashes
        raise RuntimeError("crash")

    with SqliteStore(tmp_path / "run") as store:  # the crash: failed, and why
        assert store.summary()["state"] == "failed"
        assert store.summary()["failure"] == "RuntimeError: crash"
    torch.manual_seed(123)  # a different model and RNG state: all must come from the file
    fresh = Net()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    with Babysitter(fresh_opt, tmp_path / "run", model=fresh, resume=True,
                    steps_per_epoch=4, **FAST) as bs:
        assert bs.step_count == 10 and bs.schedule.shape == "exponential"
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, saved["model"][key]), key
        for p, buf in zip(fresh.parameters(), saved["buf"]):
            assert torch.equal(fresh_opt.state[p]["momentum_buffer"], buf)
        assert bs.lr == saved["lr"]
        assert torch.equal(torch.get_rng_state(), saved["rng"])
        store = SqliteStore(tmp_path / "run")
        # The 7 steps after the checkpoint are forgotten: they will be trained again.
        assert store.metrics_since()["step"] == list(range(10))
        assert store.events_since()[-1]["kind"] == "restart"
        # The resumed trainer says when it took the run: its rows all predate it (the page
        # counts a trainer's silence from there, not from the last row before the crash).
        assert store.meta()["trainer_started"] > max(store.metrics_since()["wall"])
        # Running again: the crash's end time and reason are gone (the page's elapsed time
        # runs, no old failure is shown).
        assert store.meta()["ended"] is None and store.summary()["failure"] is None
        train_steps(bs, model=fresh, opt=fresh_opt, n=2)
    assert store.metrics_since()["step"] == list(range(12))
    assert store.meta()["status"] == "finished"
    store.close()


@pytest.mark.parametrize(("saved", "available", "visible", "cuda", "put_back", "warned"), [
    (2, True, 2, True, True, False),     # the GPUs it was saved on: every generator back
    (2, True, 1, True, False, True),     # fewer GPUs here: the CPU's alone, and the log says
    (2, False, 0, True, False, False),   # no CUDA here (a GPU run resumed on a laptop)
    (None, True, 2, True, False, False),  # a checkpoint from before Panda kept them
    (2, True, 2, False, False, False),   # DDP: rank 0's devices are no other rank's
])
def test_cuda_generators_are_put_back_only_where_they_belong(
        monkeypatch, caplog, saved, available, visible, cuda, put_back, warned):
    """trainer.rng, as checkpoints use it (tests/test_cuda.py reads the masks on a GPU)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    cpu = torch.get_rng_state()
    torch.rand(3)
    state = {"rng": cpu}
    if saved:
        state["cuda_rng"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(saved)]
    with caplog.at_level("WARNING", logger="trainer.rng"):
        set_rng_state(state, cuda=cuda)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert restored == ([state["cuda_rng"]] if put_back else [])
    assert ("saved on 2 CUDA devices and this process sees 1" in caplog.text) == warned


class Follower(Coordinator):
    """A process that records nothing of its own (a DDP rank other than 0), alone here."""

    leader, rank = False, 1


@pytest.mark.parametrize("coordinator", [Coordinator(), Follower()], ids=["leader", "follower"])
def test_a_resume_puts_back_the_cuda_generators_only_where_the_snapshot_was_taken(
        tmp_path, monkeypatch, coordinator):
    """Under DDP rank 0 takes the snapshots: resumed, it gets its CUDA generators back, and
    every other rank keeps its own (trainer.rng; CUDA is faked here, read on a GPU in
    tests/test_cuda.py)."""
    devices = [torch.full((16,), 7, dtype=torch.uint8)]
    restored = []
    for name, fake in {"is_available": lambda: True, "is_initialized": lambda: True,
                       "device_count": lambda: 1, "get_rng_state_all": lambda: devices,
                       "set_rng_state_all": restored.append}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", model=model, checkpoint_every=2, **FAST) as bs:
        train_steps(bs, model, opt, 2)
    restored.clear()
    with Babysitter(opt, tmp_path / "run", model=model, resume=True, coordinator=coordinator,
                    **FAST) as bs:
        assert bs.step_count == 2
    if not coordinator.leader:
        assert restored == []
        return
    (got,) = restored
    assert len(got) == len(devices) and all(map(torch.equal, got, devices))


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", model=model, resume=True, **FAST) as bs:
        assert bs.step_count == 0


def test_checkpoint_command_writes_a_checkpoint(tmp_path):
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", model=model, **FAST) as bs, \
            SqliteStore(tmp_path / "run") as store:
        train_steps(bs, model, opt, 3)
        cid = store.submit_command("checkpoint")
        step_until(bs, settled(store, cid), what="checkpoint command")
        step = store.command(cid).applied_step
        pinned = wait_until(lambda: [c for c in list_checkpoints(tmp_path / "run") if c.pinned],
                            what="the checkpoint file")
        assert [c.step for c in pinned] == [step]
        state = torch.load(pinned[0].path, weights_only=True)
        assert state["babysitter"]["step"] == step


def test_undo_from_code_restores_the_knobs_and_its_event_names_those_it_changed(tmp_path):
    """``bs.rollback()`` without a step is Undo: the state before the latest knob change, knobs
    included; its event lists the knobs it changed back (a momentum change, not the LR that
    stayed the same)."""
    model, opt = make()
    with Babysitter(opt, tmp_path / "run", model=model, **FAST) as bs:
        train_steps(bs, model, opt, 5)
        bs.set(momentum=0.95)
        train_steps(bs, model, opt, 5)
        assert bs.composition.last_used()["momentum"] == 0.95
        bs.rollback()
        train_steps(bs, model, opt, 1)
        assert bs.composition.last_used() == {"lr": 0.01, "momentum": 0.9,
                                              "weight_decay": 1e-4}
    with SqliteStore(tmp_path / "run") as store:
        undo = next(e for e in store.events_since() if e["kind"] == "rollback")
    assert undo["message"] == ("rolled back to the checkpoint of step 5 (knobs as at step 5: "
                               "momentum 9.5e-01 → 9e-01)")
