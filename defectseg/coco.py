"""COCO exports -> exact binary masks.

A mask is the union of all of an image's annotations, rasterized the way the COCO reference
(pycocotools) does it:

- polygons with any number of rings (``segmentation: [[x0, y0, x1, y1, ...], ...]``);
- RLE, compressed (``counts`` a string) or uncompressed (``counts`` a list, ``iscrowd: 1``);
- an annotation whose ``segmentation`` is empty (or has no usable ring) falls back to its ``bbox``,
  rasterized as the box polygon, as pycocotools does for boxes;
- coordinates outside the image are clipped by the rasterizer (the part inside is kept exactly). A ring
  or box reaching further than one image size (its larger side) past the image is dropped and reported:
  no real export has one, and pycocotools crashes on coordinates of 1e9 or more.

Real exports are messy, so every annotation is checked first. What can be repaired is repaired and
reported (odd-length rings lose their last number, non-finite points are dropped, degenerate rings
are dropped); what cannot is skipped and reported. ``Problem`` records carry the file and the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .io import read_json

ANNOTATIONS_FILE = "_annotations.coco.json"
# Largest image (width * height) whose mask is made: the most pixels the image reader (PIL) accepts
# before calling a file a decompression bomb. pycocotools overflows (segfaults) from 2**32 pixels on.
MAX_IMAGE_PIXELS = 178_956_970


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


def _number(value) -> float | None:
    """A JSON number as a finite float; None for non-numbers, booleans, NaN/inf and ints too big for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _as_int(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _is_id(value) -> bool:
    """Whether a JSON value can be an image or category id (a number or a string, not a list/object)."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def load_coco(json_path: str | Path, categories: tuple[str, ...] = ()) -> CocoExport:
    """Read and check a COCO annotations file.

    categories: category names to keep (empty: keep all). Categories are matched by name, so exports
    whose ids differ need no per-id table. A named category that holds no annotation keeps the categories
    whose ``supercategory`` it is instead: Roboflow lists the project as an unused category id 0
    ("crack") and puts every annotation under its children (id 1 "NewCracks - v2 ...", supercategory
    "crack"), so "crack" keeps them; a class named like its project keeps only itself.
    Raises CocoError for an unreadable file, invalid JSON or a missing ``images`` list; smaller faults
    (bad or duplicate image records, annotations pointing at unknown images, no images at all, ``categories``
    of which the export has none) become Problems.
    """
    path = Path(json_path)
    name = str(path)
    data = _read_coco_json(path)
    raw_annotations = data.get("annotations", [])

    problems: list[Problem] = []
    raw_categories = data.get("categories", [])
    category_records = [c for c in (raw_categories if isinstance(raw_categories, list) else [])
                        if isinstance(c, dict) and _is_id(c.get("id"))]
    category_names = {c["id"]: str(c.get("name", c["id"])) for c in category_records}
    keep = {cid for cid, cname in category_names.items() if not categories or cname in categories}
    used = Counter(a.get("category_id") for a in raw_annotations if isinstance(a, dict) and _is_id(a.get("category_id")))
    # A name that holds no annotation (Roboflow's unused project category) keeps its children instead.
    idle = {n for n in categories if not any(used[cid] for cid, cname in category_names.items() if cname == n)}
    keep |= {c["id"] for c in category_records if c.get("supercategory") in idle}
    if categories and not keep:
        present = ", ".join(sorted(set(category_names.values()))[:20]) or "none"
        problems.append(Problem(name, "unknown_category", f"none of the task's categories "
                                f"({', '.join(categories)}) is in this export, it has: {present}; every "
                                "annotation is left out, so every mask of this split is empty"))

    records, skipped_ids = _image_records(data["images"], name, problems)
    images = _unique_images(records, name, problems, skipped_ids)

    unknown, kept, dropped = 0, 0, Counter()
    for ann in raw_annotations:
        if not isinstance(ann, dict):
            problems.append(Problem(name, "bad_annotation", f"annotation is not an object: {ann!r:.80}"))
            continue
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        bad = [f"{key} {value!r:.40}" for key, value in (("image_id", image_id), ("category_id", category_id))
               if not _is_id(value) and not (key == "category_id" and value is None)]
        if bad:
            problems.append(Problem(f"{name} (annotation {ann.get('id')!r:.40})", "bad_annotation",
                                    f"{' and '.join(bad)}: an id must be a number or a string"))
            continue
        if image_id not in images:
            unknown += image_id not in skipped_ids
            continue
        if categories and category_id not in keep:
            dropped[category_names.get(category_id, str(category_id))] += 1
            continue
        images[image_id].annotations.append(ann)
        kept += 1
    if keep and dropped and not kept:
        under = ", ".join(f"{n} ({k})" for n, k in dropped.most_common(5))
        problems.append(Problem(name, "unknown_category", f"the task's categories ({', '.join(categories)}) hold "
                                f"none of this export's annotations, which are under: {under}; every mask of "
                                "this split is empty"))
    if unknown:
        problems.append(
            Problem(name, "unknown_image", f"{unknown} annotation(s) point at image ids not in 'images'")
        )
    if not images:
        what = "no usable image record" if data["images"] else "an empty 'images' list"
        problems.append(Problem(name, "no_images", f"{what}: this split gives no masks"))
    return CocoExport(path, list(images.values()), problems, category_names)


def _read_coco_json(path: Path) -> dict:
    """The parsed annotations file, checked to be an object with an ``images`` list (and an
    ``annotations`` list when present). Raises CocoError naming the file."""
    name = str(path)
    data = read_json(path, "annotations file", CocoError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoError(f"{name}: not a COCO file (no 'images' list)")
    if not isinstance(data.get("annotations", []), list):
        raise CocoError(f"{name}: 'annotations' must be a list")
    return data


def _image_records(raw: list, name: str, problems: list[Problem]) -> tuple[list[ImageEntry], set]:
    """The usable image records, and the ids of records skipped for their size (their annotations go with
    them, unreported); every other fault becomes a Problem."""
    records: list[ImageEntry] = []
    skipped_ids: set = set()
    for rec in raw:
        if not isinstance(rec, dict):
            problems.append(Problem(name, "bad_image_record", f"image record is not an object: {rec!r:.80}"))
            continue
        image_id, file_name = rec.get("id"), rec.get("file_name")
        width, height = _as_int(rec.get("width")), _as_int(rec.get("height"))
        if not _is_id(image_id) or not isinstance(file_name, str) or not file_name:
            problems.append(Problem(name, "bad_image_record", f"image record without id/file_name: {rec!r:.80}"))
            continue
        if not width or not height or width <= 0 or height <= 0:
            skipped_ids.add(image_id)
            problems.append(Problem(f"{name}:{file_name}", "bad_image_record", "image record has no valid width/height"))
            continue
        if width * height > MAX_IMAGE_PIXELS:
            skipped_ids.add(image_id)
            problems.append(Problem(f"{name}:{file_name}", "bad_image_record", f"image record says {width}x{height}, "
                                    f"over the limit of {MAX_IMAGE_PIXELS:,} pixels"))
            continue
        records.append(ImageEntry(image_id, file_name, width, height))
    return records, skipped_ids


def _unique_images(records: list[ImageEntry], name: str, problems: list[Problem], skipped_ids: set) -> dict:
    """The image records by id, each id and file name once. An id shared by records of different files
    is ambiguous (its annotations could be either's): every record of it is skipped, each with a Problem,
    and its id added to ``skipped_ids``. A record repeating an earlier one's file is skipped with a Problem
    (its annotations, under the earlier id or another, are not used twice)."""
    files_of: dict = {}
    for rec in records:
        files_of.setdefault(rec.id, set()).add(rec.file_name)
    images: dict = {}
    seen_names: set[str] = set()
    for rec in records:
        where = f"{name}:{rec.file_name}"
        if len(files_of[rec.id]) > 1:
            skipped_ids.add(rec.id)
            others = ", ".join(sorted(files_of[rec.id] - {rec.file_name}))
            problems.append(Problem(where, "duplicate_image", f"image id {rec.id!r} is also that of "
                                    f"{others}, so its annotations cannot be told apart; none of these made"))
        elif rec.id in images or rec.file_name in seen_names:
            problems.append(Problem(where, "duplicate_image", f"duplicate image id {rec.id!r} or file name"))
        else:
            seen_names.add(rec.file_name)
            images[rec.id] = rec
    return images


def _float_or_inf(value: int | float) -> float:
    """float(value), with ints too big for a float as infinity (then dropped as a non-finite point)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _clean_ring(ring, where: str, problems: list[Problem]) -> list[float] | None:
    """A polygon ring as a flat float list with >= 3 finite points, or None (with a Problem)."""
    if not isinstance(ring, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in ring
    ):
        problems.append(Problem(where, "bad_polygon", "polygon ring holds non-numbers; dropped"))
        return None
    coords = [_float_or_inf(v) for v in ring]
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


def _usable_ring(ring, height: int, width: int, where: str, problems: list[Problem]) -> list[float] | None:
    """``_clean_ring``, and None (with a Problem) for a ring reaching far past the picture."""
    coords = _clean_ring(ring, where, problems)
    if coords is not None and _too_far(coords[0::2], coords[1::2], height, width):
        problems.append(Problem(where, "far_outside", "polygon ring reaches more than one image size past the "
                                "picture; dropped"))
        return None
    return coords


def _too_far(xs: list[float], ys: list[float], height: int, width: int) -> bool:
    """Whether any point lies more than one image size (its larger side) past the picture."""
    margin = max(height, width)
    return min(xs) < -margin or max(xs) > width + margin or min(ys) < -margin or max(ys) > height + margin


def _bbox_rle(bbox, height: int, width: int, where: str, problems: list[Problem]):
    values = [_number(v) for v in bbox] if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else [None]
    if None in values or values[2] <= 0 or values[3] <= 0 or _too_far(
            [values[0], values[0] + values[2]], [values[1], values[1] + values[3]], height, width):
        problems.append(Problem(where, "bad_bbox", f"no usable segmentation and invalid bbox {bbox!r:.80} (empty, "
                                "or reaching more than one image size past the picture); skipped"))
        return None
    x, y, w, h = values
    return mask_utils.frPyObjects(np.array([[x, y, w, h]], dtype=np.float64), height, width)[0]


def _rle_string_counts(text: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string, decoded as pycocotools' ``rleFrString`` does, or
    None when the string is not one it could have written (pycocotools would read past its end or
    overflow, and then fail or return garbage)."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text) or shift > 25:  # cut off mid-number, or more bits than any count needs
                return None
            code = ord(text[pos]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def _checked_rle(seg: dict, height: int, width: int, where: str, problems: list[Problem]):
    """A pycocotools RLE for a COCO RLE segmentation, or None (with a Problem) when it is malformed."""
    size, counts = seg.get("size"), seg.get("counts")
    dims = [_as_int(v) for v in size] if isinstance(size, (list, tuple)) and len(size) == 2 else None
    if dims is None or None in dims:
        problems.append(Problem(where, "bad_rle", f"RLE size {size!r:.40} is not [height, width]"))
        return None
    if dims != [height, width]:
        problems.append(Problem(where, "rle_size", f"RLE size {size} differs from image {height}x{width}"))
        return None
    if isinstance(counts, list):
        runs = [_as_int(v) for v in counts]
        if any(v is None or v < 0 for v in runs):
            problems.append(Problem(where, "bad_rle", "RLE counts hold something other than non-negative integers"))
            return None
    elif isinstance(counts, str):
        runs = _rle_string_counts(counts)
        if runs is None:
            problems.append(Problem(where, "bad_rle", f"RLE counts string {counts!r:.40} is not valid COCO RLE"))
            return None
    else:
        problems.append(Problem(where, "bad_rle", "RLE without usable counts"))
        return None
    if sum(runs) != height * width:
        problems.append(Problem(where, "bad_rle", f"RLE counts cover {sum(runs)} pixels, the image has "
                                f"{height}x{width} = {height * width}"))
        return None
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    return mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)


def annotation_rle(ann: dict, height: int, width: int, where: str, problems: list[Problem]):
    """One annotation -> (pycocotools RLE or None, source) where source is polygon|rle|bbox|none."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        rle = _checked_rle(seg, height, width, where, problems)
        return rle, ("rle" if rle is not None else "none")
    rings = []
    if isinstance(seg, list) and seg:
        # A flat list of numbers is one ring written without the outer list.
        seg = [seg] if all(isinstance(v, (int, float)) for v in seg) else seg
        rings = [r for r in (_usable_ring(ring, height, width, where, problems) for ring in seg) if r is not None]
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
    (polygon | rle | bbox); skipped annotations are not counted and have a Problem. Raises CocoError
    for a size over MAX_IMAGE_PIXELS (``load_coco`` already skips such image records).
    """
    if height * width > MAX_IMAGE_PIXELS or height <= 0 or width <= 0:
        raise CocoError(f"{where}: cannot make a {width}x{height} mask (limit {MAX_IMAGE_PIXELS:,} pixels)")
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
