"""Variance of the hard-attention (REINFORCE) gradient with no baseline, the moving average, and leave-one-out.

One fixed minibatch of shapes-world captions (one caption per image); the decoder's gradient of the
training loss (``hard_attention_loss`` with soft_mix=0 and no doubly stochastic penalty, dropout off,
so the only randomness is the sampled locations) is computed ``--repeats`` times per estimator.
Reported: the total variance sum_params Var[grad] of that minibatch gradient across repeats, the
same times the number of sequences drawn per caption (variance at equal compute: leave-one-out
draws M), and the squared norm of the mean gradient for scale. The encoder's features are computed
once, so the figures are over the decoder's parameters.

    python benchmarks/reinforce_variance.py [--checkpoint outputs/shapes/hard/.../best.pt] [--captions 32] [--repeats 50]

Without a checkpoint the model is at initialisation. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn


def compose(overrides: list[str]):
    """The real training config (conf/train.yaml) with overrides, as dataclasses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from captioner.cli import config_dir
    from captioner.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("train", overrides=overrides))


class FeatureModel(nn.Module):
    """The captioner with its encoder replaced by precomputed features (images are features here)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def encode(self, features: Tensor) -> Tensor:
        return features

    def forward(self, features, captions, lengths=None, image_of=None, attend=None):
        return self.decoder(features, captions, lengths, attend=attend, image_of=image_of)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a shapes_hard checkpoint (default: model at initialisation)")
    ap.add_argument("--captions", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--samples", type=int, default=4, help="M for the leave-one-out estimator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from captioner.data.datasets import pad_captions
    from captioner.data.images import normalise_uint8
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import Captioner, build_model, spec_from_dict
    from captioner.data.build import build_data
    from captioner.models.checkpoint import load_checkpoint
    from captioner.training.reinforce import ReinforceBaseline, hard_attention_loss

    os.environ.setdefault("CAPTIONER_DATA", str(Path(__file__).resolve().parent.parent / "data_cache"))
    cfg = compose(["experiment=shapes_hard", "output_dir=/tmp/reinforce_variance", f"data.limit_train={args.captions}",
                   "data.limit_val=1", "data.limit_test=1", "data.generate=false"])
    ckpt = load_checkpoint(Path(args.checkpoint)) if args.checkpoint else None
    data = build_data(cfg.data, vocab=Vocabulary(ckpt["vocab"]) if ckpt else None)
    if ckpt:
        model = Captioner(spec_from_dict(ckpt["model_config"]), encoder_weights=False)
        model.load_state_dict(ckpt["model"])
    else:
        model = build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size)
    model.eval()  # no dropout: the sampled locations are the only randomness
    records = data.records["train"][: args.captions]
    images = torch.stack([data.stores["train"][i] for i in range(len(records))])
    with torch.no_grad():
        features = model.encode(normalise_uint8(images, model.spec.mean, model.spec.std))  # (B, L, D)
    captions, lengths = pad_captions([data.vocab.encode(r.tokens[0], cfg.data.max_caption_len) for r in records])
    image_of = torch.arange(len(records))
    fm = FeatureModel(model.decoder)
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    base = replace(cfg.model, soft_mix=0.0, doubly_stochastic=0.0)

    def grads(mcfg, baseline) -> Tensor:
        out = []
        for _ in range(args.repeats):
            loss = hard_attention_loss(fm, features, captions, lengths, image_of, mcfg, baseline)["loss"]
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]))
        return torch.stack(out)  # (repeats, P)

    estimators = {
        "none": (replace(base, hard_samples=1), False),
        "moving_average": (replace(base, hard_samples=1), True),
        f"leave_one_out_M{args.samples}": (replace(base, hard_samples=args.samples), False),
        "none_reward_to_go": (SimpleNamespace(**{**asdict(base), "hard_samples": 1, "reward_to_go": True}), False),
        "moving_average_reward_to_go": (SimpleNamespace(**{**asdict(base), "hard_samples": 1, "reward_to_go": True}), True),
        f"leave_one_out_M{args.samples}_reward_to_go": (SimpleNamespace(**{**asdict(base), "hard_samples": args.samples, "reward_to_go": True}), False),
    }
    results: dict[str, dict[str, float]] = {}
    t0 = time.time()
    for name, (mcfg, use_baseline) in estimators.items():
        baseline = None
        if use_baseline:  # warm the moving average up on the same data, as training would have
            baseline = ReinforceBaseline(cfg.model.baseline_decay)
            with torch.no_grad():
                for _ in range(20):
                    hard_attention_loss(fm, features, captions, lengths, image_of, mcfg, baseline)
        g = grads(mcfg, baseline)
        m = int(getattr(mcfg, "hard_samples", 1))
        var = float(g.var(0).sum())
        results[name] = {"total_variance": var, "variance_x_samples": var * m, "mean_grad_sq_norm": float(g.mean(0).pow(2).sum())}
        print(f"{name:32s} total variance {var:12.5g}   x M {var * m:12.5g}   |mean grad|^2 {results[name]['mean_grad_sq_norm']:.4g}")
    none = results["none"]["total_variance"]
    for r in results.values():
        r["ratio_to_none_at_equal_compute"] = r["variance_x_samples"] / none
    summary = {"checkpoint": args.checkpoint, "captions": len(records), "repeats": args.repeats,
               "locations": int(features.size(1)), "mean_caption_tokens": float((lengths - 1).double().mean()),
               "seconds": round(time.time() - t0, 1), **results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
