"""Visual question answering: a question RNN and an image grid, joined by stacked soft attention, then an MLP over answers.

The image goes through any registered encoder to a grid of annotation vectors (B, L, D), which are
projected once per image, with the (x, y) centre of their cell, to the question width H (the *values* v_i):
relations ("left of the square") are comparisons of positions, and the explicit coordinates make them a
linear function of the values whatever the encoder. The question is read by stacked
recurrent cells (the decoder's LSTM / GRU / RNN cells, 1-4 layers); its last hidden state is the first
attention query u_1. Each glimpse k scores every location with additive attention driven by u_k
(``captioner.models.attention.SoftAttention``), takes the expected value c_k = sum_i alpha_ki v_i, and
the next query is u_{k+1} = u_k + c_k (stacked attention, Yang et al. 2016); glimpse k+1 also scores each
cell's offset (x_i - p_k) from the position p_k = sum_i alpha_ki (x, y)_i that glimpse k looked at, so
"the object to the left of the square" is a region relative to the square wherever it is. The question vector q = u_1
and the *last* context c_K are fused, by concatenation ``[q; c]`` or by the elementwise product of their
projections ``tanh(W_q q) * tanh(W_c c)`` (a low-rank bilinear interaction), and an MLP scores the answers.
Fusing q rather than u_K (which holds every earlier context) makes the answer depend on what the last
glimpse sees, so that glimpse has to find the object the answer is about; earlier glimpses steer it (for
a relation: the landmark first, then the object beside it).

Baselines: ``attention="none"`` uses the mean of the values instead of attending (one "glimpse" with
uniform weights); ``question_only`` has no image at all and scores answers from the question vector.

A checkpoint stores :class:`VQASpec` as a plain dict (``kind: vqa``), enough to rebuild the model
without Hydra. The stacked-cell loop is written here rather than taken from ``AttentionDecoder._run_cells``
(a method of the decoder bound to its own state type); only the cell classes (``CELLS``) are shared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.data.images import normalise_uint8
from captioner.models.attention import SoftAttention, expected_context
from captioner.models.decoder import CELLS
from captioner.models.encoder import Encoder, encoder_spec

KIND = "vqa"
MODEL_KEYS = ("attention", "question_only", "cell", "num_layers", "embed_dim", "hidden_dim", "attn_dim", "fusion",
              "fusion_dim", "glimpses", "mlp_dim", "dropout")
FUSIONS = ("concat", "mul")


@dataclass
class VQASpec:
    """Everything needed to rebuild a VQA model: stored as a plain dict in every checkpoint."""

    encoder: dict[str, Any]
    model: dict[str, Any]
    question_vocab_size: int
    answers: list[str]  # the answer vocabulary's words (its four specials first): what each output scores
    image_size: int
    mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["kind"] = list(self.mean), list(self.std), KIND
        return d

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQASpec":
        """Inverse of :meth:`to_dict` (ValueError for a checkpoint of another kind of model)."""
        if d.get("kind") != KIND:
            raise ValueError("not a visual question answering model (a captioning checkpoint?)")
        return cls(dict(d["encoder"]), dict(d["model"]), int(d["question_vocab_size"]), list(d["answers"]),
                   int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))


class VQAOutput(NamedTuple):
    """Answer scores and where each glimpse looked."""

    logits: Tensor  # (N, A) unnormalised answer scores
    alphas: Tensor  # (N, K, L) attention of each glimpse (uniform for attention=none; (N, 0, L) question-only)


class QuestionEncoder(nn.Module):
    """Word embeddings read by stacked recurrent cells; the question vector is the top layer's last hidden state."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, cell: str = "lstm", num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(CELLS)}")
        if not 1 <= num_layers <= 4:
            raise ValueError(f"num_layers must be 1-4, got {num_layers}")
        self.cell_type, self.hidden_dim = cell, hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.cells = nn.ModuleList([CELLS[cell](embed_dim if i == 0 else hidden_dim, hidden_dim) for i in range(num_layers)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, questions: Tensor, lengths: Tensor) -> Tensor:
        """Word ids (N, T) padded with 0, lengths (N,) -> question vectors (N, H)."""
        N, T = questions.shape
        x = self.dropout(self.embed(questions))  # (N, T, E)
        h = [x.new_zeros(N, self.hidden_dim) for _ in self.cells]  # per layer (N, H)
        c = [x.new_zeros(N, self.hidden_dim) for _ in self.cells]
        for t in range(T):
            live = (lengths > t).unsqueeze(1)  # (N, 1): rows whose question has a word t; the others keep their state
            inp = x[:, t]  # (N, E)
            for i, cell in enumerate(self.cells):
                if self.cell_type == "lstm":
                    h_new, c_new = cell(inp, (h[i], c[i]))
                    c[i] = torch.where(live, c_new, c[i])
                else:
                    h_new = cell(inp, h[i])
                h[i] = torch.where(live, h_new, h[i])  # (N, H)
                inp = self.dropout(h[i]) if i + 1 < len(self.cells) else h[i]
        return h[-1]  # (N, H)


class VQAModel(nn.Module):
    """Encoder grid + question RNN -> stacked soft attention (1-2 glimpses) -> concat or mul fusion -> MLP over answers."""

    def __init__(self, spec: VQASpec, encoder_weights: bool = True):
        super().__init__()
        m = {k: spec.model[k] for k in MODEL_KEYS}
        _validate(m)
        self.spec, self.attention_type, self.fusion = spec, m["attention"], m["fusion"]
        self.question_only, self.glimpses = bool(m["question_only"]), int(m["glimpses"]) if m["attention"] == "soft" else 1
        H = m["hidden_dim"]
        self.question = QuestionEncoder(spec.question_vocab_size, m["embed_dim"], H, m["cell"], m["num_layers"], m["dropout"])
        self.encoder: Encoder | None = None
        if not self.question_only:
            enc = dict(spec.encoder)
            if not encoder_weights:
                enc["weights"] = None  # the weights come from a checkpoint's state dict
            self.encoder = Encoder(**enc)
            self.spec.mean, self.spec.std = self.encoder.mean, self.encoder.std
            self.values = nn.Linear(self.encoder.out_dim + 2, H)  # annotation vectors and cell coordinates -> the query's width
            if self.attention_type == "soft":
                self.attend = nn.ModuleList([SoftAttention(H, H, m["attn_dim"]) for _ in range(self.glimpses)])
                # glimpse k > 1 also scores each cell's offset from where glimpse k-1 looked (its expected position)
                self.offsets = nn.ModuleList([nn.Linear(2, m["attn_dim"], bias=False) for _ in range(self.glimpses - 1)])
        if self.question_only:
            fused = H
        elif self.fusion == "concat":
            fused = 2 * H
        else:
            self.fuse_q, self.fuse_c = nn.Linear(H, m["fusion_dim"]), nn.Linear(H, m["fusion_dim"])
            fused = m["fusion_dim"]
        self.dropout = nn.Dropout(m["dropout"])
        self.mlp = nn.Sequential(nn.Linear(fused, m["mlp_dim"]), nn.ReLU(), nn.Dropout(m["dropout"]),
                                 nn.Linear(m["mlp_dim"], spec.num_answers))

    def encode(self, x: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) (normalised here) or normalised float images -> values (B, L, H)."""
        if self.encoder is None:
            raise RuntimeError("a question-only model has no image encoder")
        if x.dtype == torch.uint8:
            x = normalise_uint8(x, self.spec.mean, self.spec.std)  # (B, 3, H, W)
        feats = self.encoder(x)  # (B, L, D)
        xy = grid_coordinates(feats.size(1), feats.device, feats.dtype).expand(feats.size(0), -1, -1)  # (B, L, 2)
        return torch.tanh(self.values(torch.cat([feats, xy], dim=-1)))  # (B, L, H)

    def forward(self, images: Tensor | None, questions: Tensor, lengths: Tensor, image_of: Tensor | None = None) -> VQAOutput:
        """Answer scores for questions (N, T) about images (B, 3, H, W); ``image_of`` (N,) maps questions to images
        (default: question n is about image n). ``images`` may be None for a question-only model."""
        q = self.question(questions, lengths)  # (N, H) question vector: the first query
        if self.question_only:
            return VQAOutput(self.mlp(self.dropout(q)), q.new_zeros(q.size(0), 0, 0))  # (N, A), no attention
        values = self.encode(images)  # (B, L, H), once per image
        u = q
        idx = image_of if image_of is not None else torch.arange(q.size(0), device=q.device)  # (N,)
        if self.attention_type == "none":
            c = values.mean(dim=1).index_select(0, idx)  # (N, H)
            alphas = u.new_full((u.size(0), 1, values.size(1)), 1.0 / values.size(1))  # (N, 1, L)
        else:
            v = values.index_select(0, idx)  # (N, L, H)
            xy = grid_coordinates(values.size(1), values.device, values.dtype)  # (1, L, 2)
            alpha_list: list[Tensor] = []
            for k, att in enumerate(self.attend):
                projected = att.project(values).index_select(0, idx)  # (N, L, A), per image then per question
                if k > 0:
                    seen = torch.bmm(alpha_list[-1].unsqueeze(1), xy.expand(q.size(0), -1, -1))  # (N, 1, 2) where glimpse k-1 looked
                    projected = projected + 2.0 * self.offsets[k - 1](xy - seen)  # (N, L, A); doubled like project()
                alpha = F.softmax(att.scorer(projected, u), dim=-1)  # (N, L)
                c = expected_context(alpha, v)  # (N, H)
                alpha_list.append(alpha)
                if k + 1 < len(self.attend):
                    u = u + c  # the next glimpse's query knows what the last one found
            alphas = torch.stack(alpha_list, dim=1)  # (N, K, L)
        if self.fusion == "concat":
            z = torch.cat([q, c], dim=-1)  # (N, 2H)
        else:
            z = torch.tanh(self.fuse_q(q)) * torch.tanh(self.fuse_c(c))  # (N, F)
        return VQAOutput(self.mlp(self.dropout(z)), alphas)  # (N, A), (N, K, L)


def grid_coordinates(L: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(1, L, 2) x, y centres in [-1, 1] of the cells of a square grid of L cells, row-major like the features."""
    g = math.isqrt(L)
    if g * g != L:
        raise ValueError(f"the encoder's grid of {L} cells is not square")
    c = (torch.arange(g, device=device, dtype=dtype) + 0.5) * (2.0 / g) - 1.0  # (g,)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=-1).unsqueeze(0)  # (1, L, 2)


def _validate(m: dict[str, Any]) -> None:
    """ValueError naming the first option that cannot work."""
    if m["attention"] not in ("soft", "none"):
        raise ValueError(f"model.attention must be soft or none for VQA, got {m['attention']!r}")
    if m["fusion"] not in FUSIONS:
        raise ValueError(f"model.fusion must be one of {FUSIONS}, got {m['fusion']!r}")
    if m["glimpses"] not in (1, 2):
        raise ValueError(f"model.glimpses must be 1 or 2, got {m['glimpses']}")


def build_vqa_model(encoder_cfg: Any, model_cfg: Any, question_vocab_size: int, answers: Sequence[str],
                    image_size: int) -> VQAModel:
    """Build from the ``encoder`` and ``model`` config groups (dataclasses or dicts) and the answer vocabulary's words."""
    m = dict(model_cfg if isinstance(model_cfg, dict) else asdict(model_cfg))
    spec = VQASpec(encoder_spec(encoder_cfg), {k: m[k] for k in MODEL_KEYS}, question_vocab_size, list(answers), image_size)
    return VQAModel(spec)


@torch.no_grad()
def answer_probabilities(logits: Tensor, specials: int = 4) -> Tensor:
    """Softmax over the real answers (N, A): the first ``specials`` entries of the answer vocabulary get 0."""
    logits = logits.clone()
    logits[:, :specials] = float("-inf")
    return F.softmax(logits, dim=-1)  # (N, A)


def load_vqa(path: Any, map_location: str | torch.device = "cpu") -> tuple[VQAModel, Any, Any]:
    """(model in eval mode, question vocabulary, answer vocabulary) from a VQA checkpoint; CheckpointError otherwise."""
    from captioner.data.vocab import Vocabulary
    from captioner.models.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path, map_location)
    try:
        spec = VQASpec.from_dict(ckpt["model_config"])
        model = VQAModel(spec, encoder_weights=False)
        model.load_state_dict(ckpt["model"])
        vocab, answers = Vocabulary(ckpt["vocab"]), Vocabulary(spec.answers)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a usable VQA checkpoint ({first[:300]})") from None
    return model.eval(), vocab, answers


@dataclass
class Answer:
    """The model's answer to one question about one image."""

    answer: str
    top: list[tuple[str, float]]  # the k most probable answers with their probabilities
    alphas: Tensor  # (K, L) attention of each glimpse ((0, L) for a question-only model)
    unknown: list[str]  # question words the model does not know (read as <unk>)


@torch.no_grad()
def ask(model: VQAModel, vocab: Any, answers: Any, image: Tensor, question: str, k: int = 3) -> Answer:
    """Answer ``question`` about ``image`` (uint8 (3, S, S) at the model's input size); ValueError for a wordless question."""
    from captioner.data.tokenize import tokenize

    tokens = tokenize(question)
    if not tokens:
        raise ValueError(f"the question {question!r} has no words")
    unknown = list(dict.fromkeys(t for t in tokens if t not in vocab))
    device = next(model.parameters()).device
    ids = torch.tensor([vocab.encode(tokens)[1:-1]], device=device)  # (1, T) without <start>/<end>
    out = model(image.unsqueeze(0).to(device) if model.encoder is not None else None, ids, torch.tensor([len(tokens)], device=device))
    probs = answer_probabilities(out.logits)[0].cpu()  # (A,)
    p, idx = probs.topk(min(k, probs.numel()))
    top = [(answers.words[i], float(q)) for q, i in zip(p.tolist(), idx.tolist())]
    return Answer(top[0][0], top, out.alphas[0].cpu(), unknown)
