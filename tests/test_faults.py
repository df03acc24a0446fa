"""Faults: signals, NaN losses and kill -9 during checkpoint writes never lose work."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import captioner.training.losses as losses
import captioner.training.loop as loop
from conftest import TINY_MODEL
from captioner.models.checkpoint import load_checkpoint
from captioner.training.loop import train
from captioner.training.state import TrainingInterrupted

REPO = Path(__file__).resolve().parent.parent


def _params(path):
    return load_checkpoint(path)["model"]


def test_sigterm_mid_epoch_then_resume_is_exact(tiny_cfg, tmp_path, monkeypatch):
    straight = tiny_cfg("epochs=2", "test=false", "data.limit_val=0")
    straight.output_dir = str(tmp_path / "straight")
    train(straight)

    cfg = tiny_cfg("epochs=2", "test=false", "data.limit_val=0")
    cfg.output_dir = str(tmp_path / "killed")
    real_step = loop.train_one_epoch

    def step_then_signal(*args, **kwargs):
        user_hook = kwargs.get("on_step")

        def hook(p):
            if user_hook:
                user_hook(p)
            if p.epoch == 2 and p.batch == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the real handler turns this into a clean stop

        kwargs["on_step"] = hook
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", step_then_signal)
    with pytest.raises(TrainingInterrupted, match=r"signal 15 at epoch 2, batch 3/6.*resume=auto"):
        train(cfg)
    ck = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert ck["progress"]["epoch"] == 2 and ck["progress"]["batch"] == 3
    monkeypatch.setattr(loop, "train_one_epoch", real_step)
    cfg.resume = "auto"
    torch.manual_seed(999)
    train(cfg)
    a, b = _params(tmp_path / "straight" / "last.pt"), _params(tmp_path / "killed" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("epochs=3", "test=false", "data.limit_val=0")
    real_loss = losses.caption_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] == 8:  # epoch 2 (6 batches per epoch), batch 2
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(losses, "caption_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 2, batch 2 \(global step 8\).*last good checkpoint"):
        train(cfg)
    ck = load_checkpoint(Path(cfg.output_dir) / "last.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


WRITER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from captioner.utils import atomic_torch_save
i = 0
while True:
    i += 1
    atomic_torch_save({"format_version": 1, "i": i, "w": torch.full((400_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_kill_9_during_checkpoint_writes_never_corrupts(tmp_path):
    path = tmp_path / "last.pt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    last_seen = 0
    for trial in range(12):
        p = subprocess.Popen([sys.executable, str(script), str(path), str(REPO)], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one complete write in this process
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        obj = torch.load(path, weights_only=True)  # must always be a complete file
        assert obj["w"].shape == (400_000,) and bool((obj["w"] == obj["i"]).all())
        assert obj["i"] >= 1
        last_seen = obj["i"]
    assert last_seen >= 1
    leftovers = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(leftovers) <= 1  # at most the one a killed writer was filling; the next writer removes it


def test_sigterm_from_outside_then_resume(tiny_shapes, tmp_path):
    """The real script, signalled by another process, checkpoints, explains how to resume, and resumes."""
    run = tmp_path / "run"
    args = [sys.executable, str(REPO / "scripts" / "train.py"), "experiment=shapes_soft", f"data.root={tiny_shapes}",
            "data.generate=false", f"hydra.run.dir={run}", "epochs=50", "data.limit_val=0", "test=false", *TINY_MODEL]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err[-2000:]
    assert "interrupted by signal 15" in err and "resume=auto" in err and "Traceback" not in err
    ck = load_checkpoint(run / "last.pt")
    done = ck["progress"]["epoch"] - 1 + ck["progress"]["batch"] / 6
    assert 1 <= done < 50
    r = subprocess.run([*args[:-len(TINY_MODEL)], *TINY_MODEL, "resume=auto", "epochs=3"] if done < 3 else args + ["resume=auto", f"epochs={int(done) + 2}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # no epoch trained twice
