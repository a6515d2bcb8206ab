"""The command-line pieces the scripts share."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from defectseg import cli


@pytest.mark.parametrize("total,expected", [(25, 10), (3, 3), (10, 10), (1, 1)])
def test_log_progress_writes_a_line_per_tenth_and_one_at_the_end(total, expected, caplog):
    caplog.set_level(logging.INFO, logger="defectseg")
    items = list(cli.LogProgress(range(total), None, "work", "img"))
    assert items == list(range(total))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == expected and lines[-1].startswith(f"work: {total}/{total} img")


def test_log_progress_by_update_and_interval(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="defectseg")
    with cli.LogProgress(None, total=None, desc="predict", unit="image", interval=0.0) as bar:
        bar.update(2)
        bar.update(3)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["predict: 2 image", "predict: 5 image"]


def test_progress_off_when_quiet_or_disabled(caplog):
    """-q (the logger at WARNING) and enabled=False give a silent bar that still iterates; else a live one."""
    caplog.set_level(logging.WARNING, logger="defectseg")
    quiet = cli.progress(range(3), desc="x")
    assert isinstance(quiet, cli.tqdm) and quiet.disable and list(quiet) == [0, 1, 2]
    caplog.set_level(logging.INFO, logger="defectseg")
    off = cli.progress(range(3), desc="x", enabled=False)
    assert isinstance(off, cli.tqdm) and off.disable and list(off) == [0, 1, 2]
    live = cli.progress(range(3), desc="x")
    assert not live.disable if sys.stderr.isatty() else isinstance(live, cli.LogProgress)
    live.close()
    assert not caplog.records


def test_the_log_follows_stderr_when_it_is_swapped(monkeypatch):
    """setup_logging writes to the sys.stderr of the moment: one swapped in later (pytest's capture, a
    notebook) gets the records, and closing the one of set-up time breaks nothing."""
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    cli.setup_logging()
    monkeypatch.setattr(sys, "stderr", second)
    first.close()
    logging.getLogger("defectseg").info("after the swap")
    assert second.getvalue().endswith(" INFO after the swap\n"), second.getvalue()  # not a "Logging error"
