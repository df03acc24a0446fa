"""A character-level language model on caption text, trained with truncated backpropagation through time.

The captions of a split are joined (one per line) into one long character stream, cut into ``batch_size``
contiguous parallel streams (B, L), and walked in chunks of ``chunk_len`` characters. The hidden state is
carried from one chunk to the next, so the model sees context across chunk boundaries in the forward pass,
but it is detached at each boundary, so the gradient of a chunk's loss stops there (:func:`run_tbptt`).
The cells are the captioning decoder's (``decoder.CELLS``), stacked 1-4 deep.

Held-out perplexity is compared with a unigram model's (character frequencies of the training stream) on the
same characters; samples use a temperature, where temperature 0 is argmax.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor, nn

from captioner.config import DataConfig, to_dict
from captioner.models.decoder import CELLS, State, step_cells

log = logging.getLogger(__name__)

SEPARATOR = "\n"  # between captions in the stream; samples are primed to follow one, so they start a new caption
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Configuration (``conf/char_lm.yaml`` extends ``char_lm_schema``)
@dataclass
class CharModelConfig:
    """The character model: the decoder's cell type, stacked 1-4 deep."""

    cell: str = "lstm"  # lstm | gru | rnn
    num_layers: int = 2
    embed_dim: int = 64
    hidden_dim: int = 256
    dropout: float = 0.0  # between layers and before the output layer


@dataclass
class CharLMConfig:
    """The character-model job: data, model, truncated-BPTT training, evaluation and sampling."""

    data: DataConfig = MISSING
    model: CharModelConfig = field(default_factory=CharModelConfig)
    train_split: str = "train"
    val_split: str = "val"  # a dataset split, or "tail": the last val_fraction of the training stream
    val_fraction: float = 0.1
    max_eval_chars: Optional[int] = 200_000  # evaluate on the first N held-out characters (None: all)
    chunk_len: int = 100  # truncated-BPTT length: the gradient reaches at most this many characters back
    batch_size: int = 32  # parallel streams
    steps: int = 2000  # updates, one per chunk
    lr: float = 2e-3
    grad_clip: float = 5.0  # max global norm; 0 disables
    eval_every: int = 500
    eval_streams: int = 16  # held-out text is cut into this many parallel streams
    temperature: float = 0.8  # for the final sample; 0 is argmax
    sample_len: int = 300
    prime: str = ""  # the sample starts with this text, after a burn-in on the end of the training text
    burn_in: int = 200  # characters of training text read before the prime (see train_char_lm)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch intra-op threads on CPU
    output_dir: str = MISSING
    log_every: int = 100
    progress: bool = True


def register_char_lm_config() -> None:
    """Register ``char_lm_schema`` (and the shared group schemas) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from captioner.config import register_configs

    register_configs()
    ConfigStore.instance().store(name="char_lm_schema", node=CharLMConfig)


# --------------------------------------------------------------------------------------------------
# Text
class CharVocab:
    """Characters of the training text; id 0 stands for any character not seen in training."""

    UNK = "\ufffd"

    def __init__(self, chars: Sequence[str]):
        self.itos = [self.UNK] + [c for c in chars if c != self.UNK]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def build(cls, text: str) -> "CharVocab":
        """Every distinct character of ``text``, sorted."""
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        """Text -> ids (N,)."""
        return torch.tensor([self.stoi.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> text."""
        return "".join(self.itos[int(i)] for i in ids)


def caption_text(records: Sequence, separator: str = SEPARATOR) -> str:
    """The raw captions of some records as one stream, one caption per line (records and captions in order)."""
    return "".join(c.strip() + separator for r in records for c in r.captions)


def make_streams(ids: Tensor, num_streams: int) -> Tensor:
    """Cut a stream (N,) into ``num_streams`` contiguous rows (B, N // B); the remainder is dropped."""
    L = ids.numel() // num_streams
    if L < 2:
        raise ValueError(f"{ids.numel()} characters are too few for {num_streams} streams")
    return ids[: num_streams * L].view(num_streams, L)  # (B, L)


# --------------------------------------------------------------------------------------------------
# Models
class CharRNN(nn.Module):
    """Embedding -> the decoder's recurrent cells (stacked) -> a linear layer over characters."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden_dim: int = 256, cell: str = "lstm",
                 num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(CELLS)}")
        if not 1 <= num_layers <= 4:
            raise ValueError(f"num_layers must be 1-4, got {num_layers}")
        self.cell_type, self.num_layers, self.hidden_dim = cell, num_layers, hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.cells = nn.ModuleList(
            [CELLS[cell](embed_dim if i == 0 else hidden_dim, hidden_dim) for i in range(num_layers)]
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    @classmethod
    def from_config(cls, cfg: CharModelConfig, vocab_size: int) -> "CharRNN":
        """Build from the config dataclass."""
        return cls(vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.cell, cfg.num_layers, cfg.dropout)

    def init_state(self, batch_size: int, like: Tensor) -> State:
        """A zero state; dtype and device follow the model's weights, ``like`` is only for the device."""
        w = self.out.weight
        h = torch.zeros(self.num_layers, batch_size, self.hidden_dim, dtype=w.dtype, device=like.device)  # (N, B, H)
        return State(h, torch.zeros_like(h) if self.cell_type == "lstm" else h.new_zeros(0))

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One character per stream: ids (B,) -> logits (B, V), the new state."""
        new_state = step_cells(self.cells, self.embed(x), state, self.dropout)  # (N, B, H)
        return self.out(self.dropout(new_state.h[-1])), new_state  # (B, V)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Characters (B, T) from ``state`` (zeros if None) -> logits (B, T, V) and the state after the last one."""
        if state is None:
            state = self.init_state(x.size(0), x)
        logits = []
        for t in range(x.size(1)):
            out, state = self.step(x[:, t], state)
            logits.append(out)
        return torch.stack(logits, dim=1), state  # (B, T, V)


class UnigramModel:
    """Character frequencies of the training stream, add-one smoothed over the vocabulary (the baseline)."""

    def __init__(self, train_ids: Tensor, vocab_size: int):
        counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # (V,)
        self.log_probs = (counts / counts.sum()).log()  # (V,)

    def perplexity(self, targets: Tensor) -> float:
        """exp of the mean negative log-probability of the target characters (any shape)."""
        return math.exp(-self.log_probs[targets.reshape(-1).cpu()].mean().item())


# --------------------------------------------------------------------------------------------------
# Truncated backpropagation through time
def detach_state(state: State) -> State:
    """The same values, cut from the graph: gradients stop here."""
    return State(state.h.detach(), state.c.detach())


def tbptt_chunks(streams: Tensor, chunk_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive (inputs, targets) chunks of streams (B, L), each (B, <= chunk_len); targets are shifted by one."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be positive, got {chunk_len}")
    L = streams.size(1)
    for i in range(0, L - 1, chunk_len):
        j = min(i + chunk_len, L - 1)
        yield streams[:, i:j], streams[:, i + 1 : j + 1]  # (B, k), (B, k)


@dataclass
class Chunk:
    """One chunk of a truncated-BPTT pass."""

    loss: Tensor  # (,) mean cross-entropy over the chunk's B * k predictions, with a graph back to ``start``
    tokens: int  # B * k
    start: State  # the carried state the chunk began from (detached: no gradient crosses into the last chunk)
    end: State  # the state after the chunk's last character (still attached to this chunk's graph)


def run_tbptt(model: CharRNN, streams: Tensor, chunk_len: int, state: State | None = None) -> Iterator[Chunk]:
    """Walk streams (B, L) in chunks, carrying the state forward and cutting the graph at every boundary.

    Lazy on purpose: the next chunk's forward pass runs only when it is asked for, i.e. after the caller has
    backpropagated (and maybe stepped the optimizer on) the current one.
    """
    if state is None:
        state = model.init_state(streams.size(0), streams)
    for inputs, targets in tbptt_chunks(streams, chunk_len):
        start = detach_state(state)
        logits, state = model(inputs, start)  # (B, k, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        yield Chunk(loss, targets.numel(), start, state)


def tbptt_gradients(model: CharRNN, streams: Tensor, chunk_len: int) -> float:
    """Accumulate one pass's gradients into ``.grad``; returns the mean loss per character.

    Each chunk's mean loss is weighted by its share of the pass's predictions, so the accumulated gradient is that
    of the pass's mean loss with the gradient cut at chunk boundaries; with ``chunk_len >= L - 1`` it is exactly
    full backpropagation through time.
    """
    total = streams.size(0) * (streams.size(1) - 1)
    loss_sum = 0.0
    for chunk in run_tbptt(model, streams, chunk_len):
        (chunk.loss * (chunk.tokens / total)).backward()
        loss_sum += chunk.loss.item() * chunk.tokens
    return loss_sum / total


@torch.no_grad()
def evaluate_nll(model: CharRNN, streams: Tensor, chunk_len: int = 256) -> float:
    """Mean negative log-likelihood per predicted character of streams (B, L), state carried across chunks."""
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for chunk in run_tbptt(model, streams, chunk_len):  # chunking only bounds memory here: no gradients
        nll += chunk.loss.item() * chunk.tokens
        n += chunk.tokens
    model.train(was_training)
    return nll / n


@torch.no_grad()
def sample(model: CharRNN, vocab: CharVocab, length: int, temperature: float = 1.0, prime: str = SEPARATOR,
           generator: torch.Generator | None = None) -> str:
    """Continue ``prime`` by ``length`` characters from softmax(logits / temperature); temperature <= 0 is argmax."""
    if not prime:
        raise ValueError("sampling needs a non-empty prime (the first character to condition on)")
    was_training = model.training
    model.eval()
    device = model.out.weight.device
    ids = vocab.encode(prime).to(device)  # (P,)
    state = model.init_state(1, ids)
    if ids.numel() > 1:
        _, state = model(ids[None, :-1], state)  # the prime except its last character, which is fed below
    x = ids[-1:]  # (1,)
    out = []
    for _ in range(length):
        logits, state = model.step(x, state)  # (1, V)
        if temperature <= 0:
            x = logits.argmax(dim=-1)  # (1,) the limit of temperature -> 0
        else:
            probs = F.softmax(logits.double() / temperature, dim=-1)  # double: tiny temperatures stay finite
            x = torch.multinomial(probs.cpu(), 1, generator=generator).view(1).to(device)  # (1,)
        out.append(int(x))
    model.train(was_training)
    return vocab.decode(out)


# --------------------------------------------------------------------------------------------------
# The job
def load_text(cfg: CharLMConfig) -> tuple[str, str]:
    """Training and held-out text: the dataset's splits, or the training stream's tail when ``val_split == 'tail'``."""
    from captioner.data.build import load_records

    records = load_records(cfg.data)
    if cfg.train_split not in records:
        raise ValueError(f"unknown split {cfg.train_split!r}; expected one of {sorted(records)}")
    train = caption_text(records[cfg.train_split])
    if cfg.val_split == "tail":
        if not 0 < cfg.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
        cut = int(len(train) * (1 - cfg.val_fraction))
        train, val = train[:cut], train[cut:]
    elif cfg.val_split in records:
        val = caption_text(records[cfg.val_split])
    else:
        raise ValueError(f"unknown val_split {cfg.val_split!r}; expected a split ({sorted(records)}) or 'tail'")
    if not val:
        raise ValueError(f"the held-out text ({cfg.val_split}) is empty")
    if cfg.max_eval_chars is not None:
        val = val[: cfg.max_eval_chars]
    return train, val


def train_char_lm(cfg: CharLMConfig) -> dict:
    """Train with truncated BPTT; held-out and unigram perplexity and a sample (files go to ``output_dir``)."""
    from tqdm import tqdm

    from captioner.utils import atomic_torch_save, pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    train_text, val_text = load_text(cfg)
    vocab = CharVocab.build(train_text)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    val_streams = make_streams(val_ids, min(cfg.eval_streams, max(1, val_ids.numel() // 2))).to(device)  # (B_eval, L)
    unigram = UnigramModel(train_ids, len(vocab))
    unigram_ppl = unigram.perplexity(val_streams[:, 1:])  # the same characters the model is scored on
    log.info("%d training / %d held-out characters, %d symbols; unigram perplexity %.3f",
             train_ids.numel(), val_ids.numel(), len(vocab), unigram_ppl)

    model = CharRNN.from_config(cfg.model, len(vocab)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    metrics_file = out_dir / "metrics.jsonl"
    metrics_file.write_text("")
    history: list[dict] = []

    def evaluate(step: int, train_loss: float) -> dict:
        nll = evaluate_nll(model, val_streams)
        row = {"step": step, "train_loss": train_loss, "val_nll": nll, "val_perplexity": math.exp(nll),
               "val_bits_per_char": nll / math.log(2), "unigram_perplexity": unigram_ppl}
        history.append(row)
        with metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("step %d: train loss %.3f, val perplexity %.3f (unigram %.3f)",
                 step, train_loss, row["val_perplexity"], unigram_ppl)
        return row

    step, running, t0 = 0, float("nan"), time.time()
    bar = tqdm(total=cfg.steps, desc="char_lm", disable=not cfg.progress, mininterval=2.0)
    model.train()
    while step < cfg.steps:
        # Each pass starts from a zero state at a random offset, so chunk boundaries fall elsewhere every time.
        offset = random.randrange(min(cfg.chunk_len, max(1, train_ids.numel() // (2 * cfg.batch_size))))
        streams = make_streams(train_ids[offset:], cfg.batch_size).to(device)  # (B, L)
        for chunk in run_tbptt(model, streams, cfg.chunk_len):
            opt.zero_grad(set_to_none=True)
            chunk.loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            loss = chunk.loss.item()
            running = loss if math.isnan(running) else 0.95 * running + 0.05 * loss
            bar.update(1)
            if cfg.log_every and step % cfg.log_every == 0:
                log.info("step %d: train loss %.3f (%.1f s)", step, running, time.time() - t0)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluate(step, running)
            if step >= cfg.steps:
                break
    bar.close()
    final = evaluate(step, running)

    # A zero state is rare in training (each stream starts from one once per pass), so samples from it begin with
    # garbage; reading the end of the training text first (which ends with a separator) gives a typical state.
    g = torch.Generator().manual_seed(cfg.seed)
    burn_in = train_text[-cfg.burn_in :] if cfg.burn_in > 0 else SEPARATOR
    text = cfg.prime + sample(model, vocab, cfg.sample_len, cfg.temperature, burn_in + cfg.prime, generator=g)
    atomic_torch_save(
        {"format_version": FORMAT_VERSION, "model_config": to_dict(cfg.model), "chars": vocab.itos[1:],
         "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "metrics": final},
        out_dir / "char_lm.pt",
    )
    return {
        "val_perplexity": final["val_perplexity"], "unigram_perplexity": unigram_ppl,
        "val_bits_per_char": final["val_bits_per_char"], "train_loss": running, "steps": step,
        "train_chars": train_ids.numel(), "val_chars": val_ids.numel(), "vocab_size": len(vocab),
        "temperature": cfg.temperature, "sample": text, "seconds": round(time.time() - t0, 1),
    }


def load_char_lm(path: str | Path) -> tuple[CharRNN, CharVocab]:
    """A trained character model and its vocabulary from ``char_lm.pt``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    vocab = CharVocab(ckpt["chars"])
    model = CharRNN.from_config(CharModelConfig(**ckpt["model_config"]), len(vocab))
    model.load_state_dict(ckpt["model"])
    return model, vocab
