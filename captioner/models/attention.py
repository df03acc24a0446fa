"""Soft and hard attention over a grid of annotation vectors (Xu et al., 2015, section 4)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def full_precision(x: Tensor) -> Tensor:
    """x in float32 if autocast made it bfloat16/float16; float32 and float64 tensors pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class AttentionOutput(NamedTuple):
    """What one attention step returns; the hard-attention fields are ``None`` for soft attention."""

    context: Tensor  # (B, D) the annotation vector fed to the decoder (before the beta gate)
    alpha: Tensor  # (B, L) attention weights, rows sum to 1
    location: Tensor | None = None  # (B,) index of the attended location (hard attention)
    log_prob: Tensor | None = None  # (B,) log alpha[location], for the REINFORCE term
    entropy: Tensor | None = None  # (B,) entropy of alpha, for the entropy bonus


class AdditiveScorer(nn.Module):
    """Bahdanau-style scores e_ti = w^T tanh(W_a a_i + W_h h_{t-1}); the W_a a_i part is per image.

    Computed as w^T tanh(x) = 2 w^T sigmoid(2x) - sum(w), the same function (tanh(x) = 2 sigmoid(2x) - 1)
    at a quarter of the cost: this PyTorch's CPU tanh is about 4x slower than its sigmoid, and the
    (rows, L, A) tanh was the largest cost of a decoding step after the matrix products. ``project``
    therefore returns the features' projection doubled, 2 (W_a a_i + b).

    ``hidden`` may hold ``g`` rows per image (beam search: the K hypotheses of an image share its
    projected features, which are not copied). Without autograd (decoding) the (rows, L, A)
    intermediate is made in row chunks that stay in cache, about twice as fast at beam-search sizes.
    """

    CHUNK = 1 << 20  # elements (4 MB) of the (rows, L, A) intermediate per chunk when decoding: best of 2^17..2^22 here

    def __init__(self, feature_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attn_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attn_dim, bias=False)
        self.score = nn.Linear(attn_dim, 1, bias=False)  # a bias would cancel in the softmax

    def project(self, features: Tensor) -> Tensor:
        """Project the features once per image: (B, L, D) -> 2 (W_a a + b), (B, L, A)."""
        return 2.0 * self.feature_proj(features)

    def forward(self, projected: Tensor, hidden: Tensor) -> Tensor:
        """Attention logits (n*g, L) from projected features (n, L, A) and previous hidden states (n*g, H)."""
        n, L, A = projected.shape
        g = rows_per_image(hidden.size(0), n)
        h2 = (2.0 * self.hidden_proj(hidden)).view(n, g, 1, A)  # (n, g, 1, A)
        w2 = 2.0 * self.score.weight.view(A, 1)  # (A, 1)
        shift = self.score.weight.sum()  # w^T 1
        p = projected.unsqueeze(1)  # (n, 1, L, A)
        if torch.is_grad_enabled() or n * g * L * A <= self.CHUNK:
            e = torch.sigmoid(p + h2)  # (n, g, L, A)
            return (torch.matmul(e, w2).view(n * g, L) - shift)  # (n*g, L)
        out = projected.new_empty(n, g, L, 1)
        step = max(1, self.CHUNK // (g * L * A))  # images per chunk
        for i in range(0, n, step):
            e = (p[i : i + step] + h2[i : i + step]).sigmoid_()  # (c, g, L, A), in cache
            torch.matmul(e, w2, out=out[i : i + step])
        return out.view(n * g, L) - shift


def rows_per_image(rows: int, images: int) -> int:
    """g when ``rows`` state rows read ``images`` memory entries, g consecutive rows each."""
    g = rows // max(images, 1)
    if g < 1 or g * images != rows:
        raise ValueError(f"{rows} state rows for {images} images: not a whole number of rows per image")
    return g


def expected_context(alpha: Tensor, features: Tensor) -> Tensor:
    """sum_i alpha_i a_i for alpha (n*g, L) over features (n, L, D): g rows per image share its features."""
    n, L, D = features.shape
    g = rows_per_image(alpha.size(0), n)
    return torch.bmm(alpha.view(n, g, L), features).view(n * g, D)  # (n*g, D)


class SoftAttention(nn.Module):
    """Deterministic attention: the context is the expectation of the annotation vectors under alpha."""

    def __init__(self, feature_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.scorer = AdditiveScorer(feature_dim, hidden_dim, attn_dim)

    def project(self, features: Tensor) -> Tensor:
        return self.scorer.project(features)

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mode: str = "soft") -> AttentionOutput:
        """Attend over features (B, L, D) given h_{t-1} (B, H)."""
        alpha = F.softmax(full_precision(self.scorer(projected, hidden)), dim=-1)  # (B, L), float32 under autocast too
        return AttentionOutput(expected_context(alpha, features), alpha)


class HardAttention(SoftAttention):
    """Stochastic attention: a location s_t ~ Categorical(alpha_t) is attended, its annotation vector is the context.

    ``mode`` picks what the context is: ``"sample"`` (training and stochastic decoding), ``"argmax"``
    (the most likely location) or ``"expected"`` (the soft expectation, as the paper uses at test time
    and for half of the training minibatches).
    """

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mode: str = "sample") -> AttentionOutput:
        logits = full_precision(self.scorer(projected, hidden))  # (B, L)
        log_alpha = F.log_softmax(logits, dim=-1)  # (B, L)
        alpha = log_alpha.exp()
        entropy = -(alpha * log_alpha).sum(-1)  # (B,)
        if mode == "expected" or mode == "soft":
            context = expected_context(alpha, features)  # (B, D)
            location = alpha.argmax(-1)  # (B,) reported, not used for the context
        elif mode in ("sample", "argmax"):
            if mode == "sample":
                location = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B,)
            else:
                location = alpha.argmax(-1)
            image = torch.arange(alpha.size(0), device=features.device) // rows_per_image(alpha.size(0), features.size(0))  # (B,)
            context = features[image, location]  # (B, D)
        else:
            raise ValueError(f"unknown hard-attention mode {mode!r}; expected sample, argmax or expected")
        log_prob = log_alpha.gather(1, location.unsqueeze(1)).squeeze(1)  # (B,)
        return AttentionOutput(context, alpha, location, log_prob, entropy)


ATTENTION = {"soft": SoftAttention, "hard": HardAttention}
