#!/usr/bin/env python
"""Inference speed of both model families: the real CLIPSeg rd64-refined architecture (random weights,
nothing downloaded) and LiteSeg (the shipped checkpoint, models/liteseg), in the same run.

    python bench/bench_inference.py [--device auto] [--precision auto] [--iters 3] [--images 32]
        [--lite-model DIR] [--no-clipseg]

The model has CIDAS/clipseg-rd64-refined's architecture (ViT-B/16 vision tower, 12-layer text tower,
rd64 decoder with the refined head, 352x352 input, 150.7M parameters) and random weights: speed does not
depend on the weights. It is saved to a temp folder and loaded through ``Segmenter.load``, so the code
users run is what is measured. The tokenizer is ``defectseg.tiny``'s byte-level one (prompts are a few
tokens longer than with CLIP's BPE, which only makes the naive path below slower by a little).

1. Warm latency per image (median of --iters runs after a warm-up), batch 1 and 8, 1 and 2 prompts, from
   RGB arrays to full-size binary masks:
   - segmenter: ``Segmenter.predict``, vision encoder once per image, decoder once per prompt;
   - naive HF: ``model(input_ids, attention_mask, pixel_values)``, each image repeated once per prompt
     (the whole vision and text towers run for every image-prompt pair), then the same upsampling.
   LiteSeg's target: at most 25 ms per 640x640 image and prompt at batch 1 on a CPU.
2. LiteSeg's test-time augmentation (``--tta``: none, flip, d4), and its batch norms folded into the convs
   at load (what ``Segmenter.load`` does) against not folded: batch 1, one prompt, per image.
3. End to end: ``predict.main`` on a folder of --images 640x640 JPEGs (the bundled samples, flipped and
   rotated into distinct files), 2 prompts; images/s as predict.py reports it (model loading excluded).
4. Scoring, as evaluate.py and train.py's validation do it (``evaluation.score_probabilities``: the
   19-threshold sweep and both prompts' counts) on 640x640 maps, per image in one thread and in the
   threads it uses (``io.cores_per_process``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import predict  # noqa: E402
from defectseg import evaluation, lite, tiny  # noqa: E402
from defectseg.cli import int_at_least  # noqa: E402
from defectseg.inference import (  # noqa: E402
    PRECISIONS,
    TTA_VIEWS,
    Segmenter,
    autocast,
    precision_name,
    resolve_device,
)
from defectseg.io import cores_per_process, list_images, load_image  # noqa: E402
from defectseg.metrics import binarize, default_thresholds  # noqa: E402
from defectseg.model import SHIPPED_MODEL, ModelLoadError, load_model  # noqa: E402

PROMPTS = ["segment crack", "segment taping area"]
SAMPLE = REPO / "sample_data"
TARGET_RATIO = 1.2  # 2 prompts may cost at most this much more than 1 (Segmenter path)
LITE_TARGET_MS = 25.0  # LiteSeg, batch 1, one prompt, RGB array to full-size mask, on a CPU

def checkpoint_folder(text: str) -> Path:
    """--lite-model's type: a folder load_model reads as a LiteSeg, else a one-line usage error."""
    try:
        model, _ = load_model(text)
    except ModelLoadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(model, lite.LiteSeg):
        raise argparse.ArgumentTypeError(f"{text}: not a LiteSeg checkpoint ({type(model).__name__})")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="as predict.py (default: %(default)s)")
    parser.add_argument("--iters", type=int_at_least(1), default=3,
                        help="timed runs per measurement, after one warm-up (default: %(default)s)")
    parser.add_argument("--images", type=int_at_least(1), default=32,
                        help="JPEGs for the end-to-end run (default: %(default)s)")
    parser.add_argument("--workers", type=int_at_least(0), default=predict.build_parser().get_default("workers"),
                        help="predict.py --workers for the end-to-end run (default: %(default)s, as predict.py)")
    parser.add_argument("--lite-model", type=checkpoint_folder, default=None,
                        help="the LiteSeg checkpoint folder to time (default: the shipped models/liteseg)")
    parser.add_argument("--no-clipseg", dest="clipseg", action="store_false", help="only the LiteSeg part")
    return parser


@torch.no_grad()
def naive_logits(seg: Segmenter, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
    """The plain HF forward, every image repeated once per prompt: (B * P, S, S), image-major."""
    pixel_values = seg.pixel_values(images).repeat_interleave(len(prompts), dim=0).to(seg.device)
    tokens = seg.processor.tokenizer(prompts * len(images), padding=True, return_tensors="pt").to(seg.device)
    with autocast(seg.device, seg.amp_dtype):
        logits = seg.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           pixel_values=pixel_values).logits
    return (logits if logits.dim() == 3 else logits[None]).float()  # some transformers versions squeeze B == 1


def naive_masks(seg: Segmenter, images: list[np.ndarray], prompts: list[str]) -> list[np.ndarray]:
    """Full-size binary masks the naive way (same upsampling and threshold as ``Segmenter.predict``)."""
    probs = seg.upsample(naive_logits(seg, images, prompts), [im.shape[:2] for im in images for _ in prompts])
    return [binarize(prob, 0.5) for prob in probs]


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_seconds(runs: dict[str, Callable[[], object]], iters: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each run over ``iters`` timings, after one warm-up each. The runs take turns, so a
    slow spell of a shared machine hits all of them alike instead of skewing one."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bench_latency(seg: Segmenter, images: list[np.ndarray], iters: int, ratio_target: float | None) -> dict[str, float]:
    """Print the per-image latency table (ms) and the cost of a second prompt on each path (against
    ``ratio_target`` where there is one: CLIPSeg's encoder dominates, LiteSeg's decoder is a large share);
    returns batch 1's milliseconds per image by path."""
    activations = seg.encode(seg.pixel_values(images[:1]))
    ours = torch.cat([seg.logits(activations, p) for p in PROMPTS])
    naive = naive_logits(seg, images[:1], PROMPTS)
    print(f"check: Segmenter vs naive HF logits, max |difference| / max |logit| = "
          f"{float((ours - naive).abs().max() / naive.abs().max()):.1e}")

    print(f"\n{'batch':>5} {'prompts':>7} {'segmenter ms/img':>17} {'naive HF ms/img':>16} {'naive/segmenter':>16}")
    for batch in (1, 8):
        batch_images = [images[i % len(images)] for i in range(batch)]
        runs = {}
        for n in (1, 2):
            runs[f"segmenter {n}"] = partial(seg.predict, batch_images, PROMPTS[:n])
            runs[f"naive {n}"] = partial(naive_masks, seg, batch_images, PROMPTS[:n])
        ms = {name: 1000 * t / batch for name, t in median_seconds(runs, iters, seg.device).items()}
        for n in (1, 2):
            print(f"{batch:>5} {n:>7} {ms[f'segmenter {n}']:>17.1f} {ms[f'naive {n}']:>16.1f} "
                  f"{ms[f'naive {n}'] / ms[f'segmenter {n}']:>15.2f}x")
        ratio = ms["segmenter 2"] / ms["segmenter 1"]
        verdict = "" if ratio_target is None else \
            f" ({'meets' if ratio <= ratio_target else 'MISSES'} the {ratio_target}x target)"
        print(f"      batch {batch}: 2 prompts cost {ratio:.2f}x one with Segmenter{verdict}, "
              f"{ms['naive 2'] / ms['naive 1']:.2f}x with the naive forward", flush=True)
        if batch == 1:
            first = ms
    return first


def bench_variants(model_dir: Path, args: argparse.Namespace) -> None:
    """Two costs of a small model, batch 1, one prompt, ms per image, median of 5 x --iters runs taken in
    turns: ``--tta`` (none, flip, d4), and the batch norms folded into their convs at load or not (a
    segmenter built around ``load_model``'s model, as training builds it)."""
    image = load_image(sorted(SAMPLE.glob("*/valid/*.jpg"))[0])
    segs = {tta or "none": Segmenter.load(str(model_dir), args.device, args.precision, tta=tta)
            for tta in (None, *TTA_VIEWS)}
    device = segs["none"].device
    segs["unfolded"] = Segmenter(*load_model(model_dir, device), device, segs["none"].amp_dtype)
    ms = {name: 1000 * t for name, t in median_seconds(
        {name: partial(seg.predict, [image], PROMPTS[:1]) for name, seg in segs.items()}, 5 * args.iters, device).items()}
    print("\n--tta, batch 1, 1 prompt, ms per image: " + ", ".join(
        f"{name} {ms[name]:.1f} ({ms[name] / ms['none']:.1f}x)" for name in ("none", *TTA_VIEWS)))
    print(f"batch norms folded into the convs at load: {ms['none']:.1f} ms per image; not folded: "
          f"{ms['unfolded']:.1f} ms ({ms['unfolded'] / ms['none']:.2f}x)", flush=True)


def write_jpegs(folder: Path, count: int) -> None:
    """``count`` distinct 640x640 JPEGs: the bundled samples, then their flips and rotations."""
    sources = sorted(p for split in SAMPLE.glob("*/*") if split.is_dir() for p in list_images(split))
    variants = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90]
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.fromarray(load_image(sources[i % len(sources)]))
        variant = variants[(i // len(sources)) % len(variants)]
        (image if variant is None else image.transpose(variant)).save(folder / f"img{i:04d}.jpg", quality=90)


def bench_end_to_end(model_dir: Path, folder: Path, args: argparse.Namespace) -> None:
    out = folder.parent / f"predictions-{model_dir.name}"
    argv = ["--image", str(folder), "--model", str(model_dir), "--out", str(out), "--device", args.device,
            "--precision", args.precision, "--batch-size", "8", "--workers", str(args.workers), "-q"]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    start = time.perf_counter()
    code = predict.main(predict.build_parser().parse_args(argv))
    wall = time.perf_counter() - start
    report = json.loads((out / predict.PREDICT_CONFIG_FILE).read_text())
    print(f"\nend to end: predict.py, {report['images']} JPEGs 640x640 x {len(PROMPTS)} prompts, batch 8, "
          f"--workers {args.workers}: "
          f"{report['images_per_second']:.2f} images/s ({report['seconds']:.1f} s; {wall:.1f} s with model loading), "
          f"{report['masks_written']} masks, exit code {code}")


def lite_model(folder: Path) -> Path:
    """The shipped LiteSeg checkpoint, or (where it is missing) its architecture (``lite-ctx``, as its
    config.json records) with random weights."""
    if (SHIPPED_MODEL / "model.safetensors").is_file():
        return SHIPPED_MODEL
    model, _ = lite.build("lite-ctx")
    model.save_pretrained(folder)
    return folder


def bench_model(title: str, model_dir: Path, tmp: Path, args: argparse.Namespace,
                ratio_target: float | None = None) -> dict[str, float]:
    """Latency table and end-to-end run of one model; returns batch 1's milliseconds per image by path."""
    seg = Segmenter.load(str(model_dir), args.device, args.precision)
    n_params = seg.parameter_counts["parameters"]
    print(f"\n== {title}: {n_params / 1e6:.2f}M parameters, {seg.input_size}px input, precision "
          f"{precision_name(seg.amp_dtype)}; images: bundled 640x640 JPEGs; median of {args.iters} warm runs")
    images = [load_image(p) for p in sorted(SAMPLE.glob("*/valid/*.jpg"))]
    if seg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(seg.device)
    ms = bench_latency(seg, images, args.iters, ratio_target)
    if seg.device.type == "cuda":
        print(f"peak GPU memory, latency runs: {torch.cuda.max_memory_allocated(seg.device) / 2**30:.2f} GiB")
    del seg
    folder = tmp / f"images-{model_dir.name}"
    write_jpegs(folder, args.images)
    bench_end_to_end(model_dir, folder, args)
    return ms


def bench_scoring(n: int = 32) -> None:
    """Milliseconds per 640x640 image of ``score_probabilities`` in one thread and in its own threads."""
    rng = np.random.default_rng(0)
    rows = [{"image": f"{i}.jpg", "mask": f"{i}.png", "task": "cracks", "prompt": "segment crack"} for i in range(n)]
    targets = [rng.random((640, 640)) < 0.05 for _ in range(n)]
    probs, others = ([rng.random((640, 640), dtype=np.float32) for _ in range(n)] for _ in range(2))

    def score(part: slice) -> None:
        evaluation.score_probabilities(rows[part], targets[part], probs[part], lambda p: 0.5, default_thresholds(),
                                       ["segment taping area"] * len(rows[part]), others[part])

    cpu = torch.device("cpu")
    one = seconds(lambda: [score(slice(i, i + 1)) for i in range(n)], cpu) / n * 1e3  # one image: one thread
    ms = seconds(lambda: score(slice(None)), cpu) / n * 1e3
    threads = min(n, cores_per_process())
    print(f"\nscoring (evaluate.py, validation), ms per 640x640 image: {one:.1f} in 1 thread, {ms:.1f} in {threads}")


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = resolve_device(args.device)
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads, transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        if args.clipseg:
            bench_model("CLIPSeg, rd64-refined architecture, random weights",
                        tiny.build_rd64_random(Path(tmp) / "rd64-random"), Path(tmp), args, TARGET_RATIO)
        model_dir = args.lite_model or lite_model(Path(tmp) / "liteseg-random")
        name = args.lite_model or ("shipped" if model_dir == SHIPPED_MODEL else "random weights")
        ms = bench_model(f"LiteSeg ({name})", model_dir, Path(tmp), args)
        bench_variants(model_dir, args)
        verdict = "meets" if ms["segmenter 1"] <= LITE_TARGET_MS else "MISSES"
        print(f"LiteSeg, batch 1, 1 prompt: {ms['segmenter 1']:.1f} ms per image from RGB array to full-size mask "
              f"({verdict} the {LITE_TARGET_MS:.0f} ms target)")
    bench_scoring()
    print(f"\nbenchmark took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
