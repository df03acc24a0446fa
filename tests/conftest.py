"""Shared fixtures: the real Hydra config composed with small overrides, and a tiny shapes world."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread: the test models are tiny, and several OpenMP threads per process thrash badly
# when tests and their subprocesses share two cores (a 10x slowdown was measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_MODEL = [
    "model.embed_dim=32", "model.hidden_dim=32", "model.attn_dim=16", "encoder.channels=16",
    "data.batch_size=8", "data.eval_batch_size=16", "progress=false", "device=cpu",
]


def compose_train(overrides: list[str]):
    """Compose conf/train.yaml with overrides, as the training script does, and convert to dataclasses."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from captioner.cli import config_dir
    from captioner.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=False)
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A 48/8/8-image shapes world, generated once per test session."""
    from captioner.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=48, n_val=8, n_test=8, image_size=64, seed=0)
    return root


@pytest.fixture
def tiny_cfg(tiny_shapes, tmp_path):
    """Factory: the real training config on the tiny shapes world with a tiny model."""

    def make(*extra: str):
        return compose_train(
            ["experiment=shapes_soft", f"data.root={tiny_shapes}", "data.generate=false", f"output_dir={tmp_path / 'run'}",
             "epochs=1", *TINY_MODEL, *extra]
        )

    return make


CLI_WORDS = ["a", "red", "blue", "circle", "square", "and", "large", "small"]


def tiny_captioner(attention: str = "soft", seed: int = 0):
    """A random 32 px captioner (16-wide decoder) over CLI_WORDS that talks: (model in eval mode, vocabulary)."""
    from captioner.config import EncoderConfig, ModelConfig
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import build_model

    torch.manual_seed(seed)
    vocab = Vocabulary.build([CLI_WORDS])
    model = build_model(EncoderConfig(name="shapes_cnn", channels=16, blocks=2),
                        ModelConfig(embed_dim=16, hidden_dim=16, attn_dim=8, attention=attention), len(vocab), image_size=32)
    with torch.no_grad():  # a random model says <end> first; make it talk so captions are not empty
        model.decoder.out.bias[vocab.end_id] -= 1.5
        model.decoder.out.bias[4:] += torch.linspace(0, 1, len(vocab) - 4)
    return model.eval(), vocab
