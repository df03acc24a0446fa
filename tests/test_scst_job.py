"""Self-critical training as a job: from a weak cross-entropy checkpoint it raises dev CIDEr-D; one command runs
both stages; the SCST stage logs its terms, keeps its own checkpoints and resumes exactly."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import compose_train

SMALL = ["model.embed_dim=64", "model.hidden_dim=64", "model.attn_dim=32", "encoder.channels=32", "data.batch_size=16",
         "data.eval_batch_size=50", "progress=false", "device=cpu", "decode=greedy", "val_metric=CIDEr-D", "test=false"]


@pytest.fixture(scope="module")
def shapes_1500(tmp_path_factory):
    from captioner.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes1500")
    generate_shapes(root, n_train=1500, n_val=200, n_test=20, image_size=64, seed=0)
    return root


def _epochs(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_scst_from_a_weak_cross_entropy_checkpoint_raises_dev_cider(shapes_1500, tmp_path):
    from captioner.training.loop import train

    # Both stages validate what SCST optimises: the CIDEr-D of captions sampled from the policy (T 1, no
    # nucleus), on 200 dev images. Greedy dev CIDEr-D is not a stable target at this size: from this
    # 3-epoch checkpoint it moved by x0.79 to x1.15 over seeds (2026-12-04), while sampled CIDEr-D rose in every run.
    base = ["experiment=shapes_soft", f"data.root={shapes_1500}", "data.generate=false", *SMALL,
            "decode=sample", "decode.top_p=1.0"]
    train(compose_train(base + [f"output_dir={tmp_path / 'ce'}", "epochs=3"]))
    ce_best = max(e["val"]["CIDEr-D"] for e in _epochs(tmp_path / "ce"))
    train(compose_train(base + [f"output_dir={tmp_path / 'scst'}", "epochs=0", f"init_from={tmp_path / 'ce' / 'best.pt'}",
                                "scst.epochs=2", "scst.baseline=mean", "scst.lr=2e-4", "scst.max_len=20",
                                "scst.batch_size=16", "log_every=20"]))
    scst = _epochs(tmp_path / "scst")
    assert [e["stage"] for e in scst] == ["scst", "scst"]
    # measured (seeds 0, 1, 2 with 2 threads, seed 0 with 1): x1.52, x1.13, x1.41, x1.39 over the best cross-entropy epoch
    assert max(e["val"]["CIDEr-D"] for e in scst) > 1.05 * ce_best, (ce_best, [e["val"]["CIDEr-D"] for e in scst])
    finished = [e["train"]["finished"] for e in scst]
    assert min(finished) > 0.85, finished  # measured 0.90-0.95 with <cut> in the reward, 0.79-0.86 without
    assert (tmp_path / "scst" / "scst_best.pt").is_file() and not (tmp_path / "scst" / "best.pt").exists()
    logged = [json.loads(line) for line in (tmp_path / "scst" / "train_log.jsonl").read_text().splitlines()]
    assert logged and {"scst/reward", "scst/baseline", "scst/length", "scst/entropy", "scst/lr"} <= set(logged[0])


def test_one_command_runs_both_stages_and_tests_both_checkpoints(tiny_cfg, tmp_path):
    from captioner.training.loop import train

    from captioner.data.build import load_records, references
    from captioner.evaluation import read_results
    from captioner.metrics import evaluate

    cfg = tiny_cfg("scst.epochs=1", "scst.samples=2", "scst.baseline=mean", "scst.max_len=6", "decode=greedy",
                   "test_block_bad_endings=true", "decode.max_len=6", "test_beam_sizes=[2]")
    results = train(cfg)
    run = tmp_path / "run"
    assert [e.get("stage", "xe") for e in _epochs(run)] == ["xe", "scst"]
    for name in ("best.pt", "last.pt", "scst_best.pt", "scst_last.pt", "test_captions.json", "test_captions_xe.json",
                 "test_captions_beam2.json", "test_captions_xe_beam2.json"):
        assert (run / name).is_file(), name
    assert {"CIDEr-D", "xe/CIDEr-D", "bad_endings", "blocked/bad_endings", "distinct_captions"} <= results.keys()
    assert results["blocked/bad_endings"] == 0.0
    # each file holds the captions its figures were computed from (what compare= reads)
    refs = references(load_records(cfg.data)["test"])
    for name, key in (("test_captions.json", "CIDEr-D"), ("test_captions_beam2.json", "beam2/CIDEr-D"),
                      ("test_captions_xe_beam2.json", "xe/beam2/CIDEr-D")):
        assert evaluate(refs, read_results(run / name))["CIDEr-D"] == pytest.approx(results[key], rel=1e-12), name


def test_init_from_or_resume_of_a_checkpoint_fed_or_wired_otherwise_is_refused(tiny_cfg, tmp_path):
    from captioner.models.checkpoint import CheckpointError
    from captioner.training.loop import train

    train(tiny_cfg("test=false"))  # 64 px, model.query=previous
    run, other = tmp_path / "run", f"output_dir={tmp_path / 'other'}"
    init = ["epochs=0", "scst.epochs=1", f"init_from={run / 'best.pt'}", other]
    with pytest.raises(CheckpointError, match=r"best\.pt: init_from was trained on 64 px.*data\.image_size=48.*data\.image_size=64"):
        train(tiny_cfg(*init, "data.image_size=48"))
    with pytest.raises(CheckpointError, match=r"best\.pt: init_from was trained with model\.query=previous"):
        train(tiny_cfg(*init, "model.query=current"))
    with pytest.raises(CheckpointError, match=r"best\.pt: init_from was trained with model\.query=previous, this job has model\.query=topdown"):
        train(tiny_cfg(*init, "model.query=topdown", "model.num_layers=2"))  # refused by name, before any shape error
    with pytest.raises(CheckpointError, match=r"last\.pt: the run to resume was trained on 64 px.*data\.image_size=64 to resume it"):
        train(tiny_cfg("test=false", "epochs=2", "resume=auto", "data.image_size=48"))
    with pytest.raises(CheckpointError, match=r"last\.pt: the run to resume was trained with model\.query=previous.*"
                                              r"model\.query=current.*add model\.query=previous"):
        train(tiny_cfg("test=false", "epochs=2", "resume=auto", "model.query=current"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the refused resumes trained nothing


def test_scst_stage_interrupted_mid_epoch_resumes_exactly(tiny_cfg, tmp_path, monkeypatch):
    import captioner.training.loop as loop
    from captioner.models.checkpoint import load_checkpoint
    from captioner.training.state import TrainingInterrupted

    common = ("epochs=1", "scst.epochs=2", "scst.samples=2", "scst.baseline=mean", "scst.max_len=5", "test=false",
              "data.limit_val=0", "decode=greedy")
    straight = tiny_cfg(*common)
    straight.output_dir = str(tmp_path / "straight")
    loop.train(straight)

    cfg = tiny_cfg(*common)
    cfg.output_dir = str(tmp_path / "killed")
    real = loop.train_one_epoch

    def step_then_signal(*args, **kwargs):
        hook = kwargs.get("on_step")

        def on_step(p):
            if hook:
                hook(p)
            if p.stage == "scst" and p.epoch == 2 and p.batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        kwargs["on_step"] = on_step
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", step_then_signal)
    with pytest.raises(TrainingInterrupted, match="signal 15 at epoch 2, batch 2"):
        loop.train(cfg)
    assert load_checkpoint(tmp_path / "killed" / "scst_last.pt")["progress"]["stage"] == "scst"
    monkeypatch.setattr(loop, "train_one_epoch", real)
    cfg.resume = "auto"
    torch.manual_seed(123)
    loop.train(cfg)
    a = load_checkpoint(tmp_path / "straight" / "scst_last.pt")["model"]
    b = load_checkpoint(tmp_path / "killed" / "scst_last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("extra, expected", [([], 3e-4), (["scst.encoder_lr=1e-5"], 1e-5)])
def test_scst_stage_sets_a_fine_tuned_encoders_learning_rate(tiny_cfg, extra, expected):
    """A fine-tuned encoder (shapes_soft trains its CNN at optim.encoder_lr 2e-3) learns at scst.lr in the SCST
    stage unless scst.encoder_lr says otherwise; it does not keep the cross-entropy stage's rate."""
    from captioner.training.loop import configure_scst, setup

    job = setup(tiny_cfg("scst.epochs=1", "scst.lr=3e-4", "scst.baseline=mean", "scst.samples=2", *extra))
    enc = {id(p) for p in job.model.encoder.parameters() if p.requires_grad}
    assert enc, "shapes_soft fine-tunes its encoder"
    assert [g["initial_lr"] for g in job.opt.param_groups] == [pytest.approx(2e-3)] * 2  # cross-entropy: optim.lr, encoder_lr
    configure_scst(job)
    lrs = {("encoder" if all(id(p) in enc for p in g["params"]) else "decoder"): g["initial_lr"] for g in job.opt.param_groups}
    assert lrs == {"decoder": pytest.approx(3e-4), "encoder": pytest.approx(expected)}


def test_flickr8k_scst_recipe_selects_both_stages_on_cider_and_never_stops_the_cosine_early():
    cfg = compose_train(["experiment=flickr8k_scst", "data.root=/nonexistent", "output_dir=/tmp/x"])
    assert (cfg.val_metric, cfg.scst.val_metric) == ("CIDEr-D", "CIDEr-D")
    assert cfg.patience == cfg.epochs == 10  # patience follows the stage's length ...
    assert cfg.scst.patience == cfg.scst.epochs == 12  # ... in both stages: only the budget ends them
    assert compose_train(["experiment=flickr8k_scst", "epochs=14", "output_dir=/tmp/x"]).patience == 14  # ... when changed
    assert compose_train(["experiment=flickr8k_soft", "output_dir=/tmp/x"]).val_metric == "BLEU-4"  # the parent keeps its own
    assert cfg.data.hflip  # mirrored training photos (runs 35, 36, 38)
    assert cfg.loss.label_smoothing == pytest.approx(0.1)  # kept: without it SCST ended 0.028 lower (run 39)
    assert (cfg.scst.temperature, cfg.scst.baseline, cfg.scst.samples, cfg.encoder.name) == (0.5, "mean", 5, "efficientnet_lite0")
    assert cfg.data.image_size == 288 and cfg.data.features.endswith("flickr8k_efficientnet_lite0_last_288px")  # 9x9 grid
    assert compose_train(["experiment=flickr8k_soft", "output_dir=/tmp/x"]).data.features.endswith("_last")  # its own cache
    assert cfg.precision == "native"  # bf16 only on a CPU that multiplies bf16 natively (emulated, it is 20-25x slower)
