"""Timing the training recipe on a GPU machine that the photos cannot reach (timing only, not scores).

The preprocessed data folder (masks and manifests, 24 MB for the two full exports) can travel to a GPU
machine where the 190 MB of photos cannot. This puts a real bundled sample photo of the same task (every
photo in both exports is a 640x640 JPEG, as are the samples) at each path the manifests name, so that
train.py runs the shipped recipe on the real number of images, sizes and masks: its times are the
recipe's; its IoU means nothing. It refuses to run where any of those photos exists.

    python bench/standin_photos.py --data data/full      # then train.py --data data/full ...
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from defectseg.io import list_images  # noqa: E402
from defectseg.manifest import read_manifest  # noqa: E402


def main(args: argparse.Namespace) -> int:
    rows = [r for split in ("train", "valid") for r in read_manifest(Path(args.data) / split / "manifest.csv")]
    present = [r["image"] for r in rows if Path(r["image"]).exists()]
    if present:
        print(f"error: {present[0]} exists (and {len(present) - 1} more): the real photos are here; "
              "stand-ins are only for a machine without them", file=sys.stderr)
        return 1
    photos = {task: itertools.cycle(sorted(p for split in ("train", "valid")
                                           for p in list_images(Path(args.photos) / task / split)))
              for task in {r["task"] for r in rows}}
    for row in rows:
        Path(row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(next(photos[row["task"]]), row["image"])
    print(f"{len(rows)} stand-in photos written")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/full", help="preprocessed data folder (default: data/full)")
    parser.add_argument("--photos", default=str(REPO / "sample_data"),
                        help="folder of <task>/<split>/ photos to copy (default: the bundled sample)")
    sys.exit(main(parser.parse_args()))
