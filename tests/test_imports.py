"""Module boundaries users rely on: only preprocessing needs COCO tooling (pycocotools), so a machine
that only trains, predicts or evaluates on an already processed dataset can do without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,argv,writes", [
    ("train.py", ["--data", "{data}", "--model", "lite-tiny", "--epochs", "1", "--batch-size", "4", "--out", "{out}"],
     "best/model.safetensors"),
    ("predict.py", ["--image", "{image}", "--prompt", "segment crack", "--out", "{out}"], "{stem}__segment_crack.png"),
    ("evaluate.py", ["--pred-dir", "{data}/valid/masks", "--data", "{data}", "--examples", "0", "--out", "{out}"],
     "metrics.json"),
])
def test_scripts_run_without_pycocotools(script, argv, writes, processed, tmp_path):
    """Each script's real work on the processed sample (train a tiny LiteSeg for an epoch, predict with the
    shipped model, score masks), with `import pycocotools` failing; with -q it prints nothing."""
    image = sorted((SAMPLE / "cracks" / "valid").glob("*.jpg"))[0]
    fill = {"data": str(processed), "out": str(tmp_path / "out"), "image": str(image), "stem": image.stem}
    argv = [a.format(**fill) for a in argv]
    code = (
        "import runpy, sys; sys.modules['pycocotools'] = None; "  # makes `import pycocotools` raise
        f"sys.argv = {[script, *argv, '-q']!r}; runpy.run_path({script!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "DEFECTSEG_MODEL"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / writes.format(**fill)).is_file()
    assert proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr


def test_ctrl_c_is_one_line_and_exit_130(caplog, monkeypatch):
    import argparse

    monkeypatch.setattr(sys, "argv", ["script.py"])
    from defectseg.cli import run

    def main(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run(main, argparse.ArgumentParser())
    assert info.value.code == 130
    assert [r.getMessage() for r in caplog.records] == ["interrupted"]


@pytest.mark.parametrize("script,flag,value", [
    ("evaluate", "--threshold", "1.5"), ("evaluate", "--thresholds-sweep", "nan"), ("evaluate", "--batch-size", "0"),
    ("evaluate", "--examples", "-1"), ("evaluate", "--pred-threshold", "0"), ("predict", "--threshold", "-0.1"),
    ("predict", "--workers", "x"), ("preprocess_masks", "--workers", "0"),
])
def test_out_of_range_values_are_refused_by_the_parser(script, flag, value, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as info:
        module.build_parser().parse_args(["--image", "x.jpg", "--prompt", "p", flag, value] if script == "predict"
                                         else [flag, value])
    assert info.value.code == 2 and flag in capsys.readouterr().err
