"""Scoring predicted masks against ground truth: the one evaluation path.

Used by ``evaluate.py`` (images -> ``Segmenter.encode`` -> here) and by training validation (cached
activations -> here), so nothing in the scoring functions knows where activations come from::

    activations (Segmenter.encode output, or cached equivalents; B rows, 2B with TTA)
      -> prompt_probabilities: decode each distinct prompt once, only on the rows that use it,
         upsample to each ground truth's ORIGINAL size
      -> score_probabilities: per-image confusion counts at the prompt's threshold, at every sweep
         threshold, and for the other task's prompt ("text sensitivity")
      -> aggregate: per task and overall (= mean of tasks) numbers, JSON-ready

``score_batch`` is the first two steps in one call. Everything is scored at the masks' original
resolution with the project's single threshold rule (``metrics``: foreground iff ``prob >= t``).
Conventions: an image whose ground truth and prediction are both empty scores 1.0 (IoU and Dice),
exactly one of them empty scores 0.0; see ``defectseg.metrics``.

``evaluate_model`` and ``evaluate_pred_dir`` run a whole manifest split through a model or through a
folder of masks made elsewhere (``<image_stem>__<prompt_slug>.png``, predict.py's format). An image or
ground-truth mask that cannot be read is skipped, logged and listed in ``RunResult.skipped``; a ground
truth of another size than its image is scored at its own size (like every ground truth), logged and
listed in ``RunResult.gt_resized``.
"""

from __future__ import annotations

import logging
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from . import cli, metrics
from .cli import stop_if_terminated
from .inference import Segmenter, precision_name, threshold_sources
from .io import (
    ImageReadError,
    cores_per_process,
    load_image,
    prefetched,
    read_mask_png,
    read_mask_values,
    write_json_atomic,
    write_mask_png,
)
from .manifest import mask_name
from .model import DECODER_FILE, METADATA_FILE, read_metadata, update_decoder_metadata
from .tasks import normalize_prompt, prompt_slug, task_for_prompt

log = logging.getLogger(__name__)

EMPTY_SCORE = 1.0  # IoU/Dice of an empty prediction on an empty ground truth
# The one list of the per-task metrics (key -> title): aggregate() averages them over tasks for "overall",
# report.md's tables and metrics.csv take their columns and titles from it. Counts are summed instead.
METRICS = {
    "iou": "mean IoU", "dice": "mean Dice", "micro_iou": "micro IoU", "micro_dice": "micro Dice",
    "precision": "precision", "recall": "recall", "best_iou": "mean IoU at best threshold",
    "text_iou": "other-prompt IoU", "text_dice": "other-prompt Dice", "text_area": "other-prompt area",
}
# aggregate's iou_ci, in the words of reports: how it is made (metrics.bootstrap_ci's defaults) and what it covers.
# Below CI_MIN_IMAGES images per task a percentile bootstrap covers too little, so no interval is given.
CI_MIN_IMAGES = 10
CI_RULE = (f"percentile bootstrap over the images ({metrics.BOOTSTRAP_RESAMPLES:,} resamples, seed 0; overall: "
           f"each task resampled on its own; none below {CI_MIN_IMAGES} images)")
CI_COVERS = ("how far the score could move had other images of the same kind been drawn; it does not cover "
             "another training run, or a threshold or checkpoint chosen on these same images")
RESULT_KEYS = ("iou", "dice", "micro_iou", "micro_dice", "precision", "recall")  # report.md's results table
MEAN_KEYS = tuple(METRICS)
SUM_KEYS = ("n_images", "n_empty_gt", "n_empty_both")


# --------------------------------------------------------------------------------------------------
# Per-image scores


@dataclass
class ImageScore:
    """The scores of one (image, prompt) pair, as confusion counts (tp, fp, fn, tn).

    counts: (4,) int64 at ``threshold`` (None for masks made elsewhere).
    sweep: (T, 4) int64, one row per sweep threshold, or None.
    other_counts: (4,) int64 of the mask predicted with ``other_prompt`` (the other task's canonical
        prompt, at that prompt's threshold) against THIS image's ground truth, or None.
    pred: the (H, W) bool predicted mask, kept only when asked for (``keep_masks``).
    """

    image: str
    mask: str
    task: str
    prompt: str
    counts: np.ndarray
    threshold: float | None = None
    sweep: np.ndarray | None = None
    other_prompt: str | None = None
    other_counts: np.ndarray | None = None
    pred: np.ndarray | None = field(default=None, repr=False)

    @property
    def iou(self) -> float:
        return float(metrics.iou_from_counts(self.counts, EMPTY_SCORE))

    @property
    def dice(self) -> float:
        return float(metrics.dice_from_counts(self.counts, EMPTY_SCORE))

    @property
    def fg_fraction(self) -> float:
        """Fraction of the ground truth's pixels that are foreground."""
        tp, _, fn, _ = (int(v) for v in self.counts)
        return (tp + fn) / max(int(self.counts.sum()), 1)

    @property
    def other_iou(self) -> float | None:
        return None if self.other_counts is None else float(metrics.iou_from_counts(self.other_counts, EMPTY_SCORE))


def select_rows(activations: Sequence[torch.Tensor], index: Sequence[int], n_rows: int) -> list[torch.Tensor]:
    """The activations of batch rows ``index`` out of ``n_rows``.

    Activations may hold k * n_rows rows in k blocks of n_rows (TTA: [images, flipped images]); the same
    rows are taken from every block, keeping the layout. Returns the input itself when all rows are kept.
    """
    total = activations[0].shape[0]
    if n_rows <= 0 or total % n_rows:
        raise ValueError(f"activations have {total} rows, not a multiple of the batch's {n_rows}")
    if list(index) == list(range(n_rows)):
        return list(activations)
    rows = [i + block * n_rows for block in range(total // n_rows) for i in index]
    picked = torch.tensor(rows, dtype=torch.long, device=activations[0].device)
    return [a.index_select(0, picked) for a in activations]


def prompt_probabilities(
    segmenter: Segmenter,
    activations: Sequence[torch.Tensor],
    prompts: Sequence[str | None],
    sizes: Sequence[tuple[int, int]],
) -> list[np.ndarray | None]:
    """Row i's (H_i, W_i) float32 probability map for ``prompts[i]`` (None where the prompt is None).

    Each distinct prompt is decoded once, on only the rows that use it; ``sizes`` are (height, width).
    """
    out: list[np.ndarray | None] = [None] * len(prompts)
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        if prompt is not None:
            rows_of[prompt].append(i)
    for prompt, index in rows_of.items():
        acts = select_rows(activations, index, len(prompts))
        probs = segmenter.probabilities(acts, [tuple(sizes[i]) for i in index], [prompt])[prompt]
        for i, prob in zip(index, probs):
            out[i] = prob
    return out


def score_probabilities(
    rows: Sequence[dict],
    targets: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    threshold_of: Callable[[str], float],
    thresholds: Sequence[float] | np.ndarray | None = None,
    other_prompts: Sequence[str | None] | None = None,
    other_probs: Sequence[np.ndarray | None] | None = None,
    keep_masks: bool = False,
) -> list[ImageScore]:
    """Scores of probability maps that are already at their ground truth's size.

    rows: manifest rows (task, prompt, image, mask); targets: (H, W) bool ground truths; probs: (H, W)
    float maps for each row's own prompt; threshold_of: prompt -> threshold (``Segmenter.threshold``);
    thresholds: the sweep (None: no sweep); other_prompts/other_probs: per row, the other task's prompt
    and its map (None entries: no text-sensitivity score for that row). The images are scored in threads
    (numpy's counting releases Python's lock): 14 to 16 ms a 640x640 image in one thread
    (``bench/bench_inference.py``), which on a GPU would otherwise take most of a validation.
    """
    sweep_thr = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)

    def score(i: int) -> ImageScore:
        row, target, prob = rows[i], targets[i], probs[i]
        threshold = threshold_of(row["prompt"])
        pred = metrics.binarize(prob, threshold)
        other_prompt = other_prompts[i] if other_prompts is not None else None
        other_prob = other_probs[i] if other_probs is not None else None
        other_counts = None
        if other_prompt is not None and other_prob is not None:
            other_counts = metrics.confusion(metrics.binarize(other_prob, threshold_of(other_prompt)), target)
        return ImageScore(
            image=row["image"],
            mask=row["mask"],
            task=row["task"],
            prompt=row["prompt"],
            counts=metrics.confusion(pred, target),
            threshold=float(threshold),
            sweep=None if sweep_thr is None else metrics.counts_at_thresholds(prob, target, sweep_thr),
            other_prompt=other_prompt if other_counts is not None else None,
            other_counts=other_counts,
            pred=pred if keep_masks else None,
        )

    threads = min(len(rows), cores_per_process())
    return [s for _, s in prefetched(score, range(len(rows)), depth=threads if threads > 1 else 0)]


def score_batch(
    segmenter: Segmenter,
    activations: Sequence[torch.Tensor],
    rows: Sequence[dict],
    targets: Sequence[np.ndarray],
    thresholds: Sequence[float] | np.ndarray | None = None,
    other_prompts: dict[str, str] | None = None,
    keep_masks: bool = False,
    own: Sequence[np.ndarray] | None = None,
) -> list[ImageScore]:
    """Score one batch: ``activations`` from ``segmenter.encode`` (or cached equivalents, same layout:
    2B rows with TTA) of the B images of ``rows`` (in that order), ``targets`` their (H, W) bool ground
    truths at ORIGINAL resolution.

    Rows of different tasks may be mixed. ``thresholds``: sweep thresholds (None: no sweep);
    ``other_prompts``: task -> the prompt whose mask is scored against that task's ground truth (text
    sensitivity; None: not measured); ``own``: the rows' own-prompt probabilities when already computed
    (``prompt_probabilities``). Returns one ``ImageScore`` per row, in order.
    """
    sizes = [t.shape[:2] for t in targets]
    if own is None:
        own = prompt_probabilities(segmenter, activations, [r["prompt"] for r in rows], sizes)
    others = [(other_prompts or {}).get(r["task"]) for r in rows]
    other_probs = prompt_probabilities(segmenter, activations, others, sizes)
    return score_probabilities(rows, targets, own, segmenter.threshold, thresholds, others, other_probs,
                               keep_masks)


def other_task_prompts(task_prompts: dict[str, str]) -> dict[str, str] | None:
    """task -> the canonical prompt of the NEXT task (in the given order, cyclically): with two tasks,
    each task's images are also scored with the other task's prompt. None with fewer than two tasks."""
    names = list(task_prompts)
    if len(names) < 2:
        return None
    return {name: task_prompts[names[(i + 1) % len(names)]] for i, name in enumerate(names)}


# --------------------------------------------------------------------------------------------------
# Aggregation


def _task_summary(group: list[ImageScore], thresholds: np.ndarray | None) -> dict[str, Any]:
    counts = np.stack([s.counts for s in group])
    out: dict[str, Any] = {"prompt": group[0].prompt, **metrics.summarize(counts, EMPTY_SCORE)}
    out["n_empty_both"] = int(np.count_nonzero(counts[:, :3].sum(axis=1) == 0))
    used = {s.threshold for s in group}
    out["threshold"] = used.pop() if len(used) == 1 else None
    if thresholds is not None and all(s.sweep is not None for s in group):
        sweep = np.stack([s.sweep for s in group])  # (N, T, 4)
        out["best_threshold"], out["best_iou"] = metrics.best_threshold(sweep, thresholds, EMPTY_SCORE)
        out["sweep_iou"] = [float(v) for v in metrics.iou_from_counts(sweep, EMPTY_SCORE).mean(axis=0)]
        out["sweep_dice"] = [float(v) for v in metrics.dice_from_counts(sweep, EMPTY_SCORE).mean(axis=0)]
    others = [s for s in group if s.other_counts is not None]
    if others:
        out.update(text_sensitivity(np.stack([s.other_counts for s in others])), text_prompt=others[0].other_prompt)
    return out


def text_sensitivity(other: np.ndarray) -> dict[str, float]:
    """What the other task's prompt marks on a task's images; low is good. other: (N, 4) int64 confusion
    counts (tp, fp, fn, tn) of those masks against each image's own ground truth.

    text_iou / text_dice: mean over the images whose own ground truth has foreground (0 when none has); an
    empty ground truth is left out, because there the right answer (nothing) would score 1.0, the worst
    value of a low-is-good number. text_area: mean over every image of the fraction of it marked.
    """
    with_fg = other[(other[:, 0] + other[:, 2]) > 0]
    marked = (other[:, 0] + other[:, 1]) / np.maximum(other.sum(axis=1), 1)
    return {"text_iou": float(metrics.iou_from_counts(with_fg, EMPTY_SCORE).mean()) if len(with_fg) else 0.0,
            "text_dice": float(metrics.dice_from_counts(with_fg, EMPTY_SCORE).mean()) if len(with_fg) else 0.0,
            "text_area": float(marked.mean())}


def aggregate(scores: Sequence[ImageScore], thresholds: Sequence[float] | np.ndarray | None = None) -> dict:
    """Per-task and overall numbers (JSON-ready plain Python values).

    ``tasks[name]``: ``iou``/``dice`` (mean over images), ``micro_iou``/``micro_dice``/``precision``/
    ``recall`` (from summed counts), ``n_images``, ``n_empty_gt``, ``n_empty_both`` (scored 1.0),
    ``threshold`` (the one used), and when every image has a sweep ``best_threshold``/``best_iou``
    (``metrics.best_threshold``) and ``sweep_iou``/``sweep_dice`` (mean over images per threshold);
    with text sensitivity ``text_prompt``, ``text_iou``, ``text_dice`` (low is good); ``iou_ci``, the 95%
    bootstrap interval of the mean IoU over images (``metrics.bootstrap_ci``).
    ``overall``: the mean over tasks of every score (each task weighs the same), the sum of the counts,
    the mean sweep curve, and ``iou_ci`` (each task resampled on its own). ``thresholds`` lists the sweep
    (or is absent).
    """
    thr = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    groups: dict[str, list[ImageScore]] = defaultdict(list)
    for score in scores:
        groups[score.task].append(score)
    tasks = {name: _task_summary(groups[name], thr) for name in sorted(groups)}
    overall: dict[str, Any] = {}
    for key in MEAN_KEYS:
        values = [t[key] for t in tasks.values() if key in t]
        if values and len(values) == len(tasks):
            overall[key] = float(np.mean(values))
    for key in SUM_KEYS:
        overall[key] = int(sum(t[key] for t in tasks.values()))
    for key in ("sweep_iou", "sweep_dice"):
        if tasks and all(key in t for t in tasks.values()):
            overall[key] = [float(v) for v in np.mean([t[key] for t in tasks.values()], axis=0)]
    if (intervals := iou_intervals([[s.iou for s in groups[name]] for name in tasks])) is not None:
        for t, ci in zip(tasks.values(), intervals[0]):
            t["iou_ci"] = ci
        overall["iou_ci"] = intervals[1]
    out: dict[str, Any] = {"tasks": tasks, "overall": overall}
    if thr is not None:
        out["thresholds"] = [float(v) for v in thr]
    return out


def iou_intervals(groups: Sequence[Sequence[float]]) -> tuple[list[list[float]], list[float]] | None:
    """(each group's 95% interval, the interval of the mean of the groups' means) of per-image values, one group
    per task (``metrics.bootstrap_ci``); None when there is no group or one has fewer than ``CI_MIN_IMAGES``."""
    if not groups or min(map(len, groups)) < CI_MIN_IMAGES:
        return None
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    return [list(metrics.bootstrap_ci(a)) for a in arrays], list(metrics.bootstrap_ci(arrays))


def by_image(values: Iterable[tuple[str, str, float]], source: str = "the scores") -> dict[tuple[str, str], float]:
    """(task, image file name) -> value, from (task, image path or name, value) triples: what
    ``paired_difference`` pairs on (a name, not a path, so a report made on another machine pairs too). Raises
    ValueError, naming ``source``, when two images of one task share a file name (preprocess_masks.py never
    writes such a manifest)."""
    out: dict[tuple[str, str], float] = {}
    for task, image, value in values:
        key = (task, Path(image).name)
        if key in out:
            raise ValueError(f"{source}: two images of task {task} are named {key[1]}; they cannot be paired by name")
        out[key] = value
    return out


def iou_by_image(scores: Sequence[ImageScore], source: str = "the scores") -> dict[tuple[str, str], float]:
    """``by_image`` of the scores' IoUs."""
    return by_image(((s.task, s.image, s.iou) for s in scores), source)


def paired_difference(a: Mapping[tuple[str, str], float], b: Mapping[tuple[str, str], float]) -> dict[str, Any]:
    """B's mean IoU minus A's on the images both scored (``iou_by_image``'s keys), per task and overall (mean
    of tasks), each with the 95% bootstrap interval of the per-image differences (a paired comparison: the
    images' own difficulty cancels, so it is far narrower than either score's interval).

    Returns ``{"tasks": {name: {"n_images", "iou_a", "iou_b", "iou_diff", "iou_diff_ci"}}, "overall": {...}}``
    (``iou_a``, ``iou_b``: the two means on those images; ``iou_diff_ci`` None below ``CI_MIN_IMAGES``); tasks
    with no image in common are left out, and "overall" is empty when no task is left.
    """
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key in sorted(a.keys() & b.keys()):
        pairs[key[0]].append((a[key], b[key]))
    groups = {name: np.array(p) for name, p in pairs.items()}  # (N, 2): A's, B's
    diffs = [p[:, 1] - p[:, 0] for p in groups.values()]
    intervals = iou_intervals(diffs)
    summaries = [{"n_images": len(p), "iou_a": float(p[:, 0].mean()), "iou_b": float(p[:, 1].mean()),
                  "iou_diff": float(d.mean())} for p, d in zip(groups.values(), diffs)]
    if not summaries:
        return {"tasks": {}, "overall": {}}
    overall = {"n_images": sum(t["n_images"] for t in summaries),
               **{k: float(np.mean([t[k] for t in summaries])) for k in ("iou_a", "iou_b", "iou_diff")}}
    cis = [*intervals[0], intervals[1]] if intervals else [None] * (len(summaries) + 1)
    for t, ci in zip([*summaries, overall], cis):
        t["iou_diff_ci"] = ci
    return {"tasks": dict(zip(groups, summaries)), "overall": overall}


# --------------------------------------------------------------------------------------------------
# Loading rows


@dataclass
class Batch:
    """Rows that loaded, with their images ((H, W, 3) uint8 RGB, or None when not loaded) and (H, W)
    bool ground truths; ``skipped`` lists the rows that could not be read as {image, task, reason};
    ``gt_resized`` the loaded rows whose ground truth is not the image's size (``ground_truth_size_problem``)."""

    rows: list[dict]
    images: list[np.ndarray] | None
    targets: list[np.ndarray]
    skipped: list[dict]
    gt_resized: list[str] = field(default_factory=list)


def _manifest_size(row: dict) -> tuple[int, int] | None:
    """(height, width) the manifest records for the row's image, or None when it records none."""
    try:
        return int(row["height"]), int(row["width"])
    except (KeyError, TypeError, ValueError):
        return None


def ground_truth_size_problem(row: dict, target: np.ndarray, image: np.ndarray | None) -> str | None:
    """"<mask file>: ground truth WxH, image WxH" when the ground truth is not the size of its image (the
    loaded image, else the size the manifest records for it), else None."""
    size = image.shape[:2] if image is not None else _manifest_size(row)
    if size is None or tuple(size) == target.shape[:2]:
        return None
    return (f"{Path(row['mask']).name}: ground truth {target.shape[1]}x{target.shape[0]}, "
            f"image {size[1]}x{size[0]}")


def _load_row(row: dict, load_images: bool) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    try:
        image = load_image(row["image"]) if load_images else None
        return image, read_mask_png(row["mask"]), None
    except ImageReadError as err:
        return None, None, str(err)


def iter_rows(
    rows: Sequence[dict], batch_size: int, *, load_images: bool = True, workers: int = 2, prefetch: int = 2
) -> Iterator[Batch]:
    """Batches of ``rows`` in order with their images (``defectseg.io.load_image``) and ground-truth
    masks (``read_mask_png``), read by threads up to max(``workers``, ``prefetch``) batches ahead.
    Unreadable files are logged and reported in ``Batch.skipped``, never raised."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    def load(chunk: list[dict]) -> list[tuple]:
        return [_load_row(row, load_images) for row in chunk]

    for chunk, loaded in prefetched(load, chunks, depth=max(1, workers, prefetch)):
        batch = Batch([], [] if load_images else None, [], [])
        for row, (image, target, error) in zip(chunk, loaded):
            if error is not None:
                log.warning("skipping %s: %s", row["image"], error)
                batch.skipped.append({"image": row["image"], "task": row["task"], "reason": error})
                continue
            batch.rows.append(row)
            batch.targets.append(target)
            if batch.images is not None:
                batch.images.append(image)
            if problem := ground_truth_size_problem(row, target, image):
                batch.gt_resized.append(problem)
        yield batch


# --------------------------------------------------------------------------------------------------
# Whole runs


@dataclass
class RunResult:
    """Scores of one evaluated source (a model or a folder of masks) over a manifest split.

    skipped: rows whose image or ground truth could not be read ({image, task, reason}).
    gt_resized: ground truths of another size than their image ("<mask>: ground truth WxH, image WxH"),
        scored at the ground truth's size all the same.
    missing / unreadable / resized: (masks made elsewhere) prediction files not found, not readable
        (both scored as empty predictions) or of another size than the ground truth (resized nearest).
    graded: (masks made elsewhere) prediction files holding more than one non-zero value (probability
        maps, anti-aliased edges), binarized by ``pred_threshold`` (default: any non-zero pixel).
    runtime: timing numbers (``evaluate_model``) or {} .
    """

    scores: list[ImageScore]
    skipped: list[dict] = field(default_factory=list)
    gt_resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    graded: list[str] = field(default_factory=list)
    missing_by_task: dict[str, int] = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)


def warn_gt_resized(result: RunResult) -> None:
    """One warning for every ground truth of another size than its image (the first few named)."""
    if result.gt_resized:
        log.warning("%d ground-truth mask(s) are not the size of their image and are scored at the mask's own "
                    "size (the prediction is fitted to it); re-run preprocess_masks.py? e.g. %s",
                    len(result.gt_resized), "; ".join(result.gt_resized[:3]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device``: the GPU's name, or the CPU and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine() or "cpu"
        return f"CPU {cpu}, {torch.get_num_threads()} torch threads"
    return str(device)


def _runtime(segmenter: Segmenter, timings: list[tuple[int, float, float]], warm_wall: float | None,
             warm_images: int, total_wall: float) -> dict:
    """Timing summary; the first batch (warm-up) is left out when there is more than one."""
    warm = len(timings) > 1
    timed = timings[1:] if warm else timings
    n = sum(t[0] for t in timed)
    encode_ms = 1000 * sum(t[1] for t in timed) / max(n, 1)
    decode_ms = 1000 * sum(t[2] for t in timed) / max(n, 1)
    per_image_prompt = encode_ms + decode_ms
    return {
        "device": device_name(segmenter.device),
        "precision": precision_name(segmenter.amp_dtype),
        "tta": segmenter.tta,
        "ensemble": segmenter.ensemble,
        "warm": warm,
        "images_timed": n,
        "encode_ms_per_image": round(encode_ms, 3),
        "decode_ms_per_image_prompt": round(decode_ms, 3),
        "ms_per_image_prompt": round(per_image_prompt, 3),
        "model_images_per_s": round(1000 / per_image_prompt, 2) if per_image_prompt > 0 else None,
        "end_to_end_images_per_s": round(warm_images / warm_wall, 2) if warm_wall and warm_images else None,
        "seconds_total": round(total_wall, 2),
    }


def evaluate_model(
    segmenter: Segmenter,
    rows: Sequence[dict],
    *,
    batch_size: int = 16,
    thresholds: Sequence[float] | np.ndarray | None = None,
    other_prompts: dict[str, str] | None = None,
    mask_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> RunResult:
    """Run ``rows`` through ``segmenter`` (the inference path from images) and score every image.

    Timing: per batch, processor + ``encode`` ("encode") and decoding + upsampling each row's own prompt
    ("decode"); loading, text-sensitivity decoding and scoring are not model time. With ``mask_dir``,
    each predicted mask is written there as ``<image_stem>__<prompt_slug>.png`` (predict.py's format).
    """
    result = RunResult(scores=[])
    timings: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    warm_start, warm_from = None, 0
    batches = iter_rows(rows, batch_size, load_images=True, workers=workers)
    for batch in cli.progress(batches, total=-(-len(rows) // batch_size), desc="evaluate", unit="batch",
                              enabled=progress):
        stop_if_terminated()
        result.skipped += batch.skipped
        result.gt_resized += batch.gt_resized
        if not batch.rows:
            continue
        sizes = [t.shape[:2] for t in batch.targets]
        t0 = time.perf_counter()
        acts = segmenter.encode(segmenter.pixel_values(batch.images))
        _sync(segmenter.device)
        t1 = time.perf_counter()
        own = prompt_probabilities(segmenter, acts, [r["prompt"] for r in batch.rows], sizes)
        t2 = time.perf_counter()
        scores = score_batch(segmenter, acts, batch.rows, batch.targets, thresholds, other_prompts,
                             keep_masks=mask_dir is not None, own=own)
        if mask_dir is not None:
            for score in scores:
                write_mask_png(Path(mask_dir) / output_name(score.image, score.mask, score.prompt), score.pred)
                score.pred = None
        result.scores += scores
        timings.append((len(batch.rows), t1 - t0, t2 - t1))
        if warm_start is None:
            warm_start, warm_from = time.perf_counter(), len(result.scores)
    end = time.perf_counter()
    warn_gt_resized(result)
    warm_wall = end - warm_start if warm_start is not None and len(timings) > 1 else None
    result.runtime = _runtime(segmenter, timings, warm_wall, len(result.scores) - warm_from, end - start)
    return result


def output_name(image: str, mask: str, prompt: str) -> str:
    """The file name predict.py gives the mask of (image, prompt): ``<image_stem>__<prompt_slug>.png``. For a
    row of preprocess's manifest that is its ground truth's own name, which is also right when the image is
    a symlink (git-annex, DVC): the manifest records the link's target, predict.py names by the link."""
    ending = f"__{prompt_slug(prompt)}.png"
    own = Path(mask).name
    return own if own.endswith(ending) else mask_name(image, prompt_slug(prompt))


def prediction_path(pred_dir: str | Path, row: dict) -> Path:
    """Where a folder of masks made elsewhere holds the mask of ``row`` (``output_name``)."""
    return Path(pred_dir) / output_name(row["image"], row["mask"], row["prompt"])


def read_prediction_values(path: str | Path) -> np.ndarray | None:
    """The (H, W) pixel values of a mask file as stored (``io.read_mask_values``), or None when it
    cannot be read."""
    try:
        return read_mask_values(path)
    except ImageReadError:
        return None


def is_graded(values: np.ndarray) -> bool:
    """True when a mask holds more than one non-zero value ({0, 255}, {0, 1} or all-zero are binary):
    a probability map or anti-aliased edges, which binarizing at > 0 would score as foreground."""
    nonzero = values[values != 0]
    return nonzero.size > 0 and bool((nonzero != nonzero.flat[0]).any())


def read_prediction(pred_dir: str | Path, row: dict, shape: tuple[int, int],
                    pred_threshold: float | None = None) -> tuple[np.ndarray, str, np.ndarray | None]:
    """The (H, W) = ``shape`` bool mask predicted for ``row`` in ``pred_dir``, how it was found ("ok",
    "resized" (another size: resized nearest), "missing" or "unreadable" (both: an empty mask)), and the
    file's pixel values as stored (None when missing or unreadable). Foreground: pixel value >=
    ``pred_threshold`` (values as stored), or any non-zero pixel when None."""
    path = prediction_path(pred_dir, row)
    if not path.is_file():
        return np.zeros(shape, dtype=bool), "missing", None
    values = read_prediction_values(path)
    if values is None:
        return np.zeros(shape, dtype=bool), "unreadable", None
    pred = values > 0 if pred_threshold is None else values >= pred_threshold
    if pred.shape != tuple(shape):
        resized = cv2.resize(pred.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
        return resized > 0, "resized", values
    return pred, "ok", values


class Marked(NamedTuple):
    """A prediction file that marks anything: its name, its smallest and largest non-zero values as stored,
    whether it is graded (``is_graded``) and the largest value its type holds (255, 65535)."""

    name: str
    low: int
    top: int
    graded: bool
    scale: int


def marked_values(name: str, values: np.ndarray) -> Marked | None:
    """``Marked`` of a prediction's stored values, None when it marks nothing."""
    nonzero = values[values > 0]
    if nonzero.size == 0:
        return None
    scale = int(np.iinfo(values.dtype).max) if np.issubdtype(values.dtype, np.integer) else 1
    return Marked(name, int(nonzero.min()), int(nonzero.max()), is_graded(values), scale)


def suggested_threshold(marked: Sequence[Marked]) -> int:
    """Half the scale of the graded predictions' type: 128 for 8-bit, 32768 for 16-bit files."""
    return (max((m.scale for m in marked if m.graded), default=255) + 1) // 2


def warn_off_scale(marked: list[Marked], pred_threshold: float, pred_dir: str | Path) -> None:
    """Warn when ``pred_threshold`` is not on the scale of the masks' values (as stored): above the largest
    value of every mask that marks anything ({0, 1} masks at 128: all scored as empty), or at most the
    smallest non-zero value of every graded mask, so that it changes nothing (0..255 probabilities at 0.5,
    16-bit ones at 128: every non-zero pixel counts)."""
    graded = [m for m in marked if m.graded]
    if marked and all(m.top < pred_threshold for m in marked):
        top = max(marked, key=lambda m: m.top)
        log.warning("--pred-threshold %g is above every value of the %d prediction(s) in %s that mark anything "
                    "(the largest: %d, in %s), so all of them score as empty: give V on the masks' own scale",
                    pred_threshold, len(marked), pred_dir, top.top, top.name)
    elif graded and all(m.low >= pred_threshold for m in graded):
        log.warning("--pred-threshold %g is a value as stored, but %d prediction(s) in %s hold graded values up to %d "
                    "and none below it but 0 (e.g. %s), so every non-zero pixel counts as foreground: for "
                    "0..%d probabilities use e.g. %d", pred_threshold, len(graded), pred_dir,
                    max(m.top for m in graded), graded[0].name, 2 * suggested_threshold(graded) - 1,
                    suggested_threshold(graded))


def check_found(result: RunResult, rows: Sequence[dict], pred_dir: str | Path) -> None:
    """Raise ValueError when no prediction was found or readable for any row: the folder is not a set of
    ``prediction_path`` masks for these images (another naming, another split), and a report of zeros would
    say nothing about it."""
    if not result.scores or len(result.missing) + len(result.unreadable) < len(result.scores):
        return
    held = sorted(p.name for p in Path(pred_dir).iterdir())[:3]
    what = (f"{len(result.unreadable)} unreadable, " if result.unreadable else "") + f"{len(result.missing)} missing"
    raise ValueError(f"{pred_dir}: none of the {len(result.scores)} predictions scored was found and readable "
                     f"({what}): masks must be named <image_stem>__<prompt_slug>.png, e.g. "
                     f"{prediction_path(pred_dir, rows[0]).name}; the folder holds "
                     + (", ".join(held) + ("..." if len(held) == 3 else "") if held else "nothing"))


def evaluate_pred_dir(pred_dir: str | Path, rows: Sequence[dict], *, workers: int = 2,
                      progress: bool = True, pred_threshold: float | None = None) -> RunResult:
    """Score a folder of masks made elsewhere (no model): for each row, ``prediction_path(pred_dir, row)``.
    A missing or unreadable file scores as an empty prediction and is listed; another size is resized
    nearest to the ground truth's size and listed; a file holding graded values (not just 0 and one
    other value) is listed, and warned about when no ``pred_threshold`` was given (foreground: value >=
    ``pred_threshold``, default any non-zero value). No sweep, no text sensitivity. Raises ValueError
    (``check_found``) when not one prediction was found and readable."""
    result = RunResult(scores=[])
    start = time.perf_counter()
    lists = {"missing": result.missing, "unreadable": result.unreadable, "resized": result.resized}
    marked: list[Marked] = []  # each prediction that marks anything
    for batch in cli.progress(iter_rows(rows, 64, load_images=False, workers=workers), desc="score", unit="batch",
                              total=-(-len(rows) // 64), enabled=progress):
        result.skipped += batch.skipped
        result.gt_resized += batch.gt_resized
        for row, target in zip(batch.rows, batch.targets):
            pred, status, values = read_prediction(pred_dir, row, target.shape, pred_threshold)
            name = prediction_path(pred_dir, row).name
            if status in lists:
                lists[status].append(name)
            if values is not None and (m := marked_values(name, values)) is not None:
                marked.append(m)
                if m.graded:
                    result.graded.append(name)
            if status == "missing":
                result.missing_by_task[row["task"]] = result.missing_by_task.get(row["task"], 0) + 1
            result.scores.append(ImageScore(image=row["image"], mask=row["mask"], task=row["task"],
                                            prompt=row["prompt"], counts=metrics.confusion(pred, target)))
    check_found(result, rows, pred_dir)
    warn_gt_resized(result)
    for status, names in lists.items():
        if names:
            log.warning("%d prediction(s) %s in %s (%s), e.g. %s", len(names), status, pred_dir,
                        "resized nearest to the ground truth" if status == "resized" else "scored as empty",
                        ", ".join(names[:3]))
    if result.graded and pred_threshold is None:
        log.warning("%d prediction(s) in %s hold values other than 0 and 255 (probability maps?), e.g. %s; "
                    "they are binarized at > 0, so every non-zero pixel counts as foreground: threshold them "
                    "first, or pass --pred-threshold (e.g. %d)", len(result.graded), pred_dir, result.graded[0],
                    suggested_threshold(marked))
    if pred_threshold is not None:
        warn_off_scale(marked, pred_threshold, pred_dir)
    for task, n in sorted(result.missing_by_task.items()):
        if n == sum(s.task == task for s in result.scores):
            log.warning("%s has no mask at all for task %s (all %d scored as empty); if it does not cover that "
                        "task, leave it out with --tasks", pred_dir, task, n)
    result.runtime = {"seconds_total": round(time.perf_counter() - start, 2)}
    return result


# --------------------------------------------------------------------------------------------------
# Examples (image, ground truth, prediction) for a scored image


def _example_inputs(score: ImageScore) -> tuple[np.ndarray | None, np.ndarray]:
    target = read_mask_png(score.mask)
    try:
        image = load_image(score.image)
    except ImageReadError as err:
        log.warning("example image unreadable: %s", err)
        image = None
    return image, target


def model_example(segmenter: Segmenter, score: ImageScore) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(image, ground truth, predicted mask) of a scored image, predicted again through the same path."""
    image, target = _example_inputs(score)
    if image is None:
        return None, target, np.zeros_like(target)
    acts = segmenter.encode(segmenter.pixel_values([image]))
    prob = prompt_probabilities(segmenter, acts, [score.prompt], [target.shape])[0]
    return image, target, metrics.binarize(prob, segmenter.threshold(score.prompt))


def pred_dir_example(pred_dir: str | Path, score: ImageScore, pred_threshold: float | None = None,
                     ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(image, ground truth, predicted mask) of an image scored from a folder of masks."""
    image, target = _example_inputs(score)
    row = {"image": score.image, "mask": score.mask, "prompt": score.prompt}
    return image, target, read_prediction(pred_dir, row, target.shape, pred_threshold)[0]


# --------------------------------------------------------------------------------------------------
# The checkpoint: footprint and tuned thresholds


NOT_MODEL_FILES = (".md", ".png", ".csv")  # a model folder's card, curves and metrics: not loaded


def _size_on_disk(path: Path) -> int:
    """Bytes of a file, or of the files a model folder's loading reads: its own files (not its subfolders,
    such as a shipped model's report/) less ``NOT_MODEL_FILES``."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix.lower() not in NOT_MODEL_FILES)


def find_decoder_file(model_arg: str) -> Path | None:
    """The decoder-only file of a model: the argument itself when it is a ``.safetensors`` file, else
    ``decoder.safetensors`` in the model folder or its parent (a run folder), else None."""
    path = Path(model_arg).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir():
        for candidate in (path / DECODER_FILE, path.parent / DECODER_FILE):
            if candidate.is_file():
                return candidate
    return None


def model_footprint(model_arg: str, counts: dict[str, int | None]) -> dict[str, Any]:
    """Parameter counts (total, decoder: ``model.parameter_counts``) and sizes on disk (bytes; None when
    not a local folder/file)."""
    path = Path(model_arg).expanduser()
    decoder_file = find_decoder_file(model_arg)
    return {
        **counts,
        "model_folder": str(path) if path.is_dir() else None,
        "model_folder_bytes": _size_on_disk(path) if path.is_dir() else None,
        "decoder_file": str(decoder_file) if decoder_file else None,
        "decoder_file_bytes": _size_on_disk(decoder_file) if decoder_file else None,
    }


def thresholds_target(model_arg: str) -> Path:
    """The checkpoint folder whose ``defectseg.json`` tuned thresholds can be written to.

    Raises ValueError (a user-facing message) for a Hub id, a decoder file or a folder that is not a
    checkpoint.
    """
    path = Path(model_arg).expanduser()
    if path.is_file():
        raise ValueError(f"--write-thresholds needs a checkpoint folder; {path} is a file (a decoder file's "
                         "metadata lives in its header and is written by training, not here)")
    if not path.is_dir():
        raise ValueError(f"--write-thresholds needs a local checkpoint folder; {model_arg!r} is not one "
                         "(a Hub id cannot be written to)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--write-thresholds: {path} is not a checkpoint folder (no config.json)")
    return path


def best_thresholds(summary: dict, segmenter: Segmenter) -> dict[str, float]:
    """canonical prompt -> best threshold of its task's sweep, from ``aggregate`` output. The canonical
    prompt is the segmenter's task table's (what ``Segmenter.threshold`` looks up)."""
    best = {}
    for task in summary["tasks"].values():
        if "best_threshold" in task:
            known = task_for_prompt(task["prompt"], segmenter.tasks)
            best[known.prompt if known is not None else task["prompt"]] = task["best_threshold"]
    return best


def write_thresholds(model_dir: str | Path, thresholds: dict[str, float], source: dict[str, Any]) -> Path:
    """Store ``thresholds`` {canonical prompt: value} in the checkpoint folder's ``defectseg.json``
    (other metadata and other prompts' thresholds kept) with ``source`` as each one's record under
    ``thresholds_sources`` (``inference.threshold_sources``: the other prompts keep theirs), and in its decoder
    file's header, atomically. Returns the metadata file's path."""
    folder = Path(model_dir)
    old = read_metadata(folder)
    new = {normalize_prompt(k) for k in thresholds}
    kept = {k: v for k, v in old.get("thresholds", {}).items() if normalize_prompt(k) not in new}
    sources = {p: r for p, r in threshold_sources(old).items() if p in map(normalize_prompt, kept)}
    meta = {k: v for k, v in old.items() if k != "thresholds_source"}  # the one record of earlier versions
    meta.update(thresholds={**kept, **{k: float(v) for k, v in thresholds.items()}},
                thresholds_sources={**sources, **{normalize_prompt(k): source for k in thresholds}})
    target = folder / METADATA_FILE
    write_json_atomic(target, meta)
    if (folder / DECODER_FILE).is_file():  # the decoder file carries the same metadata
        try:
            update_decoder_metadata(folder / DECODER_FILE, meta)
        except BaseException:  # the two files must agree: put defectseg.json back
            write_json_atomic(target, old)
            raise
    return target
