"""Training data for models trained from scratch: images decoded once into memory, augmented on the fly.

A from-scratch model sees each photo many times, so it needs variety the frozen-CLIP decoder does not:

- random scale and crop (half the samples): a crop of 55-100% of each side, resized to the input size;
  thin cracks then appear at up to 1.8 times their usual width, and the model meets each photo at several scales;
- horizontal flip (the plan's ``view``), vertical flip and 90-degree rotations: wall photos have no
  preferred orientation, and cracks run every way (``--no-flip`` turns all three off);
- photometric jitter (brightness, contrast, per-channel gain): lighting and white balance vary per site.

Every random choice comes from ``np.random.default_rng([seed, epoch, position])``, so a sample's
augmentation depends only on where it sits in the run (a resumed run sees exactly the same batches).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from . import cli
from .io import cores_per_process, load_image, prefetched, read_mask_png
from .lite import normalize, resize_square

logger = logging.getLogger(__name__)

CROP_PROB = 0.5
CROP_MIN = 0.55


class ImageBank:
    """Every training image (H, W, 3) uint8 and its mask (H, W) uint8 {0, 1}, decoded once, in memory."""

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray], flips: bool = True):
        self.images, self.masks, self.flips = images, masks, flips

    @classmethod
    def from_rows(cls, rows: Sequence[dict], flips: bool = True, progress: bool = True, world: int = 1) -> ImageBank:
        """The images and masks of manifest rows, decoded once, in the rows' order, in up to 8 threads
        (decoding releases Python's lock) sharing the machine's cores with the other ``world - 1``
        processes of a multi-GPU run, which decode at the same time."""
        images, masks = [], []
        for _, (image, mask) in cli.progress(prefetched(_decode, rows, cores_per_process(world)), total=len(rows),
                                             desc="decoding train images", unit="img", enabled=progress):
            images.append(image)
            masks.append(mask)
        return cls(images, masks, flips)

    def sample(self, row: int, negative: bool, view: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One augmented (size, size, 3) uint8 image and its (size, size) float32 soft target (zeros for
        a negative pair)."""
        image, mask = augment(self.images[row], self.masks[row], view, size, rng, self.flips)
        return image, np.zeros_like(mask) if negative else mask

    def batch(self, samples: Sequence, size: int, seed: int, epoch: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized pixel values (B, 3, S, S) and targets (B, S, S) for ``samples`` (``data.Sample``) that
        sit at positions ``start, start + 1, ...`` of the epoch."""
        pairs = [self.sample(s.row, s.negative, s.view, size, np.random.default_rng([seed, epoch, start + i]))
                 for i, s in enumerate(samples)]
        images, targets = zip(*pairs)
        return normalize(np.stack(images)), torch.from_numpy(np.stack(targets))


def _decode(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """A row's (H, W, 3) uint8 image and (H, W) uint8 mask (a mask of another size than its image, which
    preprocess_masks.py never writes, is named in a warning and resized to the image's so crops cut both
    alike: a mask made elsewhere for the photo's stored, not its EXIF-rotated, orientation is misaligned)."""
    image, mask = load_image(row["image"]), read_mask_png(row["mask"]).astype(np.uint8)
    if mask.shape != image.shape[:2]:
        logger.warning("%s: mask %dx%d, image %dx%d (after its EXIF orientation): the mask is resized to the image",
                       row["mask"], mask.shape[1], mask.shape[0], image.shape[1], image.shape[0])
        mask = cv2.resize(mask, image.shape[1::-1], interpolation=cv2.INTER_NEAREST_EXACT)
    return image, mask


def augment(image: np.ndarray, mask: np.ndarray, view: int, size: int, rng: np.random.Generator,
            flips: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Scale-crop, flips, rotation and jitter of one (H, W, 3) uint8 image and its (H, W) {0, 1} mask.

    Returns the (size, size, 3) uint8 image and the (size, size) float32 soft target (area-averaged).
    """
    h, w = mask.shape
    if rng.random() < CROP_PROB:
        f = rng.uniform(CROP_MIN, 1.0)
        ch, cw = max(1, round(h * f)), max(1, round(w * f))
        y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        image, mask = image[y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]
    image = resize_square(np.ascontiguousarray(image), size)
    target = resize_square(np.ascontiguousarray(mask, dtype=np.float32), size)
    if view:
        image, target = image[:, ::-1], target[:, ::-1]
    if flips:
        if rng.random() < 0.5:
            image, target = image[::-1], target[::-1]
        k = int(rng.integers(4))
        image, target = np.rot90(image, k), np.rot90(target, k)
    return jitter(np.ascontiguousarray(image), rng), np.ascontiguousarray(target)


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast +-20% around the image's mean, brightness +-20% (the mean scaled), then a per-channel gain of
    +-5%, on uint8: a per-channel map of the 256 values, applied as a lookup table (4 times faster than
    the same float32 arithmetic on every pixel, and the same bytes)."""
    mean = image.astype(np.float32).mean()
    contrast = rng.uniform(0.8, 1.2)
    gain = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    values = np.arange(256, dtype=np.float32)[:, None]
    table = np.clip(((values - mean) * contrast + mean * rng.uniform(0.8, 1.2)) * gain, 0, 255).astype(np.uint8)
    return cv2.LUT(image, table[:, None, :])
