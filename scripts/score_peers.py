#!/usr/bin/env python
"""Score every folder of peer masks against exact COCO ground truth; print a Markdown table.

    python preprocess_masks.py --data-root ../shared/data --out data/full --splits valid
    python scripts/score_peers.py --peers ../shared/peer-predictions --data data/full

Each folder holds <image_stem>__<prompt_slug>.png masks for the valid split (evaluate.py --pred-dir's
format). A folder is scored on the tasks it has masks for; a missing mask counts as empty. Beside each
mean IoU: its 95% bootstrap interval over the images, and the paired difference of our model's report
(--ours, default the shipped model's) minus the peer, on the same images, with its own interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg import evaluation, report  # noqa: E402
from defectseg.io import os_reason  # noqa: E402
from defectseg.manifest import MANIFEST_FILE, read_manifest  # noqa: E402
from defectseg.tasks import prompt_slug  # noqa: E402


def peer_folders(peers: Path) -> list[Path]:
    """The mask folders in ``peers``; raises ValueError when there are none (or it holds masks itself)."""
    if not peers.is_dir():
        raise ValueError(f"--peers {peers} does not exist or is not a folder")
    folders = sorted(p for p in peers.iterdir() if p.is_dir())
    if not folders:
        itself = next(peers.glob("*__*.png"), None)
        raise ValueError(f"--peers {peers} holds no folder of masks" + (
            f"; it holds masks itself (e.g. {itself.name}): give the folder above it, or score it with "
            f"evaluate.py --pred-dir {peers}" if itself else ""))
    return folders


def main(args: argparse.Namespace) -> int:
    manifest = Path(args.data) / args.split / MANIFEST_FILE
    try:
        rows = read_manifest(manifest)
        ours = report.read_per_image_iou(args.ours) if args.ours else None
        folders = peer_folders(Path(args.peers))
    except OSError as err:
        print(f"error: {os_reason(err)}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    header = ["masks", "task", "images", "mean IoU", "95% interval", "mean Dice", "micro IoU", "precision",
              "recall", "missing"] + (["ours - them (paired)", "95% interval"] if ours else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for folder in folders:
        slugs = {slug for slug in {prompt_slug(r["prompt"]) for r in rows} if any(folder.glob(f"*__{slug}.png"))}
        covered = [r for r in rows if prompt_slug(r["prompt"]) in slugs]  # the manifest's prompts, any task table
        if not covered:
            print(f"warning: {folder} holds no mask named for a prompt of {args.data}/{args.split}; not scored",
                  file=sys.stderr)
            continue
        try:
            result = evaluation.evaluate_pred_dir(folder, covered, progress=False)
        except ValueError as err:  # not one of its masks is named for these images
            print(f"warning: {err}; not scored", file=sys.stderr)
            continue
        summary = evaluation.aggregate(result.scores)
        paired = evaluation.paired_difference(evaluation.iou_by_image(result.scores, str(folder)), ours)["tasks"] \
            if ours else {}
        if ours and not paired:
            print(f"warning: {folder.name} has no image in common with {args.ours}", file=sys.stderr)
        for task, m in summary["tasks"].items():
            cells = [folder.name, task, m["n_images"], f"{m['iou']:.4f}", report.interval_text(m.get("iou_ci"), 3), f"{m['dice']:.4f}",
                     f"{m['micro_iou']:.4f}", f"{m['precision']:.4f}", f"{m['recall']:.4f}",
                     result.missing_by_task.get(task, 0)]
            if ours:
                d = paired.get(task)
                cells += [f"{d['iou_diff']:+.4f} ({d['n_images']} images)", report.interval_text(d["iou_diff_ci"], 3, signed=True)
                          ] if d else ["", ""]
            print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="../shared/peer-predictions", help="folder of mask folders")
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output of the full exports (default: %(default)s)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--ours", default="models/liteseg/report",
                        help="evaluate.py report (folder or per_image.csv) to pair with each peer on the same "
                             "images; '' for none (default: %(default)s)")
    sys.exit(main(parser.parse_args()))
