"""The one loss entry point of a training step, for every captioner and every stage.

``CaptionObjective`` (teacher forcing: soft, hard and Show-and-Tell) is called the same way by
``train_one_epoch``; the terms it combines live in ``training.terms`` (NLL, doubly stochastic penalty)
and ``training.reinforce`` (hard attention's REINFORCE estimator).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from captioner.training.reinforce import ReinforceBaseline, hard_attention_loss
from captioner.training.terms import caption_loss, doubly_stochastic, masked_nll

__all__ = ["CaptionObjective", "caption_loss", "doubly_stochastic", "global_token_count", "masked_nll"]


# --------------------------------------------------------------------------------------------------
# The one loss entry point of a training step
def global_token_count(local: Tensor, info: Any) -> float | None:
    """Denominator for the per-token loss under data parallelism: the global batch's tokens / world size.

    Gradients are averaged over ranks, so dividing each rank's summed loss by (global tokens / world
    size) makes the averaged gradient equal one process's gradient on the whole global batch. ``None``
    in a single process (each loss then divides by its own token count).
    """
    if info is None or not info.enabled:
        return None
    from captioner.distributed import all_reduce_sum

    return float(all_reduce_sum(local.detach().double().cpu().reshape(1), info)) / info.world_size


class CaptionObjective:
    """Teacher-forced training loss of every captioner: soft attention, hard attention, Show and Tell.

    Called once per step with the loader's batch; it picks the attention mode (hard attention: soft
    warm-up epochs, then the paper's soft/hard minibatch mixing), applies label smoothing, the doubly
    stochastic penalty (models with attention) and the per-token normalisation of the global batch
    under data parallelism the same way on every path. Holds the REINFORCE moving-average baseline,
    whose state goes into checkpoints.
    """

    def __init__(self, cfg: Any, attention_type: str):
        self.cfg = cfg
        self.attention_type = attention_type
        self.baseline = None
        if attention_type == "hard":
            self.baseline = ReinforceBaseline(cfg.baseline_decay)

    def __call__(self, model: Any, batch: dict[str, Tensor], epoch: int, info: Any = None) -> dict[str, Tensor]:
        """Loss terms of one batch (``"loss"`` is what is minimised); ``batch`` tensors already on the device."""
        images, captions, lengths, image_of = batch["images"], batch["captions"], batch["lengths"], batch["image_of"]
        token_total = global_token_count(captions[:, 1:].ne(0).sum(), info)
        lambda_ds = self.cfg.doubly_stochastic if self.attention_type != "none" else 0.0
        if self.attention_type == "hard":
            soft_mix = 1.0 if epoch <= self.cfg.soft_epochs else self.cfg.soft_mix  # soft warm-up: expected context only
            return hard_attention_loss(model, images, captions, lengths, image_of, self.cfg, self.baseline,
                                       soft_mix=soft_mix, token_total=token_total)
        out = model(images, captions, lengths, image_of)
        return caption_loss(out, captions, lambda_ds, token_total=token_total, smoothing=self.cfg.label_smoothing)

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps for exact resume (the REINFORCE baseline), or None."""
        return self.baseline.state_dict() if self.baseline is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.baseline is not None and state is not None:
            self.baseline.load_state_dict(state)


class SCSTObjective:
    """Self-critical sequence training's loss of a step (``training.scst``), called like :class:`CaptionObjective`.

    ``batch["index"]`` says which training image each row is, so the reward (CIDEr-D against that
    image's references, prepared once in ``reward``) needs no captions from the loader. Under data
    parallelism the per-token loss is rescaled to the global batch's token count, as for cross-entropy.
    """

    def __init__(self, cfg: Any, reward: Any):
        self.cfg, self.reward = cfg, reward

    def __call__(self, model: Any, batch: dict[str, Tensor], epoch: int, info: Any = None) -> dict[str, Tensor]:
        from captioner.training.scst import scst_step_loss

        losses = scst_step_loss(model, batch["images"], batch["index"], self.reward, self.cfg)
        if info is not None and info.enabled and self.cfg.normalise == "tokens":
            local = losses["length"].detach() * batch["index"].numel() * self.cfg.samples  # tokens of this rank's samples
            losses["loss"] = losses["loss"] * (float(local) / global_token_count(local, info))
        return losses

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass
