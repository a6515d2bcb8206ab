#!/usr/bin/env python
"""Rebuild the bundled sample (sample_data/) from the full Roboflow exports.

    python scripts/make_sample.py --source ../shared/data --out sample_data

Picks about 12 images per task (train and valid) chosen to cover the exports' real quirks: box-only
crack annotations, an image with no polygon at all, boxes past the image edge, drywall images without
annotations and with sub-2-px boxes, augmented copies that share a source photo across splits.
Writes each split's images with a filtered ``_annotations.coco.json`` and copies the CC BY 4.0
attribution files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# task folder in the sample -> (folder in the source, {split: [file-name prefixes]})
PICKS = {
    "cracks": ("cracks-3ii36", {
        "train": [
            "a_19_1_png_jpg.rf.10dc5e8a748442c90e8fa3b53f3e0241",  # polygons + box-only annotations
            "photo_6186122103615503360_y_jpg.rf.e7747cb842e1a1f661052a9b16f6d0a5",  # no polygon at all
            "Image_-370-_jpg.rf.0e5c2f4b4467895ad7a77d0da8c984ff",  # box past the image edge
            "cracking356_jpg.rf",  # same photo as valid Image_-637- under another name
            "00002_jpg.rf.8e624e8f99c6870e88c0493db53c5725",  # two augmented copies of one photo
            "00002_jpg.rf.dce353ac420f91715e22edfa8aa0af8e",
            "cracking0147_jpg.rf",
            "crack358_jpg.rf",
        ],
        "valid": [
            "crack333_jpg.rf.c769de2b84a85f9817b716731d75f5ec",  # box-only annotations
            "Image_-637-_jpg.rf.f9178526b783192167f96",  # identical picture to a train image
            "crack-bdbe00b8-dc48-11ed-a5d8-88b1113a23b0_jpg.rf.6c0095da754912f0b9c110e561f452e8",  # edge
            "2416_jpg.rf.bf2b80646c006685421f2dfd20b1cd06",
        ],
    }),
    "drywall": ("drywall-join-detect", {
        "train": [
            "IMG_20220627_111718-jpg_1500x2000_jpg.rf.15a5b4a6f891a298b66e94236520550b",  # no annotation
            "IMG_20220627_111149-jpg_1500x2000_jpg.rf.57c198fdef78b108aaeafb8447e12c48",  # box under 2 px
            "IMG_8207_JPG_jpg.rf.4f4448f3ce3129fb1c8e7d9129308454",
            "IMG_20220627_111136-jpg_1500x2000_jpg.rf.4f26bba7aac732683476731a8405c9a1",  # 4 boxes
            "IMG_8216_JPG_jpg.rf",
            "IMG_8236_JPG_jpg.rf",
            "2000x1500_15_resized_jpg.rf",
            "IMG_8221_JPG_jpg.rf",
        ],
        "valid": [
            "IMG_8224_JPG_jpg.rf.e48f9983e55b64f86609fae0cd0be1f3",
            "IMG_8216_JPG_jpg.rf",  # augmented copy of a train photo
            "2000x1500_15_resized_jpg.rf",
            "IMG_8275_JPG_jpg.rf.f23ebc8bdeb649f3b4cb6aa8b00f7a83",
        ],
    }),
}
ATTRIBUTION_FILES = ("README.dataset.txt", "README.roboflow.txt", "PROVENANCE.txt")


def pick(images: list[dict], prefixes: list[str]) -> list[dict]:
    chosen, names = [], set()
    for prefix in prefixes:
        match = next((im for im in sorted(images, key=lambda i: i["file_name"])
                      if im["file_name"].startswith(prefix) and im["file_name"] not in names), None)
        if match is None:
            raise SystemExit(f"error: no image in the export starts with {prefix!r}")
        chosen.append(match)
        names.add(match["file_name"])
    return chosen


def plan(source: Path) -> list[tuple[str, str, Path, dict, list[dict]]]:
    """(task, split, source folder, its COCO export, the picked images) for every pick; raises
    SystemExit naming the file or the prefix where one cannot be made, before anything is written."""
    picks = []
    for task, (folder, splits) in PICKS.items():
        for split, prefixes in splits.items():
            src = source / folder / split
            try:
                coco = json.loads((src / "_annotations.coco.json").read_text())
            except (OSError, ValueError) as err:
                raise SystemExit(f"error: {src / '_annotations.coco.json'}: {getattr(err, 'strerror', None) or err}") from None
            picks.append((task, split, src, coco, pick(coco["images"], prefixes)))
    return picks


def main(args: argparse.Namespace) -> None:
    source, out = Path(args.source), Path(args.out)
    for task, split, src, coco, images in plan(source):
        ids, names = {im["id"] for im in images}, {im["file_name"] for im in images}
        dst = out / task / split
        dst.mkdir(parents=True, exist_ok=True)
        for stale in dst.glob("*.jpg"):  # an earlier sample's pick (the sample is exactly PICKS)
            if stale.name not in names:
                stale.unlink()
        for im in images:
            shutil.copy2(src / im["file_name"], dst / im["file_name"])
        subset = dict(coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
        (dst / "_annotations.coco.json").write_text(json.dumps(subset))
        print(f"{task}/{split}: {len(images)} images, {len(subset['annotations'])} annotations")
    for task, (folder, _) in PICKS.items():
        for name in ATTRIBUTION_FILES:
            if (source / folder / name).exists():
                shutil.copy2(source / folder / name, out / task / name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data", help="the full exports (default: %(default)s)")
    parser.add_argument("--out", default="sample_data", help="where to write the sample (default: %(default)s)")
    main(parser.parse_args())
