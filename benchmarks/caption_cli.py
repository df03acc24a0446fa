"""Benchmark the ``captioner-caption`` command as a user runs it: a fresh process per measurement.

* cold start: wall time of ``scripts/caption.py one.png`` (interpreter start, imports, checkpoint load,
  one image, default decoding), best of ``--repeats``; the bare ``import captioner.caption`` time is
  reported beside it for context;
* throughput: ``--images`` (default 1,000) small PNGs (varied sizes, so every one is resized) with
  ``--beam 5``, streamed to ``--json``; images/s over the whole run and excluding the one-image start-up;
* memory: peak RSS of the process (``wait4`` rusage of that child alone) at 100 and at ``--images``
  images: streaming means it must not grow with the number of images.

The checkpoint is demo-sized (the ``shapes_soft`` experiment's encoder and decoder, 64 px) with random
weights; its ``<end>`` logit is pushed down so every caption runs the full ``--max-len`` words: the
decoding cost measured is the worst case, not the trivial one-token captions of an untrained model.

    python benchmarks/caption_cli.py [--images 1000] [--beam 5] [--batch-size 32] [--threads 2]

The last line printed is a JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from captioner.config import EncoderConfig, ModelConfig  # noqa: E402
from captioner.data.vocab import Vocabulary  # noqa: E402
from captioner.models.captioner import build_model  # noqa: E402
from captioner.training.checkpoint import save_checkpoint  # noqa: E402

SCRIPT = REPO / "scripts" / "caption.py"


def demo_checkpoint(path: Path, seed: int = 0) -> dict:
    """A random-init checkpoint with the shapes_soft demo's sizes and the shapes world's vocabulary."""
    from captioner.data import shapes

    torch.manual_seed(seed)
    words = ["a", "there", "is", "and", "the", "of", "to", "left", "right", "above", "below", "which", "image", "shows",
             "in", "middle", "one", "two", "three", "objects", "an", "object", *shapes.SHAPES, *shapes.COLORS, *shapes.SIZES]
    vocab = Vocabulary.build([words])
    # conf/experiment/shapes_soft.yaml: shapes_cnn (128 channels, 3 blocks) at 64 px, LSTM 256, attention 128
    model = build_model(EncoderConfig(name="shapes_cnn", channels=128, blocks=3), ModelConfig(attn_dim=128), len(vocab), image_size=64)
    with torch.no_grad():
        model.decoder.out.bias[vocab.end_id] = -1e4  # never end early: worst-case decoding length
    save_checkpoint(path, model, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    return {"parameters": n_params, "vocab": len(vocab), "image_size": 64}


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` small noisy PNGs of varied sizes (48-128 px a side)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(48, 129, 2))
        base = rng.integers(0, 256, 3)
        px = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        p = folder / f"img{i:05d}.png"
        Image.fromarray(px, "RGB").save(p)
        paths.append(p)
    return paths


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a command to completion; (wall seconds, peak RSS in MiB of that process alone)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tempfile.gettempdir())
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child only (RUSAGE_CHILDREN would be a max over all)
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv[:3])}... exited {code}: {err.read().decode(errors='replace').strip()[-500:]}")
    return wall, usage.ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--small", type=int, default=100, help="image count of the first memory measurement")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the command (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="caption_cli_bench_") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "demo.pt"
        info = demo_checkpoint(ckpt)
        paths = make_images(tmp / "images", args.images)
        small_dir = tmp / "small"
        small_dir.mkdir()
        for p in paths[: args.small]:
            os.link(p, small_dir / p.name)

        common = ["--checkpoint", str(ckpt), "--max-len", str(args.max_len), "--batch-size", str(args.batch_size), "--no-progress"]
        if args.threads:
            common += ["--threads", str(args.threads)]
        py = sys.executable

        imports = min(run([py, "-c", "import captioner.caption"], env)[0] for _ in range(args.repeats))
        cold = [run([py, str(SCRIPT), str(paths[0]), *common], env) for _ in range(args.repeats)]
        cold_wall = min(w for w, _ in cold)
        print(f"cold start, 1 image (default decoding): {cold_wall:.2f}s (imports alone {imports:.2f}s); peak RSS {cold[0][1]:.0f} MiB", flush=True)

        beam = ["--beam", str(args.beam), "--json", str(tmp / "out.json")]
        small_wall, small_rss = run([py, str(SCRIPT), str(small_dir), *common, *beam], env)
        print(f"{args.small} images, beam {args.beam}: {small_wall:.1f}s, peak RSS {small_rss:.0f} MiB", flush=True)
        big_wall, big_rss = run([py, str(SCRIPT), str(tmp / "images"), *common, *beam], env)
        n_out = len(json.loads((tmp / "out.json").read_text())["images"])
        assert n_out == args.images, n_out
        one_wall = run([py, str(SCRIPT), str(paths[0]), *common, "--beam", str(args.beam)], env)[0]
        steady = (args.images - 1) / max(big_wall - one_wall, 1e-9)
        print(f"{args.images} images, beam {args.beam}: {big_wall:.1f}s = {args.images / big_wall:.1f} img/s "
              f"({steady:.1f} img/s excluding start-up); peak RSS {big_rss:.0f} MiB", flush=True)

    result = {
        "benchmark": "caption_cli",
        "checkpoint": info,
        "threads": args.threads or torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "cold_start_s": round(cold_wall, 3),
        "import_s": round(imports, 3),
        "beam": args.beam,
        "images": args.images,
        "wall_s": round(big_wall, 2),
        "images_per_s": round(args.images / big_wall, 2),
        "images_per_s_excl_startup": round(steady, 2),
        f"peak_rss_mib_{args.small}": round(small_rss, 1),
        f"peak_rss_mib_{args.images}": round(big_rss, 1),
        "rss_growth_mib": round(big_rss - small_rss, 1),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
