"""Decoding: beam search against exhaustive enumeration, batched against per-image, K=1 against greedy; sampling.

The exhaustive reference scores every caption of at most MAX_LEN words followed by <end>. With
K = EXHAUSTIVE_K every extension at every step is among the K best, so beam search finishes all of them
too and never needs its unfinished fallback (tested separately, with <end> made impossible).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from captioner.config import DecodeConfig
from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.decoding import Caption, beam_search, decode, decode_nbest, greedy_decode, length_penalties, sample_decode
from captioner.decoding.sample import sample_words
from captioner.models.decoder import AttentionDecoder

V, L, D, MAX_LEN = 6, 4, 6, 3
VOCAB = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(V - len(SPECIALS))])
END = VOCAB.end_id
# Large enough that every candidate of every step is among the K best: at step t there are
# (V-1)^t live prefixes x V extensions, so beam search then examines every sequence.
EXHAUSTIVE_K = (V - 1) ** MAX_LEN * V


def tiny_decoder(seed: int, attention: str = "soft", end_bias: float = 0.0) -> AttentionDecoder:
    """A random decoder whose word distributions are peaked enough for rankings to matter."""
    torch.manual_seed(seed)
    decoder = AttentionDecoder(V, D, embed_dim=12, hidden_dim=12, attn_dim=8, attention=attention, dropout=0.0)
    with torch.no_grad():
        decoder.out.weight.mul_(3.0)
        decoder.out.bias[END] += end_bias
    return decoder.eval()


def tiny_features(seed: int, batch: int = 4) -> Tensor:
    """Seeded random annotation vectors, scaled up so that attention differs between images."""
    return torch.randn(batch, L, D, generator=torch.Generator().manual_seed(1000 + seed)) * 2.0  # (B, L, D)


def has_repeat(words: tuple[int, ...], n: int) -> bool:
    """Whether some n-gram occurs twice in ``words``."""
    grams = [words[i : i + n] for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


@torch.no_grad()
def enumerate_finished(decoder: AttentionDecoder, features: Tensor, max_len: int) -> dict[tuple[int, ...], float]:
    """Every caption of at most ``max_len`` words followed by <end> for one image (1, L, D) -> summed log-prob."""
    memory = decoder.init_memory(features)
    state = decoder.init_state(memory)
    prefixes: list[tuple[int, ...]] = [()]
    scores = torch.zeros(1)  # (P,)
    prev = torch.tensor([VOCAB.start_id])  # (P,)
    nonend = [w for w in range(V) if w != END]
    out_scores = {}
    for t in range(max_len + 1):
        P = len(prefixes)
        out = decoder.step(prev, state, memory.index_select(torch.zeros(P, dtype=torch.long)))
        for i, prefix in enumerate(prefixes):
            out_scores[prefix] = float(scores[i] + out.log_probs[i, END])
        if t == max_len:
            break
        parent = torch.tensor([i for i in range(P) for _ in nonend])  # (P*(V-1),)
        prev = torch.tensor(nonend * P)  # (P*(V-1),)
        scores = scores[parent] + out.log_probs[parent, prev]  # accumulated in the same order as beam search
        state = out.state.index_select(parent)
        prefixes = [p + (w,) for p in prefixes for w in nonend]
    return out_scores


def best_by(scored: dict[tuple[int, ...], float], penalty: str, alpha: float = 0.7) -> tuple[tuple[int, ...], float]:
    """The caption with the best length-normalised score, and its raw score."""
    lp = length_penalties(MAX_LEN + 1, penalty, alpha)
    seq = max(scored, key=lambda s: scored[s] / lp[len(s) + 1])
    return seq, scored[seq]


@torch.no_grad()
def rescore(decoder: AttentionDecoder, features: Tensor, tokens: list[int], finished: bool) -> tuple[float, Tensor]:
    """Teacher-forced summed log-prob of ``tokens`` (+ <end> if finished) and the attention rows (T, L) of the words."""
    memory = decoder.init_memory(features)
    state = decoder.init_state(memory)
    prev, total, rows = VOCAB.start_id, 0.0, []
    for w in tokens + ([END] if finished else []):
        out = decoder.step(torch.tensor([prev]), state, memory)
        total += float(out.log_probs[0, w])
        rows.append(out.alpha[0])
        prev, state = w, out.state
    return total, torch.stack(rows[: len(tokens)]) if tokens else torch.zeros(0, L)


def check_attention(c: Caption) -> None:
    """One attention row per word, each a distribution over the L locations."""
    assert c.attention.shape == (len(c.tokens), L)
    if c.tokens:
        torch.testing.assert_close(c.attention.sum(-1), torch.ones(len(c.tokens)), atol=1e-5, rtol=0)
    assert c.words == [VOCAB.words[i] for i in c.tokens]


# --------------------------------------------------------------------------------------------------
# Beam search against exhaustive enumeration
@pytest.mark.parametrize("penalty", ["none", "average", "gnmt"])
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_with_large_k_equals_exhaustive_search(seed: int, penalty: str) -> None:
    decoder, feats = tiny_decoder(seed), tiny_features(seed, batch=2)
    beams = beam_search(decoder, feats, VOCAB, beam_size=EXHAUSTIVE_K, max_len=MAX_LEN, length_penalty=penalty, n_best=3)
    for b in range(2):
        scored = enumerate_finished(decoder, feats[b : b + 1], MAX_LEN)
        lp = length_penalties(MAX_LEN + 1, penalty, 0.7)
        ranked = sorted(scored, key=lambda s: scored[s] / lp[len(s) + 1], reverse=True)[:3]
        assert [tuple(c.tokens) for c in beams[b]] == ranked
        for c, seq in zip(beams[b], ranked):
            assert c.finished and c.score == pytest.approx(scored[seq], abs=1e-5)
            check_attention(c)


def test_no_repeat_ngram_equals_exhaustive_search_without_repeats() -> None:
    # The average penalty favours long captions, and this model's best ones repeat (w1 w0 w0, w0 w0 w0).
    decoder, feats = tiny_decoder(2), tiny_features(2, batch=2)
    kw = dict(beam_size=EXHAUSTIVE_K, max_len=MAX_LEN, length_penalty="average")
    plain = beam_search(decoder, feats, VOCAB, **kw)
    for n in (1, 2):
        assert any(has_repeat(tuple(p[0].tokens), n) for p in plain)  # so blocking must change an answer
        beams = beam_search(decoder, feats, VOCAB, no_repeat_ngram=n, **kw)
        for b in range(2):
            scored = enumerate_finished(decoder, feats[b : b + 1], MAX_LEN)
            seq, score = best_by({s: v for s, v in scored.items() if not has_repeat(s, n)}, "average")
            assert tuple(beams[b][0].tokens) == seq and beams[b][0].score == pytest.approx(score, abs=1e-5)


def test_length_penalties_favour_longer_captions() -> None:
    """A divisor that grows faster with length can only move the best caption to an equal or longer one:
    none <= gnmt(0.7) <= average in length; gnmt with alpha=0 is none."""
    longer = 0
    for seed in (0, 3):
        decoder, feats = tiny_decoder(seed), tiny_features(seed, batch=2)
        kw = dict(beam_size=EXHAUSTIVE_K, max_len=MAX_LEN)
        none = beam_search(decoder, feats, VOCAB, **kw)
        gnmt = beam_search(decoder, feats, VOCAB, length_penalty="gnmt", alpha=0.7, **kw)
        avg = beam_search(decoder, feats, VOCAB, length_penalty="average", **kw)
        gnmt0 = beam_search(decoder, feats, VOCAB, length_penalty="gnmt", alpha=0.0, **kw)
        for b in range(2):
            assert len(none[b][0].tokens) <= len(gnmt[b][0].tokens) <= len(avg[b][0].tokens)
            assert avg[b][0].score <= gnmt[b][0].score <= none[b][0].score  # none maximises the raw score
            assert gnmt0[b][0].tokens == none[b][0].tokens
            longer += len(avg[b][0].tokens) > len(none[b][0].tokens)
    assert longer > 0, "the average penalty never changed the ranking: the test model is too easy"


# --------------------------------------------------------------------------------------------------
# Batching, greedy equivalence, unfinished beams
@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_batched_beam_equals_per_image_beam(attention: str) -> None:
    decoder, feats = tiny_decoder(3, attention=attention, end_bias=-1.0), tiny_features(3, batch=4)
    cases = [(1, {}), (2, {}), (3, {"length_penalty": "average"}), (5, {"no_repeat_ngram": 2, "n_best": 2}), (8, {"length_penalty": "gnmt"})]
    if attention == "hard":  # the locations come from the same back-pointers: fewer cases suffice
        cases = cases[::2]
    for K, extra in cases:
        kw = dict(beam_size=K, max_len=5, **extra)
        batched = beam_search(decoder, feats, VOCAB, **kw)
        for b in range(feats.size(0)):
            alone = beam_search(decoder, feats[b : b + 1], VOCAB, **kw)[0]
            assert [c.tokens for c in batched[b]] == [c.tokens for c in alone], (K, b)
            for x, y in zip(batched[b], alone):
                assert x.score == pytest.approx(y.score, abs=1e-5) and x.finished == y.finished
                torch.testing.assert_close(x.attention, y.attention, atol=1e-5, rtol=0)
                assert x.locations == y.locations


@pytest.mark.parametrize("attention", ["soft", "hard"])
@pytest.mark.parametrize("end_bias", [0.0, -1.5, -30.0])  # early ends, late ends, never ends
def test_beam_of_one_is_greedy(attention: str, end_bias: float) -> None:
    for seed in range(3):
        decoder, feats = tiny_decoder(seed, attention=attention, end_bias=end_bias), tiny_features(seed, batch=5)
        attend = "argmax" if attention == "hard" else "expected"
        greedy = greedy_decode(decoder, feats, VOCAB, max_len=6, attend=attend)
        beam = beam_search(decoder, feats, VOCAB, beam_size=1, max_len=6, attend=attend)
        for g, (bm,) in zip(greedy, beam):
            assert bm.tokens == g.tokens and bm.finished == g.finished
            assert bm.score == pytest.approx(g.score, abs=1e-5)
            torch.testing.assert_close(bm.attention, g.attention)
            assert bm.locations == g.locations
            if attention == "hard":
                assert bm.locations is not None and len(bm.locations) == len(bm.tokens)


def test_beams_that_never_end_still_return_their_best_hypothesis() -> None:
    decoder, feats = tiny_decoder(4, end_bias=-1e4), tiny_features(4, batch=3)
    nbest = beam_search(decoder, feats, VOCAB, beam_size=4, max_len=5, n_best=3)
    for captions in nbest:
        assert len(captions) == 3
        for c in captions:
            assert not c.finished and len(c.tokens) == 5 and c.score > -1e3  # <end>'s log-prob is not in the score
            check_attention(c)
        assert captions[0].score >= captions[1].score >= captions[2].score
    for b, captions in enumerate(nbest):
        for c in captions:  # scores and attention rows are those of the words returned
            score, attention = rescore(decoder, feats[b : b + 1], c.tokens, c.finished)
            assert c.score == pytest.approx(score, abs=1e-4)
            torch.testing.assert_close(c.attention, attention, atol=1e-5, rtol=0)


def test_nbest_is_ranked_and_distinct() -> None:
    decoder, feats = tiny_decoder(5), tiny_features(5, batch=3)
    for penalty in ("none", "average"):
        lp = length_penalties(MAX_LEN + 1, penalty)
        nbest = beam_search(decoder, feats, VOCAB, beam_size=6, max_len=MAX_LEN, n_best=4, length_penalty=penalty)
        for captions in nbest:
            ranks = [c.score / lp[len(c.tokens) + 1] for c in captions if c.finished]
            assert ranks == sorted(ranks, reverse=True)
            assert len({tuple(c.tokens) for c in captions}) == len(captions)
    with pytest.raises(ValueError):
        beam_search(decoder, feats, VOCAB, beam_size=2, n_best=3)


# --------------------------------------------------------------------------------------------------
# Sampling
def test_sampling_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    decoder, feats = tiny_decoder(6), tiny_features(6, batch=8)
    rng = torch.get_rng_state()
    a = sample_decode(decoder, feats, VOCAB, max_len=6, seed=11)
    assert torch.equal(torch.get_rng_state(), rng)
    b = sample_decode(decoder, feats, VOCAB, max_len=6, seed=11)
    c = sample_decode(decoder, feats, VOCAB, max_len=6, seed=12)
    assert [x.tokens for x in a] == [x.tokens for x in b] and [x.score for x in a] == [x.score for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    for x in a:
        check_attention(x)
    hard = tiny_decoder(6, attention="hard")
    h1 = sample_decode(hard, feats, VOCAB, max_len=6, seed=3, attend="sample")
    h2 = sample_decode(hard, feats, VOCAB, max_len=6, seed=3, attend="sample")
    assert [x.locations for x in h1] == [x.locations for x in h2]
    assert torch.equal(torch.get_rng_state(), rng)


def test_sampling_approaches_greedy() -> None:
    decoder, feats = tiny_decoder(7, end_bias=-1.0), tiny_features(7, batch=8)
    greedy = greedy_decode(decoder, feats, VOCAB, max_len=6)
    for kw in [dict(temperature=0.0), dict(temperature=1e-4), dict(top_k=1), dict(top_p=1e-6)]:
        sampled = sample_decode(decoder, feats, VOCAB, max_len=6, seed=1, **kw)
        assert [s.tokens for s in sampled] == [g.tokens for g in greedy], kw
        assert [s.score for s in sampled] == pytest.approx([g.score for g in greedy], abs=1e-5)


def test_sampling_respects_top_k() -> None:
    decoder, feats = tiny_decoder(8), tiny_features(8, batch=16)
    sampled = sample_decode(decoder, feats, VOCAB, max_len=1, temperature=5.0, top_k=2, seed=0)
    logp = decoder.step(torch.full((16,), VOCAB.start_id), decoder.init_state(decoder.init_memory(feats)),
                        decoder.init_memory(feats)).log_probs  # (16, V)
    allowed = logp.topk(2, dim=-1).indices.tolist()
    for s, ok in zip(sampled, allowed):
        first = s.tokens[0] if s.tokens else END
        assert first in ok


def test_sample_words_keeps_exactly_the_top_k_and_the_nucleus() -> None:
    log_probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log().repeat(3000, 1)  # (3000, 4) sorted: w1 w3 w2 w0
    generator = torch.Generator().manual_seed(0)
    for top_k, top_p, allowed in [(0, 0.5, {1}), (0, 0.6, {1, 3}), (0, 0.85, {1, 3, 2}), (0, 1.0, {0, 1, 2, 3}),
                                  (2, 1.0, {1, 3}), (3, 0.7, {1, 3})]:
        words = sample_words(log_probs, 1.0, top_k, top_p, generator)  # (3000,)
        assert set(words.tolist()) == allowed, (top_k, top_p)
    words = sample_words(log_probs, 1.0, 2, 1.0, generator)
    assert float((words == 1).float().mean()) == pytest.approx(0.5 / 0.75, abs=0.04)  # renormalised over the two kept
    hot = sample_words(log_probs, 100.0, 0, 1.0, generator)  # a high temperature flattens towards uniform
    assert float((hot == 0).float().mean()) == pytest.approx(0.25, abs=0.04)


# --------------------------------------------------------------------------------------------------
# Dispatch and the decode config group
@pytest.mark.parametrize("option", ["greedy", "sample", "beam"])
def test_decode_config_group_dispatches(option: str) -> None:
    from conftest import compose_train

    cfg = compose_train([f"decode={option}", "data.root=unused", "output_dir=unused", "decode.max_len=4", "decode.n_best=2",
                         "decode.beam_size=3"]).decode
    assert isinstance(cfg, DecodeConfig) and cfg.strategy == option
    decoder, feats = tiny_decoder(9), tiny_features(9, batch=3)
    best = decode(decoder, feats, VOCAB, cfg)
    nbest = decode_nbest(decoder, feats, VOCAB, cfg)
    assert len(best) == len(nbest) == 3
    for one, many in zip(best, nbest):
        check_attention(one)
        assert len(many) == (1 if option == "greedy" else 2)
        if option != "sample":
            assert many[0].tokens == one.tokens
    with pytest.raises(ValueError):
        decode(decoder, feats, VOCAB, DecodeConfig(strategy="nucleus"))


def test_exhaustive_enumeration_counts_every_caption() -> None:
    """The reference itself: (V-1)^0 + ... + (V-1)^max_len captions, scores that are log-probabilities."""
    scored = enumerate_finished(tiny_decoder(0), tiny_features(0, batch=1), MAX_LEN)
    assert len(scored) == sum((V - 1) ** t for t in range(MAX_LEN + 1))
    assert set(scored) == {s for t in range(MAX_LEN + 1) for s in itertools.product([w for w in range(V) if w != END], repeat=t)}
    assert all(v < 0 for v in scored.values())
