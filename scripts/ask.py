"""Answer a question about an image: ``python scripts/ask.py --checkpoint CKPT IMAGE "what colour is the circle?"``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.cli.ask import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
