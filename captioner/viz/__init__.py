"""Visualisation: where the model looked for each word."""

from captioner.viz.attention import (
    attention_figure,
    attention_frames,
    cell_box,
    grid_shape,
    overlay,
    save_attention_figure,
    save_attention_gif,
    upsample_attention,
)

__all__ = [
    "attention_figure",
    "attention_frames",
    "cell_box",
    "grid_shape",
    "overlay",
    "save_attention_figure",
    "save_attention_gif",
    "upsample_attention",
]
