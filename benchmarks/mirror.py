"""How different an input the mirrored photo is, as the decoder sees it (why data.hflip caches its features).

Every decoder here treats the L grid locations as a set, so mirroring a cached (g x g) grid gives the same
input back; what ``data.hflip`` adds with a feature cache is the difference between the features of the
mirrored photo and the mirrored grid of the photo's features (a frozen CNN is mirror-equivariant only
approximately: its filters are not symmetric). This measures it on real photos: the cosine similarity
between mirror(features(photo)) and features(mirror(photo)) per location and for the mean-pooled vector,
next to two references: the unmirrored grid against the features of the mirrored photo, and
neighbouring locations of one grid (how alike nearby cells are anyway).

    python benchmarks/mirror.py --photos ../shared/datasets/flickr8k/Flicker8k_Dataset [--n 16] [--image-size 288]
        [--encoder efficientnet_lite0] [--stage last]

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", required=True, help="a folder of photos (the first --n in name order are used)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=288)
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--stage", default="last")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from captioner.data.images import load_image, to_tensor
    from captioner.models.encoder import Encoder

    paths = sorted(p for p in Path(args.photos).glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.n]
    if not paths:
        sys.exit(f"error: {args.photos}: no .jpg/.jpeg/.png photos")
    torch.set_num_threads(args.threads)
    enc = Encoder(args.encoder, weights=args.weights, stage=args.stage)
    x = torch.stack([to_tensor(load_image(p), args.image_size, enc.mean, enc.std) for p in paths])  # (N, 3, S, S)
    with torch.no_grad():
        feats, feats_of_mirror = enc(x).double(), enc(x.flip(-1)).double()  # (N, L, D)
    N, L, D = feats.shape
    g = int(L**0.5)
    grid = feats.view(N, g, g, D)
    mirrored = grid.flip(2).reshape(N, L, D)  # the grid mirrored: to every decoder here, the same set of locations
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=-1).mean())  # noqa: E731
    out = {
        "photos": N, "grid": f"{g}x{g}", "dim": D,
        "cos_mirrored_grid": cos(mirrored, feats_of_mirror),
        "cos_mirrored_grid_pooled": cos(mirrored.mean(1), feats_of_mirror.mean(1)),
        "cos_unmirrored_grid": cos(feats, feats_of_mirror),
        "cos_neighbouring_cells": cos(grid[:, :, 1:], grid[:, :, :-1]),
        "relative_l2_error": float((mirrored - feats_of_mirror).norm() / feats_of_mirror.norm()),
    }
    print(f"{N} photos, {args.encoder} {args.stage} at {args.image_size} px ({g}x{g}x{D}):")
    print(f"  cosine, mirrored grid vs features of the mirrored photo: {out['cos_mirrored_grid']:.3f} per location, "
          f"{out['cos_mirrored_grid_pooled']:.3f} pooled (relative L2 error {out['relative_l2_error']:.2f})")
    print(f"  cosine, unmirrored grid vs the same: {out['cos_unmirrored_grid']:.3f}; neighbouring cells of one grid: "
          f"{out['cos_neighbouring_cells']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
