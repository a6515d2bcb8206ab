"""COCO rasterization: hand-computed masks for every segmentation form and every repairable fault."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from defectseg.coco import CocoError, load_coco, mask_source, rasterize, source_stem

H, W = 8, 8


def square(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0..r1-1, cols c0..c1-1 set: what pycocotools fills for the polygon (c0,r0)-(c1,r1)."""
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def ann(segmentation, bbox=(0, 0, 1, 1), **extra) -> dict:
    return {"id": 1, "image_id": 0, "category_id": 1, "segmentation": segmentation, "bbox": list(bbox), **extra}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


@pytest.mark.parametrize(
    "annotations, expected, source",
    [
        pytest.param([ann([[1, 1, 5, 1, 5, 5, 1, 5]])], square(1, 5, 1, 5), "polygon", id="polygon"),
        pytest.param(
            [ann([[0, 0, 2, 0, 2, 2, 0, 2], [4, 4, 7, 4, 7, 6, 4, 6]])],
            square(0, 2, 0, 2) | square(4, 6, 4, 7), "polygon", id="two-rings",
        ),
        pytest.param(
            [ann([[0, 0, 2, 0, 2, 2, 0, 2]]), ann([[1, 1, 3, 1, 3, 3, 1, 3]])],
            square(0, 2, 0, 2) | square(1, 3, 1, 3), "polygon", id="union-of-annotations",
        ),
        pytest.param([ann([], bbox=(1, 2, 3, 4))], square(2, 6, 1, 4), "bbox", id="empty-segmentation-uses-bbox"),
        pytest.param([ann([[-2, -2, 3, -2, 3, 3, -2, 3]])], square(0, 3, 0, 3), "polygon", id="clipped-at-edge"),
        pytest.param([ann([], bbox=(6, 6, 5, 5))], square(6, 8, 6, 8), "bbox", id="bbox-past-edge"),
        pytest.param(
            [ann(uncompressed_rle(square(2, 5, 3, 6)), iscrowd=1)], square(2, 5, 3, 6), "rle", id="rle-uncompressed"
        ),
        pytest.param([], np.zeros((H, W), bool), "none", id="no-annotations"),
        pytest.param(
            [ann([[1, 1, 5, 1, 5, 5, 1, 5]]), ann([], bbox=(6, 0, 2, 2))],
            square(1, 5, 1, 5) | square(0, 2, 6, 8), "mixed", id="polygon-and-box",
        ),
    ],
)
def test_rasterize_hand_computed(annotations, expected, source):
    mask, sources, problems = rasterize(annotations, H, W)
    assert mask.dtype == bool and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, expected)
    assert mask_source(sources) == source
    assert problems == []


def test_rle_compressed_string():
    rle = mask_utils.encode(np.asfortranarray(square(1, 4, 2, 7).astype(np.uint8)))
    seg = {"size": [H, W], "counts": rle["counts"].decode()}
    mask, _, problems = rasterize([ann(seg, iscrowd=1)], H, W)
    np.testing.assert_array_equal(mask, square(1, 4, 2, 7))
    assert problems == []


@pytest.mark.parametrize(
    "segmentation, bbox, expected, kinds",
    [
        pytest.param([[1, 1, 5, 1, 5, 5, 1, 5, 3]], (0, 0, 1, 1), square(1, 5, 1, 5), {"odd_polygon"}, id="odd-length"),
        pytest.param(
            [[1, 1, 5, 1, float("nan"), 3, 5, 5, 1, 5]], (0, 0, 1, 1), square(1, 5, 1, 5), {"nonfinite_polygon"},
            id="nan-point",
        ),
        pytest.param(
            [[1, 1, 5, 5]], (2, 2, 2, 2), square(2, 4, 2, 4), {"degenerate_polygon", "bbox_fallback"},
            id="two-point-ring-falls-back-to-bbox",
        ),
        pytest.param(
            [[0, 0, 2, 0, 2, 2, 0, 2], [3, 3, 4, 4]], (0, 0, 1, 1), square(0, 2, 0, 2), {"degenerate_polygon"},
            id="degenerate-second-ring-dropped",
        ),
    ],
)
def test_repairs_are_reported(segmentation, bbox, expected, kinds):
    mask, _, problems = rasterize([ann(segmentation, bbox=bbox)], H, W, where="x.jpg")
    np.testing.assert_array_equal(mask, expected)
    assert {p.kind for p in problems} == kinds
    assert all("x.jpg" in p.file for p in problems)


@pytest.mark.parametrize("bbox", [(0, 0, 0, 3), (1, 1, float("nan"), 2), (1, 2), "box"])
def test_unusable_annotation_is_skipped(bbox):
    mask, sources, problems = rasterize([ann([], bbox=bbox)], H, W, where="y.jpg")
    assert not mask.any() and mask_source(sources) == "none"
    assert [p.kind for p in problems] == ["bad_bbox"] and not problems[0].repaired


def test_rle_with_wrong_size_is_skipped():
    seg = uncompressed_rle(square(0, 2, 0, 2))
    seg["size"] = [4, 4]
    mask, _, problems = rasterize([ann(seg, iscrowd=1)], H, W)
    assert not mask.any() and problems[0].kind == "rle_size"


def test_load_coco_maps_categories_by_name_and_reports_unknown_images(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]},
            {"id": 2, "image_id": 7, "category_id": 0, "segmentation": [], "bbox": [4, 4, 2, 2]},
            {"id": 3, "image_id": 99, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]},
        ],
        "categories": [{"id": 0, "name": "crack"}, {"id": 1, "name": "NewCracks - v2"}],
    }
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    every = load_coco(path)
    assert [len(e.annotations) for e in every.images] == [2]
    assert [p.kind for p in every.problems] == ["unknown_image"] and str(path) in every.problems[0].file
    only = load_coco(path, categories=("NewCracks - v2",))
    assert [a["id"] for a in only.images[0].annotations] == [1]


@pytest.mark.parametrize(
    "text, message",
    [("{not json", "invalid JSON"), ("[1, 2]", "no 'images' list"), ('{"images": [], "annotations": 3}', "must be a list")],
)
def test_load_coco_unrecoverable(tmp_path, text, message):
    path = tmp_path / "_annotations.coco.json"
    path.write_text(text)
    with pytest.raises(CocoError, match=message) as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_load_coco_bad_image_records(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 8},
                       {"id": 2, "file_name": "b.jpg", "width": 8, "height": 8},
                       {"id": 2, "file_name": "c.jpg", "width": 8, "height": 8}], "annotations": []}
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    export = load_coco(path)
    assert [e.file_name for e in export.images] == ["b.jpg"]
    assert sorted(p.kind for p in export.problems) == ["bad_image_record", "duplicate_image"]


def test_source_stem():
    assert source_stem("00002_jpg.rf.8e62.jpg") == "00002_jpg"
    assert source_stem("plain.png") == "plain"
