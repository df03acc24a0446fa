"""The training job's logging: per-interval scalars, per-epoch metrics and example images, read back with
tensorboard's own event reader; JSON lines whatever the logger."""

from __future__ import annotations

import json
import os

import pytest

HAVE_TB = True
try:
    import tensorboard  # noqa: F401
except ImportError:
    HAVE_TB = False

needs_tb = pytest.mark.skipif(not HAVE_TB and os.environ.get("CI") != "true",
                              reason="tensorboard is not installed (pip install tensorboard, or the captioner[tensorboard] extra)")


@needs_tb
def test_a_tiny_run_logs_scalars_per_interval_metrics_per_epoch_and_val_images(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from captioner.training.loop import train

    cfg = tiny_cfg("logger=tensorboard", "epochs=2", "log_every=2", "val_examples=2", "test=false", "decode=greedy")
    train(cfg)
    run = tmp_path / "run"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    steps_per_epoch = 6  # 48 images / batch 8
    loss_steps = [e.step for e in acc.Scalars("train/loss")]
    assert loss_steps == list(range(2, 2 * steps_per_epoch + 1, 2))  # every log_every steps, global step numbers
    assert {"train/lr", "train/grad_norm", "train/nll", "train/doubly_stochastic"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("val/BLEU-4")] == [steps_per_epoch, 2 * steps_per_epoch]  # once per epoch
    assert {"val_images/0", "val_images/1"} <= set(tags["images"])
    assert [e.step for e in acc.Images("val_images/0")] == [steps_per_epoch, 2 * steps_per_epoch]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert acc.Scalars("val/BLEU-4")[-1].value == pytest.approx(epochs[-1]["val"]["BLEU-4"], rel=1e-6)
    interval = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in interval if "train/loss" in r] == loss_steps


def test_default_logger_writes_json_lines_only(tiny_cfg, tmp_path):
    from captioner.training.loop import train

    train(tiny_cfg("log_every=3", "test=false", "decode=greedy"))
    run = tmp_path / "run"
    assert not list(run.glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6] and all("train/loss" in r for r in lines)
