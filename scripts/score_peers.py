#!/usr/bin/env python
"""Score every folder of peer masks against exact COCO ground truth; print a Markdown table.

    python preprocess_masks.py --data-root ../shared/data --out data/full --splits valid
    python scripts/score_peers.py --peers ../shared/peer-predictions --data data/full

Each folder holds <image_stem>__<prompt_slug>.png masks for the valid split (evaluate.py --pred-dir's
format). A folder is scored on the tasks it has masks for; a missing mask counts as empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg import evaluation  # noqa: E402
from defectseg.manifest import MANIFEST_FILE, read_manifest  # noqa: E402
from defectseg.tasks import prompt_slug  # noqa: E402


def main(args: argparse.Namespace) -> None:
    rows = read_manifest(Path(args.data) / args.split / MANIFEST_FILE)
    print("| masks | task | images | mean IoU | mean Dice | micro IoU | precision | recall | missing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in sorted(p for p in Path(args.peers).iterdir() if p.is_dir()):
        slugs = {slug for slug in {prompt_slug(r["prompt"]) for r in rows} if any(folder.glob(f"*__{slug}.png"))}
        covered = [r for r in rows if prompt_slug(r["prompt"]) in slugs]  # the manifest's prompts, any task table
        result = evaluation.evaluate_pred_dir(folder, covered, progress=False)
        summary = evaluation.aggregate(result.scores)
        for task, m in summary["tasks"].items():
            print(f"| {folder.name} | {task} | {m['n_images']} | {m['iou']:.4f} | {m['dice']:.4f} | "
                  f"{m['micro_iou']:.4f} | {m['precision']:.4f} | {m['recall']:.4f} | "
                  f"{result.missing_by_task.get(task, 0)} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="../shared/peer-predictions", help="folder of mask folders")
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output of the full exports (default: %(default)s)")
    parser.add_argument("--split", default="valid")
    main(parser.parse_args())
