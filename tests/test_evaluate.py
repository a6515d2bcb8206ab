"""evaluate.py and defectseg.evaluation: hand-computed scores, masks made elsewhere, a tiny model end to end,
tuned thresholds written back, bad input, and (when present) real peer masks against exact ground truth."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, SAMPLE, SHARED_DATA

import evaluate
import predict
import preprocess_masks
from defectseg import evaluation, metrics, report
from defectseg.evaluation import ImageScore, aggregate, prompt_probabilities, score_batch, text_sensitivity
from defectseg.inference import Segmenter
from defectseg.io import load_image, read_mask_png, write_mask_png
from defectseg.manifest import mask_name, read_manifest, write_manifest
from defectseg.model import (
    DECODER_FILE,
    METADATA_FILE,
    load_model,
    parameter_counts,
    read_metadata,
    save_decoder,
)
from defectseg.tasks import prompt_slug
from defectseg.tiny import build_tiny_model

PEERS = REPO.parent / "shared" / "peer-predictions"
OTHER = {"cracks": "segment taping area", "drywall": "segment crack"}


def run(*argv: str) -> int:
    return evaluate.main(evaluate.build_parser().parse_args(list(argv)))


def run_logged(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Exit code and what was logged (setup_logging replaces the root handlers, so caplog sees nothing)."""
    capsys.readouterr()
    code = run(*argv)
    return code, capsys.readouterr().err


def preprocess(data_root: Path, out: Path, *extra: str) -> Path:
    argv = ["--data-root", str(data_root), "--out", str(out), "--workers", "2", "-q", *extra]
    assert preprocess_masks.main(preprocess_masks.build_parser().parse_args(argv)) == 0
    return out


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory, sample_root: Path) -> Path:
    return preprocess(sample_root, tmp_path_factory.mktemp("evaldata") / "processed")


@pytest.fixture(scope="module")
def valid_rows(processed: Path) -> list[dict]:
    return read_manifest(processed / "valid" / "manifest.csv")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("evaltiny") / "tiny", seed=0)


@pytest.fixture(scope="module")
def segmenter(tiny_dir: Path) -> Segmenter:
    """Read-only; tests that change options load their own."""
    return Segmenter.load(str(tiny_dir), "cpu")


def load_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def per_image(out: Path) -> list[dict]:
    with open(out / "per_image.csv", newline="") as f:
        return list(csv.DictReader(f))


def by_task(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["task"], []).append(row)
    return out


def pred_file(folder: Path, row: dict) -> Path:
    return folder / mask_name(row["image"], prompt_slug(row["prompt"]))


# --------------------------------------------------------------------------------------------------
# --pred-dir: masks made elsewhere, hand-known answers


def test_pred_dir_ground_truth_scores_exactly_one(processed, valid_rows, tmp_path):
    out = tmp_path / "report"
    # the ground-truth masks are named <image_stem>__<prompt_slug>.png, exactly what --pred-dir reads
    assert run("--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed), "--out", str(out),
               "-q") == 0
    m = load_metrics(out)
    assert set(m["tasks"]) == {"cracks", "drywall"}
    for t in [*m["tasks"].values(), m["overall"]]:
        for key in ("iou", "dice", "micro_iou", "micro_dice", "precision", "recall"):
            assert t[key] == 1.0, key
    assert m["overall"]["n_images"] == len(valid_rows) == 8
    assert m["predictions"]["missing"]["count"] == 0
    assert "sweep_iou" not in m["tasks"]["cracks"] and "text_iou" not in m["tasks"]["cracks"]
    assert len(per_image(out)) == 8
    assert (out / "examples_cracks.png").is_file() and not (out / "threshold_curves.png").exists()


def test_pred_dir_without_a_task_s_masks_scores_it_zero_and_reports_missing(processed, valid_rows, tmp_path, capsys):
    preds = tmp_path / "cracks_only"
    preds.mkdir()
    for row in valid_rows:
        if row["task"] == "cracks":
            shutil.copy(row["mask"], pred_file(preds, row))
    out = tmp_path / "report"
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(out),
                           "--examples", "0")
    assert code == 0
    m = load_metrics(out)
    assert m["tasks"]["cracks"]["iou"] == 1.0
    assert m["tasks"]["drywall"]["n_empty_gt"] == 0  # every valid ground truth of the sample is non-empty
    assert m["tasks"]["drywall"]["iou"] == m["tasks"]["drywall"]["dice"] == 0.0
    assert m["predictions"]["missing"]["count"] == 4 and m["predictions"]["missing"]["by_task"] == {"drywall": 4}
    assert "4 prediction file(s) missing" in (out / "report.md").read_text()
    assert "4 prediction(s) missing" in log and "no mask at all for task drywall" in log and "--tasks" in log


@pytest.mark.parametrize("held", [[], ["IMG_1.png", "notes.txt"]])
def test_pred_dir_with_no_mask_for_these_images_is_refused_and_keeps_the_report(processed, tmp_path, capsys, held):
    """An empty folder, or one whose masks are named otherwise, is not a model that found nothing: one line
    naming the folder, the naming it expects and what it holds; exit 1; the earlier report stays."""
    out = tmp_path / "report"
    assert run("--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed), "--out", str(out), "-q") == 0
    before = (out / "metrics.json").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    for name in held:
        (other / name).write_bytes(b"x")
    code, log = run_logged(capsys, "--pred-dir", str(other), "--data", str(processed), "--out", str(out))
    assert code == 1 and "Traceback" not in log
    line = next(x for x in log.splitlines() if "none of the 8 predictions" in x)
    assert str(other) in line and "<image_stem>__<prompt_slug>.png" in line and "__segment_crack.png" in line
    assert ("IMG_1.png, notes.txt" in line) if held else line.endswith("the folder holds nothing")
    assert "no mask at all for task" not in log  # the --tasks hint does not fit a folder that matches nothing
    assert (out / "metrics.json").read_bytes() == before


def test_16_bit_probability_maps_get_advice_on_their_scale(processed, valid_rows, tmp_path, capsys):
    """0..65535 maps (foreground 51400, background 10280): the advice is half their scale, 32768; 128 (the
    8-bit advice) cuts nothing and is warned about; 32768 recovers the ground truth."""
    preds = tmp_path / "probs16"
    preds.mkdir()
    for row in valid_rows:
        cv2.imwrite(str(pred_file(preds, row)), np.where(read_mask_png(row["mask"]), 51400, 10280).astype(np.uint16))
    out = tmp_path / "r"
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(out), "--examples", "0")
    assert code == 0 and "pass --pred-threshold (e.g. 32768)" in log
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(out),
                           "--examples", "0", "--pred-threshold", "128")
    warnings = [x for x in log.splitlines() if "--pred-threshold 128 is a value as stored" in x]
    assert code == 0 and len(warnings) == 1 and "up to 51400" in warnings[0] and "0..65535" in warnings[0]
    assert "e.g. 32768" in warnings[0] and load_metrics(out)["tasks"]["cracks"]["recall"] == 1.0
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(out),
                           "--examples", "0", "--pred-threshold", "32768")
    assert code == 0 and "--pred-threshold" not in log and load_metrics(out)["overall"]["iou"] == 1.0


def test_model_flags_with_pred_dir_are_warned_about(processed, tiny_dir, tmp_path, capsys):
    code, log = run_logged(capsys, "--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed),
                           "--out", str(tmp_path / "r"), "--examples", "0", "--model", str(tiny_dir),
                           "--thresholds-sweep", "0.3", "0.5")
    assert code == 0 and "--model, --thresholds-sweep do nothing with --pred-dir" in log


@pytest.mark.parametrize("summary", [[], {"leakage": {"cracks": {"valid": {"images": 4}}}, "splits": ["train"]},
                                     {"leakage": {"cracks": {"valid": "x"}}}])
def test_odd_summary_json_leaves_the_leakage_out(processed, tmp_path, capsys, summary):
    """A summary.json of another shape (edited, another version) costs the leakage section, not the report."""
    data = tmp_path / "data"
    shutil.copytree(processed, data)
    (data / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "report"
    code, log = run_logged(capsys, "--pred-dir", str(processed / "valid" / "masks"), "--data", str(data),
                           "--out", str(out), "--examples", "0")
    assert code == 0 and "Traceback" not in log and (summary == [] or "leakage numbers not in the expected" in log)
    assert load_metrics(out)["leakage"] is None and "No leakage numbers" in (out / "report.md").read_text()


def test_report_shows_thresholds_as_used(processed, tiny_dir, tmp_path):
    """0.125 is 0.125 in report.md (two decimals would show 0.12, not what was used)."""
    out = tmp_path / "report"
    assert run("--model", str(tiny_dir), "--data", str(processed), "--out", str(out), "--threshold", "0.125",
               "--thresholds-sweep", "0.125", "0.005", "--examples", "0", "-q") == 0
    text = (out / "report.md").read_text()
    assert "0.125" in text and "0.12 " not in text and "0.12," not in text and "| 0.12 |" not in text


def test_threshold_source_names_the_tasks_without_a_tuned_threshold(processed, tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    meta = read_metadata(model)
    (model / METADATA_FILE).write_text(json.dumps({**meta, "thresholds": {"segment crack": 0.3}}))
    out = tmp_path / "report"
    assert run("--model", str(model), "--data", str(processed), "--out", str(out), "--examples", "0", "-q") == 0
    assert load_metrics(out)["threshold_source"] == "from the checkpoint; default 0.5 for segment taping area"


@pytest.mark.parametrize("stored, line", [(5, 2), (352, 175)])
def test_a_prediction_of_another_size_is_resized_about_pixel_centres(tmp_path, stored, line):
    """A centred 1-px line in a 5-px-wide mask is the centre column of a 7-px-wide ground truth; plain
    nearest (floor(x * 5/7)) made it 2 px wide and shifted (IoU 0.5). Masks saved at CLIPSeg's 352 px,
    scored at 640: the line at columns 175-176 (352 px) maps to columns 318-321 of 640, 4 px centred on 320."""
    row = {"image": "/x/a.jpg", "mask": "/x/a_mask.png", "prompt": "segment crack"}
    mask = np.zeros((stored, stored), bool)
    mask[:, line:stored - line] = True
    write_mask_png(tmp_path / evaluation.output_name(row["image"], row["mask"], row["prompt"]), mask)
    size = 7 if stored == 5 else 640
    pred, status, _ = evaluation.read_prediction(tmp_path, row, (size, size))
    expected = [3] if stored == 5 else [318, 319, 320, 321]
    assert status == "resized" and np.flatnonzero(pred[0]).tolist() == expected and (pred == pred[:1]).all()


def test_pred_dir_hand_made_predictions(processed, valid_rows, tmp_path):
    """cracks: 2 exact copies + 2 missing -> IoU exactly 0.5. drywall: 2 copies, 1 all-foreground mask at
    half size (resized nearest -> IoU = the ground truth's foreground fraction), 1 missing."""
    preds = tmp_path / "preds"
    preds.mkdir()
    tasks = by_task(valid_rows)
    for row in tasks["cracks"][:2] + tasks["drywall"][:2]:
        shutil.copy(row["mask"], pred_file(preds, row))
    resized_row = tasks["drywall"][2]
    gt = read_mask_png(resized_row["mask"])
    write_mask_png(pred_file(preds, resized_row), np.ones((gt.shape[0] // 2, gt.shape[1] // 2), bool))
    out = tmp_path / "report"
    assert run("--pred-dir", str(preds), "--data", str(processed), "--out", str(out), "--examples", "0", "-q") == 0
    m = load_metrics(out)
    assert m["tasks"]["cracks"]["iou"] == m["tasks"]["cracks"]["dice"] == 0.5
    fg = gt.mean()
    assert m["tasks"]["drywall"]["iou"] == pytest.approx((2 + fg) / 4, abs=1e-12)
    assert m["tasks"]["drywall"]["dice"] == pytest.approx((2 + 2 * fg / (1 + fg)) / 4, abs=1e-12)
    assert m["overall"]["iou"] == pytest.approx((0.5 + (2 + fg) / 4) / 2, abs=1e-12)
    assert m["predictions"]["missing"]["count"] == 3
    assert m["predictions"]["resized"] == {"count": 1, "first": [pred_file(preds, resized_row).name]}
    text = (out / "report.md").read_text()
    assert "3 prediction file(s) missing" in text and "resized nearest" in text
    csv_rows = {Path(r["image"]).name: r for r in per_image(out)}
    assert float(csv_rows[Path(resized_row["image"]).name]["iou"]) == pytest.approx(fg, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# score_batch / aggregate


def test_score_batch_counts_at_threshold_zero(tiny_dir, valid_rows):
    """Threshold 0: every pixel is foreground, so tp = ground-truth pixels, fp = the rest, IoU = fg fraction.
    Rows of both tasks mixed in one batch, text sensitivity and the sweep included."""
    seg = Segmenter.load(str(tiny_dir), "cpu", default_threshold=0.0)
    rows = [valid_rows[0], valid_rows[4], valid_rows[1]]  # cracks, drywall, cracks
    assert [r["task"] for r in rows] == ["cracks", "drywall", "cracks"]
    targets = [read_mask_png(r["mask"]) for r in rows]
    acts = seg.encode(seg.pixel_values([load_image(r["image"]) for r in rows]))
    sweep = [0.0, 0.5, 2.0]
    scores = score_batch(seg, acts, rows, targets, sweep, OTHER)
    for row, target, score in zip(rows, targets, scores):
        fg, total = int(target.sum()), target.size
        expected = np.array([fg, total - fg, 0, 0])
        assert score.counts.dtype == np.int64 and score.counts.shape == (4,)
        np.testing.assert_array_equal(score.counts, expected)
        np.testing.assert_array_equal(score.other_counts, expected)
        assert score.other_prompt == OTHER[row["task"]]
        assert score.sweep.shape == (3, 4) and score.sweep.dtype == np.int64
        np.testing.assert_array_equal(score.sweep[0], expected)
        np.testing.assert_array_equal(score.sweep[2], [0, 0, fg, total - fg])  # nothing reaches 2.0
        assert score.iou == pytest.approx(fg / total) and score.fg_fraction == fg / total
        assert (score.image, score.task, score.prompt, score.threshold) == (row["image"], row["task"],
                                                                              row["prompt"], 0.0)
    # the middle sweep row equals thresholding the same probabilities at 0.5 (the predict path)
    probs = prompt_probabilities(seg, acts, [r["prompt"] for r in rows], [t.shape for t in targets])
    for prob, target, score in zip(probs, targets, scores):
        np.testing.assert_array_equal(score.sweep[1], evaluation.metrics.confusion(prob >= 0.5, target))


def test_prompt_probabilities_mixed_batch_matches_single_rows(tiny_dir, valid_rows):
    """Decoding each prompt on only its rows (with TTA's doubled activations) gives each row's own result."""
    seg = Segmenter.load(str(tiny_dir), "cpu", tta="flip")
    rows = [valid_rows[5], valid_rows[2], valid_rows[6]]
    images = [load_image(r["image"]) for r in rows]
    sizes = [(50, 70), (64, 64), (33, 20)]
    acts = seg.encode(seg.pixel_values(images))
    assert acts[0].shape[0] == 2 * len(rows)
    prompts = [r["prompt"] for r in rows]
    mixed = prompt_probabilities(seg, acts, prompts, sizes)
    for image, prompt, size, prob in zip(images, prompts, sizes, mixed):
        single = prompt_probabilities(seg, seg.encode(seg.pixel_values([image])), [prompt], [size])[0]
        assert prob.shape == size and prob.dtype == np.float32
        np.testing.assert_allclose(prob, single, atol=1e-5)
    assert prompt_probabilities(seg, acts, [None, None, None], sizes) == [None, None, None]


def score(task: str, counts: list[int], sweep: list[list[int]] | None = None) -> ImageScore:
    return ImageScore(image=f"{task}.jpg", mask="m.png", task=task, prompt=f"segment {task}",
                      counts=np.array(counts, np.int64), threshold=0.5,
                      sweep=None if sweep is None else np.array(sweep, np.int64))


def test_aggregate_overall_is_mean_of_tasks():
    scores = [
        score("a", [4, 0, 0, 12], [[4, 4, 0, 8], [4, 0, 0, 12]]),  # IoU 1; sweep IoU 0.5, 1
        score("a", [0, 0, 0, 16], [[0, 2, 0, 14], [0, 0, 0, 16]]),  # empty gt, empty prediction: 1.0
        score("b", [1, 1, 2, 12], [[1, 1, 2, 12], [0, 0, 3, 13]]),  # IoU 0.25; sweep 0.25, 0
    ]
    agg = aggregate(scores, [0.3, 0.6])
    json.dumps(agg)  # JSON-ready
    a, b, overall = agg["tasks"]["a"], agg["tasks"]["b"], agg["overall"]
    assert (a["iou"], a["n_images"], a["n_empty_gt"], a["n_empty_both"]) == (1.0, 2, 1, 1)
    assert b["iou"] == 0.25 and b["dice"] == pytest.approx(0.4)
    assert overall["iou"] == 0.625  # mean of tasks, not of the 3 images (0.75)
    assert overall["dice"] == pytest.approx((1.0 + 0.4) / 2)
    assert overall["micro_iou"] == pytest.approx((a["micro_iou"] + b["micro_iou"]) / 2)
    assert (overall["n_images"], overall["n_empty_both"]) == (3, 1)
    assert a["sweep_iou"] == [0.25, 1.0] and (a["best_threshold"], a["best_iou"]) == (0.6, 1.0)
    assert b["sweep_iou"] == [0.25, 0.0] and (b["best_threshold"], b["best_iou"]) == (0.3, 0.25)
    assert overall["sweep_iou"] == [0.25, 0.5] and overall["best_iou"] == 0.625
    assert agg["thresholds"] == [0.3, 0.6]
    assert "best_threshold" not in aggregate(scores)["tasks"]["a"]


def test_aggregate_intervals_cover_each_task_and_overall():
    """iou_ci per task from its images' IoUs, overall from each task resampled on its own (metrics.bootstrap_ci,
    tested on hand-made cases); none when a task has fewer than CI_MIN_IMAGES images."""
    n = evaluation.CI_MIN_IMAGES
    a = [score("a", [1, 0, 0, 3]), score("a", [0, 1, 1, 2])] * (n // 2)  # IoU 1 and 0, n images
    b = [score("b", [1, 1, 2, 12])] * n  # IoU 0.25
    agg = aggregate(a + b)
    ious_a = [1.0, 0.0] * (n // 2)
    assert agg["tasks"]["a"]["iou_ci"] == list(metrics.bootstrap_ci(ious_a))
    assert agg["tasks"]["b"]["iou_ci"] == [0.25, 0.25]
    assert agg["overall"]["iou_ci"] == list(metrics.bootstrap_ci([np.array(ious_a), np.full(n, 0.25)]))
    few = aggregate(a + b[1:])  # task b one image short: no interval anywhere
    assert "iou_ci" not in few["tasks"]["a"] and "iou_ci" not in few["tasks"]["b"] and "iou_ci" not in few["overall"]
    assert aggregate([])["overall"] == {"n_images": 0, "n_empty_gt": 0, "n_empty_both": 0}
    table = report._results_section({"kind": "pred_dir", **agg})
    assert "| a | segment a | 10 | 0.5000 | {} |".format(report.interval_text(agg["tasks"]["a"]["iou_ci"])) in table
    assert "| b | segment b | 10 | 0.2500 | 0.2500 to 0.2500 |" in table
    assert "| b | segment b | 9 | 0.2500 |  |" in report._results_section({"kind": "pred_dir", **few})


def at(image: str, task: str, counts: list[int]) -> ImageScore:
    return ImageScore(image=image, mask="m.png", task=task, prompt="p", counts=np.array(counts, np.int64))


def test_paired_difference_hand_made():
    """B - A on the images both scored; an image only one of them scored is left out."""
    a = [at("1.jpg", "a", [1, 1, 0, 2]), at("2.jpg", "a", [1, 0, 0, 3]), at("3.jpg", "b", [2, 0, 0, 2]),
         at("only_a.jpg", "b", [0, 1, 0, 3])]
    b = [at("1.jpg", "a", [1, 0, 0, 3]), at("2.jpg", "a", [1, 0, 0, 3]), at("3.jpg", "b", [1, 0, 1, 2]),
         at("only_b.jpg", "a", [0, 1, 0, 3]), at("1.jpg", "b", [0, 1, 0, 3])]  # 1.jpg: no task b in A
    paired = evaluation.paired_difference(evaluation.iou_by_image(a), evaluation.iou_by_image(b))
    ta, tb, overall = paired["tasks"]["a"], paired["tasks"]["b"], paired["overall"]
    assert ta == {"n_images": 2, "iou_a": 0.75, "iou_b": 1.0, "iou_diff": 0.25, "iou_diff_ci": None}  # +0.5 and 0
    assert tb == {"n_images": 1, "iou_a": 1.0, "iou_b": 0.5, "iou_diff": -0.5, "iou_diff_ci": None}
    assert overall == {"n_images": 3, "iou_a": 0.875, "iou_b": 0.75, "iou_diff": -0.125, "iou_diff_ci": None}
    assert evaluation.paired_difference(evaluation.iou_by_image(a), {}) == {"tasks": {}, "overall": {}}
    # paired by file name: a report made where the data lay elsewhere pairs too
    moved = [at("/elsewhere/" + s.image, s.task, list(s.counts)) for s in b]
    assert evaluation.paired_difference(evaluation.iou_by_image(a), evaluation.iou_by_image(moved)) == paired


def test_paired_difference_intervals_from_ten_images():
    many_a = [at(f"{i}.jpg", "a", [1, 1, 0, 2]) for i in range(10)]  # IoU 0.5
    many_b = [at(f"{i}.jpg", "a", [1, 0, 0, 3] if i % 2 else [1, 1, 0, 2]) for i in range(10)]  # 1.0 or 0.5
    paired = evaluation.paired_difference(evaluation.iou_by_image(many_a), evaluation.iou_by_image(many_b))
    diffs = [0.5 if i % 2 else 0.0 for i in range(10)]
    assert paired["tasks"]["a"]["iou_diff_ci"] == list(metrics.bootstrap_ci(diffs))
    assert paired["overall"]["iou_diff_ci"] == list(metrics.bootstrap_ci([np.array(diffs)]))
    same = evaluation.paired_difference(evaluation.iou_by_image(many_a), evaluation.iou_by_image(many_a))["overall"]
    assert (same["iou_diff"], same["iou_diff_ci"]) == (0.0, [0.0, 0.0])


def test_images_sharing_a_name_are_not_paired():
    twins = [at("/x/1.jpg", "a", [1, 0, 0, 3]), at("/y/1.jpg", "a", [0, 1, 0, 3]), at("/y/1.jpg", "b", [1, 0, 0, 3])]
    with pytest.raises(ValueError, match="run A: two images of task a are named 1.jpg"):
        evaluation.iou_by_image(twins, "run A")
    assert len(evaluation.iou_by_image(twins[1:])) == 2  # one name in two tasks is fine


def test_text_sensitivity_scores_the_right_behaviour_best():
    """The other prompt marking nothing on an image without foreground is right and must not count as
    IoU 1.0: IoU and Dice over images with foreground only, the marked area over every image."""
    other = np.array([[2, 2, 2, 10],    # foreground: IoU 2/6, Dice 4/8, marks 4/16 of the image
                      [0, 0, 0, 16],    # empty ground truth, nothing marked: the right answer
                      [0, 8, 0, 8]])    # empty ground truth, half the image marked
    t = text_sensitivity(other)
    assert t["text_iou"] == pytest.approx(1 / 3) and t["text_dice"] == pytest.approx(0.5)
    assert t["text_area"] == pytest.approx((4 / 16 + 0 + 8 / 16) / 3)
    assert text_sensitivity(other[1:2]) == {"text_iou": 0.0, "text_dice": 0.0, "text_area": 0.0}


# --------------------------------------------------------------------------------------------------
# A model end to end


def test_model_end_to_end_writes_every_output(processed, tiny_dir, valid_rows, tmp_path):
    out = tmp_path / "report"
    assert run("--model", str(tiny_dir), "--data", str(processed), "--out", str(out), "--batch-size", "3",
               "--examples", "1", "-q") == 0
    m = load_metrics(out)
    for key in ("command", "data", "split", "conventions", "tasks", "overall", "thresholds", "runtime",
                "footprint", "skipped", "leakage", "examples"):
        assert key in m, key
    for t in m["tasks"].values():
        assert 0.0 <= t["iou"] <= 1.0 and len(t["sweep_iou"]) == 19 and "best_threshold" in t
        assert "text_iou" in t and t["threshold"] == 0.5
    assert m["tasks"]["cracks"]["text_prompt"] == "segment taping area"
    assert m["runtime"]["warm"] and m["runtime"]["images_timed"] == 5  # the first batch of 3 left out
    assert m["footprint"]["parameters"] > m["footprint"]["decoder_parameters"] > 0
    assert m["footprint"]["decoder_file"] is None and m["footprint"]["model_folder_bytes"] > 0
    assert m["leakage"]["tasks"]["drywall"]["same_source_as_train"] == 2
    rows = per_image(out)
    assert len(rows) == len(valid_rows) == 8
    assert list(rows[0]) == report.PER_IMAGE_COLUMNS and all(r["other_prompt_iou"] for r in rows)
    text = (out / "report.md").read_text()
    assert "averaged over images" in text and "scores 1.0" in text and "original resolution" in text
    assert "python evaluate.py --model" in text and "## Data leakage" in text and "n/a" in text
    assert "mean of 2 tasks" in text and "not trained by train.py" in text  # a random tiny model says so
    for name in ("threshold_curves.png", "examples_cracks.png", "examples_drywall.png"):
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 100, name
    assert not (out / "masks").exists()


def test_save_masks_match_the_predict_path(processed, tiny_dir, segmenter, valid_rows, tmp_path):
    out = tmp_path / "report"
    assert run("--model", str(tiny_dir), "--data", str(processed), "--out", str(out), "--save-masks",
               "--batch-size", "1", "--examples", "0", "--threshold", "0.55", "-q") == 0
    csv_rows = {r["image"]: r for r in per_image(out)}
    seg = Segmenter.load(str(tiny_dir), "cpu", default_threshold=0.55)
    for row in valid_rows:
        saved = read_mask_png(out / "masks" / mask_name(row["image"], prompt_slug(row["prompt"])))
        gt = read_mask_png(row["mask"])
        assert saved.shape == gt.shape
        expected = seg.predict([load_image(row["image"])], [row["prompt"]])[row["prompt"]][0]
        np.testing.assert_array_equal(saved, expected)
        assert int(csv_rows[row["image"]]["tp"]) == int((saved & gt).sum())
        assert int(csv_rows[row["image"]]["fp"]) == int((saved & ~gt).sum())
    assert len(list((out / "masks").iterdir())) == 8
    assert load_metrics(out)["threshold_source"] == "--threshold"


def test_write_thresholds_updates_the_checkpoint(processed, tiny_dir, tmp_path, capsys):
    model = tmp_path / "run" / "best"
    shutil.copytree(tiny_dir, model)
    (model / METADATA_FILE).write_text(json.dumps({"note": "kept", "thresholds": {"Segment Crack": 0.9}}))
    base, _ = load_model(tiny_dir)
    save_decoder(base, model / DECODER_FILE, {"thresholds": {"Segment Crack": 0.9}}, base_model=str(tiny_dir))
    out = tmp_path / "report"
    assert run("--model", str(model), "--data", str(processed), "--out", str(out), "--write-thresholds",
               "--thresholds-sweep", "0.3", "0.6", "0.2", "--examples", "0", "-q") == 0
    m = load_metrics(out)
    assert m["thresholds"] == [0.2, 0.3, 0.6]
    best = {t["prompt"]: t["best_threshold"] for t in m["tasks"].values()}
    meta = read_metadata(model)
    assert meta["note"] == "kept" and meta["thresholds"] == best  # the old "Segment Crack" key replaced
    assert meta["thresholds_sources"]["segment crack"]["split"] == "valid" and "thresholds_source" not in meta
    code, log = run_logged(capsys, "--model", str(model), "--data", str(processed), "--out", str(tmp_path / "r2"),
                           "--tta", "--examples", "0")
    assert code == 0 and "were tuned with no --tta (evaluate.py --write-thresholds on valid); this run uses --tta flip" in log
    # Scored again on the images they were tuned on, the report says so (the checkpoint's own selection
    # split may be another one).
    setup = (tmp_path / "r2" / "report.md").read_text()
    assert "tuned on the images scored here by evaluate.py --write-thresholds, so these numbers are optimistic" in setup
    seg = Segmenter.load(str(model), "cpu")
    assert seg.threshold("segment crack") == best["segment crack"]
    assert seg.threshold("segment wall crack") == best["segment crack"]  # synonyms share it
    assert seg.threshold("segment taping area") == best["segment taping area"]
    assert "Best thresholds written" in (out / "report.md").read_text()
    assert m["thresholds_written"]["thresholds"] == best
    assert read_metadata(model / DECODER_FILE)["thresholds"] == best  # the decoder file agrees


def test_write_thresholds_of_one_task_keeps_the_others_record(processed, tiny_dir, tmp_path, capsys):
    """Each prompt's threshold keeps how it was tuned: retuning taping with --tta leaves crack's record (no
    --tta) alone, and the mismatch warning names the prompts a run uses whose records differ from it."""
    model = tmp_path / "best"
    shutil.copytree(tiny_dir, model)
    args = ["--model", str(model), "--data", str(processed), "--examples", "0"]
    assert run(*args, "--out", str(tmp_path / "r1"), "--write-thresholds", "-q") == 0
    assert run(*args, "--out", str(tmp_path / "r2"), "--write-thresholds", "--tasks", "drywall", "--tta", "-q") == 0
    sources = read_metadata(model)["thresholds_sources"]
    assert sources["segment crack"]["tta"] is None and sources["segment taping area"]["tta"] == "flip"

    def warning(*extra: str) -> str:
        code, log = run_logged(capsys, *args, "--out", str(tmp_path / "r3"), *extra)
        assert code == 0
        return "\n".join(line for line in log.splitlines() if "were tuned with" in line)

    assert warning("--tasks", "drywall", "--tta") == "" and warning("--tasks", "cracks") == ""
    assert "for 'segment crack' were tuned with no --tta" in warning("--tasks", "cracks", "--tta")
    assert "for 'segment taping area' were tuned with --tta flip" in warning("--tasks", "drywall")


def test_thresholds_mismatch_reads_the_record_of_earlier_versions():
    """A checkpoint tuned before records were per prompt: its one ``thresholds_source`` covers them all."""
    from defectseg.inference import threshold_sources, thresholds_mismatch
    legacy = {"thresholds": {"Segment Crack": 0.4, "segment taping area": 0.6},
              "thresholds_source": {"split": "valid", "tta": "d4", "ensemble": False}}
    assert set(threshold_sources(legacy)) == {"segment crack", "segment taping area"}
    assert "were tuned with --tta d4" in thresholds_mismatch(legacy, "m", None, False, ["segment crack"])
    assert thresholds_mismatch(legacy, "m", "d4", False) is None
    assert thresholds_mismatch({"thresholds": {"segment crack": 0.4}}, "m", "flip", True) is None  # train.py's


def with_test_split(processed: Path, tmp_path: Path) -> Path:
    """A copy of the processed sample whose test split is its valid one (the module's fixture stays as is)."""
    data = tmp_path / "data"
    shutil.copytree(processed, data)
    shutil.copytree(data / "valid", data / "test")
    return data


def test_write_thresholds_refused(processed, tiny_dir, tmp_path, capsys):
    processed = with_test_split(processed, tmp_path)
    before = sorted(p.name for p in tiny_dir.iterdir())
    code, log = run_logged(capsys, "--model", str(tiny_dir), "--data", str(processed), "--split", "test", "--out",
                   str(tmp_path / "r"), "--write-thresholds")
    assert code == 1 and "test split" in log
    assert sorted(p.name for p in tiny_dir.iterdir()) == before and not (tmp_path / "r").exists()
    for spelled in ("test/", "./test", "TEST"):  # the same folder (TEST: on case-insensitive file systems)
        code, log = run_logged(capsys, "--model", str(tiny_dir), "--data", str(processed), "--split", spelled,
                               "--out", str(tmp_path / "r"), "--write-thresholds")
        assert code == 1 and "test split" in log, spelled
    code, log = run_logged(capsys, "--model", "CIDAS/clipseg-rd64-refined", "--data", str(processed),
                           "--write-thresholds")
    assert code == 1 and "Hub id" in log
    decoder = tmp_path / "decoder.safetensors"
    model, _ = load_model(tiny_dir)
    save_decoder(model, decoder, {}, base_model=str(tiny_dir))
    code, log = run_logged(capsys, "--model", str(decoder), "--data", str(processed), "--write-thresholds")
    assert code == 1 and "is a file" in log
    code, log = run_logged(capsys, "--pred-dir", str(tmp_path), "--data", str(processed), "--write-thresholds")
    assert code == 1 and "need a model" in log


@pytest.mark.parametrize("n_images, n, labels", [
    (2, 2, ["best", "median"]),  # fewer than 3n: thirds of the ranking, the lower one never "best"
    (4, 3, ["best", "best", "median", "worst"]),
    (2, 1, ["best", "median"]),
    (3, 1, ["best", "median", "worst"]),
    (7, 2, ["best", "best", "median", "median", "worst", "worst"]),  # ranks 0 1, 2 3, 5 6
])
def test_example_picks_are_labelled_by_where_they_rank(n_images, n, labels):
    scores = [score(f"t{i}", [10 - i, i, 0, 0]) for i in range(n_images)]  # IoU falls with i
    picks = report.pick_examples(scores, n)
    assert [label for label, _ in picks] == labels
    ious = [s.iou for _, s in picks]
    assert ious == sorted(ious, reverse=True) and len({s.image for _, s in picks}) == len(picks)
    if n_images == 7:
        assert [s.image for _, s in picks] == ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg", "t5.jpg", "t6.jpg"]


def test_a_bar_or_newline_in_a_prompt_or_path_stays_in_its_table_cell():
    table = report._table(["a", "b"], [["segment crack | fissure", "runs/x|y\nz"]]).splitlines()
    assert table[2] == "| segment crack \\| fissure | runs/x\\|y z |"


def test_a_task_name_that_is_not_one_folder_name_is_refused(tmp_path):
    """In a tasks file; a checkpoint made before the rule still loads."""
    from defectseg.tasks import TaskTableError, load_tasks, load_tasks_from_metadata

    spec = {"walls/cracks": {"prompt": "segment wall crack", "dirs": ["walls"]}}
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"tasks": spec}))
    with pytest.raises(TaskTableError, match="task name 'walls/cracks' must be one folder name"):
        load_tasks(tasks)
    assert list(load_tasks_from_metadata({"tasks": spec})) == ["walls/cracks"]


def test_binary_masks_at_a_threshold_below_one_are_not_warned_about(processed, valid_rows, tmp_path, capsys):
    """{0, 255} masks (what predict.py writes) at --pred-threshold 0.5 score as they are: no warning."""
    preds = tmp_path / "preds"
    preds.mkdir()
    for row in valid_rows:
        shutil.copy(row["mask"], pred_file(preds, row))
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(tmp_path / "r"),
                           "--examples", "0", "--pred-threshold", "0.5")
    assert code == 0 and "--pred-threshold 0.5" not in log and load_metrics(tmp_path / "r")["overall"]["iou"] == 1.0


def test_compare_shows_b_s_missing_files(processed, valid_rows, tmp_path):
    """B's missing masks explain its lower numbers: report.md lists them as it does A's."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        for row in valid_rows:
            shutil.copy(row["mask"], pred_file(folder, row))
    pred_file(b, valid_rows[0]).unlink()
    out = tmp_path / "report"
    assert run("--pred-dir", str(a), "--compare", str(b), "--data", str(processed), "--out", str(out),
               "--examples", "0", "-q") == 0
    text = (out / "report.md").read_text()
    assert "Of B:" in text and "1 prediction file(s) missing" in text and pred_file(b, valid_rows[0]).name in text


def test_compare_adds_side_by_side_columns(processed, tiny_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "report"
    assert run("--model", str(tiny_dir), "--compare", str(other), "--data", str(processed), "--out", str(out),
               "--tasks", "cracks", "--examples", "0", "-q") == 0
    m = load_metrics(out)
    assert set(m["tasks"]) == {"cracks"} and m["compare"]["model"] == str(other)
    assert set(m["compare"]["tasks"]) == {"cracks"} and m["compare"]["kind"] == "model"
    assert m["tasks"]["cracks"]["text_prompt"] == "segment taping area"  # other task's prompt, from the manifest
    text = (out / "report.md").read_text()
    assert "## Comparison" in text and "mean IoU: A" in text and "B - A" in text and str(other) in text
    diff = m["compare"]["tasks"]["cracks"]["iou"] - m["tasks"]["cracks"]["iou"]
    assert f"{diff:.4f}" in text
    paired = m["compare"]["paired"]["tasks"]["cracks"]  # same images: the paired mean is the difference
    assert paired["n_images"] == m["tasks"]["cracks"]["n_images"] and paired["iou_diff"] == pytest.approx(diff)
    assert paired["iou_a"] == pytest.approx(m["tasks"]["cracks"]["iou"])
    # the sample's few valid images: no interval (a percentile bootstrap on 4 images covers too little)
    assert paired["n_images"] < evaluation.CI_MIN_IMAGES and paired["iou_diff_ci"] is None
    assert f"| cracks | {paired['n_images']} | {paired['iou_diff']:+.4f} |  |" in text
    assert "iou_ci" not in m["tasks"]["cracks"] and f"none below {evaluation.CI_MIN_IMAGES} images" in text


def test_decoder_file_is_found_for_the_footprint(tiny_dir, tmp_path):
    model_dir = tmp_path / "run" / "best"
    shutil.copytree(tiny_dir, model_dir)
    decoder = tmp_path / "run" / "decoder.safetensors"
    decoder.write_bytes(b"x" * 10)
    assert evaluation.find_decoder_file(str(model_dir)) == decoder
    model, _ = load_model(model_dir)
    f = evaluation.model_footprint(str(model_dir), parameter_counts(model))
    assert f["decoder_file_bytes"] == 10 and f["model_folder_bytes"] > 10
    (model_dir / "README.md").write_text("a model card")  # a shipped model's card and report: not the model
    (model_dir / "report").mkdir()
    (model_dir / "report" / "examples.png").write_bytes(b"x" * 1000)
    assert evaluation.model_footprint(str(model_dir), parameter_counts(model)) == f
    assert f["model_folder_bytes"] == sum(p.stat().st_size for p in tiny_dir.iterdir())
    assert f["parameters"] > f["decoder_parameters"] > 0
    assert evaluation.model_footprint("CIDAS/clipseg-rd64-refined", parameter_counts(model))["model_folder_bytes"] is None


# --------------------------------------------------------------------------------------------------
# Bad input


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    code, log = run_logged(capsys, "--pred-dir", str(tmp_path), "--data", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "r"))
    assert code == 1 and "no manifest at" in log and "preprocess_masks.py" in log
    assert not (tmp_path / "r").exists()
    # Raw Roboflow exports given as --data: the hint says to preprocess them into another folder.
    code, log = run_logged(capsys, "--pred-dir", str(tmp_path), "--data", str(SAMPLE), "--out", str(tmp_path / "r"))
    assert code == 1 and "raw COCO exports" in log and f"--data-root {SAMPLE} --out processed_dataset" in log


def test_model_load_error_is_one_line(processed, tmp_path, capsys):
    code, log = run_logged(capsys, "--model", str(tmp_path / "no-such-model"), "--data", str(processed), "--out",
                   str(tmp_path / "r"))
    assert code == 1 and "does not exist" in log and "Traceback" not in log


def test_unknown_task_is_a_clear_error(processed, tmp_path, capsys):
    code, log = run_logged(capsys, "--pred-dir", str(tmp_path), "--data", str(processed), "--tasks", "rust")
    assert code == 1 and "rust" in log and "cracks" in log


def test_unreadable_image_is_skipped_and_reported(tiny_dir, valid_rows, tmp_path):
    data = tmp_path / "data"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    rows = [dict(r) for r in valid_rows]
    rows[1]["image"] = str(broken)
    write_manifest(data / "valid" / "manifest.csv", rows)
    out = tmp_path / "report"
    assert run("--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--examples", "0", "-q") == 0
    m = load_metrics(out)
    assert m["n_skipped"] == 1 and m["skipped"][0]["image"] == str(broken)
    assert m["overall"]["n_images"] == 7 and len(per_image(out)) == 7
    assert "1 image(s) skipped" in (out / "report.md").read_text()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), hidden ones included."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def test_default_out_is_per_split(processed, tmp_path, monkeypatch):
    """Without --out, valid and test reports land in different folders; neither replaces the other."""
    processed = with_test_split(processed, tmp_path)
    monkeypatch.chdir(tmp_path)
    masks = tmp_path / "gt"
    shutil.copytree(processed / "valid" / "masks", masks)
    for split in ("valid", "test"):
        assert run("--pred-dir", str(masks), "--data", str(processed), "--split", split, "--examples", "0",
                   "-q") == 0
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["gt-test", "gt-valid"]
    for split in ("valid", "test"):
        m = load_metrics(tmp_path / "reports" / f"gt-{split}")
        assert m["split"] == split and f"--out reports/gt-{split}" in m["command"]


def test_rerun_replaces_the_whole_report(processed, tiny_dir, tmp_path, capsys):
    """A second report in the same folder leaves none of the first one's files (examples of a task it does not
    score, masks it does not save) and no temp folder; a folder holding anything else is refused, untouched."""
    out = tmp_path / "report"
    assert run("--model", str(tiny_dir), "--data", str(processed), "--out", str(out), "--save-masks", "-q") == 0
    assert {"examples_cracks.png", "examples_drywall.png", "masks"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "masks").iterdir())) == 8
    assert run("--model", str(tiny_dir), "--data", str(processed), "--out", str(out), "--tasks", "cracks",
               "--save-masks", "-q") == 0
    assert len(list((out / "masks").iterdir())) == 4  # the old folder replaced, not merged into
    assert run("--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed), "--out", str(out),
               "--tasks", "cracks", "-q") == 0
    assert sorted(p.name for p in out.iterdir()) == ["examples_cracks.png", "metrics.json", "per_image.csv",
                                                      "report.md"]
    assert {r["task"] for r in per_image(out)} == {"cracks"} and load_metrics(out)["kind"] == "pred_dir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # nothing left beside it
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, log = run_logged(capsys, "--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed),
                           "--out", str(out))
    assert code == 1 and f"--out {out}: holds notes.txt, which no report wrote" in error_lines(log)[0]
    assert snapshot(out) == before


def test_bad_compare_changes_neither_checkpoint_nor_report(processed, tiny_dir, tmp_path, capsys):
    """--write-thresholds with a --compare that cannot be loaded: exit 1 before anything is written."""
    model = tmp_path / "run" / "best"
    shutil.copytree(tiny_dir, model)
    (model / METADATA_FILE).write_text(json.dumps({"thresholds": {"segment crack": 0.9}}))
    out = tmp_path / "report"
    assert run("--model", str(model), "--data", str(processed), "--out", str(out), "-q") == 0
    report_before, model_before = snapshot(out), snapshot(model)
    code, log = run_logged(capsys, "--model", str(model), "--data", str(processed), "--out", str(out),
                           "--write-thresholds", "--compare", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in log and "Traceback" not in log and len(error_lines(log)) == 1
    assert f"scoring {model}" not in log  # the model to compare with is loaded first
    assert snapshot(out) == report_before and snapshot(model) == model_before


def test_full_disk_leaves_report_and_checkpoint_as_they_were(processed, tiny_dir, tmp_path, capsys, monkeypatch):
    """Writing fails half-way (metrics.json written, per_image.csv not): one line naming the folder, the earlier
    report untouched, no temp folder left, and --write-thresholds did not touch the checkpoint."""
    model = tmp_path / "best"
    shutil.copytree(tiny_dir, model)
    out = tmp_path / "report"
    assert run("--model", str(model), "--data", str(processed), "--out", str(out), "--examples", "0", "-q") == 0
    report_before, model_before = snapshot(out), snapshot(model)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_text_atomic", full)
    code, log = run_logged(capsys, "--model", str(model), "--data", str(processed), "--out", str(out),
                           "--write-thresholds", "--tasks", "cracks", "-q")
    assert code == 1 and "Traceback" not in log
    assert error_lines(log) and f"cannot write the report to {out}: No space left on device" in error_lines(log)[0]
    assert snapshot(out) == report_before and snapshot(model) == model_before
    new = tmp_path / "new" / "report"  # no half-written report, no temp folder beside it
    code, _ = run_logged(capsys, "--model", str(model), "--data", str(processed), "--out", str(new), "-q")
    assert code == 1 and not list((tmp_path / "new").iterdir())


def test_out_that_cannot_be_written_is_refused_before_scoring(processed, tmp_path, capsys, monkeypatch):
    masks = str(processed / "valid" / "masks")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in ((a_file, f"--out {a_file} is a file, not a folder"),
                         (a_file / "sub", f"--out {a_file / 'sub'}: {a_file} is a file, not a folder")):
        code, log = run_logged(capsys, "--pred-dir", masks, "--data", str(processed), "--out", str(out))
        assert code == 1 and error_lines(log)[0].endswith(message) and "scoring" not in log
    assert a_file.read_text() == "x"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    code, log = run_logged(capsys, "--pred-dir", masks, "--data", str(processed), "--out", str(locked / "r"))
    assert code == 1 and f"{locked} is not writable" in log and "scoring" not in log
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("meta, problem", [
    ({"tasks": {"x": {"prompt": 3}}}, "task 'x' needs a non-empty string 'prompt'"),
    ({"tasks": ["cracks"]}, "'tasks' must be an object"),
    ({"tasks": {"x": {"prompt": "segment x", "synonyms": "segment y"}}}, "'synonyms' must be a list of strings"),
    ({"thresholds": {"segment crack": "high"}}, "the threshold of 'segment crack' is \"high\", not a number"),
    ({"thresholds": {"segment crack": 1.5}}, "is 1.5, not a number in [0, 1]"),
    ({"thresholds": {"segment crack": None}}, "is null, not a number"),
    ({"thresholds": [0.5]}, "'thresholds' must be an object"),
])
@pytest.mark.parametrize("as_compare", [False, True])
def test_bad_checkpoint_metadata_is_one_line(processed, tiny_dir, tmp_path, capsys, meta, problem, as_compare):
    model = tmp_path / "best"
    shutil.copytree(tiny_dir, model)
    (model / METADATA_FILE).write_text(json.dumps(meta))
    models = ["--model", str(tiny_dir), "--compare", str(model)] if as_compare else ["--model", str(model)]
    code, log = run_logged(capsys, *models, "--data", str(processed), "--out", str(tmp_path / "r"))
    assert code == 1 and "Traceback" not in log and "scoring" not in log
    assert error_lines(log) == [line for line in log.splitlines() if problem in line]
    assert f"{model / METADATA_FILE}: " in error_lines(log)[0]
    assert not (tmp_path / "r").exists()


def test_checkpoint_threshold_written_as_a_string_number_is_used(processed, tiny_dir, tmp_path):
    """What the loader accepts (float("0.25")) evaluate accepts too."""
    model = tmp_path / "best"
    shutil.copytree(tiny_dir, model)
    (model / METADATA_FILE).write_text(json.dumps({"thresholds": {"segment crack": "0.25"}}))
    out = tmp_path / "r"
    assert run("--model", str(model), "--data", str(processed), "--out", str(out), "--tasks", "cracks",
               "--examples", "0", "-q") == 0
    assert load_metrics(out)["tasks"]["cracks"]["threshold"] == 0.25


def test_is_graded():
    assert not evaluation.is_graded(np.array([[0, 255], [255, 0]], np.uint8))
    assert not evaluation.is_graded(np.array([[0, 1], [1, 0]], np.uint8))
    assert not evaluation.is_graded(np.zeros((2, 2), np.uint8))
    assert not evaluation.is_graded(np.full((2, 2), 255, np.uint8))
    assert not evaluation.is_graded(np.array([[0, 65535]], np.uint16))
    assert evaluation.is_graded(np.array([[0, 1, 255]], np.uint8))
    assert evaluation.is_graded(np.array([[3, 200]], np.uint8))


def test_probability_maps_are_warned_about_and_can_be_thresholded(processed, valid_rows, tmp_path, capsys):
    """Masks saved as probabilities (foreground 200, background 40): binarized at > 0 every pixel is foreground,
    so an image's IoU is its ground truth's foreground fraction (one warning names a file); --pred-threshold
    128 recovers the ground truth exactly (IoU 1.0)."""
    preds = tmp_path / "probs"
    preds.mkdir()
    fg = {}
    for row in valid_rows:
        gt = read_mask_png(row["mask"])
        cv2.imwrite(str(pred_file(preds, row)), np.where(gt, 200, 40).astype(np.uint8))
        fg.setdefault(row["task"], []).append(gt.mean())
    out = tmp_path / "r"
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(out),
                           "--examples", "0")
    assert code == 0
    warnings = [line for line in log.splitlines() if "hold values other than 0 and 255" in line]
    assert len(warnings) == 1 and "8 prediction(s)" in warnings[0] and "--pred-threshold" in warnings[0]
    assert pred_file(preds, valid_rows[0]).name in warnings[0]
    m = load_metrics(out)
    for task, fractions in fg.items():
        assert m["tasks"][task]["iou"] == pytest.approx(np.mean(fractions), abs=1e-12)
        assert m["tasks"][task]["recall"] == 1.0
    assert m["predictions"]["graded"]["count"] == 8 and m["pred_threshold"] is None
    assert "8 prediction file(s) holding values other than 0" in (out / "report.md").read_text()

    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(out),
                           "--pred-threshold", "128")
    assert code == 0 and "hold values" not in log
    m = load_metrics(out)
    assert m["overall"]["iou"] == 1.0 and m["pred_threshold"] == 128
    assert m["conventions"]["threshold_rule"] == "foreground iff pixel value >= 128"
    assert "--pred-threshold 128" in m["command"]
    assert "a pixel is foreground iff its value >= 128" in (out / "report.md").read_text()
    assert "is above every value" not in log and "is a value as stored" not in log

    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(out),
                           "--pred-threshold", "0.5")  # a probability, on masks of 0..255
    warnings = [line for line in log.splitlines() if "--pred-threshold 0.5 is a value as stored" in line]
    assert code == 0 and len(warnings) == 1 and "8 prediction(s)" in warnings[0] and "up to 200" in warnings[0]
    assert load_metrics(out)["tasks"]["cracks"]["recall"] == 1.0  # every pixel counted, as warned


def test_zero_one_masks_are_not_warned_about(processed, valid_rows, tmp_path, capsys):
    preds = tmp_path / "binary"
    preds.mkdir()
    for row in valid_rows:
        cv2.imwrite(str(pred_file(preds, row)), read_mask_png(row["mask"]).astype(np.uint8))  # {0, 1}
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out",
                           str(tmp_path / "r"), "--examples", "0")
    assert code == 0 and "hold values" not in log
    m = load_metrics(tmp_path / "r")
    assert m["overall"]["iou"] == 1.0 and m["predictions"]["graded"]["count"] == 0
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out",
                           str(tmp_path / "r"), "--examples", "0", "--pred-threshold", "128")  # all erased
    warnings = [line for line in log.splitlines() if "--pred-threshold 128 is above every value" in line]
    assert code == 0 and len(warnings) == 1 and "(the largest: 1," in warnings[0]
    assert load_metrics(tmp_path / "r")["tasks"]["cracks"]["recall"] == 0.0
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out",
                           str(tmp_path / "r"), "--examples", "0", "--pred-threshold", "1")
    assert code == 0 and "--pred-threshold" not in log and load_metrics(tmp_path / "r")["overall"]["iou"] == 1.0


def test_pred_threshold_is_checked(processed, tmp_path, capsys):
    code, log = run_logged(capsys, "--data", str(processed), "--pred-threshold", "128", "--out", str(tmp_path / "r"))
    assert code == 1 and "needs --pred-dir" in log
    code, log = run_logged(capsys, "--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed),
                           "--pred-threshold", "300", "--out", str(tmp_path / "r"))
    assert code == 1 and "above 255, the largest value of the 8-bit masks" in log
    for bad in ("0", "65536", "half"):
        with pytest.raises(SystemExit) as exc:
            evaluate.build_parser().parse_args(["--pred-dir", str(tmp_path), "--pred-threshold", bad])
        assert exc.value.code == 2


def test_ground_truth_of_another_size_is_warned_about(processed, tiny_dir, valid_rows, tmp_path, capsys):
    """Row 0's ground truth shrunk to half its image's size (640x640 -> 320x320). The full-size predictions
    (the ground truths themselves) are resized nearest to it exactly as the ground truth was, so every image
    still scores 1.0; the mismatch is warned about naming the file, and listed."""
    data = tmp_path / "data"
    rows = [dict(r) for r in valid_rows]
    gt = read_mask_png(rows[0]["mask"])
    assert gt.shape == (640, 640) and (rows[0]["width"], rows[0]["height"]) == ("640", "640")
    small = tmp_path / "small" / Path(rows[0]["mask"]).name
    small.parent.mkdir()
    cv2.imwrite(str(small), cv2.resize(gt.astype(np.uint8) * 255, (320, 320), interpolation=cv2.INTER_NEAREST_EXACT))
    rows[0]["mask"] = str(small)
    write_manifest(data / "valid" / "manifest.csv", rows)
    expected = f"{small.name}: ground truth 320x320, image 640x640"
    for source in (["--pred-dir", str(processed / "valid" / "masks")], ["--model", str(tiny_dir)]):
        out = tmp_path / source[0].strip("-")
        code, log = run_logged(capsys, *source, "--data", str(data), "--out", str(out), "--examples", "0")
        assert code == 0
        warnings = [line for line in log.splitlines() if "not the size of their image" in line]
        assert len(warnings) == 1 and "1 ground-truth mask(s)" in warnings[0] and expected in warnings[0]
        m = load_metrics(out)
        assert m["gt_resized"] == {"count": 1, "first": [expected]}
        assert "1 ground-truth mask(s) not the size of their image" in (out / "report.md").read_text()
        if source[0] == "--pred-dir":
            assert m["overall"]["iou"] == 1.0 and m["predictions"]["resized"]["count"] == 1
        else:
            row = next(r for r in per_image(out) if r["image"] == rows[0]["image"])
            assert int(row["tp"]) + int(row["fn"]) == int(read_mask_png(small).sum())  # scored at 320x320



@pytest.mark.parametrize("model,label", [("runs/demo/best", "demo/best"), ("models/liteseg", "liteseg"),
                                         ("CIDAS/clipseg-rd64-refined", "clipseg-rd64-refined"), ("best", "best")])
def test_model_label_names_the_run_of_a_checkpoint(model, label):
    assert report.model_label(model) == label


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--pred-dir", "--write-thresholds", "--compare", "--thresholds-sweep", "--save-masks"):
        assert option in text


def test_default_out():
    """Each split gets its own default folder: --split test never lands on the valid report."""
    assert evaluate.default_out("runs/exp1/best", "valid") == Path("reports/exp1-valid")
    assert evaluate.default_out("runs/exp1/best", "test") == Path("reports/exp1-test")
    assert evaluate.default_out("runs/exp1/last", "valid") == Path("reports/exp1-last-valid")
    assert evaluate.default_out("CIDAS/clipseg-rd64-refined", "valid") == Path("reports/clipseg-rd64-refined-valid")
    assert evaluate.default_out("runs/exp1/decoder.safetensors", "test") == Path("reports/decoder-test")
    assert evaluate.default_out("runs/exp1/best/decoder.safetensors", "valid") == Path("reports/exp1-valid")
    assert evaluate.default_out("their_masks/", "valid") == Path("reports/their_masks-valid")
    assert evaluate.default_out(".", "valid") == Path(f"reports/{Path.cwd().name}-valid")


# --------------------------------------------------------------------------------------------------
# Real masks made by other public solutions, against exact COCO ground truth


@pytest.fixture(scope="module")
def shared_valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED_DATA / "cracks-3ii36").is_dir() or not PEERS.is_dir():
        pytest.skip(f"real data or peer predictions not present ({SHARED_DATA}, {PEERS})")
    return preprocess(SHARED_DATA, tmp_path_factory.mktemp("shared") / "processed", "--splits", "valid")


@pytest.mark.slow
@pytest.mark.parametrize("folder, tasks, missing", [
    ("arnabrai-89df6ed", ["cracks"], 1),  # README: crack 200, one valid image has no mask
    ("chandanrkumar-42ded71", ["cracks", "drywall"], 0),
])
def test_peer_predictions(shared_valid, tmp_path, folder, tasks, missing):
    if not (PEERS / folder).is_dir():
        pytest.skip(f"{PEERS / folder} not present")
    out = tmp_path / "report"
    assert run("--pred-dir", str(PEERS / folder), "--data", str(shared_valid), "--out", str(out),
               "--tasks", *tasks, "--examples", "0", "-q") == 0
    m = load_metrics(out)
    assert set(m["tasks"]) == set(tasks)
    for t in tasks:
        assert m["tasks"][t]["n_images"] == {"cracks": 201, "drywall": 202}[t]
        assert 0.0 < m["tasks"][t]["iou"] < 1.0 and 0.0 < m["tasks"][t]["dice"] < 1.0
        assert m["tasks"][t]["iou"] < m["tasks"][t]["dice"]
    assert m["predictions"]["missing"]["count"] == missing
    assert m["predictions"]["resized"]["count"] == 0


def test_write_thresholds_keeps_both_files_in_agreement(tiny_dir, tmp_path, monkeypatch):
    """If the decoder file cannot be updated, defectseg.json is put back: the two never disagree."""
    model = tmp_path / "best"
    shutil.copytree(tiny_dir, model)
    before = {"thresholds": {"segment crack": 0.9}}
    (model / METADATA_FILE).write_text(json.dumps(before))
    base, _ = load_model(tiny_dir)
    save_decoder(base, model / DECODER_FILE, before, base_model=str(tiny_dir))

    def disk_full(path, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation, "update_decoder_metadata", disk_full)
    with pytest.raises(OSError):
        evaluation.write_thresholds(model, {"segment crack": 0.3}, {"split": "valid"})
    assert read_metadata(model) == before == read_metadata(model / DECODER_FILE)


def test_an_out_holding_the_current_folder_is_refused(processed, tmp_path, capsys, monkeypatch):
    """--out . (or a parent of it) would be replaced under the shell that runs evaluate.py: refused."""
    monkeypatch.chdir(tmp_path)
    code, log = run_logged(capsys, "--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed),
                           "--out", ".")
    assert code == 1 and "holds the current folder" in error_lines(log)[0]


def test_temp_folder_left_by_a_killed_run_is_cleaned_up(processed, tmp_path):
    out = tmp_path / "r"
    dead = tmp_path / ".r.tmp-999999999"  # no such process
    dead.mkdir(parents=True)
    (dead / "metrics.json").write_text("{}")
    assert run("--pred-dir", str(processed / "valid" / "masks"), "--data", str(processed), "--out", str(out),
               "--examples", "0", "-q") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_masks_being_scored_or_of_unknown_origin_are_never_replaced(processed, tiny_dir, tmp_path, capsys):
    """The report replaces --out whole: scoring the masks an earlier report saved into that same --out, or
    writing into a folder whose masks/ no report wrote, is refused with one line and changes nothing."""
    out = tmp_path / "y"
    assert run("--model", str(tiny_dir), "--data", str(processed), "--out", str(out), "--save-masks",
               "--examples", "0", "-q") == 0
    before = snapshot(out)
    code, log = run_logged(capsys, "--pred-dir", str(out / "masks"), "--data", str(processed), "--out", str(out))
    assert code == 1 and "which is being scored" in error_lines(log)[0] and snapshot(out) == before
    assert run("--pred-dir", str(out / "masks"), "--data", str(processed), "--out", str(tmp_path / "elsewhere"),
               "--examples", "0", "-q") == 0
    other = tmp_path / "z"
    shutil.copytree(processed / "valid" / "masks", other / "masks")
    before = snapshot(other)
    code, log = run_logged(capsys, "--model", str(tiny_dir), "--data", str(processed), "--out", str(other),
                           "--save-masks")
    assert code == 1 and "holds masks, which no report wrote" in error_lines(log)[0] and snapshot(other) == before


def test_symlinked_images_are_scored_by_the_names_predict_gives(sample_root, tiny_dir, tmp_path, capsys):
    """git-annex and DVC keep images as symlinks to content-named blobs: predict.py names masks by the link,
    the manifest records the target; --pred-dir still finds every mask, and --save-masks names them alike."""
    data = tmp_path / "data" / "cracks" / "valid"
    shutil.copytree(sample_root / "cracks" / "valid", data)
    linked = sorted(data.glob("*.jpg"))[0]
    (tmp_path / "blobs").mkdir()
    linked.rename(tmp_path / "blobs" / "SHA256E-abc.jpg")
    linked.symlink_to(os.path.relpath(tmp_path / "blobs" / "SHA256E-abc.jpg", data))
    processed = preprocess(tmp_path / "data", tmp_path / "processed", "--tasks", "cracks")
    preds = tmp_path / "preds"
    assert predict.main(predict.build_parser().parse_args(
        ["--model", str(tiny_dir), "--image", str(data), "--prompt", "segment crack", "--out", str(preds),
         "--workers", "0", "-q"])) == 0
    code, log = run_logged(capsys, "--pred-dir", str(preds), "--data", str(processed), "--out", str(tmp_path / "r"))
    assert code == 0 and load_metrics(tmp_path / "r")["predictions"]["missing"]["count"] == 0, log
    assert run("--model", str(tiny_dir), "--data", str(processed), "--out", str(tmp_path / "r2"), "--save-masks",
               "-q") == 0
    assert sorted(p.name for p in (tmp_path / "r2" / "masks").iterdir()) == sorted(
        p.name for p in preds.iterdir() if p.suffix == ".png")


def test_no_prompt_warning_for_a_model_without_a_task_table(sample_root, tiny_dir, tmp_path, capsys):
    """A model with no defectseg.json (a Hub model, a bare save_pretrained folder) was trained on no task
    table, so a manifest made with another prompt is no mismatch to warn about."""
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps({"tasks": {"cracks": {"prompt": "segment fissure", "dirs": ["cracks"]}}}))
    processed = preprocess(sample_root, tmp_path / "processed", "--tasks", "cracks", "--splits", "valid",
                           "--tasks-file", str(tasks_file))
    code, log = run_logged(capsys, "--model", str(tiny_dir), "--data", str(processed), "--out", str(tmp_path / "r"))
    assert code == 0 and "was trained to answer" not in log


def test_scoring_in_threads_is_scoring_in_turn(monkeypatch):
    """score_probabilities scores the images in threads; the scores, in order, are those of one thread."""
    from defectseg import evaluation, metrics

    rng = np.random.default_rng(0)
    n = 5
    rows = [{"image": f"{i}.jpg", "mask": f"{i}.png", "task": "cracks", "prompt": "segment crack"} for i in range(n)]
    targets = [rng.random((30, 40)) < 0.2 for _ in range(n)]
    probs = [rng.random((30, 40), dtype=np.float32) for _ in range(n)]
    others = [None, *(rng.random((30, 40), dtype=np.float32) for _ in range(n - 1))]

    def scores() -> list[tuple]:
        out = evaluation.score_probabilities(rows, targets, probs, lambda p: 0.5, metrics.default_thresholds(),
                                             ["segment taping area"] * n, others)
        return [(s.image, s.counts.tolist(), s.sweep.tolist(), s.other_prompt,
                 None if s.other_counts is None else s.other_counts.tolist()) for s in out]

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    threaded = scores()
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert scores() == threaded
    assert [s[0] for s in threaded] == [r["image"] for r in rows] and threaded[0][3] is None
    assert threaded[1][1] == metrics.confusion(probs[1] >= 0.5, targets[1]).tolist()
