#!/usr/bin/env python
"""Are train.py's negative pairs really negative?

train.py pairs some photos with the *other* task's prompt and an empty target (``--negative-prob``), which
assumes that crack photos show no taping area and drywall photos no crack. This script asks a trained
model the other task's prompt on every photo of a split, at that prompt's tuned threshold, and ranks the
photos by the share of the image it marks:

    python scripts/negative_pairs.py --model models/liteseg --data data/full --split train --out reports/negative_pairs

Writes ``<out>/negative_pairs.csv`` (every photo: task, the other prompt, the share it marks, the share
the photo's own ground truth covers) and ``<out>/negative_pairs_<task>.png`` (the --top photos marked
most: the photo beside the other prompt's mask, tinted green as predict.py's overlays), and prints how many photos the other prompt marks
more than 1% and 5% of. What to look at, and what was found for the shipped model: docs/training.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg.cli import int_at_least, run_script  # noqa: E402
from defectseg.data import load_rows  # noqa: E402
from defectseg.evaluation import other_task_prompts  # noqa: E402
from defectseg.inference import Segmenter  # noqa: E402
from defectseg.io import encode_png, load_image, write_bytes_atomic, write_text_atomic  # noqa: E402
from defectseg.report import _fit, _text_bar  # noqa: E402
from predict import tint  # noqa: E402


def marked_shares(segmenter: Segmenter, rows: list[dict], prompt: str, batch: int) -> list[float]:
    """The share of each row's photo that ``prompt`` marks (0..1), in row order."""
    shares = []
    for start in range(0, len(rows), batch):
        images = [load_image(r["image"]) for r in rows[start:start + batch]]
        shares += [float(m.mean()) for m in segmenter.predict(images, [prompt])[prompt]]
    return shares


def contact_sheet(rows: list[dict], segmenter: Segmenter, prompt: str, tile: int = 224) -> np.ndarray:
    """(H, W, 3) uint8: per row, the photo and the photo with ``prompt``'s mask tinted as predict.py's
    overlays (green)."""
    parts = []
    for row in rows:
        image = load_image(row["image"])
        mask = segmenter.predict([image], [prompt])[prompt][0]
        painted = tint(image, mask)
        parts.append(_text_bar(f"{prompt!r} marks {mask.mean():.1%}  {Path(row['image']).name[:40]}", 2 * tile))
        parts.append(np.concatenate([_fit(image, tile, cv2.INTER_AREA),
                                     _fit(painted, tile, cv2.INTER_AREA)], axis=1))
    return np.concatenate(parts, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/liteseg", help="checkpoint (default: %(default)s)")
    parser.add_argument("--data", default="data/full", help="preprocess_masks.py output (default: %(default)s)")
    parser.add_argument("--split", default="train", help="split (default: %(default)s)")
    parser.add_argument("--out", default="reports/negative_pairs", help="output folder (default: %(default)s)")
    parser.add_argument("--top", type=int_at_least(1), default=12, help="photos per task in the sheet (default: %(default)s)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    args = parser.parse_args()
    segmenter = Segmenter.load(args.model, device="cpu")
    rows = load_rows(args.data, args.split)
    others = other_task_prompts({r["task"]: r["prompt"] for r in rows}) or {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for task, prompt in sorted(others.items()):
        own = [r for r in rows if r["task"] == task]
        shares = marked_shares(segmenter, own, prompt, args.batch_size)
        table += [(r, prompt, s) for r, s in zip(own, shares)]
        shares_np = np.array(shares)
        print(f"{task}: {prompt!r} at threshold {segmenter.threshold(prompt):g} marks > 1% of "
              f"{(shares_np > 0.01).sum()} and > 5% of {(shares_np > 0.05).sum()} of {len(own)} photos "
              f"(mean share {shares_np.mean():.4f})")
        top = [own[i] for i in np.argsort(-shares_np, kind="stable")[:args.top]]
        sheet = contact_sheet(top, segmenter, prompt)
        write_bytes_atomic(out / f"negative_pairs_{task}.png", encode_png(sheet))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", "task", "other_prompt", "other_share", "own_gt_share"])
    for row, prompt, share in sorted(table, key=lambda t: -t[2]):
        writer.writerow([row["image"], row["task"], prompt, f"{share:.6f}", row.get("fg_fraction", "")])
    write_text_atomic(out / "negative_pairs.csv", text.getvalue())
    print(f"wrote {out}/negative_pairs.csv and the sheets")


if __name__ == "__main__":
    run_script(main)
