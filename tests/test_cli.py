"""The command-line pieces the scripts share."""

from __future__ import annotations

import logging

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
    caplog.set_level(logging.WARNING, logger="defectseg")
    assert list(cli.progress(range(3), desc="x")) == [0, 1, 2]
    assert not caplog.records
