"""The evaluation job: decode a checkpoint on a split (or read a results file) and score it with COCO metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from captioner.config import ConfigError, EvaluateConfig
from captioner.data.sources import DatasetError, ImageRecord
from captioner.training.checkpoint import load_captioner
from captioner.training.loop import attention_localisation, build_data, decode_split, load_records, pick_device

log = logging.getLogger(__name__)


def read_results(path: str | Path) -> dict[str, str]:
    """A COCO-format results file ``[{"image_id": ..., "caption": ...}]`` as {image_id: caption}."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "results file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(path, f"not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, list):
        raise DatasetError(path, 'expected a list of {"image_id": ..., "caption": ...} objects (COCO results format)')
    out: dict[str, str] = {}
    for n, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise DatasetError(path, f'entry {n} needs "image_id" and a string "caption"')
        key = str(item["image_id"])
        if key in out:
            raise DatasetError(path, f"image_id {item['image_id']!r} appears more than once")
        out[key] = item["caption"]
    return out


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table; BLEU/ROUGE/METEOR also shown x100 as papers print them."""
    lines = [f"{'metric':<34}{'value':>10}{'x100':>10}", "-" * 54]
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            scaled = f"{100 * v:>10.2f}" if k.split("-")[0] in ("BLEU", "ROUGE", "METEOR", "CIDEr") else ""
            lines.append(f"{k:<34}{v:>10.4f}{scaled}")
    return "\n".join(lines)


def _split_records(records: dict[str, list[ImageRecord]], split: str, data: str) -> list[ImageRecord]:
    if split not in records or not records[split]:
        have = ", ".join(s for s, r in records.items() if r)
        raise ConfigError(f"split={split}: data={data} has no images in that split (it has: {have})")
    return records[split]


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a checkpoint's decoded captions, or a results file, on ``cfg.split``; writes metrics and captions."""
    from captioner.metrics import evaluate as coco_metrics

    if (cfg.checkpoint is None) == (cfg.results is None):
        raise ConfigError("give exactly one of checkpoint=PATH (decode and score) or results=PATH (score a results file)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any]
    if cfg.results is not None:
        records = _split_records(load_records(cfg.data), cfg.split, cfg.data.name)
        refs = {r.image_id: r.captions for r in records}
        hyps = read_results(cfg.results)
        unknown = sorted(set(hyps) - set(refs))
        if unknown:
            raise DatasetError(cfg.results, f"{len(unknown)} image_id(s) are not in the {cfg.split} split (e.g. {unknown[0]!r})")
        missing = len(refs) - len(hyps)
        if missing:
            log.warning("%s: %d image(s) of the %s split have no caption; scoring the %d that do", cfg.results, missing, cfg.split, len(hyps))
        metrics = coco_metrics(refs, hyps, meteor=cfg.meteor)
        metrics["images"] = len(hyps)
    else:
        device = pick_device(cfg.device)
        model, vocab = load_captioner(cfg.checkpoint, map_location=device)
        model.to(device)
        cfg.data.image_size = model.spec.image_size
        data = build_data(cfg.data, vocab=vocab, progress=cfg.progress, encoder_cfg=model.spec.encoder, encoder=model.encoder)
        records = _split_records(data.records, cfg.split, cfg.data.name)
        caps = decode_split(model, data.stores[cfg.split], vocab, cfg.decode, cfg.data.eval_batch_size, device, cfg.progress)
        hyps = {r.image_id: c.text for r, c in zip(records, caps)}
        metrics = coco_metrics({r.image_id: r.captions for r in records}, hyps, meteor=cfg.meteor)
        if cfg.localisation:
            loc = attention_localisation(model, records, data.stores[cfg.split], vocab, cfg.data.eval_batch_size, device, cfg.data.max_caption_len)
            if loc:
                metrics.update(loc)
        metrics["images"] = len(records)
        results = [{"image_id": r.image_id, "caption": c.text} for r, c in zip(records, caps)]
        (out_dir / f"captions_{cfg.split}.json").write_text(json.dumps(results, indent=1))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("%s split, %s:\n%s", cfg.split, cfg.checkpoint or cfg.results, format_table(metrics))
    return metrics
