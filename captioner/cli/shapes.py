"""The shapes-world generator's command line."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from captioner.data import shapes


def main(argv: Sequence[str] | None = None) -> None:
    """``captioner-shapes ROOT [--n-train N ...]`` (or ``python -m captioner.cli.shapes``): generate the shapes world."""
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes captioning dataset.")
    parser.add_argument("root", type=Path, help="output folder (dataset_shapes.json and images/)")
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=shapes.MAX_OBJECTS)
    parser.add_argument("--noise", type=float, default=6.0, help="std of the gaussian pixel noise, 0-255 units")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    path = shapes.generate_shapes(
        args.root,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        image_size=args.image_size,
        seed=args.seed,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        noise=args.noise,
    )
    print(f"{path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
