"""Train a captioner: ``python scripts/train.py experiment=shapes_soft [overrides]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
