"""``captioner-ask``: answer a question about an image with a trained VQA checkpoint (``task=vqa``).

    captioner-ask --checkpoint outputs/shapes/vqa/.../best.pt IMAGE "what colour is the circle?" [--attention OUT.png]

Prints the answer on the first line, then the top 3 answers with their probabilities. Words the model
does not know are named on stderr and read as ``<unk>``. Exit status: 0 answered; 1 the image (or the
figure) could not be read (written); 2 bad checkpoint, question or arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from captioner.data.images import ImageLoadError, load_image, uint8_tensor
from captioner.models.checkpoint import CheckpointError
from captioner.models.vqa import Answer, VQAModel, ask, load_vqa
from captioner.utils import pick_device

EXIT_OK, EXIT_IMAGE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The ``captioner-ask`` argument parser."""
    p = argparse.ArgumentParser(prog="captioner-ask", description="Answer a question about an image with a VQA checkpoint.",
                                epilog="exit status: 0 answered; 1 unreadable image or unwritable figure; 2 bad checkpoint, question or arguments.")
    p.add_argument("image", metavar="IMAGE", help="an image file (any format Pillow reads; resized as in training)")
    p.add_argument("question", metavar="QUESTION", help='e.g. "what colour is the circle?"')
    p.add_argument("-c", "--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by captioner-train with task=vqa")
    p.add_argument("--attention", metavar="OUT.png", help="write the question's attention over the image, one panel per glimpse")
    p.add_argument("--top", type=int, default=3, metavar="K", help="how many answers to list with their probabilities (default 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda ... (default auto)")
    return p


def _err(msg: str) -> None:
    print("error: " + " ".join(str(msg).split()), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``captioner-ask``: print the answer and the top answers; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.top < 1:
        build_parser().error("--top must be >= 1")
    try:
        device = pick_device(args.device)
        model, vocab, answers = load_vqa(args.checkpoint)
        model.to(device)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        _err(e)
        return EXIT_USAGE
    try:
        img = load_image(args.image)
    except ImageLoadError as e:
        _err(e)  # "PATH: REASON"
        return EXIT_IMAGE
    try:
        result = ask(model, vocab, answers, uint8_tensor(img, model.spec.image_size), args.question, k=args.top)
    except ValueError as e:
        _err(e)
        return EXIT_USAGE
    if result.unknown:
        words = ", ".join(repr(w) for w in result.unknown)
        print(f"note: the model does not know the word{'s' if len(result.unknown) > 1 else ''} {words}; "
              f"answered reading {'them' if len(result.unknown) > 1 else 'it'} as <unk>", file=sys.stderr)
    print(result.answer)
    for rank, (word, p) in enumerate(result.top, 1):
        print(f"  {rank}. {word:<10} {p:.3f}")
    if args.attention:
        return _write_attention(Path(args.attention), img, model, result, args.question)
    return EXIT_OK


def _write_attention(path: Path, img, model: VQAModel, result: Answer, question: str) -> int:
    """Write the glimpse figure; a question-only model has nothing to show."""
    if model.encoder is None:
        print("warning: this model answers from the question alone (question_only); no attention figure written", file=sys.stderr)
        return EXIT_OK
    if model.attention_type == "none":
        print("warning: this model does not attend (attention=none); its map is uniform", file=sys.stderr)
    from captioner.viz.attention import save_attention_figure

    K = result.alphas.size(0)
    try:
        save_attention_figure(path, img, words=[f"glimpse {k + 1}" for k in range(K)], attention=result.alphas,
                              title=f"{question}  ->  {result.answer}")
    except OSError as e:
        _err(f"{path}: cannot write the attention figure ({e.strerror or e})")
        return EXIT_IMAGE
    print(f"attention: {path}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
