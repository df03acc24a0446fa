"""Attention visualisation: smooth upsampling, per-word figures, GIFs, hard-attention cells and ground-truth boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.decoding.caption import Caption
from captioner.viz import (
    attention_figure,
    attention_frames,
    cell_box,
    grid_shape,
    overlay,
    save_attention_figure,
    save_attention_gif,
    upsample_attention,
)


def _one_hot(T: int, grid: tuple[int, int], cells: list[int]) -> torch.Tensor:
    a = torch.full((T, grid[0] * grid[1]), 1e-3)
    for t, c in enumerate(cells):
        a[t, c] = 1.0
    return a / a.sum(1, keepdim=True)  # (T, L)


def _image(w: int = 96, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(60, 200, (h, w, 3), dtype=np.uint8), "RGB")


def test_grid_shape():
    assert grid_shape(196) == (14, 14)
    assert grid_shape(64) == (8, 8)
    assert grid_shape(24, aspect=1.5) == (4, 6)
    assert grid_shape(7) == (1, 7)


def test_upsample_peaks_where_attended_and_is_smooth():
    grid, size = (4, 6), (64, 96)
    maps = upsample_attention(_one_hot(2, grid, [0 * 6 + 1, 3 * 6 + 4]), size, grid)  # (T, H, W)
    assert maps.shape == (2, 64, 96)
    assert float(maps.min()) >= 0.0 and torch.allclose(maps.flatten(1).amax(1), torch.ones(2))
    for t, cell in enumerate([1, 22]):
        x0, y0, x1, y1 = cell_box(cell, grid, size)
        y, x = divmod(int(maps[t].argmax()), 96)
        assert x0 <= x < x1 and y0 <= y < y1
    # smooth, not blocky: no jump between neighbouring pixels is anywhere near a cell-edge step
    assert float(maps.diff(dim=-1).abs().max()) < 0.2 and float(maps.diff(dim=-2).abs().max()) < 0.2
    raw = upsample_attention(_one_hot(1, grid, [5]), size, grid, sigma=0.0)
    assert float(raw.diff(dim=-1).abs().max()) < 0.5


def test_upsample_uniform_and_unnormalised_scale():
    grid = (7, 7)
    uniform = torch.full((3, 49), 1 / 49)
    maps = upsample_attention(uniform, (56, 70), grid)
    assert torch.allclose(maps, torch.ones_like(maps), atol=1e-5)
    assert torch.allclose(upsample_attention(uniform, (56, 70), grid, scale="minmax"), torch.ones_like(maps))
    raw = upsample_attention(uniform, (56, 70), grid, scale="none", sigma=0)
    assert torch.allclose(raw, torch.full_like(raw, 1 / 49), atol=1e-6)
    diffuse = torch.softmax(torch.randn(2, 49) * 0.1, -1)  # nearly uniform
    peak, stretched = upsample_attention(diffuse, (28, 28), grid), upsample_attention(diffuse, (28, 28), grid, scale="minmax")
    assert float(peak.min()) > 0.5  # stays diffuse
    assert torch.allclose(stretched.flatten(1).amin(1), torch.zeros(2)) and torch.allclose(stretched.flatten(1).amax(1), torch.ones(2))
    with pytest.raises(ValueError, match="does not have"):
        upsample_attention(uniform, (10, 10), (6, 6))
    assert upsample_attention(torch.zeros(0, 49), (10, 10), grid).shape == (0, 10, 10)


def test_cell_box_row_major():
    assert cell_box(0, (2, 3), (20, 30)) == (0.0, 0.0, 10.0, 10.0)
    assert cell_box(5, (2, 3), (20, 30)) == (20.0, 10.0, 30.0, 20.0)


def test_overlay_darkens_unattended_regions():
    img = Image.new("RGB", (10, 10), (200, 200, 200))
    heat = torch.zeros(10, 10)
    heat[:5] = 1.0
    out = np.asarray(overlay(img, heat))
    assert (out[:5] == 200).all() and (out[5:] == 50).all()
    coloured = overlay(img, heat, cmap="viridis")
    assert coloured.size == (10, 10) and coloured.mode == "RGB"
    with pytest.raises(ValueError):
        overlay(img, torch.zeros(3, 3))


def _rectangles(ax, colour: str):
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor() == to_rgba(colour)]


def test_figure_panels_titles_hard_locations_and_boxes():
    grid = (4, 6)
    words = ["red", "circle", "above", "square"]
    fig = attention_figure(_image(), words=words, attention=_one_hot(4, grid, [1, 7, 12, 22]), grid=grid,
                           locations=[1, 7, 12, 22], boxes=[[8, 4, 30, 26], [60, 30, 86, 56]], box_labels=["a", "b"],
                           word_boxes=[0, 0, -1, 1], title="red circle above square")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 1 + len(words)
    assert [ax.get_title() for ax in shown[1:]] == words
    assert len(_rectangles(shown[0], "#00e5ff")) == 1 and len(_rectangles(shown[0], "#ff4081")) == 1  # ground truth
    for ax, loc in zip(shown[1:], [1, 7, 12, 22]):
        (rect,) = _rectangles(ax, "red")  # the hard-attention cell, in display pixels
        H, W = ax.images[0].get_array().shape[:2]
        x0, y0, x1, y1 = cell_box(loc, grid, (H, W))
        assert rect.get_xy() == pytest.approx((x0, y0)) and rect.get_width() == pytest.approx(x1 - x0)
    assert len(_rectangles(shown[3], "#00e5ff")) == 0 and len(_rectangles(shown[4], "#ff4081")) == 1


def test_figure_from_caption_and_file(tmp_path):
    cap = Caption(tokens=[4, 5], words=["a", "dog"], score=-1.0, attention=torch.softmax(torch.randn(2, 49), -1))
    path = save_attention_figure(tmp_path / "sub" / "fig.png", _image(300, 200), cap, title=cap.text)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300
    with pytest.raises(ValueError, match="words"):
        attention_figure(_image(), words=["a"], attention=torch.rand(2, 49))


def test_gif_one_frame_per_word(tmp_path):
    grid = (4, 6)
    att = _one_hot(3, grid, [1, 12, 22])
    frames = attention_frames(_image(), words=["a", "b", "c"], attention=att, grid=grid, locations=[1, 12, 22])
    assert len(frames) == 4 and len({f.size for f in frames}) == 1
    path = save_attention_gif(tmp_path / "a.gif", _image(), words=["a", "b", "c"], attention=att, grid=grid,
                              boxes=[[8, 4, 30, 26]])
    with Image.open(path) as im:
        assert im.is_animated and im.n_frames == 4 and im.info.get("loop") == 0


def test_agg_backend_without_pyplot(tmp_path):
    """Figures are built with the object API: rendering works headless and leaves pyplot's figure list alone."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from PIL import Image; from captioner.viz import save_attention_figure;"
        "save_attention_figure(sys.argv[1], Image.new('RGB', (32, 32)), words=['x'], attention=torch.ones(1, 16) / 16);"
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    from pathlib import Path

    env = {"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.png")], check=True, env=env, timeout=120)
    assert (tmp_path / "f.png").stat().st_size > 0
