"""``charlm``: a small character-level causal transformer on the Python standard library's source.

A task worth babysitting: unlike the MLP tasks it trains for minutes with a validation loss
that keeps falling, diverges when the LR is too high, crawls when it is too low, and gains
from warm-up and decay, so a live LR change, a range test or a decay change visibly matters.

* Corpus: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by name,
  read until :data:`CORPUS_BYTES`: present on every Python installation, no download, the same
  bytes for the same Python version (its SHA-256 is in ``task.info["corpus_sha256"]``; a
  distribution that patches a stdlib file changes it). Every :data:`VAL_EVERY`-th file is held
  out, so no file is in both splits.
* Vocabulary: fixed, not learned from the data (so it never depends on the corpus): newline,
  tab and printable ASCII, plus one id for any other character.
* Model: a GPT (Radford et al. 2019) in nanoGPT's form (Karpathy 2022, ``model.py``): learned
  token and position embeddings, pre-LayerNorm blocks of causal self-attention and a 4× GELU
  MLP (Vaswani et al. 2017, "Attention Is All You Need"), a final LayerNorm and an output layer
  tied to the token embedding (Press & Wolf 2017).
* Data: non-overlapping windows of :data:`CONTEXT` characters; ``train_x``/``train_y`` are
  strided views of one token stream (no copy), so the runner's ``iter_batches`` shuffles them
  like any other task's rows.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trainer.task import Task

# Corpus and split
CORPUS_BYTES = 2_000_000   # ~2 MB of source: twice tiny-shakespeare (Karpathy's char-rnn data)
MIN_CORPUS_BYTES = 100_000  # fewer stdlib source bytes than this: refuse (no .py files shipped)
VAL_EVERY = 10             # every 10th file is validation: a ~10 % held-out split
VAL_WINDOWS = 256          # fixed validation subset: 256 windows spread evenly over the split
EVAL_BATCH = 64            # windows per forward pass while evaluating (bounds peak memory)
MEASURE_WINDOWS = 256      # range tests' fixed measurement set (see Task.measure_samples)
# One intra-op thread: matrices of 64 columns gain little from more (20 vs 29 ms a step with 2
# threads on an idle 2-core machine), while on busy cores (the dashboard, a range test beside the
# run, other programs) OpenMP's waiting threads made a step 7× slower (README, "charlm").
THREADS = 1

# Model: nanoGPT's shakespeare_char config (6 layers × 384, context 256, 10.7M parameters)
# scaled down ~100× to 0.11M parameters, so a step takes tens of milliseconds on one CPU core
CONTEXT = 64               # characters a prediction sees (block_size)
N_LAYER = 2
N_HEAD = 4
D_MODEL = 64               # head size 16
INIT_STD = 0.02            # GPT-2's initialization (Radford et al. 2019; nanoGPT _init_weights)

# Sampling at validation time (cheap: a few hundred characters, no gradient)
SAMPLE_PROMPTS = ("def ", "class ")
SAMPLE_CHARS = 200
SAMPLE_TEMPERATURE = 0.8   # below 1: fewer typos than the raw distribution, still varied

# Vocabulary: index 0 is "anything else"; shown as U+FFFD in decoded text.
CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = "\ufffd"
VOCAB_SIZE = len(CHARS) + 1
_LOOKUP = np.zeros(128, dtype=np.int64)       # ASCII code point -> id; others map to 0
_LOOKUP[[ord(c) for c in CHARS]] = np.arange(1, VOCAB_SIZE)


def encode(text: str) -> torch.Tensor:
    """Characters to ids (int64), unknown characters (non-ASCII, control) to 0."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.zeros(codes.shape, dtype=np.int64)
    ascii_ = codes < 128
    ids[ascii_] = _LOOKUP[codes[ascii_]]
    return torch.from_numpy(ids)


def decode(ids: torch.Tensor | list[int]) -> str:
    table = UNKNOWN + CHARS
    return "".join(table[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))


# --- corpus ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corpus:
    train: str
    val: str
    train_files: tuple[str, ...]  # names, in reading order
    val_files: tuple[str, ...]
    sha256: str                   # of the bytes read, in order: compare across machines


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(root: Path | None = None, max_bytes: int | None = None) -> Corpus:
    """The first ``max_bytes`` (default :data:`CORPUS_BYTES`) of the stdlib's top-level ``*.py``
    files, sorted by name (the last file cut at the limit); every :data:`VAL_EVERY`-th file (by
    position) is held out. ValueError when the sources are missing."""
    root = stdlib_dir() if root is None else Path(root)
    max_bytes = CORPUS_BYTES if max_bytes is None else max_bytes
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    digest = hashlib.sha256()
    splits: dict[bool, tuple[list[str], list[str]]] = {False: ([], []), True: ([], [])}
    total = 0
    for i, path in enumerate(files):
        if total >= max_bytes:
            break
        raw = path.read_bytes()[:max_bytes - total]
        digest.update(raw)
        total += len(raw)
        texts, names = splits[i % VAL_EVERY == VAL_EVERY - 1]
        names.append(path.name)
        # A cut through a multi-byte character (or any invalid byte) becomes U+FFFD.
        texts.append(raw.decode("utf-8", errors="replace"))
    if total < min(MIN_CORPUS_BYTES, max_bytes) or not splits[True][0]:
        raise ValueError(f"the charlm task needs the Python standard library's source files "
                         f"(at least {MIN_CORPUS_BYTES:,} bytes in {VAL_EVERY} or more *.py "
                         f"files), but {root} has {total:,} bytes in {len(files)}")
    (train, train_names), (val, val_names) = splits[False], splits[True]
    # Files are joined by one newline, as if concatenated with `cat`.
    return Corpus("\n".join(train), "\n".join(val), tuple(train_names), tuple(val_names),
                  digest.hexdigest())


def windows(stream: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, next-character target) windows as strided views of ``stream``."""
    usable = (stream.numel() - 1) // context * context
    x = stream[:usable].view(-1, context)
    y = stream[1:usable + 1].view(-1, context)
    return x, y


# --- model ----------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention (Vaswani et al. 2017, §3.2; nanoGPT's module)."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2, Radford et al. 2019, §2.3)."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Characters in, next-character logits ``(batch, time, vocab)`` out."""

    def __init__(self, generator: torch.Generator, *, vocab: int = VOCAB_SIZE,
                 context: int = CONTEXT, n_layer: int = N_LAYER, n_head: int = N_HEAD,
                 d_model: int = D_MODEL):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_head) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying (Press & Wolf 2017)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() < 2:
                    if name.endswith("bias"):
                        p.zero_()
                    continue
                # Residual-stream outputs scaled by 1/√(2·layers) (GPT-2 §2.3, nanoGPT).
                residual = name.endswith(("proj.weight", "mlp.2.weight"))
                std = INIT_STD / math.sqrt(2 * n_layer) if residual else INIT_STD
                p.normal_(0.0, std, generator=generator)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"input of {t} characters is longer than the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy in nats over every position of every window."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def optim_groups(model: nn.Module) -> list[dict]:
    """nanoGPT's split (``configure_optimizers``): weight decay on every matrix and embedding,
    none on biases and LayerNorm gains.

    The no-decay group carries ``weight_decay=0`` explicitly; Panda's weight-decay knob keeps
    the ratio between groups, so it stays 0 there whatever the knob is set to.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- sampling -------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model: CharGPT, prompt: str, n_chars: int = SAMPLE_CHARS,
           temperature: float = SAMPLE_TEMPERATURE, seed: int = 0) -> str:
    """``prompt`` followed by ``n_chars`` generated characters (Karpathy's char-rnn sampling:
    softmax(logits / temperature), one character at a time, the last ``context`` as input).

    Deterministic for a given model, prompt and ``seed`` (its own generator: the training RNG
    is untouched); temperature 0 picks the most likely character.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature:g}")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        ids = encode(prompt).tolist() or [_LOOKUP[ord("\n")].item()]
        out = list(ids)
        for _ in range(n_chars):
            logits = model(torch.tensor([out[-model.context:]]))[0, -1]
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits.double() / temperature, dim=0)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            out.append(nxt)
        return decode(out)
    finally:
        model.train(was_training)


# --- the task -------------------------------------------------------------------------------------

class CharLMTask(Task):
    """The built-in task's data and model, with a cheaper evaluation and text samples."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """On the fixed validation windows: ``loss`` (nats per character), ``bpc`` (bits per
        character, the usual unit for character models: loss / ln 2; Graves 2013) and
        ``accuracy`` (the most likely next character is the right one)."""
        was_training = self.model.training
        self.model.eval()
        try:
            total = correct = 0.0
            for first in range(0, self.val_x.shape[0], EVAL_BATCH):
                x = self.val_x[first:first + EVAL_BATCH]
                y = self.val_y[first:first + EVAL_BATCH]
                logits = self.model(x)
                total += float(lm_loss(logits, y)) * y.numel()
                correct += float((logits.argmax(-1) == y).sum())
            loss = total / self.val_y.numel()
            return {"loss": loss, "bpc": loss / math.log(2),
                    "accuracy": correct / self.val_y.numel()}
        finally:
            self.model.train(was_training)

    def optim_params(self) -> Any:
        return optim_groups(self.model)

    def samples(self, seed: int) -> list[dict[str, Any]]:
        """One short completion per :data:`SAMPLE_PROMPTS` entry, seeded by ``seed``."""
        return [{"prompt": prompt, "text": sample(self.model, prompt, seed=seed + i)}
                for i, prompt in enumerate(SAMPLE_PROMPTS)]


def build_task(generator: torch.Generator, corpus: Corpus | None = None, *,
               context: int = CONTEXT, n_layer: int = N_LAYER, n_head: int = N_HEAD,
               d_model: int = D_MODEL) -> CharLMTask:
    """The ``charlm`` task: model initialized from ``generator``, data from the stdlib. The
    sizes are for experiments (benchmarks/charlm.py); `panda train` uses the defaults."""
    corpus = corpus or load_corpus()
    train_x, train_y = windows(encode(corpus.train), context)
    val_x, val_y = windows(encode(corpus.val), context)
    if val_x.shape[0] > VAL_WINDOWS:  # evenly spread over the held-out files, always the same
        keep = torch.linspace(0, val_x.shape[0] - 1, VAL_WINDOWS).long()
        val_x, val_y = val_x[keep], val_y[keep]
    model = CharGPT(generator, context=context, n_layer=n_layer, n_head=n_head, d_model=d_model)
    params = sum(p.numel() for p in model.parameters())
    description = (f"char transformer {n_layer}x{d_model}, context {context} ({params / 1e3:.0f}k "
                   f"params) on {len(corpus.train_files) + len(corpus.val_files)} stdlib files")
    return CharLMTask("charlm", model, lm_loss, train_x, train_y, val_x, val_y,
                      measure_samples=MEASURE_WINDOWS, threads=THREADS,
                      info={"description": description, "corpus_sha256": corpus.sha256,
                            "val_files": list(corpus.val_files), "vocab_size": VOCAB_SIZE,
                            "train_chars": int(train_x.numel()),
                            "val_chars": int(val_x.numel())})
