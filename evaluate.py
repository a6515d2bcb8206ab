#!/usr/bin/env python
"""Score a model (or a folder of masks made elsewhere) on a preprocessed split and write a report.

    python evaluate.py --model runs/<name>/best --data processed_dataset --split valid --out reports/<name>
    python evaluate.py --pred-dir their_masks/ --split valid          # masks made elsewhere, no model

Writes to --out (default reports/<name>-<split>): metrics.json, per_image.csv, report.md (paste-ready),
threshold_curves.png and examples_<task>.png. Headline numbers are mean-over-images IoU and Dice at each
mask's original resolution (an empty ground truth predicted empty scores 1.0), per task and overall
(= mean of tasks).

The report is written in full beside --out and swapped in only when complete (an --out that holds
anything but an earlier report, or the masks being scored, is refused: it is replaced whole).
--write-thresholds changes the checkpoint only once the report is complete, just before it is moved in.
A run that fails before that leaves both as they were (if the final move fails, the error says the
thresholds were written).

An image or ground-truth mask that cannot be read is skipped with a warning and listed in
metrics.json and report.md; the run still exits 0. Exit 2: bad arguments. Exit 1: arguments that cannot
work together, an --out that cannot be written, no manifest, a model that cannot be loaded or whose
defectseg.json is broken, or nothing readable at all.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
from functools import partial
from pathlib import Path

import numpy as np

from defectseg import evaluation, metrics, report
from defectseg.cli import fail, int_at_least, nonempty, number_in, run, setup_logging, split_name
from defectseg.data import DataError, select_tasks
from defectseg.data import load_rows as data_rows
from defectseg.inference import (
    PRECISION_HELP,
    PRECISIONS,
    Segmenter,
    add_tta_argument,
    check_device,
    checkpoint_metadata,
    threshold_sources,
    thresholds_mismatch,
)
from defectseg.io import AtomicFolder, ImageReadError, os_reason
from defectseg.manifest import MANIFEST_FILE
from defectseg.model import METADATA_FILE, SHIPPED_MODEL, ModelLoadError, read_metadata, resolve_model_arg
from defectseg.tasks import normalize_prompt

log = logging.getLogger("evaluate")
# options that mean nothing for masks made elsewhere (left out of the recorded command)
MODEL_ONLY = {"model": None, "batch_size": None, "device": None, "precision": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=nonempty, default=None,
                        help="checkpoint folder (runs/<name>/best), decoder .safetensors file or Hub id "
                             "(default: $DEFECTSEG_MODEL, else the shipped model models/liteseg)")
    parser.add_argument("--data", type=nonempty, default="processed_dataset",
                        help="preprocess_masks.py output folder (default: %(default)s)")
    parser.add_argument("--split", type=split_name, default="valid", help="split to score (default: %(default)s)")
    parser.add_argument("--out", type=nonempty, default=None,
                        help="report folder (default: reports/<model or folder name>-<split>); an earlier "
                             "report there is replaced as a whole")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to score (default: all in the manifest)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help=PRECISION_HELP + " (default: %(default)s)")
    parser.add_argument("--threshold", type=number_in(0, 1), default=None,
                        help="use this threshold for every prompt (default: the checkpoint's tuned per-prompt "
                             "thresholds, else 0.5); the sweep is reported either way")
    add_tta_argument(parser)
    parser.add_argument("--ensemble", action="store_true", help="average the logits over each task's synonyms")
    parser.add_argument("--thresholds-sweep", nargs="+", type=number_in(0, 1), default=None, metavar="T",
                        help="thresholds of the sweep (default: 0.05 0.10 ... 0.95)")
    parser.add_argument("--write-thresholds", action="store_true",
                        help="store each task's best sweep threshold in the checkpoint folder's defectseg.json "
                             "(refused on the test split)")
    parser.add_argument("--compare", type=nonempty, default=None, metavar="OTHER",
                        help="also score OTHER the same way (a model; with --pred-dir, another mask folder) and "
                             "add side-by-side columns")
    parser.add_argument("--save-masks", action="store_true",
                        help="write the predicted masks to <out>/masks/<image_stem>__<prompt_slug>.png")
    parser.add_argument("--pred-dir", type=nonempty, default=None,
                        help="score masks made elsewhere (<image_stem>__<prompt_slug>.png) instead of a model")
    parser.add_argument("--pred-threshold", type=number_in(0, 65535, low_open=True), default=None, metavar="V",
                        help="with --pred-dir: a pixel is foreground iff its value >= V (masks saved as "
                             "probabilities 0..255: e.g. 128; 16-bit 0..65535: e.g. 32768); default: any "
                             "non-zero pixel")
    parser.add_argument("--examples", type=int_at_least(0), default=1, metavar="N",
                        help="per task, N best, N median and N worst images in examples_<task>.png "
                             "(0: none; default: %(default)s)")
    parser.add_argument("--workers", type=int_at_least(1), default=2, help="threads reading files (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def default_out(source: str, split: str) -> Path:
    """reports/<name>-<split>: <name> is the model folder's name (its run's name for runs/<name>/best), a
    decoder file's stem, a Hub id's last part, or the mask folder's name; each split gets its own folder."""
    path = Path(os.path.abspath(source)) if Path(source).exists() else Path(source.rstrip("/\\"))  # ".", "../x"
    if path.suffix == ".safetensors" and path.parent.name in ("best", "last"):
        path = path.parent  # runs/<name>/best/decoder.safetensors: the run's name, as for its folder
    name = path.stem if path.suffix == ".safetensors" else path.name
    if name in ("best", "last") and path.parent.name:
        name = path.parent.name if name == "best" else f"{path.parent.name}-last"
    return Path("reports") / f"{name}-{split}"


def command_line(args: argparse.Namespace, **resolved: object) -> str:
    """The command that reproduces this run, every option spelled out (``resolved`` replaces values)."""
    parts = ["python", "evaluate.py"]
    for key, value in {**vars(args), **resolved}.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def check_args(args: argparse.Namespace, model_arg: str) -> str | None:
    """A message for arguments that cannot work together, else None (each value's range is its
    argparse type's business)."""
    if args.pred_threshold is not None and args.pred_dir is None:
        return "--pred-threshold is for masks made elsewhere; it needs --pred-dir"
    if args.pred_dir is not None:
        if args.write_thresholds or args.save_masks:
            return "--write-thresholds and --save-masks need a model; they cannot be used with --pred-dir"
        for folder in (args.pred_dir, args.compare):
            if folder is not None and not Path(folder).is_dir():
                return f"prediction folder {folder} does not exist or is not a folder"
            if folder is not None and args.pred_threshold is not None and args.pred_threshold > 255:
                sample = next(iter(sorted(Path(folder).glob("*.png"))), None)
                values = evaluation.read_prediction_values(sample) if sample else None
                if values is not None and values.dtype == np.uint8:  # every mask would score as empty
                    return (f"--pred-threshold {args.pred_threshold:g} is above 255, the largest value of the "
                            f"8-bit masks in {folder} (e.g. {sample.name})")
    if args.write_thresholds:
        if args.split.lower() == "test":  # .lower(): the same folder on case-insensitive file systems
            return ("refusing --write-thresholds on the test split: a threshold tuned on test makes the test "
                    "score meaningless; tune on valid (--split valid)")
        try:
            evaluation.thresholds_target(model_arg)
        except ValueError as err:
            return str(err)
    if args.pred_dir is None:
        for model in (model_arg, args.compare):
            if model is not None and (problem := check_metadata(model)):
                return problem
    return None


def check_metadata(model_arg: str) -> str | None:
    """Why the defectseg metadata of ``model_arg`` cannot be used (naming the file), else None."""
    try:
        checkpoint_metadata(model_arg)
    except ModelLoadError as err:
        return str(err)
    return None


def load_rows(data: Path, split: str, tasks: list[str] | None) -> tuple[list[dict], dict[str, str]]:
    """The manifest rows of the chosen tasks, and task -> prompt for every task of the manifest (the
    other task's prompt is what text sensitivity asks with). Raises DataError with a user-facing message."""
    rows = data_rows(data, split)
    task_prompts: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r["task"]):
        task_prompts.setdefault(row["task"], row["prompt"])
    return select_tasks(rows, tasks, str(data / split / MANIFEST_FILE)), task_prompts


def run_model(model_arg: str, args: argparse.Namespace, rows: list[dict], sweep: np.ndarray,
              other_prompts: dict[str, str] | None,
              mask_dir: Path | None) -> tuple[dict, list[evaluation.ImageScore], Segmenter]:
    """Load and score one model. Raises ModelLoadError."""
    segmenter = Segmenter.load(model_arg, args.device, args.precision, tta=args.tta, ensemble=args.ensemble)
    meta = read_metadata(model_arg)
    trained_table = segmenter.tasks if meta.get("tasks") else {}  # else the built-in table
    for task, prompt in sorted({(row["task"], row["prompt"]) for row in rows}):
        trained = trained_table.get(task)
        if trained is not None and normalize_prompt(prompt) not in map(normalize_prompt, trained.prompts):
            log.warning("%s was trained to answer %r for task %s; the manifest asks %r, which is what is scored",
                        model_arg, trained.prompt, task, prompt)
    untuned = sorted({row["prompt"] for row in rows if segmenter.tuned_threshold(row["prompt"]) is None})
    none_tuned = len(untuned) == len({row["prompt"] for row in rows})
    source = ("default" if none_tuned else
              f"from the checkpoint; default {segmenter.default_threshold:g} for {', '.join(untuned)}" if untuned
              else "from the checkpoint")
    if args.threshold is not None:
        segmenter.thresholds, segmenter.default_threshold, source = {}, args.threshold, "--threshold"
    else:
        scored = {segmenter.threshold_prompt(row["prompt"]) for row in rows}
        records = [r for p, r in threshold_sources(meta).items() if p in scored]
        if not none_tuned and any(tuned_on(r, args) for r in records):
            source += ", tuned on the images scored here by evaluate.py --write-thresholds, so these numbers are optimistic"
        if mismatch := thresholds_mismatch(meta, model_arg, args.tta, args.ensemble, scored):
            log.warning("%s", mismatch)
    log.info("scoring %s on %d images (%s)", model_arg, len(rows), evaluation.device_name(segmenter.device))
    result = evaluation.evaluate_model(segmenter, rows, batch_size=args.batch_size, thresholds=sweep,
                                       other_prompts=other_prompts, mask_dir=mask_dir, workers=args.workers,
                                       progress=not args.quiet)
    summary = evaluation.aggregate(result.scores, sweep)
    section = report.source_metrics(model_arg, "model", result, summary,
                                    evaluation.model_footprint(model_arg, segmenter.parameter_counts))
    section["threshold_source"] = source
    section["trained_epochs"] = meta.get("epoch") if meta else None
    if meta.get("selection"):  # what picked this checkpoint and tuned its thresholds (train.py's metadata)
        section["selection"] = meta["selection"] + (
            ": the split scored here, so these numbers are optimistic" if meta.get("selection_split") == args.split
            else "")
    return section, result.scores, segmenter


def tuned_on(provenance: dict, args: argparse.Namespace) -> bool:
    """Whether ``--write-thresholds`` (a ``threshold_sources`` record) tuned on the data and split scored now."""
    if not isinstance(provenance, dict) or provenance.get("split") != args.split:
        return False
    data = provenance.get("data")
    return not isinstance(data, str) or Path(data).resolve() == Path(args.data).resolve()


def run_pred_dir(pred_dir: str, args: argparse.Namespace, rows: list[dict]) -> tuple[dict, list]:
    log.info("scoring the masks in %s against %d ground truths", pred_dir, len(rows))
    result = evaluation.evaluate_pred_dir(pred_dir, rows, workers=args.workers, progress=not args.quiet,
                                          pred_threshold=args.pred_threshold)
    return report.source_metrics(pred_dir, "pred_dir", result, evaluation.aggregate(result.scores)), result.scores


def log_summary(section: dict) -> None:
    for name, t in [*section["tasks"].items(), ("overall", section["overall"])]:
        best = (f", best threshold {t['best_threshold']:.2f} -> {t['best_iou']:.4f}"
                if "best_threshold" in t else "")
        text = f", other prompt IoU {t['text_iou']:.4f}" if "text_iou" in t else ""
        ci = f" (95% interval {report.interval_text(t['iou_ci'])})" if "iou_ci" in t else ""
        log.info("%-8s mean IoU %.4f%s  mean Dice %.4f  micro IoU %.4f  (%d images)%s%s", name, t["iou"], ci,
                 t["dice"], t["micro_iou"], t["n_images"], best, text)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    model_arg = resolve_model_arg(args.model, SHIPPED_MODEL)
    problem = check_args(args, model_arg) or (None if args.pred_dir else check_device(args.device))
    if problem:
        return fail(problem)
    try:
        rows, task_prompts = load_rows(Path(args.data), args.split, args.tasks)
    except DataError as err:
        return fail(str(err))
    source = args.pred_dir or model_arg
    out = Path(args.out) if args.out else default_out(source, args.split)
    if problem := report.check_out_folder(out, scored=[p for p in (args.pred_dir, args.compare) if p]):
        return fail(problem)
    with contextlib.ExitStack() as stack:
        try:  # masks are not flushed one by one (they can be made again); the other files are
            folder = stack.enter_context(AtomicFolder(out, sync=False))
        except OSError as err:
            return fail(f"cannot write the report to {out}: {os_reason(err)}")
        try:
            return evaluate(args, model_arg, rows, task_prompts, out, folder)
        except (report.ReportWriteError, ModelLoadError) as err:
            return fail(str(err))


def metrics_json(args: argparse.Namespace, out: Path, model_arg: str, section: dict, examples: list[str],
                 thresholds_written: dict | None, compare: dict | None) -> dict:
    """metrics.json's content: the command, data and conventions, the scored source's section, and what
    else was written (examples, masks, thresholds) or compared."""
    return {
        "command": command_line(args, out=str(out), **(MODEL_ONLY if args.pred_dir else {"model": model_arg})),
        "created": report.now_iso(),
        "data": str(args.data),
        "split": args.split,
        "conventions": {
            "headline": "mean over images of per-image IoU and Dice",
            "resolution": "original size of each ground-truth mask",
            "empty_gt_and_empty_prediction_score": evaluation.EMPTY_SCORE,
            "threshold_rule": ("foreground iff probability >= threshold" if not args.pred_dir else
                               "foreground iff pixel value > 0" if args.pred_threshold is None else
                               f"foreground iff pixel value >= {args.pred_threshold:g}"),
            "overall": "mean over tasks",
            "iou_ci": f"95% interval of the mean IoU, by {evaluation.CI_RULE}: {evaluation.CI_COVERS}",
        },
        **section,
        "pred_threshold": args.pred_threshold,
        "examples": examples,
        "saved_masks": report.MASKS_DIR if args.save_masks else None,
        "leakage": report.read_leakage(args.data, args.split),
        "thresholds_written": thresholds_written,
        "compare": compare,
    }


def evaluate(args: argparse.Namespace, model_arg: str, rows: list[dict], task_prompts: dict[str, str], out: Path,
             folder: AtomicFolder) -> int:
    """Score, write the report into ``folder.path``, tune thresholds, put the report in place.
    Raises ModelLoadError, ReportWriteError."""
    stage = folder.path
    sweep = (np.unique(np.round(args.thresholds_sweep, 6)) if args.thresholds_sweep
             else metrics.default_thresholds())
    other_prompts = evaluation.other_task_prompts(task_prompts)
    compare = None
    if args.compare and not args.pred_dir:
        # the model to compare with first, one model in memory at a time: a --compare that cannot be
        # loaded fails before the long part
        compare, compare_scores = run_model(args.compare, args, rows, sweep, other_prompts, None)[:2]
    try:
        if args.pred_dir:
            model_flags = {"--model": args.model, "--tta": args.tta, "--ensemble": args.ensemble,
                           "--threshold": args.threshold, "--thresholds-sweep": args.thresholds_sweep}
            if ignored := [flag for flag, value in model_flags.items() if value not in (None, False, [])]:
                log.warning("%s do%s nothing with --pred-dir (masks made elsewhere: no model runs)",
                            ", ".join(ignored), "es" if len(ignored) == 1 else "")
            try:
                section, scores = run_pred_dir(args.pred_dir, args, rows)
                if args.compare:
                    compare, compare_scores = run_pred_dir(args.compare, args, rows)
            except ValueError as err:  # not one prediction found: the folder's naming or split is not these rows'
                return fail(str(err))
            loader = partial(evaluation.pred_dir_example, args.pred_dir, pred_threshold=args.pred_threshold)
        else:
            mask_dir = stage / report.MASKS_DIR if args.save_masks else None
            section, scores, segmenter = run_model(model_arg, args, rows, sweep, other_prompts, mask_dir)
            loader = partial(evaluation.model_example, segmenter)
        if not scores:
            return fail(f"no image of {args.data}/{args.split} could be read; nothing scored")
        if compare is not None:
            try:
                compare["paired"] = evaluation.paired_difference(
                    evaluation.iou_by_image(scores, f"{args.data}/{args.split}"), evaluation.iou_by_image(compare_scores))
            except ValueError as err:
                log.warning("%s: no paired comparison", err)
        examples = report.write_examples(stage, scores, loader, args.examples) if args.examples else []
    except ImageReadError as err:  # a ground truth that went away after scoring, for the examples
        return fail(str(err))
    except OSError as err:
        raise report.ReportWriteError(f"cannot write the report to {out}: {os_reason(err)}") from None
    del loader
    thresholds_written = None
    if args.write_thresholds:
        best = evaluation.best_thresholds(section, segmenter)
        target = evaluation.thresholds_target(model_arg)
        thresholds_written = {"file": str(target / METADATA_FILE), "thresholds": best}
    segmenter = None

    metrics_ = metrics_json(args, out, model_arg, section, examples, thresholds_written, compare)
    try:
        report.write_outputs(stage, metrics_, scores)
    except OSError as err:
        raise report.ReportWriteError(f"cannot write the report to {out}: {os_reason(err)}") from None
    if thresholds_written:  # the checkpoint changes only once the report is complete
        provenance = {"data": str(Path(args.data).resolve()), "split": args.split, "tta": args.tta, "ensemble": args.ensemble,
                      "created": metrics_["created"]}
        try:
            path = evaluation.write_thresholds(target, thresholds_written["thresholds"], provenance)
        except OSError as err:
            return fail(f"cannot write the thresholds to {target / METADATA_FILE}: {os_reason(err)} "
                        f"(nothing changed in {out})")
        log.info("wrote best thresholds %s to %s", thresholds_written["thresholds"], path)
    try:
        folder.commit()
    except OSError as err:
        written = f" (the thresholds were written to {thresholds_written['file']})" if thresholds_written else ""
        raise report.ReportWriteError(f"cannot put the report in place in {out}: {os_reason(err)}{written}"
                                      ) from None
    log_summary(section)
    if section["n_skipped"]:
        log.warning("%d image(s) could not be read and were skipped (listed in %s)", section["n_skipped"],
                    out / report.METRICS_FILE)
    log.info("wrote %s", out / report.REPORT_FILE)
    return 0


if __name__ == "__main__":
    run(main, build_parser())
