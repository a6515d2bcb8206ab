"""Module boundaries users rely on: only preprocessing needs COCO tooling (pycocotools), so a machine
that only trains, predicts or evaluates on an already processed dataset can do without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train.py", "predict.py", "evaluate.py"])
def test_scripts_run_without_pycocotools(script):
    code = (
        "import runpy, sys; sys.modules['pycocotools'] = None; "  # makes `import pycocotools` raise
        f"sys.argv = ['{script}', '--help']; runpy.run_path('{script}', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


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
