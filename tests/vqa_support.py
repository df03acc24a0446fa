"""Shared by the VQA tests: the real config composed with the VQA schemas registered, and a tiny model's overrides."""

from __future__ import annotations

TINY_VQA = [
    "model.embed_dim=16", "model.hidden_dim=32", "model.attn_dim=16", "model.fusion_dim=32", "model.mlp_dim=32",
    "encoder.channels=16", "data.batch_size=8", "data.eval_batch_size=16", "progress=false", "device=cpu",
    "optim.warmup_steps=0",
]


def compose_vqa(overrides: list[str]):
    """Compose conf/train.yaml with ``experiment=shapes_vqa`` and overrides, as the training script does; dataclasses."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from captioner.cli import config_dir
    from captioner.config import register_configs
    from captioner.config import register_configs as register_vqa_configs

    register_configs()
    register_vqa_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=shapes_vqa", *overrides], return_hydra_config=False)
    return OmegaConf.to_object(cfg)
