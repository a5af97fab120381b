"""The ``charlm`` task: corpus, split, model, sampling, per-task defaults, and a tiny end-to-end
``panda train --task charlm`` through the Babysitter (with a corpus cut to ~120 kB so one epoch
is a few dozen steps)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import APP, open_panels
from streamlit.testing.v1 import AppTest

from app.panels import NEW_RUN_PANEL, SAMPLES_PANEL
from trainer import charlm
from trainer.cli import main as cli_main
from trainer.config import TASK_DEFAULTS, TrainConfig, config_values
from trainer.launch import DEMO_CONFIG
from trainer.lr_range import job as lr_job
from trainer.runner import build
from trainer.store import SqliteStore
from trainer.tasks import make_task

torch.set_num_threads(1)

APP_TIMEOUT_S = 60     # a safety net for a slow CI machine, not a performance assertion
TINY_CORPUS = 120_000  # bytes: ~1,800 training windows, 56 steps of 32 per epoch


@pytest.fixture(scope="module")
def task():
    return make_task("charlm", seed=0)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


# --- corpus and split -------------------------------------------------------------------------

def test_corpus_is_deterministic(task):
    again = make_task("charlm", seed=0)
    assert _digest(again.train_x) == _digest(task.train_x)
    assert _digest(again.val_x) == _digest(task.val_x)
    assert charlm.load_corpus().sha256 == task.info["corpus_sha256"]


def test_split_is_by_file_and_disjoint(tmp_path):
    for i in range(25):  # each file says its own name many times: which split holds it shows
        (tmp_path / f"m{i:02d}.py").write_text(f"# file m{i:02d}\n" * 700)
    corpus = charlm.load_corpus(tmp_path)
    assert corpus.val_files == ("m09.py", "m19.py")
    assert not set(corpus.train_files) & set(corpus.val_files)
    for i in range(25):
        marker = f"file m{i:02d}\n"
        assert (marker in corpus.val) == (f"m{i:02d}.py" in corpus.val_files)
        assert (marker in corpus.train) != (marker in corpus.val)


def test_real_corpus_split_and_cap(task):
    corpus = charlm.load_corpus()
    assert not set(corpus.train_files) & set(corpus.val_files) and corpus.val_files
    assert len(corpus.train) + len(corpus.val) <= charlm.CORPUS_BYTES + len(corpus.train_files)
    assert 0.05 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.3


def test_missing_stdlib_sources_is_a_clear_error(tmp_path):
    (tmp_path / "only.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="needs the Python standard library's source files"):
        charlm.load_corpus(tmp_path)


# --- shapes, vocabulary, model ----------------------------------------------------------------

def test_windows_shapes_and_vocabulary(task):
    assert task.train_x.shape[1] == charlm.CONTEXT and task.train_x.dtype == torch.long
    assert task.val_x.shape == (charlm.VAL_WINDOWS, charlm.CONTEXT)
    assert int(task.train_x.max()) < charlm.VOCAB_SIZE and int(task.train_x.min()) >= 0
    # Targets are the inputs shifted by one character.
    assert torch.equal(task.train_y[:, :-1], task.train_x[:, 1:])
    assert torch.equal(task.train_y[:-1, -1], task.train_x[1:, 0])
    logits = task.model(task.train_x[:3])
    assert logits.shape == (3, charlm.CONTEXT, charlm.VOCAB_SIZE)
    assert task.loss_fn(logits, task.train_y[:3]).shape == ()


def test_encode_decode():
    text = "def f(x):\n\treturn x ~ 1\n"
    assert charlm.decode(charlm.encode(text)) == text
    assert charlm.decode(charlm.encode("é\r")) == charlm.UNKNOWN * 2


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(task):
    cfg = TrainConfig(**config_values("charlm"))
    torch.set_num_threads(2)
    task, optimizer = build(cfg)
    assert torch.get_num_threads() == charlm.THREADS  # the task's own thread count
    x, y = task.train_x[:16], task.train_y[:16]
    losses = []
    for _ in range(8):
        loss = task.loss_fn(task.model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    assert decays == [cfg.weight_decay, 0.0]  # no decay on biases and LayerNorm gains


def test_evaluate_reports_loss_bpc_accuracy(task):
    metrics = task.evaluate()
    assert set(metrics) == {"loss", "bpc", "accuracy"}
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / torch.log(torch.tensor(2.0)).item())
    assert abs(metrics["loss"] - torch.log(torch.tensor(float(charlm.VOCAB_SIZE))).item()) < 0.5
    assert task.model.training  # evaluation puts the model back into training mode


def test_range_test_measures_a_small_fixed_set(task):
    opts = lr_job.check_options()
    (x, y), = lr_job._measurement_set(task, opts, seed=0)
    assert x.shape == (charlm.MEASURE_WINDOWS, charlm.CONTEXT) and y.shape == x.shape


# --- sampling ----------------------------------------------------------------------------------

def test_sampling_is_deterministic_with_a_seed(task):
    rng = torch.get_rng_state()
    one = charlm.sample(task.model, "def ", n_chars=40, temperature=0.8, seed=3)
    assert one == charlm.sample(task.model, "def ", n_chars=40, temperature=0.8, seed=3)
    assert one != charlm.sample(task.model, "def ", n_chars=40, temperature=0.8, seed=4)
    assert one.startswith("def ") and len(one) == 44
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG is left alone
    greedy = charlm.sample(task.model, "x" * 100, n_chars=5, temperature=0)  # > context
    assert greedy == charlm.sample(task.model, "x" * 100, n_chars=5, temperature=0, seed=9)
    assert [s["prompt"] for s in task.samples(seed=0)] == list(charlm.SAMPLE_PROMPTS)


# --- defaults ------------------------------------------------------------------------------------

def test_other_tasks_keep_trainconfig_defaults():
    for name in ("digits", "spirals", "quadratic"):
        assert TrainConfig(**config_values(name)) == TrainConfig(task=name)


def test_charlm_defaults_and_given_values():
    cfg = TrainConfig(**config_values("charlm", lr=None, epochs=7)).validate()
    assert (cfg.optimizer, cfg.lr, cfg.epochs) == ("adamw", TASK_DEFAULTS["charlm"]["lr"], 7)
    assert cfg.schedule["shape"] == "cosine" and cfg.schedule["total_epochs"] == 7
    assert cfg.schedule["warmup_epochs"] > 0
    given = {"shape": "constant"}
    assert config_values("charlm", schedule=given)["schedule"] is given
    assert DEMO_CONFIG.task == "charlm" and DEMO_CONFIG.validate().step_delay == 0


def test_cli_digits_config_is_unchanged(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("trainer.runner.train", lambda cfg, *a, **k: seen.append(cfg) or "done")
    assert cli_main(["train", "--task", "digits", "--run-dir", str(tmp_path / "d")]) == 0
    assert cli_main(["train", "--task", "charlm", "--lr", "1e-3", "--run-dir",
                     str(tmp_path / "c")]) == 0
    assert seen[0] == TrainConfig(task="digits")
    assert seen[1] == TrainConfig(**config_values("charlm", lr=1e-3))


# --- end to end ----------------------------------------------------------------------------------

def test_panda_train_charlm_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setattr(charlm, "CORPUS_BYTES", TINY_CORPUS)
    run_dir = tmp_path / "runs" / "lm"
    assert cli_main(["train", "--task", "charlm", "--run-dir", str(run_dir), "--epochs", "1",
                     "--checkpoint-every", "1000"]) == 0
    with SqliteStore(run_dir) as store:
        summary, meta = store.summary(), store.meta()
        val = store.validation_since(0)
        samples = store.results("sample")
    assert summary["state"] == "finished" and summary["step"] > 10
    # The run's warm-up + cosine is the loop's own schedule (Panda's decay knob stays free).
    assert meta["config"]["optimizer"] == "adamw"
    assert meta["config"]["schedule"]["shape"] == "cosine" and meta["lr_composition"][
        "user_schedule"]
    assert {v["name"] for v in val} == {"loss", "bpc", "accuracy"}
    loss = next(v["value"] for v in val if v["name"] == "loss")
    assert loss < 3.5  # from ~4.6 (uniform over the vocabulary) in one short epoch
    assert [s["payload"]["prompt"] for s in samples] == list(charlm.SAMPLE_PROMPTS)
    assert all(s["payload"]["step"] == summary["step"] for s in samples)


# --- dashboard ---------------------------------------------------------------------------------

def test_dashboard_shows_the_newest_sample_and_task_defaults(make_run, tmp_path, monkeypatch):
    run_dir = make_run("lm")
    with SqliteStore(run_dir) as store:
        store.add_result("sample", {"step": 5, "prompt": "def ", "text": "def old"})
        store.add_result("sample", {"step": 9, "prompt": "def ", "text": "def newest"})
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("PANDA_TOKEN", raising=False)
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    assert not at.exception, at.exception
    assert any(e.label == "Generated text at step 9" for e in at.expander)
    open_panels(at, SAMPLES_PANEL, NEW_RUN_PANEL)
    assert [c.value for c in at.code] == ["def newest"]
    at.selectbox(key="new_task").select("charlm").run()
    defaults = TrainConfig(**config_values("charlm"))
    assert at.selectbox(key="new_optimizer").value == defaults.optimizer
    assert at.select_slider(key="new_lr").value == defaults.lr
    assert at.select_slider(key="new_wd").value == defaults.weight_decay
    assert not at.warning and not at.exception
