"""Character-level language model: truncated BPTT against full BPTT, state carry, sampling, a short real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner.analysis.char_lm import (
    CharRNN,
    CharVocab,
    UnigramModel,
    load_char_lm,
    make_streams,
    run_tbptt,
    sample,
    tbptt_chunks,
    tbptt_gradients,
    train_char_lm,
)

REPO = Path(__file__).resolve().parent.parent


def compose_char_lm(overrides: list[str]):
    """Compose conf/char_lm.yaml with overrides, as scripts/char_lm.py does, and convert to dataclasses."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from captioner.analysis.char_lm import register_char_lm_config
    from captioner.cli import config_dir

    register_char_lm_config()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("char_lm", overrides=overrides)
    return OmegaConf.to_object(cfg)


def tiny_model(cell: str = "lstm", num_layers: int = 2, vocab_size: int = 7) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(vocab_size, embed_dim=5, hidden_dim=8, cell=cell, num_layers=num_layers).double()


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_vocab_streams_and_chunks():
    vocab = CharVocab.build("a cab\n")
    assert vocab.decode(vocab.encode("cab\n")) == "cab\n"
    assert vocab.encode("z").tolist() == [0]  # unseen characters share id 0
    streams = make_streams(torch.arange(23), 4)  # (4, 5), three characters dropped
    assert streams.shape == (4, 5) and streams[1].tolist() == [5, 6, 7, 8, 9]
    chunks = list(tbptt_chunks(streams, 3))
    assert [x.shape[1] for x, _ in chunks] == [3, 1]  # 4 predictions per stream: 3 + 1
    assert torch.equal(torch.cat([y for _, y in chunks], 1), streams[:, 1:])  # every target exactly once
    assert UnigramModel(torch.arange(5), 5).perplexity(torch.arange(5)) == pytest.approx(5.0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_tbptt_with_whole_stream_chunk_is_full_bptt(cell):
    model = tiny_model(cell)
    streams = torch.randint(7, (3, 25), generator=torch.Generator().manual_seed(1))  # (B, L)
    logits, _ = model(streams[:, :-1])  # (B, L-1, V) full backpropagation through time, from a zero state
    F.cross_entropy(logits.reshape(-1, 7), streams[:, 1:].reshape(-1)).backward()
    full = grads(model)
    for chunk_len in (24, 1000):
        model.zero_grad()
        tbptt_gradients(model, streams, chunk_len)
        for a, b in zip(grads(model), full):  # equal up to float32 summation order, relative to the gradient's size
            assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    model.zero_grad()
    tbptt_gradients(model, streams, 5)  # a shorter chunk truncates: different gradients
    assert any(float((a - b).abs().max()) > 1e-2 * float(b.abs().max()) for a, b in zip(grads(model), full))


def test_short_chunks_carry_the_state_but_not_the_gradient():
    model = tiny_model("lstm")
    streams = torch.randint(7, (2, 31), generator=torch.Generator().manual_seed(2))
    chunks = list(run_tbptt(model, streams, 10))
    assert len(chunks) == 3
    for prev, cur in zip(chunks, chunks[1:]):
        assert torch.equal(cur.start.h, prev.end.h) and torch.equal(cur.start.c, prev.end.c)  # carried ...
        assert not cur.start.h.requires_grad and not cur.start.c.requires_grad  # ... but detached
        # No path from this chunk's loss back into the previous chunk's state.
        assert torch.autograd.grad(cur.loss, [prev.end.h, prev.end.c], allow_unused=True) == (None, None)
    # The carried state changes what chunk 2 predicts: its loss is the full-sequence loss over its positions.
    with torch.no_grad():
        logits, _ = model(streams[:, :-1])  # (B, 30, V)
        full = F.cross_entropy(logits[:, 10:20].reshape(-1, 7), streams[:, 11:21].reshape(-1))
        fresh = F.cross_entropy(model(streams[:, 10:20])[0].reshape(-1, 7), streams[:, 11:21].reshape(-1))
    torch.testing.assert_close(chunks[1].loss.detach(), full, rtol=0, atol=1e-12)
    assert not torch.allclose(fresh, full)


def test_temperature_zero_sampling_is_argmax():
    vocab = CharVocab.build("abcdef\n")
    model = tiny_model("gru", 1, len(vocab))
    with torch.no_grad():  # a greedy loop written out by hand
        state = model.init_state(1, torch.zeros(1))
        x, greedy = vocab.encode("\n"), []
        for _ in range(40):
            logits, state = model.step(x, state)
            x = logits.argmax(-1)
            greedy.append(int(x))
    expected = vocab.decode(greedy)
    assert sample(model, vocab, 40, temperature=0.0) == expected
    assert sample(model, vocab, 40, temperature=1e-6, generator=torch.Generator().manual_seed(0)) == expected
    a = sample(model, vocab, 40, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, vocab, 40, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert len(a) == 40 and a != b


TINY = ["model.num_layers=1", "model.embed_dim=16", "model.hidden_dim=64", "chunk_len=32", "batch_size=16",
        "eval_every=0", "log_every=0", "sample_len=50", "progress=false", "device=cpu"]


def test_char_model_beats_unigram_on_held_out_captions(tiny_shapes, tmp_path):
    cfg = compose_char_lm(
        [f"data.root={tiny_shapes}", "data.generate=false", f"output_dir={tmp_path}", "steps=80", *TINY]
    )
    res = train_char_lm(cfg)
    # Measured on the 48-image world: unigram 18.0, the model ~9 after 80 updates (~3 after 150).
    assert res["val_perplexity"] < 0.8 * res["unigram_perplexity"]
    assert len(res["sample"]) == 50
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 80 and rows[-1]["val_perplexity"] == res["val_perplexity"]
    model, vocab = load_char_lm(tmp_path / "char_lm.pt")
    assert len(vocab) == res["vocab_size"] and model.num_layers == 1


def test_config_validates_and_tail_split(tiny_shapes, tmp_path):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose_char_lm(["chunk_len=many"])
    cfg = compose_char_lm([f"data.root={tiny_shapes}", "data.generate=false", f"output_dir={tmp_path}", "steps=2",
                           "val_split=tail", "model.cell=rnn", "model.num_layers=3", *TINY])
    res = train_char_lm(cfg)
    assert res["steps"] == 2 and res["val_chars"] > 0


@pytest.mark.slow
def test_script_prints_one_json_line(tiny_shapes, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "char_lm.py"), f"data.root={tiny_shapes}", "data.generate=false",
           f"hydra.run.dir={tmp_path}", "steps=3", "threads=1", *TINY]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"val_perplexity", "unigram_perplexity", "sample"} <= set(res)
