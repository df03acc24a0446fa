"""data.hflip: which training images are mirrored, what a mirrored item is (photo or cached features), and why
the cached grid itself is never mirrored."""

from pathlib import Path

import pytest
import torch

from captioner.config import ConfigError
from captioner.data.datasets import CaptionGroups, ImageStore
from captioner.data.sources import ImageRecord
from captioner.data.vocab import Vocabulary
from captioner.models.encoder import ShapesCNN
from vqa_support import compose_vqa


def records(n: int, sided: set[int]) -> list[ImageRecord]:
    """n images with two captions each; those in ``sided`` say "left" in their second caption."""
    out = []
    for i in range(n):
        caps = [["a", "dog", "runs"], ["a", "dog", "on", "the", "left" if i in sided else "grass"]]
        out.append(ImageRecord(image_id=str(i), path=Path(f"{i}.png"), split="train", captions=[" ".join(c) for c in caps], tokens=caps))
    return out


def groups(n: int, sided: set[int], items: list[torch.Tensor], hflip: bool = True, seed: int = 0, mirrored=None) -> CaptionGroups:
    recs = records(n, sided)
    vocab = Vocabulary.build([t for r in recs for t in r.tokens], min_count=1)
    return CaptionGroups(recs, vocab, items, max_len=8, captions_per_image=1, hflip=hflip, seed=seed, mirrored=mirrored)


def test_half_the_images_are_mirrored_each_epoch_never_those_that_say_left_or_right():
    n, sided = 400, {3, 50, 123}
    photos = [torch.randint(0, 255, (3, 4, 4), dtype=torch.uint8) for _ in range(n)]
    g = groups(n, sided, photos)
    per_epoch = []
    for epoch in range(1, 6):
        g.set_epoch(epoch)
        flipped = set()
        for i in range(n):
            item = g[i][0]
            if torch.equal(item, photos[i]):
                continue
            assert torch.equal(item, photos[i].flip(-1))
            flipped.add(i)
        assert not flipped & sided
        assert 0.4 * n < len(flipped) < 0.6 * n  # Binomial(397, 1/2): 5 standard deviations either side
        per_epoch.append(flipped)
    assert len({frozenset(f) for f in per_epoch}) == 5  # drawn afresh every epoch
    # A resumed run (a fresh dataset set straight to epoch 4) mirrors the same images; another seed others.
    fresh = groups(n, sided, photos)
    fresh.set_epoch(4)
    assert {i for i in range(n) if not torch.equal(fresh[i][0], photos[i])} == per_epoch[3]
    other = groups(n, sided, photos, seed=1)
    other.set_epoch(4)
    assert {i for i in range(n) if not torch.equal(other[i][0], photos[i])} != per_epoch[3]
    off = groups(n, sided, photos, hflip=False)
    for epoch in (1, 2):
        off.set_epoch(epoch)
        assert all(torch.equal(off[i][0], photos[i]) for i in range(n))
    # cached features: the mirrored item comes from the mirrored store, never from the grid
    feats, mirrored = [torch.randn(9, 4) for _ in range(n)], [torch.randn(9, 4) for _ in range(n)]
    g = groups(n, sided, feats, mirrored=mirrored)
    g.set_epoch(4)
    assert {i for i in range(n) if torch.equal(g[i][0], mirrored[i])} == per_epoch[3]
    with pytest.raises(ValueError, match="train_mirrored"):
        groups(n, sided, feats)


@pytest.mark.parametrize("attention", ["soft", "hard", "none"])
def test_the_decoders_treat_locations_as_a_set_so_mirroring_a_cached_grid_would_change_nothing(attention):
    from captioner.config import EncoderConfig, ModelConfig
    from captioner.models.captioner import build_model

    torch.manual_seed(0)
    model = build_model(EncoderConfig(name="shapes_cnn", channels=8, blocks=1),
                        ModelConfig(embed_dim=8, hidden_dim=8, attn_dim=8, attention=attention, dropout=0.0), 12, image_size=32)
    model = model.double().eval()
    D = model.encoder.out_dim
    feats = torch.randn(2, 9, D, dtype=torch.float64)  # (B, L, D), a 3x3 grid
    grid_mirror = feats.view(2, 3, 3, D).flip(2).reshape(2, 9, D)
    assert not torch.equal(grid_mirror, feats)
    captions, lengths = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]), torch.tensor([5, 4])
    attend = "expected" if attention == "hard" else None  # hard: the expected context (a sample's index would move)
    a = model.decoder(feats, captions, lengths, attend=attend)
    b = model.decoder(grid_mirror, captions, lengths, attend=attend)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-12, atol=1e-12)
    if attention != "none":  # the same weights, moved with their locations
        torch.testing.assert_close(b.alphas, a.alphas.view(2, -1, 3, 3).flip(-1).reshape(a.alphas.shape), rtol=1e-12, atol=1e-12)


def test_cached_training_reads_the_features_of_the_mirrored_photos_and_vqa_and_evaluation_refuse_hflip(tiny_cfg, tmp_path):
    from captioner.data.build import MIRRORED
    from captioner.data.images import normalise_uint8
    from captioner.training import loop
    from captioner.training.vqa import setup_vqa

    torch.manual_seed(3)
    weights = tmp_path / "shapes_cnn.pth"
    torch.save(ShapesCNN(channels=16).state_dict(), weights)
    cfg = tiny_cfg("encoder.freeze=true", f"encoder.weights={weights}", "data.hflip=true", f"data.features={tmp_path / 'cache'}")
    job = loop.setup(cfg)  # builds the cache, the mirrored training photos included
    photos = ImageStore(job.data.records["train"], cfg.data.image_size)
    assert len(job.data.stores[MIRRORED]) == len(photos)
    groups = job.loader.dataset
    groups.set_epoch(1)
    enc = job.model.encoder
    seen = set()
    for i in range(len(photos)):
        with torch.no_grad():
            plain, mirrored = (enc(normalise_uint8(p[None], enc.mean, enc.std))[0] for p in (photos[i], photos[i].flip(-1)))
        item = groups[i][0].float()
        expect = mirrored if groups.flips[i] else plain
        torch.testing.assert_close(item, expect, rtol=2e-3, atol=2e-3 * float(expect.abs().max()))  # float16 storage
        seen.add(bool(groups.flips[i]))
    assert seen == {True, False}

    cfg = compose_vqa([f"output_dir={tmp_path / 'vqa'}", "data.hflip=true"])
    with pytest.raises(ConfigError, match="data.hflip"):
        setup_vqa(cfg)

    from test_evaluate import compose_evaluate

    from captioner.evaluation import evaluate_job

    cfg = compose_evaluate([f"checkpoint={tmp_path / 'any.pt'}", "data.hflip=true", f"output_dir={tmp_path / 'eval'}"])
    with pytest.raises(ConfigError, match="data.hflip"):
        evaluate_job(cfg)
