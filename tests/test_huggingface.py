"""PandaCallback with a real ``transformers.Trainer``: a 2-layer GPT-2 built from a config (no
download), trained with the Trainer's own cosine schedule. The LR is read back from the
updates themselves (plain SGD in float64: lr = −Δw·g / g·g)."""

from __future__ import annotations

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import wait_until  # noqa: E402

from trainer.huggingface import PandaCallback, validation_metrics  # noqa: E402
from trainer.integrations.huggingface import training_optimizer  # noqa: E402
from trainer.store import SqliteStore  # noqa: E402

VOCAB, SEQ = 64, 16
X = 2e-3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2,
                                     n_head=2)
    return transformers.GPT2LMHeadModel(config).to(torch.float64)


def make_trainer(tmp_path, callbacks, *, max_steps: int = 30, logging_steps: int = 1000,
                 **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"), max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="cosine", warmup_steps=5,
        weight_decay=0.0, logging_steps=logging_steps, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **kwargs)
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(240, 0),
                                eval_dataset=Tokens(32, 1), callbacks=callbacks)


class UpdateReader(transformers.TrainerCallback):
    """Reads the LR each update used from the update itself, and the scheduler's own LR."""

    def __init__(self):
        self.used, self.user = [], []

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = training_optimizer(optimizer)

        def before(o, a, k):  # registered after Panda's pre-hook: grads as the update sees them
            self.w = torch.cat([p.detach().reshape(-1).clone() for p in params])
            self.g = torch.cat([p.grad.detach().reshape(-1).clone() for p in params])

        def after(o, a, k):   # after Panda's post-hook: the scheduler's value is back
            delta = torch.cat([p.detach().reshape(-1) for p in params]) - self.w
            self.used.append(float(-(delta @ self.g) / (self.g @ self.g)))
            self.user.append(float(o.param_groups[0]["lr"]))
        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)


class LogReader(transformers.TrainerCallback):
    """The LR in the Trainer's logs, step by step, as the callbacks after this one get it."""

    def __init__(self):
        self.lrs = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "learning_rate" in logs:
            self.lrs[state.global_step] = logs["learning_rate"]


class SendSet(transformers.TrainerCallback):
    """At the start of step N, send `set lr X` through the store, as `panda set` does, and
    hold the loop until the trainer's poller has taken it (so it lands deterministically)."""

    def __init__(self, panda: PandaCallback, at: int):
        self.panda, self.at, self.command = panda, at, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            bs = self.panda.babysitter
            self.command = bs.store.submit_command("set", {"lr": X}, source="test")
            wait_until(lambda: bs.channels.commands, what="the poller")


def test_validation_metric_names():
    assert validation_metrics({"eval_loss": 2.5, "eval_accuracy": 0.5, "eval_runtime": 1.0,
                               "epoch": 1.0, "eval_samples_per_second": 3.0,
                               "eval_bad": float("nan")}) == {"loss": 2.5, "accuracy": 0.5}


def test_a_live_lr_change_holds_on_top_of_the_trainers_cosine_schedule(tmp_path):
    panda = PandaCallback(tmp_path / "hf-run")
    reader, sender = UpdateReader(), SendSet(panda, at=12)
    logged_before, logged_after = LogReader(), LogReader()
    trainer = make_trainer(tmp_path, [logged_before, panda, logged_after, sender, reader],
                           logging_steps=5)
    trainer.train()
    assert panda.final_status == "finished"
    used, user = reader.used, reader.user
    assert len(used) == 30
    # Steps 0..11 follow the Trainer's warm-up + cosine; the command is taken at the end of
    # step 12 and lands on the next update with exactly X; then X's level times the schedule.
    assert used[:13] == pytest.approx(user[:13], rel=1e-6)
    landed = 13
    assert used[landed] == pytest.approx(X, rel=1e-6)
    k = X / user[landed]
    assert [u / s for u, s in zip(used[landed:], user[landed:]) if s > 0] == pytest.approx(
        [k] * sum(s > 0 for s in user[landed:]), rel=1e-6)
    assert len(set(user[landed:])) > 5  # the Trainer's scheduler kept running
    # The Trainer's own logs (console, log_history) say the LR the update just taken used:
    # its scheduler's × k after the landing.
    assert sorted(logged_before.lrs) == [5, 10, 15, 20, 25, 30]
    for step, lr in logged_before.lrs.items():
        assert logged_after.lrs[step] == pytest.approx(used[step - 1], rel=1e-6), step
        assert logged_after.lrs[step] == pytest.approx(lr * (k if step > landed else 1.0),
                                                       rel=1e-6), step
    assert {e["step"]: e["learning_rate"] for e in trainer.state.log_history
            if "learning_rate" in e} == logged_after.lrs
    with SqliteStore(tmp_path / "hf-run") as store:
        command = store.command(sender.command)
        logged = store.metrics_since(-1, columns=("lr", "user_lr"))
        meta = store.meta()
    assert (command.status, command.applied_step) == ("applied", landed)
    assert logged["lr"] == pytest.approx(used, rel=1e-6)
    assert logged["user_lr"] == pytest.approx(user, rel=1e-12)
    assert meta["config"]["learning_rate"] == 0.05 and meta["config"]["optim"] == "sgd"
    assert meta["task"] == "GPT2LMHeadModel"


def test_evaluation_pause_resume_stop_and_rollback(tmp_path):
    panda = PandaCallback(tmp_path / "hf-ctl", checkpoint_every=5)
    trainer = make_trainer(tmp_path, [panda], max_steps=10_000, eval_strategy="steps",
                           eval_steps=10)
    errors: list[BaseException] = []

    def train():
        try:
            trainer.train()
        except BaseException as err:  # surfaced below
            errors.append(err)
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        wait_until(lambda: (tmp_path / "hf-ctl" / "run.db").exists(), what="the run store")
        store = SqliteStore(tmp_path / "hf-ctl")
        wait_until(lambda: any(r["name"] == "loss" for r in store.validation_since(0)),
                   what="an evaluation")
        pause = store.submit_command("pause")
        wait_until(lambda: store.meta().get("status") == "paused", what="the pause")
        paused_at = store.command(pause).applied_step
        assert thread.is_alive() and trainer.state.global_step == paused_at
        # Paused: the model can be read safely; roll back to the newest checkpoint.
        before = store.summary()["step"]
        back = store.submit_command("rollback", {"step": before - 1})
        wait_until(lambda: store.command(back).status != "pending", what="the rollback")
        assert store.command(back).status == "applied", store.command(back).error
        store.submit_command("resume")
        wait_until(lambda: store.meta().get("step", 0) > paused_at + 5, what="resumed steps")
        stop = store.submit_command("stop")
        thread.join(timeout=120)
        assert not thread.is_alive() and not errors, errors
        assert store.command(stop).status == "applied"
        assert trainer.state.global_step < 10_000
        kinds = [e["kind"] for e in store.events_since(0)]
        assert [k for k in kinds if k in (
            "pause", "rollback", "resume", "stop")] == ["pause", "rollback", "resume", "stop"]
        assert store.summary()["state"] == "stopped"
        store.close()
    finally:
        if thread.is_alive():
            trainer.control.should_training_stop = True
            thread.join(timeout=60)
    assert panda.final_status == "stopped"
