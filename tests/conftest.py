"""Shared fixtures: the bundled real sample, the full real sets (when present) and COCO builders."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
os.environ.pop("MAKELEVEL", None)  # `make test` sets it; messages that name make's variables are tested on purpose
os.environ.pop("DEFECTSEG_MODEL", None)  # a user's shell setting would replace the shipped model the tests expect


@pytest.fixture(scope="session")
def sample_root() -> Path:
    return SAMPLE


@pytest.fixture(scope="module")
def processed(tmp_path_factory, sample_root) -> Path:
    """The bundled sample through preprocess_masks.py, once per test module."""
    import preprocess_masks

    out = tmp_path_factory.mktemp("processed")
    args = preprocess_masks.build_parser().parse_args(["--data-root", str(sample_root), "--out", str(out), "-q"])
    assert preprocess_masks.main(args) == 0
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cracks-3ii36").is_dir():
        pytest.skip(f"full real data not present at {SHARED_DATA}")
    return SHARED_DATA


def write_image(path: Path, width: int, height: int, seed: int = 0, exif_orientation: int | None = None) -> Path:
    """A random RGB JPEG/PNG of the given stored size (optionally with an EXIF orientation tag)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(path, exif=exif)
    else:
        img.save(path)
    return path


def write_export(split_dir: Path, images: list[dict], annotations: list[dict], make_images: bool = True) -> Path:
    """A Roboflow-style split folder: ``_annotations.coco.json`` plus images of the declared sizes."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        if make_images and not (split_dir / im["file_name"]).exists():
            write_image(split_dir / im["file_name"], im["width"], im["height"], seed=i)
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 0, "name": "crack", "supercategory": "none"},
                       {"id": 1, "name": "NewCracks", "supercategory": "crack"}],
    }
    path = split_dir / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    return path
