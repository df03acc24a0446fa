"""Greedy (argmax) decoding, batched over images, and the one-word-per-step loop that sampling shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from captioner.data.vocab import Vocabulary
from captioner.decoding.caption import Caption
from captioner.decoding.constraints import DecodeMask
from captioner.models.decoder import AttentionDecoder

# Chooses the next word of every row from the model's log-probabilities (B, V): returns the words (B,)
# and the model's own log-probability of each (B,), which is what a caption's score sums.
Picker = Callable[[Tensor], tuple[Tensor, Tensor]]


def _argmax(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    logp, word = log_probs.max(dim=-1)  # (B,), (B,)
    return word, logp


@torch.no_grad()
def greedy_decode(decoder: AttentionDecoder, features: Tensor, vocab: Vocabulary, max_len: int = 30, attend: str = "expected",
                  allow_unk: bool = False, block_bad_endings: bool = False) -> list[Caption]:
    """Argmax allowed word at every step for features (B, L, D); stops each row at <end> or ``max_len`` words.

    ``allow_unk`` / ``block_bad_endings``: the word masks of :mod:`captioner.decoding.constraints`.
    """
    mask = DecodeMask(vocab, allow_unk=allow_unk, block_bad_endings=block_bad_endings)
    return rollout(decoder, features, vocab, _argmax, max_len=max_len, attend=attend, mask=mask)


@torch.no_grad()
def rollout(decoder: AttentionDecoder, features: Tensor, vocab: Vocabulary, pick: Picker, max_len: int = 30, attend: str = "expected",
            mask: DecodeMask | None = None) -> list[Caption]:
    """One word per row per step, chosen by ``pick`` among what ``mask`` allows (default: no <unk>), until <end> or ``max_len`` words."""
    mask = mask if mask is not None else DecodeMask(vocab)
    B = features.size(0)
    if B == 0:
        return []
    memory = decoder.init_memory(features)
    state = decoder.init_state(memory)
    prev = torch.full((B,), vocab.start_id, dtype=torch.long, device=features.device)  # (B,)
    words = torch.zeros(B, max_len + 1, dtype=torch.long, device=features.device)  # (B, T)
    scores = torch.zeros(B, max_len + 1, device=features.device)  # (B, T)
    alphas = torch.zeros(B, max_len + 1, features.size(1), device=features.device)  # (B, T, L)
    locs = torch.zeros(B, max_len + 1, dtype=torch.long, device=features.device)  # (B, T)
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    steps = 0
    for t in range(max_len + 1):  # max_len words plus a final <end>
        out = decoder.step(prev, state, memory, attend=attend)
        prev, logp = pick(mask.apply(out.log_probs, prev, t, max_len))  # (B,), (B,)
        words[:, t], scores[:, t], alphas[:, t] = prev, logp, out.alpha
        if out.location is not None:
            locs[:, t] = out.location
        state = out.state
        steps = t + 1
        done |= prev == vocab.end_id
        if bool(done.all()):
            break
    return _to_captions(words[:, :steps], scores[:, :steps], alphas[:, :steps], locs[:, :steps] if decoder.attention_type == "hard" else None, vocab, max_len)


def _to_captions(words: Tensor, scores: Tensor, alphas: Tensor, locs: Tensor | None, vocab: Vocabulary, max_len: int) -> list[Caption]:
    """Cut each row at its first <end> and package it."""
    words, scores, alphas = words.cpu(), scores.cpu(), alphas.cpu()
    locs = locs.cpu() if locs is not None else None
    out = []
    for b in range(words.size(0)):
        ids = words[b].tolist()
        n = ids.index(vocab.end_id) if vocab.end_id in ids else min(len(ids), max_len)
        finished = n < len(ids) and ids[n] == vocab.end_id
        score = float(scores[b, : n + (1 if finished else 0)].sum())
        toks = ids[:n]
        out.append(Caption.build(toks, vocab, score, alphas[b, :n], finished, locs[b, :n].tolist() if locs is not None else None))
    return out
