"""Benchmark the ``captioner-caption`` command as a user runs it: a fresh process per measurement.

* cold start: process start to the first caption printed, for one photo (interpreter start, imports,
  checkpoint load, one image, the command's default decoding), best of ``--repeats``; the process's total
  wall time (exit included) and the bare ``import captioner.cli.caption`` time are reported beside it;
* throughput: ``--images`` (default 200) photos in one run: images/s over the whole run, and from the
  end of the first batch to the last caption (the steady rate: start-up and the first batch excluded);
* memory: peak RSS of the process (``wait4`` rusage of that child alone) at ``--small`` and at ``--images``
  images: the command streams, so it must not grow with the number of images.

The command is ``python -m captioner.cli.caption`` (``--console``: the installed ``captioner-caption``
script), run from a temporary directory. The checkpoint (``--checkpoint``):

* a file: used as it is;
* a bundled model's name (``flickr8k``): passed through to the command, which resolves it;
* ``random``: the ``shapes_soft`` experiment's sizes, random weights, ``<end>`` pushed down so every caption
  runs the full ``--max-len`` words (the worst-case decoding cost);
* none (default): a small shapes model trained here, in this process, for ``--train-minutes``
  (``conf/`` composed as ``scripts/train.py experiment=shapes_soft`` does, with a smaller world).

The photos are JPEGs (``--photo-size``, default 500x375 like Flickr8k's) with smooth structure and noise,
so decoding and resizing cost what real photos cost; ``--photos DIR`` uses real ones instead (the first
``--images`` image files of DIR, sorted).

    python benchmarks/caption_cli.py [--checkpoint CKPT|flickr8k|random] [--images 200] [--beam K | --greedy] [--threads 2]

The last line printed is a JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# --------------------------------------------------------------------------------------------------
# Checkpoints
def random_checkpoint(path: Path, seed: int = 0) -> dict[str, Any]:
    """A random-init checkpoint with the shapes_soft demo's sizes and the shapes world's vocabulary."""
    from captioner.config import EncoderConfig, ModelConfig
    from captioner.data import shapes
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import build_model
    from captioner.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    words = ["a", "there", "is", "and", "the", "of", "to", "left", "right", "above", "below", "which", "image", "shows",
             "in", "middle", "one", "two", "three", "objects", "an", "object", *shapes.SHAPES, *shapes.COLORS, *shapes.SIZES]
    vocab = Vocabulary.build([words])
    # conf/experiment/shapes_soft.yaml: shapes_cnn (128 channels, 3 blocks) at 64 px, LSTM 256, attention 128
    model = build_model(EncoderConfig(name="shapes_cnn", channels=128, blocks=3), ModelConfig(attn_dim=128), len(vocab), image_size=64)
    with torch.no_grad():
        model.decoder.out.bias[vocab.end_id] = -1e4  # never end early: worst-case decoding length
    save_checkpoint(path, model, vocab)
    return {"kind": "random (worst-case length)"}


def trained_checkpoint(work: Path, minutes: float, n_train: int, threads: int | None) -> tuple[Path, dict[str, Any]]:
    """Train a small shapes_soft model in this process (the real training job, a smaller world); its best.pt."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from captioner.cli import config_dir
    from captioner.config import register_configs
    from captioner.training.loop import train

    register_configs()
    GlobalHydra.instance().clear()
    overrides = [
        "experiment=shapes_soft", f"data.root={work / 'shapes'}", "data.generate=true", f"data.shapes.n_train={n_train}",
        "data.shapes.n_val=50", "data.shapes.n_test=10", f"output_dir={work / 'run'}", "epochs=50", f"max_minutes={minutes}",
        "test=false", "progress=false", "device=cpu", "optim.warmup_steps=20", *([f"threads={threads}"] if threads else []),
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    t0 = time.perf_counter()
    train(cfg)
    lines = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    val = lines[-1].get("val", {}) if lines else {}
    info = {"kind": f"shapes_soft trained here ({n_train} images, {len(lines)} epochs, {time.perf_counter() - t0:.0f}s)",
            "val_BLEU-4": round(val.get("BLEU-4", float("nan")), 4)}
    best = work / "run" / "best.pt"
    return (best if best.is_file() else work / "run" / "last.pt"), info


def describe(path: Path) -> dict[str, Any]:
    """Sizes of a checkpoint file (read with weights_only=True)."""
    from captioner.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return {"parameters": int(sum(v.numel() for v in ckpt["model"].values() if hasattr(v, "numel"))),
            "vocab": len(ckpt["vocab"]), "image_size": int(ckpt["model_config"]["image_size"]),
            "encoder": ckpt["model_config"]["encoder"].get("name"), "file_mib": round(path.stat().st_size / 2**20, 2)}


# --------------------------------------------------------------------------------------------------
# Photos
def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs of ``size`` (W, H): smooth colour fields with blobs and sensor noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    W, H = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    paths = []
    for i in range(n):
        px = np.empty((H, W, 3), np.float32)
        for c in range(3):  # a colour gradient per channel
            a, b, base = rng.normal(0, 60, 2), rng.uniform(-0.3, 0.3), rng.uniform(40, 215)
            px[..., c] = base + a[0] * xx / W + a[1] * yy / H + 20 * np.sin(b * xx / 10)
        for _ in range(int(rng.integers(2, 6))):  # a few soft-edged blobs
            cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(20, min(W, H) / 3)
            mask = 0.5 - 0.5 * np.tanh((np.hypot(xx - cx, yy - cy) - r) / 8)  # a logistic edge, without exp overflow
            px += mask[..., None] * (rng.uniform(0, 255, 3) - px)
        px += rng.normal(0, 6, px.shape)
        p = folder / f"photo{i:05d}.jpg"
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGB").save(p, quality=90)
        paths.append(p)
    return paths


def real_photos(folder: Path, n: int) -> list[Path]:
    """The first ``n`` image files of a folder, sorted."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if len(paths) < n:
        raise SystemExit(f"error: {folder} has {len(paths)} image files, fewer than --images {n}")
    return paths


# --------------------------------------------------------------------------------------------------
# Running the command
def run(argv: list[str], env: dict[str, str], cwd: str) -> dict[str, float]:
    """Run a command to completion, reading its stdout as it comes.

    Returns wall seconds to the first stdout line and to exit, the arrival time of every line, and the
    peak RSS (MiB) of that process alone.
    """
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd)
        times: list[float] = []
        assert proc.stdout is not None
        for _ in proc.stdout:
            times.append(time.perf_counter() - start)
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child only (RUSAGE_CHILDREN would be a max over all)
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv[:4])}... exited {code}: {err.read().decode(errors='replace').strip()[-800:]}")
    return {"first": times[0] if times else wall, "times": times, "wall": wall, "lines": len(times),
            "rss_mib": usage.ru_maxrss / 1024.0}  # ru_maxrss is KiB on Linux


def command(console: bool) -> list[str]:
    """How the caption command is started."""
    if console:
        exe = shutil.which("captioner-caption", path=str(Path(sys.executable).parent)) or shutil.which("captioner-caption")
        if exe is None:
            raise SystemExit("error: --console: no captioner-caption on PATH (pip install -e . first)")
        return [exe]
    return [sys.executable, "-m", "captioner.cli.caption"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a checkpoint file, a bundled model's name (flickr8k), or 'random' "
                                         "(default: train a small shapes model here)")
    ap.add_argument("--train-minutes", type=float, default=1.0, help="training time of the default checkpoint")
    ap.add_argument("--train-images", type=int, default=1000, help="shapes world size of the default checkpoint")
    ap.add_argument("--images", type=int, default=200, help="photos of the throughput run")
    ap.add_argument("--small", type=int, default=20, help="photos of the first memory measurement")
    ap.add_argument("--photos", type=Path, help="a folder of real photos to use instead of generated ones")
    ap.add_argument("--photo-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--beam", type=int, help="throughput with beam search of this width (default: the command's default decoding)")
    g.add_argument("--greedy", action="store_true", help="throughput with greedy decoding")
    ap.add_argument("--max-len", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the command (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--console", action="store_true", help="run the installed captioner-caption script instead of python -m")
    args = ap.parse_args()
    if args.small >= args.images:
        ap.error("--small must be below --images")

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = command(args.console)
    with tempfile.TemporaryDirectory(prefix="caption_cli_bench_") as tmp:
        tmp = Path(tmp)
        cwd = str(tmp / "cwd")  # the command runs away from the repository, as a user's would
        os.mkdir(cwd)
        if args.checkpoint is None:
            print(f"training a small shapes model for {args.train_minutes} min ...", flush=True)
            ckpt_path, info = trained_checkpoint(tmp / "train", args.train_minutes, args.train_images, args.threads)
            ckpt_arg = str(ckpt_path)
        elif args.checkpoint == "random":
            ckpt_path, info = tmp / "random.pt", {}
            info = random_checkpoint(ckpt_path)
            ckpt_arg = str(ckpt_path)
        elif Path(args.checkpoint).is_file():
            ckpt_path, info = Path(args.checkpoint).resolve(), {"kind": "file"}
            ckpt_arg = str(ckpt_path)
        else:  # a bundled model's name: the command resolves it
            ckpt_path, info, ckpt_arg = None, {"kind": f"bundled model {args.checkpoint!r}"}, args.checkpoint
        if ckpt_path is not None:
            info.update(describe(ckpt_path))

        if args.photos:
            paths = real_photos(args.photos, args.images)
            photo_kind = str(args.photos)
        else:
            paths = make_photos(tmp / "photos", args.images, tuple(args.photo_size))
            photo_kind = f"generated JPEG {args.photo_size[0]}x{args.photo_size[1]}"
        one_dir, small_dir, all_dir = tmp / "one", tmp / "small", tmp / "all"
        for d, ps in ((one_dir, paths[:1]), (small_dir, paths[: args.small]), (all_dir, paths)):
            d.mkdir()
            for p in ps:
                os.symlink(p.resolve(), d / p.name)

        common = ["--checkpoint", ckpt_arg, "--max-len", str(args.max_len), "--batch-size", str(args.batch_size), "--no-progress"]
        if args.threads:
            common += ["--threads", str(args.threads)]
        decoding = ["--beam", str(args.beam)] if args.beam else ["--greedy"] if args.greedy else []

        py = sys.executable
        imports = min(run([py, "-c", "import captioner.cli.caption"], env, cwd)["wall"] for _ in range(args.repeats))
        cold = [run([*cmd, str(one_dir), *common, "--json", str(tmp / "one.json")], env, cwd) for _ in range(args.repeats)]
        assert all(c["lines"] == 1 for c in cold), cold
        best = min(cold, key=lambda c: c["first"])
        default_decode = json.loads((tmp / "one.json").read_text()).get("decode", {})
        print(f"cold start, 1 photo (default decoding: {_decode_name(default_decode)}): first caption after {best['first']:.2f}s, "
              f"process exit {best['wall']:.2f}s (imports alone {imports:.2f}s); peak RSS {best['rss_mib']:.0f} MiB", flush=True)

        small = run([*cmd, str(small_dir), *common, *decoding], env, cwd)
        big = run([*cmd, str(all_dir), *common, *decoding, "--json", str(tmp / "all.json")], env, cwd)
        out = json.loads((tmp / "all.json").read_text())
        n_ok = sum(1 for r in out["images"] if not r.get("error"))
        assert big["lines"] == args.images == n_ok, (big["lines"], n_ok)
        # Captions come a batch at a time: the steady rate counts the images after the first batch, from its end.
        b = min(args.batch_size, args.images)
        t = big["times"]
        steady = (args.images - b) / max(t[-1] - t[b - 1], 1e-9) if args.images > b else None
        words = float(np.mean([len(r.get("caption", "").split()) for r in out["images"]]))
        steady_txt = f"{steady:.1f} photos/s after the first batch" if steady else "(one batch only: no steady rate)"
        print(f"{args.images} photos ({_decode_name(out.get('decode', {}))}): {big['wall']:.1f}s = {args.images / big['wall']:.1f} photos/s, "
              f"{steady_txt} (first batch done after {t[b - 1]:.1f}s); mean caption {words:.1f} words", flush=True)
        print(f"peak RSS: {small['rss_mib']:.0f} MiB at {args.small} photos, {big['rss_mib']:.0f} MiB at {args.images}", flush=True)

    result = {
        "benchmark": "caption_cli",
        "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
        "checkpoint": {"arg": args.checkpoint or "trained here", **info},
        "photos": photo_kind,
        "threads": args.threads or torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "cold_start_first_caption_s": round(best["first"], 3),
        "cold_start_exit_s": round(best["wall"], 3),
        "import_s": round(imports, 3),
        "cold_start_decode": default_decode,
        "images": args.images,
        "decode": out.get("decode", {}),
        "wall_s": round(big["wall"], 2),
        "images_per_s": round(args.images / big["wall"], 2),
        "images_per_s_after_first_batch": round(steady, 2) if steady else None,
        "mean_caption_words": round(words, 2),
        f"peak_rss_mib_{args.small}": round(small["rss_mib"], 1),
        f"peak_rss_mib_{args.images}": round(big["rss_mib"], 1),
        "rss_growth_mib": round(big["rss_mib"] - small["rss_mib"], 1),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


def _decode_name(d: dict[str, Any]) -> str:
    if d.get("strategy") == "beam":
        return f"beam {d.get('beam_size')}"
    return str(d.get("strategy", "?"))


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:  # the command failed: its own message, without this script's traceback
        raise SystemExit(f"error: {e}") from None
