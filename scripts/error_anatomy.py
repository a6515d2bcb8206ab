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
k px inside the ground truth (away from its outline). Last, what shape post-processing of the binary mask
would win (`POSTPROCESS`: dilation, closing, hole filling, dropping small parts, keeping the largest), each at
the threshold best for it on the same images.
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
from defectseg.inference import PRECISION_HELP, PRECISIONS, Segmenter  # noqa: E402
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


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the border marked."""
    _, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ((labels > 0) & ~np.isin(labels, outside))


def keep_parts(mask: np.ndarray, min_area: int = 0, largest: int | None = None) -> np.ndarray:
    """``mask``'s 8-connected parts of at least ``min_area`` pixels, or (``largest``) its largest ones."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.argsort(-areas, kind="stable")[:largest] + 1 if largest else np.flatnonzero(areas >= min_area) + 1
    return np.isin(labels, keep) & mask


# binary mask -> binary mask, each scored at the threshold best for it
POSTPROCESS = {
    "none": lambda m: m,
    "dilate 2 px": lambda m: cv2.dilate(m.astype(np.uint8), _disk(2)) > 0,
    "dilate 4 px": lambda m: cv2.dilate(m.astype(np.uint8), _disk(4)) > 0,
    "close 4 px": lambda m: cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_CLOSE, _disk(4)) > 0,
    "close 8 px": lambda m: cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_CLOSE, _disk(8)) > 0,
    "fill holes": fill_holes,
    "drop parts < 1000 px": lambda m: keep_parts(m, min_area=1000),
    "keep the largest part": lambda m: keep_parts(m, largest=1),
}


def postprocessed_counts(prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(len(POSTPROCESS), len(thresholds), 4) confusion counts of each post-processing at each threshold."""
    masks = [prob >= t for t in thresholds]
    return np.array([[confusion(op(m), gt) for m in masks] for op in POSTPROCESS.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/liteseg", help="checkpoint (default: %(default)s)")
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output (default: %(default)s)")
    parser.add_argument("--split", default="valid", help="split (default: %(default)s)")
    parser.add_argument("--bands", type=int, nargs="+", default=[2, 8], help="distances in pixels")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP + " (default: %(default)s)")
    args = parser.parse_args()
    segmenter = Segmenter.load(args.model, device="cpu", precision=args.precision)
    rows = load_rows(args.data, args.split, None)
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        prompt = task_rows[0]["prompt"]
        threshold = segmenter.threshold(prompt)
        scores: dict[str, list[float]] = {"tuned": [], "area-matched": [], "oracle": []}
        counts = np.zeros(2 + 2 * len(args.bands), dtype=np.int64)
        post = []
        for row in task_rows:
            gt = read_mask_png(row["mask"])
            prob = segmenter.probability_map(load_image(row["image"]), prompt, gt.shape)
            scores["tuned"].append(iou(prob >= threshold, gt))
            scores["area-matched"].append(iou(area_matched(prob), gt))
            scores["oracle"].append(float(iou_from_counts(counts_at_thresholds(prob, gt, default_thresholds())).max()))
            post.append(postprocessed_counts(prob, gt, default_thresholds()))
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
        best = iou_from_counts(np.stack(post)).mean(axis=0).max(axis=1)  # (ops,): mean over images, best threshold
        print("  post-processing, mean IoU at its best threshold: "
              + "; ".join(f"{name} {score:.4f}" for name, score in zip(POSTPROCESS, best)))


if __name__ == "__main__":
    run_script(main)
