"""Run loggers: JSON lines always, TensorBoard events that read back with tensorboard's own reader, rank 0 only."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.config import ConfigError
from captioner.decoding.caption import Caption
from captioner.training.loggers import (
    METRICS_FILE, TRAIN_LOG_FILE, IntervalMean, RunLogger, attention_grid_image, grad_norm, log_val_examples, make_logger,
)

try:
    import tensorboard  # noqa: F401

    HAVE_TB = True
except ImportError:
    HAVE_TB = False

# Outside CI a missing tensorboard skips the reading tests; in CI it must be installed (the test extra has it).
needs_tb = pytest.mark.skipif(not HAVE_TB and os.environ.get("CI") != "true",
                              reason="tensorboard is not installed (pip install tensorboard, or the captioner[tensorboard] extra)")

EPOCH_RECORD = {"epoch": 1, "train": {"loss": 2.5, "nll": 2.4, "doubly_stochastic": 0.1}, "lr": 0.0004,
                "epoch_seconds": 3.2, "val": {"BLEU-4": 0.125, "CIDEr-D": 0.5}}


def read_events(run_dir: Path):
    """Everything in a run directory's events file(s), through tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(run_dir.glob("events.out.tfevents.*")), f"no events file in {run_dir}"
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_caption(words: list[str], L: int = 16, locations: list[int] | None = None) -> Caption:
    att = torch.softmax(torch.randn(len(words), L, generator=torch.Generator().manual_seed(0)), dim=-1)  # (T, L)
    return Caption(tokens=list(range(4, 4 + len(words))), words=words, score=-1.0, attention=att, locations=locations)


def run_logger(logger: RunLogger) -> None:
    """What the training job does over two logging intervals and one epoch."""
    logger.scalars("train", {"loss": 2.0, "lr": torch.tensor(0.001), "grad_norm": np.float32(1.5)}, step=10)
    logger.scalars("train", {"loss": 1.5, "lr": 0.0009, "grad_norm": 1.25}, step=20)
    logger.scalars("scst", {"reward": 0.25, "baseline": 0.2}, step=20)
    logger.epoch(EPOCH_RECORD, step=20)
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :15] = 255
    logger.image("val_images/0", img, step=20)
    logger.text("val_captions/0", "a red circle", step=20)
    logger.close()


@pytest.mark.parametrize("kind", ["jsonl", pytest.param("tensorboard", marks=needs_tb)])
def test_json_lines_are_written_in_both_modes(kind, tmp_path):
    run_logger(make_logger(kind, tmp_path, is_main=True))
    # metrics.jsonl keeps the job's per-epoch record exactly (json.dumps of the record, one line)
    assert (tmp_path / METRICS_FILE).read_text() == json.dumps(EPOCH_RECORD) + "\n"
    lines = jsonl(tmp_path / TRAIN_LOG_FILE)
    assert [ln["step"] for ln in lines] == [10, 20, 20, 20]
    assert lines[0]["train/loss"] == 2.0 and lines[0]["train/lr"] == pytest.approx(0.001, rel=1e-6)
    assert lines[0]["train/grad_norm"] == 1.5 and lines[1]["train/loss"] == 1.5
    assert lines[2]["scst/reward"] == 0.25 and lines[3]["val_captions/0"] == "a red circle"
    assert all("wall_time" in ln for ln in lines)
    assert bool(list(tmp_path.glob("events.out.tfevents.*"))) == (kind == "tensorboard")


@needs_tb
def test_tensorboard_events_read_back_with_tags_and_steps(tmp_path):
    run_logger(make_logger("tensorboard", tmp_path, is_main=True))
    acc = read_events(tmp_path)
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "scst/reward", "scst/baseline", "val/BLEU-4", "val/CIDEr-D",
            "epoch/train_loss", "epoch/lr", "epoch/seconds", "epoch/epoch"} <= set(tags["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20]
    assert [e.value for e in loss] == pytest.approx([2.0, 1.5], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("val/BLEU-4")] == [(20, pytest.approx(0.125, rel=1e-6))]
    assert tags["images"] == ["val_images/0"]
    (ev,) = acc.Images("val_images/0")
    assert (ev.step, ev.width, ev.height) == (20, 30, 20)
    px = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
    assert px[:, :15].min() == 255 and px[:, 15:].max() == 0  # the pixels survive the round trip
    assert tags["tensors"] == ["val_captions/0/text_summary"]  # text is a tensor; torch's add_text adds the suffix
    (t,) = acc.Tensors("val_captions/0/text_summary")
    assert t.step == 20 and b"a red circle" in t.tensor_proto.string_val[0]


@pytest.mark.parametrize("kind", ["jsonl", pytest.param("tensorboard", marks=needs_tb)])
def test_non_main_rank_writes_nothing(kind, tmp_path):
    out = tmp_path / "run"
    logger = make_logger(kind, out, is_main=False)
    assert not logger.active
    run_logger(logger)
    assert not out.exists()


def test_missing_tensorboard_is_one_clear_message(tmp_path, monkeypatch):
    # sys.modules[name] = None makes `import name` raise ImportError, as when the package is absent
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for is_main in (True, False):  # every rank fails alike, before writing anything
        with pytest.raises(ConfigError) as e:
            make_logger("tensorboard", tmp_path / "run", is_main=is_main)
        msg = str(e.value)
        assert "pip install tensorboard" in msg and "captioner[tensorboard]" in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()
    make_logger("jsonl", tmp_path / "run", is_main=True).close()  # the default needs nothing


def test_unknown_logger_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="jsonl, tensorboard"):
        make_logger("wandb", tmp_path)


@needs_tb
def test_resume_purges_what_the_interrupted_run_logged_past_its_checkpoint(tmp_path):
    first = make_logger("tensorboard", tmp_path)
    for step in (10, 20, 30):
        first.scalars("train", {"loss": float(step)}, step)
    first.close()
    resumed = make_logger("tensorboard", tmp_path, purge_step=21)  # the checkpoint was at step 20
    resumed.scalars("train", {"loss": 99.0}, 30)
    resumed.close()
    assert [(ln["step"], ln["train/loss"]) for ln in jsonl(tmp_path / TRAIN_LOG_FILE)] == [(10, 10.0), (20, 20.0), (30, 99.0)]
    assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("train/loss")] == [(10, 10.0), (20, 20.0), (30, 99.0)]


def test_interval_mean_and_grad_norm():
    m = IntervalMean()
    m.add({"loss": torch.tensor(2.0), "nll": 1.0})
    m.add({"loss": torch.tensor(4.0), "nll": 3.0})
    assert m.pop() == {"loss": 3.0, "nll": 2.0}
    assert m.pop() == {}
    lin = torch.nn.Linear(3, 2)
    lin(torch.randn(5, 3)).square().sum().backward()
    expected = torch.cat([p.grad.flatten() for p in lin.parameters()]).norm()
    assert grad_norm(lin.parameters()) == pytest.approx(float(expected), rel=1e-5)


def test_attention_grid_image_renders_the_figure():
    img = np.full((64, 96, 3), 128, np.uint8)
    soft = attention_grid_image(img, fake_caption(["a", "red", "circle"]))
    assert soft.dtype == np.uint8 and soft.ndim == 3 and soft.shape[2] == 3
    assert soft.std() > 5  # something was drawn, not a blank canvas
    long = attention_grid_image(img, fake_caption(["w"] * 12))  # 13 panels: three rows of five
    assert long.shape[0] > 2 * soft.shape[0] and long.shape[1] > soft.shape[1]  # 4 panels in a row vs 3 rows of 5
    hard = attention_grid_image(img, fake_caption(["a", "red", "circle"], locations=[0, 5, 15]))
    red = (hard[..., 0] > 200) & (hard[..., 1] < 60) & (hard[..., 2] < 60)
    assert red.sum() > red.size * 1e-3  # the chosen cells are outlined in red
    with pytest.raises(ValueError, match="uint8"):
        attention_grid_image(img.astype(np.float32), fake_caption(["a"]))


def tiny_model(tiny_cfg, *overrides: str):
    """A tiny model built from the composed config, its vocabulary and 3 val images (uint8) with their records."""
    from captioner.data.datasets import ImageStore
    from captioner.data.sources import read_records
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import build_model

    cfg = tiny_cfg("decode.max_len=6", *overrides)
    records = read_records(cfg.data.format, Path(cfg.data.root), cfg.data.annotations, cfg.data.image_root)
    vocab = Vocabulary.build([t for r in records if r.split == "train" for t in r.tokens], min_count=cfg.data.min_word_count)
    val = [r for r in records if r.split == "val"][:3]
    torch.manual_seed(0)
    model = build_model(cfg.encoder, cfg.model, len(vocab), cfg.data.image_size)
    with torch.no_grad():
        model.decoder.out.bias[vocab.end_id] = -1e4  # untrained, it would end at once: make it say max_len words
    store = ImageStore(val, cfg.data.image_size)
    images = torch.stack([store[i] for i in range(len(val))])  # (3, 3, S, S) uint8
    return cfg, model, vocab, images, val


@pytest.fixture
def tiny_model_and_val(tiny_cfg):
    return tiny_model(tiny_cfg)


@needs_tb
def test_log_val_examples_writes_captions_and_attention_grids(tiny_model_and_val, tmp_path):
    cfg, model, vocab, images, val = tiny_model_and_val
    model.train()
    logger = make_logger("tensorboard", tmp_path, is_main=True)
    refs = [r.captions[:2] for r in val]
    caps = log_val_examples(logger, model, vocab, images, 7, cfg.decode, references=refs)
    # features from a cache: decoded from them, drawn on the display images given
    with torch.no_grad():
        model.eval()
        from captioner.data.images import normalise_uint8

        feats = model.encode(normalise_uint8(images, model.spec.mean, model.spec.std))  # (3, L, D)
    model.train()
    display = [im.permute(1, 2, 0).numpy() for im in images]  # (H, W, 3)
    caps2 = log_val_examples(logger, model, vocab, feats, 14, cfg.decode, display=display)
    logger.close()
    assert model.training  # put back as it was
    assert len(caps) == 3 and all(len(c.words) == 6 for c in caps)
    assert [c.text for c in caps2] == [c.text for c in caps]  # same greedy captions either way
    acc = read_events(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["val_images/0", "val_images/1", "val_images/2"]
    for i in range(3):
        assert [e.step for e in acc.Images(f"val_images/{i}")] == [7, 14]
        texts = acc.Tensors(f"val_captions/{i}/text_summary")
        assert [t.step for t in texts] == [7, 14]
        first = texts[0].tensor_proto.string_val[0].decode()
        assert first.startswith(caps[i].text) and refs[i][0] in first
    logged = [ln for ln in jsonl(tmp_path / TRAIN_LOG_FILE) if "val_captions/0" in ln]
    assert [ln["step"] for ln in logged] == [7, 14]
    with pytest.raises(ValueError, match="display images"):
        log_val_examples(make_logger("jsonl", tmp_path / "j"), model, vocab, feats, 1, cfg.decode)


def test_log_val_examples_on_a_non_main_rank_decodes_nothing(tiny_model_and_val, tmp_path):
    cfg, model, vocab, images, _ = tiny_model_and_val
    assert log_val_examples(make_logger("jsonl", tmp_path / "run", is_main=False), model, vocab, images, 1, cfg.decode) == []
    assert not (tmp_path / "run").exists()


@needs_tb
def test_log_val_examples_outlines_the_cells_hard_attention_chose(tiny_cfg, tmp_path):
    cfg, model, vocab, images, _ = tiny_model(tiny_cfg, "model=hard", "decode.hard_attend=argmax")
    logger = make_logger("tensorboard", tmp_path)
    (cap,) = log_val_examples(logger, model, vocab, images[:1], 3, cfg.decode)
    logger.close()
    assert cap.locations is not None and len(cap.locations) == len(cap.words) == 6
    (ev,) = read_events(tmp_path).Images("val_images/0")
    px = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))

    def red(a: np.ndarray) -> int:
        return int(((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())

    # the shapes themselves may be red: compare with the same figure without the chosen cells
    plain = attention_grid_image(images[0].permute(1, 2, 0).numpy(), dataclasses.replace(cap, locations=None))
    assert plain.shape == px.shape and red(px) > red(plain) + px[..., 0].size * 1e-3


def test_log_val_examples_in_jsonl_mode_logs_the_captions_only(tiny_model_and_val, tmp_path):
    cfg, model, vocab, images, _ = tiny_model_and_val
    caps = log_val_examples(make_logger("jsonl", tmp_path), model, vocab, images, 5, cfg.decode)
    lines = jsonl(tmp_path / TRAIN_LOG_FILE)
    assert [(ln["step"], ln[f"val_captions/{i}"]) for i, ln in enumerate(lines)] == [(5, c.text) for c in caps]
