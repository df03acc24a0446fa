"""Cost of one SCST step on CPU, and the reward's share of it, at the Flickr8k recipe's decoder sizes.

Decoder: LSTM 512, embedding 512, attention 512, rank-512 context, 7x7 = 49 locations (``--grid``) x 1280 features
(EfficientNet-Lite0, random here), a 2,500-word vocabulary, dropout 0.5 in training mode. Weights are
random; only the caption lengths matter for the cost, so <end>'s output bias is set to give it
probability ``--end-prob`` per step (0.09: about 10 words, Flickr8k's mean caption length) and the
sampled lengths are printed. The reward is CIDEr-D against a random reference set of Flickr8k's size
(6,000 training images x 5 captions of 8-15 Zipf-distributed words), built once (its construction
time is printed too).

One step = ``scst_step_loss`` (memory once per image, 5 samples per image with gradients, the greedy
baseline, rewards of samples and greedy captions) + backward + Adam. For scale, a teacher-forced
cross-entropy step on the same batch (32 images x 5 captions of 11 words) is timed as well.

    python benchmarks/scst.py [--iters 3] [--threads 2] [--baseline greedy] [--precision fp32|bf16|both] [--grid 7] [--query current|topdown]
                               [--positions sincos]

``--precision both`` times every step in float32 and under bf16 autocast (``precision=bf16``), interleaved in
the same process, and prints the ratios.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.metrics.reward import CiderDReward
from captioner.models.decoder import AttentionDecoder
from captioner.training.losses import caption_loss
from captioner.training.scst import SCSTConfig, scst_step_loss
from captioner.utils import autocast, cpu_has_bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default="greedy", choices=["greedy", "mean"])
    ap.add_argument("--end-prob", type=float, default=0.09)
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"])
    ap.add_argument("--grid", type=int, default=7, help="G: G x G feature locations (Lite0: 7 at 224 px, 9 at 288 px as in flickr8k_scst)")
    ap.add_argument("--query", default="previous", choices=["previous", "current", "topdown"], help="model.query: what drives the attention")
    ap.add_argument("--layers", type=int, default=None, help="model.num_layers (default 1; 2 with --query topdown)")
    ap.add_argument("--positions", default="none", choices=["none", "sincos"], help="model.positions: location codes added to the grid")
    args = ap.parse_args()
    if args.precision != "fp32" and not cpu_has_bf16():
        print("note: this CPU has no native bf16 products; bf16 will be slower than float32 here")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    V = 2500
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(V - len(SPECIALS)))])
    zipf = 1.0 / np.arange(1, V - len(SPECIALS) + 1)
    zipf /= zipf.sum()
    refs = [[" ".join(vocab.words[len(SPECIALS) + j] for j in rng.choice(len(zipf), rng.integers(8, 16), p=zipf))
             for _ in range(5)] for _ in range(args.train_images)]
    t0 = time.perf_counter()
    reward = CiderDReward(refs, vocab, include_end=True)
    build_s = time.perf_counter() - t0

    dec = AttentionDecoder(V, 1280, embed_dim=512, hidden_dim=512, attn_dim=512, context_dim=512, dropout=0.5,
                           query=args.query, positions=args.positions,
                           num_layers=args.layers or (2 if args.query == "topdown" else 1))
    with torch.no_grad():  # <end> with probability end_prob per step at initialisation: realistic lengths
        logit = np.log(args.end_prob / (1 - args.end_prob) * (V - 1))
        dec.out.bias[vocab.end_id] = float(logit)
    dec.train()
    opt = torch.optim.Adam(dec.parameters(), lr=5e-5)
    cfg = SCSTConfig(samples=args.samples, baseline=args.baseline, max_len=args.max_len)
    B = args.batch

    reward_s = [0.0]
    real_call = reward.__call__

    def timed(*a, **k):
        t = time.perf_counter()
        out = real_call(*a, **k)
        reward_s[0] += time.perf_counter() - t
        return out

    class Timed:  # scst_step_loss calls reward(...): route it through the timer
        vocab, include_end, bleu4_weight = reward.vocab, reward.include_end, reward.bleu4_weight

        def __call__(self, *a, **k):
            return timed(*a, **k)

    timed_reward = Timed()
    gen = torch.Generator().manual_seed(0)
    steps = {p: [] for p in precisions}
    rewards_share = {p: [] for p in precisions}
    words = {p: [] for p in precisions}
    cpu = torch.device("cpu")

    def timed_step(p: str, loss_of) -> tuple[float, dict]:
        """One optimiser step under precision p: (seconds, the dict loss_of returned)."""
        t = time.perf_counter()
        with autocast(p, cpu):
            out = loss_of()
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return time.perf_counter() - t, out

    for it in range(args.iters + 1):  # the first is a warm-up
        features = torch.randn(B, args.grid * args.grid, 1280)
        index = torch.as_tensor(rng.integers(0, args.train_images, B))
        for p in precisions:  # interleaved: both precisions see the same machine load
            reward_s[0] = 0.0
            dt, losses = timed_step(p, lambda: scst_step_loss(dec, features, index, timed_reward, cfg, gen))
            if it:
                steps[p].append(dt)
                rewards_share[p].append(reward_s[0])
                words[p].append(float(losses["words"]))

    # Teacher forcing on the same sizes, for scale.
    ce = {p: [] for p in precisions}
    for it in range(args.iters + 1):
        features = torch.randn(B, args.grid * args.grid, 1280)
        caps = torch.randint(len(SPECIALS), V, (B * args.samples, 13))
        caps[:, 0], caps[:, -1] = vocab.start_id, vocab.end_id
        image_of = torch.arange(B).repeat_interleave(args.samples)
        for p in precisions:
            dt, _ = timed_step(p, lambda: caption_loss(dec(features, caps, image_of=image_of), caps))
            if it:
                ce[p].append(dt)

    summary = {"images": B, "samples": args.samples, "baseline": args.baseline, "threads": args.threads, "iters": args.iters, "grid": args.grid,
               "query": args.query, "layers": dec.num_layers, "positions": args.positions,
               "reward_build_s": round(build_s, 2),
               "reward_captions_per_step": B * args.samples + (B if args.baseline == "greedy" else 0)}
    for p in precisions:
        step_ms = 1000 * float(np.median(steps[p]))
        reward_ms = 1000 * float(np.median(rewards_share[p]))
        ce_ms = 1000 * float(np.median(ce[p]))
        key = "" if p == precisions[0] else f"{p}_"
        summary.update({
            f"{key}precision": p, f"{key}mean_words": round(float(np.mean(words[p])), 2),
            f"{key}scst_step_ms": round(step_ms, 1), f"{key}reward_ms": round(reward_ms, 2),
            f"{key}reward_share": round(reward_ms / step_ms, 4), f"{key}xent_step_ms": round(ce_ms, 1),
            f"{key}scst_vs_xent": round(step_ms / ce_ms, 2)})
        print(f"[{p}] SCST step ({B} images x {args.samples} samples, {args.baseline} baseline, mean "
              f"{summary[key + 'mean_words']} words): {step_ms:.0f} ms; reward {reward_ms:.1f} ms ({100 * reward_ms / step_ms:.1f}%)")
        print(f"[{p}] cross-entropy step, same batch: {ce_ms:.0f} ms (SCST {step_ms / ce_ms:.2f}x)")
    print(f"reward built in {build_s:.1f} s for {args.train_images} images")
    if len(precisions) == 2:
        summary["bf16_speedup_scst"] = round(summary["scst_step_ms"] / summary["bf16_scst_step_ms"], 2)
        summary["bf16_speedup_xent"] = round(summary["xent_step_ms"] / summary["bf16_xent_step_ms"], 2)
        print(f"bf16 vs float32: SCST step {summary['bf16_speedup_scst']:.2f}x, cross-entropy step "
              f"{summary['bf16_speedup_xent']:.2f}x faster")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
