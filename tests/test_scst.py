"""Self-critical sequence training: the reward against the metrics module, the baselines, the sampler, and
the SCST gradient against the exact gradient of the expected reward.

The estimator proof uses a tiny double-precision decoder over 3 real words with ``max_len=2``, so every
outcome of the policy can be enumerated: ``<end>``, ``w <end>``, ``w w <end>`` and ``w w`` cut after
max_len words (1 + 3 + 9 + 9 = 22 captions per image). The expected reward
J = mean over images of sum_c pi(c | image) r(c, image) is differentiated exactly by autograd through
that sum; its probabilities come from the decoder's ``step()`` with a renormalisation written here
independently of ``captioner.training.scst``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from captioner.data.tokenize import tokenize
from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.decoding import greedy_decode
from captioner.decoding.constraints import BAD_ENDINGS, DecodeMask
from captioner.metrics import bleu_scores, cider_d_scores, evaluate
from captioner.metrics.reward import CUT_WORD, END_WORD, CiderDReward
from captioner.models.decoder import AttentionDecoder
from captioner.training.scst import (
    SCSTConfig,
    greedy_baseline,
    greedy_captions,
    mean_baseline,
    policy_log_probs,
    sample_captions,
    scst_loss,
    scst_step_loss,
)

WORDS = ["a", "b", "c"]
VOCAB = Vocabulary([*SPECIALS, *WORDS])  # V = 7: ids 4, 5, 6 are the real words
REAL = [VOCAB.index[w] for w in WORDS]
END = VOCAB.end_id
MAX_LEN = 2
L, D = 3, 4
# Three images (a document frequency needs more than one); the first two are captioned.
REFS = [["a b", "a b c", "a"], ["c", "c b", "b c a", "c c"], ["b", "a c", "b b"]]
IMAGES = torch.tensor([0, 1])
GROUPS = 150  # Monte-Carlo minibatches per estimator
COPIES = 40  # copies of each captioned image per minibatch
K = 4  # samples per image


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors: threads only add synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def params(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def flat_grad(y: Tensor, m: nn.Module) -> Tensor:
    """Gradient of scalar y w.r.t. every parameter, flattened (P,); unused parameters give zeros."""
    gs = torch.autograd.grad(y, params(m), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params(m))])


@pytest.fixture(scope="module")
def tiny() -> tuple[AttentionDecoder, Tensor, CiderDReward]:
    """A tiny soft-attention decoder (dropout 0, float64), features of the two captioned images, the reward."""
    torch.manual_seed(1)  # a seed where every caption has probability > 1e-3 and <end> first is not dominant
    dec = AttentionDecoder(len(VOCAB), D, embed_dim=4, hidden_dim=5, attn_dim=3, dropout=0.0).double()
    features = torch.randn(2, L, D, dtype=torch.float64) * 1.5
    return dec, features, CiderDReward(REFS, VOCAB, include_end=True)


# --------------------------------------------------------------------------------------------------
# Exact enumeration
def all_captions() -> list[tuple[list[int], bool]]:
    """Every outcome of the policy with MAX_LEN = 2: (words, finished)."""
    out: list[tuple[list[int], bool]] = [([], True)]
    for n in (1, 2):
        out += [(list(ws), True) for ws in itertools.product(REAL, repeat=n)]
    out += [(list(ws), False) for ws in itertools.product(REAL, repeat=2)]
    return out


def exact_log_prob(dec: AttentionDecoder, features: Tensor, words: list[int], finished: bool) -> Tensor:
    """log pi(caption | image) for one image's features (1, L, D): renormalised over <end> and the real words."""
    allowed = torch.tensor([END, *REAL])
    memory = dec.init_memory(features)
    state = dec.init_state(memory)
    prev = torch.tensor([VOCAB.start_id])
    total = features.new_zeros(())
    for t, w in enumerate([*words, END]):
        out = dec.step(prev, state, memory)
        logits = out.log_probs[0, allowed]
        logp = logits - torch.logsumexp(logits, 0)  # over the allowed choices only
        p_of = dict(zip(allowed.tolist(), logp.unbind()))
        if t == len(words) and not finished:  # cut after MAX_LEN words: anything but <end>
            total = total + torch.log1p(-p_of[END].exp())
        else:
            total = total + p_of[w]
        prev, state = torch.tensor([w]), out.state
    return total


@pytest.fixture(scope="module")
def enumeration(tiny) -> dict:
    """Per image: every caption, its exact log-probability and reward; the exact gradient of J."""
    dec, features, reward = tiny
    caps = all_captions()
    logps, rewards = [], []
    for i in range(2):
        logps.append(torch.stack([exact_log_prob(dec, features[i : i + 1], w, f) for w, f in caps]))  # (22,)
        rewards.append(reward([[VOCAB.words[x] for x in w] for w, _ in caps], [i] * len(caps), [f for _, f in caps]))
    logp = torch.stack(logps)  # (2, 22)
    r = torch.stack(rewards)  # (2, 22)
    J = (logp.exp() * r).sum(1).mean()
    return {"captions": caps, "log_prob": logp.detach(), "reward": r, "exact": flat_grad(J, dec)}


def test_enumeration_is_a_distribution(enumeration):
    p = enumeration["log_prob"].exp()
    assert torch.allclose(p.sum(1), torch.ones(2, dtype=p.dtype), atol=1e-12)
    assert float(p.min()) > 1e-3  # every caption is likely enough to be sampled often
    r = enumeration["reward"]
    assert float(r.std()) > 0.1 and len(set(r.flatten().tolist())) > 10  # a reward that distinguishes captions


def key(tokens: list[int]) -> tuple[tuple[int, ...], bool]:
    """(words, finished) of a sampled id row."""
    words = tuple(t for t in tokens if t in REAL)
    return words, END in tokens


def test_sampler_log_probs_are_exact(tiny, enumeration):
    """The sampler's per-caption log-probability equals the enumerated one for every caption it draws."""
    dec, features, _ = tiny
    with one_thread():
        s = sample_captions(dec, features, 200, MAX_LEN, generator=torch.Generator().manual_seed(3))
    table = {(tuple(w), f): j for j, (w, f) in enumerate(enumeration["captions"])}
    seq = (s.log_probs * s.mask).sum(1).detach()
    for row in range(s.tokens.size(0)):
        j = table[key(s.tokens[row].tolist())]
        assert float(seq[row]) == pytest.approx(float(enumeration["log_prob"][row // 200, j]), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Monte Carlo through the real training path
def mc_gradients(dec: AttentionDecoder, features: Tensor, reward: CiderDReward, cfg: SCSTConfig, seed: int,
                 biased: bool = False) -> Tensor:
    """Unbiased-scaled gradient estimates of J from ``scst_step_loss``, one per minibatch (GROUPS, P).

    With ``normalise="tokens"`` the loss divides by the batch's decisions Z: multiplying its gradient
    by Z / N (N samples) gives the plain estimator (1/N) sum (r - b) grad log pi, whose expectation is
    grad J. ``biased``: the baseline includes the sample's own reward (a negative control).
    """
    gen = torch.Generator().manual_seed(seed)
    feats = features.repeat(COPIES, 1, 1)  # (2C, L, D): image i at rows i, i+2, ...
    index = IMAGES.repeat(COPIES)
    out = []
    for _ in range(GROUPS):
        if biased:
            s = sample_captions(dec, feats, cfg.samples, cfg.max_len, generator=gen)
            r = reward(s.tokens, index.repeat_interleave(cfg.samples)).view(-1, cfg.samples)
            losses = scst_loss(s.log_probs, s.mask, r, r.mean(1, keepdim=True).expand_as(r), normalise=cfg.normalise)
        else:
            losses = scst_step_loss(dec, feats, index, reward, cfg, generator=gen)
        scale = float(losses["length"]) if cfg.normalise == "tokens" else 1.0  # Z / N
        out.append(-scale * flat_grad(losses["loss"], dec))
    return torch.stack(out)


@pytest.fixture(scope="module")
def monte_carlo(tiny) -> dict[str, Tensor]:
    dec, features, reward = tiny
    runs = {
        "greedy": SCSTConfig(samples=K, baseline="greedy", max_len=MAX_LEN),
        "mean": SCSTConfig(samples=K, baseline="mean", max_len=MAX_LEN),
        "mean/samples": SCSTConfig(samples=K, baseline="mean", max_len=MAX_LEN, normalise="samples"),
    }
    with one_thread():
        out = {name: mc_gradients(dec, features, reward, cfg, seed=10 + i) for i, (name, cfg) in enumerate(runs.items())}
        out["biased"] = mc_gradients(dec, features, reward, runs["mean"], seed=20, biased=True)
    return out


def z_scores(groups: Tensor, exact: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element z of the Monte-Carlo mean against the exact value (SE from batch means), and the elements with spread."""
    mean = groups.mean(0)
    se = groups.std(0) / math.sqrt(groups.size(0))
    live = se > 1e-12 * (1 + exact.abs())
    z = torch.where(live, (mean - exact) / se.clamp(min=1e-300), torch.zeros_like(mean))
    return z, live


def bonferroni(P: int) -> float:
    """|z| bound for P elements at family-wise level 1e-3, with a small t-correction for the estimated SE."""
    return NormalDist().inv_cdf(1 - 0.5e-3 / P) * (1 + 2.5 / GROUPS)


@pytest.mark.parametrize("estimator", ["greedy", "mean", "mean/samples"])
def test_monte_carlo_mean_matches_exact_gradient(enumeration, monte_carlo, estimator):
    """The mean SCST gradient over 48k sampled captions is within Monte-Carlo error of grad J, per element.

    As in tests/test_reinforce.py: no element beyond the Bonferroni bound for the whole vector, at most
    1.5% of the elements beyond 3 SE, and elements without spread (words never sampled) exact.
    """
    exact = enumeration["exact"]
    groups = monte_carlo[estimator]
    z, live = z_scores(groups, exact)
    P = int(live.sum())
    beyond3 = int((z.abs() > 3).sum())
    print(f"{estimator}: {P} live elements, max |z| {float(z.abs().max()):.2f} (bound {bonferroni(P):.2f}), {beyond3} beyond 3 SE")
    assert P > 100
    assert float(z.abs().max()) < bonferroni(P)
    assert beyond3 <= max(2, math.ceil(0.015 * P))
    assert torch.allclose(groups.mean(0)[~live], exact[~live], atol=1e-12)


def test_monte_carlo_detects_a_biased_baseline(enumeration, monte_carlo):
    """Power check: a baseline that includes the sample's own reward shrinks the gradient by (K-1)/K, and the test sees it."""
    exact = enumeration["exact"]
    z, live = z_scores(monte_carlo["biased"], exact)
    assert float(z.abs().max()) > 2 * bonferroni(int(live.sum()))
    shrink = float(monte_carlo["biased"].mean(0) @ exact / (exact @ exact))
    assert shrink == pytest.approx((K - 1) / K, abs=0.05)


def test_sampled_frequencies_match_policy(tiny, enumeration):
    """Chi-square goodness of fit of 8,000 sampled captions per image against the enumerated probabilities."""
    dec, features, _ = tiny
    n = 8000
    with one_thread(), torch.no_grad():
        s = sample_captions(dec, features, n, MAX_LEN, generator=torch.Generator().manual_seed(5))
    table = {(tuple(w), f): j for j, (w, f) in enumerate(enumeration["captions"])}
    for i in range(2):
        counts = Counter(table[key(row)] for row in s.tokens[i * n : (i + 1) * n].tolist())
        observed = torch.tensor([counts.get(j, 0) for j in range(len(table))], dtype=torch.float64)
        expected = enumeration["log_prob"][i].exp() * n
        stat = float(((observed - expected) ** 2 / expected).sum())
        df, zq = len(table) - 1, NormalDist().inv_cdf(0.999)
        q999 = df * (1 - 2 / (9 * df) + zq * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty
        assert stat < q999, (i, stat, q999)


# --------------------------------------------------------------------------------------------------
# Baselines and loss
def test_mean_baseline_uses_the_other_samples_only():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]], dtype=torch.float64)
    b = mean_baseline(r)
    assert torch.equal(b, torch.tensor([[11 / 3, 10 / 3, 3.0, 2.0], [4 / 3, 4 / 3, 0.0, 4 / 3]], dtype=torch.float64))
    for k in range(4):  # a sample's own reward never moves its baseline
        r2 = r.clone()
        r2[:, k] += 100.0
        assert torch.equal(mean_baseline(r2)[:, k], b[:, k])
    with pytest.raises(ValueError):
        mean_baseline(r[:, :1])


def test_scst_loss_normalisation_and_logged_terms():
    log_probs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    entropy = torch.tensor([[1.0, 3.0, 9.0], [2.0, 2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    r, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    out = scst_loss(log_probs, mask, r, b, entropy, entropy_weight=0.1)
    expected = -((2 - 1) * (-3.0) + (1 - 3) * (-1.5)) / 5 - 0.1 * (1 + 3 + 2 + 2 + 2) / 5
    assert float(out["loss"].detach()) == pytest.approx(expected, abs=1e-12)
    assert float(out["reward"]) == 1.5 and float(out["baseline"]) == 2.0
    assert float(out["length"]) == 2.5 and float(out["entropy"]) == pytest.approx(2.0)
    samples = scst_loss(log_probs, mask, r, b, normalise="samples")
    assert float(samples["loss"].detach()) == pytest.approx(-((2 - 1) * (-3.0) + (1 - 3) * (-1.5)) / 2, abs=1e-12)
    out["loss"].backward()
    assert float(log_probs.grad[0, 2]) == 0.0  # padding after the end gets nothing


def test_step_loss_logs_and_mean_baseline_average(tiny):
    """With the leave-one-out baseline the mean baseline equals the mean reward exactly; the greedy one logs its reward."""
    dec, features, reward = tiny
    gen = torch.Generator().manual_seed(0)
    out = scst_step_loss(dec, features, IMAGES, reward, SCSTConfig(samples=3, baseline="mean", max_len=MAX_LEN), gen)
    assert float(out["baseline"]) == pytest.approx(float(out["reward"]), abs=1e-12)
    out = scst_step_loss(dec, features, IMAGES, reward, SCSTConfig(samples=3, baseline="greedy", max_len=MAX_LEN), gen)
    assert float(out["baseline"]) == pytest.approx(float(out["greedy_reward"]), abs=1e-12)
    assert {"loss", "reward", "baseline", "length", "entropy", "words", "finished", "greedy_reward"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="include_end"):
        scst_step_loss(dec, features, IMAGES, reward, SCSTConfig(max_len=MAX_LEN, include_end=False), gen)


def test_entropy_bonus(tiny):
    """The bonus subtracts entropy_weight x the mean per-decision entropy, with its gradient; the same samples otherwise."""
    dec, features, reward = tiny
    runs = {}
    for w in (0.0, 0.5):
        cfg = SCSTConfig(samples=3, baseline="mean", max_len=MAX_LEN, entropy_weight=w)
        out = scst_step_loss(dec, features, IMAGES, reward, cfg, torch.Generator().manual_seed(4))
        runs[w] = (out, flat_grad(out["loss"], dec))
    (plain, g0), (bonus, g1) = runs[0.0], runs[0.5]
    assert float(bonus["entropy"]) == pytest.approx(float(plain["entropy"]), abs=1e-12) and float(plain["entropy"]) > 0
    assert float(bonus["loss"].detach() - plain["loss"].detach()) == pytest.approx(-0.5 * float(plain["entropy"]), abs=1e-12)
    assert float((g1 - g0).norm()) > 1e-3 * float(g0.norm())
    s = sample_captions(dec, features, 2, MAX_LEN, entropy_grad=False)
    with pytest.raises(ValueError, match="entropy"):
        scst_loss(s.log_probs, s.mask, torch.zeros(4), torch.zeros(4), s.entropy, entropy_weight=0.1)


def test_config_validation():
    with pytest.raises(ValueError):
        SCSTConfig(baseline="moving")
    with pytest.raises(ValueError):
        SCSTConfig(baseline="mean", samples=1)
    with pytest.raises(ValueError):
        SCSTConfig(normalise="words")


# --------------------------------------------------------------------------------------------------
# The reward
def random_corpus(seed: int, words: list[str], n_images: int = 25) -> tuple[list[list[str]], list[list[str]]]:
    rng = random.Random(seed)
    refs = [[" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 5))] for _ in range(n_images)]
    hyps = [rng.choices(words + ["zebra", "quux"], k=rng.randint(0, 12)) for _ in range(n_images)]
    hyps[0] = tokenize(refs[0][0])  # an exact match
    hyps[1] = hyps[1][:3] * 3  # repeated n-grams: clipping
    return refs, hyps


@pytest.mark.parametrize("include_end", [False, True])
def test_reward_equals_metrics_cider(include_end):
    """Per caption, the reward is cider_d_scores of the same strings (df from the same set), with <end> (or <cut>) appended when asked."""
    words = ["a", "man", "dog", "on", "the", "red", "ball", "runs", "in", "grass"]
    refs, hyps = random_corpus(1, words)
    reward = CiderDReward(refs, include_end=include_end)
    finished = [i % 3 != 2 for i in range(len(hyps))]
    got = reward(hyps, range(len(hyps)), finished).numpy()
    ref_tok = [[tokenize(r) + ([END_WORD] if include_end else []) for r in rs] for rs in refs]
    hyp_tok = [tokenize(" ".join(h)) + ([END_WORD if f else CUT_WORD] if include_end else []) for h, f in zip(hyps, finished)]
    _, expected = cider_d_scores(ref_tok, hyp_tok)
    expected = np.array(expected)
    assert expected.max() > 1.0 and (expected > 0).sum() > 10
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    if not include_end:  # and from raw strings through the public evaluate(), keyed by image id
        ids = [f"img{i}" for i in range(len(refs))]
        reward = CiderDReward(refs, image_ids=ids, include_end=False)
        per = evaluate(dict(zip(ids, refs)), {i: " ".join(h) for i, h in zip(ids, hyps)}, per_image=True)["per_image"]
        np.testing.assert_allclose(reward(hyps, ids).numpy(), [per[i]["CIDEr-D"] for i in ids], rtol=1e-9, atol=1e-12)


def test_reward_is_per_caption_against_the_whole_reference_set():
    """Several captions of the same image score independently; df always comes from all reference images."""
    words = ["a", "man", "dog", "on", "the", "red", "ball"]
    refs, hyps = random_corpus(2, words, n_images=8)
    reward = CiderDReward(refs, include_end=False)
    single = reward(hyps, range(8)).numpy()
    image = [3, 3, 3, 5, 5, 0]
    many = reward([hyps[i] for i in image], image).numpy()
    np.testing.assert_allclose(many, single[image], rtol=1e-12)
    # The same caption, scored alone, is unchanged by what else is in the batch.
    np.testing.assert_allclose(reward([hyps[3]], [3]).numpy(), single[[3]], rtol=1e-12)


def test_reward_bleu4_weight_equals_metrics_bleu():
    words = ["a", "man", "dog", "on", "the", "red", "ball", "runs"]
    refs, hyps = random_corpus(3, words)
    for include_end in (False, True):
        base = CiderDReward(refs, include_end=include_end)
        mixed = CiderDReward(refs, include_end=include_end, bleu4_weight=0.5)
        got = (mixed(hyps, range(len(hyps))) - base(hyps, range(len(hyps)))).numpy() / 0.5
        tail = [END_WORD] if include_end else []
        _, bleu = bleu_scores([[tokenize(r) + tail for r in rs] for rs in refs], [tokenize(" ".join(h)) + tail for h in hyps])
        expected = np.array(bleu)[:, 3]
        assert expected.max() > 0.3
        np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-12)


def test_include_end_semantics():
    """<end> is a word in references and finished hypotheses, <cut> ends a caption cut at max_len: fragments and
    unfinished captions lose the ending n-grams, and being cut never pays more than ending wrongly."""
    refs = [["a dog runs on the grass", "a dog on the grass"], ["a man in a red shirt", "a man rides a bike"], ["two cats"]]
    with_end, without = CiderDReward(refs, include_end=True), CiderDReward(refs, include_end=False)
    full = ["a", "dog", "on", "the", "grass"]
    assert float(with_end([full], [0], [True])) > float(with_end([full], [0], [False]))  # unfinished: no "grass <end>"
    assert float(without([full], [0], [True])) == float(without([full], [0], [False]))  # the flag is ignored without it
    fragment = ["a", "dog", "on", "the"]
    # Without <end> the fragment keeps most of its score; with it, "the <end>" matches no reference ending.
    drop_with = float(with_end([fragment], [0])) / float(with_end([full], [0]))
    drop_without = float(without([fragment], [0])) / float(without([full], [0]))
    assert drop_with < drop_without
    # Exactly what the definition says: <end> appended to every reference and to finished hypotheses.
    ref_tok = [[tokenize(r) + [END_WORD] for r in rs] for rs in refs]
    _, per = cider_d_scores(ref_tok, [full + [END_WORD], tokenize("a man") + [CUT_WORD], ["two", "cats", END_WORD]])
    got = with_end([full, ["a", "man"], ["two", "cats"]], [0, 1, 2], [True, False, True]).numpy()
    np.testing.assert_allclose(got, per, rtol=1e-9)
    assert tokenize(END_WORD) != [END_WORD] and tokenize(CUT_WORD) != [CUT_WORD]  # text never produces them
    # A caption cut at max_len scores no higher than the same words ending wrongly (without <cut> it scored
    # higher, which taught SCST to stop ending captions): a fragment, a repetition, a wrong ending.
    for words in (fragment, full[:3] * 3, ["a", "dog", "runs", "on", "the", "red"]):
        cut, ended = float(with_end([words], [0], [False])), float(with_end([words], [0], [True]))
        assert 0 < cut <= ended, (words, cut, ended)


def test_reward_from_token_ids_and_odd_vocabulary_words():
    """Id rows are cut at <end> (finished) or <pad>; words are re-tokenised like decoded text in evaluate()."""
    vocab = Vocabulary([*SPECIALS, "a", "dog", "-lrb-", "st.", "cannot", "run"])
    refs = [["a dog cannot run (st. x)", "a dog"], ["a run", "dog dog"]]
    reward = CiderDReward(refs, vocab, include_end=True)
    ids = {w: vocab.index[w] for w in vocab.words}
    rows = torch.tensor([
        [ids["a"], ids["dog"], vocab.end_id, 0, 0],
        [ids["a"], ids["dog"], 0, 0, 0],  # cut: unfinished
        [ids["-lrb-"], ids["st."], ids["cannot"], ids["run"], vocab.end_id],
        [vocab.end_id, 0, 0, 0, 0],  # the empty caption
    ])
    got = reward(rows, torch.tensor([0, 0, 0, 1]))
    words = [["a", "dog"], ["a", "dog"], ["-lrb-", "st.", "cannot", "run"], []]
    expected = reward(words, [0, 0, 0, 1], [True, False, True, True])
    assert torch.equal(got, expected)
    assert reward.hypothesis_tokens(words[2]) == [*tokenize("-lrb- st. cannot run"), END_WORD]
    assert float(got[0]) != float(got[1])


def test_reward_construction_errors():
    with pytest.raises(ValueError):
        CiderDReward([])
    with pytest.raises(ValueError):
        CiderDReward([["a"], []])
    reward = CiderDReward([["a b"], ["b"]])
    with pytest.raises(IndexError):
        reward([["a"]], [2])
    with pytest.raises(ValueError, match="vocabulary"):
        reward(torch.tensor([[4, 2]]), [0])


# --------------------------------------------------------------------------------------------------
# The sampler
DECODERS = {
    "soft": {"attention": "soft", "context_dim": 3},
    "hard": {"attention": "hard"},
    "show_tell": {"attention": "none"},
    "show_tell_first": {"attention": "none", "image_input": "first"},
    "gru_2layer": {"attention": "soft", "cell": "gru", "num_layers": 2},
}


def make_decoder(**kw) -> AttentionDecoder:
    torch.manual_seed(1)
    return AttentionDecoder(len(VOCAB), D, embed_dim=6, hidden_dim=5, attn_dim=3, dropout=0.0, **kw)


@pytest.mark.parametrize("name", list(DECODERS))
def test_samples_reach_every_parameter_and_memory_is_computed_once(name, monkeypatch):
    dec = make_decoder(**DECODERS[name])
    calls: list[tuple[int, ...]] = []
    real = dec.init_memory
    monkeypatch.setattr(dec, "init_memory", lambda f: (calls.append(tuple(f.shape)), real(f))[1])
    projections: list[tuple[int, ...]] = []
    if dec.attention is not None:
        dec.attention.scorer.feature_proj.register_forward_hook(lambda m, i, o: projections.append(tuple(i[0].shape)))
    B, S = 3, 5
    features = torch.randn(B, L, D)
    reward = CiderDReward(REFS, VOCAB)
    losses = scst_step_loss(dec, features, torch.tensor([0, 1, 2]), reward, SCSTConfig(samples=S, max_len=4),
                            torch.Generator().manual_seed(0))
    assert calls == [(B, L, D)]  # one memory for the B images, shared by the B*S samples and the greedy captions
    if dec.attention is not None:
        assert projections == [(B, L, D)]
    assert torch.isfinite(losses["loss"])
    # Gradients through the sampled log-probabilities reach every parameter.
    s = sample_captions(dec, features, S, 4, generator=torch.Generator().manual_seed(1))
    (s.log_probs * s.mask).sum().backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_sample_shapes_masks_and_lengths():
    dec = make_decoder()
    B, S, T = 4, 6, 3
    features = torch.randn(B, L, D)
    s = sample_captions(dec, features, S, T, generator=torch.Generator().manual_seed(2))
    N = B * S
    assert s.tokens.shape[0] == N and s.tokens.shape[1] <= T + 1
    assert s.log_probs.shape == s.mask.shape == s.entropy.shape == s.tokens.shape
    assert s.lengths.shape == s.finished.shape == (N,)
    assert s.log_probs.requires_grad
    assert not bool(((s.tokens == VOCAB.unk_id) | (s.tokens == VOCAB.start_id)).any())
    for row in range(N):
        toks, m = s.tokens[row].tolist(), s.mask[row].tolist()
        n_words = sum(t in REAL for t in toks)
        assert n_words <= T
        assert m == sorted(m, reverse=True)  # decisions form a prefix
        decisions = int(sum(m))
        if s.finished[row]:
            assert toks[n_words] == END and decisions == n_words + 1 == int(s.lengths[row])
        else:  # cut after T words: the cut decision is counted, no token is stored for it
            assert n_words == T and decisions == T + 1 and int(s.lengths[row]) == T
        assert all(t == VOCAB.pad_id for t in toks[int(s.lengths[row]) :])
        assert (s.log_probs[row].detach()[decisions:] == 0).all() and (s.entropy[row][decisions:] == 0).all()
    assert bool((s.entropy.detach()[s.mask.bool()] > 0).all())
    assert float(s.entropy.detach().max()) <= math.log(len(REAL) + 1) + 1e-6  # <end> and 3 words are allowed
    # Reproducible from the generator.
    again = sample_captions(dec, features, S, T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.tokens, s.tokens) and torch.equal(again.log_probs, s.log_probs)


def test_policy_log_probs_mask_temperature():
    lp = torch.log_softmax(torch.randn(2, len(VOCAB)), -1)
    prev = torch.full((2,), VOCAB.start_id)
    pi = policy_log_probs(lp, prev, 0, 5)
    assert torch.isneginf(pi[:, [VOCAB.pad_id, VOCAB.start_id, VOCAB.unk_id]]).all()
    allowed = [END, *REAL]
    assert torch.allclose(pi[:, allowed], torch.log_softmax(lp[:, allowed], -1))
    hot = policy_log_probs(lp, prev, 0, 5, temperature=0.5)
    assert torch.allclose(hot[:, allowed], torch.log_softmax(lp[:, allowed] / 0.5, -1))


def test_block_bad_endings_in_samples():
    vocab = Vocabulary([*SPECIALS, "a", "dog", "the", "on"])
    torch.manual_seed(3)
    dec = AttentionDecoder(len(vocab), D, embed_dim=6, hidden_dim=5, attn_dim=3, dropout=0.0)
    mask = DecodeMask(vocab, block_bad_endings=True)
    s = sample_captions(dec, torch.randn(4, L, D), 50, 3, mask=mask, generator=torch.Generator().manual_seed(0))
    lasts = [vocab.words[[t for t in row if t > 3][-1]] for row in s.tokens.tolist() if any(t > 3 for t in row)]
    assert lasts and not any(w in BAD_ENDINGS for w in lasts)


def test_greedy_matches_greedy_decode_and_uses_eval_mode():
    dec = AttentionDecoder(len(VOCAB), D, embed_dim=6, hidden_dim=5, attn_dim=3, dropout=0.5)
    with torch.no_grad():  # greedy_decode does not ban <pad>/<start>; make them unlikely so both agree
        dec.out.bias[[VOCAB.pad_id, VOCAB.start_id]] = -50.0
    features = torch.randn(6, L, D)
    dec.train()
    g = greedy_captions(dec, features, 5)
    assert dec.training  # mode restored
    dec.eval()  # greedy_decode decodes in the mode it is given; greedy_captions always in eval mode
    ref = greedy_decode(dec, features, VOCAB, max_len=5)
    dec.train()
    for row, cap in zip(g.tokens.tolist(), ref):
        assert [t for t in row if t in REAL] == cap.tokens and (END in row) == cap.finished
    reward = CiderDReward(REFS, VOCAB)
    b = greedy_baseline(dec, features, [0, 1, 2, 0, 1, 2], reward, 5)
    assert not b.requires_grad and b.shape == (6,)
    assert torch.equal(b, greedy_baseline(dec, features, [0, 1, 2, 0, 1, 2], reward, 5))  # deterministic


def test_dropout_off_samples_the_eval_mode_policy_with_gradients():
    """scst.dropout=false: the same samples and log-probabilities as in eval mode, gradients kept, mode restored."""
    torch.manual_seed(3)
    dec = AttentionDecoder(len(VOCAB), D, embed_dim=6, hidden_dim=5, attn_dim=3, dropout=0.5).double()
    features = torch.randn(2, L, D, dtype=torch.float64)
    reward = CiderDReward(REFS, VOCAB)
    cfg = SCSTConfig(samples=3, baseline="mean", max_len=MAX_LEN, dropout=False)
    dec.eval()
    ref = scst_step_loss(dec, features, IMAGES, reward, cfg, torch.Generator().manual_seed(5))
    dec.train()
    out = scst_step_loss(dec, features, IMAGES, reward, cfg, torch.Generator().manual_seed(5))
    assert dec.training  # restored
    for k in ("loss", "reward", "entropy", "words"):
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-12, abs=1e-12)
    grads = torch.autograd.grad(out["loss"], params(dec), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # with dropout on (the default) the training-mode rollout differs from the eval-mode one
    on = [scst_step_loss(dec, features, IMAGES, reward, SCSTConfig(samples=3, baseline="mean", max_len=MAX_LEN),
                         torch.Generator().manual_seed(5)) for _ in range(3)]
    assert any(abs(float(o["entropy"]) - float(ref["entropy"])) > 1e-9 for o in on)
