"""Feature cache: round trip against the encoder's float32 output, refusal of stale/half-written/missing caches, the prepare job."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.data.datasets import ImageStore
from captioner.data.features import MANIFEST, CacheWriter, FeatureCacheError, open_cache
from captioner.models.encoder import feature_spec, state_fingerprint
from captioner.data.images import normalise_uint8
from captioner.data.sources import read_records
from captioner.models.encoder import Encoder
from captioner.prepare import PrepareConfig, prepare, register_prepare_config

ENCODER = {"name": "shapes_cnn", "weights": None, "grid": None, "stage": None, "freeze": True, "channels": 16, "blocks": 3}


def compose_prepare(overrides: list[str]) -> PrepareConfig:
    """Compose the real conf/prepare.yaml with overrides and convert it to dataclasses, as the script does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from captioner.cli import config_dir

    register_prepare_config()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("prepare", overrides=overrides)
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A 8/2/2-image shapes world, a saved shapes_cnn (so the weights are reproducible) and its prepared cache."""
    from captioner.data.shapes import generate_shapes

    tmp = tmp_path_factory.mktemp("features")
    root = tmp / "shapes"
    generate_shapes(root, n_train=8, n_val=2, n_test=2, image_size=64, seed=0)
    torch.manual_seed(0)
    encoder = Encoder(**{k: v for k, v in ENCODER.items() if k != "stage"})
    weights = tmp / "shapes_cnn.pt"
    torch.save(encoder.body.state_dict(), weights)
    enc_cfg = dict(ENCODER, weights=str(weights))
    cache = tmp / "cache"
    cfg = compose_prepare(world_overrides(root, weights, cache))
    summary = prepare(cfg)
    records = read_records("karpathy", root, "dataset_shapes.json")
    return {"root": root, "weights": weights, "cache": cache, "enc_cfg": enc_cfg, "summary": summary,
            "records": {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}}


def world_overrides(root: Path, weights: Path, cache: Path, *extra: str) -> list[str]:
    return ["data=shapes", f"data.root={root}", "data.generate=false", "encoder=shapes_cnn", "encoder.channels=16",
            "encoder.freeze=true", f"encoder.weights={weights}", f"cache_dir={cache}", "num_workers=0", "batch_size=3",
            "checkpoint_every=1", "progress=false", *extra]


def expect_of(world: dict, **changes) -> dict:
    encoder = Encoder(**{k: v for k, v in world["enc_cfg"].items() if k != "stage"})
    return dict(feature_spec(world["enc_cfg"], 64, encoder), **changes)


def test_round_trip_equals_encoder_output_within_fp16(world):
    torch.manual_seed(123)  # a different init: the saved weights must be what is loaded
    encoder = Encoder(**{k: v for k, v in world["enc_cfg"].items() if k != "stage"})
    expect = feature_spec(world["enc_cfg"], 64, encoder)
    assert world["summary"]["images"] == {"train": 8, "val": 2, "test": 2}
    for split, records in world["records"].items():
        store = open_cache(world["cache"], expect, [r.image_id for r in records])
        images = ImageStore(records, 64)
        x = normalise_uint8(torch.stack([images[i] for i in range(len(images))]), encoder.mean, encoder.std)
        with torch.no_grad():
            exact = encoder(x)  # (N, L, D), the usual contiguous layout
            # the prepare job runs the encoder in channels_last (faster on CPU): same maths, other rounding
            exact_cl = copy.deepcopy(encoder).to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert len(store) == len(records) and store[0].shape == exact.shape[1:] and store[0].dtype == torch.float32
        cached = torch.stack([store[i] for i in range(len(store))])  # (N, L, D)
        # float16 keeps 11 significant bits: relative error <= 2^-11 (subnormals below 6e-5 get ~6e-8 absolute)
        assert torch.allclose(cached, exact_cl, rtol=2**-11, atol=1e-7)
        assert torch.allclose(cached, exact, rtol=2**-10, atol=1e-6)  # + float32 rounding of the other layout
        assert torch.equal(store.batch(list(range(len(store)))[::-1]), cached.flip(0))
        assert torch.equal(cached, exact_cl.half().float())  # exactly the rounded encoder output
    manifest = json.loads((world["cache"] / MANIFEST).read_text())
    assert manifest["dtype"] == "float16" and manifest["fp16_error"]["max_abs_error"] <= 2**-11 * manifest["fp16_error"]["max_abs_value"]
    assert manifest["splits"]["train"]["image_ids"] == [r.image_id for r in world["records"]["train"]]


def test_store_spans_splits_keeps_order_offers_fp16_and_pickles_small(world):
    expect = expect_of(world)
    ids = [world["records"]["test"][1].image_id, world["records"]["train"][3].image_id]
    store = open_cache(world["cache"], expect, ids, dtype=torch.float16)
    full = {s: open_cache(world["cache"], expect, [r.image_id for r in rs]) for s, rs in world["records"].items()}
    assert store[0].dtype == torch.float16
    assert torch.equal(store[0].float(), full["test"][1]) and torch.equal(store[1].float(), full["train"][3])
    store[0]  # open the maps, then make sure they are not pickled (DataLoader workers get paths, not data)
    blob = pickle.dumps(store)
    assert len(blob) < 2000 and torch.equal(pickle.loads(blob)[1], store[1])


@pytest.mark.parametrize("field, value", [
    ("encoder", "resnet50"), ("weights_sha256", "0" * 64), ("stage", "stage5"), ("grid", 4), ("image_size", 128),
    ("mean", [0.485, 0.456, 0.406]), ("std", [0.5, 0.5, 0.5]), ("transform", "center crop 224"), ("options", {"channels": 32, "blocks": 3}),
    ("precision", "bf16"),
])
def test_mismatched_cache_is_refused_naming_the_field(world, field, value):
    with pytest.raises(FeatureCacheError) as e:
        open_cache(world["cache"], expect_of(world, **{field: value}), [r.image_id for r in world["records"]["train"]])
    msg = str(e.value)
    assert str(world["cache"]) in msg and "stale or mismatched" in msg and "prepare_data.py" in msg
    assert (field if field != "weights_sha256" else "weights") in msg and "\n" not in msg


def test_every_mismatch_is_named_in_one_message(world):
    expect = expect_of(world, stage="stage5", image_size=224)
    with pytest.raises(FeatureCacheError) as e:
        open_cache(world["cache"], expect, ["no-such-image"])
    msg = str(e.value)
    assert "stage:" in msg and "image_size:" in msg and "image list: 1 of 1" in msg and "'no-such-image'" in msg


def test_other_weights_are_refused(world):
    torch.manual_seed(1)
    other = Encoder(**{k: v for k, v in ENCODER.items() if k != "stage"})  # random init != the saved weights
    expect = feature_spec(dict(ENCODER), 64, other)
    assert expect["weights_sha256"] == state_fingerprint(other.body) != expect_of(world)["weights_sha256"]
    with pytest.raises(FeatureCacheError, match=r"weights: cache '.*shapes_cnn.pt' \(sha256 \w+\) != expected None"):
        open_cache(world["cache"], expect, [world["records"]["val"][0].image_id])


def test_bf16_cache_holds_the_bf16_encoder_output_and_is_kept_apart_from_fp32(tmp_path, world):
    """encoder.precision=bf16: the cache holds the bf16-autocast encoder's output (rounded to float16), a few
    percent from the float32 features; each kind of cache is refused where the other is expected, and a cache
    written before the option existed (no precision recorded) reads as float32."""
    cache = tmp_path / "bf16"
    summary = prepare(compose_prepare(world_overrides(world["root"], world["weights"], cache, "encoder.precision=bf16")))
    assert summary["images"] == {"train": 8, "val": 2, "test": 2}
    encoder = Encoder(**{k: v for k, v in world["enc_cfg"].items() if k != "stage"}, precision="bf16")
    expect = feature_spec(dict(world["enc_cfg"], precision="bf16"), 64, encoder)
    assert expect["precision"] == "bf16" and expect_of(world)["precision"] == "fp32"
    records = world["records"]["train"]
    ids = [r.image_id for r in records]
    images = ImageStore(records, 64)
    x = normalise_uint8(torch.stack([images[i] for i in range(len(images))]), encoder.mean, encoder.std)
    with torch.no_grad():
        bf16 = copy.deepcopy(encoder).to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    cached = torch.stack(list(open_cache(cache, expect, ids)))
    assert bf16.dtype == torch.float32 and torch.equal(cached, bf16.half().float())
    fp32 = torch.stack(list(open_cache(world["cache"], expect_of(world), ids)))
    rel = ((cached - fp32).norm() / fp32.norm()).item()
    assert 1e-4 < rel < 0.1, rel  # bf16 keeps 8 significant bits: the features move, by a few percent at most
    with pytest.raises(FeatureCacheError) as e:
        open_cache(cache, expect_of(world), ids)
    assert "precision: cache 'bf16' != expected 'fp32'" in str(e.value)
    with pytest.raises(FeatureCacheError) as e:
        open_cache(world["cache"], expect, ids)
    assert "precision: cache 'fp32' != expected 'bf16'" in str(e.value) and "encoder.precision=bf16" in str(e.value)
    old = tmp_path / "old"  # the fp32 cache as written before encoder.precision existed
    old.mkdir()
    for f in world["cache"].iterdir():
        (old / f.name).symlink_to(f)
    manifest = json.loads((world["cache"] / MANIFEST).read_text())
    del manifest["spec"]["precision"]
    (old / MANIFEST).unlink()
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert torch.equal(torch.stack(list(open_cache(old, expect_of(world), ids))), fp32)
    with pytest.raises(FeatureCacheError, match="precision: cache 'fp32' != expected 'bf16'"):
        open_cache(old, expect, ids)


def test_encoder_precision_resolves_per_device_and_is_recorded_only_when_not_fp32(monkeypatch):
    import captioner.utils as utils
    from captioner.models.encoder import encoder_spec

    torch.manual_seed(0)
    kw = {k: v for k, v in ENCODER.items() if k != "stage"}
    assert "precision" not in encoder_spec(ENCODER)  # float32 checkpoints read as they did before the option
    assert encoder_spec(dict(ENCODER, precision="native"))["precision"] == "native"
    for has_bf16 in (True, False):
        monkeypatch.setattr(utils, "native_bf16", lambda device, v=has_bf16: v)
        native = Encoder(**kw, precision="native")
        assert native.arithmetic("cpu") == ("bf16" if has_bf16 else "fp32")
        assert feature_spec(dict(ENCODER, precision="native"), 64, native)["precision"] == native.arithmetic("cpu")
    with pytest.raises(ValueError, match="encoder precision must be one of fp32, bf16, native"):
        Encoder(**kw, precision="fp16")
    # fp32 leaves an outer autocast alone: a fine-tuned encoder in a bf16 training step computes as it did before
    tuned = Encoder(**dict(kw, freeze=False))
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, body = tuned(x), tuned.body(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, body.flatten(2).transpose(1, 2))


def test_unfrozen_encoder_has_no_cache_spec():
    with pytest.raises(ValueError, match="frozen"):
        feature_spec(ENCODER, 64, Encoder(name="shapes_cnn", channels=16, freeze=False))


def test_missing_cache_says_which_command_builds_it(tmp_path, world):
    with pytest.raises(FeatureCacheError) as e:
        open_cache(tmp_path / "nowhere", expect_of(world), ["0"], data_name="shapes")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "nowhere")) and "no feature cache here" in msg
    assert f"python scripts/prepare_data.py data=shapes encoder=shapes_cnn encoder.weights={world['weights']}" in msg
    assert f"cache_dir={tmp_path / 'nowhere'}" in msg


def test_half_written_cache_is_refused_then_resumed(tmp_path, world):
    """A job that dies on a broken image leaves no manifest; the rerun resumes and finishes."""
    import shutil

    root = tmp_path / "shapes"
    shutil.copytree(world["root"], root)
    target = root / world["records"]["train"][6].path.relative_to(world["root"])
    good = target.read_bytes()
    target.write_bytes(b"not a png")
    cache = tmp_path / "cache"
    failing = [o if o != "num_workers=0" else "num_workers=1" for o in world_overrides(root, world["weights"], cache)]
    with pytest.raises(ValueError, match=f"{target.name}: not an image"):  # a clean one-liner from a worker process
        prepare(compose_prepare(failing))
    assert not (cache / MANIFEST).exists() and (cache / "train.progress.json").is_file()
    assert json.loads((cache / "train.progress.json").read_text())["rows_done"] == 6  # two batches of 3 flushed
    with pytest.raises(FeatureCacheError, match="half-written feature cache .*it resumes"):
        open_cache(cache, expect_of(world), ["0"])
    target.write_bytes(good)
    prepare(compose_prepare(world_overrides(root, world["weights"], cache)))
    ids = [r.image_id for r in world["records"]["train"]]
    resumed = open_cache(cache, expect_of(world), ids)
    reference = open_cache(world["cache"], expect_of(world), ids)
    assert all(torch.equal(resumed[i], reference[i]) for i in range(len(ids)))
    assert not list(cache.glob("*.partial")) and not list(cache.glob("*.progress.json"))


def test_prepare_skips_done_splits_and_guards_another_cache(tmp_path, world):
    cache = tmp_path / "cache"
    prepare(compose_prepare(world_overrides(world["root"], world["weights"], cache, "splits=[val]")))
    manifest = json.loads((cache / MANIFEST).read_text())
    assert list(manifest["splits"]) == ["val"]
    val_mtime = (cache / "val.npy").stat().st_mtime_ns
    prepare(compose_prepare(world_overrides(world["root"], world["weights"], cache, "splits=[val,test]")))
    assert sorted(json.loads((cache / MANIFEST).read_text())["splits"]) == ["test", "val"]
    assert (cache / "val.npy").stat().st_mtime_ns == val_mtime  # reused, not re-encoded
    with pytest.raises(FeatureCacheError, match="holds a cache for something else .*image_size.*overwrite=true"):
        prepare(compose_prepare(world_overrides(world["root"], world["weights"], cache, "splits=[val]", "data.image_size=32")))
    summary = prepare(compose_prepare(world_overrides(world["root"], world["weights"], cache, "splits=[val]",
                                                      "data.image_size=32", "overwrite=true")))
    assert summary["feature_shape"] == [16, 16]  # 32 px -> 4x4 grid
    assert sorted(json.loads((cache / MANIFEST).read_text())["splits"]) == ["val"]


def test_prepare_refuses_a_fine_tuned_encoder(world, tmp_path):
    cfg = compose_prepare(world_overrides(world["root"], world["weights"], tmp_path / "c", "encoder.freeze=false"))
    with pytest.raises(ValueError, match="encoder.freeze=true"):
        prepare(cfg)


def test_damaged_array_is_refused(tmp_path, world):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    np.save(cache / "val.npy", np.zeros((1, 64, 16), dtype=np.float16))
    with pytest.raises(FeatureCacheError, match=r"val.npy holds float16 \(1, 64, 16\), the manifest says float16 \(2, 64, 16\)"):
        open_cache(cache, expect_of(world), [r.image_id for r in world["records"]["val"]])


def test_one_writer_at_a_time(tmp_path, world):
    expect = expect_of(world)
    first = CacheWriter(tmp_path / "c", expect, {"val": ["a"]})
    with pytest.raises(FeatureCacheError, match="another prepare job is writing this cache"):
        CacheWriter(tmp_path / "c", expect, {"val": ["a"]})
    first.close()
    CacheWriter(tmp_path / "c", expect, {"val": ["a"]}).close()


def test_features_beyond_float16_range_are_refused(tmp_path, world):
    from captioner.prepare import encode_to_cache

    class Huge(torch.nn.Module):
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 4, 2), 1e5)  # (B, L, D), above float16's 65504

    with pytest.raises(FeatureCacheError, match=r"beyond-float16 features \(max \|x\| 1e\+05; float16 stops at 65504\)"):
        encode_to_cache({"val": world["records"]["val"]}, Huge(), expect_of(world), tmp_path / "c", num_workers=0, progress=False)
    assert not (tmp_path / "c" / MANIFEST).exists()
