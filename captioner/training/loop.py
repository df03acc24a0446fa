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

from captioner.config import ConfigError, TrainConfig, to_dict
from captioner.data.build import MIRRORED, DataBundle, build_data, open_feature_stores
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
from captioner.training.loggers import IntervalMean, grad_norm, log_val_examples, make_logger
from captioner.training.losses import CaptionObjective, SCSTObjective
from captioner.training.optim import fit_to_budget, make_optimizer, make_scheduler
from captioner.training.state import Progress, StopFlag, TrainingInterrupted, rng_state, set_rng_state
from captioner.utils import autocast, native_bf16, pick_device

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage of a run, with its own epochs, selection metric, time limit and checkpoint files."""

    name: str  # xe (cross-entropy, teacher forcing) | scst (self-critical sequence training)
    epochs: int
    val_metric: str
    patience: int
    deadline: float | None  # wall-clock time.time() at which the stage stops
    prefix: str = ""  # checkpoint files: <prefix>last.pt, <prefix>best.pt

    def path(self, out_dir: Path, name: str) -> Path:
        return out_dir / f"{self.prefix}{name}"


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
    stage: Stage
    logger: Any
    progress: Progress = field(default_factory=lambda: Progress(epoch=1))
    best: float = -math.inf
    bad_epochs: int = 0
    t0: float = field(default_factory=time.time)
    epoch_started: float = 0.0
    epoch_start_batch: int = 0  # the batch this process started the epoch at (after a resume: not 0)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.sampler.per_rank / self.loader.batch_size)

    def averaged(self) -> Any:
        """Context in which the model holds the weight average (validation, test, best.pt), if there is one."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train, validate by real decoding with early stopping, test the best checkpoint; returns test metrics.

    The cross-entropy stage, then (``scst.epochs > 0``) self-critical sequence training from its best
    checkpoint. Interrupted by SIGTERM/SIGINT, it finishes the step, writes ``last.pt`` (mid-epoch
    position included) and raises :class:`TrainingInterrupted`; ``resume=auto`` continues exactly.
    """
    if cfg.task != "caption":
        raise ConfigError(f"task={cfg.task}: captioner.training.loop.train trains captioners; "
                          "captioner.training.tasks.run(cfg) picks the job of any task")
    job = setup(cfg)
    with job.logger, StopFlag() as stop:
        if job.stage.name == "xe":
            run_stage(job, stop)
            if cfg.scst.epochs:
                start_scst(job)
        if job.stage.name == "scst":
            run_stage(job, stop)
        return test(job) if cfg.test and job.data.records["test"] else {}


def run_stage(job: Job, stop: StopFlag) -> None:
    """Epochs of training + validation until the stage's epochs, patience or time run out."""
    while job.progress.epoch <= job.stage.epochs:
        stats = run_epoch(job, stop)
        record = end_of_epoch(job, stats)
        if should_stop(job, record, stop):
            break


# --------------------------------------------------------------------------------------------------
# Set-up
def setup(cfg: TrainConfig) -> Job:
    """Process group, run directory, seeds, data, model, optimiser and (with ``resume``) the saved state."""
    t0 = time.time()
    if cfg.optim.fit_to_budget and not cfg.max_minutes:
        raise ConfigError("optim.fit_to_budget=true fits the cosine schedule to max_minutes, but max_minutes is not set")
    if cfg.scst.epochs and cfg.scst.fit_to_budget and not (cfg.max_minutes or cfg.scst.max_minutes):
        raise ConfigError("scst.fit_to_budget=true fits the SCST cosine schedule to its time budget, "
                          "but neither max_minutes nor scst.max_minutes is set")
    info, out_dir, device = start_process(cfg)
    resume_path = resume_checkpoint_path(cfg, out_dir)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    init = load_checkpoint(cfg.init_from) if cfg.init_from and ckpt is None else None
    logger = make_logger(cfg.logger, out_dir, info.is_main, purge_step=ckpt["progress"]["global_step"] + 1 if ckpt else None)
    vocab_words = (ckpt or init or {}).get("vocab")
    data = build_data(cfg.data, vocab=Vocabulary(vocab_words) if vocab_words else None, progress=cfg.progress)
    log.info("data: %s, %d/%d/%d images, vocabulary %d words", cfg.data.name,
             *(len(data.records[s]) for s in ("train", "val", "test")), len(data.vocab))
    if info.is_main:
        data.vocab.save(out_dir / "vocab.json")
    model = build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size).to(device)
    if ckpt is not None:
        check_same_wiring(model, ckpt, resume_path, "the run to resume", "resume it")
    if init is not None:
        load_weights(model, init, cfg.init_from)
    if cfg.data.features:
        attach_feature_cache(cfg, data, model, info, device)
    log.info("model: %s encoder (%s), %s decoder with %s attention, %d trainable parameters", cfg.encoder.name,
             "frozen" if cfg.encoder.freeze else "trained", cfg.model.cell, cfg.model.attention,
             sum(p.numel() for p in model.parameters() if p.requires_grad))

    loader, sampler = make_loader(data, cfg, info)
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, cfg.epochs, math.ceil(sampler.per_rank / cfg.data.batch_size))
    ema = WeightAverage(unwrap(model), cfg.optim.ema) if cfg.optim.ema else None
    scst_minutes = cfg.scst.max_minutes if cfg.scst.epochs and cfg.scst.max_minutes else 0.0
    xe_deadline = t0 + (cfg.max_minutes - scst_minutes) * 60 if cfg.max_minutes else None
    stage = Stage("xe", cfg.epochs, cfg.val_metric, cfg.patience, xe_deadline)
    job = Job(cfg, info, device, out_dir, data, model, loader, sampler, opt, sched,
              CaptionObjective(cfg.loss, model.decoder.attention_type), ema, stage, logger, t0=t0)
    if cfg.scst.epochs and ((ckpt or {}).get("progress", {}).get("stage") == "scst" or (init is not None and ckpt is None)):
        configure_scst(job)  # resuming the SCST stage, or starting it from init_from without cross-entropy
    if ckpt:
        restore(job, ckpt, resume_path)
    broadcast_parameters(model, info)
    native = native_bf16(device)
    if cfg.precision == "bf16" and not native:
        log.warning("precision=bf16 on a %s without native bf16 products: the steps will be slower than float32, "
                    "not faster (precision=native or fp32 turns it off)", device.type.upper())
    elif cfg.precision == "native":
        log.info("precision=native: %s on this %s", "bf16 autocast" if native else "float32 (no native bf16 products)",
                 device.type.upper())
    if cfg.compile and device.type == "cuda":
        # The step is the hot loop and has static shapes per batch; compiling it leaves checkpoints unchanged.
        model.decoder.step = torch.compile(model.decoder.step)  # type: ignore[method-assign]
    return job


def start_process(cfg: TrainConfig) -> tuple[DistInfo, Path, torch.device]:
    """Join the process group, agree on the run directory, set threads, the device and the seeds."""
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
    return info, out_dir, device


def check_same_wiring(model: Captioner, ckpt: dict[str, Any], path: Any, what: str, fix: str) -> None:
    """Refuse weights that would load without a shape error into a network that uses them differently.

    The attention decoder takes any number of locations, so weights trained on 7x7 features (224 px) would
    load into a job that feeds them 9x9 ones (288 px) and train on inputs they never saw; ``model.query``
    rewires the same weights (what drives the attention, what the cell reads).
    """
    spec, saved = unwrap(model).spec, ckpt["model_config"]  # model_config: checked on load
    found, here = int(saved["image_size"]), spec.image_size
    if found != here:
        raise CheckpointError(f"{path}: {what} was trained on {found} px images, this job uses data.image_size={here} "
                              f"(the features differ); add data.image_size={found} to {fix}")
    found, here = saved["decoder"].get("query", "previous"), unwrap(model).decoder.query  # older checkpoints: previous
    if found != here:
        raise CheckpointError(f"{path}: {what} was trained with model.query={found}, this job has model.query={here} "
                              f"(wired differently); add model.query={found} to {fix}")


def load_weights(model: Captioner, ckpt: dict[str, Any], path: Any) -> None:
    """Start from another run's weights (``init_from``): the network must be the same, and so must its inputs."""
    check_same_wiring(model, ckpt, path, "init_from", "start from it")
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: init_from needs a checkpoint of the same model and vocabulary "
                              f"({str(e).splitlines()[0][:200]})") from None
    log.info("starting from the weights of %s", path)


def resume_checkpoint_path(cfg: TrainConfig, out_dir: Path) -> Path | None:
    """``resume=auto``: ``last.pt`` of the run directory if there is one; ``resume=PATH``: that file."""
    if cfg.resume == "auto":  # the SCST stage's checkpoint when that stage has begun
        found = [out_dir / n for n in ("scst_last.pt", "last.pt") if (out_dir / n).is_file()]
        return found[0] if found else None
    return Path(cfg.resume) if cfg.resume else None


def attach_feature_cache(cfg: TrainConfig, data: DataBundle, model: Captioner, info: DistInfo, device: torch.device) -> None:
    """Read features from ``cfg.data.features``, made with exactly this (frozen) encoder; build it first if missing."""
    from captioner.data.features import read_manifest

    if cfg.data.build_features and info.is_main:  # the one rank that may build it
        manifest = read_manifest(cfg.data.features)
        no_mirrored = manifest is not None and cfg.data.hflip and MIRRORED not in manifest["splits"]
        if manifest is None or no_mirrored:
            from captioner.prepare import PrepareConfig, prepare

            if no_mirrored:
                log.info("the feature cache at %s has no features of the mirrored training photos (data.hflip): "
                         "encoding them once", cfg.data.features)
            else:
                log.info("no feature cache at %s yet: encoding the dataset once", cfg.data.features)
            prepare(PrepareConfig(data=cfg.data, encoder=cfg.encoder, cache_dir=cfg.data.features,
                                  num_workers=max(cfg.data.num_workers, 0), device=str(device), progress=cfg.progress,
                                  threads=cfg.threads))
    barrier(info)
    data.stores = open_feature_stores(cfg.data, data.records, feature_spec(cfg.encoder, cfg.data.image_size, model.encoder, device))
    log.info("reading encoder features from the cache %s", cfg.data.features)


def make_loader(data: DataBundle, cfg: TrainConfig, info: DistInfo, batch_size: int | None = None,
                captions_per_image: int | None = None) -> tuple[DataLoader, EpochSampler]:
    """The training loader (images with their captions and indices) of this rank, and its sampler.

    Call ``sampler.set_epoch`` before each epoch. Defaults: ``data.batch_size``, ``data.captions_per_image``.
    """
    groups = CaptionGroups(data.records["train"], data.vocab, data.stores["train"], cfg.data.max_caption_len,
                           captions_per_image or cfg.data.captions_per_image, hflip=cfg.data.hflip, seed=cfg.seed,
                           mirrored=data.stores.get(MIRRORED))
    sampler = EpochSampler(len(groups), cfg.seed, info.rank, info.world_size)
    # A private generator: the loader must not draw from the global RNG, or a resumed run would diverge.
    loader = DataLoader(groups, batch_size=batch_size or cfg.data.batch_size, sampler=sampler, collate_fn=collate_groups,
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
    job.progress = Progress(int(p["epoch"]), int(p["batch"]), p["totals"], int(p["global_step"]), p.get("stage", "xe"))
    job.best, job.bad_epochs = float(ckpt["best"]), int(ckpt["bad_epochs"])
    set_rng_state(ckpt["rng"])
    job.objective.load_state_dict(ckpt.get("baseline"))
    if job.ema is not None:
        if ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: has no weight average but this run has optim.ema={job.cfg.optim.ema}")
        job.ema.load_state_dict(ckpt["ema"])
    log.info("resumed from %s at %s epoch %d, batch %d (best %s %.4f)", path, job.stage.name, job.progress.epoch,
             job.progress.batch, job.stage.val_metric, job.best)


def save(job: Job, name: str, record: dict[str, Any] | None = None, averaged: bool = False) -> None:
    """Write the stage's ``last.pt`` / ``best.pt`` on rank 0; ``averaged`` stores the weight average as the model."""
    if not job.info.is_main:
        return
    with job.averaged() if averaged else contextlib.nullcontext():
        p = job.progress
        state = {"optimizer": job.opt.state_dict(), "scheduler": job.sched.state_dict(), "epoch": p.epoch - 1,
                 "progress": {"epoch": p.epoch, "batch": p.batch, "totals": p.totals, "global_step": p.global_step,
                              "stage": job.stage.name},
                 "best": job.best, "bad_epochs": job.bad_epochs, "rng": rng_state(), "metrics": record,
                 "config": to_dict(job.cfg), "baseline": job.objective.state_dict(),
                 "ema": job.ema.state_dict() if job.ema is not None else None}
        save_checkpoint(job.stage.path(job.out_dir, name), job.model, job.data.vocab, **state)


# --------------------------------------------------------------------------------------------------
# The SCST stage
def configure_scst(job: Job) -> None:
    """Switch the job to self-critical sequence training: its objective, loader, optimiser, schedule and files."""
    from captioner.training.scst import build_reward

    cfg, scfg = job.cfg, job.cfg.scst
    reward = build_reward(job.data.records["train"], job.data.vocab, scfg)  # document frequencies + reference vectors, once
    job.objective = SCSTObjective(scfg, reward)
    # captions are not needed (the reward reads the references): one per image keeps batches small
    job.loader, job.sampler = make_loader(job.data, cfg, job.info, batch_size=scfg.batch_size, captions_per_image=1)
    # one learning rate for the stage: a fine-tuned encoder does not keep the cross-entropy stage's optim.encoder_lr
    encoder_lr = scfg.lr if scfg.encoder_lr is None else scfg.encoder_lr
    optim_cfg = dataclasses.replace(cfg.optim, lr=scfg.lr, encoder_lr=encoder_lr, scheduler=scfg.scheduler,
                                    warmup_steps=scfg.warmup_steps, fit_to_budget=scfg.fit_to_budget)
    job.opt = make_optimizer(job.model, optim_cfg)
    job.sched = make_scheduler(job.opt, optim_cfg, scfg.epochs, job.steps_per_epoch)
    job.ema = WeightAverage(unwrap(job.model), cfg.optim.ema) if cfg.optim.ema else None
    now = time.time()
    ends = [t for t in (now + scfg.max_minutes * 60 if scfg.max_minutes else None,
                        job.t0 + cfg.max_minutes * 60 if cfg.max_minutes else None) if t is not None]
    job.stage = Stage("scst", scfg.epochs, scfg.val_metric, scfg.patience, min(ends) if ends else None, prefix="scst_")
    job.progress = Progress(epoch=1, global_step=job.progress.global_step, stage="scst")
    job.best, job.bad_epochs = -math.inf, 0


def start_scst(job: Job) -> None:
    """After cross-entropy: continue from its best checkpoint (the weight average) with SCST."""
    barrier(job.info)  # rank 0 has finished writing best.pt
    best = job.stage.path(job.out_dir, "best.pt")
    if best.is_file():
        unwrap(job.model).load_state_dict(load_checkpoint(best)["model"])
    log.info("cross-entropy stage done: self-critical training from %s for up to %d epochs", best, job.cfg.scst.epochs)
    configure_scst(job)


# --------------------------------------------------------------------------------------------------
# One epoch
def train_one_epoch(model: Captioner, loader: DataLoader, opt: torch.optim.Optimizer, sched: Any, objective: Any,
                    cfg: TrainConfig, device: torch.device, progress: Progress, *, stop: StopFlag | None = None,
                    deadline: float | None = None, on_step: Any = None, info: DistInfo | None = None,
                    ema: WeightAverage | None = None, on_log: Any = None) -> dict[str, float]:
    """One (rest of an) epoch; updates ``progress``; returns the mean of each loss term.

    ``objective(model, batch, epoch, info)`` gives the loss terms of a batch (the same call for every
    attention type and stage). Returns early when ``stop`` is raised or at ``deadline``.
    ``on_step(progress)`` runs after every step, ``on_log(progress, interval means, grad norm)`` every
    ``cfg.log_every`` steps. A non-finite loss raises ``FloatingPointError`` before any parameter is touched.
    """
    info = info or DistInfo()
    model.train()
    totals = progress.totals if progress.totals is not None else {}
    progress.totals = totals
    interval = IntervalMean()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(loader, desc=f"{progress.stage} epoch {progress.epoch}", disable=not cfg.progress, leave=False,
               mininterval=2.0, initial=progress.batch, total=progress.batch + len(loader))
    mixed = autocast(cfg.precision, device)
    for batch in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with mixed:
            losses = objective(model, batch, progress.epoch, info)
        loss = losses["loss"]
        if any_rank(not bool(torch.isfinite(loss)), info):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {progress.epoch}, batch {progress.batch + 1} "
                                     f"(global step {progress.global_step + 1})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, info)
        logging_now = (progress.batch + 1) % cfg.log_every == 0
        norm = optimizer_step(params, opt, sched, ema, cfg.optim.grad_clip, measure=logging_now and on_log is not None)
        progress.batch += 1
        progress.global_step += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        interval.add(values)
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v
        if logging_now:
            bar.set_postfix(loss=f"{totals['loss'] / progress.batch:.3f}")
            if on_log is not None:
                on_log(progress, interval.pop(), norm)
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


def optimizer_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched: Any, ema: WeightAverage | None,
                   grad_clip: float, measure: bool = False) -> float | None:
    """Clip (by global norm), step the optimiser, the schedule and the weight average; the norm when known or asked."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip else (grad_norm(params) if measure else None)
    opt.step()
    sched.step()
    if ema is not None:
        ema.update()
    return norm


def run_epoch(job: Job, stop: StopFlag) -> dict[str, float]:
    """Train the current epoch (or its rest, after a resume); an interruption mid-epoch saves and raises."""
    cfg, p = job.cfg, job.progress
    job.epoch_started, job.epoch_start_batch = time.time(), p.batch
    job.sampler.set_epoch(p.epoch, start=p.batch * job.loader.batch_size)
    job.loader.dataset.set_epoch(p.epoch)
    prefix = "train" if job.stage.name == "xe" else "scst"

    def on_step(progress: Progress) -> None:
        if cfg.save_every and progress.global_step % cfg.save_every == 0:
            save(job, "last.pt")

    def on_log(progress: Progress, means: dict[str, float], norm: float | None) -> None:
        extra = {"lr": job.opt.param_groups[0]["lr"], **({"grad_norm": norm} if norm is not None else {})}
        job.logger.scalars(prefix, {**means, **extra}, progress.global_step)

    try:
        stats = train_one_epoch(job.model, job.loader, job.opt, job.sched, job.objective, cfg, job.device, p, stop=stop,
                                deadline=job.stage.deadline, on_step=on_step, info=job.info, ema=job.ema, on_log=on_log)
    except FloatingPointError as e:
        last = job.stage.path(job.out_dir, "last.pt")
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
        raise FloatingPointError(f"{e}; training stopped, {kept} (try a lower optim.lr or optim.grad_clip)") from None
    if stop.signal is not None and p.batch < job.steps_per_epoch:
        save(job, "last.pt")
        raise TrainingInterrupted(
            f"interrupted by signal {stop.signal} at epoch {p.epoch}, batch {p.batch}/{job.steps_per_epoch}; "
            f"checkpoint written to {job.stage.path(job.out_dir, 'last.pt')}. Resume with the same command plus "
            f"resume=auto hydra.run.dir={job.out_dir}")
    return stats


def end_of_epoch(job: Job, stats: dict[str, float]) -> dict[str, Any]:
    """Validate (by real decoding), keep the best, write checkpoints and the epoch's metrics line."""
    cfg, stage, epoch = job.cfg, job.stage, job.progress.epoch
    record: dict[str, Any] = {"epoch": epoch, "train": stats, "lr": job.opt.param_groups[0]["lr"]}
    if stage.name != "xe":
        record["stage"] = stage.name
    improved = not job.data.records["val"]
    trained = time.time()
    if job.data.records["val"] and (epoch % cfg.val_every == 0 or epoch == stage.epochs):
        with job.averaged():
            val = evaluate(job.model, job.data.split("val"), job.data.vocab, cfg.decode, batch_size=cfg.data.eval_batch_size,
                           device=job.device, info=job.info).metrics
            log_examples(job)
        improved = keep_best(job, record, val)
    record["epoch_seconds"] = round(time.time() - job.epoch_started, 1)
    refit_schedule(job, trained)
    job.progress = Progress(epoch + 1, 0, None, job.progress.global_step, stage.name)
    save(job, "last.pt", record)
    if improved:
        save(job, "best.pt", record, averaged=True)
    job.logger.epoch(record, job.progress.global_step)
    val_txt = f", val {stage.val_metric} {record['val'][stage.val_metric]:.4f}" if "val" in record else ""
    log.info("%s epoch %d: loss %.4f%s (%.0fs)", stage.name, epoch, stats.get("loss", float("nan")), val_txt,
             record["epoch_seconds"])
    return record


def refit_schedule(job: Job, trained: float) -> None:
    """``optim.fit_to_budget`` (``scst.fit_to_budget``): after the stage's first epoch, end its cosine where the time budget ends the stage.

    Without it a slower machine stops the stage mid-schedule, at a learning rate far from its floor.
    The cost of an epoch is measured on the one just run (its steps, then its validation, ending now;
    ``trained`` is when its steps ended); the horizon is saved with the scheduler, so a resumed run keeps it.
    """
    steps = job.progress.batch - job.epoch_start_batch
    fit = job.cfg.optim.fit_to_budget if job.stage.name == "xe" else job.cfg.scst.fit_to_budget
    if not (fit and job.stage.deadline and steps > 0):
        return
    now = time.time()
    seconds = [(trained - job.epoch_started) / steps, now - trained, job.stage.deadline - now]
    seconds = gather_objects(seconds, job.info)[0]  # rank 0's timings: every rank fits the same horizon
    total = fit_to_budget(job.sched, job.steps_per_epoch, *seconds)
    if total is not None:
        log.info("fit_to_budget: the cosine schedule now ends at step %d (%.1f epochs) instead of %d, "
                 "where the time budget ends the %s stage", total, total / job.steps_per_epoch,
                 job.stage.epochs * job.steps_per_epoch, job.stage.name)


def keep_best(job: Job, record: dict[str, Any], val: dict[str, float]) -> bool:
    """Put the validation metrics in the epoch record; whether they beat the best so far (else patience counts)."""
    record["val"] = val
    metric = job.stage.val_metric
    if metric not in val:
        raise KeyError(f"val_metric {metric!r} is not one of {sorted(val)}")
    improved = val[metric] > job.best
    job.best, job.bad_epochs = (val[metric], 0) if improved else (job.best, job.bad_epochs + 1)
    return improved


def log_examples(job: Job) -> None:
    """A fixed handful of val images with their current caption and attention grid (TensorBoard)."""
    if not job.logger.wants_images or not job.cfg.val_examples:
        return
    split = job.data.split("val")
    n = min(job.cfg.val_examples, len(split.records))
    inputs = torch.stack([split.store[i] for i in range(n)])  # uint8 images (n, 3, S, S) or features (n, L, D)
    display = None
    if inputs.dim() == 3:  # features: draw on the photos themselves
        from captioner.data.datasets import ImageStore

        photos = ImageStore(split.records[:n], job.cfg.data.image_size)
        display = [photos[i] for i in range(n)]
    log_val_examples(job.logger, job.model, job.data.vocab, inputs, job.progress.global_step, job.cfg.decode,
                     display=display, references=[r.captions for r in split.records[:n]])


def should_stop(job: Job, record: dict[str, Any], stop: StopFlag) -> bool:
    """Early stopping, the time budget, or a signal that came on the epoch's last step (then raise)."""
    stage = job.stage
    if stop.signal is not None:  # the checkpoint just written is complete
        raise TrainingInterrupted(
            f"interrupted by signal {stop.signal} after epoch {record['epoch']}; checkpoint written to "
            f"{stage.path(job.out_dir, 'last.pt')}. Resume with the same command plus resume=auto hydra.run.dir={job.out_dir}")
    if job.data.records["val"] and job.bad_epochs >= stage.patience:
        log.info("early stopping: no %s improvement for %d epochs", stage.val_metric, job.bad_epochs)
        return True
    if stage.deadline is not None and time.time() > stage.deadline:
        log.info("stopping the %s stage: its time budget is spent", stage.name)
        return True
    return False


# --------------------------------------------------------------------------------------------------
# Test
def test(job: Job) -> dict[str, float]:
    """Decode the test split with the best checkpoint of the last stage (each extra beam width too); write the metrics.

    After SCST, the cross-entropy stage's best checkpoint is tested as well, under ``xe/...`` keys.
    """
    barrier(job.info)  # rank 0 has finished writing best.pt
    results = test_checkpoint(job, job.stage.prefix, job.out_dir / "test_captions.json")
    if job.stage.name == "scst" and (job.out_dir / "best.pt").is_file():
        results.update({f"xe/{k}": v for k, v in test_checkpoint(job, "", job.out_dir / "test_captions_xe.json").items()})
    results["train_minutes"] = round((time.time() - job.t0) / 60, 2)
    if job.info.is_main:
        (job.out_dir / "test_metrics.json").write_text(json.dumps(results, indent=1))
    log.info("test: %s", ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


def test_checkpoint(job: Job, prefix: str, results_file: Path) -> dict[str, float]:
    """Test metrics of ``<prefix>best.pt`` (else ``<prefix>last.pt``): the configured decoding, then each test beam.

    The captions of each go to ``results_file`` and ``<its stem>_beam<k>.json`` (COCO results format), so two runs'
    figures can be compared image by image (``scripts/evaluate.py results=... compare=...``).
    """
    cfg = job.cfg
    best = job.out_dir / f"{prefix}best.pt"
    unwrap(job.model).load_state_dict(load_checkpoint(best if best.is_file() else job.out_dir / f"{prefix}last.pt")["model"])
    split = job.data.split("test")
    common = dict(batch_size=cfg.data.eval_batch_size, device=job.device, info=job.info, max_caption_len=cfg.data.max_caption_len)
    results = evaluate(job.model, split, job.data.vocab, cfg.decode, localisation=cfg.localisation,
                       results_file=results_file, **common).metrics
    for k in cfg.test_beam_sizes:  # each beam's captions beside the configured decoding's: test_captions[_xe]_beam<k>.json
        beam = dataclasses.replace(cfg.decode, strategy="beam", beam_size=k)
        beam_file = results_file.with_name(f"{results_file.stem}_beam{k}.json")
        results.update({f"beam{k}/{m}": v for m, v in evaluate(job.model, split, job.data.vocab, beam, results_file=beam_file,
                                                                **common).metrics.items()})
    if cfg.test_block_bad_endings:
        k = max(cfg.test_beam_sizes, default=0)
        blocked = dataclasses.replace(cfg.decode, block_bad_endings=True, **({"strategy": "beam", "beam_size": k} if k else {}))
        results.update({f"blocked/{m}": v for m, v in evaluate(job.model, split, job.data.vocab, blocked, **common).metrics.items()})
    return results
