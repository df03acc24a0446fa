"""The one loss entry point: every attention type gets label smoothing, the doubly stochastic term and the
data-parallel token normalisation the same way (before, hard attention silently trained without the first
and with per-rank normalisation)."""

from __future__ import annotations

import pytest
import torch

from captioner.training.losses import CaptionObjective, caption_loss


@pytest.fixture
def setup(tiny_shapes, tmp_path):
    """(cfg, model, batch) for an experiment on the tiny shapes world, one batch of 4 images x 2 captions."""
    from conftest import TINY_MODEL, compose_train

    from captioner.data.build import build_data
    from captioner.data.datasets import CaptionGroups, collate_groups
    from captioner.models.captioner import build_model

    def make(experiment: str, *extra: str):
        cfg = compose_train([f"experiment={experiment}", f"data.root={tiny_shapes}", "data.generate=false",
                             f"output_dir={tmp_path / 'run'}", *TINY_MODEL, "model.dropout=0.0", *extra])
        torch.manual_seed(0)
        data = build_data(cfg.data)
        model = build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size)
        groups = CaptionGroups(data.records["train"][:4], data.vocab, data.stores["train"], cfg.data.max_caption_len, 2)
        return cfg, model, collate_groups([groups[i] for i in range(4)])

    return make


def test_flickr8k_hard_inherits_label_smoothing_into_the_loss_it_trains_with():
    from conftest import compose_train

    cfg = compose_train(["experiment=flickr8k_hard", "data.root=/nonexistent", "output_dir=/tmp/x"])
    assert cfg.loss.label_smoothing == pytest.approx(0.1)  # from flickr8k_soft
    assert CaptionObjective(cfg.loss, cfg.model.attention).cfg.label_smoothing == pytest.approx(0.1)


@pytest.mark.parametrize("experiment", ["shapes_soft", "shapes_show_tell", "shapes_hard"])
def test_label_smoothing_reaches_every_attention_type(setup, experiment):
    """Expected-context path (soft, Show-and-Tell, hard with soft_mix=1): exactly caption_loss with smoothing."""
    cfg, model, batch = setup(experiment, "loss.label_smoothing=0.2", "loss.soft_mix=1.0")
    objective = CaptionObjective(cfg.loss, model.decoder.attention_type)
    got = objective(model, batch, epoch=1)
    attend = "expected" if model.decoder.attention_type == "hard" else None
    out = model(batch["images"], batch["captions"], batch["lengths"], batch["image_of"], attend=attend)
    lambda_ds = cfg.loss.doubly_stochastic if model.decoder.attention_type != "none" else 0.0
    ref = caption_loss(out, batch["captions"], lambda_ds, smoothing=0.2)
    plain = caption_loss(out, batch["captions"], lambda_ds, smoothing=0.0)
    torch.testing.assert_close(got["loss"], ref["loss"])
    assert abs((ref["loss"] - plain["loss"]).item()) > 1e-3  # smoothing really changes the loss


def test_hard_attention_sampled_batches_are_smoothed_and_use_the_global_token_count(setup):
    cfg, model, batch = setup("shapes_hard", "loss.soft_mix=0.0", "loss.hard_samples=2", "loss.doubly_stochastic=0.0")
    from captioner.training.reinforce import hard_attention_loss

    args = (model, batch["images"], batch["captions"], batch["lengths"], batch["image_of"])

    def run(cfg_loss, token_total=None):
        torch.manual_seed(5)  # the same sampled locations every time
        return hard_attention_loss(*args, cfg_loss, None, token_total=token_total)

    import dataclasses

    plain, smoothed = run(cfg.loss), run(dataclasses.replace(cfg.loss, label_smoothing=0.3))
    # the difference is eps * (uniform - NLL) per token of the sampled batch, nothing else
    torch.manual_seed(5)
    out = model.decoder(model.encode(batch["images"]), batch["captions"].repeat_interleave(2, 0),
                        batch["lengths"].repeat_interleave(2, 0), attend="sample", image_of=batch["image_of"].repeat_interleave(2, 0))
    targets = batch["captions"].repeat_interleave(2, 0)[:, 1:]
    mask = targets.ne(0).to(out.log_probs.dtype)
    nll_sum = -(out.log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum()
    uniform_sum = -(out.log_probs.mean(-1) * mask).sum()
    expected = 0.3 * (uniform_sum - nll_sum) / mask.sum()
    torch.testing.assert_close(smoothed["loss"] - plain["loss"], expected, rtol=1e-4, atol=1e-6 * expected.abs().item())
    # data parallelism: the loss is divided by the global batch's tokens / world size (x samples), not the local count
    local_tokens = float(batch["captions"][:, 1:].ne(0).sum())
    scaled = run(cfg.loss, token_total=2 * local_tokens)
    torch.testing.assert_close(scaled["loss"], plain["loss"] / 2, rtol=1e-5, atol=0.0)
