"""LiteSeg, the model trained from scratch: its parts, all four scripts on a tiny width, the shipped
checkpoint's regression floor."""

from __future__ import annotations

import bisect
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE
from test_train import history, run_train

import evaluate
import predict
from defectseg import lite
from defectseg.augment import ImageBank, augment
from defectseg.data import epoch_length, epoch_plan, load_rows
from defectseg.inference import Segmenter
from defectseg.io import load_image, read_mask_png
from defectseg.model import SHIPPED_MODEL, decode, encode_images, encode_prompts, load_model, read_metadata
from defectseg.tasks import DEFAULT_TASKS

# The shipped model's floor on the bundled sample's 8 valid images (4 per task): it scores 0.459 (cracks)
# and 0.835 (drywall) there in bf16 on this project's CPU, 0.458 / 0.835 in fp32 (on all 201 / 202 valid
# images: 0.511 / 0.762); a retrained or broken checkpoint that falls below fails.
SHIPPED_FLOOR = {"cracks": 0.40, "drywall": 0.75}


def tiny_run(processed: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(processed), "--model", "lite-tiny", "--out", str(out), "--batch-size", "4", "-q", *extra]


# -- the model ----------------------------------------------------------------------------------


def test_split_forward_equals_forward_and_shapes():
    model, processor = lite.build("lite-tiny", seed=0)
    model.eval()
    images = [np.random.default_rng(i).integers(0, 255, (50 + 30 * i, 70, 3), dtype=np.uint8) for i in range(2)]
    pixels = processor.image_processor(images)["pixel_values"]
    size = model.config.image_size
    assert pixels.shape == (2, 3, size, size) and pixels.dtype == torch.float32
    tokens = processor.tokenizer(["segment crack", "segment taping area"])
    with torch.no_grad():
        whole = model(tokens["input_ids"], tokens["attention_mask"], pixels).logits
        acts = encode_images(model, pixels)
        cond = encode_prompts(model, processor, ["segment crack", "segment taping area"])
        split = decode(model, acts, cond)
    assert [a.shape[-1] for a in acts] == [size // 2, size // 4, size // 8, size // 16, size // 32]
    assert whole.shape == (2, size, size)
    torch.testing.assert_close(split, whole)


def test_strided_depthwise_trains_in_fp32_on_a_cpu_and_is_a_plain_conv_otherwise():
    """Under CPU bf16 autocast with gradients on, the stride-2 depthwise conv is the fp32 conv rounded once
    to bf16 (and its gradients flow as usual); without gradients it is the plain bf16 conv."""
    conv = lite.StridedDepthwise(8, 8, 3, 2, 1, groups=8, bias=False)
    x = torch.randn(2, 8, 16, 16).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    expected = torch.nn.functional.conv2d(x.detach().float(), conv.weight, stride=2, padding=1, groups=8)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected.bfloat16())
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(conv(x), torch.nn.Conv2d.forward(conv, x))
    assert sum(isinstance(m, lite.StridedDepthwise) for m in lite.build("lite-ctx")[0].modules()) == 2


def test_logits_come_back_at_the_size_the_images_went_in():
    """Progressive resizing (train.py --low-res-epochs) feeds smaller images than config.image_size."""
    model, processor = lite.build("lite-tiny", seed=0)
    tokens = processor.tokenizer(["segment crack"])
    for size in (64, model.config.image_size):
        with torch.no_grad():
            logits = model(tokens["input_ids"], tokens["attention_mask"], torch.zeros(1, 3, size, size)).logits
        assert logits.shape == (1, size, size)


def test_any_phrase_tokenizes_and_padding_does_not_change_the_answer():
    model, processor = lite.build("lite-tiny", seed=0)
    with torch.no_grad():
        alone = encode_prompts(model, processor, ["fissure"])
        padded = encode_prompts(model, processor, ["fissure", "Riß im Putz — 裂缝 🙂 " * 3])
    torch.testing.assert_close(padded[:1], alone)
    ids = processor.tokenizer(["x" * 500])["input_ids"]
    assert ids.shape == (1, model.config.max_prompt_bytes)


def test_prompts_are_read_as_they_are_looked_up_whatever_their_case_and_spacing():
    """The threshold and the task are looked up case- and space-insensitively, so the model must read the
    prompt so too: "SEGMENT CRACK" gave the shipped model near-empty masks at the tuned threshold."""
    _, processor = lite.build("lite-tiny", seed=0)
    plain, loud = (processor.tokenizer([p]) for p in ("segment crack", "  SEGMENT   Crack "))
    assert torch.equal(plain["input_ids"], loud["input_ids"])
    assert torch.equal(plain["attention_mask"], loud["attention_mask"])
    seg = Segmenter.load(SHIPPED_MODEL, "cpu")
    image = load_image(sorted((SAMPLE / "cracks" / "valid").glob("*.jpg"))[0])
    acts = seg.encode(seg.pixel_values([image]))
    probs = seg.probabilities(acts, [image.shape[:2]], ["segment crack", "SEGMENT CRACK"])
    np.testing.assert_array_equal(probs["segment crack"], probs["SEGMENT CRACK"])


def test_shipped_architecture_fits_the_size_budget():
    """The architecture the shipped checkpoint was trained from (its defectseg.json's base_model), and the
    checkpoint folder itself, stay under the issue's 15 MB."""
    arch = json.loads((SHIPPED_MODEL / "defectseg.json").read_text())["base_model"]
    model, _ = lite.build(arch)
    assert sum(p.numel() for p in model.parameters()) * 4 < 15e6  # fp32 weights under 15 MB
    assert (SHIPPED_MODEL / "model.safetensors").stat().st_size < 15e6


def test_save_and_load_round_trip_through_load_model(tmp_path):
    model, processor = lite.build("lite-tiny", seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded, loaded_processor = load_model(tmp_path / "m")
    assert isinstance(loaded, lite.LiteSeg) and isinstance(loaded_processor, lite.LiteProcessor)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_pyramid_context_starts_as_the_identity_and_round_trips(tmp_path):
    """A model given the context block (LiteConfig.context) computes what it computed without it until the
    block's last projection moves; the block needs no batch statistics (a batch of one 64 px image trains);
    its bins survive save and load."""
    plain, processor = lite.build("lite-tiny", seed=0)
    config = lite.LiteConfig(**{**plain.config.__dict__, "context": [1, 2, 6]})
    model = lite.LiteSeg(config)
    assert model.load_state_dict(plain.state_dict(), strict=False).unexpected_keys == []
    tokens = processor.tokenizer(["segment crack", "segment taping area"])
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    plain.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**tokens, pixel_values=pixels).logits,
                                   plain(**tokens, pixel_values=pixels).logits, rtol=0, atol=0)
        torch.nn.init.normal_(model.context.project.weight)
        assert not torch.equal(model(**tokens, pixel_values=pixels).logits, plain(**tokens, pixel_values=pixels).logits)
    model.train()
    model(**processor.tokenizer(["segment crack"]), pixel_values=torch.randn(1, 3, 64, 64)).logits.sum().backward()
    model.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.context == [1, 2, 6]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_augment_keeps_image_and_mask_aligned():
    """A mask painted as a bright square on a dark image stays under that square through every crop,
    flip, rotation and jitter."""
    image = np.zeros((120, 90, 3), np.uint8)
    mask = np.zeros((120, 90), np.uint8)
    image[30:70, 20:60] = 250
    mask[30:70, 20:60] = 1
    for seed in range(20):
        out, target = augment(image, mask, view=seed % 2, size=48, rng=np.random.default_rng(seed))
        assert out.shape == (48, 48, 3) and target.shape == (48, 48) and target.dtype == np.float32
        bright = out.mean(axis=2) > 120
        if target.max() > 0:
            assert (bright == (target > 0.5)).mean() > 0.97, seed


@pytest.mark.parametrize("seed", range(4))
def test_jitter_is_the_per_pixel_formula(seed):
    """The lookup-table jitter gives the same bytes as its formula applied to every pixel in float32:
    contrast around the image's mean, brightness (the mean scaled), a per-channel gain, clipped to uint8."""
    from defectseg.augment import jitter

    image = load_image(sorted(SAMPLE.glob("*/valid/*.jpg"))[seed])
    rng = np.random.default_rng(seed)
    contrast = rng.uniform(0.8, 1.2)
    gain = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    brightness = rng.uniform(0.8, 1.2)
    x = image.astype(np.float32)
    expected = np.clip(((x - x.mean()) * contrast + x.mean() * brightness) * gain, 0, 255).astype(np.uint8)
    out = jitter(image, np.random.default_rng(seed))
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, image)


@pytest.mark.parametrize("world", [1, 64])
def test_the_bank_holds_the_rows_decoded_in_order_however_many_threads(processed, world):
    """ImageBank.from_rows decodes in threads (1 for each of 64 processes): the rows' own pixels, in order."""
    rows = load_rows(processed, "train")
    bank = ImageBank.from_rows(rows, progress=False, world=world)
    assert len(bank.images) == len(bank.masks) == len(rows)
    for row, image, mask in zip(rows, bank.images, bank.masks):
        np.testing.assert_array_equal(image, load_image(row["image"]))
        np.testing.assert_array_equal(mask, read_mask_png(row["mask"]))


def test_no_flip_keeps_the_orientation():
    """With flips off (train.py --no-flip), crops and jitter still vary, but what is top-left stays top-left."""
    image = np.zeros((120, 120, 3), np.uint8)
    mask = np.zeros((120, 120), np.uint8)
    image[:30, :30], mask[:30, :30] = 250, 1
    for seed in range(20):
        _, target = augment(image, mask, view=0, size=48, rng=np.random.default_rng(seed), flips=False)
        ys, xs = np.nonzero(target > 0.5)
        assert len(ys) == 0 or (ys.mean() < 24 and xs.mean() < 24), seed


def test_ema_averages_the_weights_and_the_batch_norm_statistics(processed, tmp_path):
    """--ema on LiteSeg: last/ holds the EMA of the weights and of the batch norms' running statistics,
    not the live ones its trainer state keeps, and best/'s stored metrics are those of the weights beside
    them (statistics that did not match the averaged weights would score otherwise)."""
    from defectseg import evaluation
    from defectseg.training import TRAINER_STATE

    run = tmp_path / "ema"
    assert run_train(*tiny_run(processed, run, "--epochs", "2", "--ema", "0.5", "--lr", "3e-2", "--precision", "fp32")) == 0
    state = torch.load(run / "last" / TRAINER_STATE, weights_only=False)
    model, _ = load_model(run / "last")
    params, buffers = list(model.parameters()), [b for b in model.buffers() if b.is_floating_point()]
    assert len(params) + len(buffers) == len(state["ema"]) == len(state["live"]) and buffers  # the running stats
    for saved, ema in zip([*params, *buffers], state["ema"]):
        torch.testing.assert_close(saved, ema, rtol=0, atol=0)
    assert not any(torch.equal(ema, live) for ema, live in zip(state["ema"][len(params):], state["live"][len(params):]))

    meta = read_metadata(run / "best")
    segmenter = Segmenter.load(str(run / "best"), device="cpu", precision="fp32")
    segmenter.thresholds = {}  # the stored metrics are at threshold 0.5
    rows = load_rows(processed, "valid")
    acts = segmenter.encode(segmenter.pixel_values([load_image(r["image"]) for r in rows]))
    agg = evaluation.aggregate(evaluation.score_batch(segmenter, acts, rows, [read_mask_png(r["mask"]) for r in rows]))
    for task, m in agg["tasks"].items():
        assert m["iou"] == pytest.approx(meta["metrics"]["tasks"][task]["iou"], abs=2e-3), task
    assert max(m["iou"] for m in agg["tasks"].values()) > 0.05  # masks, not an empty answer scored alike


def test_the_lovasz_term_joins_the_loss_in_the_last_epochs(processed, tmp_path):
    """--lovasz-epochs 1 of 2: epoch 1 trains exactly as without it, epoch 2 adds the Lovasz hinge to
    the loss train.py minimizes (and records it in config.json)."""
    plain, lovasz = tmp_path / "plain", tmp_path / "lovasz"
    assert run_train(*tiny_run(processed, plain, "--epochs", "2")) == 0
    assert run_train(*tiny_run(processed, lovasz, "--epochs", "2", "--lovasz-epochs", "1")) == 0
    assert json.loads((lovasz / "config.json").read_text())["lovasz_epochs"] == 1
    (a1, a2), (b1, b2) = ([float(r["train_loss"]) for r in history(run)] for run in (plain, lovasz))
    assert b1 == a1 and b2 > a2


@pytest.fixture
def batch_sides(monkeypatch) -> list[int]:
    """The image side of every training batch the in-memory bank builds, in the batches' order (epoch, then
    position): the loader's prefetch threads may build two batches in either order. Emptying the list
    starts a new record."""
    sizes: list[int] = []
    keys: list[tuple[int, int]] = []  # (epoch, start) of each entry of sizes
    bank_batch = ImageBank.batch
    lock = threading.Lock()

    def spy(self, samples, size, seed, epoch, start):
        with lock:
            if not sizes:
                keys.clear()
            at = bisect.bisect(keys, (epoch, start))
            keys.insert(at, (epoch, start))
            sizes.insert(at, size)
        return bank_batch(self, samples, size, seed, epoch, start)

    monkeypatch.setattr(ImageBank, "batch", spy)
    return sizes


@pytest.mark.slow
def test_low_res_epochs_train_smaller_images_then_the_input_size(processed, tmp_path, batch_sides):
    """--low-res-epochs 1 --low-res-size 64: epoch 1's batches are 64 px, epoch 2's the model's 96 px,
    and validation always runs at 96 (the size the checkpoint is used at)."""
    run = tmp_path / "run"
    assert run_train(*tiny_run(processed, run, "--epochs", "2", "--low-res-epochs", "1", "--low-res-size", "64")) == 0
    steps = len(batch_sides) // 2
    assert batch_sides == [64] * steps + [96] * steps
    assert json.loads((run / "config.json").read_text())["low_res_epochs"] == 1
    first, second = history(run)
    assert first["mean_iou"] == "" and float(second["mean_iou"]) >= 0  # the low-res epoch is not validated


@pytest.mark.slow
def test_low_res_epochs_are_validated_only_when_asked_and_last_is_saved_every_epoch(processed, tmp_path):
    """By default a low-res epoch is not validated: its metrics.csv row has no scores, and last/ is saved
    (no thresholds, no metrics) so the run resumes from it; best/ comes from the first epoch at the input
    size. --validate-low-res scores every epoch, and the training is the same either way."""
    flags = ("--epochs", "3", "--low-res-epochs", "2", "--low-res-size", "64", "--precision", "fp32")
    run = tmp_path / "run"
    assert run_train(*tiny_run(processed, run, *flags, "--stop-after", "1")) == 0
    meta = read_metadata(run / "last")
    assert (meta["epoch"], meta["thresholds"], meta["metrics"]) == (1, {}, None) and not (run / "best").exists()
    assert run_train("--resume", str(run), "-q") == 0
    rows = history(run)
    assert [r["mean_iou"] != "" for r in rows] == [False, False, True]
    assert read_metadata(run / "best")["epoch"] == 3 and (run / "curves.png").stat().st_size > 0
    every = tmp_path / "every"
    assert run_train(*tiny_run(processed, every, *flags, "--validate-low-res")) == 0
    assert all(r["mean_iou"] != "" for r in history(every))
    assert [r["train_loss"] for r in history(every)] == [r["train_loss"] for r in rows]


@pytest.mark.slow
def test_train_sizes_draw_each_batch_side_and_a_resume_draws_the_same(processed, tmp_path, batch_sides):
    """--train-sizes 64 96 128 after one low-res epoch: epoch 1 is all 64 px; each later batch takes one
    of the three sides (several occur), and a run stopped after epoch 2 and resumed draws the same sides
    and reaches the same weights as one that ran straight through."""
    flags = ("--epochs", "3", "--low-res-epochs", "1", "--low-res-size", "64", "--train-sizes", "64", "96", "128")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_train(*tiny_run(processed, straight, *flags)) == 0
    drawn, batch_sides[:] = list(batch_sides), []
    steps = len(drawn) // 3
    assert drawn[:steps] == [64] * steps
    assert set(drawn[steps:]) <= {64, 96, 128} and len(set(drawn[steps:])) >= 2
    assert json.loads((straight / "config.json").read_text())["train_sizes"] == [64, 96, 128]
    assert run_train(*tiny_run(processed, stopped, *flags, "--stop-after", "2")) == 0
    assert run_train("--resume", str(stopped), "-q") == 0
    assert batch_sides == drawn
    assert [r["train_loss"] for r in history(stopped)] == [r["train_loss"] for r in history(straight)]


@pytest.mark.parametrize("sizes", [["100"], ["64", "80"], ["32", "64"]])
def test_train_sizes_that_are_not_multiples_of_32_are_refused(processed, tmp_path, capsys, sizes):
    run = tmp_path / "run"
    assert run_train(*tiny_run(processed, run, "--epochs", "1", "--train-sizes", *sizes)) == 1
    assert f"--train-sizes {' '.join(sizes)}: each must be a multiple of 32, at least 64" in capsys.readouterr().err
    assert not (run / "best").exists()


@pytest.mark.parametrize("size", ["100", "96", "48", "32"])
def test_a_low_res_size_that_is_not_a_smaller_multiple_of_32_is_refused(processed, tmp_path, capsys, size):
    run = tmp_path / "run"
    assert run_train(*tiny_run(processed, run, "--epochs", "1", "--low-res-epochs", "1", "--low-res-size", size)) == 1
    assert f"--low-res-size {size}: must be a multiple of 32, from 64 to below the model's input size (96)" in capsys.readouterr().err
    assert not (run / "best").exists()


def test_an_epoch_sees_every_image_and_balances_the_tasks():
    rows = [{"task": "cracks"}] * 7 + [{"task": "drywall"}] * 3
    plan = epoch_plan(rows, list(DEFAULT_TASKS.values()), seed=0, epoch=0, negative_prob=0.0, flip=False)
    seen = [s.row for s in plan]
    assert len(plan) == epoch_length(rows, list(DEFAULT_TASKS.values())) == 14 and sorted(r for r in seen if r < 7) == list(range(7))
    counts = np.bincount([r for r in seen if r >= 7])[7:]
    assert sorted(counts) == [2, 2, 3]  # 7 drywall samples: two whole passes over 3 images, then one more



def test_a_negative_pair_never_asks_for_a_task_the_image_has_a_mask_of():
    """Two tasks over one export (a task table may split its categories): image a is in both, so asking
    it for the other task is no negative (its target would be zeros where that task has a mask)."""
    rows = [{"task": "cracks", "image": "a"}, {"task": "cracks", "image": "b"},
            {"task": "drywall", "image": "a"}, {"task": "drywall", "image": "c"}]
    plans = [epoch_plan(rows, list(DEFAULT_TASKS.values()), seed, 0, negative_prob=1.0, flip=False) for seed in range(20)]
    negatives = [(rows[s.row]["image"], s.prompt) for plan in plans for s in plan if s.negative]
    assert {image for image, _ in negatives} == {"b", "c"}
    assert all((rows[s.row]["task"] == "cracks") == (s.prompt in DEFAULT_TASKS["cracks"].prompts)
               for plan in plans for s in plan if rows[s.row]["image"] == "a")  # its own task's prompts


# -- the four scripts ---------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_lite_through_all_four_scripts_and_resume(processed, sample_root, tmp_path):
    run = tmp_path / "run"
    assert run_train(*tiny_run(processed, run, "--epochs", "2")) == 0
    for name in ("best/config.json", "best/model.safetensors", "best/defectseg.json", "last/trainer_state.pt"):
        assert (run / name).is_file(), name
    assert not (run / "best" / "decoder.safetensors").exists()  # every weight trains: no decoder-only file
    meta = read_metadata(run / "best")
    assert set(meta["thresholds"]) == {"segment crack", "segment taping area"}
    assert json.loads((run / "best" / "config.json").read_text())["model_type"] == lite.MODEL_TYPE

    pred = tmp_path / "pred"
    assert predict.main(predict.build_parser().parse_args(
        ["--model", str(run / "best"), "--image", str(sample_root / "cracks" / "valid"),
         "--prompt", "segment crack", "--out", str(pred), "-q"])) == 0
    masks = sorted(pred.glob("*__segment_crack.png"))
    assert len(masks) == 4
    image = load_image(sorted((sample_root / "cracks" / "valid").glob("*.jpg"))[0])
    assert read_mask_png(masks[0]).shape == image.shape[:2]

    report = tmp_path / "report"
    assert evaluate.main(evaluate.build_parser().parse_args(
        ["--model", str(run / "best"), "--data", str(processed), "--out", str(report), "-q"])) == 0
    assert set(json.loads((report / "metrics.json").read_text())["tasks"]) == {"cracks", "drywall"}

    assert run_train("--resume", str(run), "--epochs", "3", "-q") == 0
    assert [r["epoch"] for r in history(run)] == ["1", "2", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--ema", "0.9")], ids=["plain", "ema"])
def test_same_seed_same_numbers_and_resume_equals_straight_run(processed, tmp_path, flags):
    straight, again, resumed = tmp_path / "straight", tmp_path / "again", tmp_path / "resumed"
    assert run_train(*tiny_run(processed, straight, "--epochs", "2", *flags)) == 0
    assert run_train(*tiny_run(processed, again, "--epochs", "2", *flags)) == 0
    assert history(straight) == history(again)
    assert run_train(*tiny_run(processed, resumed, "--epochs", "2", "--stop-after", "1", *flags)) == 0
    assert run_train("--resume", str(resumed), "-q") == 0
    assert history(resumed) == history(straight)
    a, _ = load_model(straight / "last")
    b, _ = load_model(resumed / "last")
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_batches_augmented_in_worker_processes_train_the_same_model(processed, tmp_path):
    """--augment-workers 2 makes the same batches as the default path, so the same numbers and weights."""
    threads, workers = tmp_path / "threads", tmp_path / "workers"
    assert run_train(*tiny_run(processed, threads, "--epochs", "2")) == 0
    assert run_train(*tiny_run(processed, workers, "--epochs", "2", "--augment-workers", "2")) == 0
    assert history(workers) == history(threads)
    a, _ = load_model(threads / "last")
    b, _ = load_model(workers / "last")
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, rtol=0, atol=0)


# -- the shipped model --------------------------------------------------------------------------


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").is_file(), reason="no shipped model")
def test_shipped_model_scores_the_sample_above_its_floor(processed, tmp_path):
    assert sum(f.stat().st_size for f in SHIPPED_MODEL.iterdir()) < 15e6
    report = tmp_path / "report"
    # no --model: the shipped model is the default
    assert evaluate.main(evaluate.build_parser().parse_args(
        ["--data", str(processed), "--out", str(report), "--device", "cpu", "-q"])) == 0
    tasks = json.loads((report / "metrics.json").read_text())["tasks"]
    print({t: round(m["iou"], 3) for t, m in tasks.items()})
    for task, floor in SHIPPED_FLOOR.items():
        assert tasks[task]["iou"] >= floor, (task, tasks[task]["iou"])


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").is_file(), reason="no shipped model")
def test_shipped_model_segments_a_real_photo_by_default(sample_root, tmp_path):
    """predict.py with no --model: the shipped model, at its tuned threshold, writes a real mask."""
    assert "segment taping area" in Segmenter.load(str(SHIPPED_MODEL), device="cpu").thresholds
    path = sorted((sample_root / "drywall" / "valid").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    assert predict.main(predict.build_parser().parse_args(
        ["--image", str(path), "--prompt", "segment taping area", "--out", str(out), "-q"])) == 0
    mask = read_mask_png(next(out.glob("*.png")))
    assert mask.shape == load_image(path).shape[:2]
    assert 0.001 < mask.mean() < 0.6  # a real, partial mask


def test_one_prompt_per_flag_and_a_warning_for_untrained_prompts(processed, sample_root, tmp_path, capsys):
    """`--prompt segment crack` unquoted is an argparse error, not two prompts; a prompt outside the
    checkpoint's task table gets a warning naming the trained ones."""
    with pytest.raises(SystemExit) as exit_info:
        predict.build_parser().parse_args(["--image", "x.jpg", "--prompt", "segment", "crack"])
    assert exit_info.value.code == 2
    run = tmp_path / "run"
    assert run_train(*tiny_run(processed, run, "--epochs", "1")) == 0
    image = sorted((sample_root / "cracks" / "valid").glob("*.jpg"))[0]
    assert predict.main(predict.build_parser().parse_args(
        ["--model", str(run / "best"), "--image", str(image), "--prompt", "crack", "--prompt", "segment wall crack",
         "--out", str(tmp_path / "pred")])) == 0
    err = capsys.readouterr().err
    assert "'crack' is not one the model was trained on ('segment crack', 'segment taping area')" in err
    assert "'segment wall crack' is not one" not in err  # a synonym from the task table


@pytest.mark.parametrize("h,w", [(3000, 400), (400, 3000), (4480, 300)])
def test_a_thin_line_across_a_long_strip_survives_the_resize(h: int, w: int) -> None:
    """A strip that shrinks along one side and grows along the other: a 2 px line across the shrinking
    side stays visible wherever it lies (cv2's area mode alone dropped it at most positions)."""
    for pos in range(0, max(h, w) - 2, max(h, w) // 40):
        image = np.zeros((h, w), np.uint8)
        if h > w:
            image[pos:pos + 2] = 255  # a horizontal line across a tall strip
        else:
            image[:, pos:pos + 2] = 255
        assert lite.resize_square(image, 448).max() >= 255 * 448 / max(h, w) - 1, pos  # split between 2 cells


def test_square_photos_resize_as_before() -> None:
    """640 px photos (both sides shrink) and small ones (both grow) take one cv2 call, as the shipped model
    was trained."""
    import cv2

    rng = np.random.default_rng(0)
    for side, mode in ((640, cv2.INTER_AREA), (300, cv2.INTER_LINEAR)):
        image = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        np.testing.assert_array_equal(lite.resize_square(image, 448), cv2.resize(image, (448, 448), interpolation=mode))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder_block_is_upsample_concatenate_and_mix(mode: str) -> None:
    """DecoderBlock mixes its input at the lower resolution and upsamples the result: the same function as
    upsampling, concatenating the skip and mixing both with its 1x1 conv (the block's definition), for a
    skip of any size (odd ones too), with the same gradients to the mixing weights."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    block = lite.DecoderBlock(cin=12, skip=6, cout=8, cond_dim=5, plain=False)
    torch.nn.init.normal_(block.film.weight)
    getattr(block, mode)()
    x, skip, cond = torch.randn(2, 12, 7, 9), torch.randn(2, 6, 15, 17), torch.randn(2, 5)

    def reference() -> torch.Tensor:
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        y = block.conv1(block.fuse(torch.cat([up, skip], dim=1)))
        gamma, beta = block.film(cond)[:, :, None, None].chunk(2, dim=1)
        y = y * (1 + gamma) + beta
        return y + block.conv2(y)

    outputs, grads = [], []
    for fn in (lambda: block(x, skip, cond), reference):
        block.zero_grad()
        out = fn()
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(block.fuse[0].weight.grad.clone())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_normalize_is_hand_computed_and_keeps_the_device():
    """A white pixel is (1 - MEAN) / STD per channel, in the input's device (a CUDA batch stays on it)."""
    white = np.full((1, 2, 2, 3), 255, np.uint8)
    expected = (1 - torch.tensor(lite.MEAN)) / torch.tensor(lite.STD)
    torch.testing.assert_close(lite.normalize(white)[0, :, 1, 1], expected)
    assert lite.normalize(torch.zeros((1, 2, 2, 3), dtype=torch.uint8, device="meta")).device.type == "meta"


def test_a_mask_of_another_size_than_its_image_is_named(tmp_path, caplog):
    """The bank resizes such a mask to its image, so crops cut both alike, and names it in a warning: one
    made for the photo's stored orientation, not its EXIF-rotated one, would be misaligned."""
    from conftest import write_image

    from defectseg.augment import _decode
    from defectseg.io import write_mask_png

    image = write_image(tmp_path / "a.png", 20, 10)
    mask = np.zeros((20, 10), np.uint8)
    mask[:10] = 255
    write_mask_png(tmp_path / "a__segment_crack.png", mask)
    rgb, resized = _decode({"image": str(image), "mask": str(tmp_path / "a__segment_crack.png")})
    assert rgb.shape == (10, 20, 3) and resized.shape == (10, 20) and resized[:5].all() and not resized[5:].any()
    assert "a__segment_crack.png: mask 10x20, image 20x10" in caplog.text
