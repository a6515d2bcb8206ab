#!/usr/bin/env python
r"""Train a text-prompted segmenter: fine-tune CLIPSeg's decoder, or train LiteSeg from scratch (--model lite).

    python train.py                                  # processed_dataset/ -> runs/<timestamp>/
    python train.py --model models/clipseg-rd64-refined --epochs 10 --out runs/first
    python train.py --model lite-ctx --epochs 24 --low-res-epochs 14 --low-res-size 256 --train-sizes 384 448 \
        --lr 2e-3 --patience 0 --out runs/lite       # from scratch: the shipped model's recipe (make train-lite)
    python train.py --resume runs/first --epochs 20  # continue a run (same config, more epochs)
    torchrun --nproc_per_node 2 train.py ...         # data-parallel on 2 GPUs (or CPU processes)

CLIPSeg: CLIP stays frozen by default: each image's vision activations are computed once and cached
(<data>/features), and only the decoder trains, so an epoch after the first runs no vision encoder.
LiteSeg (--model lite, or a LiteSeg folder to fine-tune): every weight trains on images decoded once into
memory and augmented on the fly (docs/liteseg.md).
Writes runs/<name>/: config.json, best/ and last/ (save_pretrained folders with defectseg.json, and for
CLIPSeg decoder.safetensors), metrics.csv, curves.png, summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

from defectseg import lite
from defectseg.cli import fail, int_at_least, nonempty, number_in, run, setup_logging
from defectseg.data import DataError
from defectseg.inference import PRECISION_HELP, PRECISIONS, check_device
from defectseg.io import ImageReadError, os_reason, recover_folder
from defectseg.model import HubUnreachableError, ModelLoadError, decoder_only_file, resolve_model_arg
from defectseg.tasks import TaskTableError, load_tasks
from defectseg.training import (
    FIXED_ON_RESUME,
    FREE_ON_RESUME,
    TRAINER_STATE,
    ConfigError,
    TrainConfig,
    load_run_config,
    moved_away,
    train,
)

log = logging.getLogger("train")

HELP = {
    "data": "preprocessed dataset folder (preprocess_masks.py --out)",
    "out": "run folder (default: runs/<timestamp>)",
    "model": "base model: hub id or local folder, or lite / lite-wide / lite-ctx / lite-tiny for a small model trained from scratch "
             "(default: $DEFECTSEG_MODEL or CIDAS/clipseg-rd64-refined)",
    "tasks": "tasks to train on",
    "tasks_file": "JSON file extending the task table",
    "epochs": "number of epochs",
    "batch_size": "samples per step (per process)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup": "fraction of steps with linear warm-up before the cosine decay",
    "grad_clip": "max gradient norm (0: no clipping)",
    "ema": "EMA decay of the weights (and LiteSeg's batch-norm statistics), e.g. 0.999 (0: off); validation, best/ and last/ use them",
    "bce_weight": "weight of the BCE term of the loss",
    "dice_weight": "weight of the soft Dice term of the loss",
    "lovasz_weight": "weight of the Lovasz hinge term of the loss in the --lovasz-epochs",
    "lovasz_epochs": "the last N epochs add the Lovasz hinge to the loss, a surrogate of each image's IoU at "
                     "threshold 0.5 (0: never; it needs a model that already separates the classes)",
    "negative_prob": "probability of pairing an image with another task's prompt and an empty target",
    "augment_workers": "a model trained from scratch: augment the batches in N forked processes instead of threads "
                       "(0: up to 8 threads ahead of the step on a GPU, which hold Python's lock, or between steps "
                       "on a CPU); same batches either way (default: 0)",
    "cuda_graphs": "LiteSeg on one GPU in bf16 or fp32 (default: off, an experiment): each step shape is recorded once as a CUDA graph and replayed instead of launching its many small kernels one by one; about 3x faster 256 px epochs on an H200 (docs/performance.md)",
    "flip": "flip augmentation (default: on): CLIPSeg caches the mirrored photo as a second view; LiteSeg also flips vertically and turns by quarter turns on the fly, and --no-flip turns all three off",
    "synonyms": "a random synonym of the task's prompt per sample; off: always the canonical prompt (default: on)",
    "seed": "random seed (same seed, same numbers on CPU)",
    "device": "auto, cpu, cuda, cuda:1, mps",
    "precision": PRECISION_HELP,
    "cache": "CLIPSeg: train from cached vision activations; off: HF's plain forward every step, slow (default: on)",
    "cache_dir": "CLIPSeg: feature cache folder (default: <data>/features)",
    "cache_dtype": "CLIPSeg: fp16 or fp32 storage of cached activations",
    "train_vision_layers": "CLIPSeg: also fine-tune the last K used vision layers (turns the cache off)",
    "vision_lr_scale": "CLIPSeg: learning-rate multiplier for the vision layers --train-vision-layers unfreezes",
    "patience": "early stop after this many epochs without a better validation score (0: never)",
    "val_batch_size": "batch size for validation and cache building",
    "holdout": "fraction of the train photos (grouped by source photo) set aside to pick best/ and tune its "
               "thresholds, so the valid split stays a clean report; 0: the valid split picks and tunes",
    "low_res_epochs": "a model trained from scratch: train the first N epochs at --low-res-size (progressive "
                      "resizing: cheaper epochs early; validated at the model's input size with --validate-low-res)",
    "low_res_size": "image side of the --low-res-epochs epochs, in pixels",
    "validate_low_res": "also validate the --low-res-epochs (default: off: only the epochs at the model's input "
                        "size and the last are validated, since low-res epochs score far below them and never "
                        "pick best/; last/ is saved after every epoch either way)",
    "train_sizes": "a model trained from scratch: after the --low-res-epochs, draw each batch's image side from "
                   "these pixel sizes, e.g. 320 384 448 512 (multi-scale training; default: the model's input size)",
}


# The range of each numeric flag, checked by argparse like every other script's flags (a value given to
# --resume is checked the same way; a run's own config.json is trusted).
POSITIVE, NON_NEGATIVE, FRACTION = number_in(0, math.inf, low_open=True), number_in(0, math.inf), number_in(0, 1, high_open=True)
TYPES = {
    "epochs": int_at_least(1), "batch_size": int_at_least(1), "val_batch_size": int_at_least(1),
    "train_vision_layers": int_at_least(0), "patience": int_at_least(0), "low_res_epochs": int_at_least(0),
    "lovasz_epochs": int_at_least(0), "augment_workers": int_at_least(0),
    "low_res_size": int_at_least(32), "train_sizes": int_at_least(32), "seed": int_at_least(0, below=2**32),
    "lr": POSITIVE, "vision_lr_scale": POSITIVE, "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
    "bce_weight": NON_NEGATIVE, "dice_weight": NON_NEGATIVE, "lovasz_weight": NON_NEGATIVE,
    "negative_prob": FRACTION, "ema": FRACTION, "warmup": FRACTION, "holdout": FRACTION,
}
CHOICES = {"precision": PRECISIONS, "cache_dtype": ["fp16", "fp32"]}


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror TrainConfig; only flags given on the command line end up in the namespace."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", type=nonempty, metavar="RUN", help="continue runs/<name> from its last/ checkpoint")
    parser.add_argument("--stop-after", type=int_at_least(1), metavar="N",
                        help="end this invocation after N epochs; continue later with --resume "
                             "(the LR schedule still spans --epochs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into an --out folder that already holds a run, replacing it")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        shown = "none" if shown in (None, "") else shown
        help_text = HELP[f.name] if "default" in HELP[f.name] else f"{HELP[f.name]} (default: {shown})"
        if isinstance(default, bool):  # --flag and --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=HELP[f.name])  # and --no-...
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", type=TYPES.get(f.name), help=help_text)
        else:
            parser.add_argument(flag, type=TYPES.get(f.name, nonempty), choices=CHOICES.get(f.name), help=help_text)
    return parser


def _same(given: object, stored: object) -> bool:
    """A resume-time setting equals the stored one: equal values, or paths to the same place."""
    if given == stored:
        return True
    if isinstance(given, str) and isinstance(stored, str) and Path(given).exists():
        return Path(given).resolve() == Path(stored).resolve()
    return False


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths absolute, so config.json works for --resume from any working directory."""
    cfg.data = str(Path(cfg.data).resolve())
    if cfg.model not in lite.ARCHS and Path(cfg.model).exists():  # an architecture's name is never a path
        cfg.model = str(Path(cfg.model).resolve())
    cfg.tasks_file = str(Path(cfg.tasks_file).resolve()) if cfg.tasks_file else cfg.tasks_file
    cfg.cache_dir = str(Path(cfg.cache_dir).resolve()) if cfg.cache_dir else cfg.cache_dir
    cfg.out = str(Path(cfg.out).absolute())
    return cfg


def make_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config: flags over defaults, or over the run's own config with --resume. Raises
    ConfigError (or FileNotFoundError) with a user-facing message."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if "tasks" in given:
        given["tasks"] = list(dict.fromkeys(given["tasks"]))  # a task named twice counts once
    if getattr(args, "resume", None):
        cfg = load_run_config(args.resume)
        recover_folder(Path(args.resume) / "last")  # a save interrupted between its two renames
        if not (Path(args.resume) / "last" / TRAINER_STATE).is_file():
            if any((Path(args.resume) / name).exists() for name in ("best", "metrics.csv")):
                raise FileNotFoundError(f"{args.resume}: no last/{TRAINER_STATE} to resume from, though the run "
                                        f"trained (its best/ and metrics.csv are there): it cannot be continued; start a new "
                                        f"run from its best/ with --model {args.resume}/best")
            raise FileNotFoundError(f"{args.resume}: no last/{TRAINER_STATE} to resume from (the run ended before "
                                    f"its first epoch did); start it again with --out {args.resume} --overwrite")
        if "out" in given and not _same(given["out"], args.resume):
            raise ConfigError(f"--resume {args.resume} continues that run in its own folder; leave out --out {given['out']}")
        # --data and --model may name a moved copy when the old local folder is gone; train() checks that the
        # rows are the same, and loading a decoder-only last/ that its base's weights are (other runs' last/
        # holds the whole model: their --model is only a record, kept as it was).
        moved = {k for k in ("data", "model") if k in given and moved_away(getattr(cfg, k))}
        if not decoder_only_file(Path(args.resume) / "last"):
            moved.discard("model")
        fixed = [k for k in FIXED_ON_RESUME if k not in moved]
        if changed := [k for k in fixed if k in given and not _same(given[k], getattr(cfg, k))]:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ConfigError(f"{args.resume}: {flags} cannot change when resuming (the run has "
                              f"{', '.join(f'{k}={getattr(cfg, k)}' for k in changed)}); start a new run instead")
        if changed := [k for k in given if k not in (*FIXED_ON_RESUME, *FREE_ON_RESUME, "out")
                       and not _same(given[k], getattr(cfg, k))]:
            log.warning("resuming %s with %s: the epochs from here on train with %s, and config.json records "
                        "%s for the whole run", args.resume, ", ".join(f"--{k.replace('_', '-')} {given[k]}"
                                                                    f" (was {getattr(cfg, k)})" for k in changed),
                        "it" if len(changed) == 1 else "them", "it" if len(changed) == 1 else "them")
        cfg.out = args.resume
        return _absolute_paths(dataclasses.replace(cfg, **{k: v for k, v in given.items() if k != "out"}))
    cfg = TrainConfig(**given)
    cfg.model = resolve_model_arg(given.get("model"))
    cfg.out = cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    _absolute_paths(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if any((out / name).exists() for name in ("config.json", "best", "last")):
        if not getattr(args, "overwrite", False):
            raise ConfigError(f"--out {out} already holds a run; continue it with --resume {out}, pick another "
                              "--out, or pass --overwrite to replace it")
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is a folder that holds other files, not a training run; pick a new or "
                          "empty folder")
    return cfg


def check_config(cfg: TrainConfig) -> str | None:
    """A message when the settings cannot work together (ranges are argparse's: ``TYPES``), else None."""
    if cfg.bce_weight + cfg.dice_weight == 0:
        return "--bce-weight and --dice-weight are both 0: nothing to train on"
    try:
        table = load_tasks(cfg.tasks_file)
    except TaskTableError as err:
        return str(err)
    if unknown := [name for name in cfg.tasks if name not in table]:
        return f"unknown task(s) {', '.join(unknown)}; known: {', '.join(table)}"
    return check_device(cfg.device)


def main(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(getattr(args, "quiet", False) or rank != 0)
    try:
        cfg = make_config(args)
    except (FileNotFoundError, ConfigError) as err:
        return fail(str(err))
    except OSError as err:  # e.g. putting back last/ in a read-only run folder
        return fail(f"cannot prepare the run: {os_reason(err)}")
    if message := check_config(cfg):
        return fail(message)
    if rank == 0:
        log.info("run %s", cfg.out)
        for key, value in dataclasses.asdict(cfg).items():
            log.info("  %-20s %s", key, value)
    try:
        train(cfg, resume=bool(getattr(args, "resume", None)), stop_after=getattr(args, "stop_after", None))
    except HubUnreachableError as err:
        return fail(f"{err} To train without pretrained weights, from scratch: --model lite-ctx (LiteSeg).")
    except (ModelLoadError, DataError, TaskTableError, FloatingPointError, ConfigError) as err:
        return fail(str(err))
    except (FileNotFoundError, ImageReadError) as err:  # a file named in a manifest
        return fail(f"{err}; re-run preprocess_masks.py if the data moved")
    except OSError as err:  # disk full, no permission, ...
        return fail(f"cannot write the run {cfg.out}: {os_reason(err)}")
    except RuntimeError as err:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise  # e.g. out of memory: the traceback is the useful report
        # Under torchrun: the process group broke because another process failed (and said why).
        return fail(f"process {rank}: stopped, another process of the run failed ({str(err).splitlines()[0][:200]})")
    return 0


if __name__ == "__main__":
    run(main, build_parser())
