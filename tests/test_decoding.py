"""Decoding: beam search against exhaustive enumeration, batched against per-image, K=1 against greedy; sampling.

The exhaustive reference scores every caption of at most MAX_LEN words followed by <end>. With
K = EXHAUSTIVE_K every extension at every step is among the K best, so beam search finishes all of them
too and never needs its unfinished fallback (tested separately, with <end> made impossible).

Word masks (captioner/decoding/constraints.py) are checked the same way: the reference enumerates every
caption with the model's true log-probabilities and then keeps only the allowed ones (no <unk> unless
allowed; with block_bad_endings, no caption whose last word is a bad ending), never renormalising.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from captioner.config import DecodeConfig
from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.decoding import (
    BAD_ENDINGS, Caption, DecodeMask, bad_ending_rate, beam_search, decode, decode_nbest, greedy_decode, length_penalties,
    sample_decode,
)
from captioner.decoding.sample import sample_words
from captioner.models.decoder import AttentionDecoder

V, L, D, MAX_LEN = 6, 4, 6, 3
VOCAB = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(V - len(SPECIALS))])
END, UNK = VOCAB.end_id, VOCAB.unk_id
# The same ids with a bad-ending word: "the" (id 4) may not end a caption under block_bad_endings.
BAD_VOCAB = Vocabulary(list(SPECIALS) + ["the", "dog"])
THE = BAD_VOCAB.index["the"]
# Large enough that every candidate of every step is among the K best: at step t there are
# (V-1)^t live prefixes x V extensions, so beam search then examines every sequence.
EXHAUSTIVE_K = (V - 1) ** MAX_LEN * V


def tiny_decoder(seed: int, attention: str = "soft", end_bias: float = 0.0, query: str = "previous") -> AttentionDecoder:
    """A random decoder whose word distributions are peaked enough for rankings to matter."""
    torch.manual_seed(seed)
    decoder = AttentionDecoder(V, D, embed_dim=12, hidden_dim=12, attn_dim=8, attention=attention, dropout=0.0, query=query,
                               num_layers=2 if query == "topdown" else 1)
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


def check_attention(c: Caption, vocab: Vocabulary = VOCAB) -> None:
    """One attention row per word, each a distribution over the L locations."""
    assert c.attention.shape == (len(c.tokens), L)
    if c.tokens:
        torch.testing.assert_close(c.attention.sum(-1), torch.ones(len(c.tokens)), atol=1e-5, rtol=0)
    assert c.words == [vocab.words[i] for i in c.tokens]


# --------------------------------------------------------------------------------------------------
# Beam search against exhaustive enumeration
def allowed(seq: tuple[int, ...], allow_unk: bool = False, block_bad_endings: bool = False) -> bool:
    """The masks' definition, written independently: no <unk> (unless allowed); no bad last word (if blocked)."""
    if not allow_unk and UNK in seq:
        return False
    return not (block_bad_endings and seq and BAD_VOCAB.words[seq[-1]] in BAD_ENDINGS)


@pytest.mark.parametrize("penalty", ["none", "average", "gnmt"])
@pytest.mark.parametrize("seed, query", [(0, "previous"), (1, "previous"), (0, "current"), (0, "topdown")])
def test_beam_with_large_k_equals_exhaustive_search(seed: int, query: str, penalty: str) -> None:
    """Default decoding (<unk> suppressed) = the best captions without <unk>, by their true log-probabilities."""
    decoder, feats = tiny_decoder(seed, query=query), tiny_features(seed, batch=2)
    beams = beam_search(decoder, feats, VOCAB, beam_size=EXHAUSTIVE_K, max_len=MAX_LEN, length_penalty=penalty, n_best=3)
    for b in range(2):
        scored = {s: v for s, v in enumerate_finished(decoder, feats[b : b + 1], MAX_LEN).items() if UNK not in s}
        lp = length_penalties(MAX_LEN + 1, penalty, 0.7)
        ranked = sorted(scored, key=lambda s: scored[s] / lp[len(s) + 1], reverse=True)[:3]
        assert [tuple(c.tokens) for c in beams[b]] == ranked
        for c, seq in zip(beams[b], ranked):
            assert c.finished and c.score == pytest.approx(scored[seq], abs=1e-5)
            check_attention(c)


@pytest.mark.parametrize("allow_unk, block", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("penalty", ["none", "average"])
def test_masked_beam_equals_exhaustive_search_over_allowed_captions(allow_unk: bool, block: bool, penalty: str) -> None:
    """Beam search under the masks = enumerate every caption, keep the allowed ones, rank by true log-probability."""
    # <unk> and "the" made likely, so that the unconstrained best captions contain <unk> / end on "the".
    decoder, feats = tiny_decoder(3), tiny_features(3, batch=3)
    with torch.no_grad():
        decoder.out.bias[UNK] += 1.5
        decoder.out.bias[THE] += 1.0
    lp = length_penalties(MAX_LEN + 1, penalty, 0.7)
    beams = beam_search(decoder, feats, BAD_VOCAB, beam_size=EXHAUSTIVE_K, max_len=MAX_LEN, length_penalty=penalty, n_best=4,
                        allow_unk=allow_unk, block_bad_endings=block)
    changed = 0
    for b in range(3):
        everything = enumerate_finished(decoder, feats[b : b + 1], MAX_LEN)
        scored = {s: v for s, v in everything.items() if allowed(s, allow_unk, block)}
        ranked = sorted(scored, key=lambda s: scored[s] / lp[len(s) + 1], reverse=True)[:4]
        default = sorted((s for s in everything if allowed(s)), key=lambda s: everything[s] / lp[len(s) + 1], reverse=True)[:4]
        changed += ranked != default
        assert [tuple(c.tokens) for c in beams[b]] == ranked
        for c, seq in zip(beams[b], ranked):
            assert c.finished and c.score == pytest.approx(scored[seq], abs=1e-5)  # the true log-prob, not renormalised
            check_attention(c, BAD_VOCAB)
    assert changed, "these masks rank as the default ones do: the test model is too easy"


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
            seq, score = best_by({s: v for s, v in scored.items() if not has_repeat(s, n) and UNK not in s}, "average")
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
# Word masks in greedy and sampling, the unfinished fallback, and the dispatch of the switches
def chatty_decoder(seed: int, attention: str = "soft", end_bias: float = 0.0) -> AttentionDecoder:
    """tiny_decoder with <unk> and "the" (BAD_VOCAB) made likely, so the masks have something to do."""
    decoder = tiny_decoder(seed, attention=attention, end_bias=end_bias)
    with torch.no_grad():
        decoder.out.bias[UNK] += 1.5
        decoder.out.bias[THE] += 1.5
    return decoder


@torch.no_grad()
def reference_greedy(decoder: AttentionDecoder, features: Tensor, max_len: int, allow_unk: bool, block: bool,
                     attend: str = "expected") -> tuple[list[int], float, bool]:
    """Greedy decoding of one image (1, L, D) with the masks' rules spelled out word by word."""
    memory = decoder.init_memory(features)
    state = decoder.init_state(memory)
    prev, tokens, total = VOCAB.start_id, [], 0.0
    bad = {w for w in range(V) if BAD_VOCAB.words[w] in BAD_ENDINGS}
    for t in range(max_len + 1):
        out = decoder.step(torch.tensor([prev]), state, memory, attend=attend)
        lp = out.log_probs[0]
        choices = [w for w in range(V) if (allow_unk or w != UNK)
                   and not (block and w == END and tokens and tokens[-1] in bad)  # no <end> after a bad word
                   and not (block and t == max_len - 1 and w in bad)]  # the max_len-th word may not be bad
        w = max(choices, key=lambda w: float(lp[w]))
        if w == END:
            return tokens, total + float(lp[w]), True
        if t == max_len:
            return tokens, total, False  # an unfinished caption is scored by its words only
        tokens.append(w)
        total += float(lp[w])
        prev, state = w, out.state
    raise AssertionError("unreachable")


@pytest.mark.parametrize("attention", ["soft", "hard"])
@pytest.mark.parametrize("end_bias", [0.0, -2.0, -30.0])
def test_masked_greedy_follows_the_rules_and_beam_of_one_is_still_greedy(attention: str, end_bias: float) -> None:
    attend = "argmax" if attention == "hard" else "expected"
    seen_unk = seen_bad = 0
    for seed in range(3):
        decoder, feats = chatty_decoder(seed, attention, end_bias), tiny_features(seed, batch=5)
        for allow_unk, block in [(False, False), (True, False), (False, True), (True, True)]:
            kw = dict(max_len=4, attend=attend, allow_unk=allow_unk, block_bad_endings=block)
            greedy = greedy_decode(decoder, feats, BAD_VOCAB, **kw)
            beam = beam_search(decoder, feats, BAD_VOCAB, beam_size=1, **kw)
            for b, (g, (bm,)) in enumerate(zip(greedy, beam)):
                tokens, score, finished = reference_greedy(decoder, feats[b : b + 1], 4, allow_unk, block, attend)
                assert (g.tokens, g.finished) == (tokens, finished), (seed, allow_unk, block, b)
                assert g.score == pytest.approx(score, abs=1e-5)
                assert (bm.tokens, bm.finished, bm.locations) == (g.tokens, g.finished, g.locations)
                assert bm.score == pytest.approx(g.score, abs=1e-5)
                if not allow_unk:
                    assert UNK not in g.tokens
                if block:
                    assert not g.tokens or g.tokens[-1] != THE
                seen_unk += allow_unk and UNK in g.tokens
                seen_bad += not block and bool(g.tokens) and g.tokens[-1] == THE
    assert seen_unk and (seen_bad or end_bias < -10), "the switches never mattered: the test model is too easy"


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_unfinished_captions_do_not_end_badly_either(attention: str) -> None:
    """With <end> impossible every caption stops at max_len words: the last of them is never a bad ending."""
    decoder, feats = chatty_decoder(4, attention, end_bias=-1e4), tiny_features(4, batch=6)
    with torch.no_grad():
        decoder.out.bias[THE] += 3.0  # "the" is everywhere the most likely word
    kw = dict(max_len=4, block_bad_endings=True)
    runs = {"greedy": greedy_decode(decoder, feats, BAD_VOCAB, **kw),
            "sample": sample_decode(decoder, feats, BAD_VOCAB, seed=0, **kw),
            "beam": [c for n in beam_search(decoder, feats, BAD_VOCAB, beam_size=3, n_best=3, **kw) for c in n]}
    for name, caps in runs.items():
        for c in caps:
            assert not c.finished and len(c.tokens) == 4, name
            assert c.tokens[-1] != THE and UNK not in c.tokens, (name, c.words)
            assert c.score > -1e3  # the impossible <end> is not in the score
    assert all(c.tokens[-1] == THE for c in greedy_decode(decoder, feats, BAD_VOCAB, max_len=4))  # without the switch they do


def test_sampling_obeys_the_masks_and_reports_true_log_probs() -> None:
    decoder, feats = chatty_decoder(6), tiny_features(6, batch=32)
    free = sample_decode(decoder, feats, BAD_VOCAB, max_len=5, seed=0, allow_unk=True, temperature=1.5)
    assert any(UNK in c.tokens for c in free) and any(c.tokens and c.tokens[-1] == THE for c in free)
    for kw in [dict(temperature=1.5), dict(temperature=1.5, top_k=3), dict(top_p=0.8)]:
        caps = sample_decode(decoder, feats, BAD_VOCAB, max_len=5, seed=0, block_bad_endings=True, **kw)
        assert len({tuple(c.tokens) for c in caps}) > 4, kw  # really sampling
        for b, c in enumerate(caps):
            assert UNK not in c.tokens and (not c.tokens or c.tokens[-1] != THE), (kw, c.words)
            score, attention = rescore(decoder, feats[b : b + 1], c.tokens, c.finished)
            assert c.score == pytest.approx(score, abs=1e-4)  # not renormalised over the allowed words
            torch.testing.assert_close(c.attention, attention, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_decode_config_switches_reach_every_strategy(strategy: str) -> None:
    decoder, feats = chatty_decoder(7), tiny_features(7, batch=16)
    base = DecodeConfig(strategy=strategy, max_len=5, beam_size=3, n_best=2, temperature=1.5)
    assert base.allow_unk is False and base.block_bad_endings is False  # the defaults
    masked = DecodeConfig(**{**base.__dict__, "block_bad_endings": True})
    free = DecodeConfig(**{**base.__dict__, "allow_unk": True})
    for caps in (decode(decoder, feats, BAD_VOCAB, masked), [c for n in decode_nbest(decoder, feats, BAD_VOCAB, masked) for c in n]):
        assert all(UNK not in c.tokens and (not c.tokens or c.tokens[-1] != THE) for c in caps)
    assert all(UNK not in c.tokens for c in decode(decoder, feats, BAD_VOCAB, base))
    unk_free = [c for n in decode_nbest(decoder, feats, BAD_VOCAB, free) for c in n]
    assert any(UNK in c.tokens for c in unk_free)
    ends_the = [c for n in decode_nbest(decoder, feats, BAD_VOCAB, base) for c in n]
    assert any(c.tokens and c.tokens[-1] == THE for c in ends_the)


def test_decode_mask_apply() -> None:
    vocab = Vocabulary(list(SPECIALS) + ["the", "dog", "of"])
    the, dog, of = (vocab.index[w] for w in ("the", "dog", "of"))
    log_probs = torch.log_softmax(torch.randn(3, len(vocab), generator=torch.Generator().manual_seed(0)), dim=-1)  # (3, V)
    prev = torch.tensor([vocab.start_id, the, dog])
    before = log_probs.clone()
    out = DecodeMask(vocab, block_bad_endings=True).apply(log_probs, prev, t=1, max_len=5)
    assert torch.equal(log_probs, before)  # the caller's tensor is untouched
    assert torch.isneginf(out[:, UNK]).all()
    assert torch.isneginf(out[:, END]).tolist() == [False, True, False]  # no <end> right after "the"
    keep = torch.isfinite(out)
    assert torch.equal(out[keep], log_probs[keep])  # allowed words keep their true log-probabilities
    last = DecodeMask(vocab, block_bad_endings=True).apply(log_probs, prev, t=4, max_len=5)  # the 5th (last) word
    assert torch.isneginf(last[:, [the, of]]).all() and torch.isfinite(last[:, dog]).all()
    assert torch.equal(DecodeMask(vocab, allow_unk=True).apply(log_probs, prev, 1, 5), log_probs)  # nothing to mask
    # A row with nothing allowed (a model that never says <pad>/<start>, after a bad word, at the last word) gets <end> back.
    stuck = log_probs.clone()
    stuck[:, [vocab.pad_id, vocab.start_id, dog]] = float("-inf")
    out = DecodeMask(vocab, block_bad_endings=True).apply(stuck, prev, t=4, max_len=5)
    assert out[1, END] == log_probs[1, END] and torch.isneginf(out[1, :END]).all() and torch.isneginf(out[1, END + 1 :]).all()


def test_bad_endings_list_and_rate() -> None:
    for w in ("a", "an", "the", "of", "with", "in", "on", "and", "his", "their", "'s"):
        assert w in BAD_ENDINGS
    for w in ("dog", "up", "down", "her", "this", "outside", "water"):  # nouns, and words that end sentences normally
        assert w not in BAD_ENDINGS
    caps = ["a dog runs on the", "a man riding a horse.", "two dogs play in", "A cat and", "", "a man 's", "a dog looking up"]
    assert bad_ending_rate(caps) == pytest.approx(4 / 7)  # punctuation and case do not matter (the metrics' tokenizer)
    assert bad_ending_rate([]) == 0.0 and bad_ending_rate(["a red ball"]) == 0.0


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
