"""The one inference path, shared by training validation, ``evaluate.py`` and ``predict.py``.

    image (H, W, 3) uint8 -> processor -> pixel_values (B, 3, S, S)
      -> truncated vision encoder, ONCE per image for all prompts   (``encode``)
      -> decoder per prompt on those activations                    (``logits``)
      -> bilinear upsampling of the logits to each image's own size -> sigmoid   (``probabilities``)
      -> threshold (per prompt, from the checkpoint)                 (``binarize``)

Training validation enters at ``logits`` with cached activations; the other scripts start from
images. Prompt conditioning vectors are computed once per run and kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .io import ImageReadError, load_image
from .metrics import binarize
from .model import (
    METADATA_FILE,
    ModelLoadError,
    decode,
    encode_images,
    encode_prompts,
    fold_batchnorm,
    load_model,
    parameter_counts,
    read_metadata,
    trains_from_scratch,
)
from .tasks import Task, TaskTableError, load_tasks_from_metadata, normalize_prompt, task_for_prompt

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
# Test-time augmentation (``--tta``): how many of the image's eight dihedral views are averaged. "flip": the
# image and its mirror image; "d4": also their 90-degree rotations (for models trained with rotations, such as
# LiteSeg; CLIP saw upright photos, so CLIPSeg takes "flip").
TTA_VIEWS = {"flip": 2, "d4": 8}


def dihedral_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of square images or maps (..., S, S): mirrored left-right when ``view`` is odd,
    then turned ``view // 2`` quarter turns. View 0 is the input itself, view 1 its mirror image."""
    if view % 2:
        x = x.flip(-1)
    return torch.rot90(x, view // 2, dims=(-2, -1))


def add_tta_argument(parser) -> None:
    """``--tta [flip|d4]`` for the scripts that run a model (``predict.py``, ``evaluate.py``)."""
    parser.add_argument("--tta", nargs="?", const="flip", default=None, choices=list(TTA_VIEWS),
                        help="average the logits over views of each image: flip (the default of a bare --tta: "
                             "the image and its mirror image, 2x the cost) or d4 (also their 90-degree rotations, "
                             "8x the cost, for models trained with rotations such as LiteSeg); default: off")


def undo_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """The inverse of ``dihedral_view``: maps of view ``view`` back onto the input's pixel grid."""
    x = torch.rot90(x, -(view // 2), dims=(-2, -1))
    return x.flip(-1) if view % 2 else x


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; anything else as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def check_device(name: str) -> str | None:
    """Why ``--device name`` cannot be used on this machine (None when it can)."""
    try:
        device = resolve_device(name)
    except RuntimeError as err:
        return f"--device {name}: {err}"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: not supported; use auto, cpu, cuda, cuda:N or mps"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: CUDA is not available (torch {torch.__version__})"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available"
    return None


def _views(tta: str | None, ensemble: bool) -> str:
    return " and ".join([f"--tta {tta}" if tta else "no --tta"] + ["--ensemble"] * bool(ensemble))


def threshold_sources(meta: dict) -> dict[str, dict]:
    """{canonical prompt: how its threshold was tuned} as ``evaluate.py --write-thresholds`` records it
    (``thresholds_sources``; a checkpoint written before records one ``thresholds_source`` for all its
    thresholds). Prompts tuned by train.py have none."""
    sources = meta.get("thresholds_sources")
    if isinstance(sources, dict):
        return {normalize_prompt(k): v for k, v in sources.items() if isinstance(v, dict)}
    legacy, thresholds = meta.get("thresholds_source"), meta.get("thresholds")
    if isinstance(legacy, dict) and isinstance(thresholds, dict):
        return {normalize_prompt(k): legacy for k in thresholds}
    return {}


def thresholds_mismatch(meta: dict, model_arg: str, tta: str | None, ensemble: bool,
                        prompts: Iterable[str] | None = None) -> str | None:
    """A warning when the thresholds of ``prompts`` (default: all) were tuned (``evaluate.py
    --write-thresholds``, ``threshold_sources``) with another --tta or --ensemble than a run's; None when they
    match or nothing is recorded (training tunes them without either)."""
    sources = threshold_sources(meta)
    wanted = None if prompts is None else {normalize_prompt(p) for p in prompts}
    off = {p: s for p, s in sources.items() if (wanted is None or p in wanted)
           and (s.get("tta"), bool(s.get("ensemble"))) != (tta, bool(ensemble))}
    if not off:
        return None
    source = next(iter(off.values()))
    which = "" if len(off) == len(sources) else f" for {', '.join(map(repr, sorted(off)))}"
    return (f"the thresholds of {model_arg}{which} were tuned with {_views(source.get('tta'), source.get('ensemble'))} "
            f"(evaluate.py --write-thresholds on {source.get('split')}); this run uses {_views(tta, ensemble)}, so "
            "they may not fit: run with the same, retune them, or pass --threshold")


def checkpoint_metadata(model_arg: str) -> tuple[dict[str, Task], dict[str, float]]:
    """The task table and per-prompt thresholds a model carries in its defectseg metadata (a checkpoint
    folder's defectseg.json, a decoder file's header); the built-in tasks and no thresholds for a Hub id.

    Raises ModelLoadError naming the file when the metadata cannot be used: invalid JSON, a bad ``tasks``
    entry, a threshold that is not a number in [0, 1].
    """
    path = Path(model_arg).expanduser()
    where = path / METADATA_FILE if path.is_dir() else path
    meta = read_metadata(model_arg)
    try:
        table = load_tasks_from_metadata(meta, str(where))
    except TaskTableError as err:
        raise ModelLoadError(str(err)) from None
    thresholds = meta.get("thresholds")
    if thresholds is not None and not isinstance(thresholds, dict):
        raise ModelLoadError(f"{where}: 'thresholds' must be an object mapping prompts to numbers, "
                             f"got {type(thresholds).__name__}")
    checked: dict[str, float] = {}
    for prompt, value in (thresholds or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 309 digits or more
            number = math.nan
        if isinstance(value, bool) or not 0.0 <= number <= 1.0:
            raise ModelLoadError(f"{where}: the threshold of {prompt!r} is {json.dumps(value)}, not a number in "
                                 "[0, 1]; fix it or remove it (evaluate.py --write-thresholds rewrites it)")
        checked[prompt] = number
    return table, checked


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what --precision takes, in every script
PRECISION_HELP = ("autocast precision; auto: bf16 on CUDA GPUs that have it, else fp16; on CPU fp32, or bf16 for "
                  "LiteSeg where the CPU has native bf16 (AVX512-BF16, AMX)")


def precision_name(dtype: torch.dtype | None) -> str:
    """The name a resolved autocast dtype goes by in logs, reports and config files (None: fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def resolve_precision(precision: str, device: torch.device, model: torch.nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    auto: bf16 on CUDA GPUs with native bf16 (Ampere and newer, ROCm), else fp16; on CPU, bf16 for a
    model trained from scratch (LiteSeg) where the CPU has native bf16 (AVX512-BF16, AMX: 2-3 times the
    fp32 rate of its convolutions), else fp32; fp32 on MPS.
    (``torch.cuda.is_bf16_supported()`` also says yes to the slow emulated bf16 of a T4 or V100.)
    """
    if precision == "auto" and device.type == "cpu" and model is not None and trains_from_scratch(model):
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else None
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if torch.version.hip else torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast context for ``dtype`` on ``device``; a no-op for fp32. ``cache=False`` recasts a weight at
    each use (what recording a CUDA graph requires)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


@dataclass
class Segmenter:
    """A loaded model plus everything needed to turn images and prompts into masks.

    thresholds: canonical prompt (normalized) -> probability threshold; prompts of a task share its
        canonical prompt's threshold; other prompts use ``default_threshold``.
    tta: None, or a ``TTA_VIEWS`` key: run those views of each image and average their logits.
    ensemble: average the logits over the prompt's task synonyms (the prompt itself when it is not in
        the task table).
    parameter_counts: the checkpoint's ``model.parameter_counts`` (``load`` counts them before it folds
        the batch norms away; a segmenter built around a model counts that model).
    """

    model: torch.nn.Module
    processor: object
    device: torch.device
    amp_dtype: torch.dtype | None = None
    tasks: dict[str, Task] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    default_threshold: float = DEFAULT_THRESHOLD
    tta: str | None = None
    ensemble: bool = False
    parameter_counts: dict[str, int | None] = field(default_factory=dict)
    _cond: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.parameter_counts = self.parameter_counts or parameter_counts(self.model)
        if self.tta is not None and self.tta not in TTA_VIEWS:
            raise ValueError(f"tta={self.tta!r}: use None or one of {', '.join(TTA_VIEWS)}")

    @property
    def views(self) -> int:
        """How many views of each image are encoded and averaged (1 without TTA)."""
        return TTA_VIEWS[self.tta] if self.tta else 1

    @classmethod
    def load(cls, model_arg: str, device: str = "auto", precision: str = "auto", **options) -> Segmenter:
        """Load ``model_arg`` (hub id, folder, ``runs/<name>/best`` or decoder file) with its metadata:
        task table and tuned thresholds, for inference: batch norms are folded into their convs
        (``fold_batchnorm``; train from ``load_model``). Raises ``ModelLoadError`` with a user-facing message."""
        dev = resolve_device(device)
        tasks, thresholds = checkpoint_metadata(model_arg)  # before the weights: it fails fast
        model, processor = load_model(model_arg, dev)
        counts = parameter_counts(model)
        if fold_batchnorm(model):
            model.requires_grad_(False)  # no batch norms left: for inference only
        return cls(
            model=model,
            processor=processor,
            device=dev,
            amp_dtype=resolve_precision(precision, dev, model),
            tasks=tasks,
            thresholds={normalize_prompt(k): v for k, v in thresholds.items()},
            parameter_counts=counts,
            **options,
        )

    # -- images -> activations ------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        size = self.processor.image_processor.size  # a dict, or a SizeDict in transformers >= 5
        if isinstance(size, int):
            return size
        return int(size["height"] if size.get("height") else size["shortest_edge"])

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, S, S) float32 model input for RGB uint8 images of any sizes (the processor's resize)."""
        return processor_inputs(self.processor.image_processor, images)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Vision activations for a batch (the expensive part; once per image for all prompts).
        With ``tta`` the batch holds ``views`` blocks: [images, their view 1, view 2, ...]."""
        pixel_values = pixel_values.to(self.device)
        if self.views > 1:
            pixel_values = torch.cat([dihedral_view(pixel_values, v) for v in range(self.views)])
        with autocast(self.device, self.amp_dtype):
            return encode_images(self.model, pixel_values)

    # -- prompts --------------------------------------------------------------------------------

    def prompt_group(self, prompt: str) -> list[str]:
        """The prompts whose logits are averaged for ``prompt`` (synonyms when ensembling)."""
        if not prompt.strip():
            raise ValueError("empty prompt")
        task = task_for_prompt(prompt, self.tasks)
        return list(task.prompts) if self.ensemble and task is not None else [prompt]

    @torch.no_grad()
    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, projection_dim) conditioning vectors, computed once per prompt per Segmenter."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond]
        if missing:
            with autocast(self.device, self.amp_dtype):
                vectors = encode_prompts(self.model, self.processor, missing, self.device)
            self._cond.update({p: v.float() for p, v in zip(missing, vectors)})
        return torch.stack([self._cond[p] for p in prompts])

    def forget_prompts(self) -> None:
        """Drop the kept conditioning vectors: after a training step changed the prompt encoder (LiteSeg
        trains it), they would be the old weights' answer."""
        self._cond.clear()

    def trained_on(self, prompt: str) -> bool:
        """Whether the checkpoint was trained to answer ``prompt`` (a prompt or synonym of its task table);
        a checkpoint without tuned thresholds (not trained here) is taken at its word for any prompt."""
        return not self.thresholds or task_for_prompt(prompt, self.tasks) is not None

    def cuts(self, prompt: str) -> bool:
        """Whether the model reads only the start of ``prompt``: its tokenizer cuts it (LiteSeg at 64 bytes,
        CLIP at 77 tokens), so two prompts that start alike get the same masks."""
        def length(truncation: bool) -> int:
            return self.processor.tokenizer([prompt], padding=False, truncation=truncation, verbose=False,
                                            return_tensors="pt")["input_ids"].shape[1]
        return length(False) > length(True)

    def threshold(self, prompt: str) -> float:
        """The prompt's threshold: the checkpoint's for its task (``tuned_threshold``), else the default."""
        tuned = self.tuned_threshold(prompt)
        return self.default_threshold if tuned is None else tuned

    def tuned_threshold(self, prompt: str) -> float | None:
        """The threshold the checkpoint stores for the prompt's task (or the prompt itself), or None."""
        return self.thresholds.get(self.threshold_prompt(prompt))

    def threshold_prompt(self, prompt: str) -> str:
        """The prompt whose threshold ``prompt`` uses: its task's (synonyms share it), else itself; canonical."""
        task = task_for_prompt(prompt, self.tasks)
        return normalize_prompt(task.prompt if task is not None else prompt)

    # -- activations -> logits -> probabilities -------------------------------------------------

    @torch.no_grad()
    def logits(self, activations: list[torch.Tensor], prompt: str) -> torch.Tensor:
        """(B, S, S) float32 logits of one prompt for a batch of activations (B images; with ``tta``
        the activations hold ``views`` blocks of B rows, each mapped back to the image and averaged)."""
        group = self.prompt_group(prompt)
        batch = activations[0].shape[0]
        total = None
        for p in group:
            cond = self.conditioning([p]).expand(batch, -1)
            with autocast(self.device, self.amp_dtype):
                out = decode(self.model, activations, cond).float()
            total = out if total is None else total + out
        logits = total / len(group)
        if self.views > 1:
            b = batch // self.views
            logits = sum(undo_view(logits[v * b:(v + 1) * b], v) for v in range(self.views)) / self.views
        return logits

    @staticmethod
    def upsample(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Probabilities at each image's own size: bilinear on the logits, then sigmoid.

        logits: (B, S, S); sizes: B pairs (height, width). Returns B float32 arrays (H_i, W_i).
        """
        probs = []
        for row, (h, w) in zip(logits, sizes):
            up = F.interpolate(row[None, None].float(), size=(int(h), int(w)), mode="bilinear", align_corners=False)
            probs.append(torch.sigmoid(up[0, 0]).cpu().numpy())
        return probs

    def probabilities(
        self, activations: list[torch.Tensor], sizes: Sequence[tuple[int, int]], prompts: Sequence[str]
    ) -> dict[str, list[np.ndarray]]:
        """prompt -> list of (H_i, W_i) float32 probability maps, one per image of the batch."""
        return {p: self.upsample(self.logits(activations, p), sizes) for p in prompts}

    def probability_map(self, image: np.ndarray, prompt: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """float32 probabilities of ``prompt`` for one (H, W, 3) uint8 RGB image, at ``size`` (default: the
        image's (H, W); a ground-truth mask's shape to score against it, as evaluate.py does)."""
        return self.probabilities(self.encode(self.pixel_values([image])), [size or image.shape[:2]], [prompt])[prompt][0]

    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, list[np.ndarray]]:
        """Convenience: RGB images -> prompt -> list of (H, W) bool masks at each image's size."""
        acts = self.encode(self.pixel_values(images))
        sizes = [im.shape[:2] for im in images]
        return {
            p: [binarize(prob, self.threshold(p)) for prob in probs]
            for p, probs in self.probabilities(acts, sizes, prompts).items()
        }


def processor_inputs(image_processor, images: Sequence[np.ndarray]) -> torch.Tensor:
    """(B, 3, S, S) float32 model input for RGB uint8 images of any sizes (``Segmenter.pixel_values``)."""
    # Channels-last said outright: transformers guesses the layout otherwise, and guesses wrong for
    # images 1, 3 or 4 pixels tall (it takes the height for the channel axis).
    return image_processor(images=list(images), return_tensors="pt", input_data_format="channels_last")["pixel_values"]


# -- image files -> model inputs, decoded in DataLoader workers while the model runs -------------


@dataclass
class LoadedImage:
    """One image file read for inference: its size and model input (and the image itself when asked for),
    or why it could not be read.

    size: (H, W) of the image with the EXIF orientation applied (``io.load_image``): the size masks are
        written at.
    pixel_values: (3, S, S) float32, this image's row of ``Segmenter.pixel_values``.
    image: (H, W, 3) uint8 RGB, only when ``ImageFiles`` keeps images (overlays need them); else None, so
        a batch of large photos does not travel between processes whole.
    """

    path: Path
    size: tuple[int, int] | None = None
    pixel_values: torch.Tensor | None = None
    image: np.ndarray | None = None
    error: str | None = None


class ImageFiles(Dataset):
    """Image files -> ``LoadedImage``. A file that cannot be read comes back with ``error`` set rather
    than raising, so one bad file does not end a run. Holds only the image processor (not the model),
    so it is cheap to send to worker processes. ``keep_images``: also return each decoded image."""

    def __init__(self, paths: Sequence[str | Path], image_processor, keep_images: bool = False) -> None:
        self.paths = [Path(p) for p in paths]
        self.image_processor = image_processor
        self.keep_images = keep_images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        path = self.paths[index]
        try:
            image = load_image(path)
        except ImageReadError as err:
            return LoadedImage(path, error=str(err))
        return LoadedImage(path, image.shape[:2], processor_inputs(self.image_processor, [image])[0],
                           image if self.keep_images else None)


def image_batches(
    segmenter: Segmenter, paths: Sequence[str | Path], batch_size: int = 8, workers: int = 0,
    keep_images: bool = False,
) -> DataLoader:
    """Batches (lists) of ``LoadedImage`` for ``paths``, in order (with the decoded images: ``keep_images``).

    With ``workers`` > 0 the files are decoded and resized in that many processes, ahead of the model.
    At most one worker per batch after the first is started: the first batch has nothing to overlap.
    """
    n_batches = -(-len(paths) // batch_size)
    return DataLoader(
        ImageFiles(paths, segmenter.processor.image_processor, keep_images),
        batch_size=batch_size,
        num_workers=max(0, min(workers, n_batches - 1)),
        collate_fn=list,
        worker_init_fn=_quiet_worker,
    )


def _quiet_worker(worker_id: int) -> None:
    """An image worker's set-up: it ends quietly on SIGTERM from anyone, and says nothing of a main process
    that hung up on it.

    torch's own handler ends a worker quietly only on SIGTERM from the main process; one sent to the whole
    process group (timeout, job schedulers) would kill it by the signal, and the main process, itself
    unwinding from that SIGTERM, would print a traceback for it. The worker's resource-sharer thread (it
    hands each batch's tensors to the main process) reports a main process that hung up mid-handover
    through ``sys.excepthook``; that lost peer is not news either."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    sys.excepthook = _quiet_if_peer_gone


def _quiet_if_peer_gone(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if not issubclass(kind, (OSError, EOFError)):
        sys.__excepthook__(kind, value, tb)
