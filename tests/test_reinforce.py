"""REINFORCE for hard attention: the estimator against exact enumeration, its variance, and the training loss.

The estimator proof uses a tiny double-precision decoder with L=4 locations and T=2 predicted tokens,
so the L^T = 16 location sequences can be enumerated. The objective is

    J = E_s[log p(y | s, a)] + lambda_e H[s]      (lambda_r = 1),

E_s[log p(y|s,a)] being the paper's lower bound on log p(y|a) and H[s] = -sum_s p(s) log p(s) the
entropy of the whole location sequence; its exact gradient comes from autograd through the
enumerated sum. The surrogate gradient is computed by the real sampling path (HardAttention's
``torch.multinomial`` inside ``AttentionDecoder.forward``, ``hard_attention_loss``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from statistics import NormalDist

import pytest
import torch
from torch import Tensor, nn

from captioner.config import LossConfig
from captioner.models.decoder import AttentionDecoder, DecoderOutput
from captioner.training.losses import caption_loss
from captioner.training.reinforce import (
    ReinforceBaseline,
    caption_rewards,
    hard_attention_loss,
    leave_one_out,
    reinforce_terms,
    surrogate_from_terms,
)

L, V, D = 4, 6, 3
CAPTION = torch.tensor([[1, 4, 2]])  # <start> w <end>: T = 2 predicted tokens
LAMBDA_E = 0.1  # large enough that a wrong entropy gradient would show
N_SAMPLES = 20_000  # Monte-Carlo samples per estimator, drawn in GROUPS minibatches
GROUPS = 200


class FeatureCaptioner(nn.Module):
    """A Captioner stand-in whose 'images' are already features, so hard_attention_loss runs unchanged."""

    def __init__(self, decoder: AttentionDecoder):
        super().__init__()
        self.decoder = decoder

    def encode(self, images: Tensor) -> Tensor:
        return images  # (B, L, D)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor | None = None, image_of: Tensor | None = None,
                attend: str | None = None) -> DecoderOutput:
        return self.decoder(images, captions, lengths, attend=attend, image_of=image_of)


@pytest.fixture(scope="module")
def tiny() -> tuple[AttentionDecoder, Tensor]:
    """A tiny hard-attention decoder (dropout 0, float64) and one image's features (1, L, D)."""
    torch.manual_seed(0)
    dec = AttentionDecoder(V, D, embed_dim=4, hidden_dim=5, attn_dim=3, dropout=0.0, attention="hard").double()
    with torch.no_grad():  # sharper, history-dependent attention so every term of the gradient matters
        dec.attention.scorer.score.weight.mul_(4.0)
        dec.attention.scorer.hidden_proj.weight.mul_(3.0)
    features = torch.randn(1, L, D, dtype=torch.float64) * 1.5
    return dec, features


def params(dec: nn.Module) -> list[nn.Parameter]:
    return [p for p in dec.parameters() if p.requires_grad]


def flat_grad(y: Tensor, dec: nn.Module, retain: bool = False) -> Tensor:
    """Gradient of scalar y w.r.t. every parameter, flattened (P,); unused parameters give zeros."""
    gs = torch.autograd.grad(y, params(dec), retain_graph=retain, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params(dec))])


@contextlib.contextmanager
def forced_locations(seqs: Tensor) -> Iterator[None]:
    """Make HardAttention's sampler return ``seqs[:, t]`` at step t (rows in the decoder's sorted order)."""
    real = torch.multinomial
    step = iter(range(seqs.size(1)))

    def fake(probs: Tensor, num_samples: int, *args, **kwargs) -> Tensor:
        return seqs[: probs.size(0), next(step)].unsqueeze(1).to(probs.device)  # (B, 1)

    torch.multinomial = fake
    try:
        yield
    finally:
        torch.multinomial = real


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors: threads only add synchronisation (10x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run(dec: AttentionDecoder, features: Tensor, rows: int) -> DecoderOutput:
    """Teacher-forced, sampled decoder output for ``rows`` copies of the caption."""
    caps = CAPTION.expand(rows, -1)
    return dec(features.expand(rows, -1, -1), caps, torch.full((rows,), 3), attend="sample")


@pytest.fixture(scope="module")
def enumeration(tiny) -> dict[str, Tensor]:
    """Every location sequence through the real decoder: per-sequence terms and exact gradients."""
    dec, features = tiny
    seqs = torch.cartesian_prod(*[torch.arange(L)] * 2)  # (16, 2)
    with forced_locations(seqs), one_thread():
        out = run(dec, features, len(seqs))
    terms = reinforce_terms(out, CAPTION.expand(len(seqs), -1)[:, 1:])
    log_lik = terms.token_log_lik.sum(1)  # (16,) log p(y | s, a)
    log_ps = terms.location_log_prob.sum(1)  # (16,) log p(s | a)
    p = log_ps.exp()
    objective = (p * log_lik).sum() - LAMBDA_E * (p * log_ps).sum()  # E_s[log p(y|s,a)] + lambda_e H[s]
    exact = flat_grad(objective, dec, retain=True)  # (P,)
    # Per-sequence gradients of the baseline-free surrogate and of log p(s): g_b(s) = g_0(s) - b grad log p(s).
    surr = surrogate_from_terms(terms, None, 1.0, LAMBDA_E)  # (16,)
    with one_thread():
        g0 = torch.stack([flat_grad(surr[k], dec, retain=True) for k in range(len(seqs))])  # (16, P)
        score = torch.stack([flat_grad(log_ps[k], dec, retain=True) for k in range(len(seqs))])  # (16, P)
    return {"seqs": out.locations, "terms": terms, "log_lik": log_lik.detach(), "p": p.detach(), "exact": exact,
            "g0": g0, "score": score, "objective": objective}


def exact_variance(g: Tensor, p: Tensor, mean: Tensor) -> float:
    """Total variance sum_params Var_s[g(s)] of per-sequence gradients g (K, P) under p (K,)."""
    return float((p[:, None] * (g - mean) ** 2).sum())


# --------------------------------------------------------------------------------------------------
# Exact checks (no sampling)
def test_enumeration_covers_every_sequence(enumeration):
    seqs = {tuple(s) for s in enumeration["seqs"].tolist()}
    assert len(seqs) == L**2
    assert float(enumeration["p"].sum()) == pytest.approx(1.0, abs=1e-12)  # p(s|a) is a distribution over sequences


def test_attention_depends_on_history(enumeration):
    """Otherwise the entropy's score-function part and the sequence structure would go untested."""
    log_p2 = enumeration["terms"].location_log_prob[:, 1].view(L, L)  # (s1, s2)
    by_s1 = log_p2.exp()  # alpha_2[s2] for each s1
    assert float((by_s1 - by_s1.mean(0)).abs().max().detach()) > 1e-2


def test_forced_path_matches_sampled_path(tiny):
    """The forcing hook changes only which location is drawn."""
    dec, features = tiny
    torch.manual_seed(1)
    out = run(dec, features, 7)
    with forced_locations(out.locations):
        forced = run(dec, features, 7)
    assert torch.equal(forced.locations, out.locations)
    assert torch.allclose(forced.log_probs, out.log_probs) and torch.allclose(forced.location_log_probs, out.location_log_probs)


@pytest.mark.parametrize("reward_to_go", [False, True])
@pytest.mark.parametrize("lambda_r", [1.0, 0.5])
def test_surrogate_expectation_is_exact_gradient(tiny, enumeration, lambda_r, reward_to_go):
    """sum_s p(s) grad surrogate(s) == exact gradient, with and without a baseline (to rounding)."""
    dec, _ = tiny
    e = enumeration
    terms, p = e["terms"], e["p"]
    mean_reward = float((p * e["log_lik"]).sum())
    # The exact target for any lambda_r: path part + lambda_r * score part + lambda_e * grad H[s].
    logp_s = terms.location_log_prob.sum(1)
    path = (p * terms.token_log_lik.sum(1)).sum()  # p, the sampling weights, held fixed
    score_part = (logp_s.exp() * e["log_lik"]).sum()  # the reward held fixed
    ent = -(logp_s.exp() * logp_s).sum()
    target = flat_grad(path, dec, retain=True) + lambda_r * flat_grad(score_part, dec, retain=True) + LAMBDA_E * flat_grad(ent, dec, retain=True)
    if lambda_r == 1.0:
        assert torch.allclose(target, e["exact"], rtol=1e-9, atol=1e-12)
    n_remaining = terms.mask.flip(1).cumsum(1).flip(1)  # (16, T-1) tokens each step's reward covers
    for b in (None, mean_reward):
        base = None if b is None else (n_remaining * b / 2 if reward_to_go else torch.full((len(p),), b, dtype=p.dtype))
        surr = surrogate_from_terms(terms, base, lambda_r, LAMBDA_E, reward_to_go)  # (16,)
        expected = flat_grad((p * surr).sum(), dec, retain=True)  # p detached: the expectation of the gradient
        assert torch.allclose(expected, target, rtol=1e-9, atol=1e-12), float((expected - target).abs().max())


def test_leave_one_out_expectation_is_exact_gradient(tiny, enumeration):
    """M=2 samples per caption, every ordered pair enumerated: the LOO estimator is unbiased too."""
    dec, _ = tiny
    e = enumeration
    i, j = torch.cartesian_prod(torch.arange(L**2), torch.arange(L**2)).unbind(1)  # (256,) each
    rows = torch.stack([i, j], 1).flatten()  # (512,) the two samples of a caption on adjacent rows
    terms = type(e["terms"])(*(t[rows] for t in e["terms"]))
    base = leave_one_out(caption_rewards(terms), 2)  # (512,)
    per_caption = surrogate_from_terms(terms, base, 1.0, LAMBDA_E).view(-1, 2).mean(1)  # (256,)
    w = e["p"][i] * e["p"][j]
    expected = flat_grad((w * per_caption).sum(), dec, retain=True)
    assert torch.allclose(expected, e["exact"], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Monte Carlo through the real training path
def mc_gradients(dec: AttentionDecoder, features: Tensor, samples: int, baseline: ReinforceBaseline | None,
                 seed: int) -> Tensor:
    """Surrogate-gradient estimates from ``hard_attention_loss``, one per minibatch: (GROUPS, P).

    Each minibatch holds ``N_SAMPLES / GROUPS`` location sequences of the caption (``samples`` per
    caption copy); its mean gradient estimates E[grad], and the spread of the minibatch means gives
    the Monte-Carlo standard error (batch means) without one backward pass per sample.
    """
    torch.manual_seed(seed)
    model = FeatureCaptioner(dec)
    cfg = LossConfig(lambda_r=1.0, lambda_e=LAMBDA_E, soft_mix=0.0, doubly_stochastic=0.0, hard_samples=samples)
    copies = N_SAMPLES // GROUPS // samples
    caps, lengths = CAPTION.expand(copies, -1), torch.full((copies,), 3)
    image_of = torch.zeros(copies, dtype=torch.long)
    if baseline is not None:  # warm up the moving average as training would before measuring
        with torch.no_grad():
            for _ in range(20):
                hard_attention_loss(model, features, caps, lengths, image_of, cfg, baseline)
    out = []
    for _ in range(GROUPS):
        loss = hard_attention_loss(model, features, caps, lengths, image_of, cfg, baseline)["loss"]
        out.append(-2.0 * flat_grad(loss, dec))  # loss = -mean surrogate / 2 tokens per caption
    return torch.stack(out)  # (GROUPS, P)


@pytest.fixture(scope="module")
def monte_carlo(tiny) -> dict[str, Tensor]:
    dec, features = tiny
    with one_thread():
        return {
            "none": mc_gradients(dec, features, 1, None, seed=10),
            "moving": mc_gradients(dec, features, 1, ReinforceBaseline(0.9), seed=11),
            "loo": mc_gradients(dec, features, 4, None, seed=12),
        }


def z_scores(groups: Tensor, exact: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element z of the Monte-Carlo mean against the exact value, SE from batch means; and the mask of elements with spread."""
    mean = groups.mean(0)
    se = groups.std(0) / math.sqrt(groups.size(0))
    live = se > 1e-12 * (1 + exact.abs())  # elements whose gradient never changes with s have no error to test
    z = torch.where(live, (mean - exact) / se.clamp(min=1e-300), torch.zeros_like(mean))
    return z, live


@pytest.mark.parametrize("estimator", ["none", "moving", "loo"])
def test_monte_carlo_mean_matches_exact_gradient(enumeration, monte_carlo, estimator):
    """The mean surrogate gradient over 20k sampled sequences is within Monte-Carlo error of the exact gradient.

    Per element, |z| < 3 holds for all but a chance fraction (0.27% expected of independent
    elements, so a handful of ~500 may exceed 3 by chance alone); the assertions are (a) no element
    beyond the Bonferroni bound for the whole parameter vector at family-wise level 1e-3, and (b) at
    most 1.5% of elements beyond 3 SE. A wrong term (say a missing score part) gives |z| in the tens.
    """
    exact = enumeration["exact"]
    groups = monte_carlo[estimator]
    z, live = z_scores(groups, exact)
    P = int(live.sum())
    bound = NormalDist().inv_cdf(1 - 0.5e-3 / P) * (1 + 2.5 / GROUPS)  # small t-correction for the estimated SE
    beyond3 = int((z.abs() > 3).sum())
    print(f"{estimator}: {P} live elements, max |z| {float(z.abs().max()):.2f} (bound {bound:.2f}), {beyond3} beyond 3 SE")
    assert float(z.abs().max()) < bound
    assert beyond3 <= max(2, math.ceil(0.015 * P))
    dead = ~live  # elements with no spread must match exactly
    assert torch.allclose(groups.mean(0)[dead], exact[dead], atol=1e-9)


def test_monte_carlo_aggregate_chi_square(enumeration, monte_carlo):
    """All elements at once, for the baseline-free estimator: the Mahalanobis distance under the exact covariance.

    g(s) takes 16 values, so the covariance has rank <= 15 and N (mean - exact)^T Cov^+ (mean - exact)
    is chi-square with that many degrees of freedom.
    """
    e = enumeration
    w = e["p"].sqrt()[:, None] * (e["g0"] - e["exact"])  # (16, P) Cov = w^T w
    _, sv, vh = torch.linalg.svd(w, full_matrices=False)  # Cov^+ = V S^-2 V^T on the row space
    keep = sv > sv.max() * 1e-6
    rank = int(keep.sum())
    err = monte_carlo["none"].mean(0) - e["exact"]  # (P,)
    proj = vh[keep] @ err  # (rank,)
    stat = float(N_SAMPLES * (proj**2 / sv[keep] ** 2).sum())
    # chi-square 99.9% quantile by the Wilson-Hilferty approximation
    k, zq = rank, NormalDist().inv_cdf(0.999)
    q999 = k * (1 - 2 / (9 * k) + zq * math.sqrt(2 / (9 * k))) ** 3
    print(f"chi-square {stat:.1f} on {rank} df (99.9% quantile {q999:.1f})")
    assert 10 <= rank <= 15
    assert stat < q999


def test_baselines_reduce_variance(enumeration, monte_carlo):
    """Measured total variance per sampled sequence: moving-average and leave-one-out baselines beat none."""
    e = enumeration
    per_group = N_SAMPLES // GROUPS
    var = {k: float(g.var(0).sum()) * per_group for k, g in monte_carlo.items()}  # per sampled sequence
    # Exact variances for the fixed-baseline estimators, to check the measurement itself.
    b_star = float((e["p"] * e["log_lik"]).sum())
    exact_none = exact_variance(e["g0"], e["p"], e["exact"])
    exact_mean_b = exact_variance(e["g0"] - b_star * e["score"], e["p"], e["exact"])
    print({**{f"measured_{k}": round(v, 4) for k, v in var.items()}, "exact_none": round(exact_none, 4),
           "exact_b=E[R]": round(exact_mean_b, 4)})
    assert var["none"] == pytest.approx(exact_none, rel=0.25)
    assert var["moving"] < var["none"]
    assert var["loo"] < var["none"]  # per sequence, i.e. at equal compute (the LOO caption average holds 4)
    assert exact_mean_b < exact_none


# --------------------------------------------------------------------------------------------------
# The baseline and the training loss on the real configuration
def test_baseline_update_and_state_round_trip():
    b = ReinforceBaseline(0.9)
    assert b.value is None
    assert torch.equal(b.expected(torch.tensor([3.0])), torch.tensor([0.0]))
    b.update(-2.0)
    assert b.value == -2.0  # the first value initialises
    b.update(-1.0)
    assert b.value == pytest.approx(0.9 * -2.0 + 0.1 * -1.0)
    b.update(float("nan"))  # ignored
    assert b.value == pytest.approx(-1.9) and b.updates == 2
    assert torch.allclose(b.expected(torch.tensor([2, 5])), torch.tensor([-3.8, -9.5]))
    state = b.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    c = ReinforceBaseline(0.5)
    c.load_state_dict(state)
    assert c.state_dict() == state
    with pytest.raises(ValueError):
        ReinforceBaseline(1.0)


def test_leave_one_out_layout():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    assert torch.allclose(leave_one_out(r, 3), torch.tensor([2.5, 2.0, 1.5, 25.0, 20.0, 15.0]))


@pytest.fixture
def hard_setup(tiny_shapes, tmp_path):
    """The real conf (experiment=shapes_hard) on the tiny shapes world, a built model and one batch."""
    from conftest import TINY_MODEL, compose_train

    from captioner.data.datasets import CaptionGroups, collate_groups
    from captioner.data.images import normalise_uint8
    from captioner.models.captioner import build_model
    from captioner.data.build import build_data

    def make(*extra: str):
        cfg = compose_train(["experiment=shapes_hard", f"data.root={tiny_shapes}", "data.generate=false",
                             f"output_dir={tmp_path / 'run'}", "epochs=1", *TINY_MODEL, "model.dropout=0.0", *extra])
        torch.manual_seed(0)
        data = build_data(cfg.data)
        model = build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size)
        groups = CaptionGroups(data.records["train"][:4], data.vocab, data.stores["train"], cfg.data.max_caption_len, 2)
        batch = collate_groups([groups[i] for i in range(4)])
        images = normalise_uint8(batch["images"], model.spec.mean, model.spec.std)
        return cfg, model, (images, batch["captions"], batch["lengths"], batch["image_of"])

    return make


def test_config_composes_hard():
    from conftest import compose_train

    cfg = compose_train(["experiment=shapes_hard", "output_dir=/tmp/x"])
    assert cfg.model.attention == "hard" and cfg.model.name == "hard"
    assert 0.0 <= cfg.loss.soft_mix <= 1.0 and cfg.loss.hard_samples >= 1
    assert cfg.decode.hard_attend in ("expected", "argmax", "sample")


def test_soft_mix_one_equals_soft_loss(hard_setup):
    cfg, model, batch = hard_setup("loss.soft_mix=1.0")
    images, captions, lengths, image_of = batch
    state = torch.get_rng_state()
    losses = hard_attention_loss(model, images, captions, lengths, image_of, cfg.loss, ReinforceBaseline())
    assert torch.equal(torch.get_rng_state(), state)  # no draw when the choice is certain
    ref = caption_loss(model(images, captions, lengths, image_of, attend="expected"), captions, cfg.loss.doubly_stochastic)
    assert torch.allclose(losses["loss"], ref["loss"]) and torch.allclose(losses["nll"], ref["nll"])
    assert float(losses["hard"]) == 0.0


def test_soft_mix_draws_are_reproducible(tiny):
    """The soft/hard choice comes from torch's global RNG, so the same seed (or a restored RNG state) repeats it."""
    dec, features = tiny
    model, cfg = FeatureCaptioner(dec), LossConfig(soft_mix=0.5)
    batch = (features, CAPTION.expand(2, -1), torch.full((2,), 3), torch.zeros(2, dtype=torch.long))

    def choices(seed: int) -> tuple[list[float], list[float]]:
        torch.manual_seed(seed)
        with torch.no_grad():
            runs = [hard_attention_loss(model, *batch, cfg, ReinforceBaseline()) for _ in range(16)]
        return [float(r["hard"]) for r in runs], [float(r["loss"]) for r in runs]

    a = choices(3)
    assert a == choices(3)  # the same choices and the same sampled locations
    assert 0 < sum(a[0]) < len(a[0])


@pytest.mark.parametrize("samples", [1, 3])
def test_hard_loss_finite_and_reaches_every_parameter(hard_setup, samples):
    cfg, model, batch = hard_setup("loss.soft_mix=0.0", f"loss.hard_samples={samples}")
    baseline = ReinforceBaseline(cfg.loss.baseline_decay)
    for _ in range(2):  # the second call uses the moving-average baseline
        model.zero_grad(set_to_none=True)
        losses = hard_attention_loss(model, *batch, cfg.loss, baseline)
        assert {"loss", "nll"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
        assert float(losses["hard"]) == 1.0
        losses["loss"].backward()
    assert baseline.updates == 2
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


@pytest.mark.slow
def test_train_one_epoch_hard(tiny_shapes, tmp_path):
    """The training job runs end to end with hard attention and saves the baseline in the checkpoint."""
    from conftest import TINY_MODEL, compose_train

    from captioner.models.checkpoint import load_checkpoint
    from captioner.training.loop import train

    out = tmp_path / "hard"
    cfg = compose_train(["experiment=shapes_hard", f"data.root={tiny_shapes}", "data.generate=false", f"output_dir={out}",
                         "epochs=2", "loss.soft_epochs=1", "loss.soft_mix=0.0", *TINY_MODEL])
    results = train(cfg)
    assert all(math.isfinite(v) for v in results.values())
    assert "BLEU-4" in results
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["baseline"]["value"] is not None
    # soft_epochs=1: the first epoch uses the expected context only, the second samples every batch
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["train"]["hard"] for e in epochs] == [0.0, 1.0]
