"""Checkpoints written before the job-layer change still load; other format versions are refused by name."""

from __future__ import annotations

import pytest
import torch

from captioner.config import EncoderConfig, ModelConfig
from captioner.data.vocab import Vocabulary
from captioner.models.captioner import build_model
from captioner.models.checkpoint import CheckpointError, load_captioner, save_checkpoint

WORDS = ["a", "red", "circle"]
# The decoder options a format-1 checkpoint stored before the loss options left ModelConfig (they never went in).
OLD_DECODER = ("embed_dim", "hidden_dim", "attn_dim", "cell", "num_layers", "dropout", "attention", "beta_gate",
               "deep_output", "image_input", "context_dim")
NEW_DECODER = ("feature_dropout", "embed_dropout", "tie_embeddings", "query", "positions")  # added later, defaulting to off: old checkpoints lack them


def _model():
    torch.manual_seed(0)
    return build_model(EncoderConfig(channels=8), ModelConfig(embed_dim=8, hidden_dim=8, attn_dim=8), 4 + len(WORDS), 32)


def test_model_config_holds_exactly_the_decoder_options_older_checkpoints_hold(tmp_path):
    model = _model()
    assert set(model.spec.decoder) == set(OLD_DECODER + NEW_DECODER)
    save_checkpoint(tmp_path / "m.pt", model, Vocabulary.build([WORDS], min_count=1))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    for k in NEW_DECODER:
        del ckpt["model_config"]["decoder"][k]  # as written before the option existed
    ckpt["config"] = {"model": {"lambda_r": 1.0, "soft_mix": 0.5}, "optim": {"label_smoothing": 0.1}}  # the old run config
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, vocab = load_captioner(tmp_path / "old.pt")
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert vocab.words[4:] == sorted(WORDS) or set(vocab.words[4:]) == set(WORDS)


def test_other_format_version_is_refused_naming_it(tmp_path):
    save_checkpoint(tmp_path / "m.pt", _model(), Vocabulary.build([WORDS], min_count=1))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["format_version"] = 2
    torch.save(ckpt, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match=r"v2.pt: checkpoint format 2 is not supported \(this version reads 1\)"):
        load_captioner(tmp_path / "v2.pt")


def test_tied_embeddings_stay_tied_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(EncoderConfig(channels=8), ModelConfig(embed_dim=8, hidden_dim=8, attn_dim=8, tie_embeddings=True),
                        4 + len(WORDS), 32)
    with torch.no_grad():
        model.decoder.embed.weight.add_(1.0)  # as after training: both uses see the change
    save_checkpoint(tmp_path / "m.pt", model, Vocabulary.build([WORDS], min_count=1))
    loaded, _ = load_captioner(tmp_path / "m.pt")
    assert loaded.decoder.out.weight is loaded.decoder.embed.weight
    torch.testing.assert_close(loaded.decoder.out.weight, model.decoder.embed.weight, rtol=0, atol=0)
