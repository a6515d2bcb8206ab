"""Timing the training recipe on a GPU machine that the photos cannot reach (timing only, not scores).

The preprocessed data folder (masks and manifests, 24 MB for the two full exports) can travel to a GPU
machine where the 190 MB of photos cannot. This puts a real bundled sample photo of the same task (every
photo in both exports is a 640x640 JPEG, as are the samples) at each path the manifests name, so that
train.py runs the shipped recipe on the real number of images, sizes and masks: its times are the
recipe's; its IoU means nothing. It lists what it writes in defectseg-standins.txt in the photos' common folder
(before writing them) and refuses where any of those paths holds a file that list does not name: the
real photos are there. Stand-ins from an earlier run are written again.

    python bench/standin_photos.py --data data/full      # then train.py --data data/full ...
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from defectseg.io import list_images  # noqa: E402
from defectseg.manifest import read_manifest  # noqa: E402

STANDINS = "defectseg-standins.txt"


def main(args: argparse.Namespace) -> int:
    try:
        rows = [r for split in ("train", "valid") for r in read_manifest(Path(args.data) / split / "manifest.csv")]
        folders = {task: [Path(args.photos) / task / split for split in ("train", "valid")]
                   for task in {r["task"] for r in rows}}
        photos = {task: sorted(p for f in fs if f.is_dir() for p in list_images(f)) for task, fs in folders.items()}
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if missing := sorted(task for task, paths in photos.items() if not paths):
        print(f"error: {args.photos} has no photos of task {', '.join(missing)}", file=sys.stderr)
        return 1
    paths = [str(Path(r["image"]).resolve()) for r in rows]
    listing = Path(os.path.commonpath([str(Path(p).parent) for p in paths])) / STANDINS
    ours = set(listing.read_text().splitlines()) if listing.is_file() else set()
    real = [p for p in paths if p not in ours and Path(p).exists()]
    if real:
        print(f"error: {real[0]} exists and is not a stand-in (and {len(real) - 1} more): the real photos are "
              "here; stand-ins are only for a machine without them", file=sys.stderr)
        return 1
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{p}\n" for p in paths))
    photos = {task: itertools.cycle(sources) for task, sources in photos.items()}
    for row, path in zip(rows, paths):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(next(photos[row["task"]]), path)
    print(f"{len(rows)} stand-in photos written")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/full", help="preprocessed data folder (default: data/full)")
    parser.add_argument("--photos", default=str(REPO / "sample_data"),
                        help="folder of <task>/<split>/ photos to copy (default: the bundled sample)")
    sys.exit(main(parser.parse_args()))
