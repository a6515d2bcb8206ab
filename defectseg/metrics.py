"""Binary segmentation metrics as pure, vectorized numpy functions.

Everything here works on confusion counts: ``counts[..., 4] = (tp, fp, fn, tn)`` per image, int64.
Scores are derived from counts, so per-image scores, dataset-level (micro) scores and threshold
sweeps all share one code path and never need the probability maps kept in memory.

Conventions (used by every function in this module, and by every caller that thresholds):

* **Threshold rule: a pixel is foreground iff ``prob >= threshold``** (greater *or equal*).
  ``binarize`` returns a ``bool`` array, and ``counts_at_thresholds`` is exactly
  ``confusion(binarize(prob, t), target)`` for every ``t``, including probabilities that are
  exactly equal to a threshold. Both compare in float64 (exact for float16/float32 inputs);
  NaN probabilities are never foreground.
* **Mask truthiness:** masks may be ``bool`` or any numeric dtype; a pixel is foreground iff
  ``value > 0`` (so uint8 ``{0, 255}`` and ``{0, 1}`` masks both work).
* **Empty cases:** when a score's denominator is zero it is not a failure but a perfect
  empty answer: IoU and Dice of an empty prediction on an empty ground truth are ``empty_score``
  (default 1.0, the convention of segmentation_models.pytorch / most defect-segmentation papers).
  Precision with no predicted pixels and recall with no ground-truth pixels are ``empty_score``
  when the other mask is empty too (nothing to find, nothing found), and 0.0 otherwise (an empty
  prediction that missed ground truth, or a prediction on an empty ground truth, is wrong).
  So an image scores ``empty_score`` on every metric iff both masks are empty, and 0.0 on IoU
  and Dice whenever exactly one of them is empty.

Torch tensors are accepted wherever an array is (they are moved to the CPU and converted);
numpy is the contract, and results are always numpy arrays or Python scalars.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "best_threshold",
    "binarize",
    "bootstrap_ci",
    "confusion",
    "counts_at_thresholds",
    "default_thresholds",
    "dice_from_counts",
    "iou_from_counts",
    "precision_from_counts",
    "recall_from_counts",
    "summarize",
]


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        try:
            return x.numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks
            return x.float().numpy()
    return np.asarray(x)


def _as_mask(x: Any) -> np.ndarray:
    """Return a bool array: ``x`` itself if bool, else ``x > 0``."""
    a = _to_numpy(x)
    return a if a.dtype == np.bool_ else a > 0


def _check_counts(counts: Any) -> np.ndarray:
    c = _to_numpy(counts)
    if c.ndim < 1 or c.shape[-1] != 4:
        raise ValueError(f"counts must have shape (..., 4) = (tp, fp, fn, tn); got shape {c.shape}")
    return c.astype(np.int64, copy=False)


def _ratio(num: np.ndarray, den: np.ndarray, when_zero: np.ndarray | float) -> np.ndarray:
    """``num / den`` as float64, with ``when_zero`` where ``den == 0`` (no division warnings)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)
    return np.where(den == 0, when_zero, out)


def confusion(pred: Any, target: Any) -> np.ndarray:
    """Per-image confusion counts of binary masks.

    Args:
        pred: predicted mask, shape (H, W) or (B, H, W) (any leading dims allowed). bool or numeric;
            foreground iff ``> 0`` (uint8 {0, 255} works).
        target: ground-truth mask, same shape and rules as ``pred``.

    Returns:
        int64 array of shape (..., 4) = (tp, fp, fn, tn), reduced over the last two axes:
        shape (4,) for an (H, W) input, (B, 4) for (B, H, W). ``tp + fp + fn + tn == H * W``.

    Raises:
        ValueError: if the shapes differ or have fewer than two dims.
    """
    p = _as_mask(pred)
    t = _as_mask(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: pred {p.shape} vs target {t.shape}")
    if p.ndim < 2:
        raise ValueError(f"masks must have shape (H, W) or (B, H, W); got shape {p.shape}")
    axes = (-2, -1)
    tp = np.count_nonzero(p & t, axis=axes)
    fp = np.count_nonzero(p & ~t, axis=axes)
    fn = np.count_nonzero(~p & t, axis=axes)
    tn = p.shape[-2] * p.shape[-1] - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=-1).astype(np.int64)


def iou_from_counts(counts: Any, empty_score: float = 1.0) -> np.ndarray:
    """IoU (Jaccard) ``tp / (tp + fp + fn)`` from counts of shape (..., 4); returns float64 (...).

    Where ``tp + fp + fn == 0`` (empty prediction on empty ground truth) the score is ``empty_score``.
    """
    c = _check_counts(counts)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    return _ratio(tp, tp + fp + fn, empty_score)


def dice_from_counts(counts: Any, empty_score: float = 1.0) -> np.ndarray:
    """Dice (F1) ``2 tp / (2 tp + fp + fn)`` from counts of shape (..., 4); returns float64 (...).

    Where ``tp + fp + fn == 0`` (empty prediction on empty ground truth) the score is ``empty_score``.
    """
    c = _check_counts(counts)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    return _ratio(2 * tp, 2 * tp + fp + fn, empty_score)


def precision_from_counts(counts: Any, empty_score: float = 1.0) -> np.ndarray:
    """Precision ``tp / (tp + fp)`` from counts of shape (..., 4); returns float64 (...).

    With no predicted pixels (``tp + fp == 0``): ``empty_score`` if the ground truth is empty too
    (``fn == 0``), else 0.0.
    """
    c = _check_counts(counts)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    return _ratio(tp, tp + fp, np.where(fn == 0, empty_score, 0.0))


def recall_from_counts(counts: Any, empty_score: float = 1.0) -> np.ndarray:
    """Recall ``tp / (tp + fn)`` from counts of shape (..., 4); returns float64 (...).

    With no ground-truth pixels (``tp + fn == 0``): ``empty_score`` if the prediction is empty too
    (``fp == 0``), else 0.0.
    """
    c = _check_counts(counts)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    return _ratio(tp, tp + fn, np.where(fp == 0, empty_score, 0.0))


def summarize(counts: Any, empty_score: float = 1.0) -> dict[str, float | int]:
    """Dataset summary from per-image counts.

    Args:
        counts: int array of shape (N, 4) = (tp, fp, fn, tn) per image, N >= 1.
        empty_score: score of an image whose prediction and ground truth are both empty.

    Returns:
        dict of plain Python numbers (JSON-ready):
        ``iou``, ``dice``: mean over images of the per-image scores (every image weighs the same);
        ``micro_iou``, ``micro_dice``, ``precision``, ``recall``: computed once from the counts summed
        over all images (every pixel weighs the same);
        ``n_images``: N; ``n_empty_gt``: images whose ground truth is empty (``tp + fn == 0``).

    Raises:
        ValueError: if ``counts`` is not (N, 4) or N == 0.
    """
    c = _check_counts(counts)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"counts must have shape (N, 4) with N >= 1; got shape {c.shape}")
    total = c.sum(axis=0)
    return {
        "iou": float(iou_from_counts(c, empty_score).mean()),
        "dice": float(dice_from_counts(c, empty_score).mean()),
        "micro_iou": float(iou_from_counts(total, empty_score)),
        "micro_dice": float(dice_from_counts(total, empty_score)),
        "precision": float(precision_from_counts(total, empty_score)),
        "recall": float(recall_from_counts(total, empty_score)),
        "n_images": int(c.shape[0]),
        "n_empty_gt": int(np.count_nonzero(c[:, 0] + c[:, 2] == 0)),
    }


def binarize(prob: Any, threshold: float) -> np.ndarray:
    """Binary mask ``prob >= threshold`` (bool, same shape as ``prob``).

    Exact for float16/float32/float64 probabilities against the float64 threshold, as if compared in
    float64, without a float64 copy: a float32 map is compared with the smallest float32 >= threshold.
    NaN is never foreground. This is the single threshold rule of the project: ``counts_at_thresholds``
    matches it exactly. Multiply by 255 and cast to uint8 to write a PNG mask.
    """
    p = _float_probabilities(prob)
    return p >= _thresholds_in(p.dtype, np.float64([threshold]))[0]


def _float_probabilities(prob: Any) -> np.ndarray:
    """``prob`` as a float32 or float64 array (other dtypes, float16 included, become float64)."""
    p = _to_numpy(prob)
    return p if p.dtype in (np.float32, np.float64) else p.astype(np.float64)


def _thresholds_in(dtype: np.dtype, thresholds: np.ndarray) -> np.ndarray:
    """float64 ``thresholds`` as values of ``dtype``, each the smallest one >= its threshold, so that
    ``p >= result[i]`` equals ``p >= thresholds[i]`` compared in float64 for every ``p`` of that dtype."""
    t = thresholds.astype(dtype)
    low = t < thresholds  # rounded down: p >= threshold <=> p >= the next representable value
    t[low] = np.nextafter(t[low], dtype.type(np.inf))
    return t


def counts_at_thresholds(prob: Any, target: Any, thresholds: Any) -> np.ndarray:
    """Confusion counts of one image at many thresholds, without materializing the masks.

    Row ``i`` equals ``confusion(binarize(prob, thresholds[i]), target)`` exactly (rule ``prob >= t``,
    as if compared in float64; NaN probabilities count as background). Each pixel is placed among the
    sorted thresholds by a binary search and the places are counted (no sort of the pixels), so sweeping
    19 or 1000 thresholds costs about the same: about 9 ms for a 640x640 float32 map on a 2-core CPU.

    Args:
        prob: foreground probabilities, float array of shape (H, W), nominally in [0, 1].
        target: ground-truth mask of shape (H, W), bool or numeric (foreground iff ``> 0``).
        thresholds: 1-D array-like of T thresholds (ascending by convention; any order works and
            rows follow the given order).

    Returns:
        int64 array of shape (T, 4) = (tp, fp, fn, tn) per threshold.

    Raises:
        ValueError: on a shape mismatch, a prob that is not 2-D, or thresholds that are not 1-D.
    """
    p = _float_probabilities(prob)
    t = _as_mask(target)
    if p.shape != t.shape:
        raise ValueError(f"prob and target shapes differ: prob {p.shape} vs target {t.shape}")
    if p.ndim != 2:
        raise ValueError(f"prob must be one image of shape (H, W); got shape {p.shape}")
    thr = _to_numpy(thresholds).astype(np.float64, copy=False)
    if thr.ndim != 1:
        raise ValueError(f"thresholds must be 1-D; got shape {thr.shape}")

    order = np.argsort(thr, kind="stable")
    ascending = _thresholds_in(p.dtype, thr[order])
    at_least = []  # per class (foreground, background): pixels >= each ascending threshold
    for values in (p[t], p[~t]):
        values = values[~np.isnan(values)]  # NaN is never >= t: background at every threshold
        # searchsorted(..., side="right") = how many thresholds are <= the value, i.e. that it reaches
        places = np.bincount(np.searchsorted(ascending, values, side="right"), minlength=thr.size + 1)
        at_least.append(np.cumsum(places[::-1])[::-1][1:])
    tp, fp = np.empty(thr.size, np.int64), np.empty(thr.size, np.int64)
    tp[order], fp[order] = at_least
    n_pos = int(np.count_nonzero(t))
    return np.stack([tp, fp, n_pos - tp, t.size - n_pos - fp], axis=-1).astype(np.int64)


def best_threshold(per_image_counts: Any, thresholds: Any, empty_score: float = 1.0) -> tuple[float, float]:
    """Threshold that maximizes the mean per-image IoU.

    Args:
        per_image_counts: int array of shape (N, T, 4), e.g. ``np.stack([counts_at_thresholds(...)
            for each image])``, N >= 1.
        thresholds: 1-D array-like of the T thresholds the counts were taken at.
        empty_score: IoU of an image whose prediction and ground truth are both empty.

    Returns:
        ``(threshold, mean_iou)`` as Python floats. Ties (scores within 1e-12 of the best) go to the
        threshold closest to 0.5, and between two equally close ones to the smaller.

    Raises:
        ValueError: if the shapes are not (N, T, 4) and (T,), or N == 0 or T == 0.
    """
    c = _check_counts(per_image_counts)
    thr = _to_numpy(thresholds).astype(np.float64, copy=False)
    if c.ndim != 3 or thr.ndim != 1 or c.shape[1] != thr.shape[0] or c.shape[0] == 0 or thr.size == 0:
        raise ValueError(
            "per_image_counts must be (N, T, 4) and thresholds (T,) with N, T >= 1; "
            f"got {c.shape} and {thr.shape}"
        )
    scores = iou_from_counts(c, empty_score).mean(axis=0)  # (T,)
    candidates = np.flatnonzero(scores >= scores.max() - 1e-12)
    # lexsort: last key is primary -> distance to 0.5 first, then the threshold itself.
    order = np.lexsort((thr[candidates], np.abs(thr[candidates] - 0.5)))
    i = candidates[order[0]]
    return float(thr[i]), float(scores[i])


def default_thresholds() -> np.ndarray:
    """The standard sweep: 0.05, 0.10, ..., 0.95 (19 float64 values, rounded to 2 decimals)."""
    return np.round(np.arange(0.05, 0.951, 0.05), 2)


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(groups: Any, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean of per-image scores: how much it would move had other images
    of the same kind been drawn (not how much another training run or threshold would move it).

    Args:
        groups: one 1-D array of per-image values (N,), or a sequence of such arrays (one per task):
            the statistic is then the mean over groups of each group's mean (``aggregate``'s "overall"),
            and each group is resampled on its own (a stratified bootstrap). For a paired comparison of
            two models on the same images, pass the per-image differences.
        level: coverage of the interval, in (0, 1).
        resamples: number of resamples; each redraws every group's N values with replacement.
        seed: the resampling's seed, so a report gives the same interval on every run.

    Returns:
        ``(low, high)``, the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
        statistic, as Python floats. A group of one value, or of equal values, contributes no spread.

    Raises:
        ValueError: if a group is empty, not 1-D or holds a non-finite value, or ``level`` is not in (0, 1).
    """
    several = isinstance(groups, (list, tuple)) and len(groups) > 0 and np.ndim(groups[0]) == 1
    arrays = [_to_numpy(g).astype(np.float64) for g in (groups if several else [groups])]
    if any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError(f"bootstrap_ci needs non-empty 1-D groups; got shapes {[a.shape for a in arrays]}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("bootstrap_ci needs finite values; got NaN or infinity")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    rng = np.random.default_rng(seed)
    stat = np.zeros(resamples)
    for values in arrays:
        chunk = max(1, 2**22 // values.size)  # resamples per draw: indices stay under ~32 MB
        for start in range(0, resamples, chunk):
            n = min(chunk, resamples - start)
            stat[start:start + n] += values[rng.integers(values.size, size=(n, values.size))].mean(axis=1)
    stat /= len(arrays)
    low, high = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
