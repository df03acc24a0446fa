import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_train
from captioner.config import ConfigError, DecodeConfig, EncoderConfig, ModelConfig, register_configs
from captioner.data.sources import DatasetError
from captioner.evaluation import evaluate_job as evaluate
from captioner.data.build import build_data

REPO = Path(__file__).resolve().parent.parent


def compose_evaluate(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from captioner.cli import config_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose("evaluate", overrides=overrides))


@pytest.fixture
def tiny_checkpoint(tiny_shapes, tmp_path):
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import build_model
    from captioner.models.checkpoint import save_checkpoint

    cfg = compose_train(["experiment=shapes_soft", f"data.root={tiny_shapes}", "data.generate=false", "output_dir=/tmp/unused"])
    data = build_data(cfg.data)
    model = build_model(EncoderConfig(name="shapes_cnn", channels=16), ModelConfig(embed_dim=16, hidden_dim=16, attn_dim=8), len(data.vocab), 64)
    save_checkpoint(tmp_path / "tiny.pt", model, data.vocab)
    return tmp_path / "tiny.pt"


def test_evaluate_checkpoint_writes_metrics_and_coco_results(tiny_shapes, tiny_checkpoint, tmp_path):
    for decode in ("greedy", "beam", "sample"):
        cfg = compose_evaluate([f"checkpoint={tiny_checkpoint}", f"data.root={tiny_shapes}", "data.generate=false",
                                f"output_dir={tmp_path / decode}", f"decode={decode}", "decode.max_len=8", "progress=false"])
        m = evaluate(cfg)
        assert {"BLEU-4", "CIDEr-D", "ROUGE-L", "attention_localisation"} <= m.keys() and m["images"] == 8
        caps = json.loads((tmp_path / decode / "captions_test.json").read_text())
        assert len(caps) == 8 and set(caps[0]) == {"image_id", "caption"}
        assert json.loads((tmp_path / decode / "metrics.json").read_text())["BLEU-4"] == m["BLEU-4"]


def test_score_a_results_file(tiny_shapes, tmp_path):
    cfg = compose_evaluate([f"data.root={tiny_shapes}", "data.generate=false", f"output_dir={tmp_path}", "split=val"])
    refs = build_data(cfg.data).records["val"]
    perfect = [{"image_id": r.image_id, "caption": r.captions[0]} for r in refs]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    cfg.results = str(tmp_path / "perfect.json")
    m = evaluate(cfg)
    assert m["BLEU-4"] == pytest.approx(1.0) and m["images"] == len(refs)
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": "nope", "caption": "x"}]))
    cfg.results = str(tmp_path / "bad.json")
    with pytest.raises(DatasetError, match="bad.json: 1 image_id"):
        evaluate(cfg)
    cfg.split = "dev"  # Flickr8k's name for it; here, as there, the split is called val
    with pytest.raises(ConfigError, match="split=dev: data=shapes has no images in that split \\(it has: train, val, test\\)"):
        evaluate(cfg)
    cfg.split = "val"
    (tmp_path / "worse.json").write_text("{]")
    cfg.results = str(tmp_path / "worse.json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        evaluate(cfg)


def test_evaluate_script_missing_checkpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), f"checkpoint={tmp_path / 'nope.pt'}",
                        f"hydra.run.dir={tmp_path}", "data.shapes.n_train=4", "data.shapes.n_val=2", "data.shapes.n_test=2",
                        f"data.root={tmp_path / 'shapes'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "nope.pt: checkpoint not found" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_script_unknown_split_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), f"results={tmp_path / 'r.json'}", "split=dev",
                        f"hydra.run.dir={tmp_path}", "data.shapes.n_train=4", "data.shapes.n_val=2", "data.shapes.n_test=2",
                        f"data.root={tmp_path / 'shapes'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "error: split=dev: data=shapes has no images in that split (it has: train, val, test)" in r.stderr
    assert "Traceback" not in r.stderr


def test_evaluate_html_writes_the_split_page_worst_cider_first(tiny_shapes, tiny_checkpoint, tmp_path):
    import re

    cfg = compose_evaluate([f"checkpoint={tiny_checkpoint}", f"data.root={tiny_shapes}", "data.generate=false",
                            f"output_dir={tmp_path / 'eval'}", "decode=greedy", "decode.max_len=6", "progress=false",
                            f"html={tmp_path / 'page'}"])
    m = evaluate(cfg)
    page = (tmp_path / "page" / "index.html").read_text(encoding="utf-8")
    caps = json.loads((tmp_path / "eval" / "captions_test.json").read_text())
    assert all(c["caption"].split()[0] in page for c in caps if c["caption"])  # every caption is on the page
    assert f"{m['CIDEr-D']:.3f}"[:4] in page  # the metrics table
    # per-image CIDEr-D, worst first: the page lists the images in non-decreasing order of their score
    from captioner.metrics import evaluate as coco

    refs = {r.image_id: r.captions for r in build_data(cfg.data).records["test"]}
    per = coco(refs, {c["image_id"]: c["caption"] for c in caps}, per_image=True)["per_image"]
    names = re.findall(r'<h2 class="name">([^<]+)', page)
    shown = [float(x) for x in re.findall(r"CIDEr-D <b>([0-9.]+)", page)]
    assert sorted(names) == sorted(per) and len(shown) == len(names)  # every test image, each with its score
    assert shown == sorted(shown)  # worst first
    assert shown == pytest.approx([round(per[n]["CIDEr-D"], 3) for n in names], abs=1e-3)
