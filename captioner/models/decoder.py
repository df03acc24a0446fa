"""The Show, Attend and Tell decoder: a recurrent cell that attends over the image grid at every step.

One :meth:`AttentionDecoder.step` serves teacher-forced training and every decoding strategy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.models.attention import ATTENTION, AttentionOutput, full_precision, rows_per_image

CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}
QUERIES = ("previous", "current", "topdown")  # what drives the attention (see AttentionDecoder)


class Memory(NamedTuple):
    """What is computed once per image and reused at every step.

    A step's state may hold g consecutive rows per memory entry (beam search: the K hypotheses of an
    image are rows ``i*K .. i*K+K-1`` for entry ``i``); the attention then reads each image's tensors
    once for all its rows instead of working on K copies.
    """

    features: Tensor  # (B, L, C) annotation vectors the context is made of (C = D unless context_dim is set)
    projected: Tensor  # (B, L, A) attention projection of the features
    pooled: Tensor  # (B, C) their mean over the locations (initial state; the cell's input with query="current")

    def index_select(self, index: Tensor) -> "Memory":
        """Entries ``index`` of every tensor (reordering, expanding or dropping images)."""
        return Memory(*(x.index_select(0, index) for x in self))

    def rows(self, b: int) -> "Memory":
        """The first ``b`` entries (teacher forcing drops the captions that have ended)."""
        return Memory(*(x[:b] for x in self))


class State(NamedTuple):
    """Recurrent state; ``c`` is an empty tensor for cells without a memory cell (GRU, RNN)."""

    h: Tensor  # (num_layers, B, H)
    c: Tensor  # (num_layers, B, H) for LSTM, else (0,)

    def index_select(self, index: Tensor) -> "State":
        """Rows ``index`` along the batch dimension."""
        c = self.c.index_select(1, index) if self.c.numel() else self.c
        return State(self.h.index_select(1, index), c)

    def layers(self, start: int, stop: int) -> "State":
        """Layers ``start .. stop-1`` of the stack (the top-down decoder steps its two cells separately)."""
        return State(self.h[start:stop], self.c[start:stop] if self.c.numel() else self.c)


def step_cells(cells: nn.ModuleList, x: Tensor, state: State, dropout: nn.Module) -> State:
    """One step of stacked recurrent cells (LSTM, GRU or RNN cells) on input x (B, in) -> the new state.

    ``dropout`` is applied between layers, not after the last (callers decide what reads the top ``h``).
    Shared by the captioning decoder and the character language model.
    """
    mixed = torch.is_autocast_enabled(x.device.type)  # bf16 products: keep the state itself in float32
    hs, cs = [], []
    for i, cell in enumerate(cells):
        if isinstance(cell, nn.LSTMCell):
            if mixed:
                h, c = lstm_cell_float_state(cell, x, state.h[i], state.c[i])  # (B, H) each, float32
            else:
                h, c = cell(x, (state.h[i], state.c[i]))  # (B, H) each
            cs.append(c)
        else:
            h = full_precision(cell(x, state.h[i]))  # (B, H)
        hs.append(h)
        x = dropout(h) if i + 1 < len(cells) else h
    return State(torch.stack(hs), torch.stack(cs) if cs else state.c)  # (num_layers, B, H)


def lstm_cell_float_state(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``cell``'s step under autocast: gate products in low precision, gates and the cell state c in float32.

    ``nn.LSTMCell`` under bf16 autocast returns h and c in bfloat16, so c, the sum that carries the
    sequence, would be rounded to 8 bits of mantissa at every step. The same parameters, the same function.
    """
    gates = full_precision(F.linear(x, cell.weight_ih, cell.bias_ih)) + full_precision(F.linear(h, cell.weight_hh, cell.bias_hh))
    i, f, g, o = gates.chunk(4, dim=1)  # (B, H) each, PyTorch's gate order
    c = torch.sigmoid(f) * full_precision(c) + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    return torch.sigmoid(o) * torch.tanh(c), c


POSITION_FREQUENCIES = 4  # sin/cos of pi * 2^k * coordinate, k = 0..3, for each of the two axes


def grid_positions(num_locations: int, frequencies: int = POSITION_FREQUENCIES) -> Tensor:
    """Fixed codes of where each location of a square grid is: (L, 4 * frequencies), rows in raster order.

    A location's centre has coordinates y, x in (-1, 1) (the middle of the grid is 0, whatever its size);
    its code is [sin(pi 2^k y), cos(pi 2^k y), sin(pi 2^k x), cos(pi 2^k x)] for k = 0..frequencies-1.
    The same codes serve any grid size (7x7 at 224 px, 9x9 at 288 px), and mirroring a location
    left-right negates its x sines and keeps its cosines.
    """
    g = math.isqrt(num_locations)
    if g * g != num_locations:
        raise ValueError(f"model.positions needs a square grid of locations; got L={num_locations}")
    centre = (torch.arange(g, dtype=torch.float64) + 0.5) * (2.0 / g) - 1.0  # (g,) in (-1, 1)
    y, x = centre.repeat_interleave(g), centre.repeat(g)  # (L,) each, raster order (row by row)
    scale = math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float64)  # (F,)
    codes = [f(c.unsqueeze(1) * scale) for c in (y, x) for f in (torch.sin, torch.cos)]  # 4 x (L, F)
    return torch.cat(codes, dim=1)  # (L, 4F)


class StepOutput(NamedTuple):
    """One decoding step: word log-probabilities, attention, the new state, and hard-attention extras."""

    log_probs: Tensor  # (B, V)
    alpha: Tensor  # (B, L)
    state: State
    location: Tensor | None = None  # (B,) hard attention: attended location
    location_log_prob: Tensor | None = None  # (B,) hard attention: log p(s_t | a)
    entropy: Tensor | None = None  # (B,) hard attention: entropy of alpha_t
    beta: Tensor | None = None  # (B, 1) gate value


class DecoderOutput(NamedTuple):
    """Teacher-forced outputs for a batch of captions of T-1 predicted positions."""

    log_probs: Tensor  # (B, T-1, V)
    alphas: Tensor  # (B, T-1, L)
    location_log_probs: Tensor | None = None  # (B, T-1) hard attention only
    entropies: Tensor | None = None  # (B, T-1) hard attention only
    locations: Tensor | None = None  # (B, T-1) hard attention only


class AttentionDecoder(nn.Module):
    """Recurrent decoder with soft or hard attention, a beta gate and the paper's deep output layer.

    ``attention="none"`` gives the Show-and-Tell baseline (Vinyals et al., 2015): no attention; the
    pooled image feature either sets the initial state (``image_input="init"``) or is fed as the
    first input before ``<start>`` (``image_input="first"``, as in the original). Its attention maps
    are uniform, so every decoding strategy and the result type stay the same.

    ``query`` sets what scores the locations at step t: ``previous`` (the paper) h_{t-1}, before the cell
    reads the word; ``current`` (Lu et al. 2017) h_t of a cell that read [word; mean feature]; ``topdown``
    (Anderson et al. 2018) h^1_t of an attention cell that read [word; mean feature; h_{t-1} of the top
    layer], with the language cell(s) above it reading [context; h^1_t] (needs ``num_layers >= 2``).
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 256,
        attn_dim: int = 256,
        cell: str = "lstm",
        num_layers: int = 1,
        dropout: float = 0.5,
        attention: str = "soft",
        beta_gate: bool = True,
        deep_output: bool = True,
        image_input: str = "init",
        context_dim: int | None = None,
        feature_dropout: float = 0.0,
        embed_dropout: float = 0.0,
        tie_embeddings: bool = False,
        query: str = "previous",
        positions: str = "none",
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(CELLS)}")
        if attention not in ATTENTION and attention != "none":
            raise ValueError(f"unknown attention {attention!r}; expected one of {sorted(ATTENTION) + ['none']}")
        if image_input not in ("init", "first") or (image_input == "first" and attention != "none"):
            raise ValueError(f"image_input must be 'init', or 'first' with attention='none'; got {image_input!r}")
        if context_dim is not None and (attention == "none" or not 0 < context_dim < feature_dim):
            raise ValueError(f"context_dim must be between 1 and the feature width {feature_dim} (exclusive), "
                             f"and needs attention; got {context_dim} with attention={attention!r}")
        if tie_embeddings and not deep_output and hidden_dim != embed_dim:
            raise ValueError(f"tie_embeddings needs the deep output (its pre-logits are embed_dim wide) or hidden_dim == "
                             f"embed_dim; got deep_output=False, hidden_dim={hidden_dim}, embed_dim={embed_dim}")
        if query not in QUERIES or (query != "previous" and attention == "none"):
            raise ValueError(f"query must be 'previous', or 'current'/'topdown' with attention; got {query!r} with attention={attention!r}")
        if query == "topdown" and num_layers < 2:
            raise ValueError(f"query='topdown' needs num_layers >= 2 (an attention cell and a language cell); got {num_layers}")
        if positions not in ("none", "sincos") or (positions == "sincos" and attention == "none"):
            raise ValueError(f"positions must be 'none', or 'sincos' with attention; got {positions!r} with attention={attention!r}")
        if not 1 <= num_layers <= 4:
            raise ValueError(f"num_layers must be 1-4, got {num_layers}")
        self.vocab_size, self.feature_dim, self.hidden_dim = vocab_size, feature_dim, hidden_dim
        self.cell_type, self.num_layers, self.attention_type = cell, num_layers, attention
        self.deep_output, self.image_input, self.query = deep_output, image_input, query
        attends = attention != "none"
        # Where each location is: without it the decoder sees the grid as a set (any permutation of the L
        # locations gives the same captions). positions="sincos" adds a learned linear map of fixed codes of
        # the location's grid coordinates (grid_positions) to its annotation vector, so both the attention
        # scores and the context know where a vector came from. Zero at the start: training begins from the
        # set model and learns what position adds.
        self.position = nn.Linear(4 * POSITION_FREQUENCIES, feature_dim, bias=False) if positions == "sincos" else None
        if self.position is not None:
            nn.init.zeros_(self.position.weight)
        # Optional low-rank context: annotation vectors projected once per image to context_dim; the
        # attention scores still read the full features.
        self.context_proj = nn.Linear(feature_dim, context_dim, bias=False) if context_dim is not None else None
        ctx_dim = context_dim or feature_dim

        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.attention = ATTENTION[attention](feature_dim, hidden_dim, attn_dim) if attends else None
        # The paper's gating scalar: beta_t = sigmoid(f_beta(h_{t-1})) scales the context (h_t with query="current", h^1_t with "topdown").
        self.f_beta = nn.Linear(hidden_dim, 1) if beta_gate and attends else None
        cls = CELLS[cell]
        # query="previous" (the paper): the cell reads [E y_{t-1}; z_t]; "current": [E y_{t-1}; mean context];
        # "topdown": the attention cell reads [E y_{t-1}; mean context; h_{t-1} of the top layer] and the
        # language cell above it [z_t; h^1_t]
        in_dims = [embed_dim + (ctx_dim if attends else 0)] + [hidden_dim] * (num_layers - 1)
        if query == "topdown":
            in_dims[:2] = [embed_dim + ctx_dim + hidden_dim, ctx_dim + hidden_dim]
        self.cells = nn.ModuleList([cls(in_dims[i], hidden_dim) for i in range(num_layers)])
        n_init = num_layers * (2 if cell == "lstm" else 1)
        if image_input == "init":
            # Initial state: MLPs of the mean annotation vector, one output per layer (and per c for LSTM).
            self.init_mlp = nn.Sequential(nn.Linear(ctx_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, n_init * hidden_dim))
        else:
            self.image_proj = nn.Linear(feature_dim, embed_dim)  # the image as the input at step -1
        self.dropout = nn.Dropout(dropout)
        # Input dropout, as the attention models of self-critical.pytorch apply to their embedded image
        # features and word embeddings: one mask per image for the whole caption (the memory is computed
        # once per image), a fresh one per word embedding. Off (0) by default, as in the paper.
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.embed_dropout = nn.Dropout(embed_dropout)
        if deep_output:
            # p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)), eq. (7) of the paper.
            self.out_h = nn.Linear(hidden_dim, embed_dim)
            self.out_z = nn.Linear(ctx_dim, embed_dim) if attends else None
            self.out = nn.Linear(embed_dim, vocab_size)
        else:
            self.out = nn.Linear(hidden_dim, vocab_size)
        if tie_embeddings:
            # One (V, E) matrix embeds the previous word and scores the next (Press & Wolf 2017; the paper's
            # L_o = E^T): V x E fewer weights, and every output-layer update also moves the word's embedding.
            # Initialised U(-0.1, 0.1) as tied language models are: N(0, 1) rows would start the logits
            # at a scale of sqrt(E).
            with torch.no_grad():
                nn.init.uniform_(self.embed.weight, -0.1, 0.1)
                self.embed.weight[0].zero_()  # <pad>'s row, as nn.Embedding(padding_idx=0) starts it
            self.out.weight = self.embed.weight

    # ----------------------------------------------------------------------------------------------
    def init_memory(self, features: Tensor) -> Memory:
        """Per-image tensors reused at every step: the features (projected to context_dim if set), their attention projection and mean."""
        features = self.feature_dropout(features)  # (B, L, D); identity in eval mode or at p = 0
        if self.position is not None:
            codes = grid_positions(features.size(1)).to(device=features.device, dtype=self.position.weight.dtype)  # (L, 4F)
            features = features + self.position(codes)  # (B, L, D) + (L, D)
        if self.attention is None:
            return Memory(features, features.new_zeros(features.size(0), 0), features.mean(dim=1))  # nothing to project
        values = self.context_proj(features) if self.context_proj is not None else features  # (B, L, C)
        return Memory(values, self.attention.project(features), values.mean(dim=1))  # (B, L, C), (B, L, A), (B, C)

    def init_state(self, memory: Memory) -> State:
        """h_0 (and c_0) from MLPs of the mean annotation vector (or, Show-and-Tell style, by reading the image)."""
        B = memory.features.size(0)
        if self.image_input == "first":
            x = self.image_proj(memory.pooled)  # (B, E)
            zeros = full_precision(x).new_zeros(self.num_layers, B, self.hidden_dim)  # (layers, B, H)
            return self._run_cells(x, State(zeros, zeros if self.cell_type == "lstm" else zeros.new_zeros(0)))
        init = full_precision(self.init_mlp(memory.pooled))  # (B, n_init * H); float32 under autocast too
        init = init.view(B, -1, self.hidden_dim).transpose(0, 1).contiguous()  # (n_init, B, H)
        if self.cell_type == "lstm":
            return State(init[: self.num_layers], init[self.num_layers :])
        return State(init, init.new_zeros(0))

    def step(self, prev_word: Tensor, state: State, memory: Memory, attend: str | None = None) -> StepOutput:
        """Advance one word: prev_word (B,) -> log-probs (B, V), attention (B, L), new state.

        ``attend`` selects the hard-attention context (``sample``/``argmax``/``expected``); soft
        attention ignores it.
        """
        pre, alpha, new_state, att, beta = self._advance(prev_word, state, memory, attend)
        log_probs = F.log_softmax(full_precision(self.out(self.dropout(pre))), dim=-1)  # (B, V), float32 under autocast too
        if att is None:
            return StepOutput(log_probs, alpha, new_state)
        return StepOutput(log_probs, alpha, new_state, att.location, att.log_prob, att.entropy, beta)

    def _advance(self, prev_word: Tensor, state: State, memory: Memory,
                 attend: str | None) -> tuple[Tensor, Tensor, State, AttentionOutput | None, Tensor | None]:
        """Everything of a step up to the vocabulary projection: (pre-logit vector (B, E or H), alpha, state, attention, beta).

        Teacher forcing collects the pre-logit vectors of all steps and projects them in one matrix
        product; ``step`` projects one step's. Both give the same numbers.
        """
        emb = self.embed_dropout(self.embed(prev_word))  # (B, E)
        if self.attention is None:  # Show and Tell: the image only enters through the initial state
            B, L = emb.size(0), memory.features.size(1)
            new_state = self._run_cells(emb, state)
            h = new_state.h[-1]
            pre = torch.tanh(emb + self.out_h(self.dropout(h))) if self.deep_output else h
            uniform = memory.features.new_full((B, L), 1.0 / L)  # (B, L)
            return pre, uniform, new_state, None, None
        if self.query != "previous":
            g = rows_per_image(emb.size(0), memory.pooled.size(0))  # g rows per image in beam search
            mean = memory.pooled.repeat_interleave(g, dim=0) if g > 1 else memory.pooled  # (B, C)
        if self.query == "current":  # Lu et al. 2017: the cell runs first, h_t decides where to look
            new_state = self._run_cells(torch.cat([emb, mean], dim=-1), state)  # input (B, E + C)
            h_top = new_state.h[-1]  # (B, H) h_t drives the attention
        elif self.query == "topdown":  # Anderson et al. 2018: the attention cell's h^1_t decides where to look
            lower = step_cells(self.cells[:1], torch.cat([emb, mean, state.h[-1]], dim=-1), state.layers(0, 1), self.dropout)
            h_top = lower.h[0]  # (B, H) h^1_t, from input (B, E + C + H)
        else:
            h_top = state.h[-1]  # (B, H) h_{t-1} of the top layer drives the attention
        att: AttentionOutput = self.attention(memory.features, memory.projected, h_top, mode=attend or "sample")
        z = att.context  # (B, D)
        beta = None
        if self.f_beta is not None:
            beta = torch.sigmoid(self.f_beta(h_top))  # (B, 1)
            z = beta * z
        if self.query == "previous":
            new_state = self._run_cells(torch.cat([emb, z], dim=-1), state)  # input (B, E + D)
        elif self.query == "topdown":  # the language cell(s) read [z_t; h^1_t]
            upper = step_cells(self.cells[1:], torch.cat([z, h_top], dim=-1), state.layers(1, self.num_layers), self.dropout)
            new_state = State(torch.cat([lower.h, upper.h]), torch.cat([lower.c, upper.c]) if state.c.numel() else state.c)
        h = new_state.h[-1]
        pre = torch.tanh(emb + self.out_h(self.dropout(h)) + self.out_z(z)) if self.deep_output else h  # (B, E)
        return pre, att.alpha, new_state, att, beta

    def _run_cells(self, x: Tensor, state: State) -> State:
        """One step of the stacked cells on input x (B, in); dropout between layers."""
        return step_cells(self.cells, x, state, self.dropout)

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor | None = None, attend: str | None = None,
                image_of: Tensor | None = None) -> DecoderOutput:
        """Teacher forcing: captions (B, T) starting with <start>; predicts positions 1..T-1.

        With ``lengths`` (B,) (tokens including <start> and <end>), rows are processed longest first
        and a row stops being computed once its caption has ended, so padding costs nothing and cannot
        affect any output. Outputs at padded positions are zero. With ``image_of`` (B,), ``features``
        holds one row per image and caption b belongs to image ``image_of[b]``: the attention projection
        is then computed once per image, not once per caption.
        """
        B, T = captions.shape
        if lengths is None:
            lengths = captions.ne(0).sum(1)  # (B,) <pad> is id 0 and only ever trails
        lengths, order = lengths.to(captions.device).sort(descending=True)
        captions = captions.index_select(0, order)
        memory = self.init_memory(features)  # per image (or per caption when image_of is None)
        memory = memory.index_select(order if image_of is None else image_of.index_select(0, order))  # (B, L, .) sorted
        state = self.init_state(memory)
        steps = int(lengths[0].item()) - 1
        active = [int((lengths > t + 1).sum().item()) for t in range(steps)]  # rows still predicting at step t
        L = features.size(1)
        hard = self.attention_type == "hard"
        pres, alphas, lps, ents, locs = [], [], [], [], []  # per step, the rows still active
        for t in range(steps):
            b = active[t]
            if b < state.h.size(1):  # finished rows drop out; rows are sorted so they are the last ones
                state = State(state.h[:, :b], state.c[:, :b] if state.c.numel() else state.c)
                memory = memory.rows(b)
            pre, alpha, state, att, _ = self._advance(captions[:b, t], state, memory, attend)
            pres.append(pre)
            alphas.append(alpha)
            if hard:
                lps.append(att.log_prob)
                ents.append(att.entropy)
                locs.append(att.location)
        if steps == 0:  # every caption is just <start>: nothing to predict
            empty = features.new_zeros(B, T - 1)
            return DecoderOutput(features.new_zeros(B, T - 1, self.vocab_size), features.new_zeros(B, T - 1, L),
                                 empty if hard else None, empty if hard else None, empty.long() if hard else None)
        # One vocabulary projection for every real token, then each token goes to its (caption, step) slot
        # of the padded outputs, in the callers' caption order (no per-step copies into big tensors).
        log_probs = F.log_softmax(full_precision(self.out(self.dropout(torch.cat(pres)))), dim=-1)  # (N, V), N real tokens
        slot = torch.cat([order[:b] * (T - 1) + t for t, b in enumerate(active)])  # (N,) flat (row, step) index

        def padded(x: Tensor) -> Tensor:  # (N, ...) -> (B, T-1, ...), zeros at padding
            return x.new_zeros(B * (T - 1), *x.shape[1:]).index_copy(0, slot, x).view(B, T - 1, *x.shape[1:])

        return DecoderOutput(
            padded(log_probs), padded(torch.cat(alphas)),
            padded(torch.cat(lps)) if hard else None, padded(torch.cat(ents)) if hard else None,
            padded(torch.cat(locs)) if hard else None,
        )
