"""Hard (stochastic) attention trained with REINFORCE: Xu et al. (2015), section 4.1, eq. (12).

For a caption y of an image a, a location sequence s = (s_1..s_T) is sampled, s_t ~ Categorical(alpha_t),
where alpha_t depends on the earlier samples through the recurrent state. The paper maximises the
variational lower bound L_s = E_s[log p(y | s, a)] <= log p(y | a) (Jensen) with the learning rule

    dL/dW ~ d log p(y|s,a)/dW + lambda_r (log p(y|s,a) - b) d log p(s|a)/dW + lambda_e dH[s]/dW.

:func:`surrogate_from_terms` is a scalar per caption whose gradient *is* that estimate, so autograd
does the rest. What its expectation over s equals (checked against exact enumeration in
``tests/test_reinforce.py``): with lambda_r = 1,

    E_s[grad surrogate] = grad( E_s[log p(y|s,a)] + lambda_e H[s] ),

H[s] the entropy of the whole location sequence. Since H[s] = sum_t E_s[H(alpha_t)] (chain rule of
entropy) and alpha_t depends on s_<t, its gradient has a path part (grad of the per-step entropies at
the sampled history, all the original code used) and a score part (sum_t H(alpha_t) times the score of
the earlier locations); both are included, so the entropy term is unbiased for grad H[s], not only
for the entropy at the visited states. For lambda_r != 1 the score-function term is scaled:
E[grad] = E_s[grad log p(y|s,a)] + lambda_r sum_s log p(y|s,a) grad p(s|a) + lambda_e grad H[s].
A baseline b never changes the expectation as long as it does not depend on the sample it is
subtracted from (E_s[grad log p(s|a)] = 0); it only lowers the variance.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from captioner.models.decoder import DecoderOutput
from captioner.training.terms import caption_loss, doubly_stochastic


class ReinforceBaseline:
    """Moving-average baseline b <- decay * b + (1 - decay) * (mean log-likelihood per token).

    Per token, applied per caption: the reward is the caption's summed log-likelihood, whose mean
    grows linearly with the number of words, and shapes-world captions run from 4 to 20 words. A
    single per-caption average would sit far above long captions' rewards and below short ones',
    leaving a length-driven offset in (R - b) that adds variance and no signal. So b tracks the mean
    log-likelihood of one token and caption i is given ``n_i * b``. That is still a constant with
    respect to the caption's own locations (n_i is fixed by the caption, b comes from earlier batches),
    so the estimator stays unbiased. The state is one float, saved in checkpoints.
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value: float | None = None  # mean log p(y_t | ...) per token; None until the first update
        self.updates = 0

    def expected(self, n_tokens: Tensor) -> Tensor:
        """Baseline in reward units for captions of ``n_tokens`` (B,) real tokens (zeros before any update)."""
        n = n_tokens if n_tokens.is_floating_point() else n_tokens.float()
        return n * (self.value if self.value is not None else 0.0)

    def update(self, per_token_log_lik: float) -> None:
        """Fold in one minibatch's mean log-likelihood per token; the first value initialises b."""
        v = float(per_token_log_lik)
        if not math.isfinite(v):
            return  # a non-finite batch must not poison every later baseline
        self.value = v if self.value is None else self.decay * self.value + (1.0 - self.decay) * v
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain floats and ints (safe for ``weights_only`` checkpoints)."""
        return {"decay": self.decay, "value": self.value, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.value = None if state["value"] is None else float(state["value"])
        self.updates = int(state.get("updates", 0))


class ReinforceTerms(NamedTuple):
    """Per-step quantities of sampled location sequences, zero at padded steps."""

    token_log_lik: Tensor  # (B, T-1) log p(y_t | y_<t, s_<=t, a)
    location_log_prob: Tensor  # (B, T-1) log alpha_t[s_t]
    entropy: Tensor  # (B, T-1) H(alpha_t)
    mask: Tensor  # (B, T-1) 1.0 at steps that predict a real token


def reinforce_terms(out: DecoderOutput, targets: Tensor, pad_id: int = 0) -> ReinforceTerms:
    """Gather the REINFORCE ingredients from a hard-attention DecoderOutput and targets (B, T-1)."""
    if out.location_log_probs is None or out.entropies is None:
        raise ValueError("REINFORCE needs a hard-attention decoder output (location_log_probs, entropies)")
    mask = targets.ne(pad_id).to(out.log_probs.dtype)  # (B, T-1)
    tok = out.log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask  # (B, T-1)
    return ReinforceTerms(tok, out.location_log_probs * mask, out.entropies * mask, mask)


def _suffix_sum(x: Tensor, inclusive: bool) -> Tensor:
    """sum_{t' >= t} x[:, t'] (or t' > t) along dim 1: (B, T) -> (B, T)."""
    s = torch.flip(torch.cumsum(torch.flip(x, [1]), 1), [1])  # (B, T)
    return s if inclusive else s - x


def caption_rewards(terms: ReinforceTerms, reward_to_go: bool = False) -> Tensor:
    """Detached rewards: log p(y|s,a) per caption (B,), or per step the part still to come (B, T-1).

    ``reward_to_go`` uses sum_{t' >= t} log p(y_t' | ...) for the score of s_t: s_t cannot change
    the words before t, so dropping them keeps the estimate unbiased and removes their noise.
    """
    tok = terms.token_log_lik.detach()
    return _suffix_sum(tok, inclusive=True) * terms.mask if reward_to_go else tok.sum(1)


def leave_one_out(rewards: Tensor, samples: int) -> Tensor:
    """Baseline for each of M consecutive samples of a caption: the mean reward of the other M-1.

    rewards (B*M, ...) with the M samples of a caption on adjacent rows -> same shape.
    """
    if samples < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per caption")
    r = rewards.reshape(-1, samples, *rewards.shape[1:])  # (B, M, ...)
    loo = (r.sum(1, keepdim=True) - r) / (samples - 1)  # (B, M, ...) independent of the sample itself
    return loo.reshape(rewards.shape)


def surrogate_from_terms(terms: ReinforceTerms, baseline: Tensor | None = None, lambda_r: float = 1.0,
                         lambda_e: float = 0.0, reward_to_go: bool = False) -> Tensor:
    """Per-caption surrogate objective (B,) whose gradient is the eq. (12) estimate (to maximise).

    ``baseline`` is in reward units: (B,) for whole-caption rewards, (B, T-1) with ``reward_to_go``;
    it must not depend on the caption's own sample.
    """
    log_ps = terms.location_log_prob  # (B, T-1)
    advantage = caption_rewards(terms, reward_to_go)  # (B,) or (B, T-1)
    if baseline is not None:
        advantage = advantage - baseline.detach()
    if reward_to_go:
        score = (advantage * terms.mask * log_ps).sum(1)  # (B,)
    else:
        score = advantage * log_ps.sum(1)  # (B,)
    # Entropy: path part at the sampled history + score part for the steps whose alpha s_t shapes.
    ent = terms.entropy  # (B, T-1)
    ent_after = _suffix_sum(ent.detach(), inclusive=False)  # (B, T-1) sum_{t' > t} H(alpha_t')
    entropy_term = ent.sum(1) + (ent_after * log_ps).sum(1)  # (B,)
    return terms.token_log_lik.sum(1) + lambda_r * score + lambda_e * entropy_term


def reinforce_surrogate(out: DecoderOutput, targets: Tensor, baseline: Tensor | None = None, lambda_r: float = 1.0,
                        lambda_e: float = 0.0, reward_to_go: bool = False, pad_id: int = 0) -> Tensor:
    """Per-caption surrogate objective (B,) from a sampled hard-attention DecoderOutput and targets (B, T-1)."""
    return surrogate_from_terms(reinforce_terms(out, targets, pad_id), baseline, lambda_r, lambda_e, reward_to_go)


def hard_attention_loss(model: Any, images: Tensor, captions: Tensor, lengths: Tensor, image_of: Tensor, cfg: Any,
                        baseline: ReinforceBaseline | None, soft_mix: float | None = None,
                        token_total: float | None = None) -> dict[str, Tensor]:
    """Training loss of a hard-attention captioner on one minibatch (``cfg`` is the LossConfig).

    With probability ``soft_mix`` (default ``cfg.soft_mix``; torch's global RNG, saved in checkpoints,
    so a resumed run draws the same choices) the minibatch uses the expected context and the soft loss,
    as in the paper; otherwise ``cfg.hard_samples`` location sequences per caption and the negated
    surrogate, normalised per token like the soft NLL so learning rates carry over. Both paths apply
    ``cfg.label_smoothing`` to the likelihood term (the REINFORCE reward stays the plain log-likelihood)
    and divide by ``token_total`` when given (data parallelism: the global batch's tokens / world size;
    with M samples per caption, M times that). The doubly stochastic penalty (weight
    ``cfg.doubly_stochastic``) is added in both cases; on hard batches it is a regulariser on the alphas
    of the sampled path (path gradient only, outside eq. 12). ``cfg.reward_to_go`` switches from the
    paper's whole-caption reward to per-step rewards (see :func:`caption_rewards`).
    """
    p = float(cfg.soft_mix if soft_mix is None else soft_mix)
    use_soft = p >= 1.0 or (p > 0.0 and bool(torch.rand(()) < p))
    smoothing = float(getattr(cfg, "label_smoothing", 0.0))
    if use_soft:
        out = model(images, captions, lengths, image_of, attend="expected")
        losses = caption_loss(out, captions, cfg.doubly_stochastic, token_total=token_total, smoothing=smoothing)
        mask = captions[:, 1:].ne(0).to(out.log_probs.dtype)  # (N, T-1)
        losses["entropy"] = (out.entropies * mask).sum() / mask.sum().clamp(min=1) if out.entropies is not None else losses["nll"].new_zeros(())
        losses["hard"] = losses["nll"].new_zeros(())
        losses["baseline"] = losses["nll"].new_tensor(_value(baseline))
        return losses

    return _sampled_locations_loss(model, images, captions, lengths, image_of, cfg, baseline, token_total)


def _sampled_locations_loss(model: Any, images: Tensor, captions: Tensor, lengths: Tensor, image_of: Tensor, cfg: Any,
                            baseline: ReinforceBaseline | None, token_total: float | None) -> dict[str, Tensor]:
    """The hard half of :func:`hard_attention_loss`: ``cfg.hard_samples`` location sequences per caption."""
    M = int(cfg.hard_samples)
    smoothing = float(getattr(cfg, "label_smoothing", 0.0))
    reward_to_go = bool(getattr(cfg, "reward_to_go", False))
    features = model.encode(images)  # (B, L, D) once per image; the decoder projects it once per image too
    if M > 1:  # the M samples of a caption on adjacent rows, as leave_one_out expects
        image_of = image_of.repeat_interleave(M, 0)  # (N*M,)
        captions, lengths = captions.repeat_interleave(M, 0), lengths.repeat_interleave(M, 0)  # (N*M, T), (N*M,)
    out = model.decoder(features, captions, lengths, attend="sample", image_of=image_of)
    targets = captions[:, 1:]  # (N*M, T-1)
    terms = reinforce_terms(out, targets)
    n_tok = terms.mask.sum(1)  # (N*M,)
    total = n_tok.sum().clamp(min=1) if token_total is None else n_tok.new_tensor(token_total * M)
    rewards = caption_rewards(terms, reward_to_go)  # (N*M,) or (N*M, T-1)
    per_token = float(terms.token_log_lik.detach().sum() / n_tok.sum().clamp(min=1))
    if M > 1:
        b = leave_one_out(rewards, M)
    elif baseline is not None and baseline.value is not None:
        remaining = _suffix_sum(terms.mask, inclusive=True) if reward_to_go else n_tok  # tokens each reward covers
        b = baseline.expected(remaining)  # (N,) or (N, T-1), zero at padded steps
    else:
        b = None  # no baseline yet: plain REINFORCE for this one batch rather than a self-dependent b
    if baseline is not None:
        baseline.update(per_token)  # after use: the batch's own samples never enter its baseline
    surrogate = surrogate_from_terms(terms, b, cfg.lambda_r, cfg.lambda_e, reward_to_go)  # (N*M,)
    nll_sum = -terms.token_log_lik.sum()
    nll = nll_sum / total
    objective = -surrogate.sum()
    if smoothing:  # (1 - eps) * NLL + eps * uniform on the likelihood's path term, as caption_loss does
        uniform_sum = -(out.log_probs.mean(-1) * terms.mask).sum()
        objective = objective + smoothing * (uniform_sum - nll_sum)
    ds = doubly_stochastic(out.alphas, targets) if cfg.doubly_stochastic else nll.new_zeros(())
    loss = objective / total + cfg.doubly_stochastic * ds
    return {"loss": loss, "nll": nll, "doubly_stochastic": ds, "entropy": terms.entropy.sum() / total,
            "hard": nll.new_ones(()), "baseline": nll.new_tensor(_value(baseline))}


def _value(baseline: ReinforceBaseline | None) -> float:
    """The baseline's current per-token value for logging (0 when there is none yet)."""
    return baseline.value if baseline is not None and baseline.value is not None else 0.0
