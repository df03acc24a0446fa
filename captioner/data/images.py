"""Robust image loading: whatever a user has on disk becomes an RGB tensor, or a one-line error naming the file."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

# Decompression-bomb guard: refuse images above this many pixels (PIL warns at 89M; we refuse at 64M,
# about 8000x8000, far above any captioning input, and well below what fills memory).
MAX_PIXELS = 64_000_000


class ImageLoadError(ValueError):
    """An image file could not be turned into pixels; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def _one_line(text: str, limit: int = 200) -> str:
    """Collapse a message onto one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha is composited on white, 16-bit is scaled, CMYK converted."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if img.mode.startswith("I;16") or top > 255:
            hi = 65535.0  # 16-bit data (PNG/TIFF greyscale): full range, not whatever the brightest pixel is
        elif img.mode == "F" and top <= 1.0:
            hi = 1.0  # float images in [0, 1]
        else:
            hi = 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the pixels as stored rather than failing."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - broken EXIF (bad offsets, bad types) is metadata, not pixels
        return img


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as upright 8-bit RGB.

    EXIF orientation is honoured; for animated images (GIF, APNG, WebP) the first frame is used.
    Raises :class:`ImageLoadError` (one-line reason) for missing, unreadable, empty, truncated,
    non-image or oversized files (more than ``MAX_PIXELS`` pixels, checked from the header before decoding).
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image")
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageLoadError(path, f"image too large ({w}x{h} = {w * h / 1e6:.0f} Mpixels; limit {MAX_PIXELS / 1e6:.0f}M), refused as a possible decompression bomb")
                if getattr(img, "is_animated", False):
                    img.seek(0)  # first frame
                img.load()
                return _to_rgb(_upright(img))
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, _one_line(f"refused as a possible decompression bomb ({e})")) from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except MemoryError:
        raise ImageLoadError(path, "not enough memory to decode this image") from None
    except OSError as e:
        raise ImageLoadError(path, _one_line(f"unreadable or truncated image ({e})")) from None
    except (ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError) as e:
        raise ImageLoadError(path, _one_line(f"corrupt image data ({type(e).__name__}: {e})")) from None


def to_tensor(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Resize (squashing to size x size, keeping all content) and normalise: (3, size, size) float."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def uint8_tensor(img: Image.Image, size: int) -> Tensor:
    """Resized image as a (3, size, size) uint8 tensor (compact form for preloading)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def normalise_uint8(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images (..., 3, H, W) -> normalised floats of the default dtype (float32 unless a test asks for float64)."""
    x = x.to(torch.get_default_dtype()).div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s
