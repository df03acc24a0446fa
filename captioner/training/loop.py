"""The training job, in plain sight: set-up, epochs of ``train_one_epoch`` + ``evaluate``, then the test.

Everything a step needs comes from elsewhere: data assembly from ``captioner.data.build``, the loss from
``training.losses`` (one objective for soft, hard and Show-and-Tell), validation and testing from
``captioner.evaluation``, optimiser and schedule from ``training.optim``, resume state from
``training.state``, checkpoints from ``captioner.models.checkpoint``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.config import TrainConfig, to_dict
from captioner.data.build import DataBundle, build_data, open_feature_stores
from captioner.data.datasets import CaptionGroups, EpochSampler, collate_groups
from captioner.data.vocab import Vocabulary
from captioner.distributed import (
    DistInfo, any_rank, average_gradients, barrier, broadcast_parameters, gather_objects, init_distributed,
)
from captioner.evaluation import evaluate
from captioner.models.captioner import Captioner, build_model
from captioner.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from captioner.models.encoder import feature_spec
from captioner.training.ema import WeightAverage
from captioner.training.losses import CaptionObjective
from captioner.training.optim import make_optimizer, make_scheduler
from captioner.training.state import Progress, StopFlag, TrainingInterrupted, rng_state, set_rng_state
from captioner.utils import pick_device

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything one training run holds; ``train`` is the loop over it."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    out_dir: Path
    data: DataBundle
    model: Captioner
    loader: DataLoader
    sampler: EpochSampler
    opt: torch.optim.Optimizer
    sched: Any
    objective: Any
    ema: WeightAverage | None
    progress: Progress = field(default_factory=lambda: Progress(epoch=1))
    best: float = -math.inf
    bad_epochs: int = 0
    t0: float = field(default_factory=time.time)
    epoch_started: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.sampler.per_rank / self.cfg.data.batch_size)

    @property
    def deadline(self) -> float | None:
        return self.t0 + self.cfg.max_minutes * 60 if self.cfg.max_minutes else None

    def averaged(self) -> Any:
        """Context in which the model holds the weight average (validation, test, best.pt), if there is one."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train, validate by real decoding with early stopping, test the best checkpoint; returns test metrics.

    Interrupted by SIGTERM/SIGINT, it finishes the step, writes ``last.pt`` (mid-epoch position
    included) and raises :class:`TrainingInterrupted`; ``resume=auto`` continues exactly where it stopped.
    """
    job = setup(cfg)
    with StopFlag() as stop:
        while job.progress.epoch <= cfg.epochs:
            stats = run_epoch(job, stop)
            record = end_of_epoch(job, stats)
            if should_stop(job, record, stop):
                break
    return test(job) if cfg.test and job.data.records["test"] else {}


# --------------------------------------------------------------------------------------------------
# Set-up
def setup(cfg: TrainConfig) -> Job:
    """Process group, run directory, seeds, data, model, optimiser and (with ``resume``) the saved state."""
    t0 = time.time()
    info = init_distributed(cfg.device)
    # Under torchrun every rank composes its own Hydra run dir (timestamps can differ): use rank 0's.
    out_dir = Path(gather_objects(cfg.output_dir, info)[0])
    if info.is_main:
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

    resume_path = resume_checkpoint_path(cfg, out_dir)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    data = build_data(cfg.data, vocab=Vocabulary(ckpt["vocab"]) if ckpt else None, progress=cfg.progress)
    log.info("data: %s, %d/%d/%d images, vocabulary %d words", cfg.data.name,
             *(len(data.records[s]) for s in ("train", "val", "test")), len(data.vocab))
    if info.is_main:
        data.vocab.save(out_dir / "vocab.json")
    model = build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size).to(device)
    if cfg.data.features:
        attach_feature_cache(cfg, data, model, info, device)
    log.info("model: %s encoder (%s), %s decoder with %s attention, %d trainable parameters", cfg.encoder.name,
             "frozen" if cfg.encoder.freeze else "trained", cfg.model.cell, cfg.model.attention,
             sum(p.numel() for p in model.parameters() if p.requires_grad))

    loader, sampler = make_loader(data, cfg, info)
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, cfg.epochs, math.ceil(sampler.per_rank / cfg.data.batch_size))
    ema = WeightAverage(unwrap(model), cfg.optim.ema) if cfg.optim.ema else None
    job = Job(cfg, info, device, out_dir, data, model, loader, sampler, opt, sched,
              CaptionObjective(cfg.loss, model.decoder.attention_type), ema, t0=t0)
    if ckpt:
        restore(job, ckpt, resume_path)
    broadcast_parameters(model, info)
    if cfg.compile and device.type == "cuda":
        # The step is the hot loop and has static shapes per batch; compiling it leaves checkpoints unchanged.
        model.decoder.step = torch.compile(model.decoder.step)  # type: ignore[method-assign]
    return job


def resume_checkpoint_path(cfg: TrainConfig, out_dir: Path) -> Path | None:
    """``resume=auto``: ``last.pt`` of the run directory if there is one; ``resume=PATH``: that file."""
    if cfg.resume == "auto":
        return out_dir / "last.pt" if (out_dir / "last.pt").is_file() else None
    return Path(cfg.resume) if cfg.resume else None


def attach_feature_cache(cfg: TrainConfig, data: DataBundle, model: Captioner, info: DistInfo, device: torch.device) -> None:
    """Read features from ``cfg.data.features``, made with exactly this (frozen) encoder; build it first if missing."""
    from captioner.data.features import read_manifest

    if cfg.data.build_features and read_manifest(cfg.data.features) is None and info.is_main:
        from captioner.prepare import PrepareConfig, prepare

        log.info("no feature cache at %s yet: encoding the dataset once", cfg.data.features)
        prepare(PrepareConfig(data=cfg.data, encoder=cfg.encoder, cache_dir=cfg.data.features,
                              num_workers=max(cfg.data.num_workers, 0), device=str(device), progress=cfg.progress,
                              threads=cfg.threads))
    barrier(info)
    data.stores = open_feature_stores(cfg.data, data.records, feature_spec(cfg.encoder, cfg.data.image_size, model.encoder))
    log.info("reading encoder features from the cache %s", cfg.data.features)


def make_loader(data: DataBundle, cfg: TrainConfig, info: DistInfo) -> tuple[DataLoader, EpochSampler]:
    """The training loader (images with their captions) of this rank, and its sampler (``set_epoch`` before each epoch)."""
    groups = CaptionGroups(data.records["train"], data.vocab, data.stores["train"], cfg.data.max_caption_len,
                           cfg.data.captions_per_image)
    sampler = EpochSampler(len(groups), cfg.seed, info.rank, info.world_size)
    # A private generator: the loader must not draw from the global RNG, or a resumed run would diverge.
    loader = DataLoader(groups, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate_groups,
                        num_workers=cfg.data.num_workers, drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


def restore(job: Job, ckpt: dict[str, Any], path: Path) -> None:
    """Continue from a checkpoint written by this job: weights, optimiser, schedule, position, RNG, baselines, EMA."""
    try:
        unwrap(job.model).load_state_dict(ckpt["model"])
        job.opt.load_state_dict(ckpt["optimizer"])
        job.sched.load_state_dict(ckpt["scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: does not match this run's model or optimizer ({str(e).splitlines()[0][:200]})") from None
    p = ckpt.get("progress") or {"epoch": int(ckpt["epoch"]) + 1, "batch": 0, "totals": None, "global_step": 0}
    job.progress = Progress(int(p["epoch"]), int(p["batch"]), p["totals"], int(p["global_step"]))
    job.best, job.bad_epochs = float(ckpt["best"]), int(ckpt["bad_epochs"])
    set_rng_state(ckpt["rng"])
    job.objective.load_state_dict(ckpt.get("baseline"))
    if job.ema is not None:
        if ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: has no weight average but this run has optim.ema={job.cfg.optim.ema}")
        job.ema.load_state_dict(ckpt["ema"])
    log.info("resumed from %s at epoch %d, batch %d (best %s %.4f)", path, job.progress.epoch, job.progress.batch,
             job.cfg.val_metric, job.best)


def save(job: Job, name: str, record: dict[str, Any] | None = None, averaged: bool = False) -> None:
    """Write ``out_dir/name`` on rank 0; ``averaged`` stores the weight average as the model (best.pt)."""
    if not job.info.is_main:
        return
    with job.averaged() if averaged else contextlib.nullcontext():
        p = job.progress
        state = {"optimizer": job.opt.state_dict(), "scheduler": job.sched.state_dict(), "epoch": p.epoch - 1,
                 "progress": {"epoch": p.epoch, "batch": p.batch, "totals": p.totals, "global_step": p.global_step},
                 "best": job.best, "bad_epochs": job.bad_epochs, "rng": rng_state(), "metrics": record,
                 "config": to_dict(job.cfg), "baseline": job.objective.state_dict(),
                 "ema": job.ema.state_dict() if job.ema is not None else None}
        save_checkpoint(job.out_dir / name, job.model, job.data.vocab, **state)


# --------------------------------------------------------------------------------------------------
# One epoch
def train_one_epoch(model: Captioner, loader: DataLoader, opt: torch.optim.Optimizer, sched: Any, objective: Any,
                    cfg: TrainConfig, device: torch.device, progress: Progress, *, stop: StopFlag | None = None,
                    deadline: float | None = None, on_step: Any = None, info: DistInfo | None = None,
                    ema: WeightAverage | None = None) -> dict[str, float]:
    """One (rest of an) epoch; updates ``progress``; returns the mean of each loss term.

    ``objective(model, batch, epoch, info)`` gives the loss terms of a batch (the same call for every
    attention type). Returns early when ``stop`` is raised or at ``deadline``. ``on_step(progress)`` runs
    after every step. A non-finite loss raises ``FloatingPointError`` before any parameter is touched.
    """
    info = info or DistInfo()
    model.train()
    totals = progress.totals if progress.totals is not None else {}
    progress.totals = totals
    bar = tqdm(loader, desc=f"epoch {progress.epoch}", disable=not cfg.progress, leave=False, mininterval=2.0,
               initial=progress.batch, total=progress.batch + len(loader))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    for batch in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            losses = objective(model, batch, progress.epoch, info)
        loss = losses["loss"]
        if any_rank(not bool(torch.isfinite(loss)), info):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {progress.epoch}, batch {progress.batch + 1} "
                                     f"(global step {progress.global_step + 1})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, info)
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
        if stop is not None and any_rank(stop.signal is not None, info):
            stop.signal = stop.signal or 15  # every rank stops at the same step
            break
        if deadline is not None and time.time() > deadline:
            log.info("time budget reached during epoch %d after %d batches", progress.epoch, progress.batch)
            break
    bar.close()
    return {k: v / max(progress.batch, 1) for k, v in totals.items()}


def run_epoch(job: Job, stop: StopFlag) -> dict[str, float]:
    """Train the current epoch (or its rest, after a resume); an interruption mid-epoch saves and raises."""
    cfg, p = job.cfg, job.progress
    job.epoch_started = time.time()
    job.sampler.set_epoch(p.epoch, start=p.batch * cfg.data.batch_size)
    job.loader.dataset.set_epoch(p.epoch)

    def on_step(progress: Progress) -> None:
        if cfg.save_every and progress.global_step % cfg.save_every == 0:
            save(job, "last.pt")

    try:
        stats = train_one_epoch(job.model, job.loader, job.opt, job.sched, job.objective, cfg, job.device, p, stop=stop,
                                deadline=job.deadline, on_step=on_step, info=job.info, ema=job.ema)
    except FloatingPointError as e:
        last = job.out_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
        raise FloatingPointError(f"{e}; training stopped, {kept} (try a lower optim.lr or optim.grad_clip)") from None
    if stop.signal is not None and p.batch < job.steps_per_epoch:
        save(job, "last.pt")
        raise TrainingInterrupted(
            f"interrupted by signal {stop.signal} at epoch {p.epoch}, batch {p.batch}/{job.steps_per_epoch}; "
            f"checkpoint written to {job.out_dir / 'last.pt'}. Resume with the same command plus "
            f"resume=auto hydra.run.dir={job.out_dir}")
    return stats


def end_of_epoch(job: Job, stats: dict[str, float]) -> dict[str, Any]:
    """Validate (by real decoding), keep the best, write checkpoints and the epoch's metrics line."""
    cfg, epoch = job.cfg, job.progress.epoch
    record: dict[str, Any] = {"epoch": epoch, "train": stats, "lr": job.opt.param_groups[0]["lr"]}
    improved = not job.data.records["val"]
    if job.data.records["val"] and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
        with job.averaged():
            val = evaluate(job.model, job.data.split("val"), job.data.vocab, cfg.decode, batch_size=cfg.data.eval_batch_size,
                           device=job.device, info=job.info).metrics
        record["val"] = val
        if cfg.val_metric not in val:
            raise KeyError(f"val_metric {cfg.val_metric!r} is not one of {sorted(val)}")
        improved = val[cfg.val_metric] > job.best
        job.best, job.bad_epochs = (val[cfg.val_metric], 0) if improved else (job.best, job.bad_epochs + 1)
    record["epoch_seconds"] = round(time.time() - job.epoch_started, 1)
    job.progress = Progress(epoch + 1, 0, None, job.progress.global_step)
    save(job, "last.pt", record)
    if improved:
        save(job, "best.pt", record, averaged=True)
    if job.info.is_main:
        with (job.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    val_txt = f", val {cfg.val_metric} {record['val'][cfg.val_metric]:.4f}" if "val" in record else ""
    log.info("epoch %d: loss %.4f%s (%.0fs)", epoch, stats.get("loss", float("nan")), val_txt, record["epoch_seconds"])
    return record


def should_stop(job: Job, record: dict[str, Any], stop: StopFlag) -> bool:
    """Early stopping, the time budget, or a signal that came on the epoch's last step (then raise)."""
    cfg = job.cfg
    if stop.signal is not None:  # the checkpoint just written is complete
        raise TrainingInterrupted(
            f"interrupted by signal {stop.signal} after epoch {record['epoch']}; checkpoint written to "
            f"{job.out_dir / 'last.pt'}. Resume with the same command plus resume=auto hydra.run.dir={job.out_dir}")
    if job.data.records["val"] and job.bad_epochs >= cfg.patience:
        log.info("early stopping: no %s improvement for %d epochs", cfg.val_metric, job.bad_epochs)
        return True
    if job.deadline is not None and time.time() > job.deadline:
        log.info("stopping: max_minutes=%s reached", cfg.max_minutes)
        return True
    return False


# --------------------------------------------------------------------------------------------------
# Test
def test(job: Job) -> dict[str, float]:
    """Decode the test split with the best checkpoint (and each extra beam width); write and return the metrics."""
    cfg = job.cfg
    barrier(job.info)  # rank 0 has finished writing best.pt
    best_path = job.out_dir / "best.pt" if (job.out_dir / "best.pt").is_file() else job.out_dir / "last.pt"
    unwrap(job.model).load_state_dict(load_checkpoint(best_path)["model"])
    split = job.data.split("test")
    common = dict(batch_size=cfg.data.eval_batch_size, device=job.device, info=job.info, max_caption_len=cfg.data.max_caption_len)
    results = evaluate(job.model, split, job.data.vocab, cfg.decode, localisation=cfg.localisation,
                       results_file=job.out_dir / "test_captions.json", **common).metrics
    for k in cfg.test_beam_sizes:
        beam = dataclasses.replace(cfg.decode, strategy="beam", beam_size=k)
        results.update({f"beam{k}/{m}": v for m, v in evaluate(job.model, split, job.data.vocab, beam, **common).metrics.items()})
    results["train_minutes"] = round((time.time() - job.t0) / 60, 2)
    if job.info.is_main:
        (job.out_dir / "test_metrics.json").write_text(json.dumps(results, indent=1))
    log.info("test: %s", ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results
