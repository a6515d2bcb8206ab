#!/usr/bin/env python
"""Training speed on the real CLIPSeg rd64-refined architecture (random weights, nothing downloaded).

    python bench/bench_train.py [--device auto] [--precision auto] [--batch-size 8]

Prints, in one run:
1. the seed-style loop: HF's ``model(input_ids, pixel_values)`` forward on every step (both CLIP towers
   run under no_grad inside it), BCE+Dice loss, backward and AdamW step on the decoder: samples/s;
2. the cached-feature loop train.py runs: activations read from the fp16 feature cache, decoder forward,
   loss, backward, step: samples/s, and the ratio of the two (target on a 2-core CPU: >= 12x);
3. the cost of building the cache per image view (truncated vision encoder + write), in the precision
   asked for and, on CPU, in bf16 too;
4. the training epoch time for a dataset of the real size (--dataset-images, default 6,000), cold cache
   (build 2 views per image, then train) and warm, estimated from the measured rates, and the cache's
   size on disk;
5. on CUDA, peak GPU memory of the cached loop;
6. the time to save one checkpoint as train.py does after every epoch (last/, and best/ when the score
   improves): the full save_pretrained folder plus the decoder file, flushed to disk, in --save-dir;
and the parameter counts and the size of the decoder-only file train.py writes;
7. LiteSeg from scratch (``bench_lite``): samples/s of the model step and of the augmentation, and from the
   two at 256, 384 and 448 px (the late epochs' batches drawn evenly from 384 and 448), how long the
   shipped recipe's training steps take (their sum where train.py makes
   batches between steps, as on a CPU; the slower where threads make them ahead, as on a GPU) (issue budget:
   90 minutes on a 2-core CPU, 5 on one H100/H200; measured at --batch-size, while the recipe trains at 16);
   on a CPU in bf16, what its stride-2 depthwise convs cost per batch in fp32 (as train.py runs them) and bf16.
Images are the bundled real samples; the model is built by ``defectseg.tiny.build_rd64_random``.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from defectseg import lite  # noqa: E402
from defectseg.augment import ImageBank  # noqa: E402
from defectseg.data import Sample  # noqa: E402
from defectseg.features import FeatureCache  # noqa: E402
from defectseg.inference import (  # noqa: E402
    PRECISIONS,
    Segmenter,
    autocast,
    precision_name,
    resolve_device,
    resolve_precision,
)
from defectseg.io import in_processes, list_images, load_image, prefetched  # noqa: E402
from defectseg.losses import segmentation_loss  # noqa: E402
from defectseg.model import base_fingerprint, count_parameters, save_checkpoint, save_decoder  # noqa: E402
from defectseg.tiny import build_rd64_random  # noqa: E402
from defectseg.training import TrainForward, _set_trainable, loader_threads  # noqa: E402

PROMPTS = ["segment crack", "segment taping area"]
# the Makefile's LITE_EPOCHS, LITE_LOW_RES_EPOCHS, LITE_LOW_RES_SIZE and LITE_TRAIN_SIZES (its LITE_MODEL:
# --lite-arch's default): the first 14 of 24 epochs at 256 px, each batch of the rest at 384 or 448
RECIPE_EPOCHS, RECIPE_LOW_RES_EPOCHS, RECIPE_LOW_RES_SIZE, RECIPE_TRAIN_SIZES = 24, 14, 256, (384, 448)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, steps: int, device: torch.device) -> float:
    """Seconds per step (mean of ``steps`` after one warm-up step)."""
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_rd64_random(Path(tmp) / "rd64")
        seg = Segmenter.load(str(folder), device=args.device, precision=args.precision)
        device, model = seg.device, seg.model
        cpu = platform.processor() or platform.machine()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu}, {torch.get_num_threads()} threads"
        print(f"device: {name}; precision: {precision_name(seg.amp_dtype)}; torch {torch.__version__}; batch {args.batch_size}")
        params = _set_trainable(model, 0)
        save_decoder(model, Path(tmp) / "decoder.safetensors", {}, base_model="rd64-random")
        print(f"parameters: {count_parameters(model) / 1e6:.1f} M, of which the decoder (trained) "
              f"{count_parameters(model, trainable_only=True) / 1e6:.2f} M; decoder file "
              f"{(Path(tmp) / 'decoder.safetensors').stat().st_size / 1e6:.1f} MB")
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        images = [load_image(p) for p in list_images(REPO / "sample_data" / "cracks" / "train")]
        images = (images * (args.batch_size // len(images) + 1))[: args.batch_size]
        target = torch.rand(args.batch_size, seg.input_size, seg.input_size, device=device).round()
        prompts = [PROMPTS[i % 2] for i in range(args.batch_size)]
        forward = TrainForward(model)
        model.train()

        def update(logits: torch.Tensor) -> None:
            loss = segmentation_loss(logits, target).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        tokens = seg.processor.tokenizer(prompts, padding=True, return_tensors="pt").to(device)

        def seed_step() -> None:  # what a from-scratch fine-tuning script does every step
            pixel_values = seg.pixel_values(images).to(device)
            with autocast(device, seg.amp_dtype):
                logits = forward(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                 pixel_values=pixel_values)
            update(logits)

        seed_s = timed_steps(seed_step, args.hf_steps, device)

        # Build the cache for the batch's images (both views), timing it per image view.
        paths = [str(p) for p in list_images(REPO / "sample_data" / "cracks" / "train")][: args.batch_size]
        cache = FeatureCache.for_segmenter(Path(tmp) / "features", seg, "fp16")
        model.eval()
        sync(device)
        start = time.perf_counter()
        built = cache.build(paths, (0, 1), seg.encode, seg.pixel_values, args.batch_size, desc="cache")
        sync(device)
        build_s = (time.perf_counter() - start) / built
        view_bytes = cache.path(paths[0], 0).stat().st_size
        build_bf16_s = None
        if device.type == "cpu" and args.precision in ("auto", "fp32"):
            seg.amp_dtype = torch.bfloat16
            other = FeatureCache.for_segmenter(Path(tmp) / "features", seg, "fp16")
            start = time.perf_counter()
            other.build(paths, (0, 1), seg.encode, seg.pixel_values, args.batch_size, desc="cache bf16")
            build_bf16_s = (time.perf_counter() - start) / built
            seg.amp_dtype = None
        model.train()
        items = [(paths[i % len(paths)], i % 2) for i in range(args.batch_size)]
        cond = seg.conditioning(prompts)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def cached_step() -> None:
            acts = [a.to(device, non_blocking=True) for a in cache.load(items)]
            with autocast(device, seg.amp_dtype):
                logits = forward(cond, activations=acts)
            update(logits)

        cached_s = timed_steps(cached_step, args.cached_steps, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

        with tempfile.TemporaryDirectory(dir=args.save_dir) as save_dir:
            fingerprint = base_fingerprint(model)  # once per run, as train.py does

            def save() -> None:
                save_checkpoint(model, seg.processor, Path(save_dir) / "last", {}, extra=lambda folder: save_decoder(
                    model, folder / "decoder.safetensors", {}, base_model="rd64-random", fingerprint=fingerprint))

            save_times = []
            for _ in range(3):
                start = time.perf_counter()
                save()
                save_times.append(time.perf_counter() - start)
            save_s = sorted(save_times)[1]  # the median
            save_bytes = sum(p.stat().st_size for p in (Path(save_dir) / "last").iterdir())

    b, n = args.batch_size, args.dataset_images
    seed_rate, cached_rate = b / seed_s, b / cached_s
    warm_epoch = n / cached_rate
    cold_epoch = warm_epoch + 2 * n * build_s
    print(f"seed-style loop (HF forward every step): {seed_rate:8.2f} samples/s  ({seed_s:.3f} s/step)")
    print(f"cached-feature loop (train.py):          {cached_rate:8.2f} samples/s  ({cached_s:.3f} s/step)")
    print(f"speed-up: {cached_rate / seed_rate:.1f}x (target >= 12x on a 2-core CPU)")
    print(f"cache build: {build_s:.3f} s per image view ({precision_name(seg.amp_dtype)})"
          + (f", {build_bf16_s:.3f} s in bf16" if build_bf16_s else ""))
    print(f"epoch over {n:,} images (estimated from the rates above): warm cache {warm_epoch:,.1f} s, "
          f"cold cache {cold_epoch:,.1f} s (building 2 views per image, then training)")
    print(f"cache on disk: {view_bytes / 1e6:.2f} MB per image view (fp16), {2 * n * view_bytes / 1e9:,.1f} GB for "
          f"{n:,} images x 2 views")
    if peak is not None:
        print(f"peak GPU memory, cached loop: {peak:.2f} GiB")
    print(f"checkpoint save (full folder {save_bytes / 1e6:,.0f} MB + decoder file, flushed to disk, in "
          f"{args.save_dir or tempfile.gettempdir()}): {save_s:.2f} s, per epoch for last/ and again for best/ "
          "when it improves")


def strided_depthwise_ms(model: lite.LiteSeg, batch: int, side: int) -> tuple[float, float]:
    """Milliseconds per training step that LiteSeg's stride-2 depthwise convs take, forward and backward, on
    a batch of ``side`` px images under bf16 autocast on this CPU: (as train.py runs them, in fp32 by
    ``lite.StridedDepthwise``; as plain bf16 convs would run)."""
    shapes: list[tuple[nn.Conv2d, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((m, i[0].shape)))
             for m in model.modules() if isinstance(m, lite.StridedDepthwise)]
    with torch.no_grad():
        model.encode_images(torch.zeros(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    inputs = [torch.randn(batch, *shape[1:], dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
              .requires_grad_() for _, shape in shapes]

    def ms(forward) -> float:
        def step() -> None:
            for (conv, _), x in zip(shapes, inputs):
                with autocast(torch.device("cpu"), torch.bfloat16):
                    y = forward(conv, x)
                y.float().sum().backward()
        return 1e3 * timed_steps(step, 3, torch.device("cpu"))

    return ms(lite.StridedDepthwise.forward), ms(nn.Conv2d.forward)


def bench_lite(args: argparse.Namespace) -> None:
    """LiteSeg from scratch as train.py trains it: augmented batches from images in memory, the whole
    model forward and backward, AdamW step; samples/s with and without the augmentation in the loop."""
    torch.manual_seed(0)
    model, processor = lite.build(args.lite_arch)
    device = resolve_device(args.device)
    model.to(device).train()
    amp = resolve_precision(args.precision, device, model)
    optimizer = torch.optim.AdamW(_set_trainable(model, 0), lr=1e-3)
    images = [load_image(p) for p in list_images(REPO / "sample_data" / "cracks" / "train")]
    masks = [(im.mean(axis=2) < 90).astype(np.uint8) for im in images]  # any mask: speed only
    bank = ImageBank(images, masks)
    b, size = args.batch_size, processor.image_processor.size["height"]
    plan = [Sample(i % len(images), i % 2, PROMPTS[i % 2], i % 5 == 0) for i in range(b)]
    tokens = {k: v.to(device) for k, v in processor.tokenizer([s.prompt for s in plan]).items()}
    threads = loader_threads(device, augmented=True) if args.loader_threads is None else args.loader_threads
    workers = args.augment_workers
    ahead = workers or threads  # batches made ahead of the step, by processes or threads
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    forward = torch.compile(TrainForward(model)) if args.compile else TrainForward(model)

    def step(pixel_values: torch.Tensor, target: torch.Tensor) -> None:
        with autocast(device, amp):
            logits = forward(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                         pixel_values=pixel_values)
        loss = segmentation_loss(logits, target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def seconds_per_batch(side: int) -> tuple[float, float]:
        """Seconds per batch at ``side`` px: (model step, augmentation as train.py makes batches here)."""
        fixed = [t.to(device) for t in bank.batch(plan, side, seed=0, epoch=0, start=0)]
        model_s = timed_steps(lambda: step(*fixed), args.lite_steps, device)
        n = max(args.lite_steps, 2 * ahead)

        def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return bank.batch(plan, side, seed=0, epoch=1, start=i * b)

        batches = in_processes(make, range(n + ahead), workers) if workers else prefetched(make, range(n + ahead), threads)
        for _ in itertools.islice(batches, ahead):  # the workers' start-up is not augmentation
            pass
        start = time.perf_counter()
        for _ in batches:
            pass
        return model_s, (time.perf_counter() - start) / n

    model_s, augment_s = seconds_per_batch(size)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    epoch = 2 * 2642  # train.py's epoch on the full exports: every crack image once, drywall oversampled to match
    low, late = RECIPE_LOW_RES_SIZE, RECIPE_TRAIN_SIZES
    combine = max if ahead else sum  # made ahead, overlapping the step; or between steps
    epoch_s = {size: epoch * combine((model_s, augment_s)) / b}
    for side in (low, *late):
        epoch_s.setdefault(side, epoch * combine(seconds_per_batch(side)) / b)
    late_epoch_s = sum(epoch_s[side] for side in late) / len(late)  # each batch's side drawn evenly from them
    recipe_s = RECIPE_LOW_RES_EPOCHS * epoch_s[low] + (RECIPE_EPOCHS - RECIPE_LOW_RES_EPOCHS) * late_epoch_s
    print(f"\nLiteSeg from scratch ({args.lite_arch}, {count_parameters(model) / 1e6:.2f} M parameters, {size}px, {precision_name(amp)}, "
          f"batch {b}{', torch.compile' if args.compile else ''}):")
    print(f"  model step (forward, backward, AdamW): {b / model_s:8.1f} samples/s")
    how = (f"in {workers} worker processes ahead of the step (--augment-workers)" if workers
           else f"on {threads} threads ahead of the step" if threads else "between steps")
    print(f"  augmentation {how}{' (as train.py here)' if args.loader_threads is None and not workers else ''}: "
          f"{b / augment_s:8.1f} samples/s")
    print(f"  epoch of {epoch:,} samples (full exports), {'the slower of the two' if ahead else 'the two in turn'}: "
          + ", ".join(f"{seconds:,.0f} s at {side} px" for side, seconds in epoch_s.items())
          + (f"; peak GPU memory {peak:.2f} GiB" if peak else ""))
    print(f"  the shipped recipe (make train-lite: {RECIPE_EPOCHS} epochs, the first {RECIPE_LOW_RES_EPOCHS} at {low} px, "
          f"each batch of the rest at {' or '.join(map(str, late))} px), "
          f"its training steps alone (validation not counted): {recipe_s / 60:,.1f} min")
    if device.type == "cpu" and amp == torch.bfloat16:
        for side in epoch_s:
            fp32_ms, bf16_ms = strided_depthwise_ms(model, b, side)
            print(f"  its stride-2 depthwise convs, forward and backward, per {side} px batch: {fp32_ms:.0f} ms in fp32 "
                  f"(lite.StridedDepthwise, as train.py runs them here), {bf16_ms:.0f} ms in bf16")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="as train.py (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (default: %(default)s)")
    parser.add_argument("--hf-steps", type=int, default=3, help="timed seed-style steps (default: %(default)s)")
    parser.add_argument("--cached-steps", type=int, default=30, help="timed cached steps (default: %(default)s)")
    parser.add_argument("--dataset-images", type=int, default=6000, help="dataset size for the epoch estimate")
    parser.add_argument("--save-dir", default=None,
                        help="where to time checkpoint saves (default: the system's temp folder; pick the disk "
                             "your runs/ are on)")
    parser.add_argument("--lite-steps", type=int, default=5, help="timed LiteSeg steps (default: %(default)s)")
    parser.add_argument("--lite-arch", default="lite-ctx", choices=sorted(lite.ARCHS),
                        help="the LiteSeg preset to time, as train.py --model (default: %(default)s)")
    parser.add_argument("--loader-threads", type=int, default=None,
                        help="threads that make LiteSeg's augmented batches ahead of the step (default: train.py's "
                             "choice on this device: 0 on a CPU, batches made between steps)")
    parser.add_argument("--augment-workers", type=int, default=0,
                        help="make LiteSeg's augmented batches in N forked processes, as train.py --augment-workers "
                             "(default: 0, threads or between steps as --loader-threads says)")
    parser.add_argument("--compile", action="store_true",
                        help="time LiteSeg's step under torch.compile (train.py does not compile; the first step "
                             "at each size, compilation included, is not timed)")
    parser.add_argument("--no-clipseg", dest="clipseg", action="store_false", help="only the LiteSeg part")
    args = parser.parse_args()
    if args.clipseg:
        main(args)
    bench_lite(args)
