"""The README's demo (the Makefile's `demo` recipe), run step by step on the bundled sample.

The recipe is read from the Makefile itself, so the test follows it if it changes. It trains the tiny
LiteSeg width from scratch (the demo's default trains the shipped width: the same code, slower), then
predicts and evaluates with the shipped model, as `make demo` does.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

from defectseg.model import SHIPPED_MODEL


def demo_recipe() -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = lines.index("demo: setup") + 1
    commands, current = [], ""
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(current)
        current = ""
    return commands


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path):
    shipped = (SHIPPED_MODEL / "model.safetensors").is_file()
    values = {"PY": sys.executable, "DATA": str(REPO / "sample_data"), "OUT": str(tmp_path / "processed"),
              "MODEL": "lite-tiny", "RUN": str(tmp_path / "run"), "EPOCHS": "2",
              "EVAL_MODEL": str(SHIPPED_MODEL if shipped else tmp_path / "run" / "best")}
    commands = demo_recipe()
    scripts = [c.split()[1] for c in commands if c.startswith("$(PY)")]
    assert scripts == ["preprocess_masks.py", "train.py", "predict.py", "evaluate.py"]
    run = tmp_path / "run"
    for folder in ("predictions", "report"):  # an earlier demo's outputs: cleared first, not warned about
        (run / folder).mkdir(parents=True)
        (run / folder / "old.png").write_bytes(b"x")
    for command in commands:
        command = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], command)
        proc = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        assert "did not write" not in proc.stderr
    assert not (run / "predictions" / "old.png").exists() and not (run / "report" / "old.png").exists()
    assert len(list((run / "predictions").glob("*__segment_crack.png"))) == 8
    assert len(list((run / "predictions").glob("*__segment_taping_area_overlay.png"))) == 8
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"cracks", "drywall"}
    assert "averaged over images" in (run / "report" / "report.md").read_text()
