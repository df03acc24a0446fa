import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import TINY_MODEL, compose_train
from captioner.config import TrainConfig
from captioner.data.datasets import pad_captions
from captioner.data.vocab import Vocabulary
from captioner.decoding import greedy_decode
from captioner.models.decoder import AttentionDecoder
from captioner.models.checkpoint import load_captioner, load_checkpoint
from captioner.training.loop import build_data, train
from captioner.training.losses import caption_loss

REPO = Path(__file__).resolve().parent.parent


def test_real_config_composes_to_dataclasses(tiny_cfg):
    cfg = tiny_cfg()
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.attention == "soft" and cfg.encoder.name == "shapes_cnn"
    assert cfg.decode.strategy == "beam" and cfg.decode.beam_size == 3 and cfg.optim.ema == 0.99


@pytest.mark.parametrize(
    "override, expected",
    [("data.batch_sz=3", ConfigCompositionException), ("epochs=many", ConfigCompositionException),
     ("model=sofft", ConfigCompositionException), ("model.dropout=high", ConfigCompositionException)],
)
def test_typos_and_wrong_types_fail_at_composition(override, expected):
    with pytest.raises((expected, ValidationError)) as e:
        compose_train(["experiment=shapes_soft", "output_dir=/tmp/x", override])
    assert override.split("=")[0].split(".")[-1] in str(e.value) or override.split("=")[1] in str(e.value)


def test_script_reports_typo_in_one_readable_message():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "experiment=shapes_soft", "optim.lrr=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Key 'lrr' not in 'OptimConfig'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_each_cell_and_depth_trains(cell, layers, tiny_shapes):
    """A few Adam steps on a fixed tiny batch lower the teacher-forced loss for every cell type and depth."""
    torch.manual_seed(0)
    dec = AttentionDecoder(vocab_size=20, feature_dim=8, embed_dim=16, hidden_dim=16, attn_dim=8, cell=cell, num_layers=layers, dropout=0.0)
    feats = torch.randn(4, 9, 8)
    caps, lengths = pad_captions([[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 10, 11, 12, 13, 2], [1, 14, 2]])
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = caption_loss(dec(feats, caps, lengths), caps)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_overfits_a_few_images(tiny_cfg):
    """Trained on 4 images (one caption template each), greedy decoding reproduces a training caption."""
    cfg = tiny_cfg("data.limit_train=4", "data.limit_val=0", "data.limit_test=0", "epochs=150", "optim.lr=5e-3",
                   "optim.encoder_lr=5e-3", "optim.warmup_steps=0", "model.dropout=0.0", "model.hidden_dim=64",
                   "model.embed_dim=32", "data.captions_per_image=1", "optim.scheduler=none", "test=false")
    cfg.data.batch_size = 4
    train(cfg)
    model, vocab = load_captioner(Path(cfg.output_dir) / "last.pt")
    data = build_data(cfg.data, vocab=vocab)
    recs = data.records["train"]
    from captioner.data.images import normalise_uint8

    images = normalise_uint8(torch.stack([data.stores["train"][i] for i in range(4)]), model.spec.mean, model.spec.std)
    caps = greedy_decode(model.decoder, model.encode(images), vocab)
    hits = sum(c.words in r.tokens for c, r in zip(caps, recs))
    assert hits >= 3, [(c.text, r.captions) for c, r in zip(caps, recs)]


def test_train_writes_checkpoints_metrics_and_test_results(tiny_cfg):
    cfg = tiny_cfg("epochs=2")
    results = train(cfg)
    out = Path(cfg.output_dir)
    for key in ("BLEU-1", "BLEU-4", "CIDEr-D", "attention_localisation", "attention_localisation_per_word"):
        assert key in results and 0 <= results[key] <= 10
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and "BLEU-4" in lines[0]["val"]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["format_version"] == 1 and ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert json.loads((out / "test_captions.json").read_text())[0].keys() == {"image_id", "caption"}
    model, vocab = load_captioner(out / "best.pt")  # the checkpoint alone rebuilds the model
    assert isinstance(vocab, Vocabulary) and not model.training


def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    """Two epochs in one go == one epoch, stop, resume for the second: identical parameters."""
    straight = tiny_cfg("epochs=2", "test=false")
    straight.output_dir = str(tmp_path / "straight")
    train(straight)
    first = tiny_cfg("epochs=1", "test=false")
    first.output_dir = str(tmp_path / "resumed")
    train(first)
    second = tiny_cfg("epochs=2", "test=false", "resume=auto")
    second.output_dir = str(tmp_path / "resumed")
    torch.manual_seed(1234)  # a different global RNG state must not matter: it is restored from the checkpoint
    train(second)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_train_script_end_to_end(tiny_shapes, tmp_path):
    """The real script prints the final test metrics as its last stdout line."""
    args = [sys.executable, str(REPO / "scripts" / "train.py"), "experiment=shapes_soft", f"data.root={tiny_shapes}",
            "data.generate=false", f"hydra.run.dir={tmp_path / 'run'}", "epochs=1", *TINY_MODEL]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"BLEU-4", "attention_localisation", "attention_localisation_per_word"} <= final.keys()
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_show_tell_trains_on_tiny_config(tiny_cfg):
    cfg = tiny_cfg("model=show_tell", "epochs=1")
    results = train(cfg)
    assert "BLEU-4" in results and "attention_localisation" not in results  # localisation needs attention
