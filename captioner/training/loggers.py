"""Where the training job's figures go: JSON lines (always) and, with ``logger=tensorboard``, a TensorBoard events file.

Files in the run directory (rank 0 only; every other rank gets a logger that does nothing):

* ``metrics.jsonl``: one line per epoch, the job's epoch record written verbatim by :meth:`RunLogger.epoch`
  (``{"epoch", "train", "lr", "epoch_seconds", "val"?}``, unchanged from before there were loggers);
* ``train_log.jsonl``: one line per :meth:`RunLogger.scalars` / :meth:`RunLogger.text` call,
  ``{"step": 250, "wall_time": 1718000000.0, "train/loss": 2.31, "train/lr": 0.0004, ...}``, keyed by the
  same tags TensorBoard shows. A separate file, not more lines in ``metrics.jsonl``: every reader of that
  file (tests, notebooks, users' scripts) takes each line to be an epoch;
* ``events.out.tfevents.*`` (``logger=tensorboard``): beside the checkpoints, so ``tensorboard --logdir outputs/``
  names each run by its directory.

Tags the training job logs; ``step`` is the global optimizer step everywhere, per-epoch figures included
(so train and validation charts share one x axis, and a resumed run continues it):

* ``train/loss`` (mean over the logging interval of ``log_every`` steps), ``train/nll``,
  ``train/doubly_stochastic``: the loss and its terms;
* ``train/lr`` (first parameter group), ``train/grad_norm`` (total gradient norm before clipping);
* ``train/reinforce``, ``train/entropy``, ``train/baseline``, ...: the hard-attention terms, whatever the loss returns;
* ``scst/reward``, ``scst/baseline``, ``scst/greedy_reward``, ``scst/length``, ``scst/entropy``: self-critical terms;
* ``val/BLEU-4``, ``val/CIDEr-D``, ...: validation metrics, once per epoch (taken from the epoch record),
  with ``epoch/train_<term>`` (the epoch's means), ``epoch/lr``, ``epoch/seconds`` and ``epoch/epoch``;
* ``val_images/<i>`` (image): the per-word attention grid of the i-th fixed val image, titled with its caption;
* ``val_captions/<i>`` (text): that image's current caption (and its references when given); TensorBoard lists
  it as ``val_captions/<i>/text_summary`` (torch's ``add_text`` adds the suffix).

Typical use in the loop::

    logger = make_logger(cfg.logger, out_dir, info.is_main, purge_step=progress.global_step + 1 if ckpt else None)
    meter = IntervalMean()
    ...  # every step:
    meter.add(losses)
    if progress.global_step % cfg.log_every == 0:
        logger.scalars("train", {**meter.pop(), "lr": lr, "grad_norm": norm}, progress.global_step)
    ...  # every epoch:
    logger.epoch(record, progress.global_step)
    log_val_examples(logger, model, vocab, val_inputs, progress.global_step, cfg.decode, display=val_display)
    ...
    logger.close()
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from captioner.config import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from captioner.data.vocab import Vocabulary
    from captioner.decoding.caption import Caption
    from captioner.models.captioner import Captioner

LOGGERS = ("jsonl", "tensorboard")
METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"
TENSORBOARD_MISSING = (
    "logger=tensorboard needs the tensorboard package, which is not installed: "
    "pip install tensorboard (or install captioner with its extra: pip install 'captioner[tensorboard]'); "
    "or use logger=jsonl"
)


def _number(v: Any) -> float:
    """A Python float from a float, int, numpy scalar or one-element tensor."""
    if isinstance(v, Tensor):
        return float(v.detach().float().cpu())
    return float(v)


# --------------------------------------------------------------------------------------------------
# Loggers
class RunLogger:
    """The logger interface; this base class does nothing (what non-main ranks get)."""

    active = False
    wants_images = False  # whether image() stores anything (callers skip rendering figures otherwise)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Log ``values`` under tags ``prefix/name`` at ``step`` (``prefix=""``: the names are the tags)."""

    def text(self, tag: str, text: str, step: int) -> None:
        """Log a piece of text (TensorBoard renders it as Markdown)."""

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an image, (H, W, 3) uint8."""

    def epoch(self, record: Mapping[str, Any], step: int) -> None:
        """Log the job's per-epoch record: a ``metrics.jsonl`` line and ``val/*``, ``epoch/*`` scalars."""

    def flush(self) -> None:
        """Write out anything buffered."""

    def close(self) -> None:
        """Flush and release files; the logger must not be used afterwards."""

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tags(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    return {(f"{prefix}/{k}" if prefix else str(k)): _number(v) for k, v in values.items()}


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of an epoch record by tag: ``val/<metric>``, ``epoch/train_<term>``, ``epoch/lr`` ..."""
    out: dict[str, float] = {}
    for k, v in (record.get("val") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"val/{k}"] = float(v)
    for k, v in (record.get("train") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"epoch/train_{k}"] = float(v)
    for key, tag in (("lr", "epoch/lr"), ("epoch_seconds", "epoch/seconds"), ("epoch", "epoch/epoch")):
        if isinstance(record.get(key), (int, float)):
            out[tag] = float(record[key])
    return out


class JsonlLogger(RunLogger):
    """``metrics.jsonl`` (per epoch) and ``train_log.jsonl`` (per interval) in ``out_dir``.

    Each line is appended and the file closed at once: a crash loses nothing already logged, and
    there is no handle to leak. ``purge_step`` (set when resuming): lines of ``train_log.jsonl`` at or
    after that step, written by the interrupted run past its last checkpoint, are dropped first.
    """

    active = True

    def __init__(self, out_dir: str | Path, purge_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.train_log_path = self.out_dir / TRAIN_LOG_FILE
        if purge_step is not None and self.train_log_path.is_file():
            keep = [ln for ln in self.train_log_path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and _line_step(ln) < purge_step]
            self.train_log_path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def _append(self, path: Path, obj: Mapping[str, Any]) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        self._append(self.train_log_path, {"step": int(step), "wall_time": round(time.time(), 3), **_tags(prefix, values)})

    def text(self, tag: str, text: str, step: int) -> None:
        self._append(self.train_log_path, {"step": int(step), "wall_time": round(time.time(), 3), tag: str(text)})

    def epoch(self, record: Mapping[str, Any], step: int) -> None:
        self._append(self.metrics_path, record)


def _line_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -math.inf))
    except (ValueError, AttributeError):
        return -math.inf  # an unreadable line (cut by a crash) is kept rather than judged


def _summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or the one clear ConfigError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module raises ImportError itself when tensorboard is absent or too old
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter


class TensorBoardLogger(JsonlLogger):
    """The JSON-lines files plus a TensorBoard events file in ``out_dir``."""

    wants_images = True

    def __init__(self, out_dir: str | Path, purge_step: int | None = None, flush_secs: int = 30):
        super().__init__(out_dir, purge_step)
        writer_cls = _summary_writer_class()
        # purge_step: TensorBoard hides the events an interrupted run wrote past its last checkpoint.
        self.writer = writer_cls(log_dir=str(self.out_dir), purge_step=purge_step, flush_secs=flush_secs)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        tags = _tags(prefix, values)
        super().scalars("", tags, step)
        for tag, v in tags.items():
            self.writer.add_scalar(tag, v, int(step))

    def text(self, tag: str, text: str, step: int) -> None:
        super().text(tag, text, step)
        self.writer.add_text(tag, str(text), int(step))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        self.writer.add_image(tag, image, int(step), dataformats="HWC")

    def epoch(self, record: Mapping[str, Any], step: int) -> None:
        super().epoch(record, step)
        for tag, v in epoch_scalars(record).items():
            self.writer.add_scalar(tag, v, int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(kind: str, out_dir: str | Path, is_main: bool = True, purge_step: int | None = None) -> RunLogger:
    """The logger named by ``kind`` (``jsonl`` or ``tensorboard``) writing into ``out_dir``; a no-op one unless ``is_main``.

    The name, and tensorboard's presence, are checked on every rank, so a bad setting stops all ranks
    alike instead of rank 0 alone (the others would then wait on it forever).
    """
    if kind not in LOGGERS:
        raise ConfigError(f"unknown logger {kind!r}; expected one of {', '.join(LOGGERS)}")
    if kind == "tensorboard":
        _summary_writer_class()
    if not is_main:
        return RunLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(out_dir, purge_step)
    return JsonlLogger(out_dir, purge_step)


class IntervalMean:
    """Means of loss terms since the last :meth:`pop` (the per-interval figures, not the epoch's running mean)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Any]) -> None:
        """Add one step's values (floats or one-element tensors)."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + _number(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        """The means since the last pop, and start again."""
        out = {k: s / self.counts[k] for k, s in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """Total L2 norm of the gradients (what ``clip_grad_norm_`` returns; for runs without clipping)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


# --------------------------------------------------------------------------------------------------
# Validation examples
def attention_grid_image(image: np.ndarray | Image.Image, caption: Caption, *, title: str | None = None, dpi: int = 72,
                         **kwargs: Any) -> np.ndarray:
    """The per-word attention grid (:func:`captioner.viz.attention.attention_figure`) as an (H, W, 3) uint8 array.

    ``image`` is (H, W, 3) uint8 (or a PIL image); ``title`` defaults to the caption; hard attention's
    chosen cells are outlined. ``kwargs`` go to ``attention_figure`` (``ncols``, ``cmap``, ``boxes``...).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from captioner.viz.attention import attention_figure

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
        image = Image.fromarray(arr, "RGB")
    fig = attention_figure(image, caption, title=title if title is not None else (caption.text or "(empty caption)"), **kwargs)
    canvas = FigureCanvasAgg(fig)  # our own canvas: no pyplot, nothing left in a global figure manager
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)


def _hwc(img: Any) -> np.ndarray:
    """A display image as (H, W, 3) uint8: from (3, H, W) / (H, W, 3) tensors or arrays, or PIL images."""
    if isinstance(img, Tensor):
        img = img.detach().cpu().numpy()
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)  # (H, W, 3)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"display images must be (3, H, W) or (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


@torch.no_grad()
def log_val_examples(logger: RunLogger, model: Captioner, vocab: Vocabulary, inputs: Tensor, step: int, decode_cfg: Any, *,
                     display: Sequence[Any] | None = None, references: Sequence[Sequence[str]] | None = None,
                     tag: str = "val_images", text_tag: str = "val_captions", **figure_kwargs: Any) -> list[Caption]:
    """Caption a fixed handful of val images and log each as ``<tag>/<i>`` (attention grid) and ``<text_tag>/<i>``.

    ``inputs``: uint8 images (N, 3, H, W) as the val store gives them, or cached features (N, L, D);
    ``display``: the images to draw on, (3, H, W) / (H, W, 3) uint8 or PIL (default: ``inputs``;
    required with features). Decoding follows ``decode_cfg``, as validation does. Returns the captions
    ([] without decoding on a logger that does nothing, e.g. on non-main ranks).
    """
    if not logger.active:
        return []
    from captioner.data.images import normalise_uint8
    from captioner.decoding import decode
    from captioner.models.checkpoint import unwrap

    m = unwrap(model)
    if inputs.dim() == 3:  # (N, L, D) features from a cache
        if display is None:
            raise ValueError("log_val_examples: give display images when the inputs are cached features")
        x = inputs.to(next(m.parameters()).device, torch.get_default_dtype())
    elif inputs.dim() == 4 and inputs.dtype == torch.uint8:
        x = normalise_uint8(inputs.to(next(m.parameters()).device), m.spec.mean, m.spec.std)  # (N, 3, H, W)
    else:
        raise ValueError(f"inputs must be uint8 images (N, 3, H, W) or features (N, L, D), got {tuple(inputs.shape)} {inputs.dtype}")
    shown = list(display) if display is not None else list(inputs.cpu())
    if len(shown) != inputs.size(0):
        raise ValueError(f"{inputs.size(0)} inputs but {len(shown)} display images")
    was_training = m.training
    m.eval()
    try:
        captions = decode(m.decoder, m.encode(x), vocab, decode_cfg)
    finally:
        m.train(was_training)
    for i, (cap, img) in enumerate(zip(captions, shown)):
        if logger.wants_images:  # a figure costs about a second on a CPU: only draw it where it is kept
            logger.image(f"{tag}/{i}", attention_grid_image(_hwc(img), cap, **figure_kwargs), step)
        text = cap.text or "(empty caption)"
        if references is not None:
            text += "\n\nreferences:\n\n" + "\n".join(f"* {r}" for r in references[i])
        logger.text(f"{text_tag}/{i}", text, step)
    return captions
