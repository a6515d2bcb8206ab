"""The measurement scripts under scripts/ that the model card's numbers come from."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from defectseg import metrics, report


def test_scale_tta_at_the_model_size_is_evaluate_py_score(processed: Path, tmp_path: Path) -> None:
    """scripts/scale_tta.py at the model's own input size, without TTA, scores each task as evaluate.py
    does (best threshold of the same sweep); another size and the average of both come out as rows too.
    Both in fp32: in bf16 (--precision auto on a CPU with native bf16) the two batch sizes round differently."""
    report = tmp_path / "report"
    for argv in (["evaluate.py", "--out", str(report), "--examples", "0"],
                 ["scripts/scale_tta.py", "--sizes", "448", "320", "--tta", "none"]):
        proc = subprocess.run([sys.executable, *argv, "--model", "models/liteseg", "--data", str(processed),
                               "--precision", "fp32"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    tasks = json.loads((report / "metrics.json").read_text())["tasks"]
    lines = re.findall(r"^  (.+?) +threshold [\d.]+  mean IoU ([\d.]+)$", proc.stdout, re.M)
    assert [name for name, _ in lines] == ["448px", "320px", "448px + 320px"] * len(tasks), proc.stdout
    # one image per batch here, the whole split in one there: fp32 convolutions may round differently
    assert [float(score) for name, score in lines if name == "448px"] == pytest.approx(
        [tasks[t]["best_iou"] for t in sorted(tasks)], abs=2e-4)


def test_score_peers_scores_each_folder_on_the_prompts_it_has_masks_for(processed: Path, tmp_path: Path) -> None:
    """A folder of the ground truths of one task's prompt scores 1.0 on that task, and is not scored on the
    other; the prompts are the manifest's (a custom task table's prompt too)."""
    from defectseg.manifest import MANIFEST_FILE, read_manifest, write_manifest

    data = tmp_path / "data"
    rows = read_manifest(processed / "valid" / MANIFEST_FILE)
    for r in rows:
        r["prompt"] = "segment hairline crack" if r["task"] == "cracks" else r["prompt"]
    write_manifest(data / "valid" / MANIFEST_FILE, rows)
    peer = tmp_path / "peers" / "gt-copy"
    peer.mkdir(parents=True)
    for r in rows:
        if r["task"] == "cracks":
            (peer / f"{Path(r['image']).stem}__segment_hairline_crack.png").write_bytes(Path(r["mask"]).read_bytes())
    def table(*extra: str) -> list[str]:
        proc = subprocess.run([sys.executable, "scripts/score_peers.py", "--peers", str(peer.parent), "--data",
                               str(data), *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stdout.splitlines() if line.startswith("| gt-copy")]

    n = sum(r["task"] == "cracks" for r in rows)
    scores = f"| gt-copy | cracks | {n} | 1.0000 |  | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 0 |"  # no interval: 4 images
    assert table("--ours", "") == [scores]
    # paired with the shipped model's report, by file name: the sample's valid photos are in it
    shipped = report.read_per_image_iou(REPO / "models" / "liteseg" / "report")
    ious = [shipped["cracks", Path(r["image"]).name] for r in rows if r["task"] == "cracks"]
    [line] = table()
    assert line.startswith(f"{scores} {np.mean(ious) - 1:+.4f} ({n} images) | ")


def test_score_peers_names_an_unreadable_report(processed: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/score_peers.py", "--peers", str(tmp_path), "--data",
                           str(processed), "--ours", "README.md"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: cannot read per-image scores from README.md: not an evaluate.py "
                                   "per_image.csv ('task')")


def test_score_peers_refuses_folders_it_cannot_score(processed: Path, tmp_path: Path) -> None:
    """Paths that do not exist, or a folder of masks given as --peers (the folder of folders): one line, exit
    1. A subfolder holding no mask for these images is a warning, and the others are still scored."""
    def score(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/score_peers.py", "--ours", "", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    masks = processed / "valid" / "masks"
    for argv, line in [(["--data", str(tmp_path / "none"), "--peers", str(tmp_path)], "No such file or directory"),
                       (["--data", str(processed), "--peers", str(tmp_path / "none")], "does not exist or is not a folder"),
                       (["--data", str(processed), "--peers", str(masks)], "holds masks itself")]:
        proc = score(*argv)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and line in proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    peers = tmp_path / "peers"
    (peers / "empty").mkdir(parents=True)
    (peers / "renamed").mkdir()
    (peers / "renamed" / "photo__segment_crack.png").write_bytes(next(masks.glob("*__segment_crack.png")).read_bytes())
    shutil.copytree(masks, peers / "good")
    proc = score("--data", str(processed), "--peers", str(peers))
    assert proc.returncode == 0
    assert "empty holds no mask named for a prompt" in proc.stderr and "renamed: none of the 4 predictions" in proc.stderr
    assert [line.split(" | ")[:2] for line in proc.stdout.splitlines()[2:]] == [["| good", "cracks"], ["| good", "drywall"]]


def test_compare_reports_pairs_images_by_task_and_name(tmp_path: Path) -> None:
    """Hand-made per_image.csv files: B - A over the images both scored, whatever folder they lay in."""
    def write(name: str, rows: list[tuple[str, str, float]]) -> Path:
        path = tmp_path / name
        lines = ["image,task,prompt,iou"] + [f"{image},{task},p,{iou}" for image, task, iou in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    a = write("a.csv", [("/x/1.jpg", "cracks", 0.5), ("/x/2.jpg", "cracks", 0.7), ("/x/1.jpg", "drywall", 0.9)])
    b = write("b.csv", [("/y/1.jpg", "cracks", 0.6), ("/y/2.jpg", "cracks", 0.7), ("/y/3.jpg", "cracks", 0.1)])
    proc = subprocess.run([sys.executable, "scripts/compare_reports.py", str(a), str(b)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # differences +0.1 and 0: a resample's mean is 0, 0.05 or 0.1
    lines = proc.stdout.splitlines()
    assert f"| {b} | cracks | 2 | 0.6000 | 0.6500 | +0.0500 |  |" in lines  # no interval below 10 images
    assert "drywall" not in proc.stdout and "overall" not in proc.stdout  # one task in common: no mean of tasks
    # ten images, differences +0.1 and 0 in turn: the interval is bootstrap_ci's of those differences
    ten_a = write("ten_a.csv", [(f"{i}.jpg", "cracks", 0.5) for i in range(10)])
    ten_b = write("ten_b.csv", [(f"{i}.jpg", "cracks", 0.6 if i % 2 else 0.5) for i in range(10)])
    proc = subprocess.run([sys.executable, "scripts/compare_reports.py", str(ten_a), str(ten_b)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    ci = report.interval_text(metrics.bootstrap_ci([0.1 if i % 2 else 0.0 for i in range(10)]), signed=True)
    assert f"| {ten_b} | cracks | 10 | 0.5000 | 0.5500 | +0.0500 | {ci} |" in proc.stdout.splitlines()

    # --fg-split: the rows again for the images under and over a foreground fraction (read from A's file)
    a_fg = tmp_path / "a_fg.csv"
    a_fg.write_text("image,task,prompt,iou,fg_fraction\n/x/1.jpg,cracks,p,0.5,0.01\n/x/2.jpg,cracks,p,0.7,0.2\n")
    proc = subprocess.run([sys.executable, "scripts/compare_reports.py", str(a_fg), str(b), "--fg-split", "0.03"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert f"| {b} | cracks, foreground < 0.03 | 1 | 0.5000 | 0.6000 | +0.1000 |  |" in lines
    assert f"| {b} | cracks, foreground >= 0.03 | 1 | 0.7000 | 0.7000 | +0.0000 |  |" in lines
    proc = subprocess.run([sys.executable, "scripts/compare_reports.py", str(a), str(b), "--fg-split", "0.03"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not an evaluate.py per_image.csv ('fg_fraction')" in proc.stderr

    c = write("c.csv", [("/y/9.jpg", "cracks", 0.6)])
    twins = write("twins.csv", [("/x/1.jpg", "cracks", 0.5), ("/y/1.jpg", "cracks", 0.6)])
    for argv, message in (([a, c], f"error: {c} has no image in common with {a}"),
                          ([a, twins], f"error: {twins}: two images of task cracks are named 1.jpg"),
                          ([a, tmp_path / "nope.csv"], "error: cannot read per-image scores from")):
        proc = subprocess.run([sys.executable, "scripts/compare_reports.py", *map(str, argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.startswith(message), proc.stderr


def test_add_context_keeps_the_model_s_answers(tmp_path: Path) -> None:
    """scripts/add_context.py: the new folder loads through load_model, holds the block, and answers as the
    old one did (the block starts as the identity); a second pass or an existing folder is refused."""
    import torch

    from defectseg import lite
    from defectseg.model import load_model

    model, processor = lite.build("lite-tiny", seed=0)
    model.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "defectseg.json").write_text('{"thresholds": {"segment crack": 0.4}}')

    def add(*argv: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/add_context.py", *map(str, argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    assert add(tmp_path / "old", tmp_path / "new", "--bins", "1", "2").returncode == 0
    new, _ = load_model(tmp_path / "new")
    assert new.config.context == [1, 2]
    assert json.loads((tmp_path / "new" / "defectseg.json").read_text()) == {"thresholds": {"segment crack": 0.4}}
    tokens = processor.tokenizer(["segment crack"])
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(**tokens, pixel_values=pixels).logits,
                                   model.eval()(**tokens, pixel_values=pixels).logits, rtol=0, atol=0)
    again = add(tmp_path / "new", tmp_path / "newer")
    assert again.returncode == 1 and "already has a context block" in again.stderr
    exists = add(tmp_path / "old", tmp_path / "new")
    assert exists.returncode == 1 and "exists" in exists.stderr
    assert add(tmp_path / "old", tmp_path / "zero", "--bins", "0").returncode == 2 and not (tmp_path / "zero").exists()


@pytest.mark.parametrize("script", ["error_anatomy", "learned_threshold", "negative_pairs", "resolution_ceiling",
                                    "scale_tta"])
def test_a_research_script_names_bad_input_in_one_line(script: str, tmp_path: Path) -> None:
    """A data folder without manifests ends the script with one line naming it, exit 1, no stack trace."""
    proc = subprocess.run([sys.executable, f"scripts/{script}.py", "--data", str(tmp_path / "nowhere")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and str(tmp_path / "nowhere") in proc.stderr


def test_error_anatomy_post_processing(processed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shape operations on hand-made masks, then the script on the bundled sample: its "none" row is
    evaluate.py's best-threshold score of the same sweep."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import error_anatomy as ea

    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False  # a hole
    notch = ring.copy()
    notch[3, 0:4] = False  # open to the border: not a hole
    assert ea.fill_holes(ring).sum() == 25 and ea.fill_holes(notch).sum() == notch.sum()
    parts = np.zeros((5, 9), bool)
    parts[0:2, 0:2] = True  # 4 px
    parts[4, 4] = True  # 1 px
    parts[0:3, 6:9] = True  # 9 px
    assert ea.keep_parts(parts, largest=1).sum() == 9 and ea.keep_parts(parts, largest=2).sum() == 13
    assert ea.keep_parts(parts, min_area=4).sum() == 13 and ea.keep_parts(parts, min_area=10).sum() == 0
    dot = np.zeros((9, 9), bool)
    dot[4, 4] = True
    assert ea.POSTPROCESS["dilate 2 px"](dot).sum() == ea._disk(2).sum() == 17
    centred = np.pad(ring, 7)  # cv2's closing fills up to the image edge from a part within its radius of it
    assert ea.POSTPROCESS["close 4 px"](centred).sum() == 25  # it fills the 1 px hole

    for argv in (["evaluate.py", "--out", str(tmp_path / "report"), "--examples", "0"], ["scripts/error_anatomy.py"]):
        proc = subprocess.run([sys.executable, *argv, "--model", "models/liteseg", "--data", str(processed),
                               "--precision", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    tasks = json.loads((tmp_path / "report" / "metrics.json").read_text())["tasks"]
    nones = re.findall(r"post-processing, mean IoU at its best threshold: none ([\d.]+); dilate", proc.stdout)
    assert [float(n) for n in nones] == pytest.approx([tasks[t]["best_iou"] for t in sorted(tasks)], abs=2e-4), proc.stdout


def test_learned_threshold_picks_from_the_nearest_train_photos(processed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """knn_pick on hand-made curves, then the script on the bundled sample: with k at least the number of
    train photos every photo gets the one threshold tuned on train, so the two rows agree."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import learned_threshold as lt

    train_x = np.array([[0.0], [1.0], [10.0], [11.0]])
    curves = np.array([[0.9, 0.1], [0.8, 0.3], [0.1, 0.7], [0.2, 0.9]])  # best: 0, 0, 1, 1
    assert lt.knn_pick(train_x, curves, np.array([[0.4], [10.6]]), k=2).tolist() == [0, 1]
    assert lt.knn_pick(train_x, curves, train_x, k=1, leave_one_out=True).tolist() == [0, 0, 1, 1]
    # k past the other rows: each row's 3 others, never itself (row 0: (0.37, 0.63) is best at 1)
    assert lt.knn_pick(train_x, curves, train_x, k=10, leave_one_out=True).tolist() == [1, 1, 0, 0]
    # 5.4 is nearest row 1 (best: 0), then row 2: their mean curve (0.45, 0.5) is best at 1
    assert lt.knn_pick(train_x, curves, np.array([[5.4]]), k=1).tolist() == [0]
    assert lt.knn_pick(train_x, curves, np.array([[5.4]]), k=2).tolist() == [1]
    assert lt.summarize(np.full((4, 4), 0.25)).tolist() == [0.25] * 9 + [1, 1, 0, 0, 0, 0, 0, 0, 0, 0.25]

    proc = subprocess.run([sys.executable, "scripts/learned_threshold.py", "--model", "models/liteseg", "--data",
                           str(processed), "--train-stride", "1", "--k", "1000", "--precision", "fp32"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    on_train = re.findall(r"one threshold tuned on train [\d.]+: ([\d.]+)", proc.stdout)
    on_valid = re.findall(r"one threshold tuned on valid [\d.]+: ([\d.]+)", proc.stdout)
    learned = re.findall(r"learned on train \(k=1000\): ([\d.]+)", proc.stdout)
    oracle = re.findall(r"oracle \(each photo's best threshold\): ([\d.]+)", proc.stdout)
    assert len(on_train) == 2 and learned == on_train, proc.stdout
    assert all(float(t) <= float(v) <= float(o) for t, v, o in zip(on_train, on_valid, oracle)), proc.stdout


def test_average_checkpoints_means_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/average_checkpoints.py: every float tensor (weights and batch-norm statistics) is the mean,
    integer buffers come from the last folder, the metadata keeps the last folder's task table, thresholds,
    epoch and training config but not its metrics; a model averaged with itself answers as it did; another
    architecture or task table, a CLIPSeg, a missing path, a folder that is no checkpoint, one folder or an
    existing --out are refused."""
    from dataclasses import asdict

    import torch

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import average_checkpoints as ac

    from defectseg import lite
    from defectseg.model import load_model, read_metadata
    from defectseg.tiny import build_tiny_model

    hand = ac.average_state_dicts([{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)},
                                   {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}])
    assert hand["w"].tolist() == [2.0, 4.0] and hand["n"].item() == 5

    meta = {"tasks": {"cracks": {"prompt": "segment crack"}}, "thresholds": {"segment crack": 0.4}, "epoch": 3,
            "train_config": {"seed": 0}, "metrics": {"overall": {"iou": 0.5}}, "selection": "best mean IoU"}
    for seed in (0, 1):
        model, processor = lite.build("lite-tiny", seed=seed)
        with torch.no_grad():  # distinct batch-norm statistics too
            for name, buf in model.named_buffers():
                if buf.is_floating_point():
                    buf.uniform_(0.5, 1.5)
                elif "num_batches_tracked" in name:
                    buf.fill_(seed + 7)
        model.save_pretrained(tmp_path / f"s{seed}")
        (tmp_path / f"s{seed}" / "defectseg.json").write_text(json.dumps(meta))
    other = lite.LiteSeg(lite.LiteConfig(**{**asdict(model.config), "context": [1]}))
    other.save_pretrained(tmp_path / "ctx")

    def average(*argv) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/average_checkpoints.py", *map(str, argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    proc = average(tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "avg")
    assert proc.returncode == 0, proc.stderr
    avg, _ = load_model(tmp_path / "avg")
    s0, s1 = (load_model(tmp_path / f"s{seed}")[0].state_dict() for seed in (0, 1))
    for key, value in avg.state_dict().items():
        expected = (s0[key] + s1[key]) / 2 if value.is_floating_point() else s1[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert s1["encoder.0.0.1.num_batches_tracked"].item() == 8
    saved = read_metadata(tmp_path / "avg")
    assert saved == {**{k: meta[k] for k in ("tasks", "thresholds", "epoch", "train_config")},
                     "averaged_from": [str(tmp_path / "s0"), str(tmp_path / "s1")]}

    assert average(tmp_path / "s0", tmp_path / "s0", "--out", tmp_path / "same").returncode == 0
    same, s0_model = load_model(tmp_path / "same")[0], load_model(tmp_path / "s0")[0]
    tokens = processor.tokenizer(["segment crack"], return_tensors="pt")
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(same(**tokens, pixel_values=pixels).logits,
                                   s0_model(**tokens, pixel_values=pixels).logits, rtol=0, atol=0)

    (tmp_path / "ctx" / "defectseg.json").write_text(json.dumps(meta))
    shutil.copytree(tmp_path / "s1", tmp_path / "other-tasks")
    (tmp_path / "other-tasks" / "defectseg.json").write_text(json.dumps({**meta, "tasks": {}}))
    for argv, message in ([(tmp_path / "s0", tmp_path / "ctx"), "another architecture"],
                          [(tmp_path / "s0", tmp_path / "other-tasks"), "another task table"],
                          [(tmp_path / "s0", tmp_path / "nowhere"), "is not a folder"],
                          [(tmp_path / "s0", tmp_path), "(no config.json)"],
                          [(tmp_path / "s0", build_tiny_model(tmp_path / "clipseg")), "not a LiteSeg checkpoint"],
                          [(tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "avg"), "exists"]):
        proc = average(*argv) if "--out" in argv else average(*argv, "--out", tmp_path / "refused")
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    proc = average(tmp_path / "s0", "--out", tmp_path / "one")
    assert proc.returncode == 2 and "two or more" in proc.stderr
