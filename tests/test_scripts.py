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
    does (best threshold of the same sweep); another size and the average of both come out as rows too."""
    report = tmp_path / "report"
    for argv in (["evaluate.py", "--out", str(report), "--examples", "0"],
                 ["scripts/scale_tta.py", "--sizes", "448", "320", "--tta", "none"]):
        proc = subprocess.run([sys.executable, *argv, "--model", "models/liteseg", "--data", str(processed)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    tasks = json.loads((report / "metrics.json").read_text())["tasks"]
    lines = re.findall(r"^  (.+?) +threshold [\d.]+  mean IoU ([\d.]+)$", proc.stdout, re.M)
    assert [name for name, _ in lines] == ["448px", "320px", "448px + 320px"] * len(tasks), proc.stdout
    assert [score for name, score in lines if name == "448px"] == [f"{tasks[t]['best_iou']:.4f}" for t in sorted(tasks)]
