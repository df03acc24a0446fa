"""Visual question answering data on the shapes world: questions per image, vocabularies, a torch dataset and collate.

The images and their objects come from the shapes dataset (``dataset_shapes.json``, read like any
Karpathy JSON); the questions are generated from each image's objects and its ``(split, index)``
(:mod:`captioner.data.questions`), so they need no file of their own. A training item is one image with
all its questions: the encoder runs once per image, however many questions it has.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from captioner.config import ConfigError
from captioner.data.questions import ANSWERS, QUESTION_TYPES, Question, cell_rates, generate_questions, keep_rates, scene_objects
from captioner.data.sources import ImageRecord
from captioner.data.vocab import SPECIALS, Vocabulary

_SHAPES_FILE = re.compile(r"^(train|val|test)_(\d+)\.png$")


def shapes_index(record: ImageRecord) -> tuple[str, int]:
    """(split, index) a shapes image was generated from, read from its file name (``train_000123.png``)."""
    m = _SHAPES_FILE.match(record.path.name)
    if m is None or "objects" not in record.extra:
        raise ConfigError(f"{record.path}: not a shapes-world image with objects; VQA needs data=shapes_vqa")
    return m[1], int(m[2])


def questions_for(records: Sequence[ImageRecord], seed: int, image_size: int, min_objects: int, max_objects: int,
                  per_type: float = 1.0, types: Sequence[str] = QUESTION_TYPES) -> list[list[Question]]:
    """The balanced questions of each record's scene (see :mod:`captioner.data.questions`), aligned with ``records``."""
    keep = keep_rates(cell_rates(image_size, min_objects, max_objects), per_type)
    out = []
    for r in records:
        split, index = shapes_index(r)
        out.append(generate_questions(scene_objects(r.extra["objects"]), seed, split, index, image_size, keep, types))
    return out


def answer_vocab(answers: Sequence[str] = ANSWERS) -> Vocabulary:
    """Answers as a Vocabulary (after the four specials, which are never targets and never predicted)."""
    return Vocabulary(list(SPECIALS) + list(answers))


def question_vocab(questions: Sequence[Sequence[Question]], min_count: int = 1) -> Vocabulary:
    """Question words of the training questions."""
    return Vocabulary.build((q.tokens for qs in questions for q in qs), min_count=min_count)


def encode_question(vocab: Vocabulary, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
    """Word ids (no <start>/<end>); unknown words are <unk>."""
    return vocab.encode(tokens, max_len)[1:-1]


@dataclass
class VQAData:
    """Records per split, their questions (aligned with the records), both vocabularies and the image stores."""

    records: dict[str, list[ImageRecord]]
    questions: dict[str, list[list[Question]]]
    vocab: Vocabulary
    answers: Vocabulary
    stores: dict[str, Any]

    def count(self, split: str) -> int:
        """Number of questions in a split."""
        return sum(len(qs) for qs in self.questions.get(split, []))


class QuestionGroups(Dataset):
    """One item per image that has questions: the image and all its questions, encoded.

    Items hold tensors ready for :func:`collate_vqa`: ``boxes`` is the box ``[x0, y0, x1, y1]`` (pixels
    of the generated image) of the object the answer is about for attribute and relation questions, and
    ``-1`` for the others (their answers are about several objects, or none).
    """

    def __init__(self, records: Sequence[ImageRecord], questions: Sequence[Sequence[Question]], store: Any,
                 vocab: Vocabulary, answers: Vocabulary, max_len: int = 20):
        self.store = store
        self.images = [i for i, qs in enumerate(questions) if qs]
        self.items = []
        for i in self.images:
            objects = records[i].extra["objects"]
            qs = questions[i]
            self.items.append({
                "questions": [encode_question(vocab, q.tokens, max_len) for q in qs],
                "answers": torch.tensor([answers.index.get(q.answer, answers.unk_id) for q in qs]),  # (n,)
                "types": torch.tensor([QUESTION_TYPES.index(q.type) for q in qs]),  # (n,)
                "boxes": torch.tensor([objects[q.object_ids[0]]["bbox"] if q.type in ("attribute", "relation") else [-1] * 4
                                       for q in qs], dtype=torch.float32),  # (n, 4)
            })

    def set_epoch(self, epoch: int) -> None:
        """Nothing changes between epochs (the sampler reshuffles); here for the training loop's interface."""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {"image": self.store[self.images[k]], "index": k, **self.items[k]}


def collate_vqa(batch: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Images (B, 3, S, S) uint8; questions (N, T) padded with 0 and lengths (N,); answers, types (N,);
    boxes (N, 4); image_of (N,) the image of each question; index (B,) the items."""
    qs = [q for b in batch for q in b["questions"]]
    lengths = torch.tensor([len(q) for q in qs], dtype=torch.long)  # (N,)
    questions = torch.zeros(len(qs), int(lengths.max()), dtype=torch.long)  # (N, T)
    for n, q in enumerate(qs):
        questions[n, : len(q)] = torch.tensor(q, dtype=torch.long)
    return {
        "images": torch.stack([b["image"] for b in batch]),  # (B, 3, S, S)
        "questions": questions,
        "lengths": lengths,
        "answers": torch.cat([b["answers"] for b in batch]),  # (N,)
        "types": torch.cat([b["types"] for b in batch]),  # (N,)
        "boxes": torch.cat([b["boxes"] for b in batch]),  # (N, 4)
        "image_of": torch.tensor([k for k, b in enumerate(batch) for _ in b["questions"]], dtype=torch.long),  # (N,)
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),  # (B,)
    }


def build_vqa_data(cfg: Any, vocab: Vocabulary | None = None, answers: Vocabulary | None = None,
                   progress: bool = False) -> VQAData:
    """Records (generating the shapes world if asked), questions, vocabularies and image stores for a ``data`` config.

    ``cfg`` is a :class:`captioner.config.VQADataConfig`; the question vocabulary is built from the
    training questions unless given (a resumed run or a checkpoint brings its own).
    """
    from captioner.data.build import load_records
    from captioner.data.datasets import ImageStore

    if cfg.name != "shapes" or cfg.features:
        raise ConfigError("visual question answering runs on the shapes world from images (data=shapes_vqa, no data.features)")
    records = load_records(cfg)
    s, q = cfg.shapes, cfg.questions
    per_image = {split: q.train_per_image if split == "train" and q.train_per_image is not None else q.per_image for split in records}
    questions = {split: questions_for(rs, q.seed, s.image_size, s.min_objects, s.max_objects, per_image[split] / len(q.types), q.types)
                 for split, rs in records.items()}
    vocab = vocab or question_vocab(questions["train"])
    stores = {split: ImageStore(rs, cfg.image_size, preload=cfg.preload, progress=progress) for split, rs in records.items() if rs}
    return VQAData(records, questions, vocab, answers or answer_vocab(), stores)
