"""The VQA training job on the real config (``experiment=shapes_vqa``) shrunk to a tiny world: runs, checkpoints, resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

import captioner.training.loop as loop
from captioner.config import VQADataConfig, VQAModelConfig
from captioner.models.checkpoint import load_checkpoint
from captioner.models.vqa import load_vqa
from captioner.training.state import TrainingInterrupted
from captioner.training.vqa import VQAObjective, train_vqa
from vqa_support import TINY_VQA, compose_vqa

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def vqa_cfg(tiny_shapes, tmp_path):
    """Factory: the real VQA config on the 48/8/8-image shapes world with a tiny model."""

    def make(run: str = "run", *extra: str):
        return compose_vqa([f"data.root={tiny_shapes}", "data.generate=false", f"output_dir={tmp_path / run}",
                            "epochs=2", "max_minutes=null", *TINY_VQA, *extra])

    return make


def test_config_composes_with_the_vqa_schemas(vqa_cfg):
    cfg = vqa_cfg("run", "model.fusion=mul", "model.glimpses=1", "model.cell=gru", "model.num_layers=2")
    assert cfg.task == "vqa" and isinstance(cfg.model, VQAModelConfig) and isinstance(cfg.data, VQADataConfig)
    assert (cfg.model.fusion, cfg.model.glimpses, cfg.model.cell, cfg.model.num_layers) == ("mul", 1, "gru", 2)
    assert cfg.val_metric == "accuracy" and cfg.data.questions.per_image == 4


@pytest.mark.parametrize("override", ["model.fusionn=mul", "model.glimpses=two", "data.questions.per_imag=3", "model=vqaa"])
def test_typos_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_vqa(["output_dir=/tmp/x", override])
    assert override.split("=")[0].split(".")[-1] in str(e.value) or override.split("=")[1] in str(e.value)


def test_objective_is_the_mean_cross_entropy_in_one_process():
    class Fixed(torch.nn.Module):
        def forward(self, images, questions, lengths, image_of):
            from captioner.models.vqa import VQAOutput

            return VQAOutput(torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float64), torch.zeros(2, 1, 4))

    batch = {"images": None, "questions": None, "lengths": None, "image_of": None, "answers": torch.tensor([0, 1])}
    out = VQAObjective()(Fixed(), batch, 1)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    expected = -(logits.log_softmax(-1)[0, 0] + logits.log_softmax(-1)[1, 1]) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=0)
    assert float(out["accuracy"]) == 0.5


@pytest.mark.slow
def test_train_writes_metrics_checkpoints_and_test_figures(vqa_cfg, tmp_path):
    cfg = vqa_cfg()
    results = train_vqa(cfg)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all("accuracy" in r["val"] for r in lines)
    for key in ("accuracy", "accuracy/attribute", "accuracy/exist", "accuracy/relation", "localisation", "majority",
                "majority_per_form/attribute", "train_minutes"):
        assert key in results, key
    assert 0 <= results["accuracy"] <= 1 and results["localisation_chance"] < 0.5
    assert json.loads((run / "test_metrics.json").read_text()) == results
    preds = [json.loads(x) for x in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == results["questions"] and {"text", "answer", "predicted", "object_ids"} <= set(preds[0])
    assert sum(p["predicted"] == p["answer"] for p in preds) / len(preds) == pytest.approx(results["accuracy"], rel=1e-12)
    model, vocab, answers = load_vqa(run / "best.pt")  # the checkpoint alone rebuilds the model
    assert model.glimpses == 2 and "colour" in vocab and answers.words[4] == "red"


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_is_exact(vqa_cfg, tmp_path, monkeypatch):
    """Stopped by a signal in epoch 2 and resumed with resume=auto, the run ends with bit-identical weights."""
    straight = vqa_cfg("straight", "test=false", "optim.ema=0.9")
    train_vqa(straight)
    cfg = vqa_cfg("killed", "test=false", "optim.ema=0.9")
    real = loop.train_one_epoch

    def step_then_signal(*args, **kwargs):
        user_hook = kwargs.get("on_step")

        def hook(p):
            if user_hook:
                user_hook(p)
            if p.epoch == 2 and p.batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        kwargs["on_step"] = hook
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", step_then_signal)
    with pytest.raises(TrainingInterrupted, match=r"signal 15 at epoch 2, batch 2/6.*resume=auto"):
        train_vqa(cfg)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    cfg.resume = "auto"
    torch.manual_seed(123)  # the resumed run must restore the RNG itself
    train_vqa(cfg)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(tmp_path / "killed" / name)
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=f"{name} {k}")
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


@pytest.mark.slow
def test_train_script_prints_the_figures_as_its_last_line(tiny_shapes, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "experiment=shapes_vqa", f"data.root={tiny_shapes}",
                        "data.generate=false", f"hydra.run.dir={tmp_path / 'run'}", "epochs=1", *TINY_VQA],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"accuracy", "accuracy/count", "localisation"} <= set(figures)


def _ddp_worker(rank: int, world: int, port: int, cfg) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from captioner import distributed

    try:
        train_vqa(cfg)
    except BaseException:
        distributed.shutdown(synchronise=False)
        raise
    distributed.shutdown()


# Frozen encoder: BatchNorm statistics of a trained one are per rank. 20 images: one process takes batches of 8, 8, 4;
# each of 2 ranks 4, 4, 2 images, with different numbers of questions (the loss is normalised by the global count).
DDP = ["encoder.freeze=true", "model.dropout=0.0", "data.limit_train=20", "data.limit_val=0", "epochs=1", "optim.grad_clip=0",
       "optim.ema=0"]


@pytest.mark.slow
def test_two_processes_train_and_test_like_one_process(vqa_cfg, tmp_path):
    """torchrun-style data parallelism (gloo): float64 weights equal one process's on the combined batch, and the
    gathered test predictions cover every question once."""
    import socket

    import torch.multiprocessing as mp

    single = vqa_cfg("single", *DDP, "data.batch_size=8")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        one = train_vqa(single)
    finally:
        torch.set_default_dtype(default)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, vqa_cfg("ddp", *DDP, "data.batch_size=4")), nprocs=2, start_method="spawn", join=True)
    a, b = load_checkpoint(tmp_path / "single" / "last.pt"), load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert a["optimizer"]["state"] and a["model"]["values.weight"].dtype == torch.float64
    diffs = {k: float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"] if a["model"][k].is_floating_point()}
    assert max(diffs.values()) < 1e-9 * single.optim.lr * 3, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]  # 3 Adam steps
    two = json.loads((tmp_path / "ddp" / "test_metrics.json").read_text())
    assert two["questions"] == one["questions"] and two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-12)
