#!/usr/bin/env python
"""Would running the model at other input sizes, and averaging them, help? Per task, the valid score of
each input size alone and of every set of sizes averaged (logits averaged at the photo's size), at the
threshold tuned for each on the same images, as evaluate.py tunes it.

    python scripts/scale_tta.py --model models/liteseg --data data/full [--sizes 384 448 512 576] [--tta d4]

A measurement, not a product feature: the sets are chosen on the images they are scored on. Logits are
kept as float16 in memory (201 photos of 640 x 640 x 4 sizes: about 0.7 GB per task).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg.cli import run_script  # noqa: E402
from defectseg.data import load_rows  # noqa: E402
from defectseg.inference import PRECISION_HELP, PRECISIONS, TTA_VIEWS, Segmenter  # noqa: E402
from defectseg.io import load_image, read_mask_png  # noqa: E402
from defectseg.metrics import best_threshold, counts_at_thresholds, default_thresholds  # noqa: E402


def logits_at(segmenter: Segmenter, image: np.ndarray, prompt: str, size: int, out_size: tuple[int, int]) -> np.ndarray:
    """(H, W) = ``out_size`` (the ground truth's, as evaluate.py scores) float16 logits of ``prompt`` for
    ``image`` with the model's input resized to size x size."""
    segmenter.processor.image_processor.size = {"height": size, "width": size}
    logits = segmenter.logits(segmenter.encode(segmenter.pixel_values([image])), prompt)
    return F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0, 0].half().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/liteseg", help="checkpoint (default: %(default)s)")
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output (default: %(default)s)")
    parser.add_argument("--split", default="valid", help="split (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 448, 512, 576], help="input sizes in pixels")
    parser.add_argument("--tta", default="d4", choices=["none", *TTA_VIEWS], help="views per size (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP + " (default: %(default)s)")
    args = parser.parse_args()
    segmenter = Segmenter.load(args.model, device="cpu", precision=args.precision,
                               tta=None if args.tta == "none" else args.tta)
    rows = load_rows(args.data, args.split, None)
    thresholds = default_thresholds()
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        prompt = task_rows[0]["prompt"]
        gts, logits = [], {size: [] for size in args.sizes}
        for row in task_rows:
            image, gt = load_image(row["image"]), read_mask_png(row["mask"])
            gts.append(gt)
            for size in args.sizes:
                logits[size].append(logits_at(segmenter, image, prompt, size, gt.shape))
        print(f"{task} ({prompt!r}, {len(task_rows)} images, tta {args.tta}):")
        for k in range(1, len(args.sizes) + 1):
            for sizes in itertools.combinations(args.sizes, k):
                counts = []
                for i, gt in enumerate(gts):
                    mean = sum(logits[s][i].astype(np.float32) for s in sizes) / len(sizes)
                    counts.append(counts_at_thresholds(torch.sigmoid(torch.from_numpy(mean)).numpy(), gt, thresholds))
                t, score = best_threshold(np.stack(counts), thresholds)
                print(f"  {' + '.join(f'{s}px' for s in sizes):<30} threshold {t:.2f}  mean IoU {score:.4f}", flush=True)


if __name__ == "__main__":
    run_script(main)
