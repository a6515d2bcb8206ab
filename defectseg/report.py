"""What ``evaluate.py`` writes: metrics.json, per_image.csv, report.md, threshold_curves.png, example grids.

``report.md`` is rendered from the metrics dict alone (the same content as metrics.json), so a report
can be re-rendered from a saved metrics.json. A whole report is written through ``io.AtomicFolder``: in full
beside its folder, then swapped in, so a folder never mixes two reports and a run that fails (bad input,
a full disk) leaves the earlier report as it was. The folder is the report's alone: ``check_out_folder``
refuses one that holds anything else.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .evaluation import CI_COVERS, CI_RULE, EMPTY_SCORE, METRICS, RESULT_KEYS, ImageScore, RunResult, by_image
from .io import (
    encode_png,
    os_reason,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from .manifest import SUMMARY_FILE

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"
REPORT_FILE = "report.md"
CURVES_FILE = "threshold_curves.png"
MASKS_DIR = "masks"  # --save-masks
PER_IMAGE_COLUMNS = ["image", "task", "prompt", "iou", "dice", "tp", "fp", "fn", "fg_fraction",
                     "other_prompt_iou"]
FIRST_NAMES = 5  # how many names of missing/skipped files are listed
# leakage keys of preprocess's summary.json, with the words the report uses
LEAKAGE_COLUMNS = {
    "same_source_as_train": "same source photo as a train image",
    "identical_pixels_in_train": "identical pixels",
    "near_duplicate_of_train": "near-duplicate (any flip/rotation)",
    "any_of_these": "any of these",
}
ExampleLoader = Callable[[ImageScore], tuple["np.ndarray | None", np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------------
# The metrics dict


def source_metrics(label: str, kind: str, result: RunResult, summary: dict,
                   footprint: dict | None = None) -> dict[str, Any]:
    """The metrics of one evaluated source: ``kind`` is "model" or "pred_dir"; ``summary`` is
    ``evaluation.aggregate`` output; lists of files are cut to their first few names."""
    out: dict[str, Any] = {"model": label, "kind": kind, **summary, "runtime": result.runtime,
                           "footprint": footprint, "n_skipped": len(result.skipped), "skipped": result.skipped,
                           "gt_resized": {"count": len(result.gt_resized),
                                          "first": result.gt_resized[:FIRST_NAMES]}}
    if kind == "pred_dir":
        out["predictions"] = {
            name: {"count": len(files), "first": files[:FIRST_NAMES]}
            for name, files in (("missing", result.missing), ("unreadable", result.unreadable),
                                ("resized", result.resized), ("graded", result.graded))
        }
        out["predictions"]["missing"]["by_task"] = dict(result.missing_by_task)
    return out


def read_leakage(data_dir: str | Path, split: str) -> dict[str, Any] | None:
    """The leakage counts of ``split`` from ``<data>/summary.json``: {"tasks": {task: counts},
    "measured": whether train was preprocessed in that run (without it nothing could be found)}."""
    path = Path(data_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("images", *LEAKAGE_COLUMNS)
    try:
        tasks = {task: splits[split] for task, splits in summary.get("leakage", {}).items() if split in splits}
        if not all(isinstance(c.get(k), int) for c in tasks.values() for k in keys):
            raise ValueError("a count is missing")
        measured = "train" in summary.get("splits", [])
    except (AttributeError, TypeError, ValueError) as err:
        log.warning("%s: leakage numbers not in the expected form (%s); the report leaves them out", path, err)
        return None
    return {"tasks": tasks, "measured": measured}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# per_image.csv


def per_image_csv(scores: Sequence[ImageScore]) -> str:
    """One row per scored image (``PER_IMAGE_COLUMNS``); other_prompt_iou empty when not measured."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_IMAGE_COLUMNS)
    for s in scores:
        tp, fp, fn, _ = (int(v) for v in s.counts)
        other = s.other_iou
        writer.writerow([s.image, s.task, s.prompt, f"{s.iou:.6f}", f"{s.dice:.6f}", tp, fp, fn,
                         f"{s.fg_fraction:.6f}", "" if other is None else f"{other:.6f}"])
    return buf.getvalue()


def read_per_image_iou(path: str | Path, column: str = "iou") -> dict[tuple[str, str], float]:
    """``evaluation.by_image`` of a saved report: its per_image.csv, or the report folder holding one
    (``column``: another number of it, e.g. "fg_fraction"). Raises ValueError naming the file when it cannot
    be read as one."""
    path = Path(path) / PER_IMAGE_FILE if Path(path).is_dir() else Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(r["task"], r["image"], float(r[column])) for r in csv.DictReader(f)]
    except OSError as err:
        raise ValueError(f"cannot read per-image scores from {path}: {os_reason(err)}") from None
    except (KeyError, ValueError, TypeError, csv.Error) as err:
        raise ValueError(f"cannot read per-image scores from {path}: not an evaluate.py per_image.csv ({err})") from None
    return by_image(rows, str(path))


# --------------------------------------------------------------------------------------------------
# Example grids


def pick_examples(scores: Sequence[ImageScore], n: int) -> list[tuple[str, ImageScore]]:
    """Up to ``n`` best, ``n`` median and ``n`` worst images by IoU (ties by name), best first. With fewer
    than 3n images each is shown once, labelled by the third of the ranking it falls in (the lowest
    scores are never called "best")."""
    order = sorted(scores, key=lambda s: (-s.iou, s.image))
    total = len(order)
    if total <= 3 * n:
        return [(("best", "median", "worst")[3 * i // total], s) for i, s in enumerate(order)]
    start = max(n, min(total // 2 - n // 2, total - 2 * n))
    picks = ([("best", i) for i in range(n)] + [("median", i) for i in range(start, start + n)]
             + [("worst", i) for i in range(total - n, total)])
    return [(label, order[i]) for label, i in picks]


def _fit(image: np.ndarray, tile: int, interpolation: int) -> np.ndarray:
    """``image`` scaled to fit a tile x tile square (aspect kept), centred on grey. (H, W, 3) uint8."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    h, w = image.shape[:2]
    scale = tile / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(image, (nw, nh), interpolation=interpolation)
    out = np.full((tile, tile, 3), 64, dtype=np.uint8)
    top, left = (tile - nh) // 2, (tile - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


# One colour language for every picture: what the model marks is green (predict.py's overlays, the web
# app); scored against a ground truth, the marked pixels that are wrong turn red and the missed ones blue.
PREDICTED = (0, 255, 0)
FALSE_POSITIVE = (255, 0, 0)
MISSED = (0, 90, 255)
LEGEND = "green: predicted and true, red: predicted but not true, blue: missed"


def overlay(image: np.ndarray | None, target: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image dimmed; predicted pixels green where the ground truth agrees, red where
    it does not; missed pixels blue (``PREDICTED``, ``FALSE_POSITIVE``, ``MISSED``)."""
    base = np.full((*target.shape, 3), 128, np.uint8) if image is None else image
    if base.shape[:2] != target.shape:
        base = cv2.resize(base, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_AREA)
    out = base.astype(np.float32) * 0.55
    for mask, color in ((pred & target, PREDICTED), (pred & ~target, FALSE_POSITIVE), (~pred & target, MISSED)):
        out[mask] = out[mask] * 0.35 + np.array(color, np.float32) * 0.65
    return out.clip(0, 255).astype(np.uint8)


def _text_bar(text: str, width: int, height: int = 24) -> np.ndarray:
    bar = np.full((height, width, 3), 255, dtype=np.uint8)
    cv2.putText(bar, text, (6, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def example_grid(examples: Sequence[tuple[str, ImageScore, np.ndarray | None, np.ndarray, np.ndarray]],
                 tile: int = 256) -> np.ndarray:
    """(H, W, 3) uint8 RGB grid: one row per (label, score, image, ground truth, prediction), columns
    image | ground truth | prediction | overlay, each row under a line naming the image and its scores."""
    columns = ["image", "ground truth", "prediction", "overlay (legend below)"]
    width = 4 * tile
    parts = [np.concatenate([_text_bar(c, tile) for c in columns], axis=1)]
    for label, score, image, target, pred in examples:
        name = Path(score.image).name
        name = name if len(name) <= 60 else name[:57] + "..."
        parts.append(_text_bar(f"{label}: IoU {score.iou:.3f}  Dice {score.dice:.3f}  {name}", width))
        shown = np.full((*target.shape, 3), 128, np.uint8) if image is None else image
        tiles = [_fit(shown, tile, cv2.INTER_AREA)]
        tiles += [_fit(m.astype(np.uint8) * 255, tile, cv2.INTER_NEAREST) for m in (target, pred)]
        tiles.append(_fit(overlay(image, target, pred), tile, cv2.INTER_AREA))
        parts.append(np.concatenate(tiles, axis=1))
    parts.append(_text_bar(f"overlay: {LEGEND}", width))
    return np.concatenate(parts, axis=0)


def write_examples(out: Path, scores: Sequence[ImageScore], loader: ExampleLoader, n: int) -> list[str]:
    """``examples_<task>.png`` per task (``pick_examples``); returns the file names written."""
    written = []
    for task in sorted({s.task for s in scores}):
        picks = pick_examples([s for s in scores if s.task == task], n)
        rows = [(label, score, *loader(score)) for label, score in picks]
        name = f"examples_{task}.png"
        write_bytes_atomic(out / name, encode_png(example_grid(rows)))
        written.append(name)
    return written


# --------------------------------------------------------------------------------------------------
# threshold_curves.png


def plot_threshold_curves(path: Path, sections: Sequence[dict]) -> bool:
    """Mean IoU against threshold per task for each metrics section (the first solid, the others
    dashed), the best threshold marked. Returns False (nothing written) when no section has a sweep."""
    curves = [(i, s, name, t) for i, s in enumerate(sections)
              for name, t in s["tasks"].items() if "sweep_iou" in t]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    task_names = sorted({name for _, _, name, _ in curves})
    for i, section, name, task in curves:
        color = colors[task_names.index(name) % len(colors)]
        source = model_label(section["model"])
        ax.plot(section["thresholds"], task["sweep_iou"], color=color, linestyle="-" if i == 0 else "--",
                marker="." if i == 0 else None,
                label=f"{name} ({task['prompt']}), {source}: best {task['best_threshold']:g} -> "
                      f"{task['best_iou']:.3f}")
        ax.plot([task["best_threshold"]], [task["best_iou"]], "o", color=color, markersize=7)
    ax.set_xlabel("threshold (foreground iff probability >= threshold)")
    ax.set_ylabel("mean IoU over images")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return True


# --------------------------------------------------------------------------------------------------
# report.md


def model_label(model: str) -> str:
    """A short name for a model or mask folder: its folder name, with the run's name for a run's
    checkpoint (``runs/demo/best`` -> ``demo/best``)."""
    path = Path(model)
    if path.name in ("best", "last") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or model


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rate(value: float | None) -> str:
    return "not measured (one batch only: it would time the warm-up)" if value is None else f"{value:.1f} images/s"


def _thr(value: float | None) -> str:
    """A threshold as used and stored (0.125 stays 0.125; 2 decimals would show 0.12)."""
    return "n/a" if value is None else f"{value:g}"


def _size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} kB"


def _cell(value: Any) -> str:
    """A table cell: a "|" in a prompt or path (even in a code span) would start a new column."""
    return " ".join(_num(value).replace("|", "\\|").split("\n"))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _rows_with_overall(m: dict) -> list[tuple[str, dict]]:
    return [(name, t) for name, t in m["tasks"].items()] + [("**overall** (mean of tasks)", m["overall"])]


def interval_text(ci: Sequence[float] | None, digits: int = 4, signed: bool = False) -> str:
    """A bootstrap interval as "0.4536 to 0.5052" ("" when absent)."""
    if not ci:
        return ""
    return " to ".join(f"{v:{'+' if signed else ''}.{digits}f}" for v in ci)


def _results_section(m: dict) -> str:
    header = ["task", "prompt", "images", METRICS["iou"], "95% interval", *(METRICS[k] for k in RESULT_KEYS[1:])]
    rows = [[name, t.get("prompt", ""), t["n_images"], t.get("iou"), interval_text(t.get("iou_ci")),
             *(t.get(k) for k in RESULT_KEYS[1:])] for name, t in _rows_with_overall(m)]
    if m["kind"] == "model":
        header.append("threshold")
        for row, name in zip(rows, [*m["tasks"], None]):
            row.append(_thr(m["tasks"][name].get("threshold")) if name else "")
    return _table(header, rows)


def _compare_section(a: dict, b: dict) -> str:
    keys = [k for k in ("iou", "dice", "micro_iou", "best_iou", "text_iou")
            if k in a["overall"] or k in b["overall"]]
    header = ["task"]
    for k in keys:
        header += [f"{METRICS[k]}: A", "B", "B - A"]
    rows = []
    b_rows = dict(_rows_with_overall(b))
    for name, ta in _rows_with_overall(a):
        tb = b_rows.get(name, {})
        row: list[Any] = [name]
        for k in keys:
            va, vb = ta.get(k), tb.get(k)
            row += [va, vb, None if va is None or vb is None else vb - va]
        rows.append(row)
    ms = [x["runtime"].get("ms_per_image_prompt") for x in (a, b)]
    text = [f"A = `{a['model']}`, B = `{b['model']}` (same data, split and options).", "", _table(header, rows)]
    if paired := b.get("paired"):
        rows = [[name, t["n_images"], f"{t['iou_diff']:+.4f}", interval_text(t["iou_diff_ci"], signed=True)]
                for name, t in _rows_with_overall(paired) if t]
        text += ["", "Paired: B's per-image IoU minus A's on the same images, averaged, with its 95% bootstrap "
                 "interval. The images' own difficulty cancels, so an interval that excludes 0 is a difference "
                 "that the choice of images does not explain (another training run may still differ).", "",
                 _table(["task", "images", f"{METRICS['iou']}: B - A", "95% interval"], rows)]
    if all(v is not None for v in ms) and all(x["runtime"].get("warm") for x in (a, b)):
        text += ["", f"Warm time per image per prompt: A {ms[0]:.2f} ms, B {ms[1]:.2f} ms."]
    if problems := _problems_section(b):  # B's missing or resized files explain its numbers too
        text += ["", "Of B:", "", problems]
    return "\n".join(text)


def _sweep_section(m: dict) -> str:
    rows = []
    for name, t in m["tasks"].items():
        if "sweep_iou" not in t:
            continue
        at_used = None
        if t.get("threshold") in m["thresholds"]:
            at_used = t["sweep_iou"][m["thresholds"].index(t["threshold"])]
        rows.append([name, t["prompt"], _thr(t.get("threshold")), at_used, _thr(t["best_threshold"]),
                     t["best_iou"]])
    if not rows:
        return ""
    if "best_iou" in m["overall"]:
        at_used = [r[3] for r in rows]
        rows.append(["**overall** (mean of tasks)", "", "",
                     float(np.mean(at_used)) if None not in at_used else None, "per prompt",
                     m["overall"]["best_iou"]])
    thr = m["thresholds"]
    return "\n".join([
        f"Mean IoU over images at {len(thr)} thresholds from {thr[0]:g} to {thr[-1]:g} "
        "(ties go to the threshold nearest 0.5).", "",
        _table(["task", "prompt", "threshold used", "mean IoU there", "best threshold", "mean IoU at best"], rows),
        "", f"![threshold curves]({CURVES_FILE})", "",
        "The best threshold is chosen on this same split, so its score is optimistic for this split; tune "
        "on valid (`--write-thresholds` stores it in the checkpoint) and report on a split not used for tuning.",
    ])


def _text_section(m: dict) -> str:
    rows = [[name, t["prompt"], t["iou"], t["text_prompt"], t["text_iou"], t["text_dice"], t.get("text_area", "n/a")]
            for name, t in m["tasks"].items() if "text_iou" in t]
    if not rows:
        return ""
    return "\n".join([
        "Each image is also segmented with the *other* task's prompt (at that prompt's threshold) and scored "
        "against its own ground truth. Low is good: the model follows the text instead of marking whatever "
        "defect it sees. The other prompt's IoU and Dice are averaged over the images whose own ground truth "
        "has foreground (on an empty one, marking nothing would score 1.0, the worst value); its area is "
        "the mean fraction of each image it marks, over every image.", "",
        _table(["task", "own prompt", "own-prompt mean IoU", "other prompt", "other-prompt mean IoU",
                "other-prompt mean Dice", "other-prompt area"], rows),
    ])


def tta_name(tta: str | bool | None) -> str:
    """A report's TTA cell: the views' name ("flip", "d4"), or "no" (reports before "d4" wrote true for flip)."""
    return "no" if not tta else "flip" if tta is True else str(tta)


def _runtime_section(m: dict) -> str:
    r, f = m["runtime"], m.get("footprint")
    if m["kind"] != "model":
        return f"Masks made elsewhere: no model was run (scoring took {r.get('seconds_total', 0):.1f} s)."
    warm = "warm: first batch left out" if r["warm"] else "only one batch, so it includes warm-up"
    rows = [
        ["device", r["device"]],
        ["precision / TTA / prompt ensemble", f"{r['precision']} / {tta_name(r['tta'])} / "
                                              f"{'yes' if r['ensemble'] else 'no'}"],
        ["mean time per image per prompt",
         f"{r['ms_per_image_prompt']:.2f} ms ({warm}; {r['images_timed']} images)"],
        ["of which: processor + vision encoder, per image", f"{r['encode_ms_per_image']:.2f} ms"],
        ["of which: decoder + upsampling, per prompt", f"{r['decode_ms_per_image_prompt']:.2f} ms"],
        ["model throughput", _rate(r["model_images_per_s"])],
        ["end-to-end throughput (loading, model, scoring)", _rate(r["end_to_end_images_per_s"])],
    ]
    if f:
        rows += [
            ["parameters (total / decoder)", f"{f['parameters']:,} / {_num(f['decoder_parameters'])}"
             if f["decoder_parameters"] is None else f"{f['parameters']:,} / {f['decoder_parameters']:,}"],
            ["model folder on disk", f"{_size(f['model_folder_bytes'])}"
             + (f" (`{f['model_folder']}`)" if f["model_folder"] else "")],
            ["decoder file on disk", f"{_size(f['decoder_file_bytes'])}"
             + (f" (`{f['decoder_file']}`)" if f["decoder_file"] else "")],
        ]
    return "\n".join([_table(["", ""], rows), "",
                      "Times cover the model only (image processor, vision encoder once per image, decoder and "
                      "upsampling to the original size per prompt), not file reading or scoring."])


def _leakage_section(m: dict, split: str) -> str:
    leak = m.get("leakage")
    if not leak or not leak["tasks"]:
        return f"No leakage numbers for split `{split}` (no `{SUMMARY_FILE}` for it in the data folder)."
    if not leak["measured"]:
        return (f"Leakage was not measured: the train split was not preprocessed together with `{split}` "
                "(run preprocess_masks.py with train included to get it).")
    shown = {task: c for task, c in leak["tasks"].items() if task in m["tasks"]}
    if not shown:
        return f"No leakage numbers for the scored tasks in split `{split}`."
    rows = [[task, c["images"], *(c[k] for k in LEAKAGE_COLUMNS)] for task, c in shown.items()]
    worst = max(shown.items(), key=lambda kv: kv[1]["any_of_these"] / max(kv[1]["images"], 1))
    return "\n".join([
        _table(["task", "images", *LEAKAGE_COLUMNS.values()], rows), "",
        f"These {split} images share a source photo (Roboflow file name before `.rf.`), identical pixels, or a "
        "near-identical picture under a flip or 90-degree rotation with a train image (from preprocess_masks.py). "
        "A model may have seen the same picture in training, so scores on such images are optimistic "
        f"(worst here: {worst[0]}, {worst[1]['any_of_these']} of {worst[1]['images']} images).",
    ])


def _binarized(m: dict) -> str:
    """How masks made elsewhere were turned into foreground/background."""
    t = m.get("pred_threshold")
    return "every non-zero pixel is foreground" if t is None else f"a pixel is foreground iff its value >= {t:g}"


def _problems_section(m: dict) -> str:
    lines = []

    def more(info: dict) -> str:
        return " ..." if info["count"] > len(info["first"]) else ""

    if m.get("n_skipped"):
        names = ", ".join(f"`{Path(s['image']).name}`" for s in m["skipped"][:FIRST_NAMES])
        lines.append(f"- {m['n_skipped']} image(s) skipped because a file could not be read (not scored): {names}")
    gt = m.get("gt_resized") or {"count": 0}
    if gt["count"]:
        lines.append(f"- {gt['count']} ground-truth mask(s) not the size of their image, scored at the mask's "
                     "own size (the prediction fitted to it; re-run preprocess_masks.py?): "
                     + ", ".join(f"`{n}`" for n in gt["first"]) + more(gt))
    for name, info in (m.get("predictions") or {}).items():
        if info["count"]:
            how = {"resized": "resized nearest to the ground truth's size",
                   "graded": f"(probability maps?) binarized: {_binarized(m)}"}
            label = "holding values other than 0 and one foreground value" if name == "graded" else name
            first = ", ".join(f"`{n}`" for n in info["first"])
            by_task = info.get("by_task")
            per_task = f" ({', '.join(f'{t}: {n}' for t, n in by_task.items())})" if by_task else ""
            lines.append(f"- {info['count']} prediction file(s) {label}{per_task}, "
                         f"{how.get(name, 'scored as empty masks')}: {first}{more(info)}")
    return "\n".join(lines)


def _definitions(m: dict) -> str:
    o = m["overall"]
    model = m["kind"] == "model"
    fitted = ("predicted probabilities are upsampled (bilinear, on the logits) to it" if model else
              "a predicted mask of another size is resized to it, nearest neighbour")
    threshold = ("- **threshold**: a pixel is foreground iff its probability >= the threshold (per prompt, from "
                 "the checkpoint unless overridden; 0.5 by default)." if model else
                 f"- **predicted masks**: {_binarized(m)} (`--pred-threshold`).")
    return "\n".join([
        "- **mean IoU / mean Dice** (the headline numbers): IoU = TP / (TP + FP + FN) and Dice = 2 TP / "
        "(2 TP + FP + FN) per image, computed on the ground-truth mask at the image's **original resolution** "
        f"({fitted}), then averaged over images, so every image weighs the same (the "
        "convention peers report). An image whose ground truth and prediction are both empty scores "
        f"{EMPTY_SCORE:.1f} ({o['n_empty_both']} such image(s) here, of {o['n_empty_gt']} with an empty ground "
        "truth); exactly one of them empty scores 0.",
        "- **micro IoU / micro Dice**: from TP, FP, FN summed over every pixel of the split (large defects "
        "weigh more).",
        f"- **95% interval** of the mean IoU, by {CI_RULE}: {CI_COVERS}.",
        "- **precision / recall**: TP / (TP + FP) and TP / (TP + FN) from the summed counts.",
        threshold,
        "- **overall**: the mean over tasks of each per-task number (each task weighs the same); image "
        "counts are summed.",
        "- Ground truth: exact COCO rasterization of the annotations (pycocotools), from preprocess_masks.py.",
    ])


def _setup_section(m: dict) -> str:
    r = m["runtime"]
    rows = [["model" if m["kind"] == "model" else "predicted masks", f"`{m['model']}`"],
            ["data", f"`{m['data']}`, split `{m['split']}`"],
            ["images scored", ", ".join(f"{n} {t['n_images']}" for n, t in m["tasks"].items())]]
    if m["kind"] == "model":
        rows += [["device", r["device"]], ["precision", r["precision"]],
                 ["TTA (views of each image averaged)", tta_name(r["tta"])],
                 ["prompt ensemble (synonyms)", "yes" if r["ensemble"] else "no"],
                 ["thresholds", ", ".join(f"{t['prompt']}: {_thr(t.get('threshold'))}"
                                          for t in m["tasks"].values()) + f" ({m.get('threshold_source', '')})"]]
        if m.get("selection"):
            rows.append(["checkpoint picked on", m["selection"]])
    rows.append(["date", m["created"]])
    return "\n".join([_table(["", ""], rows), "", "Command:", "", "```", m["command"], "```"])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _caveat(m: dict) -> list[str]:
    """A warning line for a model whose numbers say little: not trained here, or for one or two epochs."""
    if m["kind"] != "model" or "trained_epochs" not in m:
        return []
    epochs = m["trained_epochs"]
    if epochs is None:
        text = ("this checkpoint was not trained by train.py (no defectseg.json): untrained, random or "
                "zero-shot weights at the default threshold; its numbers show no trained behaviour")
    elif epochs <= 2:
        text = (f"trained for {_count(epochs, 'epoch')} only: these numbers show the pipeline works, not what "
                "the recipe reaches")
    else:
        return []
    return [f"> **Note:** {text}.", ""]


def render_report(m: dict) -> str:
    """report.md from the metrics dict (see ``evaluate.py`` for its keys)."""
    o = m["overall"]
    sections = [
        f"# Evaluation of `{model_label(m['model'])}` on `{m['split']}`", "",
        f"Overall (mean of {_count(len(m['tasks']), 'task')}): **mean IoU {_num(o.get('iou'))}**, mean Dice "
        f"{_num(o.get('dice'))} over {o['n_images']} images, per image at the original resolution.", "",
        *_caveat(m),
        "## Setup", "", _setup_section(m), "",
        "## Results", "", _results_section(m), "",
    ]
    if m.get("compare"):
        sections += ["## Comparison", "", _compare_section(m, m["compare"]), ""]
    for title, body in (("Threshold sweep", _sweep_section(m)), ("Text sensitivity", _text_section(m)),
                        ("Runtime and footprint", _runtime_section(m)),
                        ("Data leakage between train and this split", _leakage_section(m, m["split"])),
                        ("Metric definitions", _definitions(m)),
                        ("Skipped and missing files", _problems_section(m))):
        if body:
            sections += [f"## {title}", "", body, ""]
    if m.get("thresholds_written"):
        w = m["thresholds_written"]
        sections += ["Best thresholds written to `" + w["file"] + "`: "
                     + ", ".join(f"{p}: {v:g}" for p, v in w["thresholds"].items()), ""]
    if m.get("examples"):
        sections += ["## Examples", "", "Per task: best, median and worst images by IoU.", ""]
        sections += [f"![{name}]({name})\n" for name in m["examples"]]
    return "\n".join(sections).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Writing


def check_out_folder(out: Path, scored: Sequence[str | Path] = ()) -> str | None:
    """A message when no report can be written to ``out``, else None. Checked before any scoring.

    ``out`` is replaced whole (``io.AtomicFolder``), so it must be new or hold only an earlier report
    (``report_entry``), and it may hold neither a folder being ``scored`` (a --pred-dir) nor the current
    folder, nor be a mount point. Also refused: a file; a path inside a file; no permission."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.R_OK)):
        return f"--out {out}: {existing} is not writable (no permission, or a read-only file system)"
    if not out.exists():
        return None
    inside = [Path(p) for p in scored if Path(p).exists()] + [Path.cwd()]
    for path in inside:
        if any(os.path.samefile(folder, out) for folder in [path, *path.resolve().parents]):
            what = "the current folder" if path == Path.cwd() else f"{path}, which is being scored"
            return f"--out {out}: holds {what}; the report replaces --out whole, so pick another --out"
    if os.path.ismount(out):
        return f"--out {out} is a mount point, which cannot be replaced whole; pick a folder inside it"
    earlier_masks = earlier_report_saved_masks(out)
    foreign = sorted(p.name for p in out.iterdir() if not report_entry(p.name, earlier_masks))
    if foreign:
        return (f"--out {out}: holds {', '.join(foreign[:FIRST_NAMES])}, which no report wrote; the report "
                "replaces --out whole, so pick a new folder or move those out")
    return None


def report_entry(name: str, earlier_masks: bool) -> bool:
    """True for the names a report writes (``masks/`` only when the earlier report's metrics.json says it
    wrote them)."""
    if name in (METRICS_FILE, PER_IMAGE_FILE, REPORT_FILE, CURVES_FILE):
        return True
    if name.startswith("examples_") and name.endswith(".png"):
        return True
    return name == MASKS_DIR and earlier_masks


def earlier_report_saved_masks(out: Path) -> bool:
    try:
        return json.loads((out / METRICS_FILE).read_text(encoding="utf-8")).get("saved_masks") == MASKS_DIR
    except (OSError, ValueError, AttributeError):
        return False


class ReportWriteError(Exception):
    """The report could not be written or put in place; the message names the folder and the problem."""


def write_outputs(out: Path, metrics_: dict, scores: Sequence[ImageScore]) -> None:
    """metrics.json, per_image.csv, threshold_curves.png (when there is a sweep) and report.md."""
    sections = [metrics_] + ([metrics_["compare"]] if metrics_.get("compare") else [])
    plot_threshold_curves(out / CURVES_FILE, sections)
    write_json_atomic(out / METRICS_FILE, metrics_)
    write_text_atomic(out / PER_IMAGE_FILE, per_image_csv(scores))
    write_text_atomic(out / REPORT_FILE, render_report(metrics_))
