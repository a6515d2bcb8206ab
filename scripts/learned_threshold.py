#!/usr/bin/env python
"""Can a per-image threshold learned on train photos beat the one tuned threshold per prompt? Per task:
each photo's probability map is summarized (quantiles, the share of pixels above each of 9 levels, the
mean); a valid photo's threshold is the best one for the average IoU curve of its k nearest train photos
in that summary (features standardized on train). No valid ground truth is used to pick a threshold.

    python scripts/learned_threshold.py --model models/liteseg --data data/full [--train-stride 3] [--k 50]

Prints, per task: the one threshold tuned on the train photos and on valid, the learned per-image one
(with its leave-one-out score on train), and the oracle (each valid photo's own best threshold, chosen with
its ground truth). Scored as evaluate.py scores: per-image IoU at the original size, mean over photos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg.cli import int_at_least, run_script  # noqa: E402
from defectseg.data import load_rows  # noqa: E402
from defectseg.inference import PRECISION_HELP, PRECISIONS, Segmenter  # noqa: E402
from defectseg.io import load_image, read_mask_png  # noqa: E402
from defectseg.metrics import counts_at_thresholds, default_thresholds, iou_from_counts  # noqa: E402

QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def summarize(prob: np.ndarray) -> np.ndarray:
    """(19,) features of one (H, W) probability map: quantiles, shares above LEVELS, mean."""
    return np.r_[np.quantile(prob, QUANTILES), [(prob >= t).mean() for t in LEVELS], prob.mean()]


def features_and_curves(segmenter: Segmenter, rows: list[dict], prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 19) features and (N, len(default_thresholds())) per-image IoU curves of ``rows``."""
    feats, curves = [], []
    for row in rows:
        gt = read_mask_png(row["mask"])
        prob = segmenter.probability_map(load_image(row["image"]), prompt, gt.shape)
        feats.append(summarize(prob))
        curves.append(iou_from_counts(counts_at_thresholds(prob, gt, default_thresholds()), 1.0))
    return np.array(feats), np.array(curves)


def knn_pick(train_x: np.ndarray, train_curves: np.ndarray, x: np.ndarray, k: int, leave_one_out: bool = False) -> np.ndarray:
    """(len(x),) threshold index for each row of ``x``: the argmax of its k nearest train rows' mean curve
    (``leave_one_out``: x is train_x, and a row is never its own neighbour, so k is at most N - 1)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-9
    dist = ((((x - mu) / sd)[:, None] - ((train_x - mu) / sd)[None]) ** 2).sum(-1)
    if leave_one_out:
        np.fill_diagonal(dist, np.inf)
        k = min(k, len(train_x) - 1)
    nearest = np.argsort(dist, axis=1)[:, :k]
    return train_curves[nearest].mean(1).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/liteseg", help="checkpoint (default: %(default)s)")
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output (default: %(default)s)")
    parser.add_argument("--train-stride", type=int_at_least(1), default=3, help="use every n-th train photo (default: %(default)s)")
    parser.add_argument("--k", type=int_at_least(1), default=50, help="train photos averaged per valid photo (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP + " (default: %(default)s)")
    args = parser.parse_args()
    segmenter = Segmenter.load(args.model, device="cpu", precision=args.precision)
    train, valid = load_rows(args.data, "train", None), load_rows(args.data, "valid", None)
    thresholds = default_thresholds()
    for task in sorted({r["task"] for r in valid}):
        prompt = next(r["prompt"] for r in valid if r["task"] == task)
        train_rows = [r for r in train if r["task"] == task][::args.train_stride]
        tx, tc = features_and_curves(segmenter, train_rows, prompt)
        vx, vc = features_and_curves(segmenter, [r for r in valid if r["task"] == task], prompt)
        at_train, at_valid = tc.mean(0).argmax(), vc.mean(0).argmax()
        learned = vc[np.arange(len(vc)), knn_pick(tx, tc, vx, args.k)].mean()
        loo = tc[np.arange(len(tc)), knn_pick(tx, tc, tx, args.k, leave_one_out=True)].mean()
        print(f"{task} ({prompt!r}, {len(train_rows)} train and {len(vc)} valid photos), valid mean IoU:")
        print(f"  one threshold tuned on train {thresholds[at_train]:.2f}: {vc[:, at_train].mean():.4f}")
        print(f"  one threshold tuned on valid {thresholds[at_valid]:.2f}: {vc[:, at_valid].mean():.4f}")
        print(f"  per-image, learned on train (k={args.k}): {learned:.4f} (train, leave-one-out: {loo:.4f}; "
              f"train at its own tuned threshold: {tc[:, at_train].mean():.4f})")
        print(f"  per-image oracle (each photo's best threshold): {vc.max(1).mean():.4f}", flush=True)


if __name__ == "__main__":
    run_script(main)
