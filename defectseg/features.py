"""The activation cache: vision activations computed once per image (and view), reused across runs.

With CLIP frozen (the default), the decoder is all that trains, and its input for an image never
changes. So each image's activations at the decoder's extract layers (``model.encode_images``, the
vision tower truncated after the deepest extract layer) are computed once and stored as one
``.npy`` file per (image, view) in fp16 (or fp32):

    <cache_dir>/<model fingerprint>-<input size>-<compute precision>-<storage dtype>/<image hash>-<view>.npy
        array (L, T, D): L extract layers, T = 1 + patches tokens, D = vision hidden size

The key covers everything the activations depend on: the image's bytes, the view (original or
horizontally flipped), the vision weights, config and image preprocessing (fingerprint), the input
resolution, the precision they were computed in and the storage dtype. A changed image, model or
resolution never reuses a stale entry. Files are written atomically (without fsync: a file cut short by
a power cut is found by ``complete_npy`` and computed again) and read back as memory maps, so the cache
can exceed RAM.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import cli
from .data import DataError
from .inference import precision_name
from .io import load_image, write_bytes_atomic
from .model import used_vision_layers

log = logging.getLogger(__name__)

VIEWS = ("orig", "hflip")
CACHE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def view_of(rgb: np.ndarray, view: int) -> np.ndarray:
    """The image as seen in ``view``: 0 as is, 1 flipped left-right. (H, W, 3) uint8 in and out."""
    return np.ascontiguousarray(rgb[:, ::-1]) if view == 1 else rgb


def file_hash(path: str | Path) -> str:
    """Content hash of a file (20 hex chars)."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=10).hexdigest()


def model_fingerprint(model: torch.nn.Module, preprocessing: dict | None = None) -> str:
    """Hash of what the activations depend on: vision config, extract layers, the image processor's
    settings and the weights of the embeddings, pre-layernorm and every used vision layer (16 hex)."""
    vision = model.clip.vision_model
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([model.config.vision_config.to_dict(), list(model.config.extract_layers), preprocessing],
                        sort_keys=True, default=str).encode())
    for module in (vision.embeddings, vision.pre_layrnorm, *used_vision_layers(model)):
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def complete_npy(path: Path) -> bool:
    """Whether ``path`` is a whole ``.npy`` file: a readable header and as many bytes as it announces (a
    file cut short by a crash or power cut is not)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return False
            shape, _, dtype = read_header(f)
            return os.fstat(f.fileno()).st_size == f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (OSError, ValueError):
        return False


class FeatureCache:
    """Activations per (image, view) on disk, for one model, input size and storage dtype."""

    def __init__(self, root: str | Path, model: torch.nn.Module, input_size: int, dtype: str = "fp16",
                 compute: str = "fp32", preprocessing: dict | None = None):
        """compute: the precision activations are computed in (fp32, bf16, fp16); preprocessing: the
        image processor's settings (resize, normalization). Both are part of the key."""
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {list(CACHE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        fingerprint = model_fingerprint(model, preprocessing)
        self.dir = Path(root) / f"{fingerprint}-{input_size}-{compute}-{dtype}"
        self._keys: dict[str, str] = {}

    @classmethod
    def for_segmenter(cls, root: str | Path, segmenter, dtype: str = "fp16") -> FeatureCache:
        """The cache of what ``segmenter.encode`` computes: its model, input size, precision, processor."""
        compute = precision_name(segmenter.amp_dtype)
        processor = segmenter.processor.image_processor
        # The class too: transformers falls back to a PIL implementation without torchvision, whose
        # to_dict() is the same but whose resizing differs slightly.
        preprocessing = dict(processor.to_dict(), implementation=type(processor).__name__)
        return cls(root, segmenter.model, segmenter.input_size, dtype, compute, preprocessing)

    def key(self, image: str) -> str:
        if image not in self._keys:
            self._keys[image] = file_hash(image)
        return self._keys[image]

    def path(self, image: str, view: int) -> Path:
        return self.dir / f"{self.key(image)}-{VIEWS[view]}.npy"

    def build(self, images: Sequence[str], views: Sequence[int], encode, pixel_values, batch_size: int,
              desc: str = "features", shard: tuple[int, int] = (0, 1)) -> int:
        """Compute and store every missing (image, view). Returns how many were computed.

        encode: pixel_values (B, 3, S, S) -> list of L tensors (B, T, D) (``Segmenter.encode``).
        pixel_values: list of RGB uint8 images -> (B, 3, S, S) (``Segmenter.pixel_values``).
        shard: (rank, world) — with several processes each computes its share of the missing files.
        """
        # Shard before checking what exists: every process must split the same list, whatever the
        # others have already written.
        images = list(dict.fromkeys(images))  # an image of two tasks is one cache entry
        mine = [(im, v) for im in images for v in views][shard[0]::shard[1]]
        todo = [(im, v) for im, v in mine if not complete_npy(self.path(im, v))]
        if not todo:
            return 0
        if broken := sum(self.path(im, v).exists() for im, v in todo):
            log.warning("%s: recomputing %d incomplete cache files (a crash or power cut while writing?)",
                        self.dir, broken)
        self.dir.mkdir(parents=True, exist_ok=True)
        np_dtype = CACHE_DTYPES[self.dtype]
        for start in cli.progress(range(0, len(todo), batch_size), desc=desc, unit="batch", enabled=shard[0] == 0):
            chunk = todo[start:start + batch_size]
            rgb = [view_of(load_image(im), v) for im, v in chunk]
            acts = encode(pixel_values(rgb))
            stacked = torch.stack([a.float() for a in acts], dim=1).cpu().numpy().astype(np_dtype)  # (B, L, T, D)
            for (im, v), arr in zip(chunk, stacked):
                buf = io.BytesIO()
                np.save(buf, arr)
                write_bytes_atomic(self.path(im, v), buf.getvalue(), sync=False)
        return len(todo)

    def load(self, items: Sequence[tuple[str, int]]) -> list[torch.Tensor]:
        """Activations of a batch of (image, view) as L float tensors (B, T, D), in the cache dtype."""
        arrays = np.stack([self._read(self.path(im, v)) for im, v in items])  # (B, L, T, D)
        tensor = torch.from_numpy(arrays)
        return [tensor[:, layer] for layer in range(tensor.shape[1])]

    def _read(self, path: Path) -> np.ndarray:
        """One entry as a memory map. Raises DataError naming a damaged file (build() recomputes those)."""
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: damaged cache file ({err}); run again to recompute it, or delete "
                            f"{self.dir}") from None
