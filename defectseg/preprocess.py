"""Roboflow COCO exports -> mask PNGs, per-split manifests, a summary and a leakage report.

Writes the layout that ``manifest`` describes: masks, a manifest per split, summary.json.

Each image is decoded once (that catches truncated files and reads the real size and EXIF
orientation), its annotations rasterized (``coco.rasterize``) and the mask written atomically.
A manifest row keeps a key of everything the mask depends on and the problems making it reported, so a
re-run only redoes masks that are missing or stale and still reports (and, under --strict, fails on)
the problems of the masks it reuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from . import cli
from .cli import stop_if_terminated
from .coco import (
    ANNOTATIONS_FILE,
    CocoError,
    ImageEntry,
    Problem,
    load_coco,
    mask_source,
    rasterize,
    source_stem,
)
from .io import (
    ImageReadError,
    apply_orientation,
    encode_png,
    open_image,
    os_reason,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from .manifest import MANIFEST_COLUMNS, MANIFEST_FILE, SUMMARY_FILE, mask_name, read_manifest, write_manifest
from .tasks import Task, find_task_dir, is_folder_name

log = logging.getLogger(__name__)

PENDING_FILE = ".preprocess-pending.json"  # masks a run rewrites, until its manifests are written
RASTER_VERSION = "3"  # bump when the rasterization rules change: every mask becomes stale
# Max Hamming distance (of 256 bits) between 16x16 average hashes, under any flip/rotation, for two
# images to count as near-duplicates. Checked by eye on the real sets: at <= 3 the pairs are the same
# photo (re-encoded, flipped or rotated); from about 4 on, plain walls that merely look alike creep in.
NEAR_DUPLICATE_BITS = 3
DEFAULT_SPLITS = ("train", "valid", "test")
# A JSON size over this many times the real picture's width or height (EXIF aside) is taken as a broken
# record, not a resize: the image is skipped rather than a gigantic mask rasterized and shrunk.
MAX_SIZE_RATIO = 8


@dataclass(frozen=True)
class Job:
    """One (image, task) mask to produce."""

    task: str
    prompt: str
    split: str
    image: str  # absolute path
    mask: str  # absolute path
    entry: ImageEntry
    key: str
    defer: bool = False  # return the PNG instead of writing it (--strict writes only if all is well)


def job_key(entry: ImageEntry, image_path: Path, prompt: str) -> str:
    """Hash of everything a mask depends on: annotations, declared size, the image file, the rules."""
    try:
        stat = image_path.stat()
        file_id = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        file_id = None
    payload = json.dumps(
        [RASTER_VERSION, prompt, entry.width, entry.height, entry.annotations, file_id], sort_keys=True, default=str
    )
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def average_hash(rgb: np.ndarray) -> str:
    """256-bit average hash (16x16 grey thumbnail > its mean) as 64 hex chars; flips/rotations of
    the image permute its bits, which ``leakage_report`` uses to find augmented near-copies."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.packbits(thumb > thumb.mean()).tobytes().hex()


def process_job(job: Job) -> tuple[dict | None, list[Problem]]:
    """Decode the image, rasterize its annotations, write the mask. Returns (manifest row, problems)."""
    problems: list[Problem] = []
    entry = job.entry
    try:
        rgb, raw_size, orientation = open_image(job.image)
    except ImageReadError as err:
        return None, [Problem(job.image, "image_unreadable", str(err).split(": ", 1)[-1])]
    height, width = rgb.shape[:2]
    where = job.image
    declared = (entry.width, entry.height)
    exif_turned = orientation != 1 and raw_size == declared
    if not exif_turned and (entry.width > MAX_SIZE_RATIO * width or entry.height > MAX_SIZE_RATIO * height):
        return None, [Problem(where, "implausible_size", f"JSON says {entry.width}x{entry.height}, the file is "
                              f"{width}x{height}: over {MAX_SIZE_RATIO} times wider or taller, not a resize")]
    mask, sources, raster_problems = rasterize(entry.annotations, entry.height, entry.width, where)
    problems += raster_problems
    if (width, height) != declared:
        if exif_turned:
            # Annotations were drawn on the stored pixels; turn the mask the way the image turns.
            mask = apply_orientation(mask.astype(np.uint8), orientation) > 0
            problems.append(Problem(where, "exif_rotated", f"EXIF orientation {orientation}: mask rotated with the image", True))
        else:
            problems.append(
                Problem(where, "size_mismatch", f"JSON says {entry.width}x{entry.height}, file is {width}x{height}; mask rescaled", True)
            )
            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST_EXACT) > 0
    elif orientation != 1 and raw_size == declared:
        # Ambiguous: the JSON's size fits both the stored and the displayed picture (a 180-degree turn, a
        # mirror, or a square image). Taken as drawn on the displayed picture, and flagged for a look. (A
        # size that fits only the displayed picture is no problem: the annotations were drawn on it.)
        problems.append(Problem(where, "exif_rotated", f"EXIF orientation {orientation}: the JSON size fits the image "
                                "either way; annotations taken as drawn on the displayed (turned) picture", True))
    png = encode_png(np.where(mask, 255, 0).astype(np.uint8))
    if not job.defer:
        write_bytes_atomic(job.mask, png, sync=False)
    mask_dir = Path(job.mask).parent.parent
    row = {
        "image": os.path.relpath(job.image, mask_dir),
        "mask": os.path.relpath(job.mask, mask_dir),
        "task": job.task,
        "prompt": job.prompt,
        "width": width,
        "height": height,
        "annotations": sum(sources.values()),
        "source": mask_source(sources),
        "fg_fraction": f"{mask.mean():.6f}",
        "annotation_sources": format_sources(sources),
        "source_stem": source_stem(entry.file_name),
        "pixel_hash": hashlib.md5(rgb.tobytes()).hexdigest()[:16],
        "ahash": average_hash(rgb),
        "key": job.key,
        "problems": encode_problems(problems, job.image),
    }
    if job.defer:
        row["_png"] = png
    return row, problems


def format_sources(sources: Counter) -> str:
    """Counter({"polygon": 3, "bbox": 1}) -> "bbox:1;polygon:3"."""
    return ";".join(f"{k}:{v}" for k, v in sorted(sources.items()) if v)


def parse_sources(text: str) -> Counter:
    return Counter({k: int(v) for k, v in (part.split(":") for part in text.split(";") if part)})


UNKNOWN_PROBLEMS = "unknown"  # the problems cell of a row whose problems were never recorded


def encode_problems(problems: list[Problem], image: str) -> str:
    """The manifest's ``problems`` cell of one mask: "" for none, else JSON ``[[at, kind, message,
    repaired], ...]`` where ``at`` is the problem's file less the image's path ("" for the image itself,
    " (annotation 7)" for one of its annotations), so the cell stays right when the data root moves."""
    if not problems:
        return ""
    return json.dumps([[p.file.removeprefix(image), p.kind, p.message, p.repaired] for p in problems])


def decode_problems(cell: str | None, image: str) -> list[Problem] | None:
    """``encode_problems`` undone for the image now at ``image``; None for a cell that is missing (a
    manifest of an older version) or not one it writes."""
    if cell is None:
        return None
    try:
        return [Problem(image + at, kind, message, bool(repaired))
                for at, kind, message, repaired in (json.loads(cell) if cell else [])]
    except (ValueError, TypeError):
        return None


def has_stats(row: dict) -> bool:
    """Whether a manifest row holds, in a usable form, the columns summary.json and the leakage report are
    computed from (a row of a manifest of an older version or of another tool may not)."""
    try:
        int(row["annotations"]), float(row["fg_fraction"]), parse_sources(row["annotation_sources"])
        ahash = bytes.fromhex(row["ahash"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    texts = (row.get(c) for c in ("source", "source_stem", "pixel_hash"))
    return len(ahash) == 32 and all(isinstance(text, str) for text in texts)


def _hash_bits(hex_hashes: list[str]) -> np.ndarray:
    """(N, 16, 16) bool bit grids of 256-bit average hashes."""
    if not hex_hashes:
        return np.zeros((0, 16, 16), dtype=bool)
    raw = np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_hashes), dtype=np.uint8)
    return np.unpackbits(raw).reshape(-1, 16, 16).astype(bool)


def _dihedral(grid: np.ndarray) -> np.ndarray:
    """(8, 16, 16): the grid under every flip and 90-degree rotation."""
    turns = [np.rot90(grid, k) for k in range(4)]
    return np.stack(turns + [np.fliplr(t) for t in turns])


def leakage_report(rows: list[dict]) -> dict:
    """Per task and non-train split: how many images share a source photo (the name before ``.rf.``),
    identical pixels, or a near-identical picture under any flip/rotation with a train image. ``rows``
    must hold the hashes (``has_stats``). A task without train rows (``--splits valid``) is left out: not
    measured, rather than 0."""
    report: dict = {}
    by_task_split: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_task_split[(row["task"], row["_split"])].append(row)
    for (task, split), split_rows in sorted(by_task_split.items()):
        if split == "train":
            continue
        train = by_task_split.get((task, "train"), [])
        if not train:
            continue
        stems = {r["source_stem"] for r in train}
        pixels = {r["pixel_hash"] for r in train}
        train_bits = _hash_bits([r["ahash"] for r in train]).reshape(len(train), 256).astype(np.float32)
        counts = Counter()
        for row in split_rows:
            flags = {
                "same_source_as_train": row["source_stem"] in stems,
                "identical_pixels_in_train": row["pixel_hash"] in pixels,
                "near_duplicate_of_train": False,
            }
            if len(train_bits):
                variants = _dihedral(_hash_bits([row["ahash"]])[0]).reshape(8, -1).astype(np.float32)
                # Hamming distance via dot products: |a xor b| = a.(1-b) + (1-a).b
                dist = variants @ (1 - train_bits).T + (1 - variants) @ train_bits.T
                flags["near_duplicate_of_train"] = bool(dist.min() <= NEAR_DUPLICATE_BITS)
            flags["any_of_these"] = any(flags.values())
            counts.update(k for k, v in flags.items() if v)
        report.setdefault(task, {})[split] = {"images": len(split_rows), **{
            k: counts[k] for k in
            ("same_source_as_train", "identical_pixels_in_train", "near_duplicate_of_train", "any_of_these")
        }}
    return report


@dataclass
class Plan:
    jobs: list[Job]  # masks to make
    reused: list[dict]  # up-to-date rows of this run's tasks and splits
    kept: list[dict]  # rows of other tasks or splits, from earlier runs, left as they are
    problems: list[Problem]
    missing_splits: list[str]
    read: list[Path]  # the split folders this run covers (read, or missing now): their earlier problems are stale


def _as_written(row: dict, split: str, out: Path) -> dict:
    """A row read back from a manifest (absolute paths), ready to be written again."""
    return dict(row, _split=split, image=os.path.relpath(row["image"], out / split),
                mask=os.path.relpath(row["mask"], out / split))


def _reusable(row: dict | None, key: str, image: Path, mask: Path) -> tuple[dict, list[Problem]] | None:
    """An earlier manifest row whose mask is up to date, pointed at ``image`` (the data root may have moved
    since), and the problems that making its mask reported; None when the mask must be made: no row,
    another key, no mask file (or an empty one), or a row lacking a column (a manifest of an older version or another tool)."""
    if row is None or row.get("key") != key or any(row.get(c) is None for c in MANIFEST_COLUMNS):
        return None
    problems = decode_problems(row["problems"], str(image))
    if problems is None or not mask.is_file() or mask.stat().st_size == 0:  # empty: cut short by a power cut
        return None
    return dict(row, image=str(image)), problems


def _subfolders(folder: Path) -> list[str]:
    """Names of the folders in ``folder``, sorted; [] when it cannot be listed."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []


def _task_dirs(data_root: Path, tasks: list[Task]) -> dict[str, Path]:
    """Each task's export folder. Raises CocoError for a task without one."""
    found: dict[str, Path] = {}
    for task in tasks:
        task_dir = find_task_dir(data_root, task)
        if task_dir is None:
            tried = ", ".join(str(data_root / d) for d in task.dirs)
            raise CocoError(f"task {task.name!r}: no folder for it under {data_root} (looked for {tried}); "
                            "pick tasks with --tasks or add the folder name to the task table")
        found[task.name] = task_dir
    return found


def _check_splits(data_root: Path, task_dirs: dict[str, Path], splits: list[str], splits_given: bool) -> list[str]:
    """The ``task/split`` pairs without a folder. Raises CocoError when a task folder holds none of the
    splits asked for nor of the default ones (not an export, or its split folders named otherwise), when a
    split named by the caller (``splits_given``) exists for no task, or when none of the default splits
    exists for any."""
    known = list(dict.fromkeys([*splits, *DEFAULT_SPLITS]))
    for name, task_dir in task_dirs.items():
        if not any((task_dir / split).is_dir() for split in known):
            found = _subfolders(task_dir)
            shown = ", ".join(found[:10]) + " ..." * (len(found) > 10)
            holds = f"its folders: {shown}" if found else "no folder"
            raise CocoError(f"task {name!r}: {task_dir} holds none of the split folders {', '.join(known)} "
                            f"({holds}); split names are case-sensitive: rename them or pass --splits")
    missing = [f"{name}/{split}" for name, task_dir in task_dirs.items() for split in splits
               if not (task_dir / split).is_dir()]
    nowhere = [split for split in splits if all(f"{name}/{split}" in missing for name in task_dirs)]
    tasks = ", ".join(sorted(task_dirs))
    expected = f"under {data_root} (expected <task folder>/<split>/{ANNOTATIONS_FILE})"
    if splits_given and nowhere:
        which = f"split {nowhere[0]} exists" if len(nowhere) == 1 else f"splits {', '.join(nowhere)} exist"
        raise CocoError(f"{which} for none of the tasks {tasks} {expected}; check --splits")
    if len(nowhere) == len(splits):
        raise CocoError(f"none of the splits {', '.join(splits)} exists for tasks {tasks} {expected}")
    return missing


def _without_mask_name_clashes(entries: list[ImageEntry], split_dir: Path, slug: str,
                               problems: list[Problem]) -> list[ImageEntry]:
    """The entries whose mask gets a file of its own. Mask files are named after the image's stem, so
    ``x.jpg`` and ``x.png`` (or ``X.jpg``, for case-insensitive disks) would share one and an image would
    get another's ground truth: every image of such a group is skipped, each with a Problem."""
    names = [mask_name(entry.file_name, slug) for entry in entries]
    groups: dict[str, list[ImageEntry]] = defaultdict(list)
    for entry, name in zip(entries, names):
        groups[name.casefold()].append(entry)
    kept = []
    for entry, name in zip(entries, names):
        group = groups[name.casefold()]
        if len(group) == 1:
            kept.append(entry)
            continue
        others = ", ".join(other.file_name for other in group if other is not entry)
        problems.append(Problem(str(split_dir / entry.file_name), "mask_name_clash",
                                f"same mask file {name} as {others} (file names differ only in extension, "
                                "folder or case); none of them made, rename one"))
    return kept


def plan_jobs(
    data_root: Path, out: Path, tasks: list[Task], splits: list[str], overwrite: bool, splits_given: bool = True
) -> Plan:
    """Read every annotations file and decide which masks to (re)make. Raises CocoError when a task
    folder is missing or holds no split folder, a split named by the caller (or, for the default splits,
    every split) exists for no task, or an annotations file cannot be used at all. A reused row points at
    the image where it is now, and its mask's problems are among the plan's."""
    task_dirs = _task_dirs(data_root, tasks)
    missing = _check_splits(data_root, task_dirs, splits, splits_given)
    jobs: list[Job] = []
    reused: list[dict] = []
    problems: list[Problem] = []
    previous: dict[str, list[dict]] = {}
    for manifest in sorted(out.glob(f"*/{MANIFEST_FILE}")):
        try:
            previous[manifest.parent.name] = read_manifest(manifest)
        except (OSError, ValueError) as err:  # incl. a manifest missing columns, short rows, not UTF-8
            log.warning("%s: unreadable manifest (%s); every mask of this split is redone", manifest, err)
    names = {t.name for t in tasks}
    kept = [(split, row) for split, rows in previous.items() for row in rows
            if (split not in splits or row["task"] not in names) and Path(row["mask"]).exists()]
    for _, row in kept:  # a row of an older manifest: its problems are not known, so a later run redoes it
        if row.get("problems") is None:
            row["problems"] = UNKNOWN_PROBLEMS
    if without := sum(not has_stats(row) for _, row in kept):
        log.warning("%s: %d kept row(s) of other tasks or splits lack preprocess's statistics (from a "
                    "manifest of an older version or another tool); summary.json counts them as images only",
                    out, without)
    stale = _pending(out)
    up_to_date = {} if overwrite else {
        row["mask"]: row for split in splits for row in previous.get(split, [])
        if row["task"] in names and row["mask"] not in stale}
    made: set[str] = set()  # every mask this run makes or reuses
    for task in tasks:
        for split in splits:
            split_dir = task_dirs[task.name] / split
            if f"{task.name}/{split}" in missing:
                continue
            export = load_coco(split_dir / ANNOTATIONS_FILE, task.categories)
            problems += export.problems
            for entry in _without_mask_name_clashes(export.images, split_dir, task.slug, problems):
                image = (split_dir / entry.file_name).resolve()
                mask = (out / split / "masks" / mask_name(entry.file_name, task.slug)).resolve()
                made.add(str(mask))
                key = job_key(entry, image, task.prompt)
                earlier = _reusable(up_to_date.get(str(mask)), key, image, mask)
                if earlier:
                    reused.append(_as_written(earlier[0], split, out))
                    problems += earlier[1]
                else:
                    jobs.append(Job(task.name, task.prompt, split, str(image), str(mask), entry, key))
    kept_rows = [_as_written(row, split, out) for split, row in kept if row["mask"] not in made]  # a renamed task
    return Plan(jobs, reused, kept_rows, problems, missing,
                [task_dirs[t.name] / split for t in tasks for split in splits])


def _pool_results(jobs: list[Job], workers: int) -> Iterator[tuple[Job, tuple[dict | None, list[Problem]]]]:
    """(job, process_job(job)) in job order, from ``workers`` processes, a few jobs ahead of the reader.

    A worker that dies (killed, out of memory, a crash in native code) breaks the pool: this raises
    CocoError naming the images that were in flight, instead of waiting forever for their results.
    """
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn" if os.name == "nt" else None))
    window: deque[tuple[Job, Future]] = deque()
    queue = iter(jobs)
    try:
        while True:
            try:  # submit() raises too once the pool is broken
                while len(window) < 4 * workers and (job := next(queue, None)) is not None:
                    window.append((job, pool.submit(process_job, job)))
                if not window:
                    return
                job, future = window[0]
                result = future.result()
            except BrokenProcessPool:
                lost = [Path(j.image).name for j, f in window if not (f.done() and f.exception() is None)]
                shown = ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
                raise CocoError(f"a worker process died (killed, out of memory, or crashed in native code) while "
                                f"making the masks of one of: {shown}; no manifest was changed") from None
            window.popleft()
            yield job, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_jobs(jobs: list[Job], workers: int) -> tuple[list[dict], list[Problem]]:
    rows: list[dict] = []
    problems: list[Problem] = []
    progress = cli.progress(total=len(jobs), desc="masks", unit="img", enabled=bool(jobs))
    if workers <= 1 or len(jobs) < 2 * workers:
        results = ((job, process_job(job)) for job in jobs)
    else:
        results = _pool_results(jobs, workers)
    try:
        for job, (row, job_problems) in results:
            stop_if_terminated()
            if row is not None:
                row["_split"] = job.split
                rows.append(row)
            problems += job_problems
            progress.update()
    finally:
        results.close()  # stops the pool now, also when the loop above is interrupted
        progress.close()
    return rows, problems


def summarize(rows: list[dict], problems: list[Problem], made: int, reused: int, kept: int, missing: list[str],
              seconds: float) -> dict:
    """summary.json's body; ``rows`` are every manifest row under the output folder (made by this run,
    reused as up to date, or kept from tasks and splits not in this run). Rows without statistics
    (``has_stats``: kept from an older or hand-made manifest) count as images only, and as
    ``images_without_statistics``."""
    counts: dict = defaultdict(dict)
    for (task, split), group in sorted(_group(rows).items()):
        known = [r for r in group if has_stats(r)]
        fg = [float(r["fg_fraction"]) for r in known]
        n_sources = Counter()
        for r in known:
            n_sources.update(parse_sources(r["annotation_sources"]))
        counts[task][split] = {
            "images": len(group),
            "annotations_used": sum(int(r["annotations"]) for r in known),
            "empty_masks": sum(f == 0 for f in fg),
            "polygon_annotations": n_sources["polygon"],
            "bbox_only_annotations": n_sources["bbox"],
            "rle_annotations": n_sources["rle"],
            "mask_source": dict(Counter(r["source"] for r in known)),
            "mean_fg_fraction": round(float(np.mean(fg)), 6) if fg else None,
        }
        if len(known) < len(group):
            counts[task][split]["images_without_statistics"] = len(group) - len(known)
    return {
        "counts": counts,
        "masks_written": made,
        "masks_reused": reused,
        "masks_kept": kept,
        "missing_splits": missing,
        "problem_counts": dict(Counter(p.kind for p in problems)),
        "problems": [asdict(p) for p in problems],
        "leakage": leakage_report([r for r in rows if has_stats(r)]),
        "seconds": round(seconds, 2),
        "images_per_second": round(made / seconds, 1) if seconds > 0 and made else None,
    }


def _earlier_problems(summary: Path, data_root: Path, read: list[Path], known: list[Problem]) -> list[Problem]:
    """The problems an earlier run's summary.json lists for folders this run did not read (other tasks or
    splits), so a re-run with fewer --tasks or --splits still counts the images and annotations skipped
    there, as it keeps those splits' rows; [] when there is no readable summary. Files are compared by
    their place under the data root (then or now: it may have moved). Those of kept rows' masks are among
    ``known`` already (from the manifests)."""
    try:
        earlier = json.loads(summary.read_text(encoding="utf-8"))
        problems, roots = [Problem(**p) for p in earlier["problems"]], [data_root, data_root.resolve(), Path(earlier["data_root"])]
    except (OSError, ValueError, TypeError, KeyError):  # none yet, unreadable, or of another shape
        return []

    def place(file: str) -> Path | None:
        for root in roots:
            for path in (Path(file), Path(file).resolve()):
                if path.is_relative_to(root):
                    return path.relative_to(root)
        return None

    folders = [f.relative_to(data_root) for f in read]
    seen = {(place(p.file) or p.file, p.kind, p.message) for p in known}
    return [p for p in problems if (where := place(p.file)) is None or not any(where.is_relative_to(f) for f in folders)
            if (where or p.file, p.kind, p.message) not in seen]


def _group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["_split"])].append(row)
    return groups


def _writable_folder(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (an existing folder), or None when they can."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            return None
    except OSError as err:
        return os_reason(err)


def check_out(out: Path, splits: list[str]) -> None:
    """Raise CocoError (naming the path) unless every folder and file the run writes under ``out`` can be
    written: run before any work, so a bad ``--out`` costs nothing and changes nothing."""
    existing = out
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out else f": {existing}"
        raise CocoError(f"output folder {out}{where} is {'a file' if existing.exists() else 'a broken link'}, "
                        "not a folder")
    folders = [existing] + [d for split in splits for d in (out / split, out / split / "masks") if d.exists()]
    for folder in folders:
        if not folder.is_dir():
            raise CocoError(f"output folder {out}: {folder} is a file, not a folder")
        reason = _writable_folder(folder)
        if reason:
            raise CocoError(f"output folder {out}: cannot write in {folder} ({reason})")
    for target in [out / SUMMARY_FILE] + [out / split / MANIFEST_FILE for split in splits]:
        if target.is_dir():
            raise CocoError(f"output folder {out}: {target} is a folder, not a file")


def preprocess(
    data_root: str | Path,
    out: str | Path,
    tasks: list[Task],
    splits: list[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    strict: bool = False,
) -> dict:
    """Run the whole preprocessing; returns the summary (also written to ``out/summary.json``).

    splits: None for DEFAULT_SPLITS, of which those that no task has are skipped; a split named here
    must exist for at least one task. Repeated tasks or splits count once.
    Raises CocoError for unrecoverable input (a split that is not one folder name included), and under
    ``strict`` for any problem at all, those of reused masks included (masks, manifests and summary are
    then left as they were). Rows of tasks or splits not in this run are kept. Manifests and summary are
    written last, once everything they hold is computed.
    """
    data_root, out = Path(data_root), Path(out)
    tasks = list({task.name: task for task in tasks}.values())
    splits_given = splits is not None
    splits = list(dict.fromkeys(splits if splits_given else DEFAULT_SPLITS))
    if bad := [split for split in splits if not is_folder_name(split)]:
        raise CocoError(f"split {bad[0]!r} is not one folder name such as valid or test")
    if not data_root.is_dir():
        raise CocoError(f"data root {data_root} does not exist or is not a folder")
    check_out(out, splits)
    out = out.resolve()  # as the masks' paths are: a symlinked --out gives rows relative to one place
    start = time.perf_counter()
    plan = plan_jobs(data_root, out, tasks, splits, overwrite, splits_given)
    if strict and plan.problems:
        raise CocoError(_strict_message(plan.problems))
    if strict:
        plan.jobs = [replace(job, defer=True) for job in plan.jobs]
    if not strict:
        _mark_pending(out, plan.jobs)
    rows, problems = run_jobs(plan.jobs, workers)
    made = len(rows)
    problems = plan.problems + problems
    if strict and problems:
        raise CocoError(_strict_message(problems))
    if strict:
        _mark_pending(out, plan.jobs)
    for row in rows:
        if "_png" in row:
            write_bytes_atomic(out / row["_split"] / row["mask"], row.pop("_png"), sync=False)
    rows += plan.reused + plan.kept  # the manifests and the summary cover every row under ``out``
    problems += [p for row in plan.kept  # so do the problem counts: those of kept rows' masks too
                 for p in decode_problems(row["problems"], str((out / row["_split"] / row["image"]).resolve())) or []]
    problems += _earlier_problems(out / SUMMARY_FILE, data_root, plan.read, problems)  # and what they skipped
    seconds = time.perf_counter() - start
    summary = {
        "data_root": str(data_root.resolve()),
        "tasks": {t.name: {"prompt": t.prompt, "synonyms": list(t.synonyms)} for t in tasks},
        "splits": splits,
        **summarize(rows, problems, made, len(plan.reused), len(plan.kept), plan.missing_splits, seconds),
    }
    for split in splits:
        split_rows = [r for r in rows if r["_split"] == split]
        exists = any(f"{task.name}/{split}" not in plan.missing_splits for task in tasks)
        if split_rows or exists or (out / split / MANIFEST_FILE).exists():
            # Also with no rows (an export without images): a manifest must not keep rows of a past run.
            write_manifest(out / split / MANIFEST_FILE, split_rows)
    write_json_atomic(out / SUMMARY_FILE, summary)
    _clear_pending(out, plan.jobs)
    return summary


def _mark_pending(out: Path, jobs: list[Job]) -> None:
    """Before masks are rewritten (the manifests, written last, still describe the old ones), list them in
    ``PENDING_FILE``: if the run is cut short, the next one makes them again, even when an earlier row's key
    matches again (annotations edited, the run stopped, the edit undone)."""
    if jobs:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / PENDING_FILE, sorted({job.mask for job in jobs} | _pending(out)))


def _clear_pending(out: Path, jobs: list[Job]) -> None:
    """This run's masks are in its manifests now; those of another split's run cut short stay listed."""
    left = _pending(out) - {job.mask for job in jobs}
    if left:
        write_json_atomic(out / PENDING_FILE, sorted(left))
    else:
        (out / PENDING_FILE).unlink(missing_ok=True)


def _pending(out: Path) -> set[str]:
    """The masks a run that was cut short may have rewritten after its manifests were written (their rows'
    keys describe the old masks): never reused."""
    try:
        return set(read_json(out / PENDING_FILE, "pending-masks file"))
    except (ValueError, TypeError):
        return set()


def _strict_message(problems: list[Problem]) -> str:
    shown = "\n  ".join(str(p) for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"--strict: {len(problems)} problem(s) in the input; nothing written to the manifests:\n  {shown}{more}"
