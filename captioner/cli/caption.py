"""``captioner-caption``: the command-line captioner (argument parsing, printing, exit statuses).

The work is done by :mod:`captioner.caption` (streamed loading and decoding) and :mod:`captioner.viz`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from captioner.caption import (
    DEFAULT_BEAM, CaptionResult, FigureNamer, JsonWriter, caption_images, default_decode_config, expand_inputs, load_model,
    result_record, strategy_available,
)
from captioner.config import DecodeConfig
from captioner.data.vocab import Vocabulary
from captioner.models.captioner import Captioner
from captioner.models.checkpoint import BUNDLED, DEFAULT_MODEL, CheckpointError
from captioner.utils import pick_device

# Exit statuses of the command.
EXIT_OK, EXIT_IMAGE_ERRORS, EXIT_USAGE = 0, 1, 2


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
    p.add_argument("-c", "--checkpoint", metavar="CKPT",
                   help="a checkpoint written by captioner-train (best.pt / last.pt), or a bundled model's name "
                        f"({', '.join(BUNDLED)}; the default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--beam", type=int, metavar="K", help=f"beam search of width K (default: beam {DEFAULT_BEAM} when available, else greedy)")
    g.add_argument("--greedy", action="store_true", help="greedy (argmax) decoding")
    g.add_argument("--sample", action="store_true", help="sample each word (see --temperature, --seed)")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (with --sample; default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")
    p.add_argument("--max-len", type=int, default=30, metavar="N", help="longest caption in words (default 30)")
    p.add_argument("--n-best", type=int, default=1, metavar="N",
                   help="also keep the N best captions (beam search's N best, N <= K; or N samples) for --json and --html")
    p.add_argument("--allow-unk", action="store_true", help="let captions contain <unk> (suppressed by default)")
    p.add_argument("--block-bad-endings", action="store_true", help='never end a caption on "a", "the", "of", "and", ...')
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per batch (default 32)")
    p.add_argument("--json", metavar="OUT.json", help="also write all results (captions, scores, errors) to this JSON file")
    p.add_argument("--attention-dir", metavar="DIR", help="write one per-word attention figure per image (DIR/NAME.png)")
    p.add_argument("--gif", action="store_true", help="with --attention-dir, also write an animated GIF per image")
    p.add_argument("--html", metavar="DIR", help="write a results page DIR/index.html (pictures beside it): captions, scores, "
                   "and each word's attention on hover/tap; open it in any browser, no network needed")
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
    masks = {"allow_unk": bool(getattr(args, "allow_unk", False)), "block_bad_endings": bool(getattr(args, "block_bad_endings", False))}
    if args.sample:
        cfg = DecodeConfig(strategy="sample", max_len=args.max_len, temperature=args.temperature or 1.0, seed=args.seed, **masks)
    elif args.greedy:
        cfg = DecodeConfig(strategy="greedy", max_len=args.max_len, **masks)
    elif args.beam is not None:
        cfg = DecodeConfig(strategy="beam", max_len=args.max_len, beam_size=args.beam, **masks)
    else:
        return replace(default_decode_config(model, vocab, args.max_len), **masks)
    if not strategy_available(cfg):
        raise ValueError(f"decoding strategy {cfg.strategy!r} is not available in this version of captioner; use --greedy")
    return cfg


def _err(msg: str, bar: Any = None) -> None:
    """One line on stderr, without breaking a progress bar."""
    line = "error: " + " ".join(msg.split())
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed and checked arguments (``SystemExit(2)`` with a usage message for a bad combination)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rules = [
        (args.temperature is not None and not args.sample, "--temperature only applies with --sample"),
        (args.temperature is not None and args.temperature <= 0, "--temperature must be > 0"),
        (args.beam is not None and args.beam < 1, "--beam must be >= 1"),
        (args.max_len < 1 or args.batch_size < 1, "--max-len and --batch-size must be >= 1"),
        (args.gif and not args.attention_dir, "--gif needs --attention-dir"),
        (args.n_best < 1, "--n-best must be >= 1"),
        (args.n_best > 1 and args.greedy, "--n-best needs --beam or --sample (greedy decoding has one caption)"),
        (args.beam is not None and args.n_best > args.beam, "--n-best cannot exceed the beam width --beam"),
        (args.threads is not None and args.threads < 1, "--threads must be >= 1"),
    ]
    for broken, message in rules:
        if broken:
            parser.error(message)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``captioner-caption``: caption images, print PATH<TAB>CAPTION lines; returns the exit status."""
    args = parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = DEFAULT_MODEL
        print(f"captioner-caption: no --checkpoint given, using the bundled {DEFAULT_MODEL} model "
              "(soft attention trained on Flickr8k; see the README)", file=sys.stderr, flush=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        model, vocab = load_model(args.checkpoint, device)
        cfg = decode_config_from_args(args, model, vocab)
        if cfg.strategy == "beam" and args.n_best > cfg.beam_size:
            raise ValueError(f"--n-best {args.n_best} exceeds the default beam width {cfg.beam_size}; give --beam {args.n_best}")
        if cfg.strategy == "greedy" and args.n_best > 1:
            raise ValueError("--n-best needs beam search or sampling, and this version decodes greedily; use --sample")
    except (CheckpointError, ValueError, RuntimeError, ImportError, OSError) as e:  # ImportError: e.g. a timm backbone without timm
        _err(str(e))
        return EXIT_USAGE
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")  # a file name that is not valid UTF-8 must not crash the listing
    items = expand_inputs(args.inputs, recursive=args.recursive)
    try:
        out = Outputs(args, cfg, model, len(items))
    except _OutputError as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        for r in caption_images(items, (model, vocab), cfg, args.batch_size, device, keep_images=out.needs_images,
                                workers=args.workers, n_best=args.n_best):
            out.add(r)
        sys.stdout.flush()
        out.finish()
    except BrokenPipeError:  # e.g. `captioner-caption ... | head`: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
        return EXIT_IMAGE_ERRORS
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    finally:
        out.close()
    return EXIT_IMAGE_ERRORS if out.failed else EXIT_OK


class _OutputError(Exception):
    """An output (JSON file, results page) cannot be written: one line, exit status 2."""


class Outputs:
    """Where results go: stdout lines, the ``--json`` file, ``--attention-dir`` figures, the ``--html`` page."""

    def __init__(self, args: argparse.Namespace, cfg: DecodeConfig, model: Captioner, n_items: int):
        from tqdm import tqdm

        self.args, self.hard = args, model.decoder.attention_type == "hard"
        self.writer = self.page = None
        if args.json:
            try:
                self.writer = JsonWriter(args.json, {"checkpoint": str(args.checkpoint), "decode": asdict(cfg)})
            except OSError as e:
                raise _OutputError(f"{args.json}: cannot write the JSON file ({e.strerror or e})") from None
        self.att_dir = Path(args.attention_dir) if args.attention_dir else None
        if (self.att_dir is not None or args.html) and model.decoder.attention_type == "none":
            print("warning: this model has no attention (Show-and-Tell); its attention maps are uniform", file=sys.stderr)
        if args.html:
            try:
                self.page = _open_page(args, cfg, model)
            except OSError as e:
                self.close()
                raise _OutputError(f"{args.html}: cannot write the results page ({e.strerror or e})") from None
        self.show_bar = args.progress if args.progress is not None else (n_items > args.batch_size and sys.stderr.isatty())
        self.bar = tqdm(total=n_items, desc="captioning", unit="img", file=sys.stderr, disable=not self.show_bar,
                        dynamic_ncols=True)
        self.namer = FigureNamer()
        self.failed = self.captioned = 0  # failed: images with an error line (unreadable, or figure not written)

    @property
    def needs_images(self) -> bool:
        return self.att_dir is not None or self.page is not None

    def add(self, r: CaptionResult) -> None:
        """Print one result and record it in every output asked for."""
        record = result_record(r)
        if r.ok:
            self.captioned += 1
            print(f"{r.path}\t{r.text}", flush=True)
            if self.att_dir is not None and r.image is not None:
                try:
                    record.update(_write_attention(self.att_dir, self.namer(r.path), r, self.args.gif, self.hard))
                except OSError as e:  # the caption stands; the figure could not be written
                    self.failed += 1
                    record["error"] = f"cannot write attention figure ({e.strerror or e})"
                    _err(f"{r.path}: {record['error']}", self.bar if self.show_bar else None)
        else:
            self.failed += 1
            _err(f"{r.path}: {r.error}", self.bar if self.show_bar else None)
        if self.writer is not None:
            self.writer.add(record)
        if self.page is not None:
            self.page.add(page_item(r, self.hard))
        self.bar.update(1)

    def finish(self) -> None:
        """Complete the JSON file and write the page (every image has been added)."""
        if self.writer is not None:
            self.writer.close({"captioned": self.captioned, "failed": self.failed})
            self.writer = None
        if self.page is not None:
            try:
                print(f"results page: {self.page.write()}", file=sys.stderr, flush=True)
            except OSError as e:
                _err(f"{self.args.html}: cannot write the results page ({e.strerror or e})")
                self.failed += 1

    def close(self) -> None:
        """Close the progress bar; a JSON file that was not completed is removed, never left half-written."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _open_page(args: argparse.Namespace, cfg: DecodeConfig, model: Captioner) -> Any:
    """The results page for ``--html`` (its directory created now, so an unwritable one fails before any image)."""
    from captioner.viz.html import ResultsPage

    how = {"beam": f"beam search, width {cfg.beam_size}", "greedy": "greedy", "sample": f"sampling, temperature {cfg.temperature}, seed {cfg.seed}"}
    meta = {"checkpoint": str(args.checkpoint), "decoding": how.get(cfg.strategy, cfg.strategy), "max words": cfg.max_len,
            "attention": model.decoder.attention_type}
    if cfg.block_bad_endings:
        meta["bad endings"] = "blocked"
    if cfg.allow_unk:
        meta["<unk>"] = "allowed"
    return ResultsPage(args.html, title=f"captions by {Path(args.checkpoint).name}", meta=meta)


def page_item(r: CaptionResult, hard: bool) -> Any:
    """A results-page row for one result: its captions (all n best), picture and any error."""
    from captioner.viz.html import PageItem

    captions = r.alternatives or ([r.caption] if r.caption is not None else [])
    if not hard:  # expected/soft attention: no chosen cell to outline
        captions = [replace(c, locations=None) for c in captions]
    return PageItem(name=r.path, image=r.image, captions=captions, error=r.error)


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
