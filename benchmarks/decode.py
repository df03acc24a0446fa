"""Decoding throughput and peak memory on CPU: greedy, sampling, batched beam search, beam search one image at a time.

Two random-init decoders (weights do not change the cost, only the lengths, which are pinned):
  demo      64 locations x 128 features, embedding/LSTM 256, attention 128, 40 words
  flickr8k  7x7 = 49 locations x 1280 features (EfficientNet-Lite0), embedding/LSTM/attention 512, 2,600 words
<end> is biased down by 30 so that no caption ends early: every strategy runs the full ``max_len`` + 1
steps and the strategies are compared on equal lengths (the average lengths are printed to show it).

Timings: one subprocess per model decodes each batch with every strategy in turn, ``--repeats``
rounds, and sums each (strategy, batch)'s best round; interleaving batch by batch makes the ratios
fair when the load of a shared machine comes and goes.
Beam K=5 at batch 1 decodes a subset (``--single-images``); its images/s are those of the subset.
Memory: each (model, strategy) decodes one batch in its own subprocess so that its peak resident
memory (``ru_maxrss``) is its own; ``peak_delta_mb`` is that peak minus the resident size once the
model and features are loaded (tracemalloc does not see torch's allocations).

    python benchmarks/decode.py [--images 256] [--batch 64] [--single-images 32] [--max-len 20] [--threads 2]

The last line printed is a JSON object; ``beam5_batched_vs_single_speedup`` (images/s of beam K=5 at
batch 64 over batch 1) and ``beam5_vs_greedy_cost`` (per-image time of beam K=5 over greedy, both at
batch 64) are for the flickr8k-sized model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MODELS = {
    "demo": dict(locations=64, feature_dim=128, embed_dim=256, hidden_dim=256, attn_dim=128, vocab=40),
    "flickr8k": dict(locations=49, feature_dim=1280, embed_dim=512, hidden_dim=512, attn_dim=512, vocab=2600),
}
STRATEGIES = ("greedy", "sample", "sample_top_p", "beam3", "beam5", "beam5_b1")


def rss_mb() -> float:
    """Current resident set size in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup(model: str, args: argparse.Namespace) -> tuple[dict[str, Callable], Any, Any]:
    """The random-init decoder, the features and one callable per strategy (features -> captions)."""
    import torch

    from captioner.data.vocab import SPECIALS, Vocabulary
    from captioner.decoding import beam_search, greedy_decode, sample_decode
    from captioner.models.decoder import AttentionDecoder

    torch.set_num_threads(args.threads)
    spec = MODELS[model]
    torch.manual_seed(0)
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(spec["vocab"] - len(SPECIALS))])
    decoder = AttentionDecoder(len(vocab), spec["feature_dim"], spec["embed_dim"], spec["hidden_dim"], spec["attn_dim"]).eval()
    with torch.no_grad():
        decoder.out.bias[vocab.end_id] -= 30.0  # no caption ends before max_len (see module docstring)
    # Non-negative like pooled CNN activations.
    features = torch.rand(args.images, spec["locations"], spec["feature_dim"], generator=torch.Generator().manual_seed(1))  # (N, L, D)
    m = args.max_len
    runs = {
        "greedy": lambda f: greedy_decode(decoder, f, vocab, max_len=m),
        "sample": lambda f: sample_decode(decoder, f, vocab, max_len=m, temperature=1.0, seed=0),
        "sample_top_p": lambda f: sample_decode(decoder, f, vocab, max_len=m, temperature=1.0, top_p=0.9, seed=0),
        "beam3": lambda f: [c[0] for c in beam_search(decoder, f, vocab, beam_size=3, max_len=m)],
        "beam5": lambda f: [c[0] for c in beam_search(decoder, f, vocab, beam_size=5, max_len=m)],
    }
    runs["beam5_b1"] = runs["beam5"]
    return runs, decoder, features


def images_and_batch(strategy: str, args: argparse.Namespace) -> tuple[int, int]:
    """How many images a strategy decodes, and in batches of how many."""
    return (args.single_images, 1) if strategy.endswith("_b1") else (args.images, args.batch)


def time_worker(model: str, args: argparse.Namespace) -> dict:
    """Every strategy on one model, interleaved batch by batch; each batch's time is its best over the rounds."""
    runs, decoder, features = setup(model, args)
    for run in runs.values():
        run(features[:2])  # warm-up: first-call allocations and kernel selection
    # On a shared machine the load comes and goes within seconds: timing each batch of each strategy
    # back to back and keeping each batch's best round compares the strategies under the same load.
    best: dict[tuple[str, int], float] = {}
    captions: dict[tuple[str, int], list] = {}
    bare = {"greedy": (args.batch, 1), "beam5": (args.batch, 5), "beam5_b1": (1, 5)}  # images, rows per image
    steps = {name: float("inf") for name in bare}
    for _ in range(args.repeats):
        for i in range(0, args.images, args.batch):
            for strategy in (s for s in STRATEGIES if not s.endswith("_b1")):
                elapsed, captions[strategy, i] = timed(runs[strategy], features[i : i + args.batch])
                best[strategy, i] = min(best.get((strategy, i), float("inf")), elapsed)
        for i in range(args.single_images):
            elapsed, captions["beam5_b1", i] = timed(runs["beam5_b1"], features[i : i + 1])
            best["beam5_b1", i] = min(best.get(("beam5_b1", i), float("inf")), elapsed)
        for name, (b, k) in bare.items():  # the decoder alone: the floor under any decoding
            steps[name] = min(steps[name], bare_steps(decoder, features[:b], k, args.max_len + 1) / b)
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        n_images, _ = images_and_batch(strategy, args)
        seconds = sum(v for (s, _), v in best.items() if s == strategy)
        caps = [c for (s, _), cs in captions.items() if s == strategy for c in cs]
        out[strategy] = {
            "images": n_images, "batch": images_and_batch(strategy, args)[1], "seconds": round(seconds, 3),
            "images_per_s": round(n_images / seconds, 2),
            "avg_len": round(sum(len(c.tokens) for c in caps) / len(caps), 2),
            "finished": round(sum(c.finished for c in caps) / len(caps), 3),
        }
    out["bare_step_ms_per_image"] = {k: round(1000 * v, 3) for k, v in steps.items()}
    out["bare_step_cost_beam5_vs_greedy"] = round(steps["beam5"] / steps["greedy"], 2)
    out["bare_step_speedup_beam5_batched_vs_single"] = round(steps["beam5_b1"] / steps["beam5"], 2)
    out["share_in_step"] = step_share(runs, decoder, features, args)
    return out


def step_share(runs: dict[str, Callable], decoder: Any, features: Any, args: argparse.Namespace) -> dict[str, float]:
    """Fraction of each strategy's time spent inside ``decoder.step`` (the rest is the strategy's own work)."""
    inner = decoder.step
    spent = [0.0]

    def timed_step(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        result = inner(*a, **k)
        spent[0] += time.perf_counter() - start
        return result

    decoder.step = timed_step  # an instance attribute shadows the method for this measurement only
    shares = {}
    try:
        for strategy in ("greedy", "beam5", "beam5_b1"):
            best = (float("inf"), 0.0)
            for _ in range(args.repeats):
                spent[0] = 0.0
                start = time.perf_counter()
                if strategy.endswith("_b1"):
                    for i in range(min(8, args.single_images)):
                        runs[strategy](features[i : i + 1])
                else:
                    runs[strategy](features[: args.batch])
                best = min(best, (time.perf_counter() - start, spent[0]))
            shares[strategy] = round(best[1] / best[0], 3)
    finally:
        del decoder.step
    return shares


def timed(run: Callable, features: Any) -> tuple[float, list]:
    """Wall seconds of one call, and its result."""
    start = time.perf_counter()
    result = run(features)
    return time.perf_counter() - start, result


def bare_steps(decoder: Any, features: Any, k: int, steps: int) -> float:
    """Seconds for ``steps`` bare ``decoder.step`` calls on k rows per image: the floor under any decoding."""
    import torch

    with torch.no_grad():
        memory = decoder.init_memory(features)
        rows = torch.arange(features.size(0)).repeat_interleave(k)  # (B*k,)
        # k rows per image read one memory entry, as beam search's K hypotheses do
        state = decoder.init_state(memory).index_select(rows)
        prev = torch.full((rows.numel(),), 1)  # <start>
        start = time.perf_counter()
        for _ in range(steps):
            state = decoder.step(prev, state, memory).state
        return time.perf_counter() - start


def memory_worker(model: str, strategy: str, args: argparse.Namespace) -> dict:
    """Peak resident memory of decoding one batch, over the resident size once model and features are loaded."""
    runs, _, features = setup(model, args)
    _, batch = images_and_batch(strategy, args)
    runs[strategy](features[:2])  # same warm-up as the timed runs
    base = rss_mb()
    runs[strategy](features[:batch])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_rss_mb": round(peak, 1), "peak_delta_mb": round(peak - base, 1)}


def run_worker(*argv: str) -> dict:
    """Run this script as a worker subprocess and return the JSON of its last line."""
    # Spinning OpenMP threads that wait for a descheduled partner make 2-thread timings on a loaded
    # machine 10-20x slower and erratic; passive waiting keeps them about the work (export to override).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        sys.exit(f"worker {argv} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--single-images", type=int, default=32, help="images decoded one at a time (a subset)")
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each batch's best round counts")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--time-worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_worker:
        print(json.dumps(time_worker(args.time_worker, args)))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args)))
        return

    load_before = os.getloadavg()
    forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("images", "batch", "single_images", "max_len", "threads", "repeats")]
    summary: dict = {"threads": args.threads, "max_len": args.max_len, "batch": args.batch, "images": args.images,
                     "single_images": args.single_images, "repeats": args.repeats,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    for model in args.models:
        timing = run_worker("--time-worker", model, *forwarded)
        memory = {s: run_worker("--memory-worker", model, s, *forwarded) for s in STRATEGIES}
        for s in STRATEGIES:
            print(f"{model:9s} {s:12s} " + " ".join(f"{k}={v}" for k, v in {**timing[s], **memory[s]}.items()), flush=True)
        print(f"{model:9s} bare decoder.step ms/image: {timing['bare_step_ms_per_image']}; "
              f"share of time inside decoder.step: {timing['share_in_step']}", flush=True)
        summary[model] = {
            "images_per_s": {s: timing[s]["images_per_s"] for s in STRATEGIES},
            "peak_delta_mb": {s: memory[s]["peak_delta_mb"] for s in STRATEGIES},
            "avg_len": {s: timing[s]["avg_len"] for s in STRATEGIES},
            "speedup_beam5_batched_vs_single": round(timing["beam5"]["images_per_s"] / timing["beam5_b1"]["images_per_s"], 2),
            "cost_beam5_vs_greedy": round(timing["greedy"]["images_per_s"] / timing["beam5"]["images_per_s"], 2),
            "bare_step_cost_beam5_vs_greedy": timing["bare_step_cost_beam5_vs_greedy"],
            "bare_step_speedup_beam5_batched_vs_single": timing["bare_step_speedup_beam5_batched_vs_single"],
            "share_in_step": timing["share_in_step"],
        }
    summary["load_average_before"] = [round(x, 2) for x in load_before]
    summary["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if "flickr8k" in summary:
        summary["beam5_batched_vs_single_speedup"] = summary["flickr8k"]["speedup_beam5_batched_vs_single"]
        summary["beam5_vs_greedy_cost"] = summary["flickr8k"]["cost_beam5_vs_greedy"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
