"""Weight averaging (optim.ema) and label smoothing (loss.label_smoothing)."""

import pytest
import torch
import torch.nn.functional as F

from captioner.models.decoder import DecoderOutput
from captioner.models.checkpoint import load_checkpoint
from captioner.training.ema import WeightAverage
from captioner.training.loop import train
from captioner.training.losses import caption_loss


def test_weight_average_follows_its_formula_and_swaps_back():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    avg = WeightAverage(net, decay=0.9)
    expected = {n: p.detach().double() for n, p in net.named_parameters() if p.requires_grad}  # the reference in float64
    for step in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        avg.update()
        d = min(0.9, (1 + step) / (10 + step))
        for n, p in net.named_parameters():
            if n in expected:
                expected[n] = d * expected[n] + (1 - d) * p.detach().double()
    assert "1.bias" not in avg.state_dict()["shadow"]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with avg.swapped():
        for n, p in net.named_parameters():
            ref = expected.get(n, before[n].double())
            # float32 averaging of values ~5 over 30 steps: compare relative to the values' magnitude
            assert float((p.detach().double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), n
    for n, p in net.named_parameters():  # training weights restored bit for bit
        assert torch.equal(p, before[n])


def test_label_smoothing_matches_cross_entropy():
    torch.manual_seed(0)
    B, T, V, L = 3, 6, 11, 4
    captions = torch.randint(1, V, (B, T))
    captions[0, 4:] = 0  # padding is ignored
    captions[2, 3:] = 0
    log_probs = torch.randn(B, T - 1, V).log_softmax(-1)
    out = DecoderOutput(log_probs=log_probs, alphas=torch.full((B, T - 1, L), 1 / L))
    plain = caption_loss(out, captions, lambda_ds=0.0)
    for eps in (0.0, 0.1, 0.3):
        smoothed = caption_loss(out, captions, lambda_ds=0.0, smoothing=eps)
        ref = F.cross_entropy(log_probs.reshape(-1, V), captions[:, 1:].reshape(-1), ignore_index=0, label_smoothing=eps)
        torch.testing.assert_close(smoothed["loss"], ref)
        torch.testing.assert_close(smoothed["nll"], plain["nll"])  # the reported NLL stays the plain one
    assert caption_loss(out, captions, lambda_ds=0.0, smoothing=0.1)["loss"] != plain["loss"]


def test_training_with_ema_validates_and_saves_averaged_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg("optim.ema=0.9", "loss.label_smoothing=0.1", "test=false")
    train(cfg)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    shadow = last["ema"]["shadow"]
    assert shadow and last["ema"]["updates"] > 0
    for name, value in shadow.items():  # best.pt (epoch 1) holds the averaged weights, last.pt the raw ones
        torch.testing.assert_close(best["model"][name], value, rtol=0, atol=0)
    assert any(not torch.equal(last["model"][n], v) for n, v in shadow.items())


def test_ema_run_resumes_exactly(tiny_cfg, tmp_path):
    straight = tiny_cfg("epochs=2", "test=false", "optim.ema=0.9")
    straight.output_dir = str(tmp_path / "straight")
    train(straight)
    first = tiny_cfg("epochs=1", "test=false", "optim.ema=0.9")
    first.output_dir = str(tmp_path / "resumed")
    train(first)
    second = tiny_cfg("epochs=2", "test=false", "optim.ema=0.9", "resume=auto")
    second.output_dir = str(tmp_path / "resumed")
    train(second)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    for k, v in a["ema"]["shadow"].items():
        assert torch.equal(v, b["ema"]["shadow"][k]), k


def test_bad_ema_decay_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="optim.ema"):
        train(tiny_cfg("optim.ema=1.5"))
