"""The VQA task's training job (``task: vqa``): the captioning job's machinery with a VQA model, objective and evaluation.

Set-up builds the same :class:`captioner.training.loop.Job` the captioning job runs on, so the epoch
loop (``run_epoch``: steps, gradient averaging under torchrun, clipping, EMA, mid-epoch signals),
checkpoints (``save``/``restore``: atomic ``last.pt``/``best.pt`` with optimiser, schedule, position and
RNG states, so ``resume=auto`` continues exactly) and the stopping rules (``should_stop``: patience,
``max_minutes``, signals) are shared. What is VQA's own: the data (questions generated per image), the
model, the objective (cross-entropy over answers) and validation/test by answer accuracy, per type,
with attention localisation on the test split.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from captioner.config import ConfigError
from captioner.data.datasets import EpochSampler
from captioner.data.questions import Question, majority_baseline
from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.data.vqa import QuestionGroups, VQAData, build_vqa_data, collate_vqa
from captioner.distributed import DistInfo, barrier, broadcast_parameters, gather_objects
from captioner.metrics.vqa import accuracy_by_type, attention_localisation
from captioner.models.checkpoint import load_checkpoint, unwrap
from captioner.models.vqa import VQAModel, build_vqa_model
from captioner.training.ema import WeightAverage
from captioner.training.losses import global_token_count
from captioner.training.loggers import make_logger
from captioner.training.loop import (
    Job, Stage, keep_best, refit_schedule, restore, resume_checkpoint_path, run_epoch, save, should_stop, start_process,
)
from captioner.training.optim import make_optimizer, make_scheduler
from captioner.training.state import Progress, StopFlag

log = logging.getLogger(__name__)


class VQAObjective:
    """Cross-entropy of the answers of a batch, averaged over the questions of the global batch."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model: VQAModel, batch: dict[str, Tensor], epoch: int, info: Any = None) -> dict[str, Tensor]:
        """Loss terms of one batch (tensors already on the device): ``loss`` and the batch's ``accuracy``."""
        out = model(batch["images"], batch["questions"], batch["lengths"], batch["image_of"])
        answers = batch["answers"]  # (N,)
        total = global_token_count(answers.new_tensor(answers.numel()), info)  # questions per rank, under torchrun
        nll = F.cross_entropy(out.logits, answers, reduction="sum", label_smoothing=self.label_smoothing)
        loss = nll / (total if total is not None else answers.numel())
        return {"loss": loss, "accuracy": out.logits.detach().argmax(-1).eq(answers).float().mean()}

    def state_dict(self) -> None:
        """Nothing to keep for a resume."""

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""


def train_vqa(cfg: Any) -> dict[str, float]:
    """Train a VQA model, select on validation accuracy, test the best; returns the test metrics.

    ``cfg`` is a ``TrainConfig`` with ``data: VQADataConfig`` and ``model: VQAModelConfig``. SIGTERM/SIGINT
    write ``last.pt`` and raise ``TrainingInterrupted``; ``resume=auto`` continues exactly where it stopped.
    """
    job = setup_vqa(cfg)
    with job.logger, StopFlag() as stop:
        while job.progress.epoch <= job.stage.epochs:
            stats = run_epoch(job, stop)
            record = end_of_epoch(job, stats)
            if should_stop(job, record, stop):
                break
        return test_vqa(job) if cfg.test and job.data.records["test"] else {}


def setup_vqa(cfg: Any) -> Job:
    """Process group, run directory, seeds, questions, model, optimiser and (with ``resume``) the saved state."""
    t0 = time.time()
    if cfg.optim.fit_to_budget and not cfg.max_minutes:
        raise ConfigError("optim.fit_to_budget=true fits the cosine schedule to max_minutes, but max_minutes is not set")
    if cfg.data.hflip:
        raise ConfigError("data.hflip=true: mirroring would falsify the answers of left/right questions; VQA trains without it")
    info, out_dir, device = start_process(cfg)
    resume_path = resume_checkpoint_path(cfg, out_dir)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    logger = make_logger(cfg.logger, out_dir, info.is_main, purge_step=ckpt["progress"]["global_step"] + 1 if ckpt else None)
    data = build_vqa_data(cfg.data, vocab=Vocabulary(ckpt["vocab"]) if ckpt else None, progress=cfg.progress)
    log.info("data: %d/%d/%d images, %d/%d/%d questions, %d question words", *(len(data.records[s]) for s in ("train", "val", "test")),
             *(data.count(s) for s in ("train", "val", "test")), len(data.vocab))
    if info.is_main:
        data.vocab.save(out_dir / "vocab.json")
    model = build_vqa_model(cfg.encoder, cfg.model, len(data.vocab), data.answers.words, cfg.data.image_size).to(device)
    log.info("model: %s", describe_model(model))
    loader, sampler = make_vqa_loader(data, cfg, info)
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, cfg.epochs, math.ceil(sampler.per_rank / cfg.data.batch_size))
    ema = WeightAverage(unwrap(model), cfg.optim.ema) if cfg.optim.ema else None
    stage = Stage("xe", cfg.epochs, cfg.val_metric, cfg.patience, t0 + cfg.max_minutes * 60 if cfg.max_minutes else None)
    job = Job(cfg, info, device, out_dir, data, model, loader, sampler, opt, sched,  # type: ignore[arg-type]
              VQAObjective(cfg.loss.label_smoothing), ema, stage, logger, t0=t0)
    if ckpt:
        restore(job, ckpt, resume_path)
    broadcast_parameters(model, info)
    return job


def describe_model(model: VQAModel) -> str:
    """One line: what the model reads, how it combines, how many parameters it trains."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if model.question_only:
        return f"question only, {n} trainable parameters"
    how = "mean-pooled grid" if model.attention_type == "none" else f"{model.glimpses}-glimpse soft attention"
    return f"{model.spec.encoder['name']} encoder, {how}, {model.fusion} fusion, {n} trainable parameters"


def make_vqa_loader(data: VQAData, cfg: Any, info: DistInfo) -> tuple[DataLoader, EpochSampler]:
    """Training loader of this rank (images with all their questions) and its sampler."""
    groups = QuestionGroups(data.records["train"], data.questions["train"], data.stores["train"], data.vocab, data.answers,
                            cfg.data.questions.max_len)
    sampler = EpochSampler(len(groups), cfg.seed, info.rank, info.world_size)
    loader = DataLoader(groups, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate_vqa,
                        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


# --------------------------------------------------------------------------------------------------
# Evaluation
@torch.no_grad()
def predict_split(model: VQAModel, groups: QuestionGroups, batch_size: int, device: torch.device,
                  info: DistInfo | None = None) -> dict[str, Tensor]:
    """Predicted answers and last-glimpse attention of every question of a split, in question order.

    Returns ``predicted``, ``answers``, ``types`` (N,), ``boxes`` (N, 4), ``alphas`` (N, K, L). Under
    torchrun each rank predicts every world_size-th image and the results are gathered on every rank.
    """
    info = info or DistInfo()
    mine = list(range(info.rank, len(groups), info.world_size))
    was_training = model.training
    model.eval()
    parts: list[dict[str, Tensor]] = []
    for start in range(0, len(mine), batch_size):
        batch = collate_vqa([groups[k] for k in mine[start : start + batch_size]])
        on = {k: v.to(device) for k, v in batch.items()}
        out = model(on["images"], on["questions"], on["lengths"], on["image_of"])
        logits = out.logits.clone()
        logits[:, : len(SPECIALS)] = float("-inf")  # (N, A): the specials are never answers
        parts.append({"item": batch["index"][batch["image_of"]], "predicted": logits.argmax(-1).cpu(), "answers": batch["answers"],
                      "types": batch["types"], "boxes": batch["boxes"], "alphas": out.alphas.float().cpu()})
    model.train(was_training)
    merged = [p for rank_parts in gather_objects(parts, info) for p in rank_parts]
    if not merged:
        return {}
    cat = {k: torch.cat([p[k] for p in merged]) for k in merged[0]}
    order = torch.sort(cat.pop("item"), stable=True).indices  # (N,) back to the split's order
    return {k: v.index_select(0, order) for k, v in cat.items()}


def vqa_metrics(pred: dict[str, Tensor], model: VQAModel, image_hw: tuple[int, int], localisation: bool = True) -> dict[str, float]:
    """Accuracy overall and per type; attention localisation when the model attends."""
    if not pred:
        return {}
    metrics = accuracy_by_type(pred["predicted"], pred["answers"], pred["types"])
    if localisation and not model.question_only and model.attention_type == "soft":
        L = pred["alphas"].size(-1)
        g = round(math.sqrt(L))
        if g * g == L:
            metrics.update(attention_localisation(pred["alphas"], pred["boxes"], pred["types"], (g, g), image_hw))
    return metrics


def evaluate_split(job: Job, split: str, localisation: bool = False) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Metrics and predictions of the model (as it is now) on one split."""
    data: VQAData = job.data  # type: ignore[assignment]
    groups = QuestionGroups(data.records[split], data.questions[split], data.stores[split], data.vocab, data.answers,
                            job.cfg.data.questions.max_len)
    pred = predict_split(job.model, groups, job.cfg.data.eval_batch_size, job.device, job.info)
    size = job.cfg.data.shapes.image_size
    return vqa_metrics(pred, job.model, (size, size), localisation), pred


def end_of_epoch(job: Job, stats: dict[str, float]) -> dict[str, Any]:
    """Validate (answer accuracy), keep the best, write checkpoints and the epoch's metrics line."""
    cfg, epoch = job.cfg, job.progress.epoch
    record: dict[str, Any] = {"epoch": epoch, "train": stats, "lr": job.opt.param_groups[0]["lr"]}
    improved = not job.data.records["val"]
    trained = time.time()
    if job.data.records["val"] and (epoch % cfg.val_every == 0 or epoch == job.stage.epochs):
        with job.averaged():
            val, _ = evaluate_split(job, "val")
        improved = keep_best(job, record, val)
    record["epoch_seconds"] = round(time.time() - job.epoch_started, 1)
    refit_schedule(job, trained)
    job.progress = Progress(epoch + 1, 0, None, job.progress.global_step, job.stage.name)
    save(job, "last.pt", record)
    if improved:
        save(job, "best.pt", record, averaged=True)
    job.logger.epoch(record, job.progress.global_step)  # metrics.jsonl
    val_txt = f", val {cfg.val_metric} {record['val'][cfg.val_metric]:.4f}" if "val" in record else ""
    log.info("epoch %d: loss %.4f%s (%.0fs)", epoch, stats.get("loss", float("nan")), val_txt, record["epoch_seconds"])
    return record


def test_vqa(job: Job) -> dict[str, float]:
    """Test the best checkpoint: accuracy per type, localisation, the image-blind baselines; write and return them."""
    barrier(job.info)  # rank 0 has finished writing best.pt
    best = job.out_dir / "best.pt" if (job.out_dir / "best.pt").is_file() else job.out_dir / "last.pt"
    unwrap(job.model).load_state_dict(load_checkpoint(best)["model"])
    results, pred = evaluate_split(job, "test", localisation=job.cfg.localisation)
    data: VQAData = job.data  # type: ignore[assignment]
    results.update(majority_baseline(all_questions(data.questions["train"]), all_questions(data.questions["test"])))
    results["train_minutes"] = round((time.time() - job.t0) / 60, 2)
    if job.info.is_main:
        (job.out_dir / "test_metrics.json").write_text(json.dumps(results, indent=1))
        write_predictions(job.out_dir / "test_predictions.jsonl", data, pred)
    log.info("test: %s", ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


def write_predictions(path: Path, data: VQAData, pred: dict[str, Tensor]) -> None:
    """One JSON line per test question: image, question, answer, prediction."""
    rows = [(r.image_id, q) for r, qs in zip(data.records["test"], data.questions["test"]) for q in qs]
    with path.open("w", encoding="utf-8") as f:
        for (image_id, q), p in zip(rows, pred.get("predicted", torch.empty(0)).tolist()):
            f.write(json.dumps({"image_id": image_id, **q.to_json(), "predicted": data.answers.words[p]}) + "\n")


def all_questions(questions: Sequence[Sequence[Question]]) -> list[Question]:
    """Flatten per-image question lists."""
    return [q for qs in questions for q in qs]
