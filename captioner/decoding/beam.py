"""Beam search, batched: B images x K beams go through ``decoder.step`` as one batch of B·K rows.

Definition (what the tests check against exhaustive enumeration):

- A hypothesis is *finished* when it emits <end> after at most ``max_len`` words; its score is the sum
  of the log-probabilities of its words and of <end>. It is ranked by ``score / lp(words + 1)`` with
  ``lp`` the length penalty: ``none`` 1, ``average`` n, ``gnmt`` ((5 + n) / 6) ** alpha.
- At every step the K·V one-word extensions of the K live hypotheses are ranked by summed
  log-probability. An <end> extension ranked among the best K is moved aside as finished; the best K
  extensions that are not <end> stay live. This is the usual rule (fairseq, Hugging Face) and makes
  K=1 exactly greedy decoding.
- Step ``max_len`` (the (max_len+1)-th token) can only finish hypotheses: more words would pass max_len.
- An image stops being searched once its ``n_best`` finished hypotheses cannot be beaten by anything its
  live hypotheses could still become (an exact bound: log-probabilities are <= 0, so a live score s can
  at best become s / lp(max_len + 1)).
- An image with fewer than ``n_best`` finished hypotheses fills the rest with its best unfinished
  ``max_len``-word hypotheses (``finished=False``, scored by their words only, as greedy does).

Nothing here reaches into the decoder: one ``step()`` per time step for all rows (step 0 on one row
per image, since its K beams are still identical), then vectorised top-k over K·V, and back-pointers
from which the words, attention rows and locations are gathered once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.data.vocab import Vocabulary
from captioner.decoding.caption import Caption
from captioner.decoding.constraints import DecodeMask
from captioner.models.decoder import AttentionDecoder

LENGTH_PENALTIES = ("none", "average", "gnmt")


def length_penalties(max_tokens: int, kind: str = "none", alpha: float = 0.7) -> list[float]:
    """Divisor of a summed log-probability for hypotheses of 0..max_tokens scored tokens."""
    if kind == "none":
        return [1.0] * (max_tokens + 1)
    if kind == "average":
        return [float(max(n, 1)) for n in range(max_tokens + 1)]  # an empty unfinished hypothesis scores 0 anyway
    if kind == "gnmt":
        return [((5.0 + n) / 6.0) ** alpha for n in range(max_tokens + 1)]  # Wu et al. (2016), eq. (14)
    raise ValueError(f"unknown length penalty {kind!r}; expected one of {LENGTH_PENALTIES}")


def _block_repeats(log_probs: Tensor, history: Tensor, n: int) -> Tensor:
    """-inf for every word that would repeat an n-gram already in a row's words ``history`` (R, t)."""
    R, t = history.shape
    V = log_probs.size(1)
    grams = history.unfold(1, n, 1)  # (R, t-n+1, n) every n-gram so far
    # Earlier n-grams that start with the row's last n-1 words: their last word would repeat them.
    seen = (grams[:, :, :-1] == history[:, t - n + 1 :].unsqueeze(1)).all(dim=-1)  # (R, t-n+1)
    banned = torch.where(seen, grams[:, :, -1], V)  # (R, t-n+1) column V is a dustbin for "nothing banned"
    mask = torch.zeros(R, V + 1, dtype=torch.bool, device=log_probs.device).scatter_(1, banned, True)  # (R, V+1)
    return log_probs.masked_fill(mask[:, :V], float("-inf"))  # (R, V)


@torch.no_grad()
def beam_search(
    decoder: AttentionDecoder,
    features: Tensor,
    vocab: Vocabulary,
    beam_size: int = 3,
    max_len: int = 30,
    length_penalty: str = "none",
    alpha: float = 0.7,
    no_repeat_ngram: int = 0,
    n_best: int = 1,
    attend: str = "expected",
    allow_unk: bool = False,
    block_bad_endings: bool = False,
) -> list[list[Caption]]:
    """Beam search for features (B, L, D): per image, its ``n_best`` captions, best first (see module docstring).

    ``allow_unk`` / ``block_bad_endings``: the word masks of :mod:`captioner.decoding.constraints`.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size={beam_size}, got {n_best}")
    if max_len < 0 or no_repeat_ngram < 0:
        raise ValueError(f"max_len and no_repeat_ngram must be >= 0, got {max_len} and {no_repeat_ngram}")
    B, L, _ = features.shape
    if B == 0:
        return []
    K, V, N, T = beam_size, decoder.vocab_size, n_best, max_len + 1  # T steps: max_len words, then a last <end>
    dev, end, ninf = features.device, vocab.end_id, float("-inf")
    lp = length_penalties(T, length_penalty, alpha)
    hard = decoder.attention_type == "hard"
    mask = DecodeMask(vocab, allow_unk=allow_unk, block_bad_endings=block_bad_endings)

    memory = decoder.init_memory(features)  # (B, L, D), (B, L, A) projected once per image
    state = decoder.init_state(memory)  # (layers, B, H)
    # The K beams of an image are identical until the first word: step 0 runs on one row per image
    # and its outputs are then copied to the image's K rows.
    expand = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,) each image's row K times
    prev = torch.full((B,), vocab.start_id, dtype=torch.long, device=dev)  # (B,), then (n*K,)
    # Live hypotheses of the images still searched (img holds their original indices), best first.
    # At t=0 only slot 0 may extend, or the beam would fill with K copies of the same words.
    img = torch.arange(B, device=dev)  # (n,)
    scores = torch.full((B, K), ninf, device=dev)  # (n, K)
    scores[:, 0] = 0.0
    history = torch.zeros(B * K, 0, dtype=torch.long, device=dev)  # (n*K, t) words, for n-gram blocking only
    row_base = torch.arange(B, device=dev).unsqueeze(1) * K  # (B, 1) first row of each image

    # Back-pointers by original image: the word put in slot k at step t, the slot it extends, and the
    # attention (and hard-attention location) of each row at step t, i.e. of the word it chose.
    words = torch.zeros(T, B, K, dtype=torch.long, device=dev)  # (T, B, K)
    parents = torch.zeros(T, B, K, dtype=torch.long, device=dev)  # (T, B, K)
    alphas = features.new_zeros(T, B, K, L)  # (T, B, K, L)
    locs = torch.zeros(T, B, K, dtype=torch.long, device=dev) if hard else None  # (T, B, K)
    # The best N finished hypotheses per image, best first: ranking score, raw score, words, last slot.
    fin_rank = torch.full((B, N), ninf, device=dev)  # (B, N)
    fin_score = torch.zeros(B, N, device=dev)  # (B, N)
    fin_len = torch.zeros(B, N, dtype=torch.long, device=dev)  # (B, N)
    fin_slot = torch.zeros(B, N, dtype=torch.long, device=dev)  # (B, N)

    any_finished = False  # until something finishes no image can be done: skip the check
    for t in range(T):
        n = img.numel()
        out = decoder.step(prev, state, memory, attend=attend)
        log_probs, alpha, location, next_state = out.log_probs, out.alpha, out.location, out.state  # (n*K, ·); (B, ·) at t=0
        log_probs = mask.apply(log_probs, prev, t, max_len)  # (n*K, V) banned choices at -inf, true log-probs elsewhere
        if t == 0:
            log_probs, alpha = log_probs.index_select(0, expand), alpha.index_select(0, expand)  # (B*K, V), (B*K, L)
            location = location.index_select(0, expand) if location is not None else None  # (B*K,)
            next_state = next_state.index_select(expand)  # (layers, B*K, H); memory stays one entry per image
        if no_repeat_ngram and t >= no_repeat_ngram:
            log_probs = _block_repeats(log_probs, history, no_repeat_ngram)
        cand = (scores.unsqueeze(-1) + log_probs.view(n, K, V)).view(n, K * V)  # (n, K*V)
        top, index = cand.topk(min(2 * K, K * V), dim=1)  # (n, 2K) best first; at most K of them are <end>
        parent, word = index // V, index % V  # (n, 2K)
        if n == B:  # nothing dropped yet: plain slices instead of scatters
            alphas[t] = alpha.view(n, K, L)
            if locs is not None:
                locs[t] = location.view(n, K)
        else:
            alphas[t, img] = alpha.view(n, K, L)
            if locs is not None:
                locs[t, img] = location.view(n, K)

        ended = (word[:, :K] == end) & (top[:, :K] > ninf)  # (n, K) <end> among the K best: finished
        if bool(ended.any()):
            any_finished = True
            new_rank = torch.where(ended, top[:, :K] / lp[t + 1], ninf)  # (n, K) t words and <end>
            rank, pos = torch.cat([fin_rank[img], new_rank], 1).topk(N, dim=1)  # (n, N)
            fin_rank[img] = rank
            fin_score[img] = torch.cat([fin_score[img], top[:, :K]], 1).gather(1, pos)
            fin_len[img] = torch.cat([fin_len[img], torch.full_like(word[:, :K], t)], 1).gather(1, pos)
            fin_slot[img] = torch.cat([fin_slot[img], parent[:, :K]], 1).gather(1, pos)
        if t == max_len:
            break

        # The K best extensions that are not <end> (a stable sort keeps them in score order).
        keep = (word == end).to(torch.uint8).sort(dim=1, stable=True).indices[:, :K]  # (n, K)
        scores, parent, word = top.gather(1, keep), parent.gather(1, keep), word.gather(1, keep)  # (n, K)
        if n == B:
            words[t], parents[t] = word, parent
        else:
            words[t, img], parents[t, img] = word, parent
        rows = (row_base[:n] + parent).view(-1)  # (n*K,) the row each new hypothesis extends
        state = next_state.index_select(rows)
        prev = word.view(-1)  # (n*K,)
        if no_repeat_ngram:
            history = torch.cat([history.index_select(0, rows), prev.unsqueeze(1)], dim=1)  # (n*K, t+1)

        if not any_finished:
            continue
        # Images whose N-th finished hypothesis beats the best any live one could still reach are done.
        done = (fin_rank[img, N - 1] > ninf) & (fin_rank[img, N - 1] >= scores[:, 0] / lp[T])  # (n,)
        n_done = int(done.sum())
        if n_done == n:
            break
        # Dropping done images copies the survivors' memory and state: worth it once
        # the steps the done images would still take outweigh it. Until then they ride along harmlessly
        # (by the bound above nothing they find can enter their N best).
        if n_done and n_done * (max_len - t) >= n - n_done:
            alive = (~done).nonzero().squeeze(1)  # (n',)
            rows = (alive.unsqueeze(1) * K + torch.arange(K, device=dev)).view(-1)  # (n'*K,)
            img, scores = img[alive], scores[alive]  # (n',), (n', K)
            memory, state, prev = memory.index_select(alive), state.index_select(rows), prev[rows]
            if no_repeat_ngram:
                history = history[rows]

    # Images still searched with fewer than N finished hypotheses fill up with unfinished ones: the
    # live max_len-word hypotheses after step max_len - 1, best first (after every finished one).
    short = (fin_rank[img] == ninf).any(dim=1) if t == max_len else torch.zeros_like(img, dtype=torch.bool)  # (n,)
    n_finished = (fin_rank > ninf).sum(dim=1)  # (B,)
    fin_done = torch.ones(B, N, dtype=torch.bool, device=dev)  # (B, N)
    if bool(short.any()):
        img_s, scores_s = img[short], scores[short]  # (s,), (s, K)
        have = n_finished[img_s].unsqueeze(1)  # (s, 1)
        slot_n = torch.arange(N, device=dev).unsqueeze(0)  # (1, N)
        take = (slot_n - have).clamp(min=0)  # (s, N) which unfinished hypothesis fills each empty slot
        fill = slot_n >= have  # (s, N)
        fin_done[img_s] = ~fill
        fin_score[img_s] = torch.where(fill, scores_s.gather(1, take), fin_score[img_s])
        fin_len[img_s] = torch.where(fill, max_len, fin_len[img_s])
        fin_slot[img_s] = torch.where(fill, take, fin_slot[img_s])
    return _backtrack(words, parents, alphas, locs, fin_score, fin_len, fin_slot, fin_done, vocab)


def _backtrack(words: Tensor, parents: Tensor, alphas: Tensor, locs: Tensor | None, score: Tensor, length: Tensor,
               slot: Tensor, finished: Tensor, vocab: Vocabulary) -> list[list[Caption]]:
    """Follow the back-pointers of every chosen hypothesis (B, N) at once and package Captions."""
    B, N = score.shape
    M = B * N
    image = torch.arange(B, device=score.device).repeat_interleave(N)  # (M,)
    length, slot = length.view(M), slot.view(M).clone()  # (M,), (M,)
    T = int(length.max()) if M else 0
    tokens = torch.zeros(M, T, dtype=torch.long, device=score.device)  # (M, T)
    attention = alphas.new_zeros(M, T, alphas.size(-1))  # (M, T, L)
    where = torch.zeros(M, T, dtype=torch.long, device=score.device)  # (M, T)
    for s in range(T - 1, -1, -1):
        parent = parents[s, image, slot]  # (M,)
        tokens[:, s] = words[s, image, slot]
        attention[:, s] = alphas[s, image, parent]  # (M, L) the row that chose word s
        if locs is not None:
            where[:, s] = locs[s, image, parent]
        slot = torch.where(s < length, parent, slot)  # shorter hypotheses start further back
    tokens, attention, where = tokens.cpu(), attention.cpu(), where.cpu()
    lengths, scores, done = length.tolist(), score.view(M).tolist(), finished.view(M).tolist()
    out: list[list[Caption]] = []
    for b in range(B):
        captions = []
        for m in range(b * N, (b + 1) * N):
            toks = tokens[m, : lengths[m]].tolist()
            captions.append(Caption.build(toks, vocab, scores[m], attention[m, : lengths[m]], done[m],
                                          where[m, : lengths[m]].tolist() if locs is not None else None))
        out.append(captions)
    return out
