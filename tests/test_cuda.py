"""The CUDA paths: inference and training on a GPU in every precision. Skipped where torch sees no CUDA
device (CI); `bash bench/gpu.sh` runs them on a GPU machine before the budget run or the benchmarks."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE

import predict
import train
from defectseg.data import batch_targets, epoch_plan, load_rows, load_targets
from defectseg.features import FeatureCache, view_of
from defectseg.inference import Segmenter, resolve_precision
from defectseg.io import load_image, read_mask_png
from defectseg.losses import segmentation_loss
from defectseg.model import SHIPPED_MODEL, load_model, read_metadata
from defectseg.tasks import DEFAULT_TASKS
from defectseg.tiny import build_tiny_model
from defectseg.training import TrainForward, _rng_state, _set_rng_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PROMPTS = ["segment crack", "segment taping area"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 on the GPU as on the CPU: cuDNN computes fp32 convolutions in TF32 by default, about 1e-3 relative,
    which the tiny random CLIPSeg's logits of a few hundred turn into probability differences of a few
    hundredths; the comparisons below are of the code, not of TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def probabilities(model_dir: Path, device: str, precision: str) -> dict[str, list[np.ndarray]]:
    images = [load_image(p) for p in sorted((SAMPLE / "drywall" / "valid").glob("*.jpg"))[:3]]
    seg = Segmenter.load(str(model_dir), device=device, precision=precision)
    return seg.probabilities(seg.encode(seg.pixel_values(images)), [im.shape[:2] for im in images], PROMPTS)


def test_auto_precision_on_this_gpu():
    """bf16 only where the GPU computes it natively (compute capability 8.0+), else fp16."""
    device = torch.device("cuda")
    native = torch.cuda.get_device_capability(device) >= (8, 0)
    assert resolve_precision("auto", device) is (torch.bfloat16 if native else torch.float16)


def test_cuda_fp32_inference_matches_cpu(tiny):
    cpu, gpu = probabilities(tiny, "cpu", "fp32"), probabilities(tiny, "cuda", "fp32")
    for prompt in PROMPTS:
        for a, b in zip(cpu[prompt], gpu[prompt]):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=2e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_cuda_reduced_precision_inference_is_close_to_fp32(tiny, precision):
    full, half = probabilities(tiny, "cuda", "fp32"), probabilities(tiny, "cuda", precision)
    for prompt in PROMPTS:
        for a, b in zip(full[prompt], half[prompt]):
            assert b.dtype == np.float32 and np.isfinite(b).all()
            assert np.mean(np.abs(a - b)) < 0.05


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_liteseg_is_close_to_fp32_on_the_cpu(precision):
    """The shipped LiteSeg (its batch norms folded into the convs at load, on each device) on the GPU in each
    precision, against fp32 on the CPU: mean |difference| of the probabilities."""
    cpu, gpu = probabilities(SHIPPED_MODEL, "cpu", "fp32"), probabilities(SHIPPED_MODEL, "cuda", precision)
    for prompt in PROMPTS:
        for a, b in zip(cpu[prompt], gpu[prompt]):
            assert a.shape == b.shape and b.dtype == np.float32 and np.isfinite(b).all()
            assert np.mean(np.abs(a - b)) < (2e-3 if precision == "fp32" else 0.05)


def test_cuda_cached_loss_equals_plain_hf_forward(processed, tiny, tmp_path):
    model, processor = load_model(tiny, torch.device("cuda"))
    seg = Segmenter(model, processor, torch.device("cuda"), tasks=dict(DEFAULT_TASKS))
    rows = load_rows(processed, "train")
    cache = FeatureCache.for_segmenter(tmp_path / "features", seg, "fp32")
    cache.build([r["image"] for r in rows], (0, 1), seg.encode, seg.pixel_values, 8)
    batch = epoch_plan(rows, list(DEFAULT_TASKS.values()), seed=3, epoch=0, negative_prob=0.3, flip=True)[:6]
    target = torch.from_numpy(batch_targets(load_targets(rows, seg.input_size), batch)).cuda()
    cond = seg.conditioning([s.prompt for s in batch])
    acts = [a.cuda() for a in cache.load([(rows[s.row]["image"], s.view) for s in batch])]
    cached = TrainForward(model)(cond, activations=acts)
    tokens = processor.tokenizer([s.prompt for s in batch], padding=True, return_tensors="pt").to("cuda")
    images = [view_of(load_image(rows[s.row]["image"]), s.view) for s in batch]
    plain = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                  pixel_values=seg.pixel_values(images).cuda()).logits
    torch.testing.assert_close(cached, plain, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(segmentation_loss(cached, target).mean(), segmentation_loss(plain, target).mean(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision,extra", [
    ("fp32", []),
    ("bf16", []),
    ("fp16", []),  # GradScaler
    ("fp16", ["--no-cache"]),  # HF forward under autocast
    ("bf16", ["--train-vision-layers", "1", "--ema", "0.9"]),
])
def test_cuda_training_runs_and_its_checkpoint_serves_predict(processed, tiny, tmp_path, precision, extra):
    run = tmp_path / "run"
    argv = ["--data", str(processed), "--model", str(tiny), "--out", str(run), "--epochs", "2",
            "--batch-size", "8", "--lr", "3e-3", "--device", "cuda", "--precision", precision,
            "--cache-dir", str(tmp_path / "features"), "--stop-after", "1", "-q", *extra]
    assert train.main(train.build_parser().parse_args(argv)) == 0
    assert train.main(train.build_parser().parse_args(["--resume", str(run), "-q"])) == 0  # state onto CUDA
    with open(run / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    assert [r["epoch"] for r in history] == ["1", "2"]
    for r in history:
        assert math.isfinite(float(r["train_loss"])) and int(r["skipped_steps"]) == 0, r
        assert 0.0 <= float(r["mean_iou"]) <= 1.0
    assert read_metadata(run / "best")["train_config"]["precision"] == precision
    # A GPU-trained checkpoint serves predict.py on the GPU and loads on the CPU.
    image = sorted((SAMPLE / "cracks" / "valid").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    assert predict.main(predict.build_parser().parse_args(
        ["--model", str(run / "best"), "--image", str(image), "--prompt", "segment crack", "--out", str(out),
         "--device", "cuda", "--precision", precision, "-q"])) == 0
    assert read_mask_png(out / f"{image.stem}__segment_crack.png").shape == load_image(image).shape[:2]
    Segmenter.load(str(run / "best"), device="cpu")


def test_gpu_run_resumes_on_the_cpu(processed, tiny, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(processed), "--model", str(tiny), "--out", str(run), "--epochs", "2",
              "--batch-size", "8", "--cache-dir", str(tmp_path / "features"), "-q"]
    assert train.main(train.build_parser().parse_args([*common, "--device", "cuda", "--stop-after", "1"])) == 0
    assert train.main(train.build_parser().parse_args(["--resume", str(run), "--device", "cpu", "-q"])) == 0
    with open(run / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_a_run_saved_on_more_gpus_resumes_on_fewer():
    """last/ of a run on a 2-GPU node holds one CUDA RNG state per GPU; a 1-GPU machine takes its first
    (torch's set_rng_state_all raised IndexError on the second)."""
    state = _rng_state()
    state["cuda"] = [*state["cuda"], *state["cuda"]] + [state["cuda"][0]]
    torch.cuda.manual_seed_all(12345)  # moves the generators away from the saved state
    assert not torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])
    _set_rng_state(state)
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])


def _lite_steps(processed, out: Path, n: int, sizes=(64,), **settings):
    """A lite-tiny run set up as train.py does, and its first ``n`` batches on the GPU (image side cycling
    through ``sizes``), as (batch, target, inputs)."""
    from defectseg.training import TrainConfig, _load_batch, _set_up

    cfg = TrainConfig(data=str(processed), model="lite-tiny", out=str(out), batch_size=4, device="cuda", **settings)
    run = _set_up(cfg, resume=False)
    plan = epoch_plan(run.train_rows, run.tasks, cfg.seed, 0, cfg.negative_prob, cfg.flip, cfg.synonyms)
    steps = []
    for i in range(n):
        batch = [plan[(4 * i + j) % len(plan)] for j in range(4)]
        target, inputs = _load_batch((4 * i, batch), cfg, run.train_rows, run.targets, run.cache, run.segmenter,
                                     run.bank, 0, lambda start, i=i: sizes[i % len(sizes)])
        steps.append((batch, target.cuda(), {k: v.cuda() for k, v in inputs.items()}))
    return run, steps


@pytest.mark.parametrize("precision,graphs", [("bf16", True), ("bf16", False), ("fp16", False)])
def test_a_training_step_reads_nothing_back_from_the_gpu(processed, tmp_path, precision, graphs):
    """_step (forward, loss, backward, unscale, clip, fused AdamW's skip on the device, schedule; or the
    replay of its CUDA graph) makes no synchronizing call, so the GPU never waits for the host between
    steps (the epoch reads its losses and skip flags every CHECK_EVERY steps)."""
    from defectseg.graphs import WARMUP
    from defectseg.training import _step

    run, steps = _lite_steps(processed, tmp_path / "run", 6, precision=precision, cuda_graphs=graphs)
    assert (run.graphs is not None) == graphs
    first = WARMUP + 1 if graphs else 1  # lazy state (optimizer moments, scaler); with graphs, the recording
    for step in steps[:first]:
        _step(run, *step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps[first:]:
            _step(run, *step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert run.scheduler.last_epoch == 6
    assert len(run.graphs.graphs) == 1 if graphs else run.graphs is None


def test_a_replayed_step_is_the_eager_step(processed, tmp_path):
    """A step replayed from its CUDA graph equals the same step launched one by one from the same state:
    same loss and batch-norm statistics (this batch's inputs, not the recorded one's), same AdamW moments
    (same gradients, clipped alike); and its weights are AdamW's update at the learning rate of that step
    (the schedule's, which rose since the recording). Whole runs are not compared: two runs that differ
    in rounding alone drift apart by about 1% in loss within 12 steps of this tiny model (the CPU and the
    GPU do), so only a single step from one state can be held to a tight tolerance."""
    from defectseg.graphs import WARMUP
    from defectseg.training import _padded_prompts, _step, _update

    run, steps = _lite_steps(processed, tmp_path / "run", WARMUP + 5, precision="fp32", cuda_graphs=True,
                             warmup=0.5, epochs=40)
    for step in steps[:-1]:  # warm-up, recording, replays
        _step(run, *step)
    assert len(run.graphs.graphs) == 1
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    moments = [run.optimizer.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    stats = [b for b in run.model.buffers() if b.is_floating_point()]
    state = [*params, *moments, *stats, *(run.optimizer.state[p]["step"] for p in params)]
    before = [t.detach().clone() for t in state]
    lrs = [float(group["lr"]) for group in run.optimizer.param_groups]
    assert lrs[0] > 1.5 * run.scheduler.base_lrs[0] * run.scheduler.lr_lambdas[0](WARMUP)  # rose since the recording

    batch, target, inputs = steps[-1]
    eager_loss = _update(run, target, **_padded_prompts(inputs, run.processor.tokenizer.max_length))[0]
    eager = [t.detach().clone() for t in state]
    with torch.no_grad():
        for t, saved in zip(state, before):
            t.copy_(saved)
    graph_loss = _step(run, batch, target, inputs)[0]

    torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-5, atol=1e-6)
    n, k = len(params), len(moments)
    for i in range(n, n + k, 2):  # AdamW's moments; rounding noise where a gradient should be 0 (a bias before a batch norm)
        torch.testing.assert_close(state[i], eager[i], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(state[i + 1], eager[i + 1], rtol=1e-2, atol=1e-10)
    for i in range(n + k, n + k + len(stats)):
        torch.testing.assert_close(state[i], eager[i], rtol=1e-4, atol=1e-6)
    old = iter(before)
    for group, lr in zip(run.optimizer.param_groups, lrs):
        (beta1, beta2), eps, decay = group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            s, previous = run.optimizer.state[p], next(old)
            t = float(s["step"])
            m_hat, v_hat = s["exp_avg"] / (1 - beta1 ** t), s["exp_avg_sq"] / (1 - beta2 ** t)
            torch.testing.assert_close(p.detach(), previous * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps),
                                       rtol=1e-5, atol=1e-7)


def test_cuda_graph_run_resumes_and_serves_predict(processed, tmp_path):
    """train.py with LiteSeg on the GPU with --cuda-graphs, stopped and resumed on the GPU, then resumed
    from the GPU-trained state on the CPU; its checkpoint serves predict.py."""
    run = tmp_path / "run"
    common = ["--data", str(processed), "--model", "lite-tiny", "--out", str(run), "--epochs", "3",
              "--batch-size", "4", "--low-res-epochs", "1", "--low-res-size", "64", "--cuda-graphs", "-q"]
    assert train.main(train.build_parser().parse_args([*common, "--device", "cuda", "--stop-after", "1"])) == 0
    assert train.main(train.build_parser().parse_args(["--resume", str(run), "--stop-after", "1", "-q"])) == 0
    assert train.main(train.build_parser().parse_args(["--resume", str(run), "--device", "cpu", "-q"])) == 0
    with open(run / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    assert [(r["epoch"], r["device"]) for r in history] == [("1", "cuda"), ("2", "cuda"), ("3", "cpu")]
    assert all(math.isfinite(float(r["train_loss"])) and int(r["skipped_steps"]) == 0 for r in history)
    image = sorted((SAMPLE / "cracks" / "valid").glob("*.jpg"))[0]
    assert predict.main(predict.build_parser().parse_args(
        ["--model", str(run / "best"), "--image", str(image), "--prompt", "segment crack", "--out",
         str(tmp_path / "pred"), "--device", "cuda", "-q"])) == 0
