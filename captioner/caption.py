"""Caption image files with a trained checkpoint: the library behind ``captioner-caption`` (``captioner/cli/caption.py``).

Images are streamed: paths are expanded up front (they are small), but pixels are loaded one batch
at a time (the next batch is decoded in a thread pool while the model runs on the current one), so
memory does not grow with the number of images. A file that cannot be read becomes an error result
naming it; the other images are still captioned.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch import Tensor

from captioner.config import DecodeConfig
from captioner.data.images import ImageLoadError, load_image, uint8_tensor
from captioner.data.vocab import Vocabulary
from captioner.decoding import STRATEGIES, Caption, decode, decode_nbest
from captioner.models.captioner import Captioner
from captioner.models.checkpoint import load_captioner
from captioner.utils import pick_device  # noqa: F401 - re-exported for notebooks

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k"}
)
GLOB_CHARS = frozenset("*?[")
DEFAULT_BEAM = 3


@dataclass
class InputPath:
    """One path to caption, or an input argument that named no image at all (``error`` set)."""

    path: str
    error: str | None = None


@dataclass
class CaptionResult:
    """The caption of one image, or why it could not be captioned."""

    path: str
    caption: Caption | None = None
    error: str | None = None  # one line, without the path
    image: Image.Image | None = None  # upright RGB display copy, only with ``keep_images``
    alternatives: list[Caption] | None = None  # with ``n_best`` > 1: the n best captions, best first (``caption`` is the first)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        return self.caption.text if self.caption is not None else ""


# --------------------------------------------------------------------------------------------------
# Inputs
def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(specs: Iterable[str | os.PathLike], recursive: bool = False) -> list[InputPath]:
    """Files, directories (their image files, sorted) and glob patterns -> paths in argument order.

    An explicit file path is always kept (a bad one becomes an error when it is read); directories and
    globs contribute only files with an image extension. A directory or glob with no image, or a
    missing path, is kept as an error entry so it is reported like a bad image.
    """
    out: list[InputPath] = []
    for spec in specs:
        spec = os.fspath(spec)
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(p.rglob("*") if recursive else p.iterdir())
            files = [InputPath(str(f)) for f in found if f.is_file() and _is_image_name(f)]
            out.extend(files or [InputPath(spec, "directory contains no image files")])
        elif p.exists() or not GLOB_CHARS & set(spec):
            out.append(InputPath(spec))  # a file, or a missing path: load_image says which
        else:
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            files = [InputPath(m) for m in matches if Path(m).is_file() and _is_image_name(Path(m))]
            out.extend(files or [InputPath(spec, "no image files match this pattern")])
    return out


# --------------------------------------------------------------------------------------------------
# Model and decoding
def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Captioner, Vocabulary]:
    """Model (eval mode, on ``device``) and vocabulary from a checkpoint; raises CheckpointError."""
    model, vocab = load_captioner(checkpoint, map_location="cpu")
    return model.to(device), vocab


def strategy_available(cfg: DecodeConfig) -> bool:
    """Whether :func:`captioner.decoding.decode` knows ``cfg.strategy``."""
    return cfg.strategy in STRATEGIES


def default_decode_config(model: Captioner, vocab: Vocabulary, max_len: int = 30) -> DecodeConfig:
    """Beam search (width 3) when this version has it, else greedy."""
    beam = DecodeConfig(strategy="beam", beam_size=DEFAULT_BEAM, max_len=max_len)
    return beam if strategy_available(beam) else DecodeConfig(strategy="greedy", max_len=max_len)


# --------------------------------------------------------------------------------------------------
# Captioning
def _load_one(path: str, size: int, display_side: int | None) -> tuple[Tensor | None, Image.Image | None, str | None]:
    """(uint8 tensor (3, S, S), optional display copy, error reason) for one file; never raises for bad files."""
    try:
        img = load_image(path)
        x = uint8_tensor(img, size)  # (3, S, S), the same resize as training
        disp = None
        if display_side:
            disp = img.copy()
            disp.thumbnail((display_side, display_side), Image.BICUBIC)
    except ImageLoadError as e:
        return None, None, e.reason
    except (OSError, MemoryError, ValueError) as e:  # resizing can still fail on a pathological file: one error, not a crash
        return None, None, " ".join(f"could not be processed ({type(e).__name__}: {e})".split())
    return x, disp, None


def caption_images(
    paths: Iterable[str | os.PathLike | InputPath],
    checkpoint: str | os.PathLike | tuple[Captioner, Vocabulary],
    decode_cfg: DecodeConfig | None = None,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    keep_images: bool = False,
    display_side: int = 512,
    workers: int = 2,
    n_best: int = 1,
) -> Iterator[CaptionResult]:
    """Caption image files in order, one result per path (a caption or an error), streaming in batches.

    ``checkpoint`` is a file (loaded now, so a bad one raises CheckpointError before any image is read)
    or an already loaded ``(model, vocab)``. ``decode_cfg`` defaults to :func:`default_decode_config`.
    ``keep_images`` attaches an upright RGB copy (longest side <= ``display_side``) to each result for
    drawing attention maps; it lives only as long as the caller keeps the result. ``n_best`` > 1 also
    attaches the n best captions (:func:`captioner.decoding.decode_nbest`: beam search's n best, or n samples).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_best < 1:
        raise ValueError(f"n_best must be >= 1, got {n_best}")
    dev = pick_device(device) if isinstance(device, str) else device
    if isinstance(checkpoint, tuple):
        model, vocab = checkpoint
        model = model.to(dev).eval()
    else:
        model, vocab = load_model(checkpoint, dev)
    cfg = decode_cfg or default_decode_config(model, vocab)
    if n_best > 1:
        if cfg.strategy == "beam" and n_best > cfg.beam_size:
            raise ValueError(f"n_best={n_best} needs a beam at least as wide (beam_size={cfg.beam_size})")
        cfg = replace(cfg, n_best=n_best)
    items = [p if isinstance(p, InputPath) else InputPath(os.fspath(p)) for p in paths]
    return _caption_stream(items, model, vocab, cfg, batch_size, dev, display_side if keep_images else None, max(1, workers), n_best > 1)


def _caption_stream(items: list[InputPath], model: Captioner, vocab: Vocabulary, cfg: DecodeConfig, batch_size: int,
                    device: torch.device, display_side: int | None, workers: int, nbest: bool) -> Iterator[CaptionResult]:
    size = model.spec.image_size
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load-image") as pool:

        def submit(batch: list[InputPath]) -> list[Future | None]:
            return [None if it.error else pool.submit(_load_one, it.path, size, display_side) for it in batch]

        pending = submit(batches[0]) if batches else []
        for k, batch in enumerate(batches):
            futures = pending
            pending = submit(batches[k + 1]) if k + 1 < len(batches) else []  # decode the next batch meanwhile
            loaded = [f.result() if f is not None else (None, None, it.error) for f, it in zip(futures, batch)]
            good = [i for i, (x, _, _) in enumerate(loaded) if x is not None]
            captions: dict[int, list[Caption]] = {}
            if good:
                images = torch.stack([loaded[i][0] for i in good]).to(device)  # (B, 3, S, S) uint8
                with torch.no_grad():
                    feats = model.encode(images)  # uint8 (B, 3, S, S) -> (B, L, D)
                    caps = decode_nbest(model.decoder, feats, vocab, cfg) if nbest else [[c] for c in decode(model.decoder, feats, vocab, cfg)]
                captions = dict(zip(good, caps))
            for i, (it, (_, disp, err)) in enumerate(zip(batch, loaded)):
                caps_i = captions.get(i)
                yield CaptionResult(it.path, caps_i[0] if caps_i else None, err, disp, caps_i if nbest and caps_i else None)


# --------------------------------------------------------------------------------------------------
# Outputs
class JsonWriter:
    """Streams results into a JSON file (written to a temporary file, renamed when complete)."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f: IO[str] = os.fdopen(fd, "w", encoding="utf-8")
        self.f.write("{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in header.items()) + ' "images": [')
        self.n = 0

    def add(self, record: dict[str, Any]) -> None:
        self.f.write(("," if self.n else "") + "\n  " + json.dumps(record))  # ASCII escapes: valid JSON whatever the file names
        self.n += 1

    def close(self, footer: dict[str, Any]) -> None:
        self.f.write("\n ]" + "".join(f',\n {json.dumps(k)}: {json.dumps(v)}' for k, v in footer.items()) + "\n}\n")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def result_record(r: CaptionResult) -> dict[str, Any]:
    """The JSON form of one result."""
    if r.caption is None:
        return {"path": r.path, "error": r.error}
    c = r.caption
    record = {"path": r.path, "caption": c.text, "score": round(float(c.score), 6), "finished": bool(c.finished)}
    if r.alternatives is not None:
        record["alternatives"] = [{"caption": a.text, "score": round(float(a.score), 6), "finished": bool(a.finished)} for a in r.alternatives]
    return record


class FigureNamer:
    """Unique file stems for attention figures, in input order (``a/x.png`` and ``b/x.png`` -> ``x``, ``x_2``)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, path: str) -> str:
        stem = Path(path).stem or "image"
        name, k = stem, 1
        while name.lower() in self.used:
            k += 1
            name = f"{stem}_{k}"
        self.used.add(name.lower())
        return name
