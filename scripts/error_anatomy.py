#!/usr/bin/env python
"""Where a model's errors lie, per task: how much of its lost IoU a per-image threshold could win back,
and how many of its wrong pixels are far from the drawn outline (whole structures missed or invented)
rather than in a band along it (the annotators' width).

    python scripts/error_anatomy.py --model models/liteseg --data data/full [--split valid] [--bands 2 8]

Scores as evaluate.py does (per-image IoU at the original size, mean over images):
- `tuned`: at the checkpoint's tuned threshold for the prompt;
- `area-matched`: at a per-image threshold that needs no ground truth: the one that marks as many pixels
  as the probabilities sum to;
- `oracle`: at each image's own best threshold (0.05 to 0.95), chosen with its ground truth: an upper
  bound for any per-image calibration.
Then, over all images with foreground: the share of wrong pixels that are false positives, the share of
false positives more than k px from any ground-truth pixel, and the share of false negatives more than
k px inside the ground truth (away from its outline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg.data import load_rows  # noqa: E402
from defectseg.inference import Segmenter  # noqa: E402
from defectseg.io import load_image, read_mask_png  # noqa: E402
from defectseg.metrics import confusion, counts_at_thresholds, default_thresholds, iou_from_counts  # noqa: E402


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(iou_from_counts(confusion(pred, gt), 1.0))


def area_matched(prob: np.ndarray) -> np.ndarray:
    """Mark the round(sum(prob)) most probable pixels (ties included)."""
    k = min(int(round(float(prob.sum()))), prob.size)
    return prob >= np.partition(prob.ravel(), -k)[-k] if k > 0 else np.zeros(prob.shape, bool)


def far_errors(pred: np.ndarray, gt: np.ndarray, bands: list[int]) -> np.ndarray:
    """[fp, fn, fp beyond k px of the ground truth for each k, fn deeper than k px inside it for each k]."""
    inside = cv2.distanceTransform(gt.astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((~gt).astype(np.uint8), cv2.DIST_L2, 3)
    fp, fn = pred & ~gt, ~pred & gt
    return np.array([fp.sum(), fn.sum(), *((fp & (outside > k)).sum() for k in bands),
                     *((fn & (inside > k)).sum() for k in bands)], dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/liteseg", help="checkpoint (default: %(default)s)")
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output (default: %(default)s)")
    parser.add_argument("--split", default="valid", help="split (default: %(default)s)")
    parser.add_argument("--bands", type=int, nargs="+", default=[2, 8], help="distances in pixels")
    args = parser.parse_args()
    segmenter = Segmenter.load(args.model, device="cpu")
    rows = load_rows(args.data, args.split, None)
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        prompt = task_rows[0]["prompt"]
        threshold = segmenter.threshold(prompt)
        scores: dict[str, list[float]] = {"tuned": [], "area-matched": [], "oracle": []}
        counts = np.zeros(2 + 2 * len(args.bands), dtype=np.int64)
        for row in task_rows:
            image, gt = load_image(row["image"]), read_mask_png(row["mask"])
            prob = segmenter.probabilities(segmenter.encode(segmenter.pixel_values([image])), [gt.shape],
                                           [prompt])[prompt][0]
            scores["tuned"].append(iou(prob >= threshold, gt))
            scores["area-matched"].append(iou(area_matched(prob), gt))
            scores["oracle"].append(float(iou_from_counts(counts_at_thresholds(prob, gt, default_thresholds())).max()))
            if gt.any():
                counts += far_errors(prob >= threshold, gt, args.bands)
        fp, fn, n = counts[0], counts[1], len(args.bands)
        print(f"{task} ({prompt!r}, {len(task_rows)} images, threshold {threshold:g}):")
        for name, values in scores.items():
            print(f"  mean IoU, {name + ':':<14} {np.mean(values):.4f}")
        print(f"  false positives: {fp / max(fp + fn, 1):.0%} of wrong pixels")
        for i, k in enumerate(args.bands):
            print(f"  beyond {k} px: {counts[2 + i] / max(fp, 1):.0%} of false positives lie more than {k} px from "
                  f"the ground truth, {counts[2 + n + i] / max(fn, 1):.0%} of false negatives more than {k} px inside it")


if __name__ == "__main__":
    main()
