"""PandaCallback: a real Lightning ``Trainer.fit`` babysat through the run store.

Skipped when Lightning is not installed: it is an optional extra
(``pip install -e '.[lightning]'``).
Training runs on the CPU in a background thread; commands go in through the store exactly as
the dashboard and the CLI send them.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env, wait_until

L = pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra "
                        "(pip install -e '.[lightning]'); PandaCallback tests need it")

from trainer.lightning import PandaCallback, batch_loss, validation_name  # noqa: E402
from trainer.store import RunStore, SqliteStore  # noqa: E402

BATCHES = 8  # training batches per epoch

# Lightning's own deprecation noise with newer torch (its _pytree LeafSpec use), not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Regression(L.LightningModule):
    """Linear regression on a fixed random problem; logs val_loss per step, val_mae at the end."""

    def __init__(self, lr: float = 0.01, fail_at: int | None = None, scheduler: bool = False,
                 set_lr_at: int | None = None, set_lr: float = 0.003):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)
        self.raw_losses: list[torch.Tensor] = []
        self._abs_errors: list[torch.Tensor] = []
        self.maes: list[torch.Tensor] = []

    def on_train_start(self):
        # Runs after PandaCallback.on_train_start (callbacks first): a pre-step hook added now
        # runs after Panda's and sees what each update uses, Panda's factor included.
        self.used_lr, self.used_lrs, self.user_lrs = None, [], []
        optimizer = self.trainer.optimizers[0]

        def used(opt, args, kwargs):
            self.used_lr = opt.param_groups[0]["lr"]
            self.used_lrs.append(self.used_lr)
        optimizer.register_step_pre_hook(used)
        # A post-hook added after Panda's runs after it: the user's (scheduler's) own value.
        optimizer.register_step_post_hook(
            lambda opt, args, kwargs: self.user_lrs.append(opt.param_groups[0]["lr"]))

    def on_train_batch_start(self, batch, batch_idx):
        # A person turns the knob, from code, between two updates (training_step itself runs
        # inside optimizer.step's closure, after the step's pre-hooks).
        if self.global_step == self.hparams.set_lr_at:
            panda = next(c for c in self.trainer.callbacks if isinstance(c, PandaCallback))
            panda.babysitter.set(lr=self.hparams.set_lr)

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at is not None and self.global_step >= self.hparams.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.raw_losses.append(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self.net(x)
        self.log("val_loss", torch.nn.functional.mse_loss(pred, y))
        self._abs_errors.append((pred - y).abs().mean())

    def on_validation_epoch_end(self):
        # Logged after the callbacks' on_validation_epoch_end: PandaCallback must still see it.
        mae = torch.stack(self._abs_errors).mean()
        self.log("val_mae", mae)
        self._abs_errors.clear()
        if not self.trainer.sanity_checking:
            self.maes.append(mae)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if self.hparams.scheduler:
            return {"optimizer": opt,
                    "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1,
                                                                    gamma=0.5)}
        return opt


def loaders(batch_size: int = 8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES * batch_size, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(len(x), 1,
                                                                             generator=gen)
    data = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                        generator=gen),
            torch.utils.data.DataLoader(data, batch_size=batch_size * 4))


def make_trainer(callback: PandaCallback, max_epochs: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("devices", 1)
    return L.Trainer(max_epochs=max_epochs, callbacks=[callback], accelerator="cpu",
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def store_of(run_dir) -> RunStore:
    return SqliteStore(run_dir)


# --- helpers, no training -------------------------------------------------------------------


def test_validation_names_are_picked_and_renamed():
    assert validation_name("val_loss") == "loss"
    assert validation_name("val/loss") == "loss"
    assert validation_name("val") == "loss"
    assert validation_name("val_acc") == "acc"
    assert validation_name("validation/f1") == "f1"
    assert validation_name("train_loss") is None
    assert validation_name("loss") is None
    assert validation_name("value") is None


def test_validation_metrics_keep_tensors_and_skip_what_the_store_cannot_hold():
    cb = PandaCallback("runs/unused")
    loss = torch.tensor(0.5)
    picked = cb.validation_metrics({"val_loss": loss, "val_acc": 0.9, "train_loss": 1.0,
                                    "val_hist": torch.ones(3), "val_flag": True})
    assert picked == {"loss": loss, "acc": 0.9}
    assert picked["loss"] is not loss and isinstance(picked["loss"], torch.Tensor)
    only = PandaCallback("runs/unused", val_metrics=["loss", "val_acc"])
    assert only.validation_metrics({"loss": 1.0, "val_acc": 0.5, "val_loss": 2.0}) == {
        "loss": 1.0, "acc": 0.5}


def test_batch_loss_reads_tensors_and_dicts_without_syncing():
    t = torch.tensor(2.0, requires_grad=True) * 1
    assert isinstance(batch_loss(t), torch.Tensor) and not batch_loss(t).requires_grad
    assert batch_loss({"loss": t, "extra": 1}) is not None
    assert batch_loss(None) is None
    assert batch_loss({"loss": None}) is None


def test_optimizer_argument_is_refused():
    with pytest.raises(TypeError, match="optimizer"):
        PandaCallback("runs/x", optimizer=object())


# --- real training ----------------------------------------------------------------------------


def test_fit_logs_every_batch_and_validation_then_finishes(tmp_path):
    run_dir = tmp_path / "pl-finished"
    model, cb = Regression(lr=0.01), PandaCallback(run_dir, config={"batch_size": 8})
    make_trainer(cb, max_epochs=3, accumulate_grad_batches=2).fit(model, *loaders())

    assert cb.final_status == "finished" and cb.babysitter is None
    with store_of(run_dir) as store:
        meta = store.meta()
        assert meta["status"] == "finished"
        assert meta["config"] == {"batch_size": 8}
        assert meta["task"] == "Regression"
        assert meta["steps_per_epoch"] == BATCHES
        rows = store.metrics_since(-1)
        assert rows["step"] == list(range(3 * BATCHES))
        assert rows["epoch"] == [e for e in range(3) for _ in range(BATCHES)]
        # the batch's own loss, not Lightning's loss / accumulate_grad_batches
        raw = [float(v) for v in model.raw_losses]
        assert rows["loss"] == pytest.approx(raw, rel=1e-5)
        val = store.validation_since(0)
    # one validation per epoch (the sanity check is not logged), both metrics present
    assert sorted({r["name"] for r in val}) == ["loss", "mae"]
    assert [r["step"] for r in val if r["name"] == "loss"] == [8, 16, 24]
    assert all(math.isfinite(r["value"]) for r in val)
    # this validation's values, not a stale callback_metrics entry from the previous one
    assert [r["value"] for r in val if r["name"] == "mae"] == pytest.approx(
        [float(m) for m in model.maes], rel=1e-5)


def test_live_lr_change_pause_resume_and_stop(tmp_path):
    run_dir = tmp_path / "pl-live"
    model, cb = Regression(lr=0.01), PandaCallback(run_dir)
    trainer = make_trainer(cb, max_epochs=10_000)
    errors: list[BaseException] = []

    def fit():
        try:
            trainer.fit(model, *loaders())
        except BaseException as err:  # surfaced in the test thread below
            errors.append(err)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    try:
        wait_until(lambda: (run_dir / "run.db").exists(), what="run store")
        store = store_of(run_dir)
        wait_until(lambda: len(store.metrics_since(-1, columns=("step",))["step"]) > 5,
                   what="first metrics")
        cid = store.submit_command("set", {"lr": 0.003})
        cmd = wait_until(lambda: (c := store.command(cid)) and c.status != "pending" and c,
                         what="lr command resolved")
        assert cmd.status == "applied", cmd.error
        applied = cmd.applied_step
        rows = wait_until(lambda: (r := store.metrics_since(applied, columns=("step", "lr")))
                          ["step"] and r, what="rows after the change")
        assert set(rows["lr"]) == {0.003}
        before = store.metrics_since(-1, columns=("step", "lr"))
        assert {lr for s, lr in zip(before["step"], before["lr"]) if s < applied} == {0.01}
        wait_until(lambda: any(r["name"] == "mae" for r in store.validation_since(0)),
                   what="validation metrics")

        pause = store.submit_command("pause")
        wait_until(lambda: store.meta().get("status") == "paused", what="paused")
        assert store.command(pause).status == "applied"
        assert thread.is_alive()  # blocked inside on_train_batch_end, not finished
        paused_at = store.command(pause).applied_step
        store.submit_command("resume")
        wait_until(lambda: store.meta().get("step", 0) > paused_at + 3, what="training resumed")

        stop = store.submit_command("stop")
        thread.join(timeout=60)
        assert not thread.is_alive(), "fit did not end after the stop command"
        assert not errors, errors
        assert store.command(stop).status == "applied"
        assert store.meta()["status"] == "stopped"
        assert store.summary()["lr"] == pytest.approx(0.003, rel=1e-12)  # the last update's
        assert trainer.optimizers[0].param_groups[0]["lr"] == 0.01  # the user's own, kept
        assert trainer.current_epoch < trainer.max_epochs - 1
        events = store.events_since(0)
        assert any(e["kind"] == "set" and e["new"] == 0.003 for e in events)
        store.close()
    finally:
        if thread.is_alive():  # never leave a trainer running behind a failed assertion
            trainer.should_stop = True
            thread.join(timeout=30)
    assert cb.final_status == "stopped"


def test_exception_in_training_step_marks_the_run_failed(tmp_path):
    run_dir = tmp_path / "pl-failed"
    cb = PandaCallback(run_dir)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(cb, max_epochs=2).fit(Regression(fail_at=5), *loaders())
    assert cb.final_status == "failed"
    with store_of(run_dir) as store:
        meta = store.meta()
        assert meta["status"] == "failed"
        assert "RuntimeError: boom in training_step" in meta["error"]
        assert store.metrics_since(-1, columns=("step",))["step"] == list(range(5))


def test_a_live_lr_change_holds_with_a_scheduler_from_configure_optimizers(tmp_path):
    """StepLR halves the LR every epoch; a change at step 12 lands on that step's update and
    the schedule goes on from the new level (the factor never compounds into StepLR)."""
    cb = PandaCallback(tmp_path / "pl-sched")
    model = Regression(scheduler=True, set_lr_at=12, set_lr=0.003)
    make_trainer(cb, max_epochs=4, limit_val_batches=0).fit(model, *loaders())
    used, user = model.used_lrs, model.user_lrs
    assert len(used) == len(user) == 4 * BATCHES
    assert used[:12] == pytest.approx(user[:12], rel=1e-12)
    assert used[12] == 0.003
    k = 0.003 / user[12]
    assert [u / s for u, s in zip(used[12:], user[12:])] == pytest.approx([k] * 20, rel=1e-9)
    assert user == pytest.approx([0.01 * 0.5 ** (t // BATCHES) for t in range(4 * BATCHES)])
    with store_of(tmp_path / "pl-sched") as store:
        (cmd,) = store.commands()
        logged = store.metrics_since(-1, columns=("lr", "user_lr"))
        summary = store.summary()
    assert (cmd.status, cmd.applied_step) == ("applied", 12)
    assert logged["lr"] == pytest.approx(used, rel=1e-12)
    assert logged["user_lr"] == pytest.approx(user, rel=1e-12)
    assert summary["epoch"] == 4  # completed epochs, like a hand-written loop


def test_pandas_cosine_takes_its_length_from_the_trainer(tmp_path):
    """The README's snippet: schedule={"shape": "cosine"} with max_epochs=N reaches the floor
    at the end of epoch N, not after a default 100 epochs."""
    cb = PandaCallback(tmp_path / "pl-cos", schedule={"shape": "cosine"})
    model = Regression()
    make_trainer(cb, max_epochs=5, limit_val_batches=0).fit(model, *loaders())
    with store_of(tmp_path / "pl-cos") as store:
        assert store.meta()["schedule"]["total_epochs"] == 5.0
        lrs = store.metrics_since(-1, columns=("lr",))["lr"]
    total = 5 * BATCHES
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[-1] < 0.01 * 0.01  # near the floor at the end, not at 45 % of the start


def test_only_global_rank_zero_babysits(tmp_path, monkeypatch):
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    cb = PandaCallback(tmp_path / "pl-rank1")
    make_trainer(cb, max_epochs=1).fit(Regression(), *loaders())
    assert cb.final_status is None and not (tmp_path / "pl-rank1").exists()


def test_lightning_is_not_imported_by_the_library():
    code = ("import sys, trainer, trainer.babysitter, trainer.store; "
            "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- two ranks (Lightning's "ddp" strategy on the CPU, gloo) ----------------------------------


def _ddp_worker(run_dir: str, reports: str) -> None:
    """One rank of a 2-process Lightning DDP job (Lightning re-runs this script for rank 1)."""
    torch.set_num_threads(1)
    model, cb = Regression(lr=0.01), PandaCallback(run_dir)
    trainer = make_trainer(cb, max_epochs=10_000, strategy="ddp", devices=2)
    trainer.fit(model, *loaders())
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()
    Path(reports, f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "lr": model.used_lr, "status": cb.final_status,
        "params": digest, "epoch": trainer.current_epoch}))


@pytest.mark.slow
def test_ddp_every_rank_gets_the_knob_and_the_stop(tmp_path):
    run_dir, reports = tmp_path / "pl-ddp", tmp_path / "reports"
    reports.mkdir()
    with open(tmp_path / "ddp.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, __file__, str(run_dir), str(reports)],
                                stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(),
                                cwd=tmp_path)
    try:
        wait_until(lambda: (run_dir / "run.db").exists() or proc.poll() is not None,
                   what="the DDP run store")
        assert proc.poll() is None, (tmp_path / "ddp.log").read_text()
        store = store_of(run_dir)
        wait_until(lambda: store.meta().get("step", 0) >= 20, what="20 steps")
        cid = store.submit_command("set", {"lr": 0.003})
        cmd = wait_until(lambda: (c := store.command(cid)) and c.status != "pending" and c,
                         what="lr command resolved")
        assert cmd.status == "applied", cmd.error
        wait_until(lambda: store.meta().get("step", 0) >= cmd.applied_step + 10,
                   what="steps after the change")
        store.submit_command("stop")
        assert proc.wait(timeout=120) == 0, (tmp_path / "ddp.log").read_text()
        assert store.meta()["status"] == "stopped"
        assert store.meta()["distributed"]["world_size"] == 2
        store.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["lr"] for r in ranks] == pytest.approx([0.003, 0.003], rel=1e-12)
    assert [r["status"] for r in ranks] == ["stopped", "stopped"]
    assert ranks[0]["params"] == ranks[1]["params"]  # the replicas stayed identical
    assert ranks[0]["epoch"] == ranks[1]["epoch"] < 9_999


if __name__ == "__main__":
    _ddp_worker(*sys.argv[1:3])
