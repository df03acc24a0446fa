"""The training job: data, model, optimiser, epochs of teacher forcing, validation by real decoding, test."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.config import DataConfig, DecodeConfig, TrainConfig, to_dict
from captioner.data.datasets import CaptionGroups, EpochSampler, ImageStore, ImagesOnly, collate_groups, collate_images, pad_captions
from captioner.data.images import normalise_uint8
from captioner.data.sources import ImageRecord, read_records
from captioner.data.vocab import Vocabulary
from captioner.decoding import Caption, decode
from captioner.metrics.localisation import localisation_scores
from captioner.models.captioner import Captioner, build_model
from captioner.training.distributed import (
    DistInfo, all_reduce_sum, any_rank, average_gradients, barrier, broadcast_parameters, gather_objects, init_distributed,
)
from captioner.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from captioner.training.ema import WeightAverage
from captioner.training.losses import caption_loss

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Data
@dataclass
class DataBundle:
    """Records per split, the vocabulary and the image stores."""

    records: dict[str, list[ImageRecord]]
    vocab: Vocabulary
    stores: dict[str, ImageStore]


def load_records(cfg: DataConfig) -> dict[str, list[ImageRecord]]:
    """Read (and for the shapes world, generate if asked) the dataset; records grouped by split."""
    root = Path(cfg.root).expanduser()
    if cfg.generate and cfg.name == "shapes":
        from captioner.data.shapes import generate_shapes

        s = cfg.shapes
        generate_shapes(root, n_train=s.n_train, n_val=s.n_val, n_test=s.n_test, image_size=s.image_size,
                        seed=s.seed, min_objects=s.min_objects, max_objects=s.max_objects)
    records = read_records(cfg.format, root, cfg.annotations, cfg.image_root)
    by_split: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        if r.split in by_split:
            by_split[r.split].append(r)
    for split, limit in (("train", cfg.limit_train), ("val", cfg.limit_val), ("test", cfg.limit_test)):
        if limit is not None:
            by_split[split] = by_split[split][:limit]
    if not by_split["train"]:
        raise ValueError(f"{root}: the dataset has no training images")
    return by_split


def build_data(cfg: DataConfig, vocab: Vocabulary | None = None, progress: bool = False, encoder_cfg: Any = None,
               encoder: Any = None) -> DataBundle:
    """Records, vocabulary (built from the training captions unless given) and image (or cached feature) stores.

    With ``cfg.features`` set, the stores read a feature cache made by ``scripts/prepare_data.py`` with the
    frozen encoder ``encoder`` (built from ``encoder_cfg``); a cache made with another encoder, weights,
    grid or transform is refused. Without an encoder config the stores are left empty (filled later).
    """
    records = load_records(cfg)
    if vocab is None:
        vocab = Vocabulary.build((t for r in records["train"] for t in r.tokens), min_count=cfg.min_word_count)
    data = DataBundle(records, vocab, {})
    if not cfg.features:
        data.stores = {s: ImageStore(rs, cfg.image_size, preload=cfg.preload, progress=progress) for s, rs in records.items() if rs}
    elif encoder_cfg is not None:
        data.stores = feature_stores(cfg, records, encoder_cfg, encoder)
    return data


def feature_stores(cfg: DataConfig, records: dict[str, list[ImageRecord]], encoder_cfg: Any, encoder: Any = None) -> dict[str, Any]:
    """Open the feature cache ``cfg.features`` for every split, checked against the encoder that must have made it."""
    from captioner.data.features import feature_spec, open_cache

    expect = feature_spec(encoder_cfg, cfg.image_size, encoder)
    return {s: open_cache(cfg.features, expect, [r.image_id for r in rs], data_name=cfg.name) for s, rs in records.items() if rs}


def references(records: Sequence[ImageRecord]) -> dict[str, list[str]]:
    """Raw reference captions by image id."""
    return {r.image_id: list(r.captions) for r in records}


# --------------------------------------------------------------------------------------------------
# Evaluation
def model_input(x: Tensor, model: Captioner, device: torch.device) -> Tensor:
    """A loader tensor ready for ``model.encode``: uint8 images are normalised, cached features pass through."""
    x = x.to(device, non_blocking=True)
    if x.dim() == 3:  # (B, L, D) features from a cache
        return x.to(torch.get_default_dtype())
    return normalise_uint8(x, model.spec.mean, model.spec.std)  # (B, 3, H, W)


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def decode_split(model: Captioner, store: ImageStore, vocab: Vocabulary, decode_cfg: DecodeConfig, batch_size: int,
                 device: torch.device, progress: bool = False, info: DistInfo | None = None) -> list[Caption]:
    """Decode every image of a store, in order.

    Distributed, each rank decodes every world_size-th image and the captions are gathered on all
    ranks, each image exactly once.
    """
    if info is not None and info.enabled:
        mine = list(range(info.rank, len(store), info.world_size))
        caps = decode_split(model, _Subset(store, mine), vocab, decode_cfg, batch_size, device, progress and info.is_main)
        merged: dict[int, Caption] = {}
        for idx, part in gather_objects((mine, caps), info):
            merged.update(zip(idx, part))
        return [merged[i] for i in range(len(store))]
    was_training = model.training
    model.eval()
    loader = DataLoader(ImagesOnly(store), batch_size=batch_size, shuffle=False, collate_fn=collate_images)
    captions: list[Caption] = []
    for batch in tqdm(loader, desc="decoding", disable=not progress, leave=False):
        captions.extend(decode(model.decoder, model.encode(model_input(batch["images"], model, device)), vocab, decode_cfg))
    model.train(was_training)
    return captions


class _Subset:
    """Some images of a store, in the given order (the store interface: len and indexing)."""

    def __init__(self, store: Any, indices: Sequence[int]):
        self.store, self.indices = store, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:
        return self.store[self.indices[i]]


def score(records: Sequence[ImageRecord], captions: Sequence[Caption]) -> dict[str, float]:
    """COCO metrics of decoded captions against the records' references."""
    from captioner.metrics import evaluate

    hyps = {r.image_id: c.text for r, c in zip(records, captions)}
    return evaluate(references(records), hyps)


@torch.no_grad()
def attention_localisation(model: Captioner, records: Sequence[ImageRecord], store: ImageStore, vocab: Vocabulary,
                           batch_size: int, device: torch.device, max_len: int = 30) -> dict[str, float] | None:
    """Localisation of the attention peak under teacher forcing (records need shapes-world boxes)."""
    if not records or "objects" not in records[0].extra or model.decoder.attention is None:
        return None
    model.eval()
    attend = "argmax" if model.decoder.attention_type == "hard" else None
    alphas, ids, boxes = [], [], []
    image_hw = None
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = torch.stack([store[start + i] for i in range(len(chunk))])
        feats = model.encode(model_input(images, model, device))  # (B, L, D)
        enc = [vocab.encode(t, max_len) for r in chunk for t in r.tokens]
        image_of = torch.tensor([i for i, r in enumerate(chunk) for _ in r.tokens], device=device)
        caps, lengths = pad_captions(enc)
        out = model.decoder(feats.index_select(0, image_of), caps.to(device), lengths.to(device), attend=attend)
        k = 0
        for r in chunk:
            for c, toks in enumerate(r.tokens):
                n = min(len(toks), max_len)
                alphas.append(out.alphas[k, :n].cpu())  # step t emits token t
                ids.append(r.extra["object_ids"][c][:n])
                boxes.append([o["bbox"] for o in r.extra["objects"]])
                k += 1
        if image_hw is None:
            from PIL import Image

            with Image.open(chunk[0].path) as im:
                image_hw = (im.height, im.width)
    L = alphas[0].size(-1)
    g = int(round(math.sqrt(L)))
    return localisation_scores(alphas, ids, boxes, (g, L // g), image_hw)


# --------------------------------------------------------------------------------------------------
# Training
def make_optimizer(model: Captioner, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; a fine-tuned encoder gets its own learning rate."""
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": cfg.optim.lr}]
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    if enc:
        groups.append({"params": enc, "lr": cfg.optim.encoder_lr})
    return torch.optim.Adam(groups, weight_decay=cfg.optim.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR multiplier: linear warm-up, then cosine / step decay / constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    o = cfg.optim

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.scheduler == "cosine":
            p = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p))
        if o.scheduler == "step":
            return o.gamma ** (step // max(1, o.step_size * steps_per_epoch))
        if o.scheduler == "none":
            return 1.0
        raise ValueError(f"unknown optim.scheduler {o.scheduler!r}; expected cosine, step or none")

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states (plain values, safe for weights_only loading)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, inner, gauss = state["python"]
    random.setstate((v, tuple(inner), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; the message says how to resume."""


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked between steps, so the current step finishes cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == 2:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %d: finishing the current step, then writing a checkpoint", signum)

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Progress:
    """Where training is: the epoch in progress, batches done in it, and its running loss sums."""

    epoch: int
    batch: int = 0
    totals: dict[str, float] | None = None
    global_step: int = 0


def make_loader(data: DataBundle, cfg: TrainConfig, info: DistInfo) -> tuple[DataLoader, EpochSampler]:
    """The training loader (images with their captions) of this rank, and its sampler (``set_epoch`` before each epoch)."""
    groups = CaptionGroups(data.records["train"], data.vocab, data.stores["train"], cfg.data.max_caption_len,
                           cfg.data.captions_per_image)
    sampler = EpochSampler(len(groups), cfg.seed, info.rank, info.world_size)
    # A private generator: the loader must not draw from the global RNG, or a resumed run would diverge.
    loader = DataLoader(groups, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate_groups,
                        num_workers=cfg.data.num_workers, drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


def train_one_epoch(model: Captioner, loader: DataLoader, opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig,
                    device: torch.device, progress: Progress, stop: StopFlag | None = None, deadline: float | None = None,
                    baseline: Any = None, on_step: Any = None, info: DistInfo | None = None,
                    ema: WeightAverage | None = None) -> dict[str, float]:
    """One (rest of an) epoch of teacher forcing; updates ``progress``; returns mean loss terms.

    Returns early when ``stop`` is raised or at ``deadline``. ``on_step(progress)`` runs after every step.
    A non-finite loss raises ``FloatingPointError`` before any parameter is touched.
    """
    model.train()
    totals = progress.totals if progress.totals is not None else {}
    progress.totals = totals
    bar = tqdm(loader, desc=f"epoch {progress.epoch}", disable=not cfg.progress, leave=False, mininterval=2.0,
               initial=progress.batch, total=progress.batch + len(loader))
    for batch in bar:
        images = model_input(batch["images"], model, device)  # normalised images, or cached features
        captions, lengths, image_of = batch["captions"].to(device), batch["lengths"].to(device), batch["image_of"].to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
        if model.decoder.attention_type == "hard":
            from captioner.training.reinforce import hard_attention_loss

            mcfg = cfg.model
            if progress.epoch <= mcfg.soft_epochs:  # soft warm-up: the expected context only
                mcfg = dataclasses.replace(mcfg, soft_mix=1.0)
            with autocast:
                losses = hard_attention_loss(model, images, captions, lengths, image_of, mcfg, baseline)
        else:
            with autocast:
                out = model(images, captions, lengths, image_of)
            token_total = None
            if info is not None and info.enabled:
                # Normalise by the global batch's tokens, times world_size because gradients are averaged.
                tokens = all_reduce_sum(captions[:, 1:].ne(0).sum().double().cpu(), info)
                token_total = float(tokens) / info.world_size
            losses = caption_loss(out, captions, cfg.model.doubly_stochastic, token_total=token_total,
                                  smoothing=cfg.optim.label_smoothing)
        loss = losses["loss"]
        if any_rank(not bool(torch.isfinite(loss)), info or DistInfo()):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at epoch {progress.epoch}, batch {progress.batch + 1} "
                f"(global step {progress.global_step + 1})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, info or DistInfo())
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        progress.batch += 1
        progress.global_step += 1
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        if progress.batch % cfg.log_every == 0:
            bar.set_postfix(loss=f"{totals['loss'] / progress.batch:.3f}")
        if on_step is not None:
            on_step(progress)
        if stop is not None and any_rank(stop.signal is not None, info or DistInfo()):
            stop.signal = stop.signal or 15  # every rank stops at the same step
            break
        if deadline is not None and time.time() > deadline:
            log.info("time budget reached during epoch %d after %d batches", progress.epoch, progress.batch)
            break
    bar.close()
    return {k: v / max(progress.batch, 1) for k, v in totals.items()}


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train, validate by real decoding with early stopping, test the best checkpoint; returns test metrics.

    Interrupted by SIGTERM/SIGINT, it finishes the step, writes ``last.pt`` (mid-epoch position
    included) and raises :class:`TrainingInterrupted`; ``resume=auto`` continues exactly where it stopped.
    """
    t0 = time.time()
    info = init_distributed(cfg.device)
    # Under torchrun every rank composes its own Hydra run dir (timestamps can differ): use rank 0's.
    out_dir = Path(gather_objects(cfg.output_dir, info)[0])
    main = info.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        logging.getLogger("captioner").setLevel(logging.WARNING)  # rank 0 logs for everyone
        cfg.progress = False
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    resume_path = None
    if cfg.resume == "auto":
        resume_path = out_dir / "last.pt" if (out_dir / "last.pt").is_file() else None
    elif cfg.resume:
        resume_path = Path(cfg.resume)
    ckpt = load_checkpoint(resume_path) if resume_path else None

    data = build_data(cfg.data, vocab=Vocabulary(ckpt["vocab"]) if ckpt else None, progress=cfg.progress)
    vocab = data.vocab
    log.info("data: %s, %d/%d/%d images, vocabulary %d words", cfg.data.name,
             *(len(data.records[s]) for s in ("train", "val", "test")), len(vocab))
    if main:
        vocab.save(out_dir / "vocab.json")

    model = build_model(cfg.encoder, cfg.model, len(vocab), cfg.data.image_size).to(device)
    if cfg.data.features:  # features come from a cache made with exactly this (frozen) encoder
        from captioner.data.features import read_manifest

        if cfg.data.build_features and read_manifest(cfg.data.features) is None and main:
            from captioner.prepare import PrepareConfig, prepare

            log.info("no feature cache at %s yet: encoding the dataset once", cfg.data.features)
            prepare(PrepareConfig(data=cfg.data, encoder=cfg.encoder, cache_dir=cfg.data.features,
                                  num_workers=max(cfg.data.num_workers, 0), device=str(device), progress=cfg.progress,
                                  threads=cfg.threads))
        barrier(info)
        data.stores = feature_stores(cfg.data, data.records, cfg.encoder, model.encoder)
        log.info("reading encoder features from the cache %s", cfg.data.features)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: %s encoder (%s), %s decoder with %s attention, %d trainable parameters",
             cfg.encoder.name, "frozen" if cfg.encoder.freeze else "trained", cfg.model.cell, cfg.model.attention, n_params)

    loader, sampler = make_loader(data, cfg, info)
    groups = loader.dataset
    steps_per_epoch = math.ceil(sampler.per_rank / cfg.data.batch_size)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    ema = WeightAverage(unwrap(model), cfg.optim.ema) if cfg.optim.ema else None

    baseline = None
    if cfg.model.attention == "hard":
        from captioner.training.reinforce import ReinforceBaseline

        baseline = ReinforceBaseline(cfg.model.baseline_decay)
    progress, best, bad_epochs = Progress(epoch=1), -math.inf, 0
    if ckpt:
        try:
            unwrap(model).load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{resume_path}: does not match this run's model or optimizer ({str(e).splitlines()[0][:200]})") from None
        p = ckpt.get("progress") or {"epoch": int(ckpt["epoch"]) + 1, "batch": 0, "totals": None, "global_step": 0}
        progress = Progress(int(p["epoch"]), int(p["batch"]), p["totals"], int(p["global_step"]))
        best, bad_epochs = float(ckpt["best"]), int(ckpt["bad_epochs"])
        set_rng_state(ckpt["rng"])
        if baseline is not None and ckpt.get("baseline") is not None:
            baseline.load_state_dict(ckpt["baseline"])
        if ema is not None:
            if ckpt.get("ema") is None:
                raise CheckpointError(f"{resume_path}: has no weight average but this run has optim.ema={cfg.optim.ema}")
            ema.load_state_dict(ckpt["ema"])
        log.info("resumed from %s at epoch %d, batch %d (best %s %.4f)", resume_path, progress.epoch, progress.batch, cfg.val_metric, best)

    metrics_file = out_dir / "metrics.jsonl"
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else None
    config_dict = to_dict(cfg)

    broadcast_parameters(model, info)
    if cfg.compile and device.type == "cuda":
        # The step is the hot loop and has static shapes per batch; compiling it leaves checkpoints unchanged.
        model.decoder.step = torch.compile(model.decoder.step)  # type: ignore[method-assign]

    def save(path: Path, record: dict[str, Any] | None = None, averaged: bool = False) -> None:
        """Write a checkpoint; ``averaged`` stores the weight average as the model (best.pt)."""
        if not main:
            return
        if averaged and ema is not None:
            with ema.swapped():
                return save(path, record)
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": progress.epoch - 1,
                 "progress": {"epoch": progress.epoch, "batch": progress.batch, "totals": progress.totals, "global_step": progress.global_step},
                 "best": best, "bad_epochs": bad_epochs, "rng": rng_state(), "metrics": record, "config": config_dict,
                 "baseline": baseline.state_dict() if baseline is not None else None,
                 "ema": ema.state_dict() if ema is not None else None}
        save_checkpoint(path, model, vocab, **state)

    def on_step(p: Progress) -> None:
        if cfg.save_every and p.global_step % cfg.save_every == 0:
            save(out_dir / "last.pt")

    stopped_early = False
    with StopFlag() as stop:
        while progress.epoch <= cfg.epochs and not stopped_early:
            epoch = progress.epoch
            sampler.set_epoch(epoch, start=progress.batch * cfg.data.batch_size)
            groups.set_epoch(epoch)
            te = time.time()
            try:
                train_stats = train_one_epoch(model, loader, opt, sched, cfg, device, progress, stop, deadline, baseline, on_step,
                                              info, ema)
            except FloatingPointError as e:
                last = out_dir / "last.pt"
                kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
                raise FloatingPointError(f"{e}; training stopped, {kept} (try a lower optim.lr or optim.grad_clip)") from None
            if stop.signal is not None and progress.batch < steps_per_epoch:
                save(out_dir / "last.pt")
                raise TrainingInterrupted(
                    f"interrupted by signal {stop.signal} at epoch {epoch}, batch {progress.batch}/{steps_per_epoch}; "
                    f"checkpoint written to {out_dir / 'last.pt'}. Resume with the same command plus "
                    f"resume=auto hydra.run.dir={out_dir}"
                )
            record: dict[str, Any] = {"epoch": epoch, "train": train_stats, "lr": opt.param_groups[0]["lr"],
                                      "epoch_seconds": round(time.time() - te, 1)}
            improved = False
            if data.records["val"] and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
                with ema.swapped() if ema is not None else contextlib.nullcontext():
                    caps = decode_split(model, data.stores["val"], vocab, cfg.decode, cfg.data.eval_batch_size, device, info=info)
                val = score(data.records["val"], caps)
                record["val"] = val
                if cfg.val_metric not in val:
                    raise KeyError(f"val_metric {cfg.val_metric!r} is not one of {sorted(val)}")
                if val[cfg.val_metric] > best:
                    best, bad_epochs, improved = val[cfg.val_metric], 0, True
                else:
                    bad_epochs += 1
            else:
                improved = not data.records["val"]
            progress.epoch, progress.batch, progress.totals = epoch + 1, 0, None
            save(out_dir / "last.pt", record)
            if improved:
                save(out_dir / "best.pt", record, averaged=True)
            if main:
                with metrics_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            val_txt = f", val {cfg.val_metric} {record['val'][cfg.val_metric]:.4f}" if "val" in record else ""
            log.info("epoch %d: loss %.4f%s (%.0fs)", epoch, train_stats.get("loss", float("nan")), val_txt, record["epoch_seconds"])
            if data.records["val"] and bad_epochs >= cfg.patience:
                log.info("early stopping: no %s improvement for %d epochs", cfg.val_metric, bad_epochs)
                stopped_early = True
            if deadline is not None and time.time() > deadline:
                log.info("stopping: max_minutes=%s reached", cfg.max_minutes)
                stopped_early = True
            if stop.signal is not None:  # the signal came on the epoch's last step: the checkpoint is complete
                raise TrainingInterrupted(
                    f"interrupted by signal {stop.signal} after epoch {epoch}; checkpoint written to {out_dir / 'last.pt'}. "
                    f"Resume with the same command plus resume=auto hydra.run.dir={out_dir}"
                )

    results: dict[str, float] = {}
    if cfg.test and data.records["test"]:
        barrier(info)  # rank 0 has finished writing best.pt
        best_path = out_dir / "best.pt" if (out_dir / "best.pt").is_file() else out_dir / "last.pt"
        unwrap(model).load_state_dict(load_checkpoint(best_path)["model"])
        caps = decode_split(model, data.stores["test"], vocab, cfg.decode, cfg.data.eval_batch_size, device, info=info)
        results = score(data.records["test"], caps)
        if cfg.localisation and main:
            loc = attention_localisation(model, data.records["test"], data.stores["test"], vocab, cfg.data.eval_batch_size,
                                         device, cfg.data.max_caption_len)
            if loc:
                results.update(loc)
        for k in cfg.test_beam_sizes:
            beam_cfg = dataclasses.replace(cfg.decode, strategy="beam", beam_size=k)
            beam_caps = decode_split(model, data.stores["test"], vocab, beam_cfg, cfg.data.eval_batch_size, device, info=info)
            results.update({f"beam{k}/{m}": v for m, v in score(data.records["test"], beam_caps).items()})
        results["train_minutes"] = round((time.time() - t0) / 60, 2)
        if main:
            coco = [{"image_id": r.image_id, "caption": c.text} for r, c in zip(data.records["test"], caps)]
            (out_dir / "test_captions.json").write_text(json.dumps(coco, indent=1))
            (out_dir / "test_metrics.json").write_text(json.dumps(results, indent=1))
        log.info("test: %s", ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results
