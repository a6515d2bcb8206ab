"""The shared inference path under reduced precision, its precision/device rules, and test-time augmentation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import SAMPLE

from defectseg import lite
from defectseg.inference import (
    Segmenter,
    _quiet_if_peer_gone,
    check_device,
    dihedral_view,
    resolve_precision,
    undo_view,
)
from defectseg.io import load_image
from defectseg.model import fold_batchnorm, load_model, parameter_counts
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


# -- test-time augmentation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory):
    model, _ = lite.build("lite-tiny", seed=4)
    folder = tmp_path_factory.mktemp("inference") / "lite"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("view", range(8))
def test_each_dihedral_view_is_undone_and_all_eight_differ(view):
    x = torch.arange(6.0).reshape(1, 2, 3)[..., :2]  # (1, 2, 2), no symmetry: 0 1 / 3 4
    assert torch.equal(undo_view(dihedral_view(x, view), view), x)
    assert torch.equal(dihedral_view(x, 1), x.flip(-1))  # view 1 is the mirror image, as the old --tta
    assert len({tuple(dihedral_view(x, v).flatten().tolist()) for v in range(8)}) == 8


@pytest.mark.parametrize("tta, views", [("flip", [1]), ("d4", range(1, 8))])
def test_tta_masks_turn_with_the_image(lite_dir, tta, views):
    """Averaged over the group's views, the probabilities of a turned or mirrored photo are the photo's
    probabilities turned or mirrored alike; without TTA a random-weight model is not so symmetric."""
    image = load_image(sorted((SAMPLE / "cracks" / "valid").glob("*.jpg"))[0])
    assert image.shape[0] == image.shape[1]  # the exports' photos are square: every view has the same size

    def probs(seg, view):
        turned = dihedral_view(torch.from_numpy(image.copy()).permute(2, 0, 1), view).permute(1, 2, 0).numpy()
        acts = seg.encode(seg.pixel_values([np.ascontiguousarray(turned)]))
        return torch.from_numpy(seg.probabilities(acts, [image.shape[:2]], ["segment crack"])["segment crack"][0])

    seg = Segmenter.load(str(lite_dir), device="cpu", precision="fp32", tta=tta)
    plain = Segmenter.load(str(lite_dir), device="cpu", precision="fp32")
    base, plain_base = probs(seg, 0), probs(plain, 0)
    for view in views:
        torch.testing.assert_close(undo_view(probs(seg, view), view), base, rtol=0, atol=1e-5)
        assert (undo_view(probs(plain, view), view) - plain_base).abs().max() > 1e-3


def test_d4_tta_is_the_mean_of_the_eight_views_logits(lite_dir):
    image = load_image(sorted((SAMPLE / "drywall" / "valid").glob("*.jpg"))[0])
    seg = Segmenter.load(str(lite_dir), device="cpu", precision="fp32", tta="d4")
    plain = Segmenter.load(str(lite_dir), device="cpu", precision="fp32")
    pixels = plain.pixel_values([image])
    acts = seg.encode(pixels)
    assert acts[0].shape[0] == 8
    expected = sum(undo_view(plain.logits(plain.encode(dihedral_view(pixels, v)), "segment taping area"), v)
                   for v in range(8)) / 8
    torch.testing.assert_close(seg.logits(acts, "segment taping area"), expected, rtol=0, atol=1e-5)


def test_an_unknown_tta_is_refused(lite_dir):
    with pytest.raises(ValueError, match="flip, d4"):
        Segmenter.load(str(lite_dir), device="cpu", tta="rotate")


# -- batch norms folded at load ---------------------------------------------------------------------


def test_load_folds_batchnorm_and_computes_the_same(tmp_path):
    """Segmenter.load folds LiteSeg's batch norms into their convs: none is left, the logits are the
    unfolded model's, and the parameter counts it reports are the checkpoint's."""
    model, _ = lite.build("lite-tiny", seed=5)
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics as after training
        for tensor, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.2, 3), (bn.weight.data, 0.5, 1.5),
                                  (bn.bias.data, -0.5, 0.5)):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    model.save_pretrained(tmp_path / "lite")
    folded = Segmenter.load(str(tmp_path / "lite"), device="cpu", precision="fp32")
    unfolded = Segmenter(*load_model(tmp_path / "lite"), device=torch.device("cpu"))  # as training builds it
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert not any(p.requires_grad for p in folded.model.parameters())  # not for training any more
    assert folded.parameter_counts == unfolded.parameter_counts == parameter_counts(model)
    image = load_image(sorted((SAMPLE / "cracks" / "valid").glob("*.jpg"))[0])
    pixels = unfolded.pixel_values([image])
    for prompt in ("segment crack", "segment taping area"):
        expected = unfolded.logits(unfolded.encode(pixels), prompt)
        torch.testing.assert_close(folded.logits(folded.encode(pixels), prompt), expected, rtol=0,
                                   atol=1e-5 * float(expected.abs().max()))


def test_a_model_without_batchnorm_is_left_as_it_is(tiny_dir):
    model, _ = load_model(tiny_dir)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    assert fold_batchnorm(model) == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("error,printed", [(BrokenPipeError, False), (EOFError, False), (ValueError, True)])
def test_an_image_worker_is_quiet_only_about_a_main_process_that_hung_up(error, printed, capsys):
    """The hook image-loading workers give their resource-sharer thread: a lost peer (the main process
    stopping mid-handover) prints nothing, anything else still prints its traceback."""
    try:
        raise error("boom")
    except error:
        _quiet_if_peer_gone(*sys.exc_info())
    assert ("Traceback" in capsys.readouterr().err) == printed


def test_probability_map_is_the_sigmoid_of_the_resized_logits(lite_dir):
    """One photo's map at its own size (the one predict thresholds) or at a given one (a mask's), each the
    sigmoid of the model's logits resized bilinearly."""
    import torch.nn.functional as F

    image = load_image(sorted((SAMPLE / "cracks" / "valid").glob("*.jpg"))[0])[:, :500]  # not square
    seg = Segmenter.load(str(lite_dir), device="cpu", precision="fp32")
    logits = seg.logits(seg.encode(seg.pixel_values([image])), "segment crack")
    for size in (image.shape[:2], (37, 53)):
        prob = seg.probability_map(image, "segment crack", None if size == image.shape[:2] else size)
        expected = torch.sigmoid(F.interpolate(logits[:, None].float(), size=size, mode="bilinear", align_corners=False))
        assert prob.shape == size and prob.dtype == np.float32
        np.testing.assert_allclose(prob, expected[0, 0].numpy(), rtol=0, atol=1e-6)
    mask = seg.predict([image], ["segment crack"])["segment crack"][0]
    np.testing.assert_array_equal(seg.probability_map(image, "segment crack") >= np.float32(seg.threshold("segment crack")), mask)


@pytest.mark.parametrize("family, whole", [("lite", 64), ("clipseg", 75)])  # 64 bytes; 77 tokens with BOS and EOS
def test_a_prompt_longer_than_the_model_reads_is_known(tiny_dir, lite_dir, family, whole):
    """``cuts``: LiteSeg reads 64 UTF-8 bytes of the normalized prompt, CLIP 77 tokens (one per character
    with the tiny byte vocabulary); any longer prompt is cut, whatever its case and spaces."""
    seg = Segmenter.load(str(lite_dir if family == "lite" else tiny_dir), "cpu")
    assert not seg.cuts("a" * whole) and seg.cuts("a" * (whole + 1))
    assert not seg.cuts("  " + "A" * whole + "  ")
    assert not seg.cuts("segment crack") and seg.cuts("segment crack " * 10)
