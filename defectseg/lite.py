"""LiteSeg: a small prompt-conditioned segmenter trained from scratch (no pretrained weights).

It speaks CLIPSeg's interface, so the rest of the project treats it like one (``model.py`` is the only
place that tells them apart):

    acts = model.encode_images(pixel_values)     # MobileNet-style encoder: skips at 1/2 .. 1/32
    cond = model.encode_prompts(ids, mask)        # byte-level prompt encoder: any phrase tokenizes
    logits = model.decode(acts, cond)             # U-Net decoder, FiLM-conditioned at every scale
    model(input_ids=..., attention_mask=..., pixel_values=...).logits   # all three, as HF's forward

The decoder's head runs at half the input resolution (thin cracks are 2-6 px wide in 640 px photos)
and is upsampled bilinearly to the input size, so ``decode`` returns (B, S, S) like CLIPSeg's.

``LiteProcessor`` plays the part of ``CLIPSegProcessor``: ``image_processor`` resizes RGB images to the
model's square input and normalizes them; ``tokenizer`` turns prompts into UTF-8 byte ids.

A checkpoint folder holds ``config.json`` (``model_type: "defectseg-lite"``, the architecture) and
``model.safetensors``; ``save_pretrained`` / ``from_pretrained`` write and read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BatchEncoding

from .tasks import normalize_prompt

MODEL_TYPE = "defectseg-lite"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class LiteConfig:
    """The architecture. ``enc`` are the encoder's widths at strides 2, 4, 8, 16, 32 (``depth`` inverted
    residual blocks after each stage's first); ``dec`` the decoder's widths at strides 16, 8, 4, 2."""

    image_size: int = 448
    enc: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 192])
    depth: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 2])
    dec: list[int] = field(default_factory=lambda: [128, 64, 32, 16])
    expand: int = 4
    plain: int = 3  # the first ``plain`` encoder stages and last decoder blocks use plain 3x3 convs
    text_dim: int = 64
    cond_dim: int = 128
    max_prompt_bytes: int = 64
    context: list[int] = field(default_factory=list)  # pyramid pooling bins at stride 32 (empty: none)
    model_type: str = MODEL_TYPE


# Named sizes for ``train.py --model``: a fresh, randomly initialized LiteSeg.
ARCHS = {
    "lite": LiteConfig(),
    # Twice the parameters (3.48 M), at strides 8 to 32: trained by the same recipe it scores as "lite" does
    # (models/liteseg/README.md, "What limits it"), so capacity is not what holds the shipped model back.
    "lite-wide": LiteConfig(enc=[16, 32, 80, 160, 256], depth=[0, 1, 2, 4, 3], dec=[160, 80, 32, 16]),
    # The same with a pyramid context block at stride 32 (PyramidContext): the whole photo's context at every
    # position, for the larger cracks this model loses to pretrained peers (models/liteseg/README.md).
    "lite-ctx": LiteConfig(context=[1, 2, 3, 6]),
    "lite-tiny": LiteConfig(image_size=96, enc=[8, 16, 16, 32, 32], depth=[0, 0, 0, 0, 0], dec=[32, 16, 16, 8],
                            expand=2, text_dim=16, cond_dim=16),
}


class StridedDepthwise(nn.Conv2d):
    """A grouped conv with stride > 1 (the depthwise conv that halves the resolution in an inverted residual).
    While training on a CPU under bf16 autocast it runs in fp32, its output cast back: oneDNN's bf16 backward
    of this conv is slow (LiteSeg's two, forward and backward on a batch of 16: 127 to 134 ms in bf16 against
    30 to 35 ms in fp32 at 448 px, 60 against 10 ms at 256 px; ``bench/bench_train.py --no-clipseg``), while
    the forward costs about the same. Elsewhere (inference, GPUs,
    fp32) it is a plain ``nn.Conv2d``; the weights are the same either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float()).to(torch.get_autocast_dtype("cpu"))
        return super().forward(x)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    conv = StridedDepthwise if groups > 1 and stride > 1 else nn.Conv2d
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


def separable(c: int, plain: bool) -> nn.Sequential:
    """A 3x3 conv at width ``c``: plain, or depthwise + pointwise. On CPUs the depthwise form's extra
    memory-bound passes (norm, activation) cost more than its saved multiply-adds at high resolution."""
    return conv_bn(c, c, 3) if plain else nn.Sequential(conv_bn(c, c, 3, groups=c), conv_bn(c, c, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (stride 1 or 2), 1x1 project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                   conv_bn(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip and mix them (a 1x1 conv), two separable convs, FiLM from the prompt
    after the first."""

    def __init__(self, cin: int, skip: int, cout: int, cond_dim: int, plain: bool):
        super().__init__()
        self.fuse = conv_bn(cin + skip, cout, 1)
        self.conv1 = separable(cout, plain)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.conv2 = separable(cout, plain)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # fuse's 1x1 conv of cat(upsample(x), skip), computed as upsample(its x columns @ x) + its skip columns
        # @ skip, then fuse's batch norm and ReLU: the same function (a 1x1 conv commutes with bilinear
        # upsampling), x's part mixed at the lower resolution, no concatenation, a sixth to two fifths less time
        # per image on a CPU; same weights.
        conv, cin = self.fuse[0], x.shape[1]
        x = F.interpolate(F.conv2d(x, conv.weight[:, :cin].contiguous()), size=skip.shape[-2:], mode="bilinear",
                          align_corners=False)
        x = self.conv1(self.fuse[1:](x + F.conv2d(skip, conv.weight[:, cin:].contiguous(), conv.bias)))
        gamma, beta = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        x = x * (1 + gamma) + beta
        return x + self.conv2(x)


class PyramidContext(nn.Module):
    """PSPNet's pyramid pooling as a residual: the features averaged over ``bins`` x ``bins`` cells for each
    bin count, projected to a quarter of the width, upsampled and projected back, added to the input. It
    hands every position the whole photo's context (a large crack seen as one structure, not as pieces). The
    last projection starts at zero, so the block starts as the identity (scripts/add_context.py gives it to
    an existing model without changing its output). No batch norm: 1 x 1 cells of a one-image batch would
    break it."""

    def __init__(self, c: int, bins: list[int]):
        super().__init__()
        self.bins = list(bins)
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.ReLU(inplace=True)) for _ in bins)
        self.project = nn.Conv2d(len(bins) * (c // 4), c, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=False)
                  for b, branch in zip(self.bins, self.branches)]
        return x + self.project(torch.cat(pooled, dim=1))


class PromptEncoder(nn.Module):
    """UTF-8 bytes -> (B, cond_dim): byte embeddings, two 1-d convs, masked mean and max pooling, MLP."""

    def __init__(self, text_dim: int, cond_dim: int):
        super().__init__()
        self.embed = nn.Embedding(257, text_dim, padding_idx=0)  # 0 pads; byte b is b + 1
        self.convs = nn.ModuleList([nn.Conv1d(text_dim, text_dim, 3, padding=1) for _ in range(2)])
        self.out = nn.Sequential(nn.Linear(2 * text_dim, cond_dim), nn.ReLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].float()
        x = self.embed(ids).transpose(1, 2)  # (B, D, L)
        for conv in self.convs:
            x = (x + F.relu(conv(x))) * m
        mean = x.sum(-1) / m.sum(-1).clamp(min=1)
        peak = x.masked_fill(m == 0, -1e4).amax(-1)
        return self.out(torch.cat([mean, peak], dim=1))


class LiteSeg(nn.Module):
    """The model; see the module docstring. ``config`` is a ``LiteConfig``."""

    def __init__(self, config: LiteConfig):
        super().__init__()
        self.config = config
        enc, dec = config.enc, config.dec
        stages, cin = [], 3
        for i, (cout, depth) in enumerate(zip(enc, config.depth)):
            if i < config.plain:
                stages.append(nn.Sequential(conv_bn(cin, cout, 3, 2), *[conv_bn(cout, cout, 3) for _ in range(depth)]))
            else:
                stages.append(nn.Sequential(InvertedResidual(cin, cout, 2, config.expand),
                                            *[InvertedResidual(cout, cout, 1, config.expand) for _ in range(depth)]))
            cin = cout
        self.encoder = nn.ModuleList(stages)
        self.context = PyramidContext(enc[-1], config.context) if config.context else None
        self.prompt_encoder = PromptEncoder(config.text_dim, config.cond_dim)
        self.bottleneck_film = nn.Linear(config.cond_dim, 2 * enc[-1])
        skips = enc[-2::-1]  # strides 16, 8, 4, 2
        plain = [i >= len(dec) - config.plain for i in range(len(dec))]
        self.decoder = nn.ModuleList(DecoderBlock(c_in, s, c_out, config.cond_dim, p)
                                     for c_in, s, c_out, p in zip([enc[-1], *dec[:-1]], skips, dec, plain))
        self.head = nn.Sequential(separable(dec[-1], config.plain > 0), nn.Conv2d(dec[-1], 1, 1))
        nn.init.zeros_(self.bottleneck_film.weight)
        nn.init.zeros_(self.bottleneck_film.bias)

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) normalized float -> encoder features at strides 2..32, [(B, C_i, S/2^i, S/2^i)]."""
        x = pixel_values.to(memory_format=torch.channels_last)
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        if self.context is not None:
            feats[-1] = self.context(feats[-1])
        return feats

    def encode_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(P, L) byte ids and mask -> (P, cond_dim) conditioning vectors."""
        return self.prompt_encoder(input_ids, attention_mask)

    def decode(self, activations: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        """Encoder features and (B, cond_dim) conditioning -> (B, S, S) logits at the input size (twice the
        first features' size)."""
        x = activations[-1]
        gamma, beta = self.bottleneck_film(cond)[:, :, None, None].chunk(2, dim=1)
        x = x * (1 + gamma) + beta
        for block, skip in zip(self.decoder, activations[-2::-1]):
            x = block(x, skip, cond)
        logits = self.head(x)  # stride 2
        size = (2 * logits.shape[-2], 2 * logits.shape[-1])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        """HF-style forward, one prompt per image: returns an object with ``.logits`` (B, S, S)."""
        cond = self.encode_prompts(input_ids, attention_mask)
        return SimpleNamespace(logits=self.decode(self.encode_images(pixel_values), cond))

    # -- checkpoint folder ---------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LiteSeg:
        """Load a ``save_pretrained`` folder (strict: every weight present, of the config's shapes)."""
        folder = Path(folder)
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config = LiteConfig(**{k: v for k, v in raw.items() if k in LiteConfig.__dataclass_fields__})
        model = cls(config)
        weights = folder / WEIGHTS_FILE
        try:
            state = load_file(str(weights))
        except Exception as exc:  # truncated, not safetensors
            raise ValueError(f"{weights}: {exc}") from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # torch lists the mismatches after a first line naming only the class
            detail = " ".join(str(exc).split("\n")[1:]).split()
            raise ValueError(f"{weights} does not fit {folder / CONFIG_FILE}: {' '.join(detail)[:300]}") from exc
        return model.to(memory_format=torch.channels_last)


def build(arch: str, seed: int | None = None) -> tuple[LiteSeg, LiteProcessor]:
    """A fresh, randomly initialized model of a named size (``ARCHS``) and its processor."""
    if seed is not None:
        torch.manual_seed(seed)
    config = LiteConfig(**asdict(ARCHS[arch]))
    return LiteSeg(config).to(memory_format=torch.channels_last), LiteProcessor(config.image_size, config.max_prompt_bytes)


# -- processor: images and prompts -> model inputs -----------------------------------------------


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB -> (B, 3, S, S) float32, scaled to [0, 1] and normalized by ``MEAN``/``STD``."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) or (H, W) -> (size, size, ...): area averaging when shrinking, bilinear when enlarging.

    A long strip that shrinks along one side and grows along the other is resized one side at a time
    (cv2's area mode then samples the shrinking side sparsely, and a thin crack across it can vanish)."""
    h, w = image.shape[:2]
    if (h - size) * (w - size) < 0:
        image = cv2.resize(image, (w, size) if h > size else (size, h), interpolation=cv2.INTER_AREA)
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    shrink = size * size < h * w
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class LiteImageProcessor:
    """RGB uint8 images of any size -> ``{"pixel_values": (B, 3, S, S) float32}``, like HF's processors."""

    def __init__(self, size: int):
        self.size = {"height": size, "width": size}

    def __call__(self, images, return_tensors: str = "pt", input_data_format: str = "channels_last") -> dict:
        side = self.size["height"]
        return {"pixel_values": normalize(np.stack([resize_square(np.asarray(im), side) for im in images]))}

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": MEAN, "std": STD}


class ByteTokenizer:
    """Prompts -> UTF-8 byte ids (byte b is b + 1; 0 pads), like an HF tokenizer's ``__call__``. A prompt
    is read lowercased with its spaces collapsed (``normalize_prompt``), as prompts are looked up and as
    CLIP's tokenizer reads them: "SEGMENT  Crack" is "segment crack"."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, prompts, padding: bool = True, truncation: bool = True, return_tensors: str = "pt",
                 verbose: bool = True) -> BatchEncoding:
        keep = self.max_length if truncation else None
        encoded = [list(normalize_prompt(p).encode("utf-8"))[:keep] or [32] for p in prompts]
        length = max(len(e) for e in encoded)
        ids = torch.zeros(len(encoded), length, dtype=torch.long)
        mask = torch.zeros(len(encoded), length, dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e) + 1
            mask[i, : len(e)] = 1
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})  # a dict with .to(device)


class LiteProcessor:
    """``image_processor`` and ``tokenizer`` of a LiteSeg model. Everything it needs is in the model's
    config, so ``save_pretrained`` writes nothing."""

    def __init__(self, image_size: int, max_prompt_bytes: int):
        self.image_processor = LiteImageProcessor(image_size)
        self.tokenizer = ByteTokenizer(max_prompt_bytes)

    def save_pretrained(self, folder: str | Path) -> None:
        pass

    @classmethod
    def for_model(cls, model: LiteSeg) -> LiteProcessor:
        return cls(model.config.image_size, model.config.max_prompt_bytes)
