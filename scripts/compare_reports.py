#!/usr/bin/env python
"""Paired comparison of saved evaluate.py reports: each one's mean IoU minus the first's, on the images both
scored, with the 95% bootstrap interval of the per-image differences; prints a Markdown table.

    python scripts/compare_reports.py models/liteseg/report runs/other/report [more reports ...]

A report is its folder or its per_image.csv (images are paired by task and file name, so reports made where
the data lay elsewhere pair too). The images' own difficulty cancels in a paired difference, so its interval
is far narrower than either score's: an interval that excludes 0 is a difference the choice of images does
not explain. It does not cover another training run of the same recipe (another seed may differ more).
evaluate.py --compare gives the same numbers for two models it runs itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg import evaluation, report  # noqa: E402


def main(args: argparse.Namespace) -> int:
    try:
        base, *others = [report.read_per_image_iou(path) for path in args.reports]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"A = {args.reports[0]}\n")
    print("| B | task | images | A | B | B - A | 95% interval |")
    print("|---|---|---|---|---|---|---|")
    for path, other in zip(args.reports[1:], others):
        paired = evaluation.paired_difference(base, other)
        if not paired["tasks"]:
            print(f"error: {path} has no image in common with {args.reports[0]}", file=sys.stderr)
            return 1
        for task, d in paired["tasks"].items():
            common = [key for key in base.keys() & other.keys() if key[0] == task]
            a, b = (np.mean([scores[key] for key in common]) for scores in (base, other))
            low, high = d["iou_diff_ci"]
            print(f"| {path} | {task} | {d['n_images']} | {a:.4f} | {b:.4f} | {d['iou_diff']:+.4f} | "
                  f"{low:+.4f} to {high:+.4f} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", metavar="REPORT",
                        help="evaluate.py report folders or per_image.csv files; the first is A")
    parsed = parser.parse_args()
    if len(parsed.reports) < 2:
        parser.error("give at least two reports: the first is compared with each other one")
    sys.exit(main(parsed))
