"""Caption image files with a trained checkpoint: the library behind ``captioner-caption``.

Images are streamed: paths are expanded up front (they are small), but pixels are loaded one batch
at a time (the next batch is decoded in a thread pool while the model runs on the current one), so
memory does not grow with the number of images. A file that cannot be read becomes an error result
naming it; the other images are still captioned.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch import Tensor

from captioner.config import DecodeConfig
from captioner.data.images import ImageLoadError, load_image, normalise_uint8, uint8_tensor
from captioner.data.vocab import Vocabulary
from captioner.decoding import Caption, decode
from captioner.models.captioner import Captioner

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k"}
)
GLOB_CHARS = frozenset("*?[")
DEFAULT_BEAM = 3

# Exit statuses of the command.
EXIT_OK, EXIT_IMAGE_ERRORS, EXIT_USAGE = 0, 1, 2


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
def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available; an unavailable CUDA device is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    return dev


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Captioner, Vocabulary]:
    """Model (eval mode, on ``device``) and vocabulary from a checkpoint; raises CheckpointError."""
    from captioner.training.checkpoint import load_captioner

    model, vocab = load_captioner(checkpoint, map_location="cpu")
    return model.to(device), vocab


def strategy_available(model: Captioner, vocab: Vocabulary, cfg: DecodeConfig) -> bool:
    """Whether this version of :func:`captioner.decoding.decode` knows ``cfg.strategy`` (probed on one tiny input)."""
    p = next(model.decoder.parameters())
    dummy = torch.zeros(1, 1, model.decoder.feature_dim, device=p.device, dtype=p.dtype)  # (1, L=1, D)
    try:
        with torch.no_grad():
            decode(model.decoder, dummy, vocab, replace(cfg, max_len=1))
    except (ValueError, NotImplementedError, KeyError) as e:
        if "strategy" in str(e) or isinstance(e, NotImplementedError):
            return False
        raise
    return True


def default_decode_config(model: Captioner, vocab: Vocabulary, max_len: int = 30) -> DecodeConfig:
    """Beam search (width 3) when this version has it, else greedy."""
    beam = DecodeConfig(strategy="beam", beam_size=DEFAULT_BEAM, max_len=max_len)
    return beam if strategy_available(model, vocab, beam) else DecodeConfig(strategy="greedy", max_len=max_len)


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
) -> Iterator[CaptionResult]:
    """Caption image files in order, one result per path (a caption or an error), streaming in batches.

    ``checkpoint`` is a file (loaded now, so a bad one raises CheckpointError before any image is read)
    or an already loaded ``(model, vocab)``. ``decode_cfg`` defaults to :func:`default_decode_config`.
    ``keep_images`` attaches an upright RGB copy (longest side <= ``display_side``) to each result for
    drawing attention maps; it lives only as long as the caller keeps the result.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = pick_device(device) if isinstance(device, str) else device
    if isinstance(checkpoint, tuple):
        model, vocab = checkpoint
        model = model.to(dev).eval()
    else:
        model, vocab = load_model(checkpoint, dev)
    cfg = decode_cfg or default_decode_config(model, vocab)
    items = [p if isinstance(p, InputPath) else InputPath(os.fspath(p)) for p in paths]
    return _caption_stream(items, model, vocab, cfg, batch_size, dev, display_side if keep_images else None, max(1, workers))


def _caption_stream(items: list[InputPath], model: Captioner, vocab: Vocabulary, cfg: DecodeConfig, batch_size: int,
                    device: torch.device, display_side: int | None, workers: int) -> Iterator[CaptionResult]:
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
            captions: dict[int, Caption] = {}
            if good:
                images = torch.stack([loaded[i][0] for i in good]).to(device)  # (B, 3, S, S) uint8
                with torch.no_grad():
                    feats = model.encode(normalise_uint8(images, model.spec.mean, model.spec.std))  # (B, L, D)
                    caps = decode(model.decoder, feats, vocab, cfg)
                captions = dict(zip(good, caps))
            for i, (it, (_, disp, err)) in enumerate(zip(batch, loaded)):
                yield CaptionResult(it.path, captions.get(i), err, disp)


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
    return {"path": r.path, "caption": c.text, "score": round(float(c.score), 6), "finished": bool(c.finished)}


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


# --------------------------------------------------------------------------------------------------
# Command line
DESCRIPTION = """Caption image files with a trained captioner checkpoint (the checkpoint alone is enough).

Prints PATH<TAB>CAPTION for each image, in input order. Arguments may be image files, directories
(their image files, sorted) or glob patterns (quote them to let captioner expand them, e.g. "photos/*.jpg").
Any image Pillow reads is accepted: greyscale, palette, 16-bit, CMYK and alpha images are converted to
RGB (alpha on white), EXIF orientation is honoured, and for animated images (GIF, APNG, WebP) only the
FIRST FRAME is captioned. Unreadable, truncated, non-image and oversized files (decompression-bomb guard)
are reported as "error: PATH: REASON" on stderr while the other images are still captioned."""

EPILOG = """exit status: 0 all images captioned; 1 some images could not be captioned; 2 bad checkpoint,
device or arguments (nothing captioned)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``captioner-caption`` argument parser."""
    p = argparse.ArgumentParser(prog="captioner-caption", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR_OR_GLOB", help="image files, directories or glob patterns")
    p.add_argument("-c", "--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by captioner-train (best.pt / last.pt)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--beam", type=int, metavar="K", help=f"beam search of width K (default: beam {DEFAULT_BEAM} when available, else greedy)")
    g.add_argument("--greedy", action="store_true", help="greedy (argmax) decoding")
    g.add_argument("--sample", action="store_true", help="sample each word (see --temperature, --seed)")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (with --sample; default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")
    p.add_argument("--max-len", type=int, default=30, metavar="N", help="longest caption in words (default 30)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per batch (default 32)")
    p.add_argument("--json", metavar="OUT.json", help="also write all results (captions, scores, errors) to this JSON file")
    p.add_argument("--attention-dir", metavar="DIR", help="write one per-word attention figure per image (DIR/NAME.png)")
    p.add_argument("--gif", action="store_true", help="with --attention-dir, also write an animated GIF per image")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("-r", "--recursive", action="store_true", help="look for images in subdirectories too")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="threads decoding images ahead of the model (default 2)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads for the model (default: torch's choice)")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show the progress bar")
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="never show the progress bar")
    return p


def decode_config_from_args(args: argparse.Namespace, model: Captioner, vocab: Vocabulary) -> DecodeConfig:
    """The DecodeConfig asked for on the command line (ValueError if this version cannot do it)."""
    if args.sample:
        cfg = DecodeConfig(strategy="sample", max_len=args.max_len, temperature=args.temperature or 1.0, seed=args.seed)
    elif args.greedy:
        cfg = DecodeConfig(strategy="greedy", max_len=args.max_len)
    elif args.beam is not None:
        cfg = DecodeConfig(strategy="beam", max_len=args.max_len, beam_size=args.beam)
    else:
        return default_decode_config(model, vocab, args.max_len)
    if not strategy_available(model, vocab, cfg):
        raise ValueError(f"decoding strategy {cfg.strategy!r} is not available in this version of captioner; use --greedy")
    return cfg


def _err(msg: str, bar: Any = None) -> None:
    """One line on stderr, without breaking a progress bar."""
    line = "error: " + " ".join(msg.split())
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``captioner-caption``: caption images, print PATH<TAB>CAPTION lines; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.temperature is not None and not args.sample:
        parser.error("--temperature only applies with --sample")
    if args.temperature is not None and args.temperature <= 0:
        parser.error("--temperature must be > 0")
    if args.beam is not None and args.beam < 1:
        parser.error("--beam must be >= 1")
    if args.max_len < 1 or args.batch_size < 1:
        parser.error("--max-len and --batch-size must be >= 1")
    if args.gif and not args.attention_dir:
        parser.error("--gif needs --attention-dir")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    from captioner.training.checkpoint import CheckpointError

    try:
        device = pick_device(args.device)
        model, vocab = load_model(args.checkpoint, device)
        cfg = decode_config_from_args(args, model, vocab)
    except (CheckpointError, ValueError, RuntimeError, ImportError, OSError) as e:  # ImportError: e.g. a timm backbone without timm
        _err(str(e))
        return EXIT_USAGE
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")  # a file name that is not valid UTF-8 must not crash the listing

    items = expand_inputs(args.inputs, recursive=args.recursive)
    show_bar = args.progress if args.progress is not None else (len(items) > args.batch_size and sys.stderr.isatty())
    from tqdm import tqdm

    writer = None
    if args.json:
        try:
            writer = JsonWriter(args.json, {"checkpoint": str(args.checkpoint), "decode": asdict(cfg)})
        except OSError as e:
            _err(f"{args.json}: cannot write the JSON file ({e.strerror or e})")
            return EXIT_USAGE
    att_dir = Path(args.attention_dir) if args.attention_dir else None
    if att_dir is not None and model.decoder.attention_type == "none":
        print("warning: this model has no attention (Show-and-Tell); its attention figures are uniform", file=sys.stderr)
    bar = tqdm(total=len(items), desc="captioning", unit="img", file=sys.stderr, disable=not show_bar, dynamic_ncols=True)
    namer = FigureNamer()
    failed = captioned = 0  # failed: images with an error line (unreadable, or figure not written)
    try:
        results = caption_images(items, (model, vocab), cfg, args.batch_size, device, keep_images=att_dir is not None,
                                 workers=args.workers)
        for r in results:
            record = result_record(r)
            if r.ok:
                captioned += 1
                print(f"{r.path}\t{r.text}", flush=True)
                if att_dir is not None and r.image is not None:
                    try:
                        record.update(_write_attention(att_dir, namer(r.path), r, args.gif, model.decoder.attention_type == "hard"))
                    except OSError as e:  # the caption stands; the figure could not be written
                        failed += 1
                        record["error"] = f"cannot write attention figure ({e.strerror or e})"
                        _err(f"{r.path}: {record['error']}", bar if show_bar else None)
            else:
                failed += 1
                _err(f"{r.path}: {r.error}", bar if show_bar else None)
            if writer is not None:
                writer.add(record)
            bar.update(1)
        sys.stdout.flush()
        if writer is not None:
            writer.close({"captioned": captioned, "failed": failed})
            writer = None
    except BrokenPipeError:  # e.g. `captioner-caption ... | head`: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
        return EXIT_IMAGE_ERRORS
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    return EXIT_IMAGE_ERRORS if failed else EXIT_OK


def _write_attention(att_dir: Path, name: str, r: CaptionResult, gif: bool, hard: bool) -> dict[str, str]:
    """Write the attention figure (and GIF) of one result; returns their paths for the JSON record."""
    from captioner.viz.attention import save_attention_figure, save_attention_gif

    assert r.caption is not None and r.image is not None
    locations = r.caption.locations if hard else None
    title = r.caption.text or "(empty caption)"
    out = {"attention_figure": str(save_attention_figure(att_dir / f"{name}.png", r.image, r.caption, locations=locations, title=title))}
    if gif:
        out["attention_gif"] = str(save_attention_gif(att_dir / f"{name}.gif", r.image, r.caption, locations=locations))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
