"""data.hflip: which training images are mirrored, how, and that the option reaches the training loader."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner.config import ConfigError
from captioner.data.datasets import CaptionGroups, mirror
from captioner.data.sources import ImageRecord
from captioner.data.vocab import Vocabulary
from vqa_support import compose_vqa


def records(n: int, sided: set[int]) -> list[ImageRecord]:
    """n images with two captions each; those in ``sided`` say "left" in their second caption."""
    out = []
    for i in range(n):
        caps = [["a", "dog", "runs"], ["a", "dog", "on", "the", "left" if i in sided else "grass"]]
        out.append(ImageRecord(image_id=str(i), path=Path(f"{i}.png"), split="train", captions=[" ".join(c) for c in caps], tokens=caps))
    return out


def groups(n: int, sided: set[int], items: list[torch.Tensor], hflip: bool = True, seed: int = 0) -> CaptionGroups:
    recs = records(n, sided)
    vocab = Vocabulary.build([t for r in recs for t in r.tokens], min_count=1)
    return CaptionGroups(recs, vocab, items, max_len=8, captions_per_image=1, hflip=hflip, seed=seed)


def test_mirrored_features_are_the_features_of_the_mirrored_map():
    # The encoder flattens a (D, g, g) map row-major into (L, D); mirroring the photo mirrors the map's columns
    # for any mirror-equivariant encoder, e.g. a convolution with a left-right symmetric kernel.
    torch.manual_seed(0)
    photo = torch.randn(1, 3, 18, 18, dtype=torch.float64)
    k = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    k = k + k.flip(-1)  # symmetric left-right: conv(mirror(x)) = mirror(conv(x))
    enc = lambda x: F.avg_pool2d(F.conv2d(x, k, padding=1), 2).flatten(2).transpose(1, 2)[0]  # (81, 5)
    feats, feats_of_mirror = enc(photo), enc(photo.flip(-1))
    assert not torch.allclose(feats, feats_of_mirror)
    torch.testing.assert_close(mirror(feats), feats_of_mirror, rtol=1e-12, atol=1e-12)
    img = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert torch.equal(mirror(img)[:, :, 0], img[:, :, -1]) and torch.equal(mirror(mirror(img)), img)
    with pytest.raises(ValueError, match="not a square grid"):
        mirror(torch.zeros(10, 4))


def test_half_the_images_are_mirrored_each_epoch_never_those_that_say_left_or_right():
    n, sided = 400, {3, 50, 123}
    items = [torch.randn(9, 4) for _ in range(n)]
    g = groups(n, sided, items)
    per_epoch = []
    for epoch in range(1, 6):
        g.set_epoch(epoch)
        flipped = set()
        for i in range(n):
            item = g[i][0]
            if torch.equal(item, items[i]):
                continue
            assert torch.equal(item, mirror(items[i]))
            flipped.add(i)
        assert not flipped & sided
        assert 0.4 * n < len(flipped) < 0.6 * n  # Binomial(397, 1/2): 5 standard deviations either side
        per_epoch.append(flipped)
    assert len({frozenset(f) for f in per_epoch}) == 5  # drawn afresh every epoch
    # A resumed run (a fresh dataset set straight to epoch 4) mirrors the same images; another seed others.
    fresh = groups(n, sided, items)
    fresh.set_epoch(4)
    assert {i for i in range(n) if not torch.equal(fresh[i][0], items[i])} == per_epoch[3]
    other = groups(n, sided, items, seed=1)
    other.set_epoch(4)
    assert {i for i in range(n) if not torch.equal(other[i][0], items[i])} != per_epoch[3]
    off = groups(n, sided, items, hflip=False)
    for epoch in (1, 2):
        off.set_epoch(epoch)
        assert all(torch.equal(off[i][0], items[i]) for i in range(n))


def test_the_option_reaches_the_training_loader_and_vqa_refuses_it(tiny_cfg, tmp_path):
    from captioner import distributed
    from captioner.training import loop
    from captioner.training.vqa import setup_vqa

    info = distributed.init_distributed("cpu")
    for hflip in (False, True):
        cfg = tiny_cfg(f"data.hflip={str(hflip).lower()}")
        data = loop.build_data(cfg.data)
        loader, sampler = loop.make_loader(data, cfg, info)
        loader.dataset.set_epoch(1)
        photos = [data.stores["train"][i] for i in range(len(data.stores["train"]))]
        mirrored = [i for i in range(len(photos)) if torch.equal(loader.dataset[i][0], photos[i].flip(-1))
                    and not torch.equal(photos[i], photos[i].flip(-1))]
        assert bool(mirrored) == hflip
    cfg = compose_vqa([f"output_dir={tmp_path / 'vqa'}", "data.hflip=true"])
    with pytest.raises(ConfigError, match="data.hflip"):
        setup_vqa(cfg)
