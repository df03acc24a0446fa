"""Self-critical sequence training (Rennie et al., CVPR 2017): REINFORCE on whole sampled captions, reward CIDEr-D.

For each image, K captions c_1..c_K are sampled from the model's own word distribution through the
decoder's ``step()`` (with gradients), each is scored r(c_k) by :class:`captioner.metrics.reward.CiderDReward`,
and the loss is

    loss = -(1/Z) sum_k (r(c_k) - b_k) sum_t log pi(w_t | w_<t, image)      (end token included),

whose gradient is, in expectation, -(K * #images / Z) times the gradient of the expected reward
E_c[r(c)], as long as b_k does not depend on c_k. The two baselines:

- ``greedy`` (self-critical, the paper's): b_k = r(greedy caption of the image), decoded in eval mode
  (no dropout) without gradients; a function of the parameters only, so unbiased.
- ``mean`` (Luo 2020, "a better variant of SCST"): b_k = mean reward of the image's *other* K-1
  samples; independent of c_k given the parameters, so unbiased too, and it costs no extra decoding.

Z, the normaliser (``normalise``): ``"tokens"`` (default) is the number of sampled decisions of the
whole batch (``mask.sum()``: words, <end>, and the cut decision of captions that reach ``max_len``),
like the per-token NLL, so a learning rate means the same per token; since Z depends on the samples,
the batch estimate is the unbiased one scaled by a random positive 1/Z (its direction is the
unbiased estimate's; over batches, captions of short batches weigh a little more). ``"samples"``
divides by the number of sampled captions (a constant): the expectation of the gradient is then
exactly -grad E[r] averaged over images.

The policy pi is the decoder's distribution after the masks (``<pad>``, ``<start>`` and ``<unk>`` are
never sampled; optional bad-ending blocking via :class:`captioner.decoding.constraints.DecodeMask`),
renormalised over the allowed words, at ``temperature`` (pi ∝ p^(1/temperature)); log pi is what the
loss uses, so the gradient is that of the expected reward under the distribution actually sampled.

Length: at most ``max_len`` words, as for greedy decoding and beam search. After ``max_len`` words one
more decision is drawn: <end> (the caption is finished) or anything else, which cuts the caption
there unfinished; that decision's log-probability is log pi(<end>) or log(1 - pi(<end>)), so the
probabilities of all outcomes sum to one and the estimator stays exact.

Hard attention: the context at sampling (and greedy) time is the expected (soft) context
(``attend="expected"``), as at test time; the policy is over words only, so no location log-probabilities
enter the SCST gradient. Show-and-Tell (``attention="none"``) and soft attention need nothing special.

Dropout (``cfg.dropout``): by default the samples are drawn with the model in whatever mode the
caller left it (training: dropout on; the policy is then the dropout-averaged one, still unbiased);
``dropout=False`` samples, with gradients, in eval mode, so the policy trained is the one decoded at
test time. The greedy baseline is always decoded in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.data.vocab import Vocabulary
from captioner.decoding.constraints import DecodeMask
from captioner.config import SCSTConfig
from captioner.metrics.reward import CiderDReward
from captioner.models.decoder import AttentionDecoder, Memory

BASELINES = ("greedy", "mean")
NORMALISATIONS = ("tokens", "samples")
NEVER_SAMPLED = (Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id)  # not words a caption can contain


class SampledCaptions(NamedTuple):
    """Captions decoded for SCST; row r belongs to image r // K (the K rows of an image are consecutive)."""

    tokens: Tensor  # (N, T) long: words, then <end> if finished, then <pad>; T <= max_len + 1
    log_probs: Tensor  # (N, T) log pi of each decision (0 after the last); carries gradients when sampled
    mask: Tensor  # (N, T) 1.0 at decisions: words, <end>, and the cut after max_len words of an unfinished caption
    lengths: Tensor  # (N,) long: tokens of the caption (words, plus 1 for <end> if finished)
    entropy: Tensor  # (N, T) entropy of pi at each decision (0 after the last)
    finished: Tensor  # (N,) bool: emitted <end>


# --------------------------------------------------------------------------------------------------
# Sampling
def policy_log_probs(log_probs: Tensor, prev: Tensor, t: int, max_len: int, temperature: float = 1.0,
                     mask: DecodeMask | None = None, banned: Sequence[int] = NEVER_SAMPLED) -> Tensor:
    """The sampling policy's log-probs (R, V): masked words at -inf, tempered, renormalised."""
    x = mask.apply(log_probs, prev, t, max_len) if mask is not None else log_probs  # (R, V)
    if banned:
        drop = torch.zeros(x.size(-1), dtype=torch.bool, device=x.device)
        drop[list(banned)] = True
        x = x.masked_fill(drop, float("-inf"))
    return F.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)  # (R, V)


def policy_entropy(logp: Tensor) -> Tensor:
    """Entropy (R,) of the distributions with log-probs logp (R, V), banned words (-inf) included as 0 * log 0 = 0."""
    if not torch.is_grad_enabled() or not logp.requires_grad:
        return -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)  # cheaper; its gradient would be nan at p = 0
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


def _as_memory(decoder: AttentionDecoder, memory_or_features: Memory | Tensor) -> Memory:
    """The per-image memory: given, or computed here once from features (B, L, D)."""
    if isinstance(memory_or_features, Memory):
        return memory_or_features
    return decoder.init_memory(memory_or_features)


def _rollout(decoder: AttentionDecoder, memory: Memory, rows_per_image: int, max_len: int,
             choose: Callable[[Tensor], Tensor], temperature: float, mask: DecodeMask | None, banned: Sequence[int],
             attend: str, start_id: int, end_id: int, pad_id: int, entropy_grad: bool = True) -> SampledCaptions:
    """``rows_per_image`` captions per memory entry, one decision per step chosen by ``choose`` from pi (R, V).

    An image whose rows have all finished drops out of the batch (its memory entry with it, as in beam
    search), so the cost follows the longest caption of each image, not of the batch. Long because the
    step loop keeps that bookkeeping (live rows, finished images, per-step log-probs) in one place.
    """
    B, K = memory.features.size(0), rows_per_image
    R = B * K
    device = memory.features.device
    state = decoder.init_state(memory)  # (layers, B, H)
    if K > 1:  # the K rows of an image read its one memory entry; only the small state is copied
        state = state.index_select(torch.arange(B, device=device).repeat_interleave(K))  # (layers, R, H)
    rows = torch.arange(R, device=device)  # (r,) caption index of each active row
    prev = torch.full((R,), start_id, dtype=torch.long, device=device)  # (r,)
    alive = torch.ones(R, dtype=torch.bool, device=device)  # (r,) still deciding
    slots, toks, lps, ents = [], [], [], []  # per step, the rows that decided: flat (caption, step) slot and values
    steps = 0
    for t in range(max_len + 1):  # max_len words, then <end> or the cut
        out = decoder.step(prev, state, memory, attend=attend)
        logp = policy_log_probs(out.log_probs, prev, t, max_len, temperature, mask, banned)  # (r, V)
        word = choose(logp)  # (r,)
        chosen = logp.gather(1, word.unsqueeze(1)).squeeze(1)  # (r,)
        is_end = word == end_id
        if t == max_len:  # the last decision is binary: <end>, or cut here (probability 1 - pi(<end>))
            lp_end = torch.where(is_end, torch.full_like(chosen, -1.0), logp[:, end_id])  # -1: a safe value where unused
            chosen = torch.where(is_end, chosen, torch.log(-torch.expm1(lp_end)))
            word = torch.where(is_end, word, torch.full_like(word, pad_id))
        if entropy_grad:
            entropy = policy_entropy(logp)  # (r,)
        else:
            with torch.no_grad():
                entropy = policy_entropy(logp)  # (r,) logged only: no backward through it
        live = alive.nonzero().squeeze(1)  # (a,)
        slots.append(rows[live] * (max_len + 1) + t)
        toks.append(word[live])
        lps.append(chosen[live])
        ents.append(entropy[live])
        steps = t + 1
        alive = alive & ~is_end
        if t == max_len or not bool(alive.any()):
            break
        prev, state = word, out.state
        image_alive = alive.view(-1, K).any(1)  # (n,)
        if not bool(image_alive.all()):
            keep = image_alive.nonzero().squeeze(1)  # (n',) images still decoding
            keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).flatten()  # (n'*K,)
            memory, state = memory.index_select(keep), state.index_select(keep_rows)
            rows, prev, alive = rows[keep_rows], prev[keep_rows], alive[keep_rows]
    slot = torch.cat(slots)  # (S,) every decision of every caption
    T = max_len + 1

    def padded(values: list[Tensor], fill: float) -> Tensor:  # (S,) -> (R, steps)
        v = torch.cat(values)
        return v.new_full((R * T,), fill).index_copy(0, slot, v).view(R, T)[:, :steps]

    tokens = padded(toks, pad_id)  # (R, steps)
    log_probs, entropy = padded(lps, 0.0), padded(ents, 0.0)  # (R, steps), with gradients
    decided = padded([torch.ones_like(v) for v in lps], 0.0).detach()  # (R, steps)
    finished = (tokens == end_id).any(1)  # (R,)
    lengths = (tokens != pad_id).sum(1)  # (R,)
    return SampledCaptions(tokens, log_probs, decided, lengths, entropy, finished)


def sample_captions(decoder: AttentionDecoder, memory_or_features: Memory | Tensor, n_samples: int, max_len: int,
                    temperature: float = 1.0, generator: torch.Generator | None = None, *, mask: DecodeMask | None = None,
                    attend: str = "expected", banned: Sequence[int] = NEVER_SAMPLED,
                    start_id: int = Vocabulary.start_id, end_id: int = Vocabulary.end_id,
                    pad_id: int = Vocabulary.pad_id, entropy_grad: bool = True) -> SampledCaptions:
    """K = ``n_samples`` captions per image from pi, with gradients; rows i*K .. i*K+K-1 belong to image i.

    ``memory_or_features``: the decoder's Memory of B images, or features (B, L, D) to compute it from
    (once per image: the K rows share it, nothing is copied K times). ``generator`` draws the words.
    ``mask``: optional DecodeMask (bad endings; ``<pad>``/``<start>``/``<unk>`` are always in ``banned``).
    ``entropy_grad=False`` returns the entropy without a graph (when it is only logged).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    memory = _as_memory(decoder, memory_or_features)

    def draw(logp: Tensor) -> Tensor:
        return torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)  # (R,)

    return _rollout(decoder, memory, n_samples, max_len, draw, temperature, mask, banned, attend, start_id, end_id, pad_id,
                    entropy_grad)


@torch.no_grad()
def greedy_captions(decoder: AttentionDecoder, memory_or_features: Memory | Tensor, max_len: int, *,
                    mask: DecodeMask | None = None, attend: str = "expected", banned: Sequence[int] = NEVER_SAMPLED,
                    start_id: int = Vocabulary.start_id, end_id: int = Vocabulary.end_id,
                    pad_id: int = Vocabulary.pad_id) -> SampledCaptions:
    """The most likely allowed word at every step, one caption per image, in eval mode (no dropout), no gradients."""
    memory = _as_memory(decoder, memory_or_features)
    was_training = decoder.training
    decoder.eval()
    try:
        return _rollout(decoder, memory, 1, max_len, lambda logp: logp.argmax(-1), 1.0, mask, banned, attend,
                        start_id, end_id, pad_id)
    finally:
        decoder.train(was_training)


def greedy_baseline(decoder: AttentionDecoder, memory_or_features: Memory | Tensor, image_index: Tensor | Sequence[Any],
                    reward: CiderDReward, max_len: int, **kwargs: Any) -> Tensor:
    """Rewards (B,) of the greedy captions of B images, without gradients (``kwargs``: as :func:`greedy_captions`)."""
    greedy = greedy_captions(decoder, memory_or_features, max_len, **kwargs)
    return reward(greedy.tokens, image_index)


def mean_baseline(rewards: Tensor) -> Tensor:
    """For rewards (B, K) of K samples per image: each sample's baseline, the mean of the image's other K-1 (B, K)."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"the mean baseline needs rewards (B, K) with K >= 2 samples per image, got {tuple(rewards.shape)}")
    K = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)  # (B, K)


# --------------------------------------------------------------------------------------------------
# Loss
def scst_loss(log_probs: Tensor, mask: Tensor, rewards: Tensor, baselines: Tensor, entropy: Tensor | None = None,
              entropy_weight: float = 0.0, normalise: str = "tokens") -> dict[str, Tensor]:
    """-(r - b) * sum_t log pi(w_t) over the sampled decisions, normalised (see the module docstring); plus logged terms.

    log_probs, mask, entropy: (N, T); rewards, baselines: (N,) or (B, K) with N = B*K. Returns ``loss``
    and ``reward`` (mean r), ``baseline`` (mean b), ``advantage`` (mean |r - b|), ``length`` (mean sampled
    decisions per caption, <end> included) and ``entropy`` (mean per-decision entropy of pi). The
    entropy bonus subtracts ``entropy_weight`` times that mean (gradient along the sampled path only).
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    r = rewards.reshape(-1).to(log_probs.dtype)  # (N,)
    b = baselines.reshape(-1).to(log_probs.dtype)  # (N,)
    if r.numel() != log_probs.size(0) or b.numel() != r.numel():
        raise ValueError(f"{r.numel()} rewards and {b.numel()} baselines for {log_probs.size(0)} captions")
    advantage = (r - b).detach()  # (N,)
    seq_log_prob = (log_probs * mask).sum(1)  # (N,)
    tokens = mask.sum().clamp(min=1)
    denominator = tokens if normalise == "tokens" else float(max(r.numel(), 1))
    loss = -(advantage * seq_log_prob).sum() / denominator
    if entropy is not None:
        mean_entropy = (entropy * mask).sum() / tokens
    else:
        mean_entropy = loss.new_zeros(())
    if entropy_weight:
        if entropy is None or (log_probs.requires_grad and not entropy.requires_grad):
            raise ValueError("an entropy bonus needs the entropy with its graph (sample_captions(..., entropy_grad=True))")
        loss = loss - entropy_weight * mean_entropy
    return {"loss": loss, "reward": r.mean().detach(), "baseline": b.mean().detach(),
            "advantage": advantage.abs().mean(), "length": mask.sum(1).mean().detach(), "entropy": mean_entropy.detach()}


def build_reward(train_records: Sequence[Any], vocab: Vocabulary, cfg: SCSTConfig) -> CiderDReward:
    """The reward of an SCST run: CIDEr-D (+ BLEU-4) against the training split's references, as ``cfg`` asks."""
    return CiderDReward.from_records(train_records, vocab, include_end=cfg.include_end, bleu4_weight=cfg.bleu4_weight)


def scst_step_loss(model: Any, features_or_images: Tensor, image_index: Tensor, reward: CiderDReward,
                   cfg: SCSTConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The SCST loss of one minibatch of B images: sample K captions each, score, baseline, loss; plus logged terms.

    ``model``: a Captioner (``encode`` + ``decoder``) or a bare AttentionDecoder (then the input is
    features). ``image_index`` (B,): indices (or ids) of the images in ``reward``'s reference set, e.g.
    the training loader's ``batch["index"]``. The image memory is computed once and shared by the K
    samples and the greedy caption. Besides :func:`scst_loss`'s terms: ``words`` (mean words per
    sample), ``finished`` (fraction that emitted <end>) and, with the greedy baseline, ``greedy_reward``.
    """
    if reward.vocab is None:
        raise ValueError("the reward needs the vocabulary (CiderDReward(..., vocab))")
    if reward.include_end != cfg.include_end or reward.bleu4_weight != cfg.bleu4_weight:
        raise ValueError(f"reward built with include_end={reward.include_end}, bleu4_weight={reward.bleu4_weight} "
                         f"but cfg asks for {cfg.include_end}, {cfg.bleu4_weight}")
    decoder: AttentionDecoder = getattr(model, "decoder", model)
    features = model.encode(features_or_images) if hasattr(model, "encode") else features_or_images  # (B, L, D)
    vocab = reward.vocab
    mask = DecodeMask(vocab, allow_unk=False, block_bad_endings=cfg.block_bad_endings)
    ids = {"start_id": vocab.start_id, "end_id": vocab.end_id, "pad_id": vocab.pad_id,
           "banned": (vocab.pad_id, vocab.start_id, vocab.unk_id)}
    was_training = decoder.training
    decoder.train(was_training and cfg.dropout)  # dropout=False: the eval-mode (test-time) policy, with gradients
    try:
        memory = decoder.init_memory(features)  # once per image, for the samples and the greedy caption
        B, K = features.size(0), cfg.samples
        samples = sample_captions(decoder, memory, K, cfg.max_len, cfg.temperature, generator, mask=mask,
                                  attend=cfg.hard_attend, entropy_grad=bool(cfg.entropy_weight), **ids)
    finally:
        decoder.train(was_training)
    image_index = image_index if isinstance(image_index, Tensor) else torch.as_tensor(image_index)
    rewards = reward(samples.tokens, image_index.repeat_interleave(K)).to(samples.log_probs.dtype)  # (B*K,)
    rewards = rewards.to(samples.log_probs.device).view(B, K)
    extra: dict[str, Tensor] = {}
    if cfg.baseline == "greedy":
        greedy = greedy_baseline(decoder, memory, image_index, reward, cfg.max_len, mask=mask, attend=cfg.hard_attend, **ids)
        greedy = greedy.to(rewards)  # (B,)
        baselines = greedy.unsqueeze(1).expand(B, K)  # (B, K)
        extra["greedy_reward"] = greedy.mean()
    else:
        baselines = mean_baseline(rewards)  # (B, K)
    losses = scst_loss(samples.log_probs, samples.mask, rewards, baselines, samples.entropy, cfg.entropy_weight,
                       cfg.normalise)
    words = samples.lengths - samples.finished.long()  # (B*K,)
    losses.update(extra, words=words.to(rewards.dtype).mean(), finished=samples.finished.to(rewards.dtype).mean())
    return losses
