"""preprocess_masks.py end to end: real sample, pycocotools agreement, re-runs, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, write_export, write_image
from pycocotools.coco import COCO

import preprocess_masks
from defectseg.io import apply_orientation
from defectseg.manifest import MANIFEST_COLUMNS, read_manifest
from defectseg.tasks import DEFAULT_TASKS


def run(*argv: str) -> int:
    return preprocess_masks.main(preprocess_masks.build_parser().parse_args(list(argv)))


def read_png(path: str | Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, path
    return arr


def reference_mask(coco: COCO, file_name: str) -> np.ndarray:
    """The COCO reference: pycocotools' annToMask per annotation, the bbox for empty segmentations."""
    from pycocotools import mask as mask_utils

    image = next(im for im in coco.dataset["images"] if im["file_name"] == file_name)
    out = np.zeros((image["height"], image["width"]), dtype=bool)
    for ann in coco.imgToAnns[image["id"]]:
        if ann["segmentation"]:
            out |= coco.annToMask(ann).astype(bool)
        else:
            rle = mask_utils.frPyObjects(np.array([ann["bbox"]], dtype=float), image["height"], image["width"])
            out |= mask_utils.decode(rle)[:, :, 0].astype(bool)
    return out


def assert_matches_pycocotools(out: Path, splits: list[str]) -> int:
    checked = 0
    for split in splits:
        rows = read_manifest(out / split / "manifest.csv")
        for task in DEFAULT_TASKS:
            task_rows = [r for r in rows if r["task"] == task]
            if not task_rows:
                continue
            coco = COCO(str(Path(task_rows[0]["image"]).parent / "_annotations.coco.json"))
            for row in task_rows:
                ours = read_png(row["mask"]) > 0
                ref = reference_mask(coco, Path(row["image"]).name)
                assert np.array_equal(ours, ref), f"{row['mask']}: {(ours != ref).sum()} pixels differ from pycocotools"
                checked += 1
    return checked


def test_sample_end_to_end(sample_root, tmp_path):
    out = tmp_path / "processed"
    assert run("--data-root", str(sample_root), "--out", str(out), "--workers", "2") == 0
    summary = json.loads((out / "summary.json").read_text())
    c = summary["counts"]
    assert {t: {s: v["images"] for s, v in splits.items()} for t, splits in c.items()} == {
        "cracks": {"train": 8, "valid": 4}, "drywall": {"train": 8, "valid": 4}}
    assert c["cracks"]["train"]["bbox_only_annotations"] == 5
    assert c["cracks"]["train"]["mask_source"]["bbox"] == 1  # the image with no polygon at all
    assert c["drywall"]["train"]["empty_masks"] == 1
    assert c["drywall"]["valid"]["polygon_annotations"] == 0
    assert summary["leakage"]["drywall"]["valid"]["same_source_as_train"] == 2
    assert summary["leakage"]["cracks"]["valid"]["near_duplicate_of_train"] == 1  # Image_-637- = cracking356
    assert summary["missing_splits"] == ["cracks/test", "drywall/test"]
    assert summary["problems"] == []

    for split in ("train", "valid"):
        rows = read_manifest(out / split / "manifest.csv")
        header = (out / split / "manifest.csv").read_text().splitlines()[0].split(",")
        assert header == MANIFEST_COLUMNS
        assert len(rows) == {"train": 16, "valid": 8}[split]
        for row in rows:
            task = DEFAULT_TASKS[row["task"]]
            assert row["prompt"] == task.prompt
            assert Path(row["mask"]).name == f"{Path(row['image']).stem}__{task.slug}.png"
            mask = read_png(row["mask"])
            assert mask.dtype == np.uint8 and mask.ndim == 2
            assert mask.shape == (int(row["height"]), int(row["width"])) == (640, 640)
            assert set(np.unique(mask)) <= {0, 255}
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    assert assert_matches_pycocotools(out, ["train", "valid"]) == 24


def test_rerun_redoes_only_stale_masks(sample_root, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(sample_root, data)
    out = tmp_path / "out"
    assert run("--data-root", str(data), "--out", str(out), "--workers", "1") == 0
    summary = lambda: json.loads((out / "summary.json").read_text())  # noqa: E731
    assert summary()["masks_written"] == 24

    assert run("--data-root", str(data), "--out", str(out)) == 0
    assert (summary()["masks_written"], summary()["masks_reused"]) == (0, 24)
    assert summary()["counts"]["cracks"]["train"]["bbox_only_annotations"] == 5  # counts survive a re-run

    # Change one annotation and delete one mask: exactly those two are redone.
    json_path = data / "drywall" / "valid" / "_annotations.coco.json"
    coco = json.loads(json_path.read_text())
    coco["annotations"][0]["bbox"] = [10, 10, 50, 50]
    json_path.write_text(json.dumps(coco))
    next((out / "train" / "masks").glob("*segment_crack.png")).unlink()
    assert run("--data-root", str(data), "--out", str(out)) == 0
    assert (summary()["masks_written"], summary()["masks_reused"]) == (2, 22)
    changed = next(r for r in read_manifest(out / "valid" / "manifest.csv")
                   if Path(r["image"]).name == coco["images"][0]["file_name"])
    mask = read_png(changed["mask"]) > 0
    assert mask.sum() == 50 * 50 and mask[10:60, 10:60].all()

    assert run("--data-root", str(data), "--out", str(out), "--overwrite") == 0
    assert summary()["masks_written"] == 24

    # A re-run with one task: the other task's rows are kept, not counted as written.
    assert run("--data-root", str(data), "--out", str(out), "--tasks", "cracks") == 0
    assert (summary()["masks_written"], summary()["masks_reused"], summary()["masks_kept"]) == (0, 12, 12)


@pytest.fixture()
def messy_export(tmp_path) -> Path:
    """A cracks export with one of every recoverable fault."""
    split = tmp_path / "data" / "cracks" / "train"
    images = [
        {"id": 1, "file_name": "good.jpg", "width": 16, "height": 12},
        {"id": 2, "file_name": "missing.jpg", "width": 16, "height": 12},
        {"id": 3, "file_name": "corrupt.jpg", "width": 16, "height": 12},
        {"id": 4, "file_name": "resized.png", "width": 16, "height": 12},
        {"id": 5, "file_name": "rotated.jpg", "width": 16, "height": 12},
        {"id": 6, "file_name": "odd.jpg", "width": 16, "height": 12},
    ]
    box = [2, 3, 4, 5]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "segmentation": [], "bbox": box} for i in range(1, 6)]
    annotations += [
        {"id": 6, "image_id": 6, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4, 9]], "bbox": box},
        {"id": 7, "image_id": 42, "category_id": 1, "segmentation": [], "bbox": box},
    ]
    write_export(split, images, annotations, make_images=False)
    write_image(split / "good.jpg", 16, 12)
    data = (split / "good.jpg").read_bytes()
    (split / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    write_image(split / "resized.png", 32, 24)
    write_image(split / "rotated.jpg", 16, 12, exif_orientation=6)  # stored 16x12, shown 12x16
    write_image(split / "odd.jpg", 16, 12)
    return tmp_path / "data"


def test_bad_inputs_are_reported_and_repaired(messy_export, tmp_path):
    out = tmp_path / "out"
    assert run("--data-root", str(messy_export), "--out", str(out), "--tasks", "cracks", "--workers", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem_counts"] == {
        "unknown_image": 1, "image_unreadable": 2, "size_mismatch": 1, "exif_rotated": 1, "odd_polygon": 1}
    files = {Path(p["file"].split(" (")[0]).name for p in summary["problems"]}
    assert {"missing.jpg", "corrupt.jpg", "resized.png", "rotated.jpg", "odd.jpg", "_annotations.coco.json"} <= files
    rows = {Path(r["image"]).name: r for r in read_manifest(out / "train" / "manifest.csv")}
    assert sorted(rows) == ["good.jpg", "odd.jpg", "resized.png", "rotated.jpg"]

    raw = np.zeros((12, 16), dtype=bool)
    raw[3:8, 2:6] = True
    np.testing.assert_array_equal(read_png(rows["good.jpg"]["mask"]) > 0, raw)
    resized = read_png(rows["resized.png"]["mask"]) > 0
    assert resized.shape == (24, 32) and resized.sum() == 4 * raw.sum()
    rotated = read_png(rows["rotated.jpg"]["mask"]) > 0
    assert rotated.shape == (16, 12)
    np.testing.assert_array_equal(rotated, apply_orientation(raw.astype(np.uint8), 6) > 0)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == ("12", "16")


def test_strict_fails_and_keeps_previous_manifest(messy_export, tmp_path):
    out = tmp_path / "out"
    assert run("--data-root", str(messy_export), "--out", str(out), "--tasks", "cracks") == 0
    before = (out / "train" / "manifest.csv").read_bytes()
    assert run("--data-root", str(messy_export), "--out", str(out), "--tasks", "cracks", "--strict",
               "--overwrite") == 1
    assert (out / "train" / "manifest.csv").read_bytes() == before


def test_invalid_json_exits_nonzero_naming_the_file(tmp_path, capsys):
    split = tmp_path / "data" / "cracks" / "valid"
    split.mkdir(parents=True)
    (split / "_annotations.coco.json").write_text('{"images": [')
    out = tmp_path / "out"
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks") == 1
    err = capsys.readouterr().err
    assert "_annotations.coco.json" in err and "invalid JSON" in err
    assert not out.exists() or not list(out.rglob("manifest.csv"))


def test_missing_task_folder_and_unknown_task(tmp_path, capsys):
    (tmp_path / "data" / "cracks").mkdir(parents=True)
    assert run("--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "o")) == 1
    assert "drywall" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run("--data-root", str(tmp_path / "data"), "--tasks", "nope")
    assert exit_info.value.code == 1
    assert "unknown task" in capsys.readouterr().err
    assert run("--data-root", str(tmp_path / "absent"), "--out", str(tmp_path / "o")) == 1


def test_tasks_file_adds_a_task(tmp_path):
    split = tmp_path / "data" / "spalling-v3" / "valid"
    write_export(split, [{"id": 0, "file_name": "w.jpg", "width": 8, "height": 8}],
                 [{"id": 1, "image_id": 0, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]}])
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps({"tasks": {"spalling": {"prompt": "segment spalling", "dirs": ["spalling-v3"]}}}))
    out = tmp_path / "out"
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "spalling",
               "--tasks-file", str(tasks_file)) == 0
    rows = read_manifest(out / "valid" / "manifest.csv")
    assert [Path(r["mask"]).name for r in rows] == ["w__segment_spalling.png"]


def test_readme_demo_command(sample_root, tmp_path):
    """The demo's preprocessing step, exactly as the Makefile runs it, in a fresh process."""
    out = tmp_path / "processed_dataset"
    proc = subprocess.run([sys.executable, str(REPO / "preprocess_masks.py"), "--data-root", str(sample_root),
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "24 masks written" in proc.stderr
    # Not a terminal: progress comes as plain log lines, never a bar's carriage returns glued onto them.
    assert "\r" not in proc.stderr and "INFO masks: 24/24 img" in proc.stderr
    help_proc = subprocess.run([sys.executable, str(REPO / "preprocess_masks.py"), "--help"],
                               capture_output=True, text=True, timeout=60)
    assert help_proc.returncode == 0 and "--strict" in help_proc.stdout
    quiet = subprocess.run([sys.executable, str(REPO / "preprocess_masks.py"), "--data-root", str(sample_root),
                            "--out", str(tmp_path / "quiet"), "-q"], capture_output=True, text=True, timeout=300)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")  # -q: warnings and errors only
    assert len(list((tmp_path / "quiet" / "valid" / "masks").glob("*.png"))) == 8


@pytest.mark.slow
def test_full_real_sets_agree_with_pycocotools(shared_data, tmp_path):
    out = tmp_path / "full"
    assert run("--data-root", str(shared_data), "--out", str(out), "--workers", "2", "-q") == 0
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["cracks"]["train"]["images"] == 2642 and counts["cracks"]["train"]["bbox_only_annotations"] == 39
    assert counts["cracks"]["valid"]["bbox_only_annotations"] == 3
    assert counts["drywall"]["train"]["empty_masks"] == 2
    assert counts["drywall"]["valid"]["bbox_only_annotations"] == 250
    assert assert_matches_pycocotools(out, ["train", "valid", "test"]) == 3869


def test_atomic_writes_keep_the_old_file_and_usual_permissions(tmp_path):
    from defectseg.io import atomic_path, write_text_atomic

    target = tmp_path / "report.md"
    write_text_atomic(target, "good")
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_rerun_with_fewer_tasks_or_splits_keeps_the_rest(sample_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--data-root", str(sample_root), "--out", str(out)) == 0
    full = json.loads((out / "summary.json").read_text())
    assert run("--data-root", str(sample_root), "--out", str(out), "--tasks", "cracks", "--overwrite") == 0
    rows = read_manifest(out / "valid" / "manifest.csv")
    assert sorted({r["task"] for r in rows}) == ["cracks", "drywall"] and len(rows) == 8
    assert run("--data-root", str(sample_root), "--out", str(out), "--splits", "valid") == 0
    assert len(read_manifest(out / "train" / "manifest.csv")) == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == full["counts"] and summary["leakage"] == full["leakage"]
    # Without a train split, leakage is not measured (not "0 of 4 share a source photo").
    capsys.readouterr()
    assert run("--data-root", str(sample_root), "--out", str(tmp_path / "v"), "--splits", "valid") == 0
    assert json.loads((tmp_path / "v" / "summary.json").read_text())["leakage"] == {}
    assert "share a source photo" not in capsys.readouterr().err
    assert run("--data-root", str(sample_root), "--out", str(out), "--splits", "trian") == 1
    assert "split trian exists for none of the tasks cracks, drywall" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["counts"] == full["counts"]


def test_strict_failure_leaves_masks_untouched(sample_root, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    out = tmp_path / "out"
    assert run("--data-root", str(data), "--out", str(out)) == 0
    before = {p: p.read_bytes() for p in (out / "valid" / "masks").iterdir()}
    json_path = data / "cracks" / "valid" / "_annotations.coco.json"
    coco = json.loads(json_path.read_text())
    coco["annotations"][0]["segmentation"] = [[0, 0, 50, 0, 50, 50, 0, 50, 7]]  # odd length: a repair
    json_path.write_text(json.dumps(coco))
    assert run("--data-root", str(data), "--out", str(out), "--strict") == 1
    assert {p: p.read_bytes() for p in (out / "valid" / "masks").iterdir()} == before
    assert run("--data-root", str(data), "--out", str(out)) == 0  # without --strict the repair is applied
    assert {p: p.read_bytes() for p in (out / "valid" / "masks").iterdir()} != before


@pytest.mark.parametrize("stored,orientation,declared,ambiguous", [
    ((12, 12), 3, (12, 12), True),  # square, turned 180 degrees: the JSON size fits either way
    ((48, 32), 6, (32, 48), False),  # shown 32x48 and the JSON says so: drawn on the shown picture
])
def test_exif_orientation_is_flagged_only_when_ambiguous(tmp_path, stored, orientation, declared, ambiguous):
    """The annotations are taken as drawn on the displayed picture (the mask is not turned back); only
    when the JSON's size fits the stored picture too does a warning (and --strict) say so."""
    split = tmp_path / "data" / "cracks" / "train"
    width, height = declared
    write_export(split, [{"id": 1, "file_name": "x.jpg", "width": width, "height": height}],
                 [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [1, 2, 3, 4]}],
                 make_images=False)
    write_image(split / "x.jpg", *stored, exif_orientation=orientation)
    out = tmp_path / "out"
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks") == 0
    problems = json.loads((out / "summary.json").read_text())["problems"]
    assert [(p["kind"], "either way" in p["message"]) for p in problems] == [("exif_rotated", True)] * ambiguous
    expected = np.zeros((height, width), dtype=bool)
    expected[2:6, 1:4] = True
    (row,) = read_manifest(out / "train" / "manifest.csv")
    np.testing.assert_array_equal(read_png(row["mask"]) > 0, expected)
    assert run("--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "strict"), "--tasks", "cracks",
               "--strict") == int(ambiguous)


def run_script(*argv: str, code: str = "") -> subprocess.CompletedProcess:
    """preprocess_masks.py in a fresh process (a segfault or a hang there cannot take pytest down);
    ``code`` runs first, in the script's process."""
    program = f"import sys; sys.argv[0] = 'preprocess_masks.py'\n{code}\nimport runpy\nrunpy.run_path(" \
              f"{str(REPO / 'preprocess_masks.py')!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", program, *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=180)


@pytest.fixture()
def absurd_export(tmp_path) -> Path:
    """An export holding each input that used to crash pycocotools (rc 139), hang the pool or raise."""
    split = tmp_path / "data" / "cracks" / "train"
    images = [{"id": i, "file_name": f"ok{i}.jpg", "width": 16, "height": 12} for i in range(1, 5)]
    images += [{"id": 5, "file_name": "wide.jpg", "width": 200_000, "height": 12},
               {"id": 6, "file_name": "huge.jpg", "width": 200_000, "height": 200_000}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]], "bbox": [0, 0, 1, 1]},
        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": {"size": [12, 16], "counts": "\x00\xff junk"},
         "bbox": [0, 0, 1, 1], "iscrowd": 1},
        {"id": 3, "image_id": 3, "category_id": 1, "segmentation": {"size": 5, "counts": [1, 2]}, "bbox": [0, 0, 1, 1]},
        {"id": 4, "image_id": 4, "category_id": 1, "segmentation": {"size": [12, 16], "counts": [5, 3]}, "bbox": [0, 0, 1, 1]},
        {"id": 5, "image_id": [4], "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]},
        {"id": 6, "image_id": 5, "category_id": 1, "segmentation": [], "bbox": [0, 0, 2, 2]},
    ]
    write_export(split, images, annotations, make_images=False)
    for im in images:
        write_image(split / im["file_name"], 16, 12)
    return tmp_path / "data"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_absurd_input_is_reported_not_crashed_on(absurd_export, tmp_path, workers):
    out = tmp_path / "out"
    proc = run_script("--data-root", str(absurd_export), "--out", str(out), "--tasks", "cracks", "--workers", workers)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem_counts"] == {"bad_image_record": 1, "bad_annotation": 1, "bad_rle": 3, "implausible_size": 1,
                                         "far_outside": 1, "bbox_fallback": 1}
    named = {(Path(p["file"].split(" (")[0].split(":")[-1]).name, p["kind"]) for p in summary["problems"]}
    assert named == {("huge.jpg", "bad_image_record"), ("_annotations.coco.json", "bad_annotation"),
                     ("ok1.jpg", "far_outside"), ("ok1.jpg", "bbox_fallback"),
                     ("ok2.jpg", "bad_rle"), ("ok3.jpg", "bad_rle"), ("ok4.jpg", "bad_rle"),
                     ("wide.jpg", "implausible_size")}
    rows = {Path(r["image"]).name: r for r in read_manifest(out / "train" / "manifest.csv")}
    assert sorted(rows) == ["ok1.jpg", "ok2.jpg", "ok3.jpg", "ok4.jpg"]
    assert (read_png(rows["ok1.jpg"]["mask"]) > 0).sum() == 1  # the 1e9 ring dropped: its 1-pixel bbox instead
    assert all(not (read_png(rows[f"ok{i}.jpg"]["mask"]) > 0).any() for i in (2, 3, 4))

    strict = run_script("--data-root", str(absurd_export), "--out", str(tmp_path / "strict"), "--tasks", "cracks",
                        "--workers", workers, "--strict")
    assert strict.returncode == 1 and "Traceback" not in strict.stderr and "--strict: 2 problem(s)" in strict.stderr
    assert not (tmp_path / "strict" / "train" / "manifest.csv").exists()


def test_a_dying_worker_fails_cleanly_instead_of_hanging(sample_root, tmp_path):
    """A worker killed mid-run (here by SIGKILL, as the OOM killer does) used to leave Pool.imap waiting forever."""
    out = tmp_path / "out"
    kill = ("import os, signal, defectseg.preprocess as P\n"
            "real = P.process_job\n"
            "def process_job(job):\n"
            "    if 'cracking356' in job.image: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(job)\n"
            "process_job.__module__, process_job.__qualname__ = 'defectseg.preprocess', 'process_job'\n"
            "P.process_job = process_job\n")
    if os.name == "nt":
        pytest.skip("the patch above reaches workers only through fork")
    proc = run_script("--data-root", str(sample_root), "--out", str(out), "--workers", "2", code=kill)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "a worker process died" in proc.stderr
    assert "cracking356" in proc.stderr.splitlines()[-1]
    assert not list(out.rglob("manifest.csv")) and not (out / "summary.json").exists()


@pytest.mark.parametrize(
    "make, out_name, message",
    [
        pytest.param(lambda t: (t / "out").write_text("x"), "out", "out is a file, not a folder", id="out-is-a-file"),
        pytest.param(lambda t: (t / "f").write_text("x"), "f/out", "f is a file, not a folder", id="out-under-a-file"),
        pytest.param(lambda t: (t / "out" / "valid" / "masks").mkdir(parents=True) or (
            t / "out" / "valid" / "manifest.csv").mkdir(), "out", "manifest.csv is a folder", id="manifest-is-a-folder"),
        pytest.param(lambda t: (t / "out" / "train").mkdir(parents=True) or (t / "out" / "train" / "masks").write_text(""),
                     "out", "masks is a file", id="masks-is-a-file"),
    ],
)
def test_bad_out_is_one_line_error_before_any_work(sample_root, tmp_path, capsys, make, out_name, message):
    make(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert run("--data-root", str(sample_root), "--out", str(tmp_path / out_name)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ERROR output folder" in err[0] and message in err[0], err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing made, nothing written


def test_unwritable_out_is_one_line_error(sample_root, tmp_path, capsys, monkeypatch):
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere: let the write probe see what a user would

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    try:
        assert run("--data-root", str(sample_root), "--out", str(locked / "out")) == 1
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write in {locked} (Permission denied)" in err[0], err
    assert list(locked.iterdir()) == []


def one_box_export(split: Path, names: list[str]) -> None:
    """Images 16x12 named ``names``; image i has one box 2 px wide at x = 2*i, rows 3..7."""
    images = [{"id": i, "file_name": name, "width": 16, "height": 12} for i, name in enumerate(names)]
    write_export(split, images, [{"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": [],
                                  "bbox": [2 * i, 3, 2, 5]} for i in range(len(names))], make_images=False)
    for i, name in enumerate(names):
        write_image(split / name, 16, 12, seed=i)


def test_mask_name_clash_skips_every_image_of_it(tmp_path, capsys):
    """x.jpg and x.png would both write x__segment_crack.png: neither may get the other's ground truth."""
    split = tmp_path / "data" / "cracks" / "train"
    out = tmp_path / "out"
    one_box_export(split, ["x.jpg", "y.jpg"])
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks") == 0
    assert sorted(Path(r["image"]).name for r in read_manifest(out / "train" / "manifest.csv")) == ["x.jpg", "y.jpg"]

    one_box_export(split, ["x.jpg", "y.jpg", "x.png", "Y.PNG"])
    capsys.readouterr()
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks") == 0
    assert "x.png" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem_counts"] == {"mask_name_clash": 4}
    assert sorted(Path(p["file"]).name for p in summary["problems"]) == ["Y.PNG", "x.jpg", "x.png", "y.jpg"]
    assert summary["counts"] == {}
    assert read_manifest(out / "train" / "manifest.csv") == []  # the old rows of x.jpg and y.jpg are gone

    one_box_export(split, ["x.jpg", "y.jpg", "x.png", "z.jpg"])  # Y.PNG gone: only x clashes
    (split / "Y.PNG").unlink()
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks") == 0
    rows = {Path(r["image"]).name: r for r in read_manifest(out / "train" / "manifest.csv")}
    assert sorted(rows) == ["y.jpg", "z.jpg"]
    expected = np.zeros((12, 16), dtype=bool)
    expected[3:8, 6:8] = True  # z.jpg is image 3: box x 6..7, rows 3..7
    np.testing.assert_array_equal(read_png(rows["z.jpg"]["mask"]) > 0, expected)
    assert run("--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "strict"), "--tasks", "cracks",
               "--strict") == 1


def test_export_without_images_is_warned_and_empties_the_manifest(tmp_path, capsys):
    split = tmp_path / "data" / "cracks" / "valid"
    out = tmp_path / "out"
    one_box_export(split, ["a.jpg"])
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks") == 0
    assert len(read_manifest(out / "valid" / "manifest.csv")) == 1
    write_export(split, [], [])
    capsys.readouterr()
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks") == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "_annotations.coco.json: an empty 'images' list" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem_counts"] == {"no_images": 1} and summary["counts"] == {}
    assert read_manifest(out / "valid" / "manifest.csv") == []  # not the stale row of a.jpg
    assert run("--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "strict"), "--tasks", "cracks",
               "--strict") == 1


def test_a_named_split_that_no_task_has_is_an_error(sample_root, tmp_path, capsys):
    out = tmp_path / "out"
    for splits in (["train", "vaild"], ["test"]):
        assert run("--data-root", str(sample_root), "--out", str(out), "--splits", *splits) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"split {splits[-1]} exists for none of the tasks" in err[0]
        assert not out.exists()
    assert run("--data-root", str(sample_root), "--out", str(out), "--splits", "valid", "vaild", "tset") == 1
    assert "splits vaild, tset exist for none" in capsys.readouterr().err
    # By default, test is simply absent from the sample (as before): noted, not an error.
    assert run("--data-root", str(sample_root), "--out", str(out), "--tasks", "cracks") == 0
    assert json.loads((out / "summary.json").read_text())["missing_splits"] == ["cracks/test"]


def test_repeated_tasks_and_splits_count_once(sample_root, tmp_path):
    out = tmp_path / "out"
    assert run("--data-root", str(sample_root), "--out", str(out), "--tasks", "cracks", "drywall", "cracks",
               "--splits", "valid", "valid") == 0
    rows = read_manifest(out / "valid" / "manifest.csv")
    assert len(rows) == 8 and len({r["mask"] for r in rows}) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masks_written"] == 8 and summary["splits"] == ["valid"]
    assert {t: c["valid"]["images"] for t, c in summary["counts"].items()} == {"cracks": 4, "drywall": 4}


# --- Re-runs: reused masks keep their problems and follow a moved data root; old manifests are redone


def resized_export(root: Path) -> Path:
    """cracks/train: ``small.png`` declared 3x3 but stored 32x32 (a size_mismatch), and a clean ``good.jpg``."""
    split = root / "cracks" / "train"
    write_export(split, [{"id": 1, "file_name": "small.png", "width": 3, "height": 3},
                         {"id": 2, "file_name": "good.jpg", "width": 16, "height": 12}],
                 [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [0, 0, 1, 1]}],
                 make_images=False)
    write_image(split / "small.png", 32, 32)
    write_image(split / "good.jpg", 16, 12)
    return root


def test_rerun_keeps_the_problems_of_reused_masks(tmp_path):
    """A mask reused as up to date used to drop its problems: the re-run said none, and --strict passed."""
    data, out = resized_export(tmp_path / "dA"), tmp_path / "out"
    summary = lambda: json.loads((out / "summary.json").read_text())  # noqa: E731
    assert run("--data-root", str(data), "--out", str(out), "--tasks", "cracks") == 0
    first = summary()
    assert first["problem_counts"] == {"size_mismatch": 1} and first["masks_written"] == 2
    assert run("--data-root", str(data), "--out", str(out), "--tasks", "cracks") == 0
    assert (summary()["masks_reused"], summary()["problems"]) == (2, first["problems"])
    assert run("--data-root", str(data), "--out", str(out), "--tasks", "cracks", "--strict") == 1
    assert summary()["masks_reused"] == 2  # the failed strict run changed nothing

    data.rename(tmp_path / "dB")  # reused after a move: the problem names the image where it is now
    assert run("--data-root", str(tmp_path / "dB"), "--out", str(out), "--tasks", "cracks") == 0
    (problem,) = summary()["problems"]
    assert summary()["masks_reused"] == 2 and problem["file"] == str((tmp_path / "dB/cracks/train/small.png").resolve())


def test_moved_data_root_points_rows_at_the_new_place(sample_root, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sample_root, tmp_path / "dA")
    assert run("--data-root", str(tmp_path / "dA"), "--out", str(out)) == 0
    (tmp_path / "dA").rename(tmp_path / "dB")
    assert run("--data-root", str(tmp_path / "dB"), "--out", str(out)) == 0
    assert json.loads((out / "summary.json").read_text())["masks_reused"] == 24
    for split in ("train", "valid"):
        rows = read_manifest(out / split / "manifest.csv")
        assert all(Path(r["image"]).is_relative_to(tmp_path / "dB") and Path(r["image"]).is_file() for r in rows)
        assert "../../dB/" in (out / split / "manifest.csv").read_text()


def test_rerun_over_a_manifest_with_only_the_basic_columns(sample_root, tmp_path, monkeypatch):
    """Such a manifest's kept rows used to crash the summary after the manifests were rewritten."""
    import defectseg.preprocess as P

    out = tmp_path / "out"
    assert run("--data-root", str(sample_root), "--out", str(out)) == 0
    manifest = out / "valid" / "manifest.csv"
    lines = [line.split(",")[:6] for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(",".join(cells) + "\n" for cells in lines))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    monkeypatch.setattr(P, "summarize", lambda *a, **k: 1 / 0)  # a failure this late: no manifest or summary
    with pytest.raises(ZeroDivisionError):
        run("--data-root", str(sample_root), "--out", str(out), "--tasks", "cracks")
    pending = json.loads((out / P.PENDING_FILE).read_text())  # the masks it rewrote, never to be reused as is
    assert len(pending) == 4 and all("/valid/masks/" in m and "segment_crack" in m for m in pending)
    (out / P.PENDING_FILE).unlink()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.undo()

    assert run("--data-root", str(sample_root), "--out", str(out), "--tasks", "cracks") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["drywall"]["valid"] == {
        "images": 4, "annotations_used": 0, "empty_masks": 0, "polygon_annotations": 0, "bbox_only_annotations": 0,
        "rle_annotations": 0, "mask_source": {}, "mean_fg_fraction": None, "images_without_statistics": 4}
    assert summary["counts"]["cracks"]["valid"]["images"] == 4 and "drywall" not in summary["leakage"]
    assert summary["masks_written"] == 4  # the basic cracks rows are redone, the drywall ones kept as they are
    kept = [r for r in read_manifest(manifest) if r["task"] == "drywall"]
    assert {r["problems"] for r in kept} == {"unknown"}  # not "" (no problems): nobody knows them yet
    assert run("--data-root", str(sample_root), "--out", str(out)) == 0  # with drywall: its rows are redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masks_written"] == 4 and summary["counts"]["drywall"]["valid"]["bbox_only_annotations"] > 0


# --- Input checks: task folders, splits, the tasks file


def test_task_folder_without_split_folders_is_an_error(sample_root, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    for split in ("train", "valid"):
        (data / "drywall" / split).rename(data / "drywall" / split.title())
    assert run("--data-root", str(data), "--out", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'drywall'" in err[0] and "its folders: Train, Valid" in err[0], err
    assert not (tmp_path / "out").exists()
    assert run("--data-root", str(data), "--out", str(tmp_path / "out"), "--tasks", "cracks") == 0


def test_task_categories_the_export_lacks_are_warned(sample_root, tmp_path, capsys):
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps({"cracks": {"prompt": "segment crack", "dirs": ["cracks"], "categories": ["crak"]}}))
    args = ("--data-root", str(sample_root), "--tasks", "cracks", "--tasks-file", str(tasks_file))
    assert run(*args, "--out", str(tmp_path / "out")) == 0
    assert "none of the task's categories (crak)" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problem_counts"] == {"unknown_category": 2}
    assert all("it has: NewCracks - v2 2024-05-18 10-54pm, crack;" in p["message"] for p in summary["problems"])
    assert run(*args, "--out", str(tmp_path / "strict"), "--strict") == 1


@pytest.mark.parametrize("spec, message", [
    pytest.param({"up": {"prompt": "segment up", "dirs": [".."]}}, "task 'up': '..' is not one folder name",
                 id="dirs-dotdot"),
    pytest.param({"up": {"prompt": "segment up", "dirs": ["ok", "../x"]}}, "'../x' is not one folder name",
                 id="dirs-slash"),
    pytest.param({"..": {"prompt": "segment up"}}, "task name '..' must be one folder name", id="name-as-dir"),
    pytest.param({"mean": {"prompt": "segment mean"}}, "task name 'mean' is reserved", id="reserved-name"),
])
def test_tasks_file_refuses_names_that_escape_or_collide(tmp_path, capsys, spec, message):
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps({"tasks": spec}))
    with pytest.raises(SystemExit) as exit_info:
        run("--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--tasks-file", str(tasks_file))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and str(tasks_file) in err[0] and message in err[0], err


def test_tasks_file_that_is_a_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("--data-root", str(tmp_path), "--tasks-file", str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and f"{tmp_path}: is a folder, not a tasks file" in err[0]


def test_splits_must_be_plain_folder_names(sample_root, tmp_path, capsys):
    from defectseg.coco import CocoError
    from defectseg.preprocess import preprocess

    for split in ("../x", "/tmp", "a/b", ".."):
        with pytest.raises(SystemExit) as exit_info:
            run("--data-root", str(sample_root), "--out", str(tmp_path / "out"), "--splits", split)
        assert exit_info.value.code == 2 and "a split is one folder name" in capsys.readouterr().err
        with pytest.raises(CocoError, match="is not one folder name"):
            preprocess(sample_root, tmp_path / "out", list(DEFAULT_TASKS.values()), [split])
    assert not (tmp_path / "out").exists()


# --- EXIF and very long file names




def test_mask_names_cap_long_stems_only():
    from defectseg.manifest import STEM_MAX, mask_name

    real = "14-144132_transparent-wall-cracks-png-wall-cracking-by-hole_png_jpg.rf.0c9eabb87031a143afd6e25d400c9f8e"
    assert mask_name(f"{real}.jpg", "segment_crack") == f"{real}__segment_crack.png"  # the longest real name
    assert mask_name("x" * STEM_MAX + ".jpg", "s") == "x" * STEM_MAX + "__s.png"
    long_a, long_b = mask_name("a" * 250 + "1.jpg", "s"), mask_name("a" * 250 + "2.jpg", "s")
    assert long_a != long_b and long_a.startswith("a" * STEM_MAX + "_") and len(long_a) == STEM_MAX + 9 + 7
    wide = mask_name("é" * 200 + ".png", "s")  # cut on a character boundary, under the byte cap
    assert wide.startswith("é" * (STEM_MAX // 2) + "_") and len(wide.encode()) <= STEM_MAX + 9 + 7


def test_very_long_image_name_gets_a_short_mask_name(tmp_path):
    """A 250-character stem used to abort the run ("File name too long") before any manifest."""
    split = tmp_path / "data" / "cracks" / "train"
    long_name = "x" * 250 + ".jpg"
    one_box_export(split, [long_name, "short.jpg"])
    out = tmp_path / "out"
    assert run("--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "cracks", "--workers", "1") == 0
    rows = {Path(r["image"]).name: Path(r["mask"]) for r in read_manifest(out / "train" / "manifest.csv")}
    assert rows["short.jpg"].name == "short__segment_crack.png" and rows[long_name].is_file()
    assert len(rows[long_name].name.encode()) < 140 and not list(out.rglob("*.tmp"))


def test_atomic_write_of_a_name_near_the_limit(tmp_path):
    from defectseg.io import write_text_atomic

    target = tmp_path / ("ü" * 125 + ".txt")  # 254 bytes: the temp name must not add to it
    write_text_atomic(target, "ok")
    assert target.read_text() == "ok" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_rerun_through_a_symlinked_out_keeps_every_row_valid(sample_root, tmp_path):
    """Reused rows and new rows are written relative to the same (resolved) folder; a symlinked --out
    used to give reused rows paths that lead nowhere on every second run."""
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")  # at another depth than the link
    for _ in range(2):
        assert run("--data-root", str(sample_root), "--out", str(tmp_path / "link"), "-q") == 0
        rows = read_manifest(tmp_path / "link" / "valid" / "manifest.csv")
        assert rows and all(Path(r["image"]).is_file() and Path(r["mask"]).is_file() for r in rows)


def test_a_run_cut_short_never_leaves_a_mask_that_a_later_run_takes_as_up_to_date(sample_root, tmp_path,
                                                                                  monkeypatch):
    """Annotations edited, a run stopped after rewriting a mask but before its manifest, the edit undone:
    the old row's key matches again, but the mask on disk is the edited one. The next run makes it again."""
    import shutil

    import defectseg.preprocess as P

    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(sample_root / "cracks", data / "cracks")
    assert run("--data-root", str(data), "--out", str(out), "--splits", "valid", "--tasks", "cracks", "-q") == 0
    rows = read_manifest(out / "valid" / "manifest.csv")
    good = {r["mask"]: Path(r["mask"]).read_bytes() for r in rows}
    annotations = data / "cracks" / "valid" / "_annotations.coco.json"
    original = annotations.read_text()
    coco = json.loads(original)
    for ann in coco["annotations"]:
        ann["segmentation"] = []  # every mask becomes its boxes
    annotations.write_text(json.dumps(coco))
    monkeypatch.setattr(P, "summarize", lambda *a, **k: 1 / 0)  # stopped after the masks, before the manifests
    with pytest.raises(ZeroDivisionError):
        run("--data-root", str(data), "--out", str(out), "--splits", "valid", "--tasks", "cracks", "-q")
    monkeypatch.undo()
    assert any(Path(m).read_bytes() != b for m, b in good.items())  # edited masks on disk
    annotations.write_text(original)
    assert run("--data-root", str(data), "--out", str(out), "--splits", "valid", "--tasks", "cracks", "-q") == 0
    assert {m: Path(m).read_bytes() for m in good} == good and not (out / P.PENDING_FILE).exists()


def test_a_renamed_task_does_not_list_its_masks_twice(sample_root, tmp_path):
    """The same prompt under a new task name makes the same mask files: the old name's rows go."""
    out, tasks_file = tmp_path / "out", tmp_path / "tasks.json"
    for name in ("fissure", "fis"):
        tasks_file.write_text(json.dumps({"tasks": {name: {"prompt": "segment fissure", "dirs": ["cracks"]}}}))
        assert run("--data-root", str(sample_root), "--out", str(out), "--tasks", name, "--tasks-file",
                   str(tasks_file), "-q") == 0
    rows = read_manifest(out / "valid" / "manifest.csv")
    masks = [r["mask"] for r in rows if "segment_fissure" in r["mask"]]
    assert masks and len(masks) == len(set(masks)) and {r["task"] for r in rows if r["mask"] in masks} == {"fis"}
    assert "fissure" not in json.loads((out / "summary.json").read_text())["counts"]


def test_the_summary_counts_the_problems_of_splits_not_in_the_run(tmp_path):
    """A rerun of one split keeps the other splits' rows, and their problems stay in summary.json: those of
    kept masks (an odd polygon, repaired) and of what was skipped there (an image missing from the folder,
    an annotation of an unknown image). A run that reads train again counts what train holds now."""
    data = tmp_path / "data"
    for split in ("train", "valid"):
        write_image(data / "cracks" / split / "a.jpg", 8, 8)
        segmentation = [[1, 1, 6, 1, 6, 6]] if split == "valid" else [[1, 1, 6, 1, 6]]  # odd: a problem
        skipped = split == "train"
        (data / "cracks" / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}]
                      + [{"id": 2, "file_name": "gone.jpg", "width": 8, "height": 8}] * skipped,
            "categories": [],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": segmentation,
                             "bbox": [1, 1, 5, 5]}]
                           + [{"id": 2, "image_id": 9, "category_id": 1, "segmentation": [], "bbox": [1, 1, 2, 2]}]
                           * skipped}))
    out = tmp_path / "out"
    summary = lambda: json.loads((out / "summary.json").read_text())  # noqa: E731
    assert run("--data-root", str(data), "--out", str(out), "--tasks", "cracks", "-q") == 0
    first = summary()
    assert {"odd_polygon", "image_unreadable", "unknown_image"} <= set(first["problem_counts"])
    assert run("--data-root", str(data), "--out", str(out), "--tasks", "cracks", "--splits", "valid", "-q") == 0
    assert summary()["problem_counts"] == first["problem_counts"]
    assert sorted(map(str, summary()["problems"])) == sorted(map(str, first["problems"]))
    write_image(data / "cracks" / "train" / "gone.jpg", 8, 8)  # the missing image is back
    assert run("--data-root", str(data), "--out", str(out), "--tasks", "cracks", "--splits", "train", "-q") == 0
    assert summary()["problem_counts"] == {k: v for k, v in first["problem_counts"].items() if k != "image_unreadable"}
    assert summary()["counts"]["cracks"]["train"]["images"] == 2


def test_a_run_of_other_splits_keeps_the_masks_a_cut_short_run_left_pending(sample_root, tmp_path):
    """A train run cut short, then a whole valid run: the train masks stay listed, and the next train run
    makes them again (the valid run used to drop the list)."""
    import defectseg.preprocess as P

    out = tmp_path / "out"
    assert run("--data-root", str(sample_root), "--out", str(out), "-q") == 0
    mask = Path(read_manifest(out / "train" / "manifest.csv")[0]["mask"])
    good = mask.read_bytes()
    cv2.imwrite(str(mask), np.zeros_like(read_png(mask)))  # as a cut-short run may have left it
    (out / P.PENDING_FILE).write_text(json.dumps([str(mask.resolve())]))
    assert run("--data-root", str(sample_root), "--out", str(out), "--splits", "valid", "-q") == 0
    assert json.loads((out / P.PENDING_FILE).read_text()) == [str(mask.resolve())]
    assert run("--data-root", str(sample_root), "--out", str(out), "--splits", "train", "-q") == 0
    assert mask.read_bytes() == good and not (out / P.PENDING_FILE).exists()
