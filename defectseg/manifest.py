"""The processed dataset's layout: what ``preprocess_masks.py`` writes and every other script reads.

    <split>/masks/<image_stem>__<prompt_slug>.png   single channel, {0, 255}, the image's own size
    <split>/manifest.csv                           one row per (image, task); paths relative to <split>/
    summary.json                                   counts, problems, leakage

``mask_name`` is also how ``predict.py`` names its masks, beside a ``predict_config.json`` saying which
run(s) made them. Kept apart from ``preprocess`` so that reading a processed dataset (training, evaluation,
prediction) needs no COCO tooling.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from .io import utf8_prefix, write_text_atomic

MANIFEST_FILE = "manifest.csv"
SUMMARY_FILE = "summary.json"
PREDICT_CONFIG_FILE = "predict_config.json"  # predict.py's record of the runs that wrote a folder
MANIFEST_COLUMNS = [
    "image", "mask", "task", "prompt", "width", "height", "annotations", "source",
    "fg_fraction", "annotation_sources", "source_stem", "pixel_hash", "ahash", "key", "problems",
]


# Longest image stem (UTF-8 bytes) a mask name repeats whole; the real sets' longest is 103.
STEM_MAX = 110


def name_stem(image_file: str) -> str:
    """The image's file stem as mask names use it: whole (Roboflow's ``.rf.<hash>`` kept) up to
    ``STEM_MAX`` UTF-8 bytes; a longer one is cut to ``STEM_MAX`` bytes and gets ``_`` and 8 hex characters
    of a hash of the whole stem, so that names stay distinct and under the file systems' 255-byte limit.

    >>> name_stem("dir/00002_jpg.rf.8e62.jpg")
    '00002_jpg.rf.8e62'
    >>> len(name_stem("x" * 250 + ".jpg").encode()) == STEM_MAX + 9
    True
    """
    stem = Path(image_file).stem
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= STEM_MAX:
        return stem
    return f"{utf8_prefix(stem, STEM_MAX)}_{hashlib.sha1(raw).hexdigest()[:8]}"


def mask_name(image_file: str, prompt_slug: str) -> str:
    """``<image_stem>__<prompt_slug>.png``, the stem as ``name_stem`` gives it (the whole stem for any
    ordinary name). With the slug's own cap (``tasks.SLUG_MAX``) and predict's longest suffix, a name is
    at most 242 bytes."""
    return f"{name_stem(image_file)}__{prompt_slug}.png"


REQUIRED_COLUMNS = ("image", "mask", "task", "prompt")


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest.csv as dicts (strings); ``image``/``mask`` resolved to absolute paths.

    Raises ValueError naming the file for a manifest that lacks a required column, has a short row or
    is not UTF-8 text (OSError when it cannot be opened).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not a readable manifest ({err})") from None
    if missing := [c for c in REQUIRED_COLUMNS if c not in columns]:
        raise ValueError(f"{path}: not a manifest, no column(s) {', '.join(missing)}; re-run preprocess_masks.py")
    for line, row in enumerate(rows, start=2):
        if any(row.get(c) is None or not row[c].strip() for c in REQUIRED_COLUMNS):
            raise ValueError(f"{path}, line {line}: the row has no {'/'.join(REQUIRED_COLUMNS)} value(s)")
        for col in ("image", "mask"):
            row[col] = str((path.parent / row[col]).resolve())
    return rows


def write_manifest(path: Path, rows: list[dict]) -> None:
    """Rows sorted by (task, mask), the columns of ``MANIFEST_COLUMNS``, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["task"], r["mask"])))
    write_text_atomic(path, buf.getvalue())
