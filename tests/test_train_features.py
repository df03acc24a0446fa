"""Training and evaluation read a feature cache made by the prepare job, and refuse a mismatched one."""

import dataclasses
from pathlib import Path

import pytest
import torch

from captioner.data.features import FeatureCacheError
from captioner.models.encoder import ShapesCNN
from captioner.prepare import PrepareConfig, prepare
from captioner.models.checkpoint import load_checkpoint
from captioner.training.loop import train


@pytest.fixture
def frozen_weights(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "shapes_cnn.pth"
    torch.save(ShapesCNN(channels=16).state_dict(), path)
    return path


def test_train_from_cache_and_refuse_a_stale_one(tiny_cfg, frozen_weights, tmp_path):
    cfg = tiny_cfg("encoder.freeze=true", f"encoder.weights={frozen_weights}", "epochs=2")
    cache = tmp_path / "cache"
    prep = PrepareConfig(data=cfg.data, encoder=cfg.encoder, cache_dir=str(cache), num_workers=0, progress=False, device="cpu")
    prepare(prep)
    cfg.data.features = str(cache)
    results = train(cfg)
    assert {"BLEU-4", "attention_localisation"} <= results.keys()
    ck = load_checkpoint(Path(cfg.output_dir) / "best.pt")
    assert ck["model_config"]["encoder"]["weights"] == str(frozen_weights)  # the checkpoint can still caption raw images

    # same cache, other encoder weights: refused with one message naming the cache and the mismatch
    torch.manual_seed(4)
    other = tmp_path / "other.pth"
    torch.save(ShapesCNN(channels=16).state_dict(), other)
    stale = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, weights=str(other)))
    stale.output_dir = str(tmp_path / "stale")
    with pytest.raises(FeatureCacheError, match=r"cache: stale or mismatched feature cache: weights: .*sha256"):
        train(stale)


def test_training_from_cache_matches_training_from_images(tiny_cfg, frozen_weights, tmp_path):
    """Same frozen encoder: cached fp16 features give (nearly) the same first-epoch loss as images."""
    common = ("encoder.freeze=true", f"encoder.weights={frozen_weights}", "epochs=1", "test=false", "data.limit_val=0",
              "model.dropout=0.0")
    images = tiny_cfg(*common)
    images.output_dir = str(tmp_path / "images")
    train(images)
    cached = tiny_cfg(*common)
    cached.output_dir = str(tmp_path / "cached")
    prepare(PrepareConfig(data=cached.data, encoder=cached.encoder, cache_dir=str(tmp_path / "c"), num_workers=0, progress=False, device="cpu"))
    cached.data.features = str(tmp_path / "c")
    train(cached)
    a = load_checkpoint(tmp_path / "images" / "last.pt")["metrics"]["train"]["loss"]
    b = load_checkpoint(tmp_path / "cached" / "last.pt")["metrics"]["train"]["loss"]
    assert a == pytest.approx(b, rel=1e-3)
