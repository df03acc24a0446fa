"""Encode a dataset once with a frozen encoder into a feature cache: ``python scripts/prepare_data.py data=flickr8k cache_dir=DIR``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.cli import prepare_main  # noqa: E402

if __name__ == "__main__":
    prepare_main()
