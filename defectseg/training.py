"""The training loop: CLIPSeg's decoder on cached vision activations, validated through the one
inference path, with honest model selection and exact resume.

Read top to bottom: ``TrainConfig`` (every flag of train.py), ``train`` (set-up, cache, loop,
validation, checkpoints), then the small helpers it calls.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
import multiprocessing
import os
import random
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import cli, evaluation
from .augment import ImageBank
from .cli import stop_if_terminated
from .data import (
    DataError,
    Sample,
    batch_targets,
    epoch_length,
    epoch_plan,
    holdout_split,
    load_rows,
    load_targets,
    rows_fingerprint,
    use_table_prompts,
)
from .features import FeatureCache, model_fingerprint, view_of
from .graphs import StepGraphs
from .inference import Segmenter, autocast, precision_name, resolve_device, resolve_precision
from .io import (
    cores_per_process,
    in_processes,
    load_image,
    prefetched,
    read_mask_png,
    remove_folder,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from .losses import segmentation_loss
from .metrics import default_thresholds
from .model import (
    DECODER_FILE,
    METADATA_FILE,
    base_fingerprint,
    base_model_ref,
    count_parameters,
    decode,
    decoder_only_file,
    encode_images,
    load_model,
    new_model,
    read_metadata,
    save_checkpoint,
    save_decoder,
    trains_from_scratch,
    used_vision_layers,
)
from .tasks import Task, load_tasks, tasks_to_dict

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
CHECK_EVERY = 50  # training steps between reads of the device's losses and skip flags
LOVASZ_POOL = 2  # the Lovasz term sorts 2x2-averaged logits: LiteSeg's stride-2 head grid, a quarter of the sort
SIZE_STREAM = 1  # keeps the per-batch size draw apart from the per-sample augmentation streams
_TOKENIZER_LOCK = threading.Lock()  # the prefetch threads' prompt tokenizing, one at a time

# Settings a resumed run must keep: they decide the model, the data or the parameters being trained. The
# data and the task table may move (another --data or --tasks-file): train() checks their contents.
FIXED_ON_RESUME = ("data", "model", "tasks", "train_vision_layers", "batch_size", "holdout", "seed")
# Settings a resumed run may change without a word from train.py: the schedule's (a warning of their own
# names them), where and how fast it runs, when it stops, and files checked by content. Other changes (the
# loss, the augmentation, ...) are warned about: config.json then records them for the whole run.
FREE_ON_RESUME = ("epochs", "lr", "warmup", "device", "precision", "cache_dir", "tasks_file", "patience",
                  "val_batch_size", "augment_workers", "cuda_graphs")


def moved_away(path: object) -> bool:
    """Whether a run's stored local path (absolute, see ``train.py``) is gone: --resume may then name a moved
    copy (of the data, or of a base model), checked by content rather than by path."""
    return isinstance(path, str) and Path(path).is_absolute() and not Path(path).exists()


class ConfigError(ValueError):
    """A training setting that cannot work with this model or data."""



@dataclass
class TrainConfig:
    data: str = "processed_dataset"
    out: str = ""  # runs/<name>; filled in by train.py when empty
    model: str = "CIDAS/clipseg-rd64-refined"
    tasks: list[str] = field(default_factory=lambda: ["cracks", "drywall"])
    tasks_file: str | None = None
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05  # fraction of all steps with linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off)
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    lovasz_weight: float = 1.0
    lovasz_epochs: int = 0  # the last N epochs add lovasz_weight * the Lovasz hinge to the loss (0: none)
    negative_prob: float = 0.2
    flip: bool = True
    synonyms: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    cache: bool = True
    cache_dir: str = ""  # default <data>/features
    cache_dtype: str = "fp16"
    train_vision_layers: int = 0
    vision_lr_scale: float = 0.1  # learning-rate multiplier for the unfrozen vision layers
    patience: int = 5  # stop after this many epochs without a better validation score (0: never)
    holdout: float = 0.0  # fraction of train photos set aside to pick best/ and tune thresholds (0: valid does)
    low_res_epochs: int = 0  # a model trained from scratch: the first N epochs at low_res_size (progressive resizing)
    low_res_size: int = 320
    train_sizes: list[int] = field(default_factory=list)  # from scratch: each batch's side drawn from these (after the low-res epochs)
    val_batch_size: int = 16
    validate_low_res: bool = False  # also validate the low_res_epochs (off: only epochs at the input size, and the last)
    augment_workers: int = 0  # from scratch: augment batches in N forked processes (0: threads on a GPU, between steps on a CPU)
    cuda_graphs: bool = False  # a model trained from scratch on one GPU (not fp16): each step shape recorded once, replayed


class TrainForward(nn.Module):
    """Everything that carries gradients in one module, so DistributedDataParallel can wrap it.

    Three ways in: cached activations (the fast path); pixel values through our own truncated
    vision forward (``--train-vision-layers``); or HF's own forward with input ids (``--no-cache``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, cond=None, activations=None, pixel_values=None, input_ids=None, attention_mask=None):
        if input_ids is not None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        if activations is None:
            activations = encode_images(self.model, pixel_values)
        return decode(self.model, activations, cond)


@dataclass
class Run:
    """One training run's pieces, built by ``_set_up``; the epoch functions read them and update
    ``history``, ``best`` and ``ema``."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    tasks: list[Task]
    train_rows: list[dict]
    select_rows: list[dict]
    select_masks: list[np.ndarray]
    select_images: list[np.ndarray] | None  # from scratch, in the process that validates: decoded once, not every epoch
    other_prompts: dict[str, str] | None  # task -> the prompt scored on its images for text sensitivity
    identity: dict  # what a resumed run must find unchanged (``_check_same_run``)
    model: nn.Module
    processor: object
    segmenter: Segmenter
    trainable: list[nn.Parameter]
    cond_table: dict[str, torch.Tensor]
    cache: FeatureCache | None  # CLIPSeg's vision activations
    bank: ImageBank | None  # a model trained from scratch: decoded images, augmented per sample
    targets: np.ndarray | None  # else: fixed (N, S, S) targets
    forward: nn.Module  # TrainForward, wrapped in DDP with several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    schedule: dict
    ema: list[torch.Tensor] | None = None
    graphs: StepGraphs | None = None  # --cuda-graphs where it applies (``_uses_graphs``)
    lrs: list[torch.Tensor] = field(default_factory=list)  # with graphs: each group's learning rate on the device
    base: str = ""  # the base model its checkpoints record (``_run_base``)
    base_fingerprint: str | None = None  # a decoder-only run's, for its decoder files (the base is frozen)
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"score": -1.0, "epoch": 0, "bad_epochs": 0})
    start_epoch: int = 0

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def averaged(self) -> list[torch.Tensor]:
        """What --ema averages: the trainable weights and the float buffers (LiteSeg's batch-norm running
        statistics, which the forward passes update; CLIPSeg has none), so the EMA weights come with
        statistics that approximately match them (their average, not statistics recomputed for the
        averaged weights)."""
        return [*self.trainable, *(b for b in self.model.buffers() if b.is_floating_point())]


@dataclass
class EpochStats:
    loss: float  # mean training loss over the steps taken, all processes
    samples: int  # samples drawn this epoch, all processes
    seconds: float
    lr: float  # the decoder's learning rate at the epoch's last step
    skipped: int  # steps skipped for a non-finite loss
    overflowed: int  # steps fp16's loss scaler skipped


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train; returns the run summary (also in ``<out>/summary.json``).

    Set up (data, model, feature cache or image bank, optimizer; last/ restored with ``resume``), then
    per epoch one pass of training steps and, on the main process, validation and the checkpoints.
    stop_after: end this invocation after that many epochs (continue later with ``resume``); the
    schedule still spans ``cfg.epochs``, so the resumed run matches a straight one exactly.
    """
    run = _set_up(cfg, resume)
    for epoch in range(run.start_epoch, _end_epoch(run, stop_after)):
        t0 = time.perf_counter()
        stats = _train_epoch(run, epoch)
        stop = _validate_and_save(run, epoch, stats, t0) if run.main_process else False
        if _broadcast_flag(stop, run.world):
            break
    summary = {}
    if run.main_process:
        summary = _write_summary(run.out, run.best, run.history)
        if run.best["epoch"]:
            log.info("best mean IoU %.4f at epoch %d -> %s", run.best["score"], run.best["epoch"], run.out / "best")
        else:
            log.info("no epoch validated yet, so no best/ (--resume %s goes on)", run.out)
    _barrier(run.world)
    if run.world > 1:
        dist.destroy_process_group()
    return summary


def _set_up(cfg: TrainConfig, resume: bool) -> Run:
    """Everything the loop needs, in an order that keeps same seed, same numbers; with ``resume`` the
    run's last/ (weights and trainer state) after checking it is the same run."""
    rank, world = _init_distributed(cfg.device)
    device = _device_for_rank(cfg.device, rank, world)
    _seed_everything(cfg.seed)
    out = Path(cfg.out)
    table = load_tasks(cfg.tasks_file)
    tasks = [table[name] for name in cfg.tasks]
    train_rows, select_rows, identity = _load_data(cfg, tasks, rank == 0)
    state = _load_trainer_state(out / "last" / TRAINER_STATE) if resume else None
    if state is not None:
        _check_same_run(state, identity, cfg, out)
    fresh = None if resume else new_model(cfg.model, cfg.seed)
    base = _run_base(cfg, out, state)
    model, processor = fresh or (load_model(out / "last", device, base_model=base) if resume
                                 else load_model(cfg.model, device))
    model.to(device)
    decoder_only = cfg.train_vision_layers == 0 and not trains_from_scratch(model)  # a decoder on a frozen base
    if decoder_only:
        # last/ names its base by path: it must still be that model (load_model checks it too, for decoder
        # files that record base_fingerprint)
        identity["base"] = model_fingerprint(model)
        if state is not None and state.get("base", identity["base"]) != identity["base"]:
            raise ConfigError(f"{out}: the base model {base} is not the one this run's decoder was trained on "
                              "(its vision weights changed since); restore that model or start a new run")
    amp_dtype = resolve_precision(cfg.precision, device, model)
    trainable = _set_trainable(model, cfg.train_vision_layers)
    segmenter = Segmenter(model, processor, device, amp_dtype, tasks=table)
    prompts = sorted({p for t in tasks for p in t.prompts})
    # a frozen text encoder's answers, computed once (LiteSeg trains its prompt encoder: it reads input_ids)
    cond_table = {} if trains_from_scratch(model) else dict(zip(prompts, segmenter.conditioning(prompts)))
    cache, bank, targets = _training_inputs(cfg, segmenter, train_rows, select_rows, rank, world)

    forward = TrainForward(model)
    if world > 1:
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    graphs = _uses_graphs(cfg, device, world, amp_dtype, bank is not None)
    optimizer = torch.optim.AdamW(_param_groups(model, trainable, cfg), fused=device.type == "cuda" or None,
                                  capturable=graphs)
    steps_per_epoch = math.ceil(math.ceil(epoch_length(train_rows, tasks) / world) / cfg.batch_size)
    schedule = {"epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch, "lr": cfg.lr, "warmup": cfg.warmup,
                "vision_lr_scale": cfg.vision_lr_scale, "weight_decay": cfg.weight_decay}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup, steps_per_epoch * cfg.epochs))
    run = Run(cfg=cfg, out=out, rank=rank, world=world, device=device, tasks=tasks, train_rows=train_rows,
              select_rows=select_rows, select_masks=_read_all(read_mask_png, select_rows, "mask", world),
              select_images=_read_all(load_image, select_rows, "image", world) if bank is not None and rank == 0 else None,
              other_prompts=evaluation.other_task_prompts({t.name: t.prompt for t in tasks}), identity=identity,
              model=model, processor=processor, segmenter=segmenter, trainable=trainable, cond_table=cond_table,
              cache=cache, bank=bank, targets=targets, forward=forward, optimizer=optimizer, scheduler=scheduler,
              scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), schedule=schedule,
              base=base,
              base_fingerprint=base_fingerprint(model) if decoder_only else None)
    if cfg.ema > 0:
        run.ema = [t.detach().clone() for t in run.averaged]
    if graphs:
        run.graphs = StepGraphs()
        _lrs_on_device(run)
    if state is not None:
        _restore(run, state)
    if run.main_process:
        _announce(run, resume)
    return run


def _load_data(cfg: TrainConfig, tasks: list[Task], main_process: bool) -> tuple[list[dict], list[dict], dict]:
    """(train rows, selection rows, identity): the rows that pick best/ and tune its thresholds are the
    valid split's, or with ``holdout`` train photos set aside (then valid stays a clean report)."""
    train_rows = load_rows(cfg.data, "train", cfg.tasks)
    try:
        valid_rows = load_rows(cfg.data, "valid", cfg.tasks, require_all=False)
    except DataError as err:
        if cfg.holdout == 0:
            raise DataError(f"{err}; or, without a valid split, pass --holdout 0.1 to pick best/ on train photos "
                            "set aside") from None
        valid_rows = []  # best/ is picked on train photos set aside: a valid split is not needed
    notes = use_table_prompts(train_rows + valid_rows, tasks)
    # What a resumed run must find unchanged: the rows of both splits and the task table.
    identity = {"data": {"train": rows_fingerprint(train_rows), "valid": rows_fingerprint(valid_rows)},
                "tasks": {t.name: [t.prompt, *t.synonyms] for t in tasks},  # what training asks with
                "config": {k: getattr(cfg, k) for k in FIXED_ON_RESUME if k != "data"}}  # data: its rows, above
    if cfg.holdout > 0:
        train_rows, select_rows = holdout_split(train_rows, cfg.holdout, cfg.seed)
        if not select_rows:
            raise DataError(f"--holdout {cfg.holdout:g} sets no photo aside: every task of {cfg.data} has a "
                            "single source photo in train; use the valid split (no --holdout) or more photos")
        identity["data"]["holdout"] = rows_fingerprint(select_rows)  # drawn with the seed: fixed on resume
    else:
        select_rows = valid_rows
    if main_process:
        for note in notes:
            log.warning("%s", note)
        for task in tasks:
            if not any(r["task"] == task.name for r in select_rows):
                log.warning("task %s has no images in %s: it trains but is not validated", task.name,
                            selection_split(cfg.holdout))
    return train_rows, select_rows, identity


def _training_inputs(cfg: TrainConfig, segmenter: Segmenter, train_rows: list[dict], select_rows: list[dict],
                     rank: int, world: int) -> tuple[FeatureCache | None, ImageBank | None, np.ndarray | None]:
    """(cache, bank, targets). CLIPSeg with a frozen vision tower: its activations cached once per image
    and view; from scratch: images decoded once into memory and augmented per sample; else fixed targets."""
    scratch = trains_from_scratch(segmenter.model)
    resized = [flag for flag, on in (("--low-res-epochs", cfg.low_res_epochs), ("--train-sizes", cfg.train_sizes)) if on]
    if resized and not scratch:
        raise ConfigError(f"{resized[0]}: only a model trained from scratch (--model lite ...) trains at another "
                          "size; CLIPSeg's inputs are fixed by its vision tower")
    # Multiples of 32 (the encoder halves the side 5 times), from 64: at 32 px its last features are 1 x 1,
    # which batch norm cannot train on in a batch of one image.
    if cfg.low_res_epochs and (cfg.low_res_size % 32 or not 64 <= cfg.low_res_size < segmenter.input_size):
        raise ConfigError(f"--low-res-size {cfg.low_res_size}: must be a multiple of 32, from 64 to below the "
                          f"model's input size ({segmenter.input_size})")
    if cfg.augment_workers and not scratch:
        raise ConfigError("--augment-workers: only a model trained from scratch (--model lite ...) augments its "
                          "batches; CLIPSeg's come from the feature cache")
    if cfg.augment_workers and "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigError("--augment-workers needs the fork start method (Linux, macOS); leave it at 0 here")
    if any(size % 32 or size < 64 for size in cfg.train_sizes):
        raise ConfigError(f"--train-sizes {' '.join(map(str, cfg.train_sizes))}: each must be a multiple of 32, "
                          "at least 64")
    cache = None
    if cfg.cache and cfg.train_vision_layers == 0 and not scratch:
        cache = FeatureCache.for_segmenter(cfg.cache_dir or Path(cfg.data) / "features", segmenter, cfg.cache_dtype)
        views = (0, 1) if cfg.flip else (0,)
        t0 = time.perf_counter()
        built = cache.build([r["image"] for r in train_rows], views, segmenter.encode, segmenter.pixel_values,
                            cfg.val_batch_size, "features train", (rank, world))
        built += cache.build([r["image"] for r in select_rows], (0,), segmenter.encode, segmenter.pixel_values,
                             cfg.val_batch_size, "features selection", (rank, world))
        _barrier(world)
        if rank == 0:
            log.info("feature cache %s: %d new entries in %.1f s", cache.dir, built, time.perf_counter() - t0)
    bank = ImageBank.from_rows(train_rows, cfg.flip, progress=rank == 0, world=world) if scratch else None
    targets = None if scratch else load_targets(train_rows, segmenter.input_size)
    return cache, bank, targets


def _restore(run: Run, state: dict) -> None:
    """Continue from last/'s trainer state: optimizer moments, schedule position, scaler, EMA and live
    weights, history, best, RNG. Learning rate, weight decay and schedule come from this invocation."""
    # This invocation's base LRs: a group's "lr" already holds the schedule's first factor (1 / warm-up steps)
    settings = [(lr, g["weight_decay"]) for lr, g in zip(run.scheduler.base_lrs, run.optimizer.param_groups)]
    for group in state["optimizer"]["param_groups"]:  # the implementation is this device's (fused on CUDA)
        group.update({k: run.optimizer.defaults[k] for k in ("fused", "foreach", "capturable")})
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # other parameter groups: --train-vision-layers changed, or an older run
        raise ConfigError(f"{run.out}: its optimizer state does not fit this run's settings ({err}); "
                          "resume with the settings it was started with, or start a new run") from err
    scheduler, lr_factor = run.scheduler, run.scheduler.lr_lambdas[0]
    scheduler.load_state_dict(state["scheduler"])
    # Moments and step count come from the state; lr, weight decay and schedule from this invocation
    # (identical when nothing changed, so a resumed run still equals a straight one).
    scheduler.base_lrs = [lr for lr, _ in settings]
    for group, (lr, decay) in zip(run.optimizer.param_groups, settings):
        group.update(initial_lr=lr, weight_decay=decay, lr=lr * lr_factor(scheduler.last_epoch))
    if run.graphs is not None:
        _lrs_on_device(run)
    if run.main_process and state.get("schedule", run.schedule) != run.schedule:
        log.warning("resuming with another schedule (%s, was %s): the learning rate continues from "
                    "step %d of the new one", run.schedule, state["schedule"], scheduler.last_epoch)
    if run.scaler.is_enabled() and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])  # else the run changed precision: fp16 gets a fresh scaler
    averaged = run.averaged
    for key in ("ema", "live"):
        if state.get(key) is not None and len(state[key]) != len(averaged):
            raise ConfigError(f"{run.out}: its EMA state ({key}) holds {len(state[key])} tensors, this model "
                              f"averages {len(averaged)}; resume it with the version of train.py that started it")
    if run.ema is not None and state.get("ema") is not None:
        run.ema = [t.to(run.device) for t in state["ema"]]
    if state.get("live") is not None:  # last/ holds the EMA weights; training goes on from the live ones
        with torch.no_grad():
            for p, live in zip(averaged, state["live"]):
                p.copy_(live.to(run.device))
    run.history, run.best, run.start_epoch = state["history"], state["best"], state["epoch"]
    if run.start_epoch > run.cfg.epochs:
        raise ConfigError(f"{run.out}: --epochs {run.cfg.epochs} is fewer than the {run.start_epoch} epochs the run "
                          f"has done; give --epochs {run.start_epoch} or more")
    _set_rng_state(state["rng"])
    if run.main_process:
        log.info("resumed %s after epoch %d (best %.4f at epoch %d)", run.out, run.start_epoch, run.best["score"],
                 run.best["epoch"])
        before = {k: run.history[-1].get(k) for k in ("device", "precision")} if run.history else {}
        now = _where(run)
        if before.get("precision") and before != now:  # rows of older versions record neither
            log.warning("%s: its last epoch trained on %s in %s, this one trains on %s in %s (--precision %s); "
                        "the epochs' numbers may differ for that", run.out, before["device"], before["precision"],
                        now["device"], now["precision"], run.cfg.precision)


def _where(run: Run) -> dict[str, str]:
    """The device type and the precision ``--precision`` resolved to, as metrics.csv records them per epoch."""
    return {"device": run.device.type, "precision": precision_name(run.segmenter.amp_dtype)}


def _announce(run: Run, resume: bool) -> None:
    """Log what trains on what, and (now that data, model and any resumed state fit together) clear the
    files of a run this one replaces and write config.json."""
    cfg, out = run.cfg, run.out
    kind = ("cached features" if run.cache is not None else "every weight, images augmented in memory" if run.bank is not None
            else "plain HF forward" if cfg.train_vision_layers == 0
            else f"last {cfg.train_vision_layers} vision layers unfrozen")
    log.info("training %s parameters of %s (%s) on %s (%s%s)%s, %d train images, %d steps per epoch; best/ picked on %s",
             f"{sum(p.numel() for p in run.trainable):,}", f"{count_parameters(run.model):,}", kind, run.device,
             _where(run)["precision"], ", CUDA graphs" if run.graphs is not None else "",
             f" x{run.world} processes" if run.world > 1 else "", len(run.train_rows),
             run.schedule["steps_per_epoch"], selection_split(cfg.holdout, len(run.select_rows)))
    if not resume:  # train.py --overwrite: nothing of the run this one replaces may be mistaken for it
        replaced = any((out / name).exists() for name in ("best", "last", "metrics.csv"))
        for name in ("best", "last"):  # with the copies its swaps set aside: a later load could restore one
            remove_folder(out / name)
        for name in ("metrics.csv", "curves.png", "summary.json"):
            (out / name).unlink(missing_ok=True)
        others = sorted(p.name for p in out.iterdir() if p.name != "config.json") if replaced else []
        if others:  # e.g. report/, predictions/: not removed, they are not train.py's
            log.warning("%s still holds %s, which train.py did not write: made from the run this one replaces, "
                        "they describe that run, not this one", out, ", ".join(others))
    if not resume or (not _stopped_early(run) and run.start_epoch < cfg.epochs):  # a resume training nothing
        write_json_atomic(out / "config.json", asdict(cfg))  # leaves config.json as it was


def _stopped_early(run: Run) -> bool:
    """Whether --patience ended the run (a resumed run then trains nothing unless given a larger one)."""
    return run.cfg.patience > 0 and run.best["bad_epochs"] >= run.cfg.patience


def _end_epoch(run: Run, stop_after: int | None) -> int:
    """The epoch this invocation stops before: --epochs, or sooner with --stop-after, or at once for a
    resumed run that had stopped early."""
    if _stopped_early(run):
        if run.main_process:
            log.info("the run stopped early after epoch %d; nothing to do (a larger --patience continues it)",
                     run.start_epoch)
        return run.start_epoch
    if run.start_epoch >= run.cfg.epochs and run.main_process:
        log.info("the run has done its %d epochs; nothing to do (a larger --epochs continues it)", run.cfg.epochs)
    return run.cfg.epochs if stop_after is None else min(run.cfg.epochs, run.start_epoch + stop_after)


def _train_epoch(run: Run, epoch: int) -> EpochStats:
    """One pass over this process's share of the epoch's plan: a step per batch, batches prepared in a
    prefetch thread. The steps' losses and skips stay on the device and are read every ``CHECK_EVERY``
    steps (a GPU is never stalled by a per-step read). Raises FloatingPointError when the steps or the
    weights went non-finite."""
    cfg, t0 = run.cfg, time.perf_counter()
    plan = _shard(epoch_plan(run.train_rows, run.tasks, cfg.seed, epoch, cfg.negative_prob, cfg.flip, cfg.synonyms),
                  run.rank, run.world)
    run.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    counts = torch.zeros(2, dtype=torch.int64, device=run.device)  # steps taken, fp16 overflows (skips: _report_skips)
    pending: list[tuple[list[Sample], torch.Tensor, torch.Tensor]] = []  # (batch, loss, skipped) since the last read
    skipped, lr_used = 0, _current_lr(run)
    batches = [(i, plan[i:i + cfg.batch_size]) for i in range(0, len(plan), cfg.batch_size)]
    load = partial(_load_batch, cfg=cfg, rows=run.train_rows, targets=run.targets, cache=run.cache,
                   segmenter=run.segmenter, bank=run.bank, epoch=epoch * run.world + run.rank,
                   size=partial(train_size, cfg, epoch, run.segmenter.input_size))
    lovasz = lovasz_weight_in(cfg, epoch)
    if cfg.augment_workers:
        source = in_processes(load, batches, cfg.augment_workers)
    else:
        source = prefetched(load, batches, loader_threads(run.device, run.bank is not None, run.world))
    for (_, batch), (target, inputs) in cli.progress(source, total=len(batches), unit="batch",
                                                     desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=run.main_process):
        stop_if_terminated()
        lr_used = _current_lr(run)
        loss, skip, overflow = _step(run, batch, target, inputs, lovasz_weight=lovasz)
        loss_sum += torch.where(skip, 0.0, loss.double())
        counts += torch.stack([~skip, overflow]).long()
        pending.append((batch, loss, skip))
        if len(pending) == CHECK_EVERY:
            skipped += _report_skips(run, epoch, pending)
            pending = []
            _check_skips(skipped, len(batches), epoch, done=False)
    skipped += _report_skips(run, epoch, pending)
    _check_skips(skipped, len(batches), epoch, done=True)
    seconds = time.perf_counter() - t0
    steps, overflowed = counts.tolist()
    if not all(torch.isfinite(t).all() for t in [*run.averaged, *(run.ema or [])]):  # DDP keeps them identical
        raise FloatingPointError(f"epoch {epoch + 1}: the weights became non-finite (a step with a finite loss "
                                 "can still overflow them); lower --lr or use --precision fp32. best/ and "
                                 "last/ keep the previous epoch's")
    return EpochStats(_mean_across(loss_sum, steps, run.world), len(plan) * run.world, seconds, lr_used, skipped,
                      overflowed)


def _check_skips(skipped: int, steps: int, epoch: int, done: bool) -> None:
    """Stop a run that cannot train: more than 10 skipped steps in an epoch, or (at its end) more than
    half of them. Every process skipped the same steps, so all stop together."""
    if skipped > 10 or (done and skipped > steps // 2):
        raise FloatingPointError(f"epoch {epoch + 1}: {skipped} of {steps} steps skipped for a non-finite loss or "
                                 "gradients; lower --lr or the loss weights, or use --precision fp32. best/ and "
                                 "last/ keep the previous epoch's")


def _report_skips(run: Run, epoch: int, pending: list[tuple[list[Sample], torch.Tensor, torch.Tensor]]) -> int:
    """Read the pending steps' losses and skip flags (one device read), log each skipped step's images,
    and return how many were skipped."""
    if not pending:
        return 0
    flags = torch.stack([torch.stack([loss.float(), skip.float()]) for _, loss, skip in pending]).tolist()
    bad = [(batch, loss) for (batch, _, _), (loss, skip) in zip(pending, flags) if skip]
    for batch, loss in bad:
        log.error("epoch %d: non-finite loss or gradients (loss %s) on images %s; step skipped", epoch + 1, loss,
                  [Path(run.train_rows[s.row]["image"]).name for s in batch][:4])
    return len(bad)


def _step(run: Run, batch: list[Sample], target: torch.Tensor, inputs: dict,
          lovasz_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch (``_update``, replayed as a CUDA graph with ``run.graphs``), then
    the schedule and the EMA, with no read of a device value. Returns 0-d device tensors: the loss;
    whether the step was skipped for a non-finite loss (on any process) or non-finite gradients; whether
    it was skipped for fp16's overflow instead (a finite loss: the scaler lowers its scale and training
    goes on). The learning-rate schedule counts batches, skipped or not."""
    device = run.device
    target = target.to(device, non_blocking=True)
    inputs = {k: [t.to(device, non_blocking=True) for t in v] if isinstance(v, list)
              else v.to(device, non_blocking=True) for k, v in inputs.items()}
    if "input_ids" not in inputs:
        inputs["cond"] = torch.stack([run.cond_table[s.prompt] for s in batch]).to(device)
    update = partial(_update, run, lovasz_weight=lovasz_weight)
    if run.graphs is not None:  # one graph per image size: prompts padded to one length (padding changes nothing)
        inputs = _padded_prompts(inputs, run.processor.tokenizer.max_length)
        key = (lovasz_weight, tuple(target.shape), *(tuple(t.shape) for t in inputs.values()))
        loss, bad, overflow = run.graphs(key, update, target=target, **inputs)
    else:
        loss, bad, overflow = update(target=target, **inputs)
    run.scaler.update()
    run.scheduler.step()
    if run.graphs is not None:
        _lrs_on_device(run)
    if run.ema is not None:
        ema_update(run.ema, run.averaged, ema_decay(run.cfg.ema, run.scheduler.last_epoch), bad | overflow)
    return loss, bad, overflow


def _update(run: Run, target: torch.Tensor, lovasz_weight: float = 0.0,
            **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, loss (with the Lovasz term at ``lovasz_weight``), backward, clip and optimizer step on
    device tensors, reading nothing back (so it can be recorded as a CUDA graph): ``_step``'s returns.

    The skip is decided on the gradient norm, which DistributedDataParallel makes identical on every
    process, and on the loss being finite on every process (an all-reduce queued on the device), so all
    skip together. Fused AdamW (CUDA) skips on the device, given the flag as ``found_inf``
    as GradScaler does; elsewhere the flag is read, which on a CPU waits for nothing."""
    cfg = run.cfg
    with autocast(run.device, run.segmenter.amp_dtype, cache=run.graphs is None):
        logits = run.forward(**inputs)
    loss = segmentation_loss(at_target_size(logits, target), target, cfg.bce_weight, cfg.dice_weight,
                             lovasz_weight, lovasz_pool=LOVASZ_POOL).mean()
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)  # fp16: true-scale gradients, the overflow recorded for update(); else nothing
    norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip or math.inf)
    finite_loss = _all_finite(loss.detach(), run.world)
    bad = ~torch.isfinite(norm) | ~finite_loss
    _step_unless(run.optimizer, bad)
    overflow = bad & finite_loss if run.scaler.is_enabled() else torch.zeros_like(bad)
    return loss.detach(), bad & ~overflow, overflow


def _uses_graphs(cfg: TrainConfig, device: torch.device, world: int, amp_dtype: torch.dtype | None,
                 scratch: bool) -> bool:
    """Whether the training step is replayed as a CUDA graph (``StepGraphs``): ``--cuda-graphs`` (off by
    default until tests/test_cuda.py's single-step check has passed on a GPU), a model trained from scratch
    (its small kernels cost less to run than to launch one by one), one process on a GPU, and no fp16 (its
    loss scaler decides on the host)."""
    return cfg.cuda_graphs and scratch and device.type == "cuda" and world == 1 and amp_dtype != torch.float16


def _lrs_on_device(run: Run) -> None:
    """Each group's learning rate in a 0-d tensor on the device (``run.lrs``, the same tensors for the
    whole run), so a recorded optimizer step reads the current rate: recent torch schedulers fill such a
    tensor in place; where one puts a float in its place, its value is copied in and the tensor put back."""
    if not run.lrs:
        run.lrs = [torch.zeros((), device=run.device) for _ in run.optimizer.param_groups]
    for group, tensor in zip(run.optimizer.param_groups, run.lrs):
        if group["lr"] is not tensor:
            tensor.fill_(group["lr"])
            group["lr"] = tensor


def _padded_prompts(inputs: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded with zeros to ``length`` tokens: LiteSeg's prompt
    encoder zeroes padded positions after each layer and pools over the mask, so it gives the same values."""
    pad = length - inputs["input_ids"].shape[1]
    if pad <= 0:
        return inputs
    return {k: F.pad(v, (0, pad)) if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}


def _current_lr(run: Run) -> float:
    """The first group's learning rate now (the schedule's, read without touching the device)."""
    return run.scheduler.base_lrs[0] * run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)


def _step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` that changes nothing (weights, moments, step count) when the 0-d bool ``bad``
    is set: decided on the device by a fused optimizer (its kernels take the flag as ``found_inf``, as
    GradScaler passes it); else the flag is read and a bad step's gradients dropped, which AdamW skips."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    if bad.item():
        optimizer.zero_grad(set_to_none=True)
    optimizer.step()  # called either way, so the schedule never steps before it (torch warns)


def _validate_and_save(run: Run, epoch: int, stats: EpochStats, t0: float) -> bool:
    """Main process: score the selection rows, save best/ (when the score improved) and last/, write
    metrics.csv, curves.png and summary.json. Validation and both checkpoints see the same weights (the
    EMA ones with --ema), so a checkpoint's metadata describes the weights beside it; last/ also keeps
    the live weights in its trainer state. Returns whether --patience ends the run."""
    cfg, best = run.cfg, run.best
    live = [t.detach().clone() for t in run.averaged] if run.ema is not None else None
    with _swapped(run.averaged, run.ema):
        agg = None
        if validated(cfg, epoch):
            agg = validate(run.segmenter, run.select_rows, run.select_masks, run.cache, run.other_prompts,
                           cfg.val_batch_size, run.select_images)
        row = _history_row(epoch + 1, stats.loss, agg, stats.lr, stats.seconds, time.perf_counter() - t0,
                           stats.samples / stats.seconds, stats.skipped, stats.overflowed)
        row.update(_where(run))
        run.history.append(row)
        score = selection_score(agg) if agg is not None else None
        improved = score is not None and score > best["score"]
        if improved:
            best.update(score=score, epoch=epoch + 1, bad_epochs=0)
            _save(run, run.out / "best", agg, epoch + 1, state=None)
        elif score is not None:
            best["bad_epochs"] += 1
        _save(run, run.out / "last", agg, epoch + 1, state={
            "epoch": epoch + 1, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "ema": run.ema, "live": live, "history": run.history, "best": best,
            "rng": _rng_state(), "schedule": run.schedule, **run.identity})
    _write_history(run.out, run.history)
    _write_summary(run.out, best, run.history)
    if score is None:
        log.info("epoch %d/%d  loss %.4f  (%.1f s, %.0f samples/s; a low-res epoch: not validated, last/ saved)",
                 epoch + 1, cfg.epochs, stats.loss, row["seconds"], row["samples_per_s"])
    else:
        log.info("epoch %d/%d  loss %.4f  tuned IoU %s  mean %.4f%s  (%.1f s, %.0f samples/s)", epoch + 1, cfg.epochs,
                 stats.loss, "  ".join(f"{name} {m.get('best_iou', m['iou']):.4f}" for name, m in agg["tasks"].items()),
                 score, "  *best*" if improved else "", row["seconds"], row["samples_per_s"])
    if _stopped_early(run):
        log.info("early stop: no better validation score for %d epochs", cfg.patience)
        return True
    return False


def _run_base(cfg: TrainConfig, out: Path, state: dict | None) -> str:
    """The base model a run's checkpoints record: --model's at the start; on resume the one last/ records
    (--model may name another run's checkpoint, retrained since), or the moved copy --model names when the
    run's own is gone (train.py allows that change only then). Raises ConfigError, with that way out, when a
    decoder-only run's base is gone."""
    if state is None or state.get("config", {}).get("model", cfg.model) != cfg.model:
        return base_model_ref(cfg.model)
    base = read_metadata(out / "last").get("base_model") or base_model_ref(cfg.model)
    if decoder_only_file(out / "last") and moved_away(base):
        raise ConfigError(f"{out}: the base model {base} its decoder was trained on is gone; if it moved, resume "
                          "with --model <its new place>")
    return base


def _check_same_run(state: dict, identity: dict, cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume when the data's rows or the task table differ from the run's (a run's metrics and
    its best/ are only comparable over the same data; a moved copy of the data is the same data)."""
    for split, fingerprint in identity["data"].items():
        if split == "holdout" and state.get("data", {}).get(split, fingerprint) != fingerprint:
            raise ConfigError(f"{out}: the photos --holdout sets aside differ from the run's (they are drawn with "
                              "--seed); resume with the run's seed, in its config.json, or start a new run")
        if state.get("data", {}).get(split, fingerprint) != fingerprint:
            raise ConfigError(f"{out}: the {split} split of {cfg.data} is not the data the run was trained on "
                              "(its manifest's rows changed); resume with that data or start a new run")
    if state.get("tasks", identity["tasks"]) != identity["tasks"]:
        raise ConfigError(f"{out}: the task table (prompts, synonyms) differs from the run's; resume with the "
                          f"tasks file it was started with ({cfg.tasks_file or 'none'}) or start a new run")
    for key, value in state.get("config", {}).items():
        if identity["config"].get(key) != value and not (key == "model" and moved_away(value)):
            raise ConfigError(f"{out}: config.json says {key} = {identity['config'].get(key)!r}, but the run was "
                              f"trained with {value!r}; restore config.json from last/defectseg.json's train_config")


def validate(segmenter: Segmenter, rows: list[dict], masks: list[np.ndarray], cache: FeatureCache | None,
             other_prompts: dict[str, str] | None, batch_size: int, images: list[np.ndarray] | None = None) -> dict:
    """Scores on the selection rows (valid, or a hold-out of train) through the inference path, with the
    threshold sweep; cached activations when available, else ``images`` (the rows' photos, decoded)
    or the photos read from disk."""
    segmenter.model.eval()
    segmenter.forget_prompts()  # conditioning from this epoch's weights, not the first epoch's
    thresholds = default_thresholds()
    scores = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if cache is not None:
            acts = cache.load([(r["image"], 0) for r in chunk])
        else:
            photos = images[start:start + batch_size] if images is not None else [load_image(r["image"]) for r in chunk]
            acts = segmenter.encode(segmenter.pixel_values(photos))
        scores += evaluation.score_batch(segmenter, acts, chunk, masks[start:start + batch_size], thresholds,
                                         other_prompts)
    return evaluation.aggregate(scores, thresholds)


def train_size(cfg: TrainConfig, epoch: int, input_size: int, start: int = 0) -> int:
    """The side of the training images of the batch at position ``start`` of ``epoch`` (0-based):
    ``low_res_size`` for the first ``low_res_epochs`` epochs (cheaper epochs while the model learns coarse
    features), then the model's input size, at which it is validated and used; or, with ``train_sizes``,
    a side drawn per batch from them (the model meets each crack at several scales within an epoch). The
    draw depends only on seed, epoch and position, so a resumed run and every DDP process draw alike."""
    if epoch < cfg.low_res_epochs:
        return cfg.low_res_size
    if not cfg.train_sizes:
        return input_size
    return int(np.random.default_rng([cfg.seed, epoch, start, SIZE_STREAM]).choice(cfg.train_sizes))


def validated(cfg: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` (0-based) is validated: every epoch at the model's input size, and the run's last;
    a low-res epoch (``low_res_epochs``) only with ``validate_low_res``. A model trained on 256 px images
    scores far below its later epochs at its 448 px input size (the shipped run: at most 0.515 against 0.585
    to 0.635), so those scores never pick best/, and skipping them saves a validation per epoch (13 to 22 s
    of a 2-core CPU's 2 to 3 minutes). last/ is saved after every epoch either way."""
    return cfg.validate_low_res or epoch >= cfg.low_res_epochs or epoch == cfg.epochs - 1


def lovasz_weight_in(cfg: TrainConfig, epoch: int) -> float:
    """The Lovasz term's weight in ``epoch`` (0-based): ``lovasz_weight`` in the last ``lovasz_epochs``
    epochs, else 0. It comes last because it needs a model that already separates defect from wall:
    from random weights it learns slower than BCE + Dice and can drive every logit to 0 or below."""
    return cfg.lovasz_weight if epoch >= cfg.epochs - cfg.lovasz_epochs else 0.0


def _read_all(read: Callable, rows: list[dict], column: str, world: int) -> list[np.ndarray]:
    """``read(row[column])`` for every row, in order, in this process's share of the cores (decoding
    releases Python's lock)."""
    return [array for _, array in prefetched(read, [r[column] for r in rows], cores_per_process(world))]


def loader_threads(device: torch.device, augmented: bool, world: int = 1) -> int:
    """Threads preparing batches ahead of the model. Reading files (cached activations): 2. Batches
    augmented on the CPU for a model trained from scratch: on a GPU, up to 8 threads, sharing the
    machine's cores with the other DDP processes (augmentation is slower than the small model's GPU
    step); on a CPU, none: they are made between steps, as threads that augment beside the model's
    would take its cores (on a 2-core CPU, the shipped recipe's epochs took 8 to 23% less time without
    them: docs/performance.md). The batches' order and augmentations do not depend on it."""
    if augmented:
        return max(2, cores_per_process(world)) if device.type == "cuda" else 0
    return 2


def _load_batch(item: tuple[int, list[Sample]], cfg: TrainConfig, rows: list[dict], targets: np.ndarray | None,
                cache: FeatureCache | None, segmenter: Segmenter, bank: ImageBank | None,
                epoch: int, size: Callable[[int], int]) -> tuple[torch.Tensor, dict]:
    """CPU tensors for one step: the (B, S, S) target and the forward's inputs (cached activations;
    or pixel values, plus token ids for the plain HF forward and for a model trained from scratch,
    whose images come augmented from the in-memory bank at side ``size(position)``). ``item`` is
    (position in the epoch, samples). Runs in a prefetch thread."""
    start, batch = item
    if bank is not None:
        pixel_values, target = bank.batch(batch, size(start), cfg.seed, epoch, start)
    else:
        target = torch.from_numpy(batch_targets(targets, batch))
        if cache is not None:
            return target, {"activations": cache.load([(rows[s.row]["image"], s.view) for s in batch])}
        pixel_values = segmenter.pixel_values([view_of(load_image(rows[s.row]["image"]), s.view) for s in batch])
    inputs = {"pixel_values": pixel_values}
    if bank is not None or cfg.train_vision_layers == 0:  # HF-style forward: it encodes the prompts itself
        with _TOKENIZER_LOCK:  # a fast (Rust) tokenizer changing its padding settings refuses a second thread
            tokens = segmenter.processor.tokenizer([s.prompt for s in batch], padding=True, return_tensors="pt")
        inputs.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return target, inputs


def _shard(plan: list, rank: int, world: int) -> list:
    """This process's share of the epoch's plan; the plan is padded by repeating it from the start so
    every process gets as many samples, hence as many steps (a process with one more would wait forever)."""
    padded = plan + [plan[i % len(plan)] for i in range(-len(plan) % world)] if plan else plan
    return padded[rank::world]


def _param_groups(model: nn.Module, trainable: list[nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """AdamW groups of the trainable parameters: no weight decay on biases and norm weights (1-d), and
    the unfrozen vision layers at ``vision_lr_scale`` times the decoder's learning rate."""
    vision = {id(p) for layer in used_vision_layers(model) for p in layer.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in trainable:
        groups.setdefault((id(p) in vision, p.ndim <= 1), []).append(p)
    return [{"params": params, "lr": cfg.lr * (cfg.vision_lr_scale if is_vision else 1.0),
             "weight_decay": 0.0 if no_decay else cfg.weight_decay}
            for (is_vision, no_decay), params in sorted(groups.items())]


def _set_trainable(model: nn.Module, vision_layers: int) -> list[nn.Parameter]:
    """Freeze everything but the decoder (and the last ``vision_layers`` used vision layers); a model
    trained from scratch trains every weight."""
    if trains_from_scratch(model):
        if vision_layers:
            raise ConfigError(f"--train-vision-layers {vision_layers}: a model trained from scratch trains all its layers")
        return list(model.requires_grad_(True).parameters())
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    layers = used_vision_layers(model)
    if vision_layers > len(layers):
        raise ConfigError(f"--train-vision-layers {vision_layers}: the model uses only {len(layers)} vision layers")
    for layer in layers[len(layers) - vision_layers:]:
        layer.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def at_target_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, h, w) logits resized bilinearly to the (B, H, W) target's size, as the inference path resizes
    them to each image's: a head that does not restore the input size (CLIPSeg's "complex" head with
    patch size 8 gives half) trains too. Logits of the target's size come back as they are."""
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits[:, None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def ema_decay(decay: float, step: int) -> float:
    """The EMA decay after ``step`` optimizer steps, warmed up: ``min(decay, (1 + step) / (10 + step))``,
    so the average forgets the initial weights within the first hundred steps instead of holding ~80%
    of them through epoch 1 (0.999 ** 200)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], current: list[torch.Tensor], decay: float, skip: torch.Tensor) -> None:
    """``ema = decay * ema + (1 - decay) * current`` in place, tensor by tensor, unless the 0-d bool ``skip``
    is set (decided on the device, no sync): then ``ema`` stays as it was, even where ``current`` holds
    NaN or inf (a skipped step's forward pass can leave them in the batch-norm statistics)."""
    for shadow, value in zip(ema, current):
        shadow.copy_(torch.where(skip, shadow, shadow.lerp(value.detach(), 1 - decay)))


def _warmup_cosine(warmup: float, total_steps: int):
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _swapped:
    """Context manager: EMA weights in the model for validation and saving, then the live ones back."""

    def __init__(self, params: list[nn.Parameter], ema: list[torch.Tensor] | None):
        self.params, self.ema = params, ema

    def __enter__(self):
        if self.ema is not None:
            self.live = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    p.copy_(e)

    def __exit__(self, *exc):
        if self.ema is not None:
            with torch.no_grad():
                for p, live in zip(self.params, self.live):
                    p.copy_(live)


def _save(run: Run, folder: Path, agg: dict | None, epoch: int, state: dict | None) -> None:
    """A checkpoint folder: save_pretrained weights + processor, defectseg.json metadata (task table,
    tuned per-prompt thresholds, config, metrics), the decoder alone, and (last/) the trainer state.
    ``agg`` None: an epoch that was not validated (no thresholds, metrics null)."""
    model, cfg, tasks = run.model, run.cfg, run.tasks
    tuned = agg["tasks"] if agg is not None else {}
    metadata = {
        "base_model": run.base,
        "epoch": epoch,
        "tasks": tasks_to_dict({t.name: t for t in tasks}),
        "thresholds": {t.prompt: tuned[t.name]["best_threshold"] for t in tasks if t.name in tuned},
        "selection": ("mean over tasks of per-image mean IoU at each task's tuned threshold, on "
                      + selection_split(cfg.holdout)),
        "selection_split": "train-holdout" if cfg.holdout > 0 else "valid",
        "metrics": agg,
        "train_config": asdict(cfg),
    }

    # A decoder trained on a frozen base: its weights alone, on top of that base, are the model.
    decoder_only = run.base_fingerprint is not None

    def extra(tmp: Path) -> None:
        if decoder_only:
            save_decoder(model, tmp / DECODER_FILE, metadata, base_model=run.base, fingerprint=run.base_fingerprint)
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            (tmp / TRAINER_STATE).write_bytes(buf.getvalue())

    # best/ is what users hand on: a whole save_pretrained folder. last/ only serves --resume: for a
    # decoder-only run the decoder file (naming its base model) and the trainer state are enough.
    save_checkpoint(model, run.processor, folder, metadata, extra=extra, full=state is None or not decoder_only)


def selection_split(holdout: float, n_images: int | None = None) -> str:
    """In words, the rows that pick best/ and tune its thresholds (``TrainConfig.holdout``)."""
    n = f"{n_images} " if n_images is not None else ""
    if holdout > 0:
        return (f"a hold-out of {n}train images ({holdout:g} of each task's source photos, set aside by "
                "source_stem; the valid split stays unseen)")
    return f"the {n}images of the valid split"


def selection_score(agg: dict) -> float:
    """What picks best/: the mean over tasks of per-image IoU at each task's tuned threshold (the score users
    get, since best/ is used with its tuned thresholds); the IoU at 0.5 when there was no sweep."""
    return agg["overall"].get("best_iou", agg["overall"]["iou"])


def _write_summary(out: Path, best: dict, history: list[dict]) -> dict:
    """summary.json, after every epoch (an interrupted run's summary stays true), and its content."""
    summary = {"out": str(out), "best_epoch": best["epoch"], "best_mean_iou": best["score"],
               "epochs_run": len(history), "last": history[-1] if history else None}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _history_row(epoch: int, loss: float, agg: dict | None, lr: float, train_s: float, total_s: float,
                 samples_per_s: float, skipped: int, overflowed: int) -> dict:
    """A metrics.csv row (without scores for an epoch that was not validated: ``agg`` None). skipped: steps
    whose loss was non-finite; overflowed: steps fp16's loss scaler skipped (gradients overflowed; usual in
    the first steps, while it finds its scale)."""
    row = {"epoch": epoch, "train_loss": round(loss, 6), "lr": lr}
    if agg is not None:
        for name, m in [*agg["tasks"].items(), ("mean", agg["overall"])]:  # two of evaluation.METRICS per task
            row.update({f"{name}_{key}": round(m[key], 6) for key in ("iou", "dice")})
        row["mean_tuned_iou"] = round(selection_score(agg), 6)
    row.update({"train_seconds": round(train_s, 2), "seconds": round(total_s, 2),
                "samples_per_s": round(samples_per_s, 1), "skipped_steps": skipped, "overflow_steps": overflowed})
    return row


def _write_history(out: Path, history: list[dict]) -> None:
    """metrics.csv (a row per epoch) and curves.png."""
    buf = io.StringIO()
    columns = list(dict.fromkeys(key for row in history for key in row))  # rows of older versions lack some
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(out / "metrics.csv", buf.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss (BCE + Dice)", title="training loss")
    for key in [k for k in columns if k.endswith("_iou")]:  # validated epochs only
        scored = [r for r in history if key in r]
        ax_iou.plot([r["epoch"] for r in scored], [r[key] for r in scored], marker="o", label=key.replace("_iou", ""))
    ax_iou.set(xlabel="epoch", ylabel="IoU (mean over images; t=0.5 unless tuned)", title="validation")
    if ax_iou.lines:  # none before the first validated epoch
        ax_iou.legend()
    for ax in (ax_loss, ax_iou):  # whole epochs on the axis, also for a one-epoch run
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[::-(-len(epochs) // 20)])
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(out / "curves.png", png.getvalue())


# -- reproducibility and distributed helpers ----------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():  # a run saved on more GPUs than this machine shows
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


_STATE_KEYS = {"epoch": int, "optimizer": dict, "scheduler": dict, "scaler": dict, "history": list,
               "best": dict, "rng": dict}


def _load_trainer_state(path: Path) -> dict:
    """``last/trainer_state.pt`` onto the CPU (a run trained on a GPU resumes anywhere). Raises ConfigError
    for a file that cannot be read or does not hold a trainer state."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated or not a trainer state at all
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {err}); resume from a copy or start "
                          "a new run") from err
    wrong = ([k for k, kind in _STATE_KEYS.items() if not isinstance(state.get(k), kind)]
             if isinstance(state, dict) else ["everything"])
    if wrong:
        raise ConfigError(f"{path} is not a trainer state ({', '.join(wrong)} missing or of the wrong type); "
                          "resume from a copy or start a new run")
    return state


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        # Rank 0 validates and saves while the others wait: allow longer than nccl's 10 minutes.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), world


def _device_for_rank(name: str, rank: int, world: int) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _mean_across(total: torch.Tensor, count: int, world: int) -> float:
    """The mean over every process of values whose sum on this one is ``total`` (a 0-d tensor), of ``count``."""
    both = torch.stack([total.double(), torch.tensor(count, dtype=torch.float64, device=total.device)])
    if world > 1:
        dist.all_reduce(both)
    return float(both[0] / both[1]) if both[1] else float("nan")


def _all_finite(loss: torch.Tensor, world: int) -> torch.Tensor:
    """0-d bool on the device: the loss is finite on every process (no host read; NCCL queues the
    all-reduce on the GPU)."""
    finite = torch.isfinite(loss).to(torch.int32)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.bool()


def _broadcast_flag(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (``<run>/config.json``)."""
    path = Path(run_dir) / "config.json"
    if (Path(run_dir) / METADATA_FILE).is_file():  # runs/<name>/last or best: a checkpoint folder
        raise ConfigError(f"{run_dir} is a checkpoint: --resume takes the run's folder ({Path(run_dir).parent}), "
                          "not its last/ or best/")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run folder?")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot be read ({err}); restore it from last/defectseg.json's train_config") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{path}: not a training config (a JSON object of settings)")
    if "model_type" in stored:  # runs/<name>/last or best: a model folder
        raise ConfigError(f"{path} is a model's config: --resume takes the run's folder ({Path(run_dir).parent}), "
                          "not its last/ or best/")
    defaults = TrainConfig()
    for key, value in stored.items():
        if key in TrainConfig.__dataclass_fields__ and not _fits(value, getattr(defaults, key), key):
            raise ConfigError(f"{path}: {key} = {value!r} is not a valid value; restore it from "
                              "last/defectseg.json's train_config")
    return TrainConfig(**{k: v for k, v in stored.items() if k in TrainConfig.__dataclass_fields__})


def _fits(value: object, default: object, key: str) -> bool:
    """Whether a stored setting has the type of its default (ints for floats too; None for optional paths)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, list):
        kind = int if key == "train_sizes" else str
        return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    return isinstance(value, str) or (value is None and key == "tasks_file")
