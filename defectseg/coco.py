"""COCO exports -> exact binary masks.

A mask is the union of all of an image's annotations, rasterized the way the COCO reference
(pycocotools) does it:

- polygons with any number of rings (``segmentation: [[x0, y0, x1, y1, ...], ...]``);
- RLE, compressed (``counts`` a string) or uncompressed (``counts`` a list, ``iscrowd: 1``);
- an annotation whose ``segmentation`` is empty (or has no usable ring) falls back to its ``bbox``,
  rasterized as the box polygon, as pycocotools does for boxes;
- coordinates outside the image are clipped by the rasterizer (the part inside is kept exactly).

Real exports are messy, so every annotation is checked first. What can be repaired is repaired and
reported (odd-length rings lose their last number, non-finite points are dropped, degenerate rings
are dropped); what cannot is skipped and reported. ``Problem`` records carry the file and the reason.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

ANNOTATIONS_FILE = "_annotations.coco.json"


class CocoError(ValueError):
    """An annotations file that cannot be used at all (unrecoverable)."""


@dataclass(frozen=True)
class Problem:
    """Something wrong with the input. ``repaired`` means the data was still used (after a fix)."""

    file: str
    kind: str
    message: str
    repaired: bool = False

    def __str__(self) -> str:
        action = "repaired" if self.repaired else "skipped"
        return f"{self.file}: {self.message} [{self.kind}, {action}]"


@dataclass
class ImageEntry:
    """One image of an export with its annotations (already filtered to the task's categories)."""

    id: int
    file_name: str
    width: int
    height: int
    annotations: list[dict] = field(default_factory=list)


@dataclass
class CocoExport:
    path: Path
    images: list[ImageEntry]
    problems: list[Problem]
    categories: dict[int, str]


def source_stem(file_name: str) -> str:
    """The source photo a Roboflow file came from: the name before ``.rf.`` (augmented copies share it).

    >>> source_stem("00002_jpg.rf.8e624e8f99c6870e88c0493db53c5725.jpg")
    '00002_jpg'
    """
    stem = Path(file_name).name
    return stem.split(".rf.")[0] if ".rf." in stem else Path(stem).stem


def _as_int(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if float(value).is_integer() else None


def load_coco(json_path: str | Path, categories: tuple[str, ...] = ()) -> CocoExport:
    """Read and check a COCO annotations file.

    categories: category names to keep (empty: keep all). Categories are matched by name, so exports
    whose ids differ (cracks use id 1 under an unused super-category id 0) need no per-id table.
    Raises CocoError for unreadable/invalid JSON or a missing ``images`` list; smaller faults
    (bad image records, annotations pointing at unknown images) become Problems.
    """
    path = Path(json_path)
    name = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CocoError(f"{name}: annotations file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoError(f"{name}: invalid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoError(f"{name}: not a COCO file (no 'images' list)")
    raw_annotations = data.get("annotations", [])
    if not isinstance(raw_annotations, list):
        raise CocoError(f"{name}: 'annotations' must be a list")

    problems: list[Problem] = []
    category_names = {
        c["id"]: str(c.get("name", c["id"]))
        for c in data.get("categories", [])
        if isinstance(c, dict) and "id" in c
    }
    keep = {cid for cid, cname in category_names.items() if not categories or cname in categories}

    images: dict[int, ImageEntry] = {}
    seen_names: set[str] = set()
    for rec in data["images"]:
        if not isinstance(rec, dict):
            problems.append(Problem(name, "bad_image_record", f"image record is not an object: {rec!r:.80}"))
            continue
        image_id, file_name = rec.get("id"), rec.get("file_name")
        width, height = _as_int(rec.get("width")), _as_int(rec.get("height"))
        if image_id is None or not isinstance(file_name, str) or not file_name:
            problems.append(Problem(name, "bad_image_record", f"image record without id/file_name: {rec!r:.80}"))
            continue
        if not width or not height or width <= 0 or height <= 0:
            problems.append(Problem(f"{name}:{file_name}", "bad_image_record", "image record has no valid width/height"))
            continue
        if image_id in images or file_name in seen_names:
            problems.append(Problem(f"{name}:{file_name}", "duplicate_image", f"duplicate image id {image_id} or file name"))
            continue
        seen_names.add(file_name)
        images[image_id] = ImageEntry(image_id, file_name, width, height)

    unknown = 0
    for ann in raw_annotations:
        if not isinstance(ann, dict):
            problems.append(Problem(name, "bad_annotation", f"annotation is not an object: {ann!r:.80}"))
            continue
        if ann.get("image_id") not in images:
            unknown += 1
            continue
        if categories and ann.get("category_id") not in keep:
            continue
        images[ann["image_id"]].annotations.append(ann)
    if unknown:
        problems.append(
            Problem(name, "unknown_image", f"{unknown} annotation(s) point at image ids not in 'images'")
        )
    return CocoExport(path, list(images.values()), problems, category_names)


def _clean_ring(ring, where: str, problems: list[Problem]) -> list[float] | None:
    """A polygon ring as a flat float list with >= 3 finite points, or None (with a Problem)."""
    if not isinstance(ring, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in ring
    ):
        problems.append(Problem(where, "bad_polygon", "polygon ring holds non-numbers; dropped"))
        return None
    coords = [float(v) for v in ring]
    if len(coords) % 2:
        problems.append(Problem(where, "odd_polygon", f"odd-length polygon ({len(coords)} numbers); last dropped", True))
        coords = coords[:-1]
    points = [(x, y) for x, y in zip(coords[0::2], coords[1::2])]
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if len(finite) != len(points):
        problems.append(
            Problem(where, "nonfinite_polygon", f"{len(points) - len(finite)} non-finite point(s) dropped", True)
        )
    if len(finite) < 3:
        problems.append(Problem(where, "degenerate_polygon", f"polygon ring with {len(finite)} point(s) dropped"))
        return None
    return [v for point in finite for v in point]


def _bbox_rle(bbox, height: int, width: int, where: str, problems: list[Problem]):
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        or bbox[2] <= 0
        or bbox[3] <= 0
    ):
        problems.append(Problem(where, "bad_bbox", f"no usable segmentation and invalid bbox {bbox!r}; skipped"))
        return None
    return mask_utils.frPyObjects(np.array([bbox], dtype=np.float64), height, width)[0]


def annotation_rle(ann: dict, height: int, width: int, where: str, problems: list[Problem]):
    """One annotation -> (pycocotools RLE or None, source) where source is polygon|rle|bbox|none."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if list(size or []) != [height, width]:
            problems.append(Problem(where, "rle_size", f"RLE size {size} differs from image {height}x{width}"))
            return None, "none"
        if isinstance(counts, list):
            return mask_utils.frPyObjects(seg, height, width), "rle"
        if isinstance(counts, (str, bytes)):
            return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}, "rle"
        problems.append(Problem(where, "bad_rle", "RLE without usable counts"))
        return None, "none"
    rings = []
    if isinstance(seg, list) and seg:
        # A flat list of numbers is one ring written without the outer list.
        seg = [seg] if all(isinstance(v, (int, float)) for v in seg) else seg
        rings = [r for r in (_clean_ring(ring, where, problems) for ring in seg) if r is not None]
    elif seg not in (None, []):
        problems.append(Problem(where, "bad_segmentation", f"unsupported segmentation {type(seg).__name__}"))
    if rings:
        # pycocotools reads a 4-number first ring as a box, so rings are encoded one by one.
        rles = [mask_utils.frPyObjects([ring], height, width)[0] for ring in rings]
        return mask_utils.merge(rles) if len(rles) > 1 else rles[0], "polygon"
    if isinstance(seg, list) and seg:
        problems.append(Problem(where, "bbox_fallback", "no usable polygon ring; using the bbox", True))
    rle = _bbox_rle(ann.get("bbox"), height, width, where, problems)
    return rle, ("bbox" if rle is not None else "none")


def rasterize(
    annotations: list[dict], height: int, width: int, where: str = ""
) -> tuple[np.ndarray, Counter, list[Problem]]:
    """Union of the annotations as a (height, width) bool mask.

    Returns (mask, sources, problems): sources counts the annotations used per kind
    (polygon | rle | bbox); skipped annotations are not counted and have a Problem.
    """
    problems: list[Problem] = []
    rles, sources = [], Counter()
    for ann in annotations:
        rle, source = annotation_rle(ann, height, width, f"{where} (annotation {ann.get('id')})", problems)
        if rle is not None:
            rles.append(rle)
            sources[source] += 1
    if not rles:
        return np.zeros((height, width), dtype=bool), sources, problems
    merged = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    return mask_utils.decode(merged).astype(bool), sources, problems


def mask_source(sources: Counter) -> str:
    """One word for a mask's origin: none, polygon, rle, bbox, or mixed."""
    used = [kind for kind, n in sources.items() if n]
    return "none" if not used else used[0] if len(used) == 1 else "mixed"
