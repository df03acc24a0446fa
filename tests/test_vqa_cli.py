"""``captioner-ask``: the answer and its top 3, unknown words named, bad images and checkpoints in one line, the glimpse figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.cli.ask import main
from captioner.config import EncoderConfig
from captioner.config import VQAModelConfig
from captioner.data.vocab import Vocabulary
from captioner.data.vqa import answer_vocab
from captioner.models.checkpoint import save_checkpoint
from captioner.models.vqa import build_vqa_model

REPO = Path(__file__).resolve().parent.parent
WORDS = "what colour shape size is the circle square red object".split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny two-glimpse checkpoint whose answer is 'red' with probability about 0.95, 'blue' next."""
    torch.manual_seed(0)
    answers = answer_vocab()
    model = build_vqa_model(EncoderConfig(name="shapes_cnn", channels=16, freeze=False),
                            VQAModelConfig(embed_dim=8, hidden_dim=16, attn_dim=8, mlp_dim=16), len(WORDS) + 4, answers.words, 64)
    with torch.no_grad():
        model.mlp[-1].weight.zero_()
        model.mlp[-1].bias.zero_()
        model.mlp[-1].bias[answers.index["red"]] = 8.0
        model.mlp[-1].bias[answers.index["blue"]] = 5.0
    path = tmp_path_factory.mktemp("vqa") / "vqa.pt"
    save_checkpoint(path, model, Vocabulary.build([WORDS]))
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    Image.new("RGB", (80, 60), (120, 120, 120)).save(path)  # not 64x64: resized as in training
    return path


def test_prints_the_answer_and_the_top_three(ckpt, image, capsys):
    assert main(["--checkpoint", str(ckpt), str(image), "What colour is the circle?"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "red" and len(lines) == 4 and err == ""
    words = [ln.split()[1] for ln in lines[1:]]
    probs = [float(ln.split()[2]) for ln in lines[1:]]
    assert words[:2] == ["red", "blue"] and probs == sorted(probs, reverse=True)
    # the probabilities are the softmax over the 18 real answers: e^8 / (e^8 + e^5 + 16)
    expected = torch.tensor(8.0).exp() / (torch.tensor(8.0).exp() + torch.tensor(5.0).exp() + 16)
    assert probs[0] == pytest.approx(float(expected), abs=5e-4)  # printed with 3 decimals


def test_unknown_words_are_named_and_read_as_unk(ckpt, image, capsys):
    assert main(["-c", str(ckpt), str(image), "what color is the blob?"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "red"
    assert "'color', 'blob'" in err and "<unk>" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"GIF89a not really", "not an image|truncated|corrupt")])
def test_bad_image_is_one_error_line(ckpt, tmp_path, capsys, content, reason):
    bad = tmp_path / "bad.gif"
    bad.write_bytes(content)
    assert main(["-c", str(ckpt), str(bad), "what colour is the circle?"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {bad}: ")
    import re

    assert re.search(reason, err)
    assert main(["-c", str(ckpt), str(tmp_path / "missing.png"), "what?"]) == 1
    assert "file not found" in capsys.readouterr().err


def test_bad_checkpoint_and_empty_question(ckpt, image, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["-c", str(junk), str(image), "what colour is the circle?"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {junk}: ")
    assert main(["-c", str(ckpt), str(image), " ? "]) == 2
    assert "has no words" in capsys.readouterr().err


def test_attention_figure_has_one_panel_per_glimpse(ckpt, image, tmp_path, capsys):
    out_png = tmp_path / "att" / "q.png"
    assert main(["-c", str(ckpt), str(image), "what colour is the circle?", "--attention", str(out_png)]) == 0
    with Image.open(out_png) as fig:
        w, h = fig.size
    assert w > 2.5 * h  # the image and two glimpse panels side by side
    assert str(out_png) in capsys.readouterr().err


@pytest.mark.slow
def test_script_runs_from_a_checkout(ckpt, image):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "ask.py"), "--checkpoint", str(ckpt), str(image),
                        "what shape is the red object?"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "red"
