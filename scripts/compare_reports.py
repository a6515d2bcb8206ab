#!/usr/bin/env python
"""Paired comparison of saved evaluate.py reports: each one's mean IoU minus the first's, on the images both
scored, with the 95% bootstrap interval of the per-image differences; prints a Markdown table.

    python scripts/compare_reports.py models/liteseg/report runs/other/report [more reports ...] [--fg-split 0.03]

A report is its folder or its per_image.csv (images are paired by task and file name, so reports made where
the data lay elsewhere pair too). With several tasks, a last row per report gives their mean; where any task
has fewer than 10 images, no interval is given for any of them (the mean's interval resamples every task). --fg-split F adds the same rows for the images whose ground truth covers less
than F of the photo and for the rest (the fraction is read from the first report's per_image.csv).

The images' own difficulty cancels in a paired difference, so its interval is far narrower than either
score's: an interval that excludes 0 is a difference the choice of images does not explain. It does not cover
another training run of the same recipe (another seed may differ more).
evaluate.py --compare gives the same numbers for two models it runs itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg import evaluation, report  # noqa: E402


def main(args: argparse.Namespace) -> int:
    try:
        base, *others = [report.read_per_image_iou(path) for path in args.reports]
        fg = report.read_per_image_iou(args.reports[0], "fg_fraction") if args.fg_split is not None else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    subsets = {"": base}
    if fg is not None:
        subsets[f", foreground < {args.fg_split:g}"] = {k: v for k, v in base.items() if fg[k] < args.fg_split}
        subsets[f", foreground >= {args.fg_split:g}"] = {k: v for k, v in base.items() if fg[k] >= args.fg_split}
    print(f"A = {args.reports[0]}\n")
    print("| B | task | images | A | B | B - A | 95% interval |")
    print("|---|---|---|---|---|---|---|")
    for path, other in zip(args.reports[1:], others):
        for label, subset in subsets.items():
            paired = evaluation.paired_difference(subset, other)
            if not label and not paired["tasks"]:
                print(f"error: {path} has no image in common with {args.reports[0]}", file=sys.stderr)
                return 1
            overall = [("overall (mean of tasks)", paired["overall"])] if len(paired["tasks"]) > 1 else []
            for task, d in [*paired["tasks"].items(), *overall]:
                print(f"| {path} | {task}{label} | {d['n_images']} | {d['iou_a']:.4f} | {d['iou_b']:.4f} | "
                      f"{d['iou_diff']:+.4f} | {report.interval_text(d['iou_diff_ci'], signed=True)} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", metavar="REPORT",
                        help="evaluate.py report folders or per_image.csv files; the first is A")
    parser.add_argument("--fg-split", type=float, default=None, metavar="F",
                        help="also compare the images whose ground truth covers less than F of the photo, and the rest")
    parsed = parser.parse_args()
    if len(parsed.reports) < 2:
        parser.error("give at least two reports: the first is compared with each other one")
    sys.exit(main(parsed))
