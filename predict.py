#!/usr/bin/env python
"""Binary masks for images and text prompts, with the shipped LiteSeg model or any trained checkpoint.

    python predict.py --image photo.jpg --prompt "segment crack"
    python predict.py --image shots/ "more/*.png" --prompt "segment crack" --prompt "segment taping area" \\
        --model runs/exp/best --out predictions --overlay

For every image and prompt it writes <out>/<image_stem>__<prompt_slug>.png: single channel, 8-bit,
values {0, 255}, the size of the image as viewers show it (EXIF rotation applied). --overlay adds
<stem>__<slug>_overlay.png (the mask tinted green over the image), --probs <stem>__<slug>_prob.png (the
probability map, 0-255). Files are named by the image's stem alone, so two inputs whose files would
share a name (a/x.jpg and b/x.jpg, x.jpg and x.png, or X.jpg and x.jpg) are refused before anything
is written: predict them into different --out folders.

The vision encoder runs once per batch of images for all prompts; images are decoded and resized in
--workers processes while the model runs. An unreadable image is reported and skipped; the exit code is
then 1, after the other images' masks are written.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from defectseg import cli
from defectseg.cli import fail, int_at_least, nonempty, number_in, run, setup_logging, stop_if_terminated
from defectseg.inference import (
    PRECISION_HELP,
    PRECISIONS,
    LoadedImage,
    Segmenter,
    add_tta_argument,
    check_device,
    image_batches,
    precision_name,
    thresholds_mismatch,
)
from defectseg.io import (
    IMAGE_EXTENSIONS,
    encode_png,
    list_images,
    os_reason,
    write_bytes_atomic,
    write_json_atomic,
    write_mask_png,
)
from defectseg.manifest import PREDICT_CONFIG_FILE, mask_name
from defectseg.metrics import binarize
from defectseg.model import MODEL_ENV_VAR, SHIPPED_MODEL, ModelLoadError, read_metadata, resolve_model_arg
from defectseg.report import PREDICTED
from defectseg.tasks import TaskTableError, prompt_slug

log = logging.getLogger("predict")

OVERLAY_SUFFIX = "_overlay"
PROB_SUFFIX = "_prob"
OVERLAY_COLOR = np.array(PREDICTED, dtype=np.float32)  # green: predicted, in every picture of the project
OVERLAY_ALPHA = 0.5
WRITER_THREADS = 2


class InputError(ValueError):
    """Command-line input that cannot be used (message for the user)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=nonempty, nargs="+", action="extend", required=True, metavar="PATH",
                        help="image files, folders (the images directly inside) or quoted glob patterns; repeatable")
    parser.add_argument("--prompt", action="append", required=True,
                        help='what to segment, one quoted phrase, e.g. "segment crack"; repeat the flag for more '
                             "prompts (one mask per image and prompt)")
    parser.add_argument("--model", type=nonempty, default=None,
                        help="Hub id, save_pretrained folder, runs/<name>/best or decoder .safetensors file "
                             f"(default: ${MODEL_ENV_VAR}, else the shipped model models/{SHIPPED_MODEL.name})")
    parser.add_argument("--out", type=nonempty, default="predictions", help="output folder (default: %(default)s)")
    parser.add_argument("--threshold", type=number_in(0, 1), default=None,
                        help="probability threshold for every prompt (default: the checkpoint's tuned "
                             "per-prompt thresholds, else 0.5)")
    add_tta_argument(parser)  # a warning when the checkpoint's thresholds were tuned otherwise
    parser.add_argument("--ensemble", action="store_true",
                        help="average over the prompt's synonyms from the task table (thresholds: as --tta)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write <stem>__<slug>_overlay.png, the mask tinted green over the image")
    parser.add_argument("--probs", action="store_true", help="also write <stem>__<slug>_prob.png (probability x 255)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help=PRECISION_HELP + " (default: %(default)s)")
    parser.add_argument("--workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                        help="processes decoding images while the model runs; 0: in the main process "
                             "(default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


# -- checking the input -------------------------------------------------------------------------------


def check_prompts(prompts: list[str], suffixes: list[str]) -> list[str]:
    """The prompts, stripped, each once. Refuses empty prompts and prompts whose output files would
    collide (same slug, e.g. "Segment crack" and "segment crack")."""
    writers: dict[str, str] = {}  # output file slug -> prompt that writes it
    kept: list[str] = []
    for prompt in prompts:
        prompt = prompt.strip()
        if not prompt:
            raise InputError("--prompt must not be empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's encoding could not decode, e.g. Latin-1 text
            raise InputError(f"--prompt {prompt!r} is not valid UTF-8 text; check the terminal's encoding") from None
        if prompt in kept:
            continue
        for suffix in suffixes:
            name = prompt_slug(prompt) + suffix
            if name in writers:
                raise InputError(f"prompts {writers[name]!r} and {prompt!r} would both write "
                                 f"<image_stem>__{name}.png; use one of them")
            writers[name] = prompt
        kept.append(prompt)
    return kept


def collect_images(specs: list[str]) -> list[Path]:
    """Files named by ``--image``: files as given, folders' images (directly inside), glob patterns;
    each file once, in the order given."""
    found: dict[Path, Path] = {}  # resolved -> as given
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            matches = list_images(path)
            if not matches:
                log.warning("%s: no images (%s) in this folder", spec, " ".join(IMAGE_EXTENSIONS))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(
                Path(p) for p in glob.glob(str(path), recursive=True)
                if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file()
            )
            if not matches:
                raise InputError(f"--image {spec}: not an image file or a folder, and no image file matches it")
        for match in matches:
            found.setdefault(match.resolve(), match)
    if not found:
        raise InputError("no images to predict")
    return list(found.values())


def check_unique_outputs(paths: list[Path], prompts: list[str], suffixes: list[str],
                         remedy: str = "Rename them or predict them into different --out folders") -> None:
    """Refuse inputs whose output files would overwrite each other: the same file stem (x.jpg, x.png), or
    stems and prompts that join into one name ("x" + "_a" and "x_" + "a": x___a.png). Names that differ
    only in case count as the same (one file on macOS and Windows). ``remedy`` ends the message."""
    endings = [prompt_slug(prompt) + suffix for prompt in prompts for suffix in suffixes]
    writer: dict[str, Path] = {}  # case-folded output name -> the image writing it
    clashes: dict[tuple[Path, Path], str] = {}  # (image, image) -> one file both would write
    for path in paths:
        for ending in endings:
            name = mask_name(path.name, ending)
            other = writer.setdefault(name.casefold(), path)
            if other != path:
                clashes.setdefault((other, path), name)
    if clashes:
        pairs = list(clashes.items())
        shown = "; ".join(f"{a} and {b} ({name})" for (a, b), name in pairs[:5])
        more = f" (and {len(pairs) - 5} more)" if len(pairs) > 5 else ""
        same_stem = all(a.stem.casefold() == b.stem.casefold() for a, b in clashes)
        what = "images with the same file stem" if same_stem else "these images and prompts"
        raise InputError(f"{what} would write the same output files: {shown}{more}. {remedy}")


# -- predicting ----------------------------------------------------------------------------------------


@dataclass
class RunStats:
    images: int = 0  # images predicted
    masks: int = 0  # masks written (one per image and prompt; overlays and probability maps not counted)
    failed: list[Path] = field(default_factory=list)  # images that could not be read
    seconds: float = 0.0


def output_suffixes(overlay: bool, probs: bool) -> list[str]:
    """What follows the prompt slug in the names of the files written per image and prompt."""
    return [""] + [OVERLAY_SUFFIX] * overlay + [PROB_SUFFIX] * probs


def earlier_record(out: Path) -> dict:
    """The ``predict_config.json`` the earlier runs into ``out`` left; {} when there is none or it cannot be
    read (one generic guard: this run replaces it)."""
    try:
        record = json.loads((out / PREDICT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded(record: dict, key: str, kind: type) -> dict | list:
    """``record[key]`` when it is a ``kind`` (dict or list), else an empty one: a hand-edited record is ignored."""
    value = record.get(key)
    return value if isinstance(value, kind) else kind()


def written_slugs(record: dict) -> set[str]:
    """The prompt slugs of every earlier run into a folder, from its record (``earlier_record``)."""
    return {str(s) for s in recorded(record, "written_slugs", list)} | {
        prompt_slug(str(p)) for p in recorded(record, "prompts", list)}


def check_sources(paths: list[Path], prompts: list[str], out: Path, record: dict) -> dict[str, str]:
    """Refuse images whose masks would replace masks an earlier run into ``out`` made of another photo with
    the same name (site-a/IMG_1.jpg, then site-b/IMG_1.jpg). The record's ``sources`` maps each mask file
    name to the image it was made from; returns it with this run's masks added. Names that differ only in
    case are one file on a case-insensitive disk and two on others: the disk decides (``same_file``)."""
    sources = {str(k): str(v) for k, v in recorded(record, "sources", dict).items()}
    folded: dict[str, list[str]] = defaultdict(list)
    for key in sources:
        folded[key.casefold()].append(key)
    mine: dict[str, str] = {}
    clashes: list[str] = []
    for path in paths:
        source = str(path.resolve())
        for prompt in prompts:
            name = mask_name(path.name, prompt_slug(prompt))
            same = sorted((k for k in folded[name.casefold()] if k == name or same_file(out / k, out / name)),
                          key=lambda k: k != name)  # its own name first
            earlier = sources[same[0]] if same and (out / name).exists() else None
            if earlier not in (None, source):
                clashes.append(f"{name} (made from {earlier}, now {path})")
            for key in same:  # this run's mask replaces that file: one entry for it
                sources.pop(key, None)
            mine[name] = source
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise InputError(f"{out} holds masks of other photos with the same names, which this run would replace: "
                         f"{'; '.join(clashes[:3])}{more}. Predict into another --out, or delete those masks first")
    return {**sources, **mine}


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file (names differing in case, on a case-insensitive disk)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def without_own_outputs(paths: list[Path], out: Path, slugs: set[str]) -> list[Path]:
    """``paths`` less the masks, overlays and probability maps in ``out`` of the prompt ``slugs`` (this
    run's and every earlier one's there: ``written_slugs``): a re-run whose --out is one of its input
    folders must not segment earlier masks."""
    endings = tuple(f"__{slug}{s}.png" for slug in slugs for s in output_suffixes(True, True))
    out = out.resolve()
    kept = [p for p in paths if not (p.parent.resolve() == out and p.name.endswith(endings))]
    if len(kept) < len(paths):
        log.info("skipping %d earlier outputs of predict.py in %s", len(paths) - len(kept), out)
    return kept


def tint(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with the mask's pixels blended towards OVERLAY_COLOR."""
    out = image.copy()
    out[mask] = (image[mask] * (1 - OVERLAY_ALPHA) + OVERLAY_COLOR * OVERLAY_ALPHA + 0.5).astype(np.uint8)
    return out


def write_outputs(out: Path, item: LoadedImage, slug: str, prob: np.ndarray, threshold: float,
                  suffixes: list[str]) -> None:
    """Write the mask (and overlay / probability map, as ``suffixes`` asks) of one image and prompt."""
    mask = binarize(prob, threshold)
    write_mask_png(out / mask_name(item.path.name, slug), mask)
    if OVERLAY_SUFFIX in suffixes:
        write_bytes_atomic(out / mask_name(item.path.name, slug + OVERLAY_SUFFIX), encode_png(tint(item.image, mask)),
                           sync=False)
    if PROB_SUFFIX in suffixes:
        prob8 = np.clip(prob * 255.0 + 0.5, 0, 255).astype(np.uint8)
        write_bytes_atomic(out / mask_name(item.path.name, slug + PROB_SUFFIX), encode_png(prob8), sync=False)


def predict_images(
    segmenter: Segmenter,
    paths: list[Path],
    thresholds: dict[str, float],
    out: Path,
    *,
    suffixes: list[str],
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = False,
) -> RunStats:
    """Write the outputs of every image in ``paths`` for every prompt in ``thresholds`` into ``out``.

    Per batch: one ``encode`` (the vision encoder), then ``probabilities`` for all prompts. PNG encoding
    and writing run in threads, overlapping the next batch's encoding; at most one batch of writes is
    pending, and its maps are freed before the next batch's are made (memory: about 4 bytes per pixel per
    prompt for one batch of images at their own sizes; with overlays, also 3 bytes per pixel of each image
    decoded ahead: up to two batches per worker).
    """
    stats = RunStats()
    start = time.perf_counter()
    prompts = list(thresholds)
    pending: list[Future[None]] = []
    bar = cli.progress(total=len(paths), desc="predict", unit="image", enabled=progress)
    with ThreadPoolExecutor(WRITER_THREADS) as writer, logging_redirect_tqdm(), bar:
        for batch in image_batches(segmenter, paths, batch_size, workers, keep_images=OVERLAY_SUFFIX in suffixes):
            stop_if_terminated()
            for item in batch:
                if item.error is not None:
                    log.error("%s", item.error)
                    stats.failed.append(item.path)
            loaded = [item for item in batch if item.error is None]
            if loaded:
                activations = segmenter.encode(torch.stack([item.pixel_values for item in loaded]))
                stats.masks += wait_for(pending)  # first: one batch of full-size maps in memory at a time
                probs = segmenter.probabilities(activations, [item.size for item in loaded], prompts)
                pending = [
                    writer.submit(write_outputs, out, item, prompt_slug(prompt), prob, thresholds[prompt], suffixes)
                    for prompt in prompts
                    for item, prob in zip(loaded, probs[prompt])
                ]
                stats.images += len(loaded)
            bar.update(len(batch))
        stats.masks += wait_for(pending)
    stats.seconds = time.perf_counter() - start
    return stats


def wait_for(writes: list[Future[None]]) -> int:
    """Wait for ``writes`` (re-raising their errors); their number."""
    for write in writes:
        write.result()
    return len(writes)


def model_record(model: str) -> str:
    """How ``predict_config.json`` names the model: a local path absolute (comparable from any folder),
    a Hub id as is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def same_settings(a: dict, b: dict) -> bool:
    """Whether two ``predict_config.json`` records make the same masks: same model, TTA and ensemble, and
    the same threshold for every output file both wrote (prompts with one slug write one file)."""
    if any(a.get(key) != b.get(key) for key in ("model", "tta", "ensemble")):
        return False
    ta, tb = a.get("thresholds"), b.get("thresholds")
    if not (isinstance(ta, dict) and isinstance(tb, dict)):
        return False
    ta, tb = ({prompt_slug(p): t for p, t in x.items()} for x in (ta, tb))  # by output file: "Segment Crack"
    return all(ta[slug] == tb[slug] for slug in ta.keys() & tb.keys())


def warn_if_mixed(out: Path, record: dict, settings: dict) -> None:
    """Warn when the earlier runs into ``out`` (their ``record``) made masks with other settings: the files
    this run does not rewrite stay from them."""
    if record and not same_settings(record, settings):
        log.warning("%s holds outputs of an earlier run with other settings (model %s): the files this run does "
                    "not rewrite stay from it; use another --out to keep runs apart", out, record.get("model"))


def main(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    suffixes = output_suffixes(args.overlay, args.probs)
    out = Path(args.out)
    try:
        prompts = check_prompts(args.prompt, suffixes)
        record = earlier_record(out)
        mine = {prompt_slug(p) for p in prompts}
        slugs = mine | written_slugs(record)  # this run's and the earlier ones'
        paths = without_own_outputs(collect_images(args.image), out, slugs)
        if not paths:
            raise InputError("no images to predict (only earlier outputs of predict.py in --out)")
        check_unique_outputs(paths, prompts, suffixes)
        sources = check_sources(paths, prompts, out, record)
    except InputError as err:
        return fail(str(err))
    if problem := check_device(args.device):
        return fail(problem)
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)  # before the model loads: a bad --out fails fast
    except OSError as err:
        return fail(f"cannot create output folder {out}: {err}")

    model = resolve_model_arg(args.model, SHIPPED_MODEL)
    try:
        segmenter = Segmenter.load(model, args.device, args.precision, tta=args.tta, ensemble=args.ensemble)
    except BaseException as err:  # a bad model, Ctrl-C or SIGTERM: nothing was written, leave no empty --out
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty after all
                break
        if isinstance(err, (ModelLoadError, TaskTableError)):
            return fail(str(err))
        raise
    thresholds = {p: segmenter.threshold(p) if args.threshold is None else args.threshold for p in prompts}
    if args.threshold is None and (mismatch := thresholds_mismatch(
            read_metadata(model), model, args.tta, args.ensemble, map(segmenter.threshold_prompt, prompts))):
        log.warning("%s", mismatch)
    for p in (p for p in prompts if not segmenter.trained_on(p)):
        log.warning("prompt %r is not one the model was trained on (%s): its masks may mean little, at threshold "
                    "%g", p, ", ".join(repr(t.prompt) for t in segmenter.tasks.values()), thresholds[p])
    for p in (p for p in prompts if segmenter.cuts(p)):
        log.warning("prompt %r is longer than the model reads: only its start conditions the masks", p)
    precision = precision_name(segmenter.amp_dtype)
    log.info("%d images x %d prompts with %s on %s (%s)%s%s; thresholds: %s%s", len(paths), len(prompts), model,
             segmenter.device, precision, f", TTA {args.tta}" if args.tta else "",
             ", synonym ensemble" if args.ensemble else "",
             ", ".join(f"{p!r} {t:g}" for p, t in thresholds.items()),
             " (--threshold)" if args.threshold is not None else "")

    settings = {"model": model_record(model), "thresholds": thresholds, "tta": args.tta, "ensemble": args.ensemble}
    warn_if_mixed(out, record, settings)
    # What made every mask in the folder, this run's and the earlier ones' it leaves: their prompts'
    # thresholds, the slugs (for without_own_outputs) and each mask's source image (for check_sources).
    settings["thresholds"] = {**{str(p): t for p, t in recorded(record, "thresholds", dict).items()
                                 if prompt_slug(str(p)) not in mine}, **thresholds}
    settings["written_slugs"] = sorted(slugs)
    settings["sources"] = sources

    try:
        # Recorded before the first mask is written, so a run stopped half-way still says what made the files.
        write_json_atomic(out / PREDICT_CONFIG_FILE, {**settings, "prompts": prompts, "finished": False})
        stats = predict_images(segmenter, paths, thresholds, out, suffixes=suffixes, batch_size=args.batch_size,
                               workers=args.workers, progress=not args.quiet and len(paths) > args.batch_size)
        rate = stats.images / stats.seconds if stats.seconds > 0 else 0.0
        write_json_atomic(out / PREDICT_CONFIG_FILE, {
            **settings, "prompts": prompts, "device": str(segmenter.device), "precision": precision,
            "batch_size": args.batch_size, "images": stats.images, "failed": [str(p) for p in stats.failed],
            "masks_written": stats.masks, "seconds": round(stats.seconds, 3), "images_per_second": round(rate, 3),
            "finished": True,
        })
    except OSError as err:  # e.g. the disk is full or --out is read-only
        return fail(f"cannot write predictions into {out}: {os_reason(err)}")
    log.info("%d images, %d prompts: %d masks written in %.1f s (%.2f images/s on %s, %s) -> %s",
             stats.images, len(prompts), stats.masks, stats.seconds, rate, segmenter.device, precision, out)
    if stats.failed:
        return fail(f"{len(stats.failed)} of {len(paths)} images could not be read (listed above); "
                    "the others were written")
    return 0


if __name__ == "__main__":
    run(main, build_parser())
