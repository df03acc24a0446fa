"""Which captions each training item carries, epoch by epoch (data.captions_per_image)."""

from collections import Counter
from pathlib import Path

import torch

from captioner.data.datasets import CaptionGroups
from captioner.data.sources import ImageRecord
from captioner.data.vocab import Vocabulary


def make_groups(n_images: int, k: int | None) -> tuple[CaptionGroups, Vocabulary]:
    # Caption j of every image is "template j" (as in the shapes world, where the j-th reference of each
    # image always comes from the j-th template).
    records = [ImageRecord(image_id=str(i), path=Path(f"{i}.png"), split="train",
                           captions=[f"t{j} w{i}" for j in range(5)], tokens=[[f"t{j}", f"w{i}"] for j in range(5)])
               for i in range(n_images)]
    vocab = Vocabulary.build([t for r in records for t in r.tokens], min_count=1)
    images = [torch.zeros(3, 2, 2, dtype=torch.uint8)] * n_images
    return CaptionGroups(records, vocab, images, max_len=5, captions_per_image=k), vocab


def templates(groups: CaptionGroups, vocab: Vocabulary, i: int) -> list[str]:
    _, caps, _ = groups[i]
    return [vocab.words[c[1]] for c in caps]  # c = [<start>, t_j, w_i, <end>]


def test_every_epoch_mixes_templates_and_five_epochs_use_every_caption_twice():
    groups, vocab = make_groups(n_images=10, k=2)
    seen = {i: Counter() for i in range(10)}
    for epoch in range(1, 6):
        groups.set_epoch(epoch)
        per_epoch = Counter()
        for i in range(10):
            ts = templates(groups, vocab, i)
            assert len(ts) == 2 and len(set(ts)) == 2
            per_epoch.update(ts)
            seen[i].update(ts)
        assert per_epoch == Counter({f"t{j}": 4 for j in range(5)})  # every template equally often, every epoch
    for i in range(10):
        assert seen[i] == Counter({f"t{j}": 2 for j in range(5)})  # every caption of every image, twice


def test_all_captions_when_k_is_none():
    groups, vocab = make_groups(n_images=3, k=None)
    groups.set_epoch(7)
    assert sorted(templates(groups, vocab, 1)) == [f"t{j}" for j in range(5)]
