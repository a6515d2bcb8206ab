"""Tests for defectseg.metrics: hand-computed counts and scores written as exact fractions."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from defectseg.metrics import (
    best_threshold,
    binarize,
    bootstrap_ci,
    confusion,
    counts_at_thresholds,
    default_thresholds,
    dice_from_counts,
    iou_from_counts,
    precision_from_counts,
    recall_from_counts,
    summarize,
)


def _m(rows: str) -> np.ndarray:
    """Mask from a compact string: rows separated by spaces, "1" = foreground ("110 010")."""
    return np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool)


F = Fraction
# name: (pred, target, (tp, fp, fn, tn), (iou, dice, precision, recall))
CASES = {
    "empty_gt_empty_pred": ("000 000", "000 000", (0, 0, 0, 6), (F(1), F(1), F(1), F(1))),
    "empty_gt_nonempty_pred": ("010 011", "000 000", (0, 3, 0, 3), (F(0), F(0), F(0), F(0))),
    "nonempty_gt_empty_pred": ("000 000", "110 000", (0, 0, 2, 4), (F(0), F(0), F(0), F(0))),
    # tp at (0,0),(1,1); fp at (0,1); fn at (1,2); tn at (0,2),(1,0)
    "partial_overlap": ("110 010", "100 011", (2, 1, 1, 2), (F(2, 4), F(4, 6), F(2, 3), F(2, 3))),
    "over_prediction": ("111 100", "100 000", (1, 3, 0, 2), (F(1, 4), F(2, 5), F(1, 4), F(1))),
    "perfect": ("011 001", "011 001", (3, 0, 0, 3), (F(1), F(1), F(1), F(1))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_computed_cases(name: str) -> None:
    pred, target, expected, (iou, dice, precision, recall) = CASES[name]
    counts = confusion(_m(pred), _m(target))
    assert counts.dtype == np.int64
    assert counts.shape == (4,)
    assert tuple(counts.tolist()) == expected
    # One division of exact integers is correctly rounded, so compare exactly.
    assert iou_from_counts(counts) == float(iou)
    assert dice_from_counts(counts) == float(dice)
    assert precision_from_counts(counts) == float(precision)
    assert recall_from_counts(counts) == float(recall)


def test_scores_vectorize_over_leading_dims() -> None:
    counts = np.array([CASES[n][2] for n in CASES], dtype=np.int64)  # (6, 4)
    expected_iou = np.array([float(CASES[n][3][0]) for n in CASES])
    np.testing.assert_array_equal(iou_from_counts(counts), expected_iou)
    stacked = np.stack([counts, counts])  # (2, 6, 4)
    assert dice_from_counts(stacked).shape == (2, 6)
    np.testing.assert_array_equal(dice_from_counts(stacked)[1], [float(CASES[n][3][1]) for n in CASES])


@pytest.mark.parametrize("empty_score", [0.0, 1.0, float("nan")])
def test_empty_score_only_applies_to_both_empty(empty_score: float) -> None:
    both_empty = np.array([0, 0, 0, 6])
    for fn in (iou_from_counts, dice_from_counts, precision_from_counts, recall_from_counts):
        np.testing.assert_array_equal(fn(both_empty, empty_score=empty_score), empty_score)
    # exactly one side empty is always wrong, whatever empty_score is
    assert iou_from_counts(np.array([0, 3, 0, 3]), empty_score=empty_score) == 0.0
    assert dice_from_counts(np.array([0, 0, 2, 4]), empty_score=empty_score) == 0.0
    assert precision_from_counts(np.array([0, 0, 2, 4]), empty_score=empty_score) == 0.0
    assert recall_from_counts(np.array([0, 3, 0, 3]), empty_score=empty_score) == 0.0


def test_batch_matches_per_image() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((5, 7, 9)) > 0.5
    target = rng.random((5, 7, 9)) > 0.7
    target[2] = False  # one empty ground truth
    pred[3] = False  # one empty prediction
    batch = confusion(pred, target)
    assert batch.shape == (5, 4)
    for i in range(5):
        np.testing.assert_array_equal(batch[i], confusion(pred[i], target[i]))
    np.testing.assert_array_equal(batch.sum(axis=1), 7 * 9)
    np.testing.assert_array_equal(
        iou_from_counts(batch), [iou_from_counts(confusion(pred[i], target[i])) for i in range(5)]
    )
    # extra leading dims
    nested = confusion(pred.reshape(1, 5, 7, 9), target.reshape(1, 5, 7, 9))
    np.testing.assert_array_equal(nested, batch[None])


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_numeric_masks_count_as_positive(dtype: type) -> None:
    pred, target, expected = CASES["partial_overlap"][:3]
    pred, target = _m(pred), _m(target)
    scale = 255 if dtype == np.uint8 else 1
    counts = confusion(pred.astype(dtype) * scale, target.astype(dtype) * scale)
    assert tuple(counts.tolist()) == expected


def test_mixed_bool_and_uint8_and_torch() -> None:
    pred, target, expected = CASES["over_prediction"][:3]
    pred, target = _m(pred), _m(target)
    assert tuple(confusion(pred, target.astype(np.uint8) * 255).tolist()) == expected
    assert tuple(confusion(torch.from_numpy(pred), torch.from_numpy(target)).tolist()) == expected


@pytest.mark.parametrize(
    ("pred_shape", "target_shape"), [((2, 3), (3, 2)), ((1, 2, 3), (2, 3)), ((4,), (4,)), ((), ())]
)
def test_bad_shapes_raise(pred_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros(pred_shape, bool), np.zeros(target_shape, bool))


def test_bad_counts_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        iou_from_counts(np.zeros((3, 3), np.int64))


def _summary_masks() -> tuple[np.ndarray, np.ndarray]:
    # A: perfect, (1, 0, 0, 3): IoU 1, Dice 1
    # B: (1, 1, 2, 0): IoU 1/4, Dice 2/5
    # C: empty/empty, (0, 0, 0, 4): IoU 1, Dice 1
    pred = np.stack([_m("10 00"), _m("11 00"), _m("00 00")]).astype(np.uint8) * 255
    target = np.stack([_m("10 00"), _m("10 11"), _m("00 00")]).astype(np.uint8) * 255
    return pred, target


def test_summarize_mean_vs_micro_two_images() -> None:
    pred, target = _summary_masks()
    counts = confusion(pred[:2], target[:2])
    np.testing.assert_array_equal(counts, [[1, 0, 0, 3], [1, 1, 2, 0]])
    s = summarize(counts)
    # per-image means: (1 + 1/4) / 2 and (1 + 2/5) / 2
    assert s["iou"] == float(Fraction(5, 8))
    assert s["dice"] == pytest.approx(float(Fraction(7, 10)), abs=1e-15)
    # summed counts (2, 1, 2, 3): IoU 2/5, Dice 4/7, precision 2/3, recall 2/4
    assert s["micro_iou"] == float(Fraction(2, 5))
    assert s["micro_dice"] == float(Fraction(4, 7))
    assert s["precision"] == float(Fraction(2, 3))
    assert s["recall"] == float(Fraction(1, 2))
    assert s["n_images"] == 2
    assert s["n_empty_gt"] == 0
    assert s["iou"] != s["micro_iou"] and s["dice"] != s["micro_dice"]


def test_summarize_counts_empty_gt_image() -> None:
    pred, target = _summary_masks()
    s = summarize(confusion(pred, target))
    # mean IoU (1 + 1/4 + 1) / 3, mean Dice (1 + 2/5 + 1) / 3; micro is unchanged by the empty image
    assert s["iou"] == pytest.approx(3 / 4, abs=1e-15)
    assert s["dice"] == pytest.approx(4 / 5, abs=1e-15)
    assert s["micro_iou"] == float(Fraction(2, 5))
    assert s["micro_dice"] == float(Fraction(4, 7))
    assert s["n_images"] == 3
    assert s["n_empty_gt"] == 1
    assert all(type(v) in (int, float) for v in s.values())


@pytest.mark.parametrize("bad", [np.zeros((0, 4), np.int64), np.zeros((4,), np.int64), np.zeros((2, 3))])
def test_summarize_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_binarize_rule_is_greater_or_equal() -> None:
    prob = np.array([[0.49, 0.5], [0.51, 1.0]], dtype=np.float32)
    mask = binarize(prob, 0.5)
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, [[False, True], [True, True]])
    np.testing.assert_array_equal(binarize(np.array([[np.nan, 0.0]]), 0.0), [[False, True]])
    assert tuple(counts_at_thresholds(prob, np.ones((2, 2), bool), [0.5])[0].tolist()) == (3, 0, 1, 0)


@pytest.mark.parametrize("threshold", [0.55, 0.1, 0.5, 1 / 3, 0.0, 1.0, 1.5])
def test_binarize_float32_is_the_float64_comparison(threshold: float) -> None:
    """binarize compares a float32 map without a float64 copy, with the same answer: a float32 just below
    a threshold float32 cannot represent (0.55) is background, the one just above is foreground."""
    t32 = np.float32(threshold)
    near = [np.nextafter(t32, np.float32(-1)), t32, np.nextafter(t32, np.float32(2)), np.float32(np.nan)]
    prob = np.array(near + list(np.random.default_rng(0).random(50)), dtype=np.float32)
    np.testing.assert_array_equal(binarize(prob, threshold), prob.astype(np.float64) >= threshold)
    assert binarize(prob, threshold).dtype == np.bool_


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_at_thresholds_matches_binarize(dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    thresholds = default_thresholds()
    h, w = 13, 17
    prob = rng.random((h, w))
    # a third of the pixels sit exactly on a threshold (after the cast to dtype), plus the ends 0 and 1
    on_grid = rng.random((h, w)) < 0.33
    prob[on_grid] = rng.choice(np.concatenate([thresholds, [0.0, 1.0]]), size=int(on_grid.sum()))
    prob = prob.astype(dtype)
    target = rng.random((h, w)) > 0.6
    counts = counts_at_thresholds(prob, target, thresholds)
    assert counts.shape == (len(thresholds), 4)
    assert counts.dtype == np.int64
    for i, t in enumerate(thresholds):
        np.testing.assert_array_equal(counts[i], confusion(binarize(prob, t), target), err_msg=f"t={t}")
    # the same probabilities as float64 and thresholds as the exact cast values
    exact = prob.astype(np.float64)
    grid = np.unique(exact[on_grid])
    np.testing.assert_array_equal(
        counts_at_thresholds(prob, target, grid),
        np.stack([confusion(exact >= t, target) for t in grid]),
    )


def test_counts_at_thresholds_edge_cases() -> None:
    prob = np.array([[0.0, 0.2, np.nan], [0.7, 1.0, np.nan]], dtype=np.float32)
    target = np.array([[0, 0, 1], [1, 1, 0]], dtype=np.uint8) * 255
    # unsorted, repeated and NaN thresholds are fine (nothing is >= NaN)
    thresholds = [0.9, 0.0, 1.5, 0.2, np.nextafter(np.float32(0.7), np.float32(1.0)), 0.2, np.nan, -np.inf]
    counts = counts_at_thresholds(prob, target, thresholds)
    for i, t in enumerate(thresholds):
        np.testing.assert_array_equal(counts[i], confusion(binarize(prob, t), target))
    # t=0.0: everything but NaN is foreground -> tp 2 (0.7, 1.0), fp 2 (0.0, 0.2), fn 1 (NaN), tn 1 (NaN)
    assert tuple(counts[1].tolist()) == (2, 2, 1, 1)
    # torch input and an all-empty target
    empty = counts_at_thresholds(torch.from_numpy(prob), np.zeros((2, 3), bool), [0.5])
    assert tuple(empty[0].tolist()) == (0, 2, 0, 4)


def test_counts_at_thresholds_shape_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        counts_at_thresholds(np.zeros((2, 3)), np.zeros((3, 2), bool), [0.5])
    with pytest.raises(ValueError, match="shape"):
        counts_at_thresholds(np.zeros((1, 2, 3)), np.zeros((1, 2, 3), bool), [0.5])
    with pytest.raises(ValueError, match="1-D"):
        counts_at_thresholds(np.zeros((2, 3)), np.zeros((2, 3), bool), [[0.5]])


def _hand_sweep() -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.array([0.3, 0.5, 0.7])
    # image 1: IoU 2/3 at 0.3 (fp 0.4), 1 at 0.5, 1/2 at 0.7 (misses 0.6)
    p1 = np.array([[0.2, 0.4], [0.6, 0.8]])
    t1 = np.array([[0, 0], [1, 1]], bool)
    # image 2: IoU 1/3 at 0.3 (fp 0.55, 0.35), 1/2 at 0.5 (fp 0.55), 1 at 0.7
    p2 = np.array([[0.1, 0.55], [0.35, 0.9]])
    t2 = np.array([[0, 0], [0, 1]], bool)
    counts = np.stack([counts_at_thresholds(p, t, thresholds) for p, t in ((p1, t1), (p2, t2))])
    return counts, thresholds


def test_best_threshold_hand_made() -> None:
    counts, thresholds = _hand_sweep()
    assert counts.shape == (2, 3, 4)
    np.testing.assert_allclose(iou_from_counts(counts), [[2 / 3, 1, 1 / 2], [1 / 3, 1 / 2, 1]])
    # only image 2: clear winner 0.7
    assert best_threshold(counts[1:], thresholds) == (0.7, 1.0)
    # both: mean IoU 1/2, 3/4, 3/4 -> tie between 0.5 and 0.7, 0.5 is closer to 0.5
    t, score = best_threshold(counts, thresholds)
    assert t == 0.5
    assert score == pytest.approx(0.75, abs=1e-15)
    # same tie, thresholds given in descending order
    assert best_threshold(counts[:, ::-1], thresholds[::-1])[0] == 0.5


def test_best_threshold_tie_breaks() -> None:
    same = np.array([[[1, 1, 0, 2], [1, 1, 0, 2], [1, 1, 0, 2]]])  # (1, 3, 4), IoU 1/2 everywhere
    assert best_threshold(same, [0.2, 0.6, 0.9]) == (0.6, 0.5)  # closest to 0.5
    assert best_threshold(same, [0.4, 0.6, 0.9]) == (0.4, 0.5)  # equally close -> smaller
    with pytest.raises(ValueError):
        best_threshold(same, [0.4, 0.6])
    with pytest.raises(ValueError):
        best_threshold(np.zeros((0, 2, 4), np.int64), [0.4, 0.6])


def test_default_thresholds() -> None:
    t = default_thresholds()
    assert t.dtype == np.float64
    assert len(t) == 19
    assert t[0] == 0.05 and t[9] == 0.5 and t[-1] == 0.95
    np.testing.assert_array_equal(t, [round(0.05 * k, 2) for k in range(1, 20)])
    assert np.all(np.diff(t) > 0)


# --------------------------------------------------------------------------------------------------
# bootstrap_ci


def test_bootstrap_ci_hand_made() -> None:
    """Two images scoring 0 and 1: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so the
    2.5% and 97.5% quantiles are 0 and 1. Equal values have no spread."""
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)
    assert bootstrap_ci([0.6]) == (0.6, 0.6)
    # stratified: each group resampled on its own, the statistic the mean of the group means:
    # (mean of {0, 1} resampled + 1) / 2 takes 0.5, 0.75, 1
    assert bootstrap_ci([np.array([0.0, 1.0]), np.array([1.0, 1.0])]) == (0.5, 1.0)
    assert bootstrap_ci([np.array([0.2]), np.array([0.4, 0.4, 0.4])]) == pytest.approx((0.3, 0.3))


def test_bootstrap_ci_matches_the_normal_interval_and_is_seeded() -> None:
    """On many images the percentile interval is about mean -+ 1.96 standard errors (here in chunks of
    resamples: 5,000 values); the same seed gives the same interval, another seed a close one."""
    values = np.random.default_rng(3).random(5000)
    low, high = bootstrap_ci(values)
    half = 1.96 * values.std() / np.sqrt(values.size)
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_ci(torch.from_numpy(values)) == (low, high)
    assert bootstrap_ci(values, seed=1) != (low, high)
    assert bootstrap_ci(values, seed=1) == pytest.approx((low, high), abs=half * 0.25)
    narrow = bootstrap_ci(values, level=0.5)
    assert low < narrow[0] < narrow[1] < high


@pytest.mark.parametrize("bad", [[], np.zeros((2, 2)), torch.zeros(2, 2), [np.array([1.0]), np.array([])]])
def test_bootstrap_ci_rejects_empty_or_2d(bad) -> None:
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_ci(bad)


@pytest.mark.parametrize("bad", [[0.5, float("nan")], [np.array([0.5]), np.array([np.inf])]])
def test_bootstrap_ci_rejects_non_finite_values(bad) -> None:
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci(bad)


@pytest.mark.parametrize("level", [0.0, 1.0, 95])
def test_bootstrap_ci_rejects_a_level_outside_0_1(level: float) -> None:
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=level)
