"""Console entry points, all in this package. Each composes its config (Hydra or argparse) and calls one library function.

Hydra commands are here; ``caption.py`` (``captioner-caption``) and ``shapes.py`` (``captioner-shapes``) are
argparse commands beside them. No library module imports this package.

Hydra resolves ``config_path`` relative to the file that declares ``@hydra.main``; an installed console
script does not live next to ``conf/``, so the configuration directory is found explicitly:
``$CAPTIONER_CONFIG_DIR`` if set, else the repository's ``conf/`` (source checkout or editable
install), else the copy installed under ``<prefix>/share/captioner/conf``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("captioner")

# Errors that come from user input (files, configs, checkpoints): reported in one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError, RuntimeError)


def config_dir() -> str:
    """Absolute path of the Hydra configuration directory."""
    env = os.environ.get("CAPTIONER_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    repo_conf = Path(__file__).resolve().parents[2] / "conf"
    if (repo_conf / "train.yaml").is_file():
        return str(repo_conf)
    installed = Path(sys.prefix) / "share" / "captioner" / "conf"  # setup.cfg data_files
    if (installed / "train.yaml").is_file():
        return str(installed)
    raise SystemExit("error: cannot find the captioner configuration directory (conf/); set CAPTIONER_CONFIG_DIR")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from captioner.config import ConfigError
    from captioner.data.images import ImageLoadError
    from captioner.data.sources import DatasetError
    from captioner.models.encoder import WeightsUnavailableError
    from captioner.models.checkpoint import CheckpointError
    from captioner.training.state import TrainingInterrupted

    return (ConfigError, DatasetError, CheckpointError, ImageLoadError, WeightsUnavailableError, FileNotFoundError,
            FloatingPointError, TrainingInterrupted)


def run_hydra(config_name: str, task) -> None:
    """Compose ``conf/<config_name>.yaml`` from the command line and call ``task(dataclasses)``; user errors are one line."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from captioner.config import register_configs

    register_configs()

    @hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        obj = OmegaConf.to_object(cfg)  # dataclasses from here on; the models never see a DictConfig
        try:
            task(obj)
        except _user_error_types() as e:
            log.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    _main()


def train_main() -> None:
    """``captioner-train`` / ``python scripts/train.py``: train, then print the test metrics as one JSON line."""

    def task(cfg) -> None:
        from captioner.distributed import shutdown
        from captioner.training.tasks import run

        try:
            results = run(cfg)
        except BaseException:
            shutdown(synchronise=False)
            raise
        shutdown()
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(results), flush=True)

    run_hydra("train", task)


def evaluate_main() -> None:
    """``captioner-evaluate`` / ``python scripts/evaluate.py``: print a metrics table and its JSON."""

    def task(cfg) -> None:
        from captioner.evaluation import COMPARE, evaluate_job, format_comparison, format_table

        metrics = evaluate_job(cfg)
        print(format_table(metrics))
        if any(k.startswith(COMPARE) for k in metrics):
            print(f"against {cfg.compare}:\n{format_comparison(metrics)}")
        print(json.dumps(metrics), flush=True)

    run_hydra("evaluate", task)


def char_lm_main() -> None:
    """``python scripts/char_lm.py``: train the character model, then print perplexities and a sample as one JSON line."""

    def task(cfg) -> None:
        from captioner.analysis.char_lm import train_char_lm

        results = train_char_lm(cfg)
        print(json.dumps(results), flush=True)

    from captioner.analysis.char_lm import register_char_lm_config

    register_char_lm_config()  # char_lm_schema lives with the study, not in captioner.config
    run_hydra("char_lm", task)


def prepare_main() -> None:
    """``captioner-prepare`` / ``python scripts/prepare_data.py``: build a feature cache, print its summary as JSON."""
    from captioner.prepare import register_prepare_config

    def task(cfg) -> None:
        from captioner.prepare import prepare

        print(json.dumps(prepare(cfg)), flush=True)

    register_prepare_config()
    run_hydra("prepare", task)
