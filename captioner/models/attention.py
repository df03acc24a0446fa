"""Soft and hard attention over a grid of annotation vectors (Xu et al., 2015, section 4)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionOutput(NamedTuple):
    """What one attention step returns; the hard-attention fields are ``None`` for soft attention."""

    context: Tensor  # (B, D) the annotation vector fed to the decoder (before the beta gate)
    alpha: Tensor  # (B, L) attention weights, rows sum to 1
    location: Tensor | None = None  # (B,) index of the attended location (hard attention)
    log_prob: Tensor | None = None  # (B,) log alpha[location], for the REINFORCE term
    entropy: Tensor | None = None  # (B,) entropy of alpha, for the entropy bonus


class AdditiveScorer(nn.Module):
    """Bahdanau-style scores e_ti = w^T tanh(W_a a_i + W_h h_{t-1}); the W_a a_i part is per image."""

    def __init__(self, feature_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attn_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attn_dim, bias=False)
        self.score = nn.Linear(attn_dim, 1, bias=False)  # a bias would cancel in the softmax

    def project(self, features: Tensor) -> Tensor:
        """Project the features once per image: (B, L, D) -> (B, L, A)."""
        return self.feature_proj(features)

    def forward(self, projected: Tensor, hidden: Tensor) -> Tensor:
        """Attention logits (B, L) from projected features (B, L, A) and the previous hidden state (B, H)."""
        e = torch.tanh(projected + self.hidden_proj(hidden).unsqueeze(1))  # (B, L, A)
        return self.score(e).squeeze(-1)  # (B, L)


class SoftAttention(nn.Module):
    """Deterministic attention: the context is the expectation of the annotation vectors under alpha."""

    def __init__(self, feature_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.scorer = AdditiveScorer(feature_dim, hidden_dim, attn_dim)

    def project(self, features: Tensor) -> Tensor:
        return self.scorer.project(features)

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mode: str = "soft") -> AttentionOutput:
        """Attend over features (B, L, D) given h_{t-1} (B, H)."""
        alpha = F.softmax(self.scorer(projected, hidden), dim=-1)  # (B, L)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, D)
        return AttentionOutput(context, alpha)


class HardAttention(SoftAttention):
    """Stochastic attention: a location s_t ~ Categorical(alpha_t) is attended, its annotation vector is the context.

    ``mode`` picks what the context is: ``"sample"`` (training and stochastic decoding), ``"argmax"``
    (the most likely location) or ``"expected"`` (the soft expectation, as the paper uses at test time
    and for half of the training minibatches).
    """

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mode: str = "sample") -> AttentionOutput:
        logits = self.scorer(projected, hidden)  # (B, L)
        log_alpha = F.log_softmax(logits, dim=-1)  # (B, L)
        alpha = log_alpha.exp()
        entropy = -(alpha * log_alpha).sum(-1)  # (B,)
        if mode == "expected" or mode == "soft":
            context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, D)
            location = alpha.argmax(-1)  # (B,) reported, not used for the context
        elif mode in ("sample", "argmax"):
            if mode == "sample":
                location = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B,)
            else:
                location = alpha.argmax(-1)
            context = features[torch.arange(features.size(0), device=features.device), location]  # (B, D)
        else:
            raise ValueError(f"unknown hard-attention mode {mode!r}; expected sample, argmax or expected")
        log_prob = log_alpha.gather(1, location.unsqueeze(1)).squeeze(1)  # (B,)
        return AttentionOutput(context, alpha, location, log_prob, entropy)


ATTENTION = {"soft": SoftAttention, "hard": HardAttention}
