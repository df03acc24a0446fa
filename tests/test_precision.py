"""bf16 mixed precision (``precision=bf16``): what stays float32, how close it is, and that training works under it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from captioner.config import ConfigError
from captioner.models.decoder import AttentionDecoder, lstm_cell_float_state
from captioner.training.losses import caption_loss
from captioner.utils import autocast


def _decoder(**kw) -> AttentionDecoder:
    torch.manual_seed(0)
    args = dict(vocab_size=50, feature_dim=24, embed_dim=16, hidden_dim=32, attn_dim=16, dropout=0.0)
    args.update(kw)
    return AttentionDecoder(**args)


def _batch(B=4, L=9, D=24, T=8, V=50):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, L, D, generator=g)
    caps = torch.randint(4, V, (B, T), generator=g)
    caps[:, 0], caps[:, -1] = 1, 2
    return feats, caps


def test_lstm_cell_with_float_state_is_the_same_function_as_lstmcell():
    """The autocast path's hand-written cell equals nn.LSTMCell (float64, no autocast): same parameters, same gates."""
    torch.manual_seed(0)
    cell = nn.LSTMCell(7, 5).double()
    x, h, c = torch.randn(3, 7).double(), torch.randn(3, 5).double(), torch.randn(3, 5).double()
    h_ref, c_ref = cell(x, (h, c))
    h_new, c_new = lstm_cell_float_state(cell, x, h, c)
    torch.testing.assert_close(h_new, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_new, c_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("attention", ["soft", "hard", "none"])
def test_bf16_keeps_state_and_probabilities_in_float32(cell, attention):
    """Under bf16 autocast the matrix products are bf16, but the state, alpha and log-probs a caller sees are float32."""
    dec = _decoder(cell=cell, attention=attention, num_layers=2)
    feats, caps = _batch()
    with autocast("bf16", torch.device("cpu")):
        memory = dec.init_memory(feats)
        state = dec.init_state(memory)
        for t in range(3):
            out = dec.step(caps[:, t], state, memory, attend="expected")
            state = out.state
            assert out.log_probs.dtype == torch.float32 and out.alpha.dtype == torch.float32
            assert state.h.dtype == torch.float32 and (state.c.numel() == 0 or state.c.dtype == torch.float32)
            torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(4), rtol=0, atol=1e-5)
            torch.testing.assert_close(out.alpha.sum(-1), torch.ones(4), rtol=0, atol=1e-5)
        assert dec(feats, caps).log_probs.dtype == torch.float32


def test_bf16_loss_and_gradients_match_float32_within_bf16_rounding():
    """The teacher-forced loss under bf16 is within 1% of float32's; every parameter gets a gradient pointing the same way."""
    dec = _decoder(context_dim=12)
    feats, caps = _batch()

    def loss_and_grads(precision: str) -> tuple[float, dict[str, torch.Tensor]]:
        dec.zero_grad()
        with autocast(precision, torch.device("cpu")):
            loss = caption_loss(dec(feats, caps), caps, lambda_ds=1.0)["loss"]
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in dec.named_parameters()}

    ref_loss, ref = loss_and_grads("fp32")
    loss, grads = loss_and_grads("bf16")
    assert abs(loss - ref_loss) <= 0.01 * abs(ref_loss)
    for n, g in grads.items():
        assert g.dtype == torch.float32, n
        if ref[n].norm() > 0:  # unused embedding rows stay zero in both
            cos = torch.nn.functional.cosine_similarity(g.flatten(), ref[n].flatten(), dim=0)
            assert cos > 0.98, (n, float(cos))


def test_precision_is_checked_when_the_config_is_made(tiny_cfg):
    with pytest.raises(ConfigError, match="precision"):
        tiny_cfg("precision=bf61")
    with pytest.raises(ValueError, match="precision"):
        autocast("half", torch.device("cpu"))


def test_training_in_bf16_follows_float32_and_writes_float32_checkpoints(tiny_cfg, tmp_path):
    """The same shapes-world run in bf16 and float32: per-epoch losses within 2% of each other, float32 weights saved."""
    import json

    from captioner.models.checkpoint import load_checkpoint
    from captioner.training.loop import train

    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_cfg("epochs=3", f"precision={precision}", "test=false", "data.limit_val=8",
                       f"output_dir={tmp_path / precision}")
        train(cfg)
        lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
        losses[precision] = [json.loads(x)["train"]["loss"] for x in lines]
    assert len(losses["bf16"]) == 3
    assert losses["bf16"] != losses["fp32"]  # the option took effect (bf16 rounding moves the losses a little)
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) <= 0.02 * abs(a), losses
    ckpt = load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


def test_native_precision_is_bf16_exactly_where_the_cpu_multiplies_bf16(monkeypatch, tiny_cfg):
    """``precision=native`` (the Flickr8k SCST recipe's): bf16 on a CPU with bf16 instructions, float32 on one without."""
    import captioner.utils as utils

    cpu = torch.device("cpu")
    for has_bf16 in (True, False):
        monkeypatch.setattr(utils, "cpu_has_bf16", lambda: has_bf16)
        assert utils.uses_bf16("native", cpu) is has_bf16
        with utils.autocast("native", cpu):
            x = torch.randn(3, 4) @ torch.randn(4, 2)
        assert x.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
        assert utils.uses_bf16("bf16", cpu) and not utils.uses_bf16("fp32", cpu) and not utils.uses_bf16("auto", cpu)
    assert tiny_cfg("precision=native").precision == "native"
    with pytest.raises(ValueError, match="precision"):
        utils.uses_bf16("half", cpu)
