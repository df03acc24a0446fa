"""Data-path throughput on CPU: the frozen encoder, and decoder training from the feature cache vs from images.

Phases, each in its own subprocess so that its peak resident memory (VmHWM) is its own:
  encoder   EfficientNet-Lite0 (ImageNet weights, frozen, ``last`` 7x7x1280) at 224 px, batch 32, on
            pre-decoded Flickr8k photos: images/s of the forward pass alone (contiguous, channels_last and,
            on a CPU with native bf16 products, ``encoder.precision=bf16`` with how far its features move);
            plus JPEG decode + resize images/s (one process), the other half of the prepare job's work.
  cache     decoder training (soft attention LSTM, teacher forcing, Adam) with features read from a
            feature cache through ``CaptionGroups`` + DataLoader: captions/s.
  images    the same training with the photos decoded and run through the frozen encoder every step
            (the end-to-end path): captions/s.
Both training phases use the first ``--images`` training photos, ``--batch`` images per step with all
5 captions each (as ``conf/data/flickr8k.yaml``: 64 images = 320 captions), ``num_workers=0`` (on 2
shared cores workers only compete with the trainer), and the best of ``--repeats`` passes.
The cache is ``--cache`` when it holds these images for this encoder, else a temporary one written
by ``captioner.prepare.encode_to_cache`` (timed too).

    python benchmarks/data.py [--images 128] [--batch 64] [--threads 1] [--repeats 2] [--context-dim 512] [--cache data_cache/flickr8k_efficientnet_lite0_last]

Seconds per Flickr8k epoch = 30,000 training captions / captions/s (6,000 photos x 5). The last line
printed is a JSON object. Skipped (with a message) when the Flickr8k photos are not found.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLICKR8K = Path(os.environ.get("FLICKR8K", REPO.parent / "shared" / "datasets" / "flickr8k"))
EPOCH_CAPTIONS = 30_000
ENCODER_CFG = {"name": "efficientnet_lite0", "weights": "default", "stage": "last", "grid": None, "freeze": True}
SIZE = 224


def peak_mb() -> float:
    """Peak resident set size of this process in MiB.

    VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over from the parent across fork + exec, so a
    phase subprocess would report the parent's peak if it was higher.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_records(n: int) -> list:
    """The first ``n`` Flickr8k training records."""
    import logging

    from captioner.data.sources import read_flickr8k_text

    logging.getLogger("captioner.data.sources").setLevel(logging.ERROR)  # the known mismatches are not news here
    return [r for r in read_flickr8k_text(FLICKR8K) if r.split == "train"][:n]


def images_per_s(encoder, batches: list, repeats: int) -> float:
    """Forward-pass images/s of ``encoder`` over ``batches``: the best of ``repeats`` passes after a warm-up."""
    encoder(batches[0][:4])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for x in batches:
            encoder(x)  # (32, L, D)
        best = min(best, time.perf_counter() - t)
    return sum(len(x) for x in batches) / best


def phase_encoder(args: argparse.Namespace) -> dict:
    """Encoder forward images/s at batch 32, and JPEG decode+resize images/s."""
    import torch

    from captioner.data.datasets import ImageStore
    from captioner.data.images import normalise_uint8
    from captioner.models.encoder import Encoder
    from captioner.utils import native_bf16

    records = train_records(args.images)
    start = time.perf_counter()
    store = ImageStore(records, SIZE)
    images = torch.stack([store[i] for i in range(len(store))])  # (N, 3, S, S) uint8
    decode_rate = len(records) / (time.perf_counter() - start)
    encoder = Encoder(**ENCODER_CFG)
    batches = [normalise_uint8(images[i : i + 32], encoder.mean, encoder.std) for i in range(0, len(images) - 31, 32)]
    rates = {}
    with torch.inference_mode():
        # the contiguous layout, then channels_last as the prepare job runs it (same weights, same inputs)
        for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            encoder = encoder.to(memory_format=fmt)
            xs = [x.contiguous(memory_format=fmt) for x in batches]
            rates[layout] = images_per_s(encoder, xs, args.repeats)
        if native_bf16(torch.device("cpu")):  # encoder.precision=native: bf16 autocast, channels_last
            fast = Encoder(**ENCODER_CFG, precision="bf16").to(memory_format=torch.channels_last)
            rate_bf16 = images_per_s(fast, xs, args.repeats)
            exact, approx = encoder(xs[0]), fast(xs[0])  # (32, L, D) each
            bf16 = {"encoder_images_per_s_bf16": round(rate_bf16, 2),
                    "bf16_speedup": round(rate_bf16 / rates["channels_last"], 2),
                    "bf16_feature_mean_abs_change": float((approx - exact).abs().mean()),
                    "bf16_feature_relative_change": float((approx - exact).norm() / exact.norm())}
        else:
            bf16 = {"encoder_images_per_s_bf16": "not timed: this CPU has no native bf16 products"}
    rate = rates["channels_last"]
    noise = jpeg_noise(records[:32], encoder)
    return {"encoder_images_per_s": round(rate, 2), "encoder_images_per_s_contiguous": round(rates["contiguous"], 2),
            "channels_last_speedup": round(rate / rates["contiguous"], 2), **bf16,
            "jpeg_decode_images_per_s": round(decode_rate, 1), **noise,
            "prepare_images_per_s_estimate": round(1 / (1 / rate + 1 / decode_rate), 2), "peak_mb": round(peak_mb())}


def jpeg_noise(records: list, encoder) -> dict:
    """Feature change from saving each photo once more as JPEG (quality 90, as the dataset was made), vs fp16 rounding.

    A yardstick for the cache's float16 error: noise the encoder input already carries.
    """
    import io

    import torch
    from PIL import Image

    from captioner.data.images import load_image, normalise_uint8, uint8_tensor

    original, resaved = [], []
    for r in records:
        img = load_image(r.path)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        original.append(uint8_tensor(img, SIZE))
        resaved.append(uint8_tensor(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), SIZE))
    with torch.inference_mode():
        a = encoder(normalise_uint8(torch.stack(original), encoder.mean, encoder.std))  # (B, L, D)
        b = encoder(normalise_uint8(torch.stack(resaved), encoder.mean, encoder.std))  # (B, L, D)
    fp16 = (a.half().float() - a).abs()
    return {"jpeg_resave_feature_mean_abs_change": float((b - a).abs().mean()), "fp16_feature_mean_abs_error": float(fp16.mean()),
            "fp16_feature_max_abs_error": float(fp16.max()), "feature_mean_abs_value": float(a.abs().mean())}


def _model_and_data(args: argparse.Namespace, store) -> tuple:
    import torch
    from torch.utils.data import DataLoader

    from captioner.data.datasets import CaptionGroups, collate_groups
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import build_model

    records = train_records(args.images)
    vocab = Vocabulary.build((t for r in records for t in r.tokens), min_count=1)
    torch.manual_seed(0)
    model_cfg = {"embed_dim": args.width, "hidden_dim": args.width, "attn_dim": args.width, "cell": "lstm", "num_layers": 1,
                 "dropout": 0.5, "attention": "soft", "beta_gate": True, "deep_output": True, "context_dim": args.context_dim}
    model = build_model(ENCODER_CFG, model_cfg, len(vocab), SIZE)
    groups = CaptionGroups(records, vocab, store, max_len=30)
    loader = DataLoader(groups, batch_size=args.batch, shuffle=False, collate_fn=collate_groups, num_workers=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=4e-4)
    return model, loader, opt


def _train_rate(args: argparse.Namespace, model, loader, opt, features_of) -> dict:
    """Best-of-repeats captions/s of teacher-forced training steps; ``features_of(batch)`` gives (B, L, D)."""

    from captioner.training.losses import caption_loss

    model.train()

    def one_pass() -> tuple[int, float]:
        n, t = 0, time.perf_counter()
        for batch in loader:
            feats = features_of(batch)  # (B, L, D)
            feats = feats.index_select(0, batch["image_of"])  # (N, L, D)
            out = model.decoder(feats, batch["captions"], batch["lengths"])
            loss = caption_loss(out, batch["captions"])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += batch["captions"].shape[0]
        return n, time.perf_counter() - t

    one_pass()  # warm-up (allocations, first page-in of the cache)
    n, best = 0, float("inf")
    for _ in range(args.repeats):
        n, t = one_pass()
        best = min(best, t)
    rate = n / best
    return {"captions_per_s": round(rate, 2), "seconds_per_flickr8k_epoch": round(EPOCH_CAPTIONS / rate), "peak_mb": round(peak_mb())}


def phase_cache(args: argparse.Namespace) -> dict:
    """Decoder training captions/s with features read from the cache."""
    import torch

    from captioner.data.features import open_cache

    records = train_records(args.images)
    store = open_cache(args.cache, json.loads(args.expect), [r.image_id for r in records], dtype=torch.float16)
    model, loader, opt = _model_and_data(args, store)
    return _train_rate(args, model, loader, opt, lambda b: b["images"].float())


def phase_images(args: argparse.Namespace) -> dict:
    """Decoder training captions/s with photos decoded and encoded every step."""
    from captioner.data.datasets import ImageStore
    from captioner.data.images import normalise_uint8

    store = ImageStore(train_records(args.images), SIZE)
    model, loader, opt = _model_and_data(args, store)
    return _train_rate(args, model, loader, opt, lambda b: model.encode(normalise_uint8(b["images"], model.spec.mean, model.spec.std)))


def ensure_cache(args: argparse.Namespace) -> tuple[str, dict, dict]:
    """A cache holding the benchmark images: ``--cache`` if it fits, else a temporary one (timed)."""
    import torch

    from captioner.data.features import FeatureCacheError, open_cache
    from captioner.models.encoder import feature_spec
    from captioner.models.encoder import Encoder
    from captioner.prepare import encode_to_cache

    torch.set_num_threads(args.threads)
    encoder = Encoder(**ENCODER_CFG)
    expect = feature_spec(ENCODER_CFG, SIZE, encoder)
    records = train_records(args.images)
    if args.cache:
        try:
            open_cache(args.cache, expect, [r.image_id for r in records])
            return args.cache, expect, {"cache": args.cache}
        except FeatureCacheError as e:
            print(f"not using --cache: {e}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="bench_features_")
    t = time.perf_counter()
    manifest = encode_to_cache({"train": records}, encoder, expect, tmp, batch_size=32, num_workers=1, progress=False)
    seconds = time.perf_counter() - t
    return tmp, expect, {"cache": "temporary", "prepare_images_per_s": round(len(records) / seconds, 2),
                         "fp16_error": manifest["fp16_error"]}


def main() -> None:
    """Run every phase in a subprocess and print the figures, the last line as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=128, help="training photos used (first N of the train split)")
    p.add_argument("--batch", type=int, default=64, help="images per training step (x5 captions)")
    p.add_argument("--width", type=int, default=512, help="decoder embedding/LSTM/attention width")
    p.add_argument("--context-dim", type=int, default=None, help="model.context_dim (the Flickr8k recipe: 512)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (2 only on a quiet machine)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache", default=str(REPO / "data_cache" / "flickr8k_efficientnet_lite0_last"))
    p.add_argument("--phase", choices=["encoder", "cache", "images"], help=argparse.SUPPRESS)
    p.add_argument("--expect", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.phase:
        import torch

        torch.set_num_threads(args.threads)
        result = {"encoder": phase_encoder, "cache": phase_cache, "images": phase_images}[args.phase](args)
        print(json.dumps(result))
        return

    if not (FLICKR8K / "Flicker8k_Dataset").is_dir():
        print(f"skipped: Flickr8k photos not found under {FLICKR8K} (set FLICKR8K=/path/to/flickr8k)")
        print(json.dumps({"skipped": f"no Flickr8k at {FLICKR8K}"}))
        return
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; threads={args.threads}", flush=True)
    t0 = time.perf_counter()
    cache, expect, cache_info = ensure_cache(args)
    print(f"cache: {cache_info}", flush=True)
    common = [f"--images={args.images}", f"--batch={args.batch}", f"--width={args.width}", f"--threads={args.threads}",
              f"--repeats={args.repeats}", f"--cache={cache}", f"--expect={json.dumps(expect)}"]
    if args.context_dim:
        common.append(f"--context-dim={args.context_dim}")
    results: dict = {}
    for phase in ("encoder", "cache", "images"):
        r = subprocess.run([sys.executable, __file__, f"--phase={phase}", *common], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if r.returncode != 0:
            raise SystemExit(f"phase {phase} failed:\n{r.stderr[-3000:]}")
        results[phase] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{phase:8s} {results[phase]}", flush=True)
    enc, c, im = results["encoder"], results["cache"], results["images"]
    summary = {
        "threads": args.threads, "load_average_1m": round(load[0], 2), "images": args.images, "batch_images": args.batch,
        "decoder_width": args.width,
        "encoder_images_per_s": enc["encoder_images_per_s"],
        **{k: v for k, v in enc.items() if k.startswith(("encoder_images_per_s_bf16", "bf16_"))},
        "jpeg_decode_images_per_s": enc["jpeg_decode_images_per_s"],
        "prepare_flickr8k_minutes_estimate": round(8091 / enc["prepare_images_per_s_estimate"] / 60, 1),
        "train_captions_per_s_cache": c["captions_per_s"], "train_captions_per_s_images": im["captions_per_s"],
        "cache_vs_images_speedup": round(c["captions_per_s"] / im["captions_per_s"], 1),
        "seconds_per_flickr8k_epoch_cache": c["seconds_per_flickr8k_epoch"],
        "seconds_per_flickr8k_epoch_images": im["seconds_per_flickr8k_epoch"],
        "peak_mb_encoder": enc["peak_mb"], "peak_mb_train_cache": c["peak_mb"], "peak_mb_train_images": im["peak_mb"],
        **{k: v for k, v in cache_info.items() if k != "fp16_error"},
        "fp16_feature_max_abs_error": enc["fp16_feature_max_abs_error"], "fp16_feature_mean_abs_error": enc["fp16_feature_mean_abs_error"],
        "jpeg_resave_feature_mean_abs_change": enc["jpeg_resave_feature_mean_abs_change"],
        "feature_mean_abs_value": enc["feature_mean_abs_value"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    if cache_info["cache"] == "temporary":
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
