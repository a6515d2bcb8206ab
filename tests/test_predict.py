"""predict.py on a tiny random CLIPSeg built locally (no Hub, the model is never mocked).

What a user relies on: one {0, 255} mask per image and prompt, named <stem>__<slug>.png, at the
image's own (EXIF-applied) size, equal to what ``Segmenter`` computes; thresholds applied; any input
form; clean errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE, write_image
from PIL import Image

import predict
from defectseg.inference import Segmenter
from defectseg.io import load_image
from defectseg.metrics import binarize
from defectseg.model import SHIPPED_MODEL, used_vision_layers
from defectseg.tiny import build_tiny_model

PROMPTS = ["segment crack", "segment taping area"]
SLUGS = ["segment_crack", "segment_taping_area"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("predict_tiny") / "clipseg-tiny", seed=0)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Images in the forms users have: non-square, grayscale, RGBA, 16-bit, EXIF-rotated."""
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    paths = {
        "wide": write_image(folder / "wide.png", 300, 120, seed=1),
        "exif": write_image(folder / "exif.jpg", 40, 30, seed=2, exif_orientation=6),
        "speck": write_image(folder / "speck.png", 1, 1, seed=3),  # 1, 3 or 4 px tall: transformers
        "strip": write_image(folder / "strip.png", 100, 3, seed=4),  # would guess the channel axis wrong
    }
    forms = {
        "gray": Image.fromarray(rng.integers(0, 255, (211, 97), dtype=np.uint8)),
        "rgba": Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8)),
        "deep": Image.fromarray(rng.integers(0, 65535, (33, 65), dtype=np.uint16)),
    }
    for name, img in forms.items():
        paths[name] = folder / f"{name}.png"
        img.save(paths[name])
    assert Image.open(paths["deep"]).mode.startswith("I")  # really a 16-bit PNG
    return paths


def run(tiny_dir: Path, out: Path, *args: str, prompts: list[str] = PROMPTS) -> int:
    argv = ["--model", str(tiny_dir), "--out", str(out), "--workers", "0", *args]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    return predict.main(predict.build_parser().parse_args(argv))


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def direct_probabilities(tiny_dir: Path, paths: list[Path], batch_size: int) -> dict[str, list[np.ndarray]]:
    """prompt -> probability maps from ``Segmenter`` called directly, batched as predict.py batches."""
    seg = Segmenter.load(str(tiny_dir), "cpu")
    out: dict[str, list[np.ndarray]] = {p: [] for p in PROMPTS}
    for i in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[i : i + batch_size]]
        acts = seg.encode(seg.pixel_values(images))
        for prompt, probs in seg.probabilities(acts, [im.shape[:2] for im in images], PROMPTS).items():
            out[prompt] += probs
    return out


def test_sample_images_two_prompts_match_segmenter(tiny_dir: Path, tmp_path: Path) -> None:
    folders = [SAMPLE / "cracks" / "valid", SAMPLE / "drywall" / "valid"]
    out = tmp_path / "pred"
    # batches of 3 over 8 images: 3 batches, so the 2 DataLoader worker processes really run
    assert run(tiny_dir, out, "--image", *map(str, folders), "--batch-size", "3", "--workers", "2") == 0

    paths = predict.collect_images([str(f) for f in folders])
    assert len(paths) == 8 and all(p.suffix == ".jpg" for p in paths)
    expected = direct_probabilities(tiny_dir, paths, batch_size=3)
    for prompt, slug in zip(PROMPTS, SLUGS):
        for path, prob in zip(paths, expected[prompt]):
            mask = read_png(out / f"{path.stem}__{slug}.png")
            assert mask.dtype == np.uint8 and mask.shape == (640, 640)
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, binarize(prob, 0.5))
    written = sorted(p.name for p in out.glob("*.png"))
    assert len(written) == 16 and not list(out.glob(".*"))  # no temp files left
    config = json.loads((out / predict.PREDICT_CONFIG_FILE).read_text())
    assert config["masks_written"] == 16 and config["thresholds"] == dict.fromkeys(PROMPTS, 0.5)


def test_any_image_form_gets_a_mask_of_its_own_size(tiny_dir: Path, tmp_path: Path, odd_images) -> None:
    folder = odd_images["wide"].parent
    # the glob picks up the PNGs, the JPEG is named; the folder names all of them again (each runs once)
    assert run(tiny_dir, tmp_path, "--image", str(folder / "*.png"), str(odd_images["exif"]), str(folder)) == 0
    for name, path in odd_images.items():
        mask = read_png(tmp_path / f"{name}__segment_crack.png")
        assert mask.ndim == 2 and mask.dtype == np.uint8, name
        assert mask.shape == load_image(path).shape[:2], name
        assert set(np.unique(mask)) <= {0, 255}, name
    assert Image.open(odd_images["exif"]).size == (40, 30)
    assert Image.open(tmp_path / "exif__segment_taping_area.png").size == (30, 40)
    assert Image.open(tmp_path / "gray__segment_crack.png").size == (97, 211)
    assert json.loads((tmp_path / predict.PREDICT_CONFIG_FILE).read_text())["masks_written"] == 2 * len(odd_images)


def test_threshold_is_applied(tiny_dir: Path, tmp_path: Path, odd_images) -> None:
    images = [str(odd_images["wide"]), str(odd_images["gray"])]
    assert run(tiny_dir, tmp_path, "--image", *images, "--threshold", "0") == 0
    masks = list(tmp_path.glob("*__segment_*.png"))
    assert len(masks) == 4
    assert all((read_png(m) == 255).all() for m in masks)


@pytest.mark.parametrize("threshold", ["1.01", "-0.1", "nan", "5"])
def test_threshold_outside_0_1_is_refused(tiny_dir: Path, tmp_path: Path, odd_images, threshold: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_dir, tmp_path, "--image", str(odd_images["wide"]), "--threshold", threshold)
    assert exit_info.value.code == 2 and "must be in [0, 1]" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_overlay_and_probability_maps(tiny_dir: Path, tmp_path: Path, odd_images) -> None:
    path = odd_images["wide"]
    assert run(tiny_dir, tmp_path, "--image", str(path), "--overlay", "--probs", "--tta", "--ensemble") == 0
    image = load_image(path)
    mixed = 0  # prompts whose mask has both classes, so the checks below look at both
    for slug in SLUGS:
        mask = read_png(tmp_path / f"wide__{slug}.png") > 0
        mixed += bool(mask.any() and (~mask).any())
        overlay = read_png(tmp_path / f"wide__{slug}_overlay.png")
        prob = read_png(tmp_path / f"wide__{slug}_prob.png")
        assert overlay.shape == image.shape and prob.shape == mask.shape == image.shape[:2]
        assert prob.dtype == np.uint8
        np.testing.assert_array_equal(overlay[~mask], image[~mask])  # untouched outside the mask
        assert (overlay[mask] != image[mask]).any() or not mask.any()
        assert (overlay[mask][:, 1] > overlay[mask][:, 0]).all()  # green: the project's colour for predicted
        assert (prob[mask] >= 128).all() and (prob[~mask] <= 127).all()  # rounded prob * 255, threshold 0.5
    assert mixed, "every mask is empty or full: the overlay and probability checks saw one class only"


def test_encoder_runs_once_per_batch_for_all_prompts(tiny_dir: Path, tmp_path: Path, odd_images) -> None:
    seg = Segmenter.load(str(tiny_dir), "cpu")
    calls: list[int] = []
    hook = used_vision_layers(seg.model)[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        stats = predict.predict_images(seg, list(odd_images.values())[:5], dict.fromkeys(PROMPTS, 0.5), tmp_path,
                                       suffixes=[""], batch_size=2)
    finally:
        hook.remove()
    assert len(calls) == 3  # 5 images in batches of 2, both prompts decoded from the same activations
    assert stats.images == 5 and stats.masks == 10 and not stats.failed


def test_unreadable_image_is_reported_and_skipped(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    write_image(folder / "good.jpg", 64, 48)
    (folder / "bad.jpg").write_bytes(b"this is not a JPEG" * 10)
    write_image(folder / "zgood.png", 20, 30)
    assert run(tiny_dir, tmp_path / "out", "--image", str(folder)) == 1
    err = capsys.readouterr().err
    assert "bad.jpg: cannot read image" in err and "1 of 3 images could not be read" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        f"{stem}__{slug}.png" for stem in ("good", "zgood") for slug in SLUGS
    ]


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (["segment crack", "  "], "--prompt must not be empty"),
        ([""], "--prompt must not be empty"),
        (["segment crack", "Segment  CRACK"], "would both write <image_stem>__segment_crack.png"),
        # Latin-1 bytes in argv: Python decodes them to lone surrogates, which no file name or model can take
        (["segment fissure \udce9troite"], "--prompt 'segment fissure \\udce9troite' is not valid UTF-8 text"),
    ],
)
def test_bad_prompts(tiny_dir: Path, tmp_path: Path, capsys, prompts: list[str], message: str) -> None:
    assert run(tiny_dir, tmp_path / "out", "--image", str(SAMPLE), prompts=prompts) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_prompt_and_help(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        predict.build_parser().parse_args(["--image", "x.jpg"])
    assert info.value.code == 2 and "--prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        predict.build_parser().parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--image", "--prompt", "--model", "--threshold", "--overlay", "--workers"))


def test_bad_inputs_fail_before_writing(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    a = write_image(tmp_path / "a" / "same.jpg", 16, 16)
    b = write_image(tmp_path / "b" / "same.png", 16, 16)
    assert run(tiny_dir, tmp_path / "out", "--image", str(a), str(b)) == 1
    err = capsys.readouterr().err
    assert "same file stem" in err and str(a) in err and str(b) in err
    assert run(tiny_dir, tmp_path / "out", "--image", str(tmp_path / "nope*.jpg")) == 1
    assert "not an image file or a folder" in capsys.readouterr().err
    assert run(tiny_dir, tmp_path / "out", "--image", str(a), "--device", "cuda:7") == 1
    assert "--device cuda:7" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_end_to_end(tiny_dir: Path, tmp_path: Path, odd_images) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), "--image", str(SAMPLE / "cracks" / "valid" / "*.jpg"),
         str(odd_images["exif"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--model", str(tiny_dir),
         "--out", str(tmp_path), "--batch-size", "2", "--workers", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "5 images, 2 prompts: 10 masks written" in proc.stderr
    assert len(list(tmp_path.glob("*__segment_*.png"))) == 10
    assert Image.open(tmp_path / "exif__segment_crack.png").size == (30, 40)


def test_missing_model_is_one_clear_line(tmp_path: Path, odd_images) -> None:
    missing = tmp_path / "runs" / "nope" / "best"
    proc = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), "--image", str(odd_images["wide"]), "--prompt", "segment crack",
         "--model", str(missing), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert f"model path {missing} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sum("ERROR" in line for line in proc.stderr.splitlines()) == 1



def test_tiny_images_keep_their_colours(tiny_dir: Path) -> None:
    """A 3-pixel-tall image of one colour: the model input holds that colour in every channel (a wrong
    guess of the channel axis would mix the channels or fail)."""
    seg = Segmenter.load(str(tiny_dir), "cpu")
    ip = seg.processor.image_processor
    colour = np.array([10, 200, 30], dtype=np.uint8)
    for height, width in ((3, 100), (1, 1), (4, 4)):
        pixels = seg.pixel_values([np.broadcast_to(colour, (height, width, 3)).copy()])[0]
        expected = (colour / 255 - np.array(ip.image_mean)) / np.array(ip.image_std)
        np.testing.assert_allclose(pixels.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(("prompt", "slug"), [
    ("segment crack", "segment_crack"),
    ("Segment  joint/tape!", "segment_joint_tape_"),
    ("segment 裂缝", "segment__3ac17fea"),
])
def test_prompt_slugs(prompt: str, slug: str) -> None:
    from defectseg.tasks import SLUG_MAX, prompt_slug

    assert prompt_slug(prompt) == slug
    assert prompt_slug("裂缝") != prompt_slug("😀😀")  # both would be "_" without the hash
    assert len(prompt_slug("crack " * 100)) == SLUG_MAX + 9


def test_unusual_prompts_get_distinct_short_file_names(tiny_dir: Path, tmp_path: Path) -> None:
    image = write_image(tmp_path / "in" / "a.png", 20, 20)
    prompts = ["裂缝", "😀😀", "crack " * 60]
    assert run(tiny_dir, tmp_path / "out", "--image", str(image), prompts=prompts) == 0
    assert len(list((tmp_path / "out").glob("a__*.png"))) == 3


def test_very_long_image_name_gets_short_output_names(tiny_dir: Path, tmp_path: Path) -> None:
    """A 250-character stem with the longest prompt slug and every output: names stay under 255 bytes, the
    same rule (``mask_name``) as preprocess's masks and evaluate's --pred-dir lookup."""
    from defectseg.manifest import mask_name
    from defectseg.tasks import prompt_slug

    image = write_image(tmp_path / "in" / ("x" * 250 + ".png"), 20, 20)
    prompt = "crack " * 60
    assert run(tiny_dir, tmp_path / "out", "--image", str(image), "--overlay", "--probs", prompts=[prompt]) == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(names) == 3 and max(len(n.encode()) for n in names) <= 242
    assert mask_name(image.name, prompt_slug(prompt)) in names


def test_unsupported_device_is_one_clear_line(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    image = write_image(tmp_path / "in" / "a.png", 20, 20)
    assert run(tiny_dir, tmp_path / "out", "--image", str(image), "--device", "meta") == 1
    assert "--device meta: not supported" in capsys.readouterr().err


def test_huge_image_is_reported_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    from defectseg.io import ImageReadError

    path = write_image(tmp_path / "big.png", 64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this
    with pytest.raises(ImageReadError, match="big.png: image too large to read safely.*downscale it first"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit, under twice it: read, no warning
    with warnings.catch_warnings(record=True) as caught:
        assert load_image(path).shape == (64, 64, 3)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("meta,message", [
    ({"thresholds": {"segment crack": "high"}}, "not a number in [0, 1]"),
    ({"thresholds": {"segment crack": 1.5}}, "not a number in [0, 1]"),
    ({"thresholds": {"segment crack": 10**400}}, "not a number in [0, 1]"),  # too large for a float
    ({"tasks": ["cracks"]}, "'tasks' must be an object"),
])
def test_broken_checkpoint_metadata_is_one_clear_line(tiny_dir: Path, tmp_path: Path, capsys, meta, message) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "defectseg.json").write_text(json.dumps(meta))
    image = write_image(tmp_path / "in" / "a.png", 20, 20)
    assert run(model, tmp_path / "out", "--image", str(image)) == 1
    err = capsys.readouterr().err
    assert "defectseg.json" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked (created) before the model loads, removed when it fails


def test_rerun_into_its_input_folder_skips_its_own_masks(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shots"
    write_image(folder / "a.png", 20, 20)
    for _ in range(2):
        assert run(tiny_dir, folder, "--image", str(folder), "--overlay") == 0
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".png") == sorted(
        ["a.png"] + [f"a__{slug}{s}.png" for slug in SLUGS for s in ("", "_overlay")])
    # Runs with other prompts skip every earlier prompt's outputs too (predict_config.json lists them).
    write_image(folder / "a__north.png", 20, 20)  # a photo whose name has "__" in it is still a photo
    for prompt in ("segment stain", "segment rust"):
        assert run(tiny_dir, folder, "--image", str(folder), "--overlay", prompts=[prompt]) == 0
    for slug in ("segment_stain", "segment_rust"):
        assert sorted(p.name for p in folder.iterdir() if slug in p.name) == sorted(
            f"{stem}__{slug}{s}.png" for stem in ("a", "a__north") for s in ("", "_overlay"))


def test_a_run_into_a_folder_of_other_settings_warns(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """Masks of runs with another model or threshold can share a folder (the default --out is one for
    all): a run whose settings differ from the last one's warns. Other prompts or images with the same
    settings are no mixing; an unreadable record is simply replaced."""
    folder = tmp_path / "shots"
    for name in "ab":
        write_image(folder / f"{name}.png", 20, 20)
    out = tmp_path / "pred"
    assert run(tiny_dir, out, "--image", str(folder / "a.png"), prompts=PROMPTS[:1]) == 0
    assert run(tiny_dir, out, "--image", str(folder / "b.png"), prompts=PROMPTS[1:]) == 0
    assert "earlier run" not in capsys.readouterr().err
    assert json.loads((out / predict.PREDICT_CONFIG_FILE).read_text())["model"] == str(tiny_dir.resolve())
    assert run(tiny_dir, out, "--image", str(folder / "b.png"), "--threshold", "0.3") == 0
    assert "holds outputs of an earlier run with other settings" in capsys.readouterr().err
    # Another spelling of a prompt writes the same files: compared by file, it is another setting too.
    assert run(tiny_dir, out, "--image", str(folder / "a.png"), "--threshold", "0.2", prompts=["Segment Crack"]) == 0
    assert "holds outputs of" in capsys.readouterr().err
    (out / predict.PREDICT_CONFIG_FILE).write_text("{not json")
    assert run(tiny_dir, out, "--image", str(folder / "a.png"), prompts=PROMPTS[:1]) == 0
    assert "earlier run" not in capsys.readouterr().err


@pytest.mark.parametrize("names,prompts", [
    (["x.png", "x_.png"], ["(a", "a"]),  # x + __ + _a and x_ + __ + a: both x___a.png
    (["X.png", "x.png"], ["segment crack"]),  # one file on macOS and Windows
])
def test_inputs_that_would_write_one_file_are_refused(tiny_dir: Path, tmp_path: Path, capsys, names, prompts):
    folder = tmp_path / "shots"
    for name in names:
        write_image(folder / name, 20, 20)
    out = tmp_path / "pred"
    assert run(tiny_dir, out, "--image", *[str(folder / n) for n in names], prompts=prompts) == 1
    err = capsys.readouterr().err
    assert "would write the same output files" in err and all(n in err for n in names)
    assert not out.exists() or not list(out.iterdir())


def test_a_full_disk_at_the_end_is_one_line(tiny_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import errno

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(predict, "write_json_atomic", full)
    write_image(tmp_path / "a.png", 20, 20)
    assert run(tiny_dir, tmp_path / "pred", "--image", str(tmp_path / "a.png")) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "predict_config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["missing", "fifo"])
def test_what_is_not_an_image_file_or_folder_is_refused_not_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "pipe.png"
    if kind == "fifo":
        os.mkfifo(path)  # would block a decoder that opened it
    with pytest.raises(predict.InputError, match="pipe.png: not an image file or a folder"):
        predict.collect_images([str(path)])


def test_a_run_stopped_half_way_is_recorded(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The record is written before the first mask, so a folder a stopped run wrote into says so."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    write_image(tmp_path / "a.png", 20, 20)
    out = tmp_path / "pred"
    assert run(tiny_dir, out, "--image", str(tmp_path / "a.png")) == 0
    monkeypatch.setattr(predict, "predict_images", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, out, "--image", str(tmp_path / "a.png"), "--threshold", "0.3")
    record = json.loads((out / predict.PREDICT_CONFIG_FILE).read_text())
    assert record["finished"] is False and record["thresholds"] == dict.fromkeys(PROMPTS, 0.3)



def test_thresholds_tuned_with_tta_warn_a_run_without_it(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """evaluate.py --write-thresholds records the --tta / --ensemble it tuned with; a run with other views
    warns that the thresholds may not fit, a run with the same views or --threshold does not."""
    from defectseg.evaluation import write_thresholds

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    write_thresholds(model, {"segment crack": 0.3}, {"split": "valid", "tta": "d4", "ensemble": False})
    image = write_image(tmp_path / "shots" / "a.png", 20, 20)
    capsys.readouterr()
    runs = [((), True), (("--tta", "d4"), False), (("--threshold", "0.4"), False), (("--tta", "d4", "--ensemble"), True)]
    for args, warned in runs:
        assert run(model, tmp_path / "out", "--image", str(image), *args) == 0
        err = capsys.readouterr().err
        assert ("were tuned with --tta d4 (evaluate.py --write-thresholds on valid)" in err) == warned, args
    assert run(tiny_dir, tmp_path / "out", "--image", str(image)) == 0  # nothing recorded: trained thresholds
    assert "were tuned with" not in capsys.readouterr().err


def test_a_checkpoint_knows_only_the_tasks_it_was_trained_on(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """A model trained on a custom table alone (or on --tasks cracks) was not trained on the built-in
    tasks: their prompts warn, and its own prompt gets its tuned threshold."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    meta = {"tasks": {"spalling": {"prompt": "segment spalling", "synonyms": [], "dirs": ["spalling"]}},
            "thresholds": {"segment spalling": 0.3}}
    (model / "defectseg.json").write_text(json.dumps(meta))
    seg = Segmenter.load(str(model), "cpu")
    assert list(seg.tasks) == ["spalling"] and seg.trained_on("Segment Spalling")
    assert not seg.trained_on("segment crack") and seg.threshold("segment spalling") == 0.3
    image = write_image(tmp_path / "shots" / "a.png", 20, 20)
    capsys.readouterr()
    assert run(model, tmp_path / "out", "--image", str(image), prompts=["segment crack", "segment spalling"]) == 0
    err = capsys.readouterr().err
    assert "'segment crack' is not one the model was trained on ('segment spalling')" in err
    assert "'segment spalling' is not one" not in err


def test_a_run_never_replaces_masks_of_another_photo_with_the_same_name(tiny_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    """site-a/IMG_1.jpg, then site-b/IMG_1.jpg into one --out: the second run would replace the first
    photo's mask, so it is refused before writing; a rerun of the same photo, or another prompt (another
    file), is not. The record keeps every mask's source and every prompt's threshold across runs."""
    site_a = write_image(tmp_path / "site-a" / "IMG_1.png", 20, 20, seed=1)
    site_b = write_image(tmp_path / "site-b" / "IMG_1.png", 20, 20, seed=2)
    out = tmp_path / "pred"
    crack = out / f"IMG_1__{SLUGS[0]}.png"
    assert run(tiny_dir, out, "--image", str(site_a), "--threshold", "0.3", prompts=PROMPTS[:1]) == 0
    before = crack.read_bytes()
    assert run(tiny_dir, out, "--image", str(site_a), "--threshold", "0.3", prompts=PROMPTS[:1]) == 0  # a rerun
    capsys.readouterr()
    assert run(tiny_dir, out, "--image", str(site_b), prompts=PROMPTS[:1]) == 1
    err = capsys.readouterr().err
    assert f"IMG_1__{SLUGS[0]}.png (made from {site_a.resolve()}, now {site_b})" in err and "another --out" in err
    assert crack.read_bytes() == before
    assert run(tiny_dir, out, "--image", str(site_b), prompts=PROMPTS[1:]) == 0  # writes another file
    record = json.loads((out / predict.PREDICT_CONFIG_FILE).read_text())
    assert record["sources"] == {f"IMG_1__{SLUGS[0]}.png": str(site_a.resolve()),
                                 f"IMG_1__{SLUGS[1]}.png": str(site_b.resolve())}
    assert record["thresholds"]["segment crack"] == 0.3 and record["prompts"] == PROMPTS[1:]
    crack.unlink()  # once its mask is gone, the other photo may take the name
    assert run(tiny_dir, out, "--image", str(site_b), prompts=PROMPTS[:1]) == 0


def test_names_differing_in_case_are_two_masks_where_the_disk_keeps_them_apart(tiny_dir: Path, tmp_path: Path) -> None:
    """ca/IMG_1.png and cb/img_1.png into one --out on a case-sensitive disk: two mask files, each with its
    own source, so a rerun of either is not refused (the record used to fold them into one entry)."""
    out = tmp_path / "pred"
    out.mkdir()
    (out / "probe").touch()
    if (out / "PROBE").exists():
        pytest.skip("a case-insensitive disk: there the two names are one file")
    (out / "probe").unlink()
    upper = write_image(tmp_path / "ca" / "IMG_1.png", 20, 20, seed=1)
    lower = write_image(tmp_path / "cb" / "img_1.png", 20, 20, seed=2)
    for image in (upper, lower, upper, lower):
        assert run(tiny_dir, out, "--image", str(image), prompts=PROMPTS[:1]) == 0
    record = json.loads((out / predict.PREDICT_CONFIG_FILE).read_text())
    assert record["sources"] == {f"IMG_1__{SLUGS[0]}.png": str(upper.resolve()),
                                 f"img_1__{SLUGS[0]}.png": str(lower.resolve())}


def test_out_expands_the_home_folder(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """--out=~/x (the shell leaves a ~ after '=') is the home folder's x, as --image and --model are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    image = write_image(tmp_path / "a.png", 20, 20)
    argv = ["--model", str(tiny_dir), "--workers", "0", "--image=~/a.png", "--out=~/preds", "--prompt", PROMPTS[0]]
    assert predict.main(predict.build_parser().parse_args(argv)) == 0
    assert (tmp_path / "preds" / f"a__{SLUGS[0]}.png").is_file() and image.is_file()


def test_a_prompt_longer_than_the_model_reads_warns(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """Prompts that share their first 77 tokens get the same masks: each such prompt is named."""
    long = "segment crack " + "a" * 80
    image = write_image(tmp_path / "a.png", 20, 20)
    assert run(tiny_dir, tmp_path / "out", "--image", str(image), prompts=["segment crack", long]) == 0
    err = capsys.readouterr().err
    assert f"prompt {long!r} is longer than the model reads" in err and "'segment crack' is longer" not in err


def test_images_travel_to_the_model_whole_only_for_overlays(tiny_dir: Path, odd_images) -> None:
    """Without overlays a batch carries each image's size and model input, not the decoded photo."""
    seg = Segmenter.load(str(tiny_dir), "cpu")
    paths = [odd_images["wide"], odd_images["exif"]]
    for keep in (False, True):
        items = [item for batch in predict.image_batches(seg, paths, 1, keep_images=keep) for item in batch]
        assert [item.size for item in items] == [(120, 300), (40, 30)]  # the EXIF turn applied
        assert all((item.image is not None) == keep for item in items)
        if keep:
            assert [item.image.shape for item in items] == [(120, 300, 3), (40, 30, 3)]


def test_defectseg_model_replaces_the_shipped_default(tiny_dir: Path, tmp_path: Path, odd_images, monkeypatch) -> None:
    """Without --model, $DEFECTSEG_MODEL names the model (README: it replaces the shipped one); --model wins."""
    monkeypatch.setenv("DEFECTSEG_MODEL", str(tiny_dir))
    argv = ["--image", str(odd_images["wide"]), "--prompt", "segment crack", "--workers", "0", "--out"]
    assert predict.main(predict.build_parser().parse_args([*argv, str(tmp_path / "env")])) == 0
    assert json.loads((tmp_path / "env" / predict.PREDICT_CONFIG_FILE).read_text())["model"] == str(tiny_dir.resolve())
    assert predict.main(predict.build_parser().parse_args([*argv, str(tmp_path / "flag"), "--model",
                                                           str(SHIPPED_MODEL)])) == 0
    assert json.loads((tmp_path / "flag" / predict.PREDICT_CONFIG_FILE).read_text())["model"] == str(SHIPPED_MODEL.resolve())
