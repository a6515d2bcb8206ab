"""Per-sample segmentation losses on logits, as pure torch functions.

Every loss takes raw logits (no sigmoid applied) and a target mask of the same shape, and returns
one loss per sample, shape (B,), float32: reduce with ``.mean()`` (or weight per sample) in the
training loop. Inputs of any float dtype are accepted, and the computation is always done in
float32 (inputs are upcast first), so the losses are safe inside ``torch.autocast`` with bfloat16
or float16. Shapes: (B, H, W) by contract; any (B, ...) works, everything after the batch dim is
reduced.

Targets are float masks in {0, 1} (soft targets in [0, 1] also work); bool and integer {0, 1} masks
are cast. A uint8 {0, 255} mask must be divided by 255 first: it is not rescaled here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bce_loss", "lovasz_hinge_loss", "segmentation_loss", "soft_dice_loss"]


def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and return (logits, target) as float32, flattened to (B, N)."""
    if logits.shape != target.shape:
        raise ValueError(
            f"logits and target shapes differ: logits {tuple(logits.shape)} vs target {tuple(target.shape)}"
        )
    if logits.ndim < 2:
        raise ValueError(f"expected a batch of shape (B, H, W); got shape {tuple(logits.shape)}")
    return logits.float().flatten(1), target.float().flatten(1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample: ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``, ``p = sigmoid(logits)``.

    Args:
        logits: (B, H, W) raw scores, any float dtype.
        target: (B, H, W) mask in {0, 1} (float, bool or int).
        eps: additive smoothing in numerator and denominator. With ``eps > 0`` an empty target with a
            confidently empty prediction gives a loss of about 0 (not 1), and the loss is defined for
            all-empty samples; ``eps = 0`` gives the plain soft Dice (NaN for an exactly empty pair).

    Returns:
        float32 tensor of shape (B,), values in [0, 1].
    """
    x, t = _prepare(logits, target)
    p = torch.sigmoid(x)
    intersection = (p * t).sum(dim=1)
    denominator = p.sum(dim=1) + t.sum(dim=1)
    return 1.0 - (2.0 * intersection + eps) / (denominator + eps)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the pixels of each sample.

    Uses ``F.binary_cross_entropy_with_logits`` (log-sum-exp form), so it is finite for any finite
    logits, however large.

    Args:
        logits: (B, H, W) raw scores, any float dtype.
        target: (B, H, W) mask in {0, 1} (float, bool or int).

    Returns:
        float32 tensor of shape (B,).
    """
    x, t = _prepare(logits, target)
    return F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(dim=1)


def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Lovasz hinge per sample (Berman et al., CVPR 2018): a convex surrogate of ``1 - IoU`` of the mask
    the logits give at threshold 0 (probability 0.5), so it trains each image's own IoU at one fixed
    threshold, which is what the per-image metric scores.

    The hinge errors ``1 - logit * (2 t - 1)`` are sorted per sample, largest first, and weighted by
    the steps of the IoU loss along that order; a sort of H * W values per sample.

    Args:
        logits: (B, H, W) raw scores, any float dtype.
        target: (B, H, W) mask in {0, 1} (float, bool or int); soft targets enter the IoU counts as
            fractions.
        pool: average both logits and target over ``pool x pool`` cells first (the last row and column
            of cells may be partial): a grid ``pool**2`` times smaller to sort, for heads whose logits
            are upsampled anyway.

    Returns:
        float32 tensor of shape (B,), values >= 0. An empty target gives the largest hinge error alone
        (the IoU of an empty pair is undefined): ``segmentation_loss`` leaves this term out there.
    """
    x, t = _prepare(logits, target)
    if pool > 1:
        grid = logits.shape[-2:]
        x, t = (F.avg_pool2d(v.view(-1, 1, *grid), pool, ceil_mode=True).flatten(1) for v in (x, t))
    errors = 1.0 - x * (2.0 * t - 1.0)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    t_sorted = torch.gather(t, 1, order)
    total = t_sorted.sum(dim=1, keepdim=True)
    iou_loss = 1.0 - (total - t_sorted.cumsum(dim=1)) / (total + (1.0 - t_sorted).cumsum(dim=1))
    steps = torch.cat([iou_loss[:, :1], iou_loss[:, 1:] - iou_loss[:, :-1]], dim=1)
    return (F.relu(errors_sorted) * steps).sum(dim=1)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    lovasz_weight: float = 0.0,
    eps: float = 1.0,
    lovasz_pool: int = 1,
) -> torch.Tensor:
    """``bce_weight * bce_loss + dice_weight * soft_dice_loss + lovasz_weight * lovasz_hinge_loss`` per
    sample; the Dice and Lovasz terms only where the target has foreground.

    On an empty target the smoothed Dice is ``sum(p) / (sum(p) + eps)``: about 1 and flat until fewer
    than ~10 pixels are predicted, a constant that teaches nothing, and the IoU the Lovasz term stands
    for is undefined. So empty targets (negative pairs, photos without the defect) get BCE alone, which
    does push every pixel's probability down. A zero-weight term is not computed.

    Args:
        logits: (B, H, W) raw scores, any float dtype.
        target: (B, H, W) mask in {0, 1} (float, bool or int).
        bce_weight: weight of the pixel-averaged BCE term.
        dice_weight: weight of the soft Dice term.
        lovasz_weight: weight of the Lovasz hinge term.
        eps: smoothing of the Dice term (see ``soft_dice_loss``).
        lovasz_pool: the Lovasz term's ``pool`` (see ``lovasz_hinge_loss``).

    Returns:
        float32 tensor of shape (B,).
    """
    loss = bce_weight * bce_loss(logits, target)  # (B,); shapes checked
    has_fg = (target.flatten(1) > 0).any(dim=1)
    if dice_weight:
        loss = loss + dice_weight * torch.where(has_fg, soft_dice_loss(logits, target, eps=eps), 0.0)
    if lovasz_weight:
        loss = loss + lovasz_weight * torch.where(has_fg, lovasz_hinge_loss(logits, target, pool=lovasz_pool), 0.0)
    return loss
