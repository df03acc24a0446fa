"""Evaluation: decode a split, score it with COCO metrics, optionally measure attention localisation.

One function, :func:`evaluate`, serves validation during training, testing at each beam width and
the ``evaluate`` job (:func:`evaluate_job`, which also scores results files), torchvision-references
style: it takes a model and a split and returns metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.config import ConfigError, DecodeConfig, EvaluateConfig
from captioner.data.build import SplitData, build_data, load_records, references
from captioner.data.datasets import ImagesOnly, collate_images, pad_captions
from captioner.data.sources import DatasetError, ImageRecord
from captioner.data.vocab import Vocabulary
from captioner.decoding import Caption, decode
from captioner.decoding.constraints import bad_ending_rate
from captioner.distributed import DistInfo, gather_objects
from captioner.metrics.localisation import localisation_scores
from captioner.models.captioner import Captioner
from captioner.models.encoder import feature_spec
from captioner.utils import atomic_write_text, pick_device

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: the metrics and the decoded captions (in the split's order)."""

    metrics: dict[str, float]
    captions: list[Caption]
    per_image: dict[str, dict[str, float]] | None = None  # image id -> its metrics (with ``per_image=True``)


def evaluate(model: Captioner, split: SplitData, vocab: Vocabulary, decode_cfg: DecodeConfig, *, batch_size: int,
             device: torch.device, localisation: bool = False, meteor: bool = False, results_file: str | Path | None = None,
             info: Any = None, progress: bool = False, max_caption_len: int = 30, per_image: bool = False) -> Evaluation:
    """Decode every image of ``split`` with ``decode_cfg``, score against its references, return metrics and captions.

    ``localisation``: also the attention localisation under teacher forcing (shapes-world boxes needed;
    skipped otherwise). ``results_file``: write the captions in COCO results format. Under data
    parallelism each rank decodes a share and every rank gets the same metrics. ``per_image``: also
    each image's own scores (for the results page's worst-first order).
    """
    from captioner.metrics import evaluate as coco_metrics

    caps = decode_split(model, split.store, vocab, decode_cfg, batch_size, device, progress, info)
    hyps = {r.image_id: c.text for r, c in zip(split.records, caps)}
    metrics: dict[str, Any] = coco_metrics(references(split.records), hyps, meteor=meteor, per_image=per_image)
    images = metrics.pop("per_image", None)
    # how varied the captions are, and how many end on a fragment word ("... in front of a")
    metrics["distinct_captions"] = len(set(hyps.values()))
    metrics["bad_endings"] = bad_ending_rate(hyps.values())
    if localisation and (info is None or info.is_main):
        loc = attention_localisation(model, split.records, split.store, vocab, batch_size, device, max_caption_len)
        if loc:
            metrics.update(loc)
    if results_file is not None and (info is None or info.is_main):
        coco = [{"image_id": r.image_id, "caption": c.text} for r, c in zip(split.records, caps)]
        atomic_write_text(results_file, json.dumps(coco, indent=1))
    return Evaluation(metrics, caps, images)


@torch.no_grad()
def decode_split(model: Captioner, store: Any, vocab: Vocabulary, decode_cfg: DecodeConfig, batch_size: int,
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
        captions.extend(decode(model.decoder, model.encode(batch["images"].to(device)), vocab, decode_cfg))
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


@torch.no_grad()
def attention_localisation(model: Captioner, records: Sequence[ImageRecord], store: Any, vocab: Vocabulary,
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
        feats = model.encode(images.to(device))  # (B, L, D)
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
# The evaluate job
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


COMPARE = "compare/"  # prefix of the compare= entries of an evaluation's metrics


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table; BLEU/ROUGE/METEOR also shown x100 as papers print them (compare= entries: ``format_comparison``)."""
    lines = [f"{'metric':<34}{'value':>10}{'x100':>10}", "-" * 54]
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not k.startswith(COMPARE):
            scaled = f"{100 * v:>10.2f}" if k.split("-")[0] in ("BLEU", "ROUGE", "METEOR", "CIDEr") else ""
            lines.append(f"{k:<34}{v:>10.4f}{scaled}")
    return "\n".join(lines)


def evaluate_job(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a checkpoint's decoded captions, or a results file, on ``cfg.split``; writes metrics and captions."""
    if (cfg.checkpoint is None) == (cfg.results is None):
        raise ConfigError("give exactly one of checkpoint=PATH (decode and score) or results=PATH (score a results file)")
    if cfg.data.hflip:
        raise ConfigError("data.hflip=true mirrors training images; evaluation decodes the photos as they are (drop it)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.compare is not None and cfg.bootstrap < 1:
        raise ConfigError(f"bootstrap must be >= 1 resamples for compare=; got {cfg.bootstrap}")
    other = read_results(cfg.compare) if cfg.compare is not None else None  # a bad file fails before any decoding
    if cfg.results is not None:
        metrics, refs, hyps = _score_results_file(cfg)
    else:
        from captioner.models.checkpoint import load_captioner

        device = pick_device(cfg.device)
        model, vocab = load_captioner(cfg.checkpoint, map_location=device)
        model.to(device)
        cfg.data.image_size = model.spec.image_size
        spec = feature_spec(model.spec.encoder, cfg.data.image_size, model.encoder, device) if cfg.data.features else None
        data = build_data(cfg.data, vocab=vocab, progress=cfg.progress, feature_spec=spec)
        split = data.split(cfg.split)
        result = evaluate(model, split, vocab, cfg.decode, batch_size=cfg.data.eval_batch_size, device=device,
                          localisation=cfg.localisation, meteor=cfg.meteor, results_file=out_dir / f"captions_{cfg.split}.json",
                          progress=cfg.progress, max_caption_len=cfg.data.max_caption_len, per_image=cfg.html is not None)
        metrics = dict(result.metrics, images=len(split.records))
        if cfg.html is not None:
            write_page(cfg, split, result, metrics, model)
        refs, hyps = references(split.records), {r.image_id: c.text for r, c in zip(split.records, result.captions)}
    log.info("%s split, %s:\n%s", cfg.split, cfg.checkpoint or cfg.results, format_table(metrics))
    if other is not None:
        metrics.update(compare_with(cfg, refs, hyps, other))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def compare_with(cfg: EvaluateConfig, refs: dict[str, list[str]], hyps: dict[str, str], other: dict[str, str]) -> dict[str, float]:
    """``compare=FILE``: each metric of these captions minus FILE's, with a paired bootstrap interval (logged as a table)."""
    from captioner.metrics.compare import paired_bootstrap

    check_in_split(cfg.compare, other, refs, cfg.split)
    if set(other) != set(hyps):
        raise DatasetError(cfg.compare, f"captions {len(other)} images, this evaluation {len(hyps)}: a paired comparison "
                                        f"needs the same images ({len(set(hyps) - set(other))} of ours are missing there)")
    diffs = paired_bootstrap(refs, hyps, other, resamples=cfg.bootstrap, meteor=cfg.meteor)
    out: dict[str, float] = {}
    for name, d in diffs.items():
        values = dict(this=d.a, other=d.b, diff=d.diff, low=d.low, high=d.high, se=d.se, p_better=d.a_better,
                      this_se=d.a_se, other_se=d.b_se)
        out.update({f"{COMPARE}{name}/{field}": v for field, v in values.items()})
    log.info("against %s (%d images, %d bootstrap resamples of them):\n%s", cfg.compare, len(hyps), cfg.bootstrap,
             format_comparison(out))
    return out


def format_comparison(metrics: dict[str, Any]) -> str:
    """The ``compare/`` entries of an evaluation as a table: this, the other system, the difference and its interval."""
    names = [k[len(COMPARE):-len("/diff")] for k in metrics if k.startswith(COMPARE) and k.endswith("/diff")]
    lines = [f"{'metric':<10}{'this':>9}{'other':>9}{'this-other':>12}{'95% interval':>22}{'s.e.':>9}{'P(this>other)':>15}",
             "-" * 86]
    for name in names:
        d = {k[len(COMPARE) + len(name) + 1:]: v for k, v in metrics.items() if k.startswith(f"{COMPARE}{name}/")}
        interval = f"[{d['low']:+.4f}, {d['high']:+.4f}]"
        lines.append(f"{name:<10}{d['this']:>9.4f}{d['other']:>9.4f}{d['diff']:>+12.4f}{interval:>22}{d['se']:>9.4f}"
                     f"{d['p_better']:>15.3f}")
    return "\n".join(lines)


def write_page(cfg: EvaluateConfig, split: SplitData, result: Evaluation, metrics: dict[str, Any], model: Captioner) -> None:
    """``html=DIR``: the split's results page, worst CIDEr-D first, with references and the metrics on top."""
    from captioner.viz.html import write_split_page

    cider = {i: m["CIDEr-D"] for i, m in (result.per_image or {}).items()}
    hard = model.decoder.attention_type == "hard"
    captions = result.captions if hard else [dataclasses.replace(c, locations=None) for c in result.captions]
    meta = {"checkpoint": str(cfg.checkpoint), "split": cfg.split, "decoding": cfg.decode.strategy,
            "attention": model.decoder.attention_type}
    page = write_split_page(cfg.html, split.records, captions, cider, metrics, title=f"{cfg.data.name} {cfg.split}", meta=meta)
    log.info("results page: %s", page)


def _score_results_file(cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, str]]:
    """COCO metrics of a results file against the references of ``cfg.split``: (metrics, references, captions)."""
    from captioner.metrics import evaluate as coco_metrics

    records = load_records(cfg.data)
    if not records.get(cfg.split):
        have = ", ".join(s for s, r in records.items() if r)
        raise ConfigError(f"split={cfg.split}: data={cfg.data.name} has no images in that split (it has: {have})")
    refs = references(records[cfg.split])
    hyps = read_results(cfg.results)
    check_in_split(cfg.results, hyps, refs, cfg.split)
    missing = len(refs) - len(hyps)
    if missing:
        log.warning("%s: %d image(s) of the %s split have no caption; scoring the %d that do", cfg.results, missing, cfg.split, len(hyps))
    return dict(coco_metrics(refs, hyps, meteor=cfg.meteor), images=len(hyps)), refs, hyps


def check_in_split(path: str | Path, captions: dict[str, str], refs: dict[str, list[str]], split: str) -> None:
    """A results file's image ids must all be images of the split (one ``DatasetError`` naming the file otherwise)."""
    unknown = sorted(set(captions) - set(refs))
    if unknown:
        raise DatasetError(path, f"{len(unknown)} image_id(s) are not in the {split} split (e.g. {unknown[0]!r})")
