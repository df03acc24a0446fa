"""Attention maps on the image: smooth upsampling of the (T, L) grid, per-word figures and animated GIFs.

The encoder sees the whole image squashed to a square, so its ``h x w`` feature grid covers the whole
image whatever its aspect ratio: cell ``(i, j)`` maps to the rectangle ``[j W/w, (j+1) W/w) x
[i H/h, (i+1) H/h)`` of the original picture. Maps are upsampled bicubically (optionally blurred with a
Gaussian, as in the paper's figures) and shown as a "spotlight": attended regions keep their colour,
the rest is darkened. Figures use matplotlib's object API (no pyplot state), so they are safe under the
Agg backend, in threads, and in long loops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from captioner.decoding.caption import Caption

Box = Sequence[float]  # x0, y0, x1, y1 in pixels of the image it is drawn on


def grid_shape(num_locations: int, aspect: float = 1.0) -> tuple[int, int]:
    """(h, w) of a feature grid with ``num_locations`` cells: the factorisation closest to ``aspect`` = w / h."""
    best = (1, num_locations)
    for h in range(1, num_locations + 1):
        if num_locations % h == 0:
            w = num_locations // h
            if abs(math.log(w / h / aspect)) < abs(math.log(best[1] / best[0] / aspect)):
                best = (h, w)
    return best


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of maps (T, H, W) with reflect padding."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()  # (K,)
    m = maps.unsqueeze(1)  # (T, 1, H, W)
    pad_h, pad_w = min(radius, m.size(2) - 1), min(radius, m.size(3) - 1)
    kh, kw = k[radius - pad_h : radius + pad_h + 1], k[radius - pad_w : radius + pad_w + 1]
    m = F.conv2d(F.pad(m, (0, 0, pad_h, pad_h), mode="reflect"), (kh / kh.sum()).view(1, 1, -1, 1))
    m = F.conv2d(F.pad(m, (pad_w, pad_w, 0, 0), mode="reflect"), (kw / kw.sum()).view(1, 1, 1, -1))
    return m.squeeze(1)  # (T, H, W)


def upsample_attention(attention: Tensor, size: tuple[int, int], grid: tuple[int, int] | None = None,
                       sigma: float | None = None, scale: str = "peak") -> Tensor:
    """Attention (T, L) -> smooth maps (T, H, W) over an image of ``size`` = (H, W).

    Bicubic interpolation of the ``grid`` (default: square-ish factorisation of L); ``sigma`` (pixels,
    default a quarter of a cell) adds the paper's Gaussian smoothing. ``scale``: ``"peak"`` divides each
    map by its maximum (a diffuse map stays diffuse), ``"minmax"`` stretches it to [0, 1] (shows the
    relative focus even of a diffuse map, like the paper's auto-scaled plots), ``"none"`` keeps alpha's scale.
    """
    if scale not in ("peak", "minmax", "none"):
        raise ValueError(f"unknown scale {scale!r}; expected peak, minmax or none")
    H, W = int(size[0]), int(size[1])
    attention = attention.detach().float().cpu()
    if attention.dim() == 1:
        attention = attention.unsqueeze(0)  # (1, L)
    T, L = attention.shape
    h, w = grid if grid is not None else grid_shape(L, W / max(H, 1))
    if h * w != L:
        raise ValueError(f"grid {h}x{w} does not have {L} cells")
    if T == 0:
        return attention.new_zeros(0, H, W)
    maps = F.interpolate(attention.view(T, 1, h, w), size=(H, W), mode="bicubic", align_corners=False).squeeze(1)  # (T, H, W)
    maps = maps.clamp_min_(0.0)  # bicubic overshoots below zero next to sharp peaks
    if sigma is None:
        sigma = 0.25 * min(H / h, W / w)
    maps = gaussian_blur(maps, sigma)
    flat = maps.flatten(1)  # (T, H * W)
    hi = flat.amax(dim=1).view(T, 1, 1)
    if scale == "minmax":
        lo = flat.amin(dim=1).view(T, 1, 1)
        flat_map = (hi - lo) <= 1e-6 * hi.clamp_min(1e-12)  # a uniform map: everything equally attended
        maps = torch.where(flat_map, torch.ones_like(maps), (maps - lo) / (hi - lo).clamp_min(1e-12))
    elif scale == "peak":
        maps = maps / hi.clamp_min(1e-12)
    return maps


def cell_box(location: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel rectangle (x0, y0, x1, y1) of grid cell ``location`` (row-major) on an image of size (H, W)."""
    h, w = grid
    H, W = size
    i, j = divmod(int(location), w)
    return (j * W / w, i * H / h, (j + 1) * W / w, (i + 1) * H / h)


def overlay(image: Image.Image, heat: Tensor | np.ndarray, cmap: str | None = None, floor: float = 0.25,
            opacity: float = 0.55) -> Image.Image:
    """Draw a map (H, W) in [0, 1] on an RGB image of the same size.

    ``cmap=None``: the paper's look, pixels scaled by ``floor + (1 - floor) * heat`` (unattended regions
    darkened); otherwise the map is coloured with a matplotlib colormap and blended with ``opacity``.
    """
    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    m = heat.detach().cpu().numpy() if isinstance(heat, Tensor) else np.asarray(heat, dtype=np.float32)
    if m.shape != img.shape[:2]:
        raise ValueError(f"map of shape {m.shape} does not match image of size {img.shape[1]}x{img.shape[0]}")
    m = np.clip(m, 0.0, 1.0)[..., None]  # (H, W, 1)
    if cmap is None:
        out = img * (floor + (1.0 - floor) * m)
    else:
        from matplotlib import colormaps

        colour = colormaps[cmap](m[..., 0])[..., :3].astype(np.float32)  # (H, W, 3)
        out = (1.0 - opacity) * img + opacity * colour
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def _display(image: Image.Image, boxes: Sequence[Box] | None, min_side: int, max_side: int) -> tuple[Image.Image, list[list[float]], float]:
    """Scale an image (and boxes on it) so its shorter side is >= min_side and its longer <= max_side."""
    W, H = image.size
    scale = 1.0
    if min(W, H) < min_side:
        scale = min_side / min(W, H)
    if max(W, H) * scale > max_side:
        scale = max_side / max(W, H)
    if scale != 1.0:
        image = image.resize((max(1, round(W * scale)), max(1, round(H * scale))), Image.BICUBIC)
    sx, sy = image.size[0] / W, image.size[1] / H
    scaled = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in (boxes or [])]
    return image.convert("RGB"), scaled, scale


def _caption_parts(caption: "Caption | None", words: Sequence[str] | None, attention: Tensor | None,
                   locations: Sequence[int] | None) -> tuple[list[str], Tensor, list[int] | None]:
    if caption is not None:
        return list(caption.words), caption.attention, caption.locations if locations is None else list(locations)
    if words is None or attention is None:
        raise ValueError("give a Caption, or words and attention")
    if len(words) != attention.size(0):
        raise ValueError(f"{len(words)} words but {attention.size(0)} attention maps")
    return list(words), attention, list(locations) if locations is not None else None


BOX_COLOURS = ("#00e5ff", "#ff4081", "#76ff03", "#ffea00", "#e040fb", "#ff9100")


def attention_figure(
    image: Image.Image,
    caption: "Caption | None" = None,
    *,
    words: Sequence[str] | None = None,
    attention: Tensor | None = None,
    locations: Sequence[int] | None = None,
    grid: tuple[int, int] | None = None,
    boxes: Sequence[Box] | None = None,
    box_labels: Sequence[str] | None = None,
    word_boxes: Sequence[int] | None = None,
    ncols: int = 5,
    panel_inches: float = 2.2,
    sigma: float | None = None,
    scale: str = "peak",
    cmap: str | None = None,
    title: str | None = None,
    min_side: int = 224,
    max_side: int = 512,
) -> "Figure":
    """Per-word grid: the image (with ground-truth ``boxes``) then one panel per word with its attention.

    Give a :class:`Caption`, or ``words`` and ``attention`` (T, L). ``locations`` (hard attention: the
    attended cell per word) are outlined in red. ``word_boxes[t]`` (index into ``boxes`` or -1) also
    outlines the box a word describes on that word's panel. Boxes are in pixels of ``image``. ``scale``
    as for :func:`upsample_attention`; ``cmap`` (e.g. "jet") colours the maps instead of darkening the rest.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    words, attention, locations = _caption_parts(caption, words, attention, locations)
    disp, dboxes, _ = _display(image, boxes, min_side, max_side)
    W, H = disp.size
    T, L = attention.shape
    grid = grid or grid_shape(L, W / H)
    maps = upsample_attention(attention, (H, W), grid, sigma=sigma, scale=scale)  # (T, H, W)

    n = T + 1
    cols = max(1, min(ncols, n))
    rows = math.ceil(n / cols)
    # Fixed layout computed here: matplotlib's constrained layout costs more than drawing the panels.
    pw, ph = panel_inches, panel_inches * H / W  # panel size (inches)
    gap, label, head = 0.06, 0.28, (0.4 if title else 0.05)  # between panels, word titles, suptitle
    fig_w, fig_h = cols * pw + (cols + 1) * gap, rows * (ph + label) + head + gap
    fig = Figure(figsize=(fig_w, fig_h))
    fig.subplots_adjust(left=gap / fig_w, right=1 - gap / fig_w, bottom=gap / fig_h, top=1 - (head + label) / fig_h,
                        wspace=gap / pw, hspace=label / ph)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()

    def draw_box(ax: Any, b: Sequence[float], colour: str, label: str | None = None, lw: float = 1.5) -> None:
        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor=colour, linewidth=lw))
        if label:
            ax.text(b[0], b[1], label, color="black", fontsize=6, va="bottom", bbox=dict(facecolor=colour, pad=0.5, lw=0))

    ax0 = axes.flat[0]
    ax0.imshow(disp)
    ax0.set_title("image" + (" + boxes" if dboxes else ""), fontsize=9)
    for k, b in enumerate(dboxes):
        draw_box(ax0, b, BOX_COLOURS[k % len(BOX_COLOURS)], box_labels[k] if box_labels else None)
    for t in range(T):
        ax = axes.flat[t + 1]
        ax.imshow(overlay(disp, maps[t], cmap=cmap))
        ax.set_title(words[t], fontsize=10)
        if word_boxes is not None and t < len(word_boxes) and 0 <= word_boxes[t] < len(dboxes):
            k = word_boxes[t]
            draw_box(ax, dboxes[k], BOX_COLOURS[k % len(BOX_COLOURS)], lw=1.0)
        if locations is not None and t < len(locations):
            x0, y0, x1, y1 = cell_box(locations[t], grid, (H, W))
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=2.0))
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig_h, va="top")
    return fig


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def attention_frames(
    image: Image.Image,
    caption: "Caption | None" = None,
    *,
    words: Sequence[str] | None = None,
    attention: Tensor | None = None,
    locations: Sequence[int] | None = None,
    grid: tuple[int, int] | None = None,
    boxes: Sequence[Box] | None = None,
    sigma: float | None = None,
    scale: str = "peak",
    cmap: str | None = None,
    min_side: int = 224,
    max_side: int = 384,
) -> list[Image.Image]:
    """One RGB frame per word (plus the plain image first), the caption so far written underneath."""
    words, attention, locations = _caption_parts(caption, words, attention, locations)
    disp, dboxes, _ = _display(image, boxes, min_side, max_side)
    W, H = disp.size
    T, L = attention.shape
    grid = grid or grid_shape(L, W / H)
    maps = upsample_attention(attention, (H, W), grid, sigma=sigma, scale=scale)  # (T, H, W)
    font_size = max(10, W // 24)
    font = _font(font_size)
    strip = int(font_size * 1.8)

    def frame(body: Image.Image, text: str, t: int | None) -> Image.Image:
        canvas = Image.new("RGB", (W, H + strip), (0, 0, 0))
        canvas.paste(body, (0, 0))
        d = ImageDraw.Draw(canvas)
        for k, b in enumerate(dboxes):
            d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=BOX_COLOURS[k % len(BOX_COLOURS)], width=1)
        if t is not None and locations is not None and t < len(locations):
            x0, y0, x1, y1 = cell_box(locations[t], grid, (H, W))
            d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 0, 0), width=2)
        while text and d.textlength(text, font=font) > W - 8:  # keep the newest words when the line is full
            text = "... " + text.split(" ", 2)[-1] if text.count(" ") >= 2 else text[1:]
        d.text((4, H + (strip - font_size) // 2), text, fill=(255, 255, 255), font=font)
        return canvas

    frames = [frame(disp, "", None)]
    for t in range(T):
        frames.append(frame(overlay(disp, maps[t], cmap=cmap), " ".join(words[: t + 1]), t))
    return frames


def save_attention_gif(path: str | Path, image: Image.Image, caption: "Caption | None" = None, *, duration_ms: int = 700,
                       **kwargs: Any) -> Path:
    """Write the per-word frames as an animated GIF (looping); ``kwargs`` as for :func:`attention_frames`."""
    frames = attention_frames(image, caption, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * len(frames)
    durations[-1] = duration_ms * 3  # linger on the full caption
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False)
    return path


def save_attention_figure(path: str | Path, image: Image.Image, caption: "Caption | None" = None, *, dpi: int = 100,
                          **kwargs: Any) -> Path:
    """Render :func:`attention_figure` to a file (PNG, PDF, SVG by extension) and free it."""
    fig = attention_figure(image, caption, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # a canvas of our own: no pyplot, no global figure manager to leak into
    fig.savefig(path, dpi=dpi)
    return path
