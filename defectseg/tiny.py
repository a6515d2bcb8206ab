"""A tiny random CLIPSeg checkpoint, made locally, for tests and offline smoke runs.

The checkpoint has the same architecture family as ``CIDAS/clipseg-rd64-refined`` (text and
vision CLIP towers, FiLM-conditioned decoder, "complex" transposed-convolution head) but with
tiny widths and depths, random weights, and a byte-level tokenizer that needs no merges file.
It loads back through the ordinary ``from_pretrained`` calls, so everything downstream (training,
inference, checkpointing) can be exercised without the Hugging Face Hub::

    python -m defectseg.tiny models/tiny --seed 0 --image-size 64
    python train.py --model models/tiny ...

Its predictions are meaningless; it exists to test plumbing, not quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TEXT_LENGTH = 77  # CLIP's context length; text position embeddings must cover it

# Tiny architecture. The vision tower has more layers than the deepest extract layer so that
# code which stops the vision encoder early is really tested.
HIDDEN = 32
PROJECTION_DIM = 16
TEXT_LAYERS = 2
VISION_LAYERS = 4
EXTRACT_LAYERS = [1, 2]
REDUCE_DIM = 16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (256 entries, all distinct).

    Printable latin-1 bytes map to themselves; the rest are shifted to code points 256+ so that
    every byte has a visible, non-whitespace character for the byte-level BPE vocabulary.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_level_vocab() -> dict[str, int]:
    """Vocabulary of the 256 byte characters, their ``</w>`` forms, then BOS and EOS (514 tokens).

    Same layout as the head of the real CLIP vocabulary; with no merges every word becomes one
    token per byte, so any prompt can be tokenized.
    """
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_vocab_files(vocab: dict[str, int], folder: Path) -> None:
    """Write ``vocab.json`` and an empty (header-only) ``merges.txt`` into ``folder``."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_tokenizer(vocab: dict[str, int]) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over ``vocab`` with no BPE merges, built from vocab.json/merges.txt files.

    Going through files (rather than constructor arguments, whose names differ between
    transformers versions) works for both the v4 slow/fast and the v5 tokenizers-backed class.
    """
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(vocab, Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TEXT_LENGTH)


def build_config(
    vocab_size: int, bos_id: int, eos_id: int, image_size: int, patch_size: int, complex_head: bool | None = None
) -> CLIPSegConfig:
    """Tiny ``CLIPSegConfig``: hidden 32, 2 text / 4 vision layers, extract layers [1, 2], reduce_dim 16.

    The "complex" transposed-convolution head (as in rd64-refined) upsamples by (patch_size // 4) ** 2,
    which only restores the input resolution for patch_size 16; other patch sizes use the simple head
    unless ``complex_head`` says otherwise (its logits are then of another size than the input).
    """
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_TEXT_LENGTH,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }
    vision_config = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    return CLIPSegConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=PROJECTION_DIM,
        extract_layers=list(EXTRACT_LAYERS),
        reduce_dim=REDUCE_DIM,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=2 * HIDDEN,
        conditional_layer=0,
        use_complex_transposed_convolution=patch_size == 16 if complex_head is None else complex_head,
    )


def build_image_processor(image_size: int) -> ViTImageProcessor:
    """The image processor CLIPSeg uses: resize to a square, rescale to [0, 1], CLIP mean/std."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def build_tiny_model(
    out_dir: str | Path, *, seed: int = 0, image_size: int = 64, patch_size: int = 16,
    complex_head: bool | None = None,
) -> Path:
    """Write a tiny random CLIPSeg model + processor into ``out_dir``; return ``out_dir`` as a Path.

    Deterministic for a given ``seed``. The result loads offline with
    ``CLIPSegForImageSegmentation.from_pretrained(out_dir)`` and ``CLIPSegProcessor.from_pretrained(out_dir)``.
    ``image_size`` must be a multiple of ``patch_size``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab = byte_level_vocab()
    tokenizer = build_tokenizer(vocab)
    config = build_config(len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN], image_size, patch_size, complex_head)

    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    processor = CLIPSegProcessor(image_processor=build_image_processor(image_size), tokenizer=tokenizer)

    model.save_pretrained(out)  # safetensors is the default serialization
    processor.save_pretrained(out)  # transformers 5 writes only tokenizer.json; 4.x's slow class wants:
    if not (out / "vocab.json").exists():
        write_vocab_files(vocab, out)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote tiny CLIPSeg (%d parameters, %dpx input) to %s", n_params, image_size, out)
    return out


# CIDAS/clipseg-rd64-refined's architecture (its config.json; transformers' CLIPSegConfig defaults differ:
# patch 32 and the simple head). Used by the benchmarks: speed does not depend on the weights.
RD64_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 8, "max_position_embeddings": MAX_TEXT_LENGTH}
RD64_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16}
RD64_DECODER = {"projection_dim": 512, "extract_layers": [3, 6, 9], "reduce_dim": 64,
                "decoder_num_attention_heads": 4, "decoder_intermediate_size": 2048, "conditional_layer": 0,
                "use_complex_transposed_convolution": True}
RD64_INPUT_SIZE = 352


def build_rd64_random(out_dir: str | Path, *, seed: int = 0) -> Path:
    """The rd64-refined architecture (150.7M parameters, 352 px input) with random weights and this
    module's byte-level tokenizer, saved like a real checkpoint. For benchmarks: nothing downloaded."""
    out = Path(out_dir)
    vocab = byte_level_vocab()
    eos = vocab[EOS_TOKEN]
    text = {**RD64_TEXT, "bos_token_id": vocab[BOS_TOKEN], "eos_token_id": eos, "pad_token_id": eos}
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(CLIPSegConfig(text_config=text, vision_config=RD64_VISION, **RD64_DECODER))
    processor = CLIPSegProcessor(image_processor=build_image_processor(RD64_INPUT_SIZE), tokenizer=build_tokenizer(vocab))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if not (out / "vocab.json").exists():  # transformers 4.x's slow tokenizer class reads these
        write_vocab_files(vocab, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m defectseg.tiny",
        description="Make a tiny random CLIPSeg checkpoint for offline smoke runs (predictions are meaningless).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (default 0)")
    parser.add_argument(
        "--image-size", type=int, default=64, help="processor input size in pixels (default 64)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = build_tiny_model(args.out_dir, seed=args.seed, image_size=args.image_size)
    except ValueError as err:  # e.g. an image size that is not a multiple of the patch size
        parser.error(str(err))
    logger.info("use it with --model %s", out)


if __name__ == "__main__":
    main()
