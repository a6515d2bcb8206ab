#!/usr/bin/env python
"""Turn Roboflow COCO exports into exact binary masks, per-split manifests and a leakage report.

    python preprocess_masks.py --data-root dataset_root --out processed_dataset

Input: dataset_root/<task>/<split>/_annotations.coco.json with the images beside it.
Output: processed_dataset/<split>/masks/<image_stem>__<prompt_slug>.png, <split>/manifest.csv,
summary.json. Re-running only redoes masks that are missing or stale.
"""

from __future__ import annotations

import argparse
import logging
import os

from defectseg.cli import (
    add_tasks_argument,
    fail,
    int_at_least,
    nonempty,
    pick_tasks,
    run,
    setup_logging,
    split_name,
)
from defectseg.coco import CocoError
from defectseg.io import os_reason
from defectseg.manifest import SUMMARY_FILE
from defectseg.preprocess import DEFAULT_SPLITS, preprocess

log = logging.getLogger("preprocess_masks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=nonempty, default="dataset_root", help="folder holding <task>/<split>/ exports (default: %(default)s)")
    parser.add_argument("--out", type=nonempty, default="processed_dataset", help="output folder (default: %(default)s)")
    add_tasks_argument(parser)
    parser.add_argument("--splits", nargs="+", type=split_name, default=None,
                        help="splits to process; each must exist for at least one task, a split some tasks lack "
                        f"is skipped for them (default: {' '.join(DEFAULT_SPLITS)}, those that exist)")
    parser.add_argument("--workers", type=int_at_least(1), default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: %(default)s, the number of cores up to 8; 1: none)")
    parser.add_argument("--overwrite", action="store_true", help="redo every mask, even up-to-date ones")
    parser.add_argument("--strict", action="store_true",
                        help="treat every input problem (even repaired ones) as an error: exit 1, manifests untouched")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    tasks = pick_tasks(args)
    try:
        summary = preprocess(args.data_root, args.out, tasks, args.splits, args.workers, args.overwrite, args.strict)
    except CocoError as err:
        return fail(str(err))
    except OSError as err:  # e.g. the disk filling up while masks are written (--out itself is checked first)
        return fail(f"cannot write the output under {args.out}: {os_reason(err)}")

    for problem in summary["problems"][:10]:
        log.warning("%s: %s [%s, %s]", problem["file"], problem["message"], problem["kind"],
                    "repaired" if problem["repaired"] else "skipped")
    if len(summary["problems"]) > 10:
        log.warning("... %d more problems, all listed in %s", len(summary["problems"]) - 10, SUMMARY_FILE)
    log.info("%-8s %-6s %7s %6s %9s %8s", "task", "split", "images", "empty", "box-only", "polygon")
    for task, splits in summary["counts"].items():
        for split, c in splits.items():
            log.info("%-8s %-6s %7d %6d %9d %8d", task, split, c["images"], c["empty_masks"],
                     c["bbox_only_annotations"], c["polygon_annotations"])
    for task, splits in summary["leakage"].items():
        for split, c in splits.items():
            log.info("leakage %s/%s: %d of %d share a source photo with train, %d identical pixels, "
                     "%d near-duplicates (any flip/rotation)", task, split, c["same_source_as_train"], c["images"],
                     c["identical_pixels_in_train"], c["near_duplicate_of_train"])
    rate = summary["images_per_second"]
    log.info("%d masks written, %d up to date, %d kept from other tasks/splits, %d problems (%s) in %.1f s%s -> %s",
             summary["masks_written"], summary["masks_reused"], summary["masks_kept"], len(summary["problems"]),
             ", ".join(f"{k} {v}" for k, v in summary["problem_counts"].items()) or "none",
             summary["seconds"], f" ({rate} images/s)" if rate else "", os.path.join(args.out, SUMMARY_FILE))
    return 0


if __name__ == "__main__":
    run(main, build_parser())
