"""The VQA model: shapes, gradients on every parameter for every fusion and glimpse count, padding, overfitting, checkpoints."""

from __future__ import annotations

import pytest
import torch

from captioner.config import EncoderConfig
from captioner.config import VQAModelConfig
from captioner.data.questions import ANSWERS
from captioner.data.sources import read_records
from captioner.data.vocab import Vocabulary
from captioner.data.vqa import QuestionGroups, answer_vocab, collate_vqa, question_vocab, questions_for
from captioner.models.checkpoint import CheckpointError, save_checkpoint
from captioner.models.vqa import QuestionEncoder, VQAModel, build_vqa_model, load_vqa

ANSWER_WORDS = answer_vocab().words
ENC = EncoderConfig(name="shapes_cnn", channels=16, blocks=3, freeze=False)


def _model(**kw) -> VQAModel:
    torch.manual_seed(0)
    cfg = VQAModelConfig(embed_dim=12, hidden_dim=16, attn_dim=8, fusion_dim=12, mlp_dim=16, dropout=0.0, **kw)
    return build_vqa_model(ENC, cfg, 30, ANSWER_WORDS, 64)


def _batch(n_images: int = 3):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_images, 3, 64, 64), dtype=torch.uint8, generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 4])
    questions = torch.randint(1, 30, (5, 6), generator=g) * (torch.arange(6) < lengths.unsqueeze(1))  # (5, 6) zero-padded
    return images, questions, lengths, torch.tensor([0, 0, 1, 2, 2])


@pytest.mark.parametrize("fusion", ["concat", "mul"])
@pytest.mark.parametrize("glimpses", [1, 2])
def test_shapes_and_a_gradient_on_every_parameter(fusion, glimpses):
    model = _model(fusion=fusion, glimpses=glimpses)
    images, questions, lengths, image_of = _batch()
    out = model(images, questions, lengths, image_of)
    assert out.logits.shape == (5, len(ANSWER_WORDS)) and out.alphas.shape == (5, glimpses, 64)  # 8x8 grid
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.alphas.sum(-1), torch.ones(5, glimpses))
    # a loss that reaches every output: random weights, so no parameter's gradient can cancel by symmetry
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw, glimpses", [({"attention": "none"}, 1), ({"question_only": True}, 0)])
def test_baselines(kw, glimpses):
    model = _model(**kw)
    images, questions, lengths, image_of = _batch()
    out = model(images if glimpses else None, questions, lengths, image_of)
    assert out.logits.shape == (5, len(ANSWER_WORDS)) and out.alphas.shape[:2] == (5, glimpses)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    if glimpses:
        torch.testing.assert_close(out.alphas, torch.full((5, 1, 64), 1 / 64))
    else:
        assert model.encoder is None  # nothing of the image is even built


def test_attention_none_ignores_where_things_are():
    """Mean pooling: the answer of a model without attention does not change when the grid's cells are permuted."""
    model = _model(attention="none").eval()
    images, questions, lengths, image_of = _batch()
    values = model.encode(images)  # (B, L, H)
    perm = torch.randperm(values.size(1), generator=torch.Generator().manual_seed(0))
    model.encode = lambda x, _v=values[:, perm]: _v  # type: ignore[method-assign]
    a = model(images, questions, lengths, image_of).logits
    model.encode = lambda x, _v=values: _v  # type: ignore[method-assign]
    torch.testing.assert_close(model(images, questions, lengths, image_of).logits, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 4])
def test_question_encoder_reads_only_real_words(cell, layers):
    """Trailing padding never changes a question's vector; each row equals the question encoded alone."""
    torch.manual_seed(0)
    enc = QuestionEncoder(20, 8, 12, cell, layers).double()
    q = torch.tensor([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
    lengths = torch.tensor([3, 5])
    both = enc(q, lengths)  # (2, 12)
    alone = enc(q[:1, :3], lengths[:1])
    torch.testing.assert_close(both[:1], alone, rtol=1e-12, atol=0)
    longer = enc(torch.cat([q, torch.zeros(2, 4, dtype=torch.long)], 1), lengths)
    torch.testing.assert_close(longer, both, rtol=1e-12, atol=0)


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="fusion"):
        _model(fusion="add")
    with pytest.raises(ValueError, match="glimpses"):
        _model(glimpses=3)
    with pytest.raises(ValueError, match="attention"):
        _model(attention="hard")
    with pytest.raises(ValueError, match="num_layers"):
        _model(num_layers=5)


@pytest.mark.slow
def test_a_tiny_model_overfits_a_few_questions(tiny_shapes):
    """Four images and their questions (every type present) are learnt perfectly within 120 Adam steps."""
    records = [r for r in read_records("karpathy", tiny_shapes, "dataset_shapes.json") if r.split == "train"][:4]
    questions = questions_for(records, seed=0, image_size=64, min_objects=1, max_objects=3, per_type=2.0)
    vocab, answers = question_vocab(questions), answer_vocab()

    class Store:
        def __getitem__(self, i):
            from captioner.data.images import load_image, uint8_tensor

            return uint8_tensor(load_image(records[i].path), 64)

    groups = QuestionGroups(records, questions, Store(), vocab, answers)
    batch = collate_vqa([groups[k] for k in range(len(groups))])
    assert set(batch["types"].tolist()) == {0, 1, 2, 3} and batch["answers"].numel() >= 20
    torch.manual_seed(0)
    model = build_vqa_model(ENC, VQAModelConfig(embed_dim=16, hidden_dim=32, attn_dim=16, mlp_dim=64, dropout=0.0),
                            len(vocab), answers.words, 64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(120):
        out = model(batch["images"], batch["questions"], batch["lengths"], batch["image_of"])
        loss = torch.nn.functional.cross_entropy(out.logits, batch["answers"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(batch["images"], batch["questions"], batch["lengths"], batch["image_of"]).logits.argmax(-1)
    assert pred.eq(batch["answers"]).all(), f"{pred.eq(batch['answers']).float().mean():.3f} of the training questions"


def test_checkpoint_round_trip_without_hydra(tmp_path):
    model = _model(fusion="mul").eval()
    vocab = Vocabulary.build([["what", "colour", "is", "the", "circle"]])
    save_checkpoint(tmp_path / "vqa.pt", model, vocab, epoch=0)
    again, vocab2, answers = load_vqa(tmp_path / "vqa.pt")
    images, questions, lengths, image_of = _batch()
    torch.testing.assert_close(again(images, questions, lengths, image_of).logits, model(images, questions, lengths, image_of).logits,
                               rtol=0, atol=0)
    assert vocab2 == vocab and answers.words[4:] == list(ANSWERS) and again.fusion == "mul"
    assert isinstance(again.spec.to_dict()["encoder"], dict)


def test_a_captioning_checkpoint_is_refused_with_a_clear_message(tmp_path):
    from captioner.config import ModelConfig
    from captioner.models.captioner import build_model

    vocab = Vocabulary.build([["a", "red", "circle"]])
    cap = build_model(EncoderConfig(name="shapes_cnn", channels=16, blocks=2), ModelConfig(embed_dim=8, hidden_dim=8, attn_dim=8),
                      len(vocab), 32)
    save_checkpoint(tmp_path / "cap.pt", cap, vocab)
    with pytest.raises(CheckpointError, match="cap.pt.*not a visual question answering model"):
        load_vqa(tmp_path / "cap.pt")
