"""Gradient flow through the decoder's recurrent cells: vanishing, exploding, and gradient clipping.

Three measurements, each small enough for a CPU in seconds:

* :func:`measure_gradient_flow`: unroll a cell (vanilla RNN, GRU or LSTM from ``decoder.CELLS``) for T steps on
  random inputs, take a loss at the last step only, and record ||d loss / d h_t|| for every earlier t.
* :func:`spectral_study`: the vanilla RNN with its recurrent matrix set to s times a random orthogonal matrix,
  with inputs so small that tanh stays in its linear range; the gradient then changes by a factor of about s per
  step back, shrinking geometrically for s < 1 and growing for s > 1.
* :func:`clipping_study`: the same toy training run with and without gradient clipping by norm.

Everything runs in double precision: at s = 0.5 the gradient 60 steps back is ~1e-18 of the last one.
``python -m captioner.analysis.gradient_flow docs/gradient_flow.png`` redraws the README figure and prints
the measured numbers as JSON.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.models.decoder import CELLS

CELL_NAMES = ("rnn", "gru", "lstm")


@dataclass
class GradientFlow:
    """Gradient norms of one cell by distance from the last step, and the fitted per-step ratio."""

    cell: str
    norms: list[float]  # index k: ||d loss / d h_{T-1-k}||, k = 0 is the last step (geometric mean over repeats)
    ratio: float  # exp(slope) of a least-squares line through log norms vs distance: the gain per step back
    max_abs_h: float  # largest |h_t| seen: how far the run went from tanh's linear range
    spectral_norm: float | None = None  # vanilla RNN: the recurrent matrix's largest singular value, if set
    forget_bias: float | None = None  # LSTM: the forget-gate bias, if set (PyTorch's default init otherwise)
    per_repeat_ratios: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        """A legend label: the cell and what was changed from its default initialisation."""
        extra = f", s={self.spectral_norm:g}" if self.spectral_norm is not None else ""
        extra += f", forget bias {self.forget_bias:g}" if self.forget_bias is not None else ""
        return f"{self.cell.upper()}{extra} (x{self.ratio:.2f}/step)"


@dataclass
class TrainCurve:
    """Loss and pre-clipping gradient norm per update of one toy training run."""

    max_norm: float | None  # clipping threshold; None: no clipping
    losses: list[float]
    grad_norms: list[float]
    diverged_at: int | None = None  # first update whose loss or gradient was not finite (the run stops there)


# --------------------------------------------------------------------------------------------------
# Building blocks
def build_cell(cell: str, input_dim: int, hidden_dim: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """One of the decoder's cells with PyTorch's default initialisation (as the decoder builds it)."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(CELLS)}")
    return CELLS[cell](input_dim, hidden_dim).to(dtype)


@torch.no_grad()
def set_recurrent_spectral_norm(cell: nn.RNNCell, s: float, generator: torch.Generator | None = None) -> None:
    """Set a vanilla RNN's recurrent matrix to s times a random orthogonal matrix, and zero its biases.

    Orthogonal, not a rescaled random matrix: a generic random matrix's spectral radius is about half its largest
    singular value, so at s = 2 repeated products would barely grow. With Q orthogonal every singular value and
    every eigenvalue's modulus is s, so s is exactly the per-step gain of the linearised recurrence.
    Zero biases keep h near 0, where tanh' = 1.
    """
    if not isinstance(cell, nn.RNNCell):
        raise TypeError("the spectral study is for the vanilla RNN cell")
    H = cell.hidden_size
    w = torch.randn(H, H, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(w)
    q = q * torch.sign(torch.diagonal(r))  # (H, H) Haar-distributed orthogonal
    cell.weight_hh.copy_(s * q.to(cell.weight_hh.dtype))
    cell.bias_ih.zero_()
    cell.bias_hh.zero_()


@torch.no_grad()
def set_forget_bias(cell: nn.LSTMCell, value: float) -> None:
    """Set an LSTM's forget-gate bias (b_ih + b_hh) to ``value``; PyTorch's gate order is i, f, g, o."""
    H = cell.hidden_size
    cell.bias_ih[H : 2 * H].fill_(value)
    cell.bias_hh[H : 2 * H].zero_()


def unroll(cell: nn.Module, inputs: Tensor) -> list[Tensor]:
    """Run a cell over inputs (T, B, D) from a zero state; hidden states h_0..h_{T-1}, each (B, H), retaining grad."""
    T, B, _ = inputs.shape
    h = inputs.new_zeros(B, cell.hidden_size)  # (B, H)
    c = inputs.new_zeros(B, cell.hidden_size)  # (B, H) LSTM memory cell
    hs = []
    for t in range(T):
        if isinstance(cell, nn.LSTMCell):
            h, c = cell(inputs[t], (h, c))
        else:
            h = cell(inputs[t], h)
        h.retain_grad()  # non-leaf: keep d loss / d h_t after backward
        hs.append(h)
    return hs


def fit_ratio(norms: Sequence[float] | Tensor, start: int = 1) -> float:
    """Per-step gain: exp of the least-squares slope of log(norm) against distance, from distance ``start`` on."""
    y = torch.as_tensor(norms, dtype=torch.float64)[start:].log()  # (K,)
    k = torch.arange(start, start + y.numel(), dtype=torch.float64)  # (K,)
    k_c = k - k.mean()
    slope = (k_c * (y - y.mean())).sum() / k_c.pow(2).sum()
    return math.exp(slope.item())


# --------------------------------------------------------------------------------------------------
# Gradient norms by distance
def gradient_norms(
    cell: nn.Module, inputs: Tensor, readout: nn.Linear, targets: Tensor
) -> tuple[Tensor, float]:
    """||d loss / d h_t|| for every t, by distance from the last step, and the largest |h| seen.

    The loss is the cross-entropy of a readout of the last hidden state only, so every gradient at an earlier
    step has travelled back through the recurrence. For the LSTM this is the gradient with respect to h_t (its
    output); the memory cell's path shows up in how h_t's gradient decays.
    """
    hs = unroll(cell, inputs)
    loss = F.cross_entropy(readout(hs[-1]), targets)  # (,) last step only
    loss.backward()
    norms = torch.stack([h.grad.norm() for h in hs]).flip(0)  # (T,) index = distance from the last step
    max_abs_h = max(h.detach().abs().max().item() for h in hs)
    return norms.detach(), max_abs_h


def measure_gradient_flow(
    cell: str = "rnn",
    hidden_dim: int = 64,
    input_dim: int = 16,
    steps: int = 60,
    batch_size: int = 16,
    input_scale: float = 1.0,
    spectral_norm: float | None = None,
    forget_bias: float | None = None,
    num_classes: int = 10,
    repeats: int = 3,
    seed: int = 0,
) -> GradientFlow:
    """Gradient norms of the last step's loss w.r.t. every earlier hidden state, over ``repeats`` weight draws.

    Inputs are N(0, input_scale^2) stand-ins for the decoder's embedding-plus-context input. ``spectral_norm``
    (vanilla RNN only) sets the recurrent matrix with :func:`set_recurrent_spectral_norm`; ``forget_bias``
    (LSTM only) sets the forget-gate bias. Norms are averaged geometrically, so the fitted ratio is the mean
    of the per-repeat ratios in log space.
    """
    if spectral_norm is not None and cell != "rnn":
        raise ValueError("spectral_norm applies to the vanilla RNN cell only")
    if forget_bias is not None and cell != "lstm":
        raise ValueError("forget_bias applies to the LSTM cell only")
    log_norms, ratios, max_h = [], [], 0.0
    for r in range(repeats):
        torch.manual_seed(seed + 1000 * r)  # the cells' default init draws from the global generator
        g = torch.Generator().manual_seed(seed + 1000 * r)
        m = build_cell(cell, input_dim, hidden_dim)
        if spectral_norm is not None:
            set_recurrent_spectral_norm(m, spectral_norm, g)
        if forget_bias is not None:
            set_forget_bias(m, forget_bias)
        readout = nn.Linear(hidden_dim, num_classes).double()
        inputs = torch.randn(steps, batch_size, input_dim, generator=g, dtype=torch.float64) * input_scale  # (T, B, D)
        targets = torch.randint(num_classes, (batch_size,), generator=g)  # (B,)
        norms, mh = gradient_norms(m, inputs, readout, targets)
        log_norms.append(norms.log())
        ratios.append(fit_ratio(norms))
        max_h = max(max_h, mh)
    mean_norms = torch.stack(log_norms).mean(0).exp()  # (T,) geometric mean over repeats
    return GradientFlow(cell, mean_norms.tolist(), fit_ratio(mean_norms), max_h, spectral_norm, forget_bias, ratios)


def compare_cells(cells: Sequence[str] = CELL_NAMES, **kwargs) -> dict[str, GradientFlow]:
    """The same measurement for each cell: same width, same inputs, same readout, same default initialisation."""
    return {c: measure_gradient_flow(c, **kwargs) for c in cells}


def spectral_study(
    scales: Sequence[float] = (0.5, 2.0), steps: int = 60, linear_scale: float = 1e-3, **kwargs
) -> dict[float, GradientFlow]:
    """Vanilla RNN with recurrent largest singular value s, kept in tanh's linear range.

    With gain s > 1 the forward activations also grow like s^t, so the inputs are scaled by
    ``linear_scale / s^steps`` to keep |h| at most about ``linear_scale``; ``max_abs_h`` in the result shows it.
    """
    out = {}
    for s in scales:
        input_scale = linear_scale / max(1.0, s) ** steps
        out[s] = measure_gradient_flow("rnn", steps=steps, input_scale=input_scale, spectral_norm=s, **kwargs)
    return out


# --------------------------------------------------------------------------------------------------
# Gradient clipping
def train_toy_rnn(
    max_norm: float | None,
    updates: int = 150,
    hidden_dim: int = 32,
    seq_len: int = 20,
    batch_size: int = 32,
    lr: float = 0.1,
    spectral_norm: float = 1.5,
    seed: int = 0,
) -> TrainCurve:
    """SGD on a toy memory task (recall the first of ``seq_len`` random inputs) with a large-gain vanilla RNN.

    The recurrent matrix starts at ``spectral_norm`` times an orthogonal matrix, so early gradients are large
    and one unclipped step at this learning rate throws the weights into a region where they are larger still.
    The run stops at the first non-finite loss or gradient norm.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cell = build_cell("rnn", 1, hidden_dim)
    set_recurrent_spectral_norm(cell, spectral_norm, g)
    readout = nn.Linear(hidden_dim, 1).double()
    params = list(cell.parameters()) + list(readout.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    data = torch.Generator().manual_seed(seed + 1)  # the same batches with and without clipping
    losses, grad_norms = [], []
    for i in range(updates):
        x = torch.randn(seq_len, batch_size, 1, generator=data, dtype=torch.float64)  # (T, B, 1)
        h = x.new_zeros(batch_size, hidden_dim)  # (B, H)
        for t in range(seq_len):
            h = cell(x[t], h)
        loss = F.mse_loss(readout(h), x[0])  # (,) recall the first input
        opt.zero_grad()
        loss.backward()
        # clip_grad_norm_ returns the norm before clipping; with inf it measures without clipping.
        norm = nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        losses.append(loss.item())
        grad_norms.append(norm.item())
        if not (math.isfinite(losses[-1]) and math.isfinite(grad_norms[-1])):
            return TrainCurve(max_norm, losses, grad_norms, diverged_at=i)
        opt.step()
    return TrainCurve(max_norm, losses, grad_norms)


def clipping_study(max_norm: float = 1.0, **kwargs) -> dict[str, TrainCurve]:
    """The same run (same init, same batches) with clipping by global norm ``max_norm`` and without."""
    return {"clipped": train_toy_rnn(max_norm, **kwargs), "unclipped": train_toy_rnn(None, **kwargs)}


# --------------------------------------------------------------------------------------------------
# Figures and the command line
def plot_gradient_flow(
    cells: dict[str, GradientFlow], spectral: dict[float, GradientFlow], clipping: dict[str, TrainCurve] | None = None
):
    """Gradient norm vs distance for each cell and each s, and (if given) the clipping loss curves."""
    import matplotlib.pyplot as plt

    n = 3 if clipping else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    ax = axes[0]
    for gf in cells.values():
        norms = torch.tensor(gf.norms)
        ax.semilogy(norms / norms[0], label=gf.label, ls="--" if gf.forget_bias is not None else "-")
    ax.set(title="Same width, inputs and init rule", xlabel="distance from the last step k",
           ylabel="||dL/dh_(T-k)|| / ||dL/dh_T||")
    ax.legend()
    ax = axes[1]
    for gf in spectral.values():
        norms = torch.tensor(gf.norms)
        ax.semilogy(norms / norms[0], label=gf.label)
    ax.set(title="Vanilla RNN, recurrent matrix = s * orthogonal", xlabel="distance from the last step k")
    ax.legend()
    if clipping:
        ax = axes[2]
        for curve in clipping.values():
            label = f"clipped at norm {curve.max_norm:g}" if curve.max_norm else "no clipping"
            if curve.diverged_at is not None:
                label += f" (non-finite at update {curve.diverged_at})"
            else:
                label += f" (last loss {curve.losses[-1]:.2g})"
            ax.semilogy(curve.losses, label=label)
        # The unclipped loss reaches ~1e160; a bounded axis keeps the clipped curve's descent visible.
        ax.set_ylim(1e-2, 1e4)
        ax.set(title="Vanilla RNN, SGD: clipping by norm", xlabel="update", ylabel="training loss (MSE)")
        ax.legend(loc="upper left")
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def run_all(seed: int = 0) -> dict:
    """Every measurement with the defaults the notebook and the README use."""
    cells = compare_cells(seed=seed)
    # The same LSTM with the forget gate opened at init: its cell path then passes ~sigmoid(1) = 0.73 per step.
    cells["lstm_forget_bias_1"] = measure_gradient_flow("lstm", forget_bias=1.0, seed=seed)
    return {
        "cells": cells,
        "spectral": spectral_study(seed=seed),
        "clipping": clipping_study(seed=seed),
    }


def summary(results: dict) -> dict:
    """The headline numbers of :func:`run_all` as a JSON-ready dict."""
    clip = results["clipping"]
    return {
        "ratio_per_step": {c: round(gf.ratio, 4) for c, gf in results["cells"].items()},
        "rnn_spectral_ratio_per_step": {str(s): round(gf.ratio, 4) for s, gf in results["spectral"].items()},
        "rnn_spectral_max_abs_h": {str(s): gf.max_abs_h for s, gf in results["spectral"].items()},
        "clipping": {
            k: {"first_loss": c.losses[0], "last_loss": c.losses[-1], "max_grad_norm": max(c.grad_norms),
                "diverged_at": c.diverged_at}
            for k, c in clip.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m captioner.analysis.gradient_flow [figure.png]``: print the numbers as JSON, save the figure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    results = run_all()
    if argv:
        import matplotlib

        matplotlib.use("Agg")
        fig = plot_gradient_flow(results["cells"], results["spectral"], results["clipping"])
        fig.savefig(argv[0], dpi=110)
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()

