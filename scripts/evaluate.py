"""Evaluate a checkpoint or a results file: ``python scripts/evaluate.py checkpoint=PATH [decode=beam] [split=test]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    evaluate_main()
