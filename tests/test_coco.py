"""COCO rasterization: hand-computed masks for every segmentation form and every repairable fault."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
                       {"id": 3, "file_name": "b.jpg", "width": 8, "height": 8}], "annotations": []}
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    export = load_coco(path)
    assert [e.file_name for e in export.images] == ["b.jpg"]
    assert sorted(p.kind for p in export.problems) == ["bad_image_record", "duplicate_image"]


def test_duplicate_image_id_skips_every_record_of_it(tmp_path):
    """Two files under one id: which annotation is whose cannot be known, so neither image is made (the
    first used to get the second's annotations too). A record repeated whole is skipped once."""
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8},
                       {"id": 2, "file_name": "b.jpg", "width": 8, "height": 8},
                       {"id": 2, "file_name": "c.jpg", "width": 8, "height": 8},
                       {"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [{"id": i, "image_id": image_id, "category_id": 1, "segmentation": [],
                             "bbox": [0, 0, 2, 2]} for i, image_id in ((10, 1), (11, 2), (12, 2))]}
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    export = load_coco(path)
    assert [(e.file_name, [a["id"] for a in e.annotations]) for e in export.images] == [("a.jpg", [10])]
    problems = sorted((p.file.replace(str(path), "J"), p.kind, p.repaired) for p in export.problems)
    assert problems == [("J:a.jpg", "duplicate_image", False), ("J:b.jpg", "duplicate_image", False),
                        ("J:c.jpg", "duplicate_image", False)]  # id 2's annotations are not "unknown"
    assert "also that of c.jpg" in next(p.message for p in export.problems if p.file.endswith("b.jpg"))


def test_task_categories_missing_from_the_export_are_a_problem(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]}],
            "categories": [{"id": 0, "name": "crack"}, {"id": 1, "name": "NewCracks"}]}
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    export = load_coco(path, categories=("cracks", "fissure"))
    assert export.images[0].annotations == []
    (problem,) = export.problems
    assert (problem.file, problem.kind, problem.repaired) == (str(path), "unknown_category", False)
    assert "(cracks, fissure)" in problem.message and "it has: NewCracks, crack" in problem.message
    assert load_coco(path, categories=("fissure", "NewCracks")).problems == []  # one name found is enough


def one_image_per_category(tmp_path: Path, categories: list[tuple[str, str]]) -> Path:
    """An export of one image whose annotation i (i >= 1) is of category i; category 0 holds none."""
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [{"id": i, "image_id": 1, "category_id": i, "segmentation": [], "bbox": [0, 0, 2, 2]}
                            for i in range(1, len(categories))],
            "categories": [{"id": i, "name": name, "supercategory": parent}
                           for i, (name, parent) in enumerate(categories)]}
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("names, kept", [(("crack",), [1]), (("NewCracks - v2",), [1]), (("crack", "stain"), [1, 2]),
                                         (("stain",), [2])])
def test_a_category_keeps_the_categories_it_is_the_supercategory_of(tmp_path, names, kept):
    """Roboflow's layout (both real exports): the project is an unused category id 0 ("crack") and every
    annotation sits under its child id 1, whose supercategory is "crack". Naming the project keeps them;
    it used to keep nothing, silently."""
    path = one_image_per_category(tmp_path, [("crack", "none"), ("NewCracks - v2", "crack"), ("stain", "none")])
    export = load_coco(path, categories=names)
    assert [a["id"] for a in export.images[0].annotations] == kept and export.problems == []


def test_a_class_named_like_its_project_keeps_only_itself(tmp_path):
    """Roboflow gives every class its project's name as supercategory: a project "crack" with classes
    "crack" and "spalling". The class "crack" holds annotations, so it does not pull in spalling."""
    path = one_image_per_category(tmp_path, [("cracks-project", "none"), ("crack", "cracks-project"),
                                             ("spalling", "cracks-project")])
    assert [a["id"] for a in load_coco(path, categories=("crack",)).images[0].annotations] == [1]
    assert [a["id"] for a in load_coco(path, categories=("cracks-project",)).images[0].annotations] == [1, 2]


def test_task_categories_that_hold_no_annotation_are_a_problem(tmp_path):
    """The names exist but every annotation is under other categories: each mask would be empty."""
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [{"id": i, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]}
                            for i in (1, 2)],
            "categories": [{"id": 0, "name": "Drywall-Join"}, {"id": 1, "name": "drywall-join"}]}
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    export = load_coco(path, categories=("Drywall-Join",))
    assert export.images[0].annotations == []
    (problem,) = export.problems
    assert (problem.file, problem.kind) == (str(path), "unknown_category")
    assert "(Drywall-Join) hold none" in problem.message and "under: drywall-join (2)" in problem.message


def test_source_stem():
    assert source_stem("00002_jpg.rf.8e62.jpg") == "00002_jpg"
    assert source_stem("plain.png") == "plain"


# --- Absurd coordinates: a ring or box reaching more than one image size past the picture is dropped, never
# handed to pycocotools (which crashes on coordinates of 1e9)


@pytest.mark.parametrize(
    "segmentation, bbox, expected, source, kinds",
    [
        pytest.param([[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]], (0, 0, 8, 8), square(0, 8, 0, 8), "bbox",
                     {"far_outside", "bbox_fallback"}, id="polygon-to-1e9-falls-back-to-its-bbox"),
        pytest.param([[2, 2, 6, 2, 6, 6, 2, 6], [-1e12, -1e12, 3, -1e12, 3, 3]], (0, 0, 1, 1), square(2, 6, 2, 6),
                     "polygon", {"far_outside"}, id="far-ring-dropped-others-kept"),
        pytest.param([[1, 1, 5, 1, 5, 5, 1, 5, 10**400, 3]], (0, 0, 1, 1), square(1, 5, 1, 5), "polygon",
                     {"nonfinite_polygon"}, id="int-too-big-for-a-float-dropped"),
        pytest.param([], (-1e300, 2, 1e308, 3), np.zeros((H, W), bool), "none", {"bad_bbox"}, id="bbox-1e300"),
        pytest.param([], (1, 1, 10**400, 2), np.zeros((H, W), bool), "none", {"bad_bbox"}, id="bbox-int-overflow"),
    ],
)
def test_absurd_coordinates_are_dropped(segmentation, bbox, expected, source, kinds):
    mask, sources, problems = rasterize([ann(segmentation, bbox=bbox)], H, W, where="far.jpg")
    np.testing.assert_array_equal(mask, expected)
    assert mask_source(sources) == source
    assert {p.kind for p in problems} == kinds


def test_coordinates_within_one_image_size_are_rasterized_by_pycocotools_unchanged():
    """Dropping only starts one image size (the larger side) past the picture, so anything nearer gives
    pycocotools' own mask bit for bit, slanted edges included."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        m = max(h, w)
        k = int(rng.integers(3, 9))
        ring = np.stack([rng.uniform(-m, w + m, k), rng.uniform(-m, h + m, k)], 1).round(2).ravel().tolist()
        reference = mask_utils.decode(mask_utils.frPyObjects([ring], h, w)[0]).astype(bool)
        mask, _, problems = rasterize([ann([ring])], h, w)
        np.testing.assert_array_equal(mask, reference)
        assert problems == []


def test_rasterize_refuses_a_gigantic_mask():
    with pytest.raises(CocoError, match="200000x200000"):
        rasterize([], 200_000, 200_000, where="huge.jpg")


# --- Malformed RLE: a Problem for that annotation, never a traceback or garbage pixels


@pytest.mark.parametrize(
    "segmentation, message",
    [
        pytest.param({"size": [H, W], "counts": "\x00\xff garbage!!"}, "not valid COCO RLE", id="garbage-string"),
        pytest.param({"size": [H, W], "counts": "zzzz"}, "not valid COCO RLE", id="out-of-range-characters"),
        pytest.param({"size": [H, W], "counts": "0P"}, "not valid COCO RLE", id="cut-off-mid-number"),
        pytest.param({"size": [H, W], "counts": "0PPPPPP1"}, "not valid COCO RLE", id="number-too-long"),
        pytest.param({"size": [H, W], "counts": "0@"}, "not valid COCO RLE", id="negative-run"),
        pytest.param({"size": [H, W], "counts": "00"}, "cover 0 pixels", id="string-too-short"),
        pytest.param({"size": 5, "counts": "abc"}, "is not [height, width]", id="size-is-a-number"),
        pytest.param({"size": ["8", 8], "counts": [64]}, "is not [height, width]", id="size-of-strings"),
        pytest.param({"size": [H, W], "counts": [5, 3]}, "cover 8 pixels", id="list-sums-short"),
        pytest.param({"size": [H, W], "counts": [60, 10]}, "cover 70 pixels", id="list-sums-long"),
        pytest.param({"size": [H, W], "counts": [-5, 69]}, "non-negative integers", id="negative-count"),
        pytest.param({"size": [H, W], "counts": [1.5, 62.5]}, "non-negative integers", id="fractional-count"),
        pytest.param({"size": [H, W], "counts": ["a"]}, "non-negative integers", id="string-in-list"),
        pytest.param({"size": [H, W]}, "without usable counts", id="no-counts"),
    ],
)
def test_malformed_rle_is_a_problem(segmentation, message):
    good = ann([[1, 1, 5, 1, 5, 5, 1, 5]])
    bad = dict(ann(segmentation, iscrowd=1), id=7)
    mask, sources, problems = rasterize([good, bad], H, W, where="rle.jpg")
    np.testing.assert_array_equal(mask, square(1, 5, 1, 5))  # the good annotation still counts
    assert sources == {"polygon": 1}
    (problem,) = problems
    assert problem.kind == "bad_rle" and not problem.repaired and message in problem.message
    assert problem.file == "rle.jpg (annotation 7)"


def test_compressed_rle_strings_decode_like_pycocotools():
    rng = np.random.default_rng(1)
    for h, w, p in [(H, W, 0.5), (37, 53, 0.1), (37, 53, 0.97), (300, 200, 0.5), (5, 5, 0.0), (5, 5, 1.0)]:
        truth = rng.random((h, w)) < p
        counts = mask_utils.encode(np.asfortranarray(truth.astype(np.uint8)))["counts"].decode()
        mask, _, problems = rasterize([ann({"size": [h, w], "counts": counts}, iscrowd=1)], h, w)
        np.testing.assert_array_equal(mask, truth)
        assert problems == []


# --- load_coco on malformed files and records


def test_load_coco_annotations_file_is_a_folder(tmp_path):
    path = tmp_path / "_annotations.coco.json"
    path.mkdir()
    with pytest.raises(CocoError, match="is a folder") as err:
        load_coco(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", ['{"images": [' + "1" * 5000 + "]}", "[" * 100_000 + "]" * 100_000])
def test_load_coco_json_python_cannot_parse(tmp_path, text):
    """A 5000-digit number (over Python's int digit limit, 3.11+) or nesting deeper than the parser's stack."""
    if text.startswith('{"images"') and not hasattr(sys, "get_int_max_str_digits"):
        pytest.skip("this Python has no int digit limit")
    path = tmp_path / "_annotations.coco.json"
    path.write_text(text)
    with pytest.raises(CocoError, match="invalid JSON"):
        load_coco(path)


def test_load_coco_bad_ids_and_sizes(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8},
                   {"id": [2], "file_name": "b.jpg", "width": 8, "height": 8},
                   {"id": 3, "file_name": "c.jpg", "width": 200_000, "height": 200_000},
                   {"id": 4, "file_name": "d.jpg", "width": 10**400, "height": 8}],
        "annotations": [
            {"id": 10, "image_id": [1], "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]},
            {"id": 11, "image_id": 1, "category_id": {"x": 1}, "segmentation": [], "bbox": [0, 0, 2, 2]},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]},
            {"id": 13, "image_id": 3, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]},  # goes with c.jpg
        ],
        "categories": [{"id": [1], "name": "list id"}, {"id": 1, "name": "crack"}],
    }
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    export = load_coco(path, categories=("crack",))
    assert [(e.file_name, [a["id"] for a in e.annotations]) for e in export.images] == [("a.jpg", [12])]
    assert export.categories == {1: "crack"}
    problems = {(p.kind, p.file.replace(str(path), "J")) for p in export.problems}
    assert problems == {("bad_image_record", "J"), ("bad_image_record", "J:c.jpg"), ("bad_image_record", "J:d.jpg"),
                        ("bad_annotation", "J (annotation 10)"), ("bad_annotation", "J (annotation 11)")}
    assert any("over the limit" in p.message for p in export.problems)


@pytest.mark.parametrize("images", [[], [{"id": 1, "file_name": "a.jpg"}]])
def test_load_coco_without_images_is_a_problem(tmp_path, images):
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps({"images": images, "annotations": []}))
    export = load_coco(path)
    assert export.images == [] and "no_images" in [p.kind for p in export.problems]
