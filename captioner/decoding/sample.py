"""Sampling decoding (temperature, top-k, nucleus/top-p), batched over images and reproducible from a seed."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from captioner.data.vocab import Vocabulary
from captioner.decoding.caption import Caption
from captioner.decoding.constraints import DecodeMask
from captioner.decoding.greedy import greedy_decode, rollout
from captioner.models.decoder import AttentionDecoder


def sample_words(log_probs: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """One word per row (B,) from log-probs (B, V) tempered, cut to the top-k words, then to the top-p nucleus."""
    logits = log_probs / temperature  # (B, V)
    V = logits.size(-1)
    # Candidates best first: top-k needs only a partial sort; the nucleus needs an order over all words.
    if 0 < top_k < V:
        logits, order = logits.topk(top_k, dim=-1)  # (B, k)
    elif top_p < 1.0:
        logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    else:
        order = None
    probs = logits.softmax(dim=-1)  # (B, k or V)
    if top_p < 1.0:
        # The nucleus is the shortest prefix whose mass reaches top_p: drop a word once the mass before
        # it already does. The most likely word has zero mass before it, so it always survives.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)  # multinomial renormalises
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return (order.gather(1, choice) if order is not None else choice).squeeze(1)  # (B,)


@torch.no_grad()
def sample_decode(
    decoder: AttentionDecoder,
    features: Tensor,
    vocab: Vocabulary,
    max_len: int = 30,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    attend: str = "expected",
    allow_unk: bool = False,
    block_bad_endings: bool = False,
) -> list[Caption]:
    """Sample each word from the filtered, tempered distribution; temperature 0 is argmax (greedy).

    Draws come from a local ``torch.Generator`` seeded with ``seed``: the same call returns the same
    captions and the global RNG is left as it was. A caption's score is the sum of the model's own
    (untempered, unfiltered) log-probabilities of its words and <end>, as for greedy and beam search.
    Words are drawn only among those the masks allow (``allow_unk``, ``block_bad_endings``: see
    :mod:`captioner.decoding.constraints`), renormalised over them.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if temperature == 0:
        return greedy_decode(decoder, features, vocab, max_len=max_len, attend=attend, allow_unk=allow_unk,
                             block_bad_endings=block_bad_endings)
    mask = DecodeMask(vocab, allow_unk=allow_unk, block_bad_endings=block_bad_endings)
    generator = torch.Generator(device=features.device)
    generator.manual_seed(seed)

    def pick(log_probs: Tensor) -> tuple[Tensor, Tensor]:
        word = sample_words(log_probs, temperature, top_k, top_p, generator)  # (B,)
        return word, log_probs.gather(1, word.unsqueeze(1)).squeeze(1)  # (B,), (B,)

    # Hard attention that samples its location draws inside the decoder from the global RNG, which
    # cannot take our generator: run it on a forked, seeded global RNG so the call stays reproducible
    # and the caller's RNG state is restored afterwards.
    stochastic_attention = decoder.attention_type == "hard" and attend == "sample"
    cuda = features.device.type == "cuda"
    rng: contextlib.AbstractContextManager = contextlib.nullcontext()
    if stochastic_attention:
        rng = torch.random.fork_rng(devices=[features.device] if cuda else [])
    with rng:
        if stochastic_attention:
            if cuda:
                index = features.device.index if features.device.index is not None else torch.cuda.current_device()
                torch.cuda.default_generators[index].manual_seed(seed)
            else:
                torch.random.default_generator.manual_seed(seed)
        return rollout(decoder, features, vocab, pick, max_len=max_len, attend=attend, mask=mask)
