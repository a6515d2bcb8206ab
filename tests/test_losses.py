"""Tests for defectseg.losses: per-sample shapes, hand-computed Dice and Lovasz, stability and autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defectseg.losses import bce_loss, lovasz_hinge_loss, segmentation_loss, soft_dice_loss


def _with_lovasz(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return segmentation_loss(logits, target, lovasz_weight=1.0, lovasz_pool=2)


LOSSES = [bce_loss, soft_dice_loss, segmentation_loss, lovasz_hinge_loss, _with_lovasz]


def _batch(seed: int = 0, shape: tuple[int, ...] = (3, 8, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    target = (torch.rand(shape, generator=g) > 0.7).float()
    return logits, target


@pytest.mark.parametrize("seed", [0, 1])
def test_bce_matches_torch(seed: int) -> None:
    logits, target = _batch(seed)
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2))
    torch.testing.assert_close(bce_loss(logits, target), expected)
    torch.testing.assert_close(
        bce_loss(logits, target).mean(), F.binary_cross_entropy_with_logits(logits, target)
    )


@pytest.mark.parametrize(
    ("logit", "target", "eps", "expected"),
    [
        # p = 0.5 on 4 pixels, one positive: inter 0.5, sum p 2, sum t 1
        (0.0, [[1.0, 0.0], [0.0, 0.0]], 1.0, 1 - (2 * 0.5 + 1) / (2 + 1 + 1)),  # = 1/2
        (0.0, [[1.0, 0.0], [0.0, 0.0]], 0.0, 1 - (2 * 0.5) / (2 + 1)),  # = 2/3
        # p = sigmoid(log 3) = 3/4 on 2 positive pixels: inter 1.5, sum p 1.5, sum t 2
        (math.log(3.0), [[1.0, 1.0]], 1.0, 1 - (3 + 1) / (3.5 + 1)),  # = 1/9
        # p = 1/4 on 2 negative pixels: inter 0, sum p 0.5, sum t 0
        (-math.log(3.0), [[0.0, 0.0]], 1.0, 1 - 1 / (0.5 + 1)),  # = 1/3
    ],
)
def test_soft_dice_hand_computed(
    logit: float, target: list[list[float]], eps: float, expected: float
) -> None:
    t = torch.tensor([target])
    logits = torch.full_like(t, logit)
    loss = soft_dice_loss(logits, t, eps=eps)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_soft_dice_empty_target_confident_empty_prediction_is_zero() -> None:
    target = torch.zeros(2, 16, 16)
    logits = torch.full((2, 16, 16), -20.0)
    assert soft_dice_loss(logits, target).max().item() < 1e-6
    assert segmentation_loss(logits, target).max().item() < 1e-6
    # and a confident full prediction on an empty target is close to the maximum
    assert soft_dice_loss(-logits, target).min().item() > 0.99


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_per_sample_shape_and_independence(loss_fn) -> None:
    logits, target = _batch(3, (4, 6, 5))
    out = loss_fn(logits, target)
    assert out.shape == (4,)
    assert out.dtype == torch.float32
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], loss_fn(logits[i : i + 1], target[i : i + 1]))
    # a channel dim is reduced too
    torch.testing.assert_close(loss_fn(logits[:, None], target[:, None]), out)


def test_segmentation_loss_is_weighted_sum() -> None:
    logits, target = _batch(4)
    torch.testing.assert_close(
        segmentation_loss(logits, target), bce_loss(logits, target) + soft_dice_loss(logits, target)
    )
    torch.testing.assert_close(
        segmentation_loss(logits, target, bce_weight=0.25, dice_weight=2.0, lovasz_weight=0.5, eps=0.5),
        0.25 * bce_loss(logits, target) + 2.0 * soft_dice_loss(logits, target, eps=0.5)
        + 0.5 * lovasz_hinge_loss(logits, target),
    )


def test_lovasz_hand_computed() -> None:
    """Target [1, 1, 0, 0], logits [3, -1, 0.5, -2]: hinge errors 1 - x (2t - 1) = [-2, 2, 1.5, -1].
    Sorted: 2 (t=1), 1.5 (t=0), -1 (t=0), -2 (t=1). With 2 positives, the IoU loss of marking the first
    k sorted pixels wrong: intersection 2 - cumsum(t) = [1, 1, 1, 0], union 2 + cumsum(1 - t) =
    [2, 3, 4, 4], so 1 - I/U = [1/2, 2/3, 3/4, 1] with steps [1/2, 1/6, 1/12, 1/4]; only positive
    errors count: 2 * 1/2 + 1.5 * 1/6 = 1.25."""
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert lovasz_hinge_loss(torch.tensor([[[3.0, -1.0], [0.5, -2.0]]]), target).item() == pytest.approx(1.25)
    # every pixel on the right side by a margin of at least 1: no hinge error, no loss
    assert lovasz_hinge_loss(torch.tensor([[[3.0, 1.0], [-1.0, -2.0]]]), target).item() == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_equals_one_minus_iou_for_unit_margin_logits(seed: int) -> None:
    """With logits of +-1 every hinge error is 0 or 2, and the loss is exactly 2 * (1 - IoU) of the mask
    the logits give at threshold 0: the surrogate is tight where it matters."""
    _, target = _batch(seed)
    pred = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed + 9)) > 0.5
    logits = pred.float() * 2 - 1
    inter = (pred & target.bool()).flatten(1).sum(1)
    union = (pred | target.bool()).flatten(1).sum(1)
    torch.testing.assert_close(lovasz_hinge_loss(logits, target), 2 * (1 - inter / union))


def test_lovasz_pool_averages_logits_and_target_per_cell() -> None:
    """pool=2 scores the 2x2-averaged grid, a partial last cell averaged over the pixels it has."""
    logits, target = _batch(8, (2, 6, 5))
    pooled_logits = F.avg_pool2d(logits[:, None], 2, ceil_mode=True)[:, 0]
    pooled_target = F.avg_pool2d(target[:, None], 2, ceil_mode=True)[:, 0]
    assert pooled_logits.shape == (2, 3, 3)
    torch.testing.assert_close(lovasz_hinge_loss(logits, target, pool=2),
                               lovasz_hinge_loss(pooled_logits, pooled_target))
    # a constant 2x2 block pools to itself
    big = logits.repeat_interleave(2, 1).repeat_interleave(2, 2)
    hard = target.repeat_interleave(2, 1).repeat_interleave(2, 2)
    torch.testing.assert_close(lovasz_hinge_loss(big, hard, pool=2), lovasz_hinge_loss(logits, target))


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_gradients_finite(loss_fn, scale: float) -> None:
    logits, target = _batch(5)
    logits = (logits * scale).requires_grad_(True)
    loss = loss_fn(logits, target).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_do_not_overflow(dtype: torch.dtype) -> None:
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    sign = target * 2 - 1
    right = (sign * 1e4).to(dtype)
    wrong = (-sign * 1e4).to(dtype)
    assert bce_loss(right, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(right, target).item() == pytest.approx(0.0, abs=1e-6)
    # wrong by a margin of |x| = 1e4 on every pixel: BCE = |x| (not inf; bf16 stores 1e4 as 9984),
    # Dice: inter 0, sum p 2, sum t 2 -> 1 - (0 + 1) / (2 + 2 + 1) = 4/5
    margin = wrong.float().abs()[0, 0, 0].item()
    assert bce_loss(wrong, target).item() == pytest.approx(margin, rel=1e-6)
    assert soft_dice_loss(wrong, target).item() == pytest.approx(4 / 5, abs=1e-6)
    for fn in LOSSES:
        assert torch.isfinite(fn(wrong, target)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_fn", LOSSES)
def test_low_precision_and_autocast_compute_in_float32(loss_fn, dtype: torch.dtype) -> None:
    logits, target = _batch(6)
    low = logits.to(dtype)
    reference = loss_fn(low.float(), target)
    out = loss_fn(low, target.to(dtype))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out_ac = loss_fn(low, target)
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, reference)


def test_bool_target_is_accepted() -> None:
    logits, target = _batch(7)
    torch.testing.assert_close(segmentation_loss(logits, target.bool()), segmentation_loss(logits, target))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_shape_mismatch_raises(loss_fn) -> None:
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.zeros(4), torch.zeros(4))


def test_dice_and_lovasz_terms_skip_empty_targets_so_they_teach_through_bce() -> None:
    """On an empty target the smoothed Dice is ~1 and flat (no signal) and IoU is undefined:
    segmentation_loss leaves both terms out there, so an empty-target sample's loss and gradient are
    BCE's alone; samples with foreground keep all three."""
    logits = torch.randn(2, 8, 8, requires_grad=True)
    target = torch.zeros(2, 8, 8)
    target[1, 2:5, 2:5] = 1
    loss = segmentation_loss(logits, target, lovasz_weight=1.0)
    torch.testing.assert_close(loss[0], bce_loss(logits, target)[0])
    torch.testing.assert_close(loss[1], (bce_loss(logits, target) + soft_dice_loss(logits, target)
                                         + lovasz_hinge_loss(logits, target))[1])
    loss[0].backward()
    expected = torch.sigmoid(logits[0].detach()) / 64  # d(mean BCE)/dx = (p - t) / N with t = 0
    torch.testing.assert_close(logits.grad[0], expected)
