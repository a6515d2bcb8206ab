"""Training data: manifests, targets at the model's resolution, and the per-epoch sample plan.

An epoch is a list of ``Sample(row, view, prompt, negative)``:
- a pass over the data: every image of the largest task once, the smaller tasks' images repeated to as
  many samples (whole shuffled passes, then part of one more), so every image is seen each epoch and
  the small drywall set (820 images) weighs as much as cracks (2,642);
- a random synonym of the task's prompts per sample (the one task table in ``tasks.py``);
- negative pairs: with probability ``negative_prob`` the image is paired with another task's prompt
  and an empty target, so the model must read the text;
- a random view (original or horizontally flipped) when flip augmentation is on.
The plan depends only on (seed, epoch), so a resumed run sees exactly the samples a straight run would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .io import read_mask_png
from .manifest import MANIFEST_FILE, read_manifest
from .tasks import Task


class DataError(ValueError):
    """Training or evaluation data that cannot be used."""


def load_rows(data_dir: str | Path, split: str, tasks: list[str] | None = None, require_all: bool = True) -> list[dict]:
    """Manifest rows of ``split`` for the named tasks (None: every task in it).

    Raises DataError naming the manifest when it is missing, has no rows for the tasks, or (with
    ``require_all``) lacks one of them.
    """
    manifest = Path(data_dir) / split / MANIFEST_FILE
    if not manifest.is_file():
        raw = next(Path(data_dir).glob(f"*{split}/_annotations.coco.json"), None) or next(
            Path(data_dir).glob(f"*/{split}/_annotations.coco.json"), None)
        if raw is not None:  # raw Roboflow exports, not preprocess_masks.py's output
            root = Path(data_dir).parent if raw.parent.parent == Path(data_dir) else data_dir  # one task's folder
            raise DataError(f"{data_dir} holds raw COCO exports ({raw}), not a processed dataset: run `python "
                            f"preprocess_masks.py --data-root {root} --out processed_dataset` and pass "
                            "--data processed_dataset")
        if (Path(data_dir) / MANIFEST_FILE).is_file():  # a split's folder, one level too deep
            raise DataError(f"{data_dir} is one split of a processed dataset (it holds {MANIFEST_FILE}): pass "
                            f"--data {Path(data_dir).parent}")
        raise DataError(f"no manifest at {manifest}: run `python preprocess_masks.py --data-root <exports> "
                        f"--out {data_dir} --splits {split}` first (or pass --data)")
    try:
        rows = read_manifest(manifest)
    except (OSError, ValueError) as err:
        raise DataError(str(err)) from None
    return select_tasks(rows, tasks, str(manifest), require_all)


def rows_fingerprint(rows: list[dict]) -> str:
    """16 hex characters that change when the rows do, or their order (the epoch plan picks rows by
    position), but not when the data folder moves: each row's task, image and mask file names, image pixel
    hash and mask foreground fraction (preprocess's columns)."""
    h = hashlib.blake2b(digest_size=8)
    for r in rows:
        item = (r["task"], Path(r["image"]).name, Path(r["mask"]).name, r.get("pixel_hash", ""), r.get("fg_fraction", ""))
        h.update(json.dumps(item).encode())
    return h.hexdigest()


def use_table_prompts(rows: list[dict], tasks: list[Task]) -> list[str]:
    """Set each row's prompt to its task's prompt in the task table (what training asks with, and what
    the checkpoint's thresholds are stored under); returns a note per task whose manifest prompt differed
    (e.g. a --tasks-file changed the prompt after preprocessing)."""
    prompts = {t.name: t.prompt for t in tasks}
    changed: dict[str, str] = {}
    for row in rows:
        if row["prompt"] != prompts[row["task"]]:
            changed.setdefault(row["task"], row["prompt"])
            row["prompt"] = prompts[row["task"]]
    return [f"task {task}: the manifest says {old!r}, the task table {prompts[task]!r}; using the table's"
            for task, old in changed.items()]


def select_tasks(rows: list[dict], tasks: list[str] | None, source: str, require_all: bool = True) -> list[dict]:
    """The rows of the named tasks (None: all). Raises DataError as ``load_rows`` does."""
    present = sorted({r["task"] for r in rows})
    if require_all and (unknown := [t for t in tasks or [] if t not in present]):
        raise DataError(f"task(s) {', '.join(unknown)} not in {source}; it has: {', '.join(present) or 'no rows'}")
    selected = [r for r in rows if tasks is None or r["task"] in tasks]
    if not selected:
        raise DataError(f"{source} has no rows" + (f" for tasks {', '.join(tasks)}" if tasks else ""))
    return selected


def holdout_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): about ``fraction`` of each task's source photos set aside, with every row of a
    set-aside photo. Roboflow's augmented copies of one photo share ``source_stem``, so no photo ends up
    on both sides (rows without the column count as their own photo); a task with one photo keeps it
    for training. Rows keep their order; the same
    (rows, fraction, seed) always gives the same split."""
    if not 0 < fraction < 1:
        raise DataError(f"the hold-out fraction must be between 0 and 1, not {fraction}")
    stem = [r.get("source_stem") or Path(r["image"]).stem for r in rows]
    held: set[tuple[str, str]] = set()
    for task in sorted({r["task"] for r in rows}):
        stems = sorted({s for s, r in zip(stem, rows) if r["task"] == task})
        n = min(max(1, round(fraction * len(stems))), len(stems) - 1)  # one photo at least, on each side
        pick = np.random.default_rng([seed, len(stems)]).permutation(len(stems))[:n]
        held |= {(task, stems[i]) for i in pick}
    train = [r for s, r in zip(stem, rows) if (r["task"], s) not in held]
    return train, [r for s, r in zip(stem, rows) if (r["task"], s) in held]


def soft_target(mask: np.ndarray, size: int) -> np.ndarray:
    """(S, S) float32 in [0, 1]: the fraction of each model-resolution cell the mask covers.

    Area averaging keeps thin cracks that nearest-neighbour resizing would drop.
    """
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def load_targets(rows: list[dict], size: int) -> np.ndarray:
    """(N, S, S) float16 soft targets for manifest rows (original view)."""
    return np.stack([soft_target(read_mask_png(r["mask"]), size) for r in rows]).astype(np.float16)


@dataclass(frozen=True)
class Sample:
    row: int
    view: int  # 0 original, 1 horizontally flipped
    prompt: str
    negative: bool


def epoch_length(rows: list[dict], tasks: list[Task]) -> int:
    """Samples per epoch (``epoch_plan``'s length): the largest task's row count times the tasks present."""
    counts = [n for n in (sum(r["task"] == t.name for r in rows) for t in tasks) if n]
    return max(counts) * len(counts)


def epoch_plan(rows: list[dict], tasks: list[Task], seed: int, epoch: int, negative_prob: float,
               flip: bool, synonyms: bool = True) -> list[Sample]:
    """The samples of one epoch, in training order: every row of the largest task once, and each smaller
    task's rows repeated (whole shuffled passes, then part of one more) to as many samples, so every
    image is seen each epoch and the tasks weigh the same. A negative pair asks for another task that the
    image has no mask of (tasks sharing an export can both hold an image; then its target is not empty)."""
    rng = np.random.default_rng([seed, epoch])
    by_task = {t.name: [i for i, r in enumerate(rows) if r["task"] == t.name] for t in tasks}
    images = {name: {rows[i].get("image") for i in own} - {None} for name, own in by_task.items()}
    present = [t for t in tasks if by_task[t.name]]
    largest = max(len(by_task[t.name]) for t in present)
    drawn = []
    for task in present:
        own = by_task[task.name]
        passes = np.concatenate([rng.permutation(own) for _ in range(-(-largest // len(own)))])
        drawn += [(task, int(row)) for row in passes[:largest]]
    plan = []
    for index in rng.permutation(len(drawn)):
        task, row = drawn[index]
        negative = len(present) > 1 and rng.random() < negative_prob
        others = [t for t in present if t.name != task.name and rows[row].get("image") not in images[t.name]]
        negative = negative and bool(others)
        if negative:
            task = others[rng.integers(len(others))]
        prompts = task.prompts if synonyms else (task.prompt,)
        prompt = prompts[rng.integers(len(prompts))]
        view = int(rng.integers(2)) if flip else 0
        plan.append(Sample(row, view, prompt, negative))
    return plan


def batch_targets(targets: np.ndarray, samples: list[Sample]) -> np.ndarray:
    """(B, S, S) float32 targets for a batch: flipped for flipped views, zero for negatives."""
    out = np.zeros((len(samples), *targets.shape[1:]), dtype=np.float32)
    for i, s in enumerate(samples):
        if not s.negative:
            out[i] = targets[s.row][:, ::-1] if s.view else targets[s.row]
    return out
