"""Character-level language model on caption text, truncated BPTT: ``python scripts/char_lm.py [overrides]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.cli import char_lm_main  # noqa: E402

if __name__ == "__main__":
    char_lm_main()
