"""Loss terms of teacher forcing: masked NLL (with label smoothing) and the doubly stochastic attention penalty."""

from __future__ import annotations

from torch import Tensor

from captioner.models.decoder import DecoderOutput


def masked_nll(log_probs: Tensor, targets: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Per-caption summed NLL (B,) over real tokens only, and the token counts (B,)."""
    mask = targets.ne(pad_id)  # (B, T-1)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (nll * mask).sum(1), mask.sum(1)


def doubly_stochastic(alphas: Tensor, targets: Tensor, pad_id: int = 0) -> Tensor:
    """The paper's penalty sum_i (1 - sum_t alpha_ti)^2, averaged over locations and captions.

    Only steps that predict a real token count. Averaging over the L locations (instead of the
    paper's sum) keeps lambda=1 on the same scale as the per-token NLL whatever the grid size.
    """
    mask = targets.ne(pad_id).unsqueeze(-1).to(alphas.dtype)  # (B, T-1, 1)
    coverage = (alphas * mask).sum(1)  # (B, L)
    return ((1.0 - coverage) ** 2).mean()


def caption_loss(out: DecoderOutput, captions: Tensor, lambda_ds: float = 1.0, pad_id: int = 0,
                 token_total: Tensor | float | None = None, smoothing: float = 0.0) -> dict[str, Tensor]:
    """Teacher-forced loss for captions (B, T): per-token NLL + lambda * doubly stochastic penalty.

    ``token_total`` replaces the local token count as the NLL's denominator (data-parallel training
    divides by the tokens of the whole global batch, so the gradient equals one big batch's).
    ``smoothing`` enters "loss" only; "nll" stays the plain per-token NLL.
    """
    targets = captions[:, 1:]  # (B, T-1)
    nll_sum, n_tok = masked_nll(out.log_probs, targets, pad_id)
    denominator = n_tok.sum().clamp(min=1) if token_total is None else token_total
    nll = nll_sum.sum() / denominator
    fit = nll
    if smoothing:  # target (1 - eps) one-hot + eps uniform over the vocabulary, as F.cross_entropy(label_smoothing=eps)
        mask = targets.ne(pad_id).to(out.log_probs.dtype)  # (B, T-1)
        uniform = -(out.log_probs.mean(-1) * mask).sum() / denominator
        fit = (1.0 - smoothing) * nll + smoothing * uniform
    ds = doubly_stochastic(out.alphas, targets, pad_id) if lambda_ds else nll.new_zeros(())
    return {"loss": fit + lambda_ds * ds, "nll": nll, "doubly_stochastic": ds}
