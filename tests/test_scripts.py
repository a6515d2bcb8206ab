"""The measurement scripts under scripts/ that the model card's numbers come from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


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
    assert [score for name, score in lines if name == "448px"] == [f"{tasks[t]['best_iou']:.4f}" for t in sorted(tasks)]


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
    proc = subprocess.run([sys.executable, "scripts/score_peers.py", "--peers", str(peer.parent), "--data", str(data)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| gt-copy")]
    n = sum(r["task"] == "cracks" for r in rows)
    assert table == [f"| gt-copy | cracks | {n} | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 0 |"]
