#!/usr/bin/env python
"""How much a logit grid's resolution alone costs: each ground-truth mask shrunk to G x G (area
averaging), scaled back to its size (bilinear) and thresholded at the best of 0.3/0.4/0.5, scored
against itself as evaluate.py scores a model (mean over images of per-image IoU).

    python scripts/resolution_ceiling.py --data data/full --task cracks [--split valid]

A perfect model whose output grid is G x G could score no more than this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg.cli import run_script  # noqa: E402
from defectseg.data import load_rows  # noqa: E402
from defectseg.io import read_mask_png  # noqa: E402
from defectseg.metrics import confusion, iou_from_counts  # noqa: E402


def ceiling(mask: np.ndarray, grid: int) -> float:
    small = cv2.resize(mask.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)
    up = cv2.resize(small, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return max(float(iou_from_counts(confusion(up >= t, mask), 1.0)) for t in (0.3, 0.4, 0.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output (default: %(default)s)")
    parser.add_argument("--task", default="cracks", help="task to score (default: %(default)s)")
    parser.add_argument("--split", default="valid", help="split (default: %(default)s)")
    parser.add_argument("--grids", type=int, nargs="+", default=[112, 160, 224, 320, 448])
    args = parser.parse_args()
    masks = [read_mask_png(r["mask"]) for r in load_rows(args.data, args.split, [args.task])]
    for grid in args.grids:
        print(f"{grid:>4} x {grid:<4} mean IoU ceiling {np.mean([ceiling(m, grid) for m in masks]):.4f} "
              f"({len(masks)} {args.task} {args.split} masks)")


if __name__ == "__main__":
    run_script(main)
