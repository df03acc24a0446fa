"""Data parallelism with 2 CPU processes (gloo): the same training as one process with the combined batch.

Two comparisons, each exact up to rounding on any CPU:
- every step's averaged gradient (float32, same parameters, lr = 0) against the single process's, relative
  to the gradient's norm: this is what data parallelism is responsible for, and it fails for a sum instead
  of an average, a rank that drops its last (partial) batch, or per-rank token normalisation;
- a whole run of Adam steps in float64, where rounding differences stay ~1e-16 relative instead of
  being amplified to ~lr by Adam's normalisation of near-zero gradient components (as in float32).
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from captioner.models.checkpoint import load_checkpoint
from captioner.training.losses import CaptionObjective
from captioner.training.state import Progress


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def epoch_gradients(cfg) -> list[torch.Tensor]:
    """Flat averaged gradients (float64 copies) of every step of epoch 1, parameters held fixed (lr = 0)."""
    from captioner import distributed
    from captioner.training import loop

    info = distributed.init_distributed("cpu")
    data = loop.build_data(cfg.data)
    torch.manual_seed(cfg.seed)
    model = loop.build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size)
    loader, sampler = loop.make_loader(data, cfg, info)
    sampler.set_epoch(1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    grads: list[torch.Tensor] = []

    def record(progress) -> None:
        grads.append(torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.requires_grad]))

    objective = CaptionObjective(cfg.loss, model.decoder.attention_type)
    loop.train_one_epoch(model, loader, opt, sched, objective, cfg, torch.device("cpu"), Progress(epoch=1), on_step=record, info=info)
    return grads


def _worker(rank: int, world: int, port: int, cfg, task: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from captioner import distributed
    from captioner.data.build import build_data
    from captioner.evaluation import decode_split
    from captioner.training.loop import train

    try:
        if task == "train":
            train(cfg)
        elif task == "train64":
            torch.set_default_dtype(torch.float64)
            train(cfg)
        elif task == "grads":
            torch.save(epoch_gradients(cfg), Path(out, f"grads{rank}.pt"))
        else:  # gathered validation decoding
            info = distributed.init_distributed("cpu")
            data = build_data(cfg.data)
            from captioner.models.captioner import build_model

            torch.manual_seed(0)
            model = build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size)
            caps = decode_split(model, data.stores["val"], data.vocab, cfg.decode, 2, torch.device("cpu"), info=info)
            Path(out, f"rank{rank}.json").write_text(json.dumps([c.text for c in caps]))
    except BaseException:
        distributed.shutdown(synchronise=False)
        raise
    distributed.shutdown()


def _spawn(world, cfg, task, out):
    mp.start_processes(_worker, args=(world, _free_port(), cfg, task, str(out)), nprocs=world, start_method="spawn", join=True)


# Frozen encoder: BatchNorm batch statistics of a trained one are per rank (not synchronised), so not comparable.
# 28 images: one process takes batches of 8, 8, 8, 4; each of 2 ranks 4, 4, 4, 2 (the last step is partial).
DDP = ["encoder.freeze=true", "model.dropout=0.0", "data.limit_train=28", "data.limit_val=0", "test=false", "epochs=1",
       "optim.warmup_steps=0", "optim.lr=1e-3", "optim.grad_clip=0"]


def test_two_ranks_average_gradients_exactly_like_one_process_with_the_combined_batch(tiny_cfg, tmp_path):
    single = epoch_gradients(tiny_cfg(*DDP, "data.batch_size=8"))
    _spawn(2, tiny_cfg(*DDP, "data.batch_size=4"), "grads", tmp_path)
    ranks = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(2)]
    assert len(single) == 4 and [len(g) for g in ranks] == [4, 4]  # every step, the partial last one included
    for step, (g, g0, g1) in enumerate(zip(single, *ranks)):
        assert torch.equal(g0, g1), f"step {step}: the ranks hold different averaged gradients"
        scale = float(g.norm())
        assert scale > 0
        # float32 summation order changes the gradient by ~1e-7 of its norm; a wrong average is off by O(1)
        assert float((g0 - g).norm()) < 1e-5 * scale, (step, float((g0 - g).norm()) / scale)


def test_two_processes_train_like_one_process_in_float64(tiny_cfg, tmp_path):
    overrides = DDP
    single = tiny_cfg(*overrides, "data.batch_size=8")
    single.output_dir = str(tmp_path / "single")
    from captioner.training.loop import train

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        train(single)
    finally:
        torch.set_default_dtype(default)
    double = tiny_cfg(*overrides, "data.batch_size=4")  # 2 ranks x 4 images = the same 8-image steps
    double.output_dir = str(tmp_path / "ddp")
    _spawn(2, double, "train64", tmp_path)
    a_ck, b_ck = load_checkpoint(tmp_path / "single" / "last.pt"), load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert b_ck["epoch"] == 1 and a_ck["optimizer"]["state"]  # training really happened
    a, b = a_ck["model"], b_ck["model"]
    assert a["decoder.embed.weight"].dtype == torch.float64
    lr, steps = 1e-3, 4
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()}
    # Adam moves each parameter by up to lr per step; float64 rounding leaves ~1e-13 of that
    assert max(diffs.values()) < 1e-9 * lr * steps, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def test_gathered_validation_has_each_image_once(tiny_cfg, tmp_path):
    cfg = tiny_cfg("data.limit_val=7", "decode.max_len=5")  # odd count: ranks get 4 and 3 images
    _spawn(2, cfg, "decode", tmp_path)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0) == 7 and r0 == r1  # every rank sees all 7 captions, in dataset order
    from captioner.models.captioner import build_model
    from captioner.data.build import build_data
    from captioner.evaluation import decode_split

    data = build_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.encoder, cfg.model, len(data.vocab), cfg.data.image_size)
    alone = decode_split(model, data.stores["val"], data.vocab, cfg.decode, 2, torch.device("cpu"))
    assert [c.text for c in alone] == r0
