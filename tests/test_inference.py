"""The shared inference path under reduced precision, and its precision/device rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE

from defectseg.inference import Segmenter, check_device, resolve_precision
from defectseg.io import load_image
from defectseg.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("inference") / "tiny", seed=2)


def test_precision_rules():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("fp16", torch.device("cuda")) is torch.float16
    assert check_device("cpu") is None


def test_bf16_autocast_path_matches_fp32(tiny_dir):
    """The autocast path (bf16 on CPU here; bf16/fp16 on CUDA) gives the fp32 probabilities to bf16 accuracy."""
    images = [load_image(p) for p in sorted((SAMPLE / "drywall" / "valid").glob("*.jpg"))[:2]]
    sizes = [im.shape[:2] for im in images]
    prompts = ["segment crack", "segment taping area"]
    full = Segmenter.load(str(tiny_dir), device="cpu", precision="fp32")
    half = Segmenter.load(str(tiny_dir), device="cpu", precision="bf16")
    assert half.amp_dtype is torch.bfloat16
    p32 = full.probabilities(full.encode(full.pixel_values(images)), sizes, prompts)
    p16 = half.probabilities(half.encode(half.pixel_values(images)), sizes, prompts)
    for prompt in prompts:
        for a, b in zip(p32[prompt], p16[prompt]):
            assert a.shape == b.shape and b.dtype == np.float32
            assert np.mean(np.abs(a - b)) < 0.05
