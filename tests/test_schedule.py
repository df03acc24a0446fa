"""The per-step LR schedule and ``optim.fit_to_budget`` (the cosine ended where the time budget ends the stage)."""

import io
import math

import pytest
import torch

from conftest import compose_train
from captioner.config import ConfigError, OptimConfig
from captioner.models.checkpoint import load_checkpoint
from captioner.training.loop import train
from captioner.training.optim import fit_to_budget, make_scheduler


def schedule(total_epochs=10, steps_per_epoch=10, warmup=0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return opt, make_scheduler(opt, OptimConfig(lr=1.0, scheduler="cosine", warmup_steps=warmup), total_epochs, steps_per_epoch)


def lr_after(opt, sched, steps):
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def cosine(p):
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p))


def test_fitted_cosine_reaches_its_floor_at_the_fitted_step_and_survives_a_checkpoint():
    opt, sched = schedule()  # 100 steps configured
    assert lr_after(opt, sched, 10) == pytest.approx(cosine(0.10), rel=1e-12)
    # an epoch costs 10 steps x 1 s + 5 s of validation; 45 s left: 3 more epochs, 30 steps -> the cosine ends at 40
    assert fit_to_budget(sched, 10, step_seconds=1.0, epoch_overhead=5.0, remaining_seconds=45.0) == 40
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine(0.10), rel=1e-12)  # nothing moves until the next step
    assert lr_after(opt, sched, 1) == pytest.approx(cosine(11 / 40), rel=1e-12)
    assert fit_to_budget(sched, 10, 1.0, 5.0, 1.0) is None and sched.total == 40  # fitted once

    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2, resumed = schedule()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert (resumed.total, resumed.fitted, resumed.last_epoch) == (40, True, 11)
    assert lr_after(opt2, resumed, 1) == pytest.approx(cosine(12 / 40), rel=1e-12)  # the fitted horizon, not 100
    assert lr_after(opt2, resumed, 28) == pytest.approx(0.02, rel=1e-12)  # step 40: the floor
    assert lr_after(opt2, resumed, 5) == pytest.approx(0.02, rel=1e-12)  # and it stays there


def test_a_budget_that_fits_the_configured_epochs_changes_nothing():
    opt, sched = schedule()
    lr_after(opt, sched, 10)
    assert fit_to_budget(sched, 10, 1.0, 0.0, 1e6) is None and sched.total == 100
    assert lr_after(opt, sched, 40) == pytest.approx(cosine(0.5), rel=1e-12)


def test_fit_to_budget_needs_the_cosine_schedule_and_a_budget(tiny_cfg):
    with pytest.raises(ConfigError, match="fit_to_budget.*'step'"):
        OptimConfig(scheduler="step", fit_to_budget=True)
    with pytest.raises(ConfigError, match="max_minutes is not set"):
        train(tiny_cfg("optim.fit_to_budget=true", "max_minutes=null", "test=false"))


def test_training_job_fits_its_schedule_to_max_minutes(tiny_cfg, tmp_path, caplog):
    """500 epochs cannot fit in 6 s: after epoch 1 the cosine is refitted to the budget, used and kept in last.pt."""
    cfg = tiny_cfg("epochs=500", "max_minutes=0.1", "patience=1000", "optim.fit_to_budget=true",
                   "optim.warmup_steps=0", "test=false")
    with caplog.at_level("INFO", logger="captioner.training.loop"):
        train(cfg)
    fitted = [r.args for r in caplog.records if "fit_to_budget" in r.getMessage()]
    assert len(fitted) == 1  # once, after the first epoch
    total, _, configured, _ = fitted[0]
    sched = load_checkpoint(tmp_path / "run" / "last.pt")["scheduler"]
    assert sched["fitted"] is True and sched["total"] == total < configured
    assert sched["last_epoch"] < configured  # the budget ended the run long before 500 epochs
    # the learning rate the run ended on is the fitted cosine's at that step
    assert sched["_last_lr"][0] == pytest.approx(cfg.optim.lr * cosine(min(1.0, sched["last_epoch"] / total)), rel=1e-9)


SCST = ("scst.samples=2", "scst.baseline=mean", "scst.max_len=5", "decode=greedy", "test=false", "scst.warmup_steps=0")


def test_scst_stage_decays_its_own_cosine_to_the_floor(tiny_cfg, tmp_path):
    """scst.scheduler=cosine: the SCST stage's rate falls from scst.lr to 2% of it over scst.epochs (not the cross-entropy schedule)."""
    train(tiny_cfg("epochs=1", "scst.epochs=2", "scst.lr=1e-3", "scst.scheduler=cosine", "patience=100", *SCST))
    sched = load_checkpoint(tmp_path / "run" / "scst_last.pt")["scheduler"]
    assert sched["total"] == sched["last_epoch"] > 0  # two full SCST epochs, the horizon they span
    assert sched["_last_lr"][0] == pytest.approx(1e-3 * 0.02, rel=1e-9)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["scheduler"]["total"] != sched["total"]  # its own schedule


def test_scst_stage_fits_its_cosine_to_its_time_budget(tiny_cfg, tmp_path, caplog):
    """scst.fit_to_budget: 500 SCST epochs cannot fit in 6 s; after its first epoch the stage's cosine is refitted."""
    cfg = tiny_cfg("epochs=1", "scst.epochs=500", "scst.max_minutes=0.1", "scst.scheduler=cosine",
                   "scst.fit_to_budget=true", "scst.patience=1000", *SCST)
    with caplog.at_level("INFO", logger="captioner.training.loop"):
        train(cfg)
    fitted = [r.args for r in caplog.records if "fit_to_budget" in r.getMessage()]
    assert len(fitted) == 1 and fitted[0][3] == "scst"
    sched = load_checkpoint(tmp_path / "run" / "scst_last.pt")["scheduler"]
    assert sched["fitted"] is True and sched["total"] == fitted[0][0] < fitted[0][2]


@pytest.mark.parametrize("extra, message", [(["scst.scheduler=linear"], "scst.scheduler"),
                                            (["scst.fit_to_budget=true"], "fit_to_budget needs cosine")])
def test_scst_schedule_options_are_checked(tiny_cfg, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg("scst.epochs=1", *extra)
