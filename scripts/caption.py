"""Caption images: ``python scripts/caption.py IMAGE_OR_DIR_OR_GLOB... --checkpoint CKPT [--beam K] [--json OUT.json] [--html DIR]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.cli.caption import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
