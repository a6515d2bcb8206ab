"""The benchmark scripts run end to end (on a tiny model here, so CI notices when they break; their
numbers come from running them as they are, on the real architecture)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import REPO

from defectseg import lite, tiny


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_instead_of_rd64(monkeypatch):
    def build(out_dir, *, seed: int = 0) -> Path:
        return tiny.build_tiny_model(out_dir, seed=seed)

    monkeypatch.setattr(tiny, "build_rd64_random", build)
    return build


def test_bench_train_prints_every_number(tiny_instead_of_rd64, monkeypatch, tmp_path, capsys):
    bench = load_script("bench_train")
    monkeypatch.setattr(bench, "build_rd64_random", tiny_instead_of_rd64)
    args = argparse.Namespace(device="cpu", precision="fp32", batch_size=4, hf_steps=1, cached_steps=2,
                              dataset_images=100, save_dir=str(tmp_path))
    bench.main(args)
    # train.py's choice on a CPU (between steps), then 2 threads ahead of the step, then 2 worker processes
    for threads, workers in ((None, 0), (2, 0), (None, 2)):
        bench.bench_lite(argparse.Namespace(device="cpu", precision="auto", batch_size=2, lite_steps=1,
                                            lite_arch="lite-tiny", compile=False, loader_threads=threads,
                                            augment_workers=workers))
    out = capsys.readouterr().out
    for line in ("seed-style loop", "cached-feature loop", "speed-up", "cache build", "epoch over 100 images",
                 "cache on disk", "checkpoint save", "LiteSeg from scratch (lite-tiny, ", "model step", "augmentation", "at 256 px", "the shipped recipe"):
        assert line in out, line
    assert "augmentation between steps (as train.py here)" in out and "the two in turn" in out
    assert "augmentation on 2 threads ahead of the step" in out and "the slower of the two" in out
    assert "augmentation in 2 worker processes ahead of the step (--augment-workers)" in out


def test_bench_train_times_the_strided_depthwise_convs_both_ways():
    """The numbers behind lite.StridedDepthwise's claim: its convs' step time in fp32 and in bf16."""
    bench = load_script("bench_train")
    model, _ = lite.build("lite-tiny", seed=0)
    fp32_ms, bf16_ms = bench.strided_depthwise_ms(model, batch=2, side=64)
    assert fp32_ms > 0 and bf16_ms > 0


def test_bench_inference_prints_every_number(tiny_instead_of_rd64, capsys):
    bench = load_script("bench_inference")
    assert bench.main(bench.build_parser().parse_args(["--device", "cpu", "--iters", "1", "--images", "3",
                                                       "--workers", "0"])) == 0
    out = capsys.readouterr().out
    assert out.count("2 prompts cost") == 4 and out.count("end to end: predict.py, 3 JPEGs") == 2
    assert out.count("exit code 0") == 2 and "LiteSeg, batch 1, 1 prompt" in out
    assert "--tta, batch 1, 1 prompt, ms per image: none " in out and ", flip " in out and ", d4 " in out
    assert "batch norms folded into the convs at load: " in out


def test_bench_inference_times_another_liteseg_alone(tmp_path, capsys):
    """--lite-model times that checkpoint (here a tiny one) and --no-clipseg leaves CLIPSeg out."""
    model, _ = lite.build("lite-tiny", seed=0)
    model.save_pretrained(tmp_path / "tiny-lite")
    bench = load_script("bench_inference")
    assert bench.main(bench.build_parser().parse_args(["--device", "cpu", "--iters", "1", "--images", "2",
                                                       "--workers", "0", "--no-clipseg",
                                                       "--lite-model", str(tmp_path / "tiny-lite")])) == 0
    out = capsys.readouterr().out
    assert "CLIPSeg" not in out and f"LiteSeg ({tmp_path / 'tiny-lite'})" in out
    assert out.count("end to end: predict.py, 2 JPEGs") == 1 and "LiteSeg, batch 1, 1 prompt" in out


def test_bench_inference_refuses_what_is_not_a_liteseg_checkpoint(tmp_path, capsys):
    """A run folder (its config.json is the training config) gets load_model's hint; a CLIPSeg is refused."""
    run = tmp_path / "run"
    lite.build("lite-tiny", seed=0)[0].save_pretrained(run / "best")
    (run / "config.json").write_text('{"epochs": 1}')
    bench = load_script("bench_inference")
    for folder, message in [(run, "best"), (tiny.build_tiny_model(tmp_path / "clipseg"), "not a LiteSeg checkpoint")]:
        with pytest.raises(SystemExit) as exc:
            bench.build_parser().parse_args(["--lite-model", str(folder)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and str(folder) in err and message in err and "Traceback" not in err


def test_standin_photos_fill_a_machine_without_the_photos(processed, tmp_path, capsys):
    """bench/standin_photos.py puts a bundled photo of each row's task at every image path the manifests
    name, and refuses where the photos exist (never overwriting a real one); a second run on the same
    machine writes its own stand-ins again."""
    import csv
    import shutil

    from conftest import SAMPLE

    from defectseg.io import load_image
    from defectseg.manifest import read_manifest

    standin = load_script("standin_photos")
    assert standin.main(argparse.Namespace(data=str(processed), photos=str(SAMPLE))) == 1  # the photos are there
    assert "exists" in capsys.readouterr().err
    data = tmp_path / "data"
    shutil.copytree(processed, data)
    for split in ("train", "valid"):  # as on a GPU machine: the manifests name photos that are not there
        path = data / split / "manifest.csv"
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r["image"] = str(tmp_path / "elsewhere" / split / Path(r["image"]).name)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    assert standin.main(argparse.Namespace(data=str(data), photos=str(SAMPLE))) == 0
    samples = {p.read_bytes(): task for task in ("cracks", "drywall") for p in (SAMPLE / task).glob("*/*.jpg")}
    for split in ("train", "valid"):
        for r in read_manifest(data / split / "manifest.csv"):
            assert samples[Path(r["image"]).read_bytes()] == r["task"]
            assert load_image(r["image"]).shape == (640, 640, 3)
    assert standin.main(argparse.Namespace(data=str(data), photos=str(SAMPLE))) == 0
    (tmp_path / "elsewhere" / standin.STANDINS).unlink()  # the files there are now nobody's stand-ins
    assert standin.main(argparse.Namespace(data=str(data), photos=str(SAMPLE))) == 1
    assert "not a stand-in" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "cracks" / "train").mkdir(parents=True)
    assert standin.main(argparse.Namespace(data=str(data), photos=str(empty))) == 1
    assert "has no photos of task cracks, drywall" in capsys.readouterr().err


def test_the_recipe_timed_is_the_one_shipped():
    """bench_train.py's RECIPE_* and gpu_budget.sh's train.py command follow the Makefile's train-lite
    defaults, which trained the shipped checkpoint (its defectseg.json records the config)."""
    make = dict(line.split(" ?= ") for line in (REPO / "Makefile").read_text().splitlines()
                if line.startswith("LITE_") and " ?= " in line)
    recipe = {"model": make["LITE_MODEL"], "epochs": int(make["LITE_EPOCHS"]),
              "low_res_epochs": int(make["LITE_LOW_RES_EPOCHS"]), "low_res_size": int(make["LITE_LOW_RES_SIZE"]),
              "train_sizes": [int(side) for side in make["LITE_TRAIN_SIZES"].split()]}
    bench = load_script("bench_train")
    assert recipe == {"model": "lite-ctx", "epochs": bench.RECIPE_EPOCHS, "low_res_epochs": bench.RECIPE_LOW_RES_EPOCHS,
                      "low_res_size": bench.RECIPE_LOW_RES_SIZE, "train_sizes": list(bench.RECIPE_TRAIN_SIZES)}
    budget = " ".join((REPO / "bench" / "gpu_budget.sh").read_text().split())
    assert (f"--model {recipe['model']} --out \"$RUN\" --epochs {recipe['epochs']} --batch-size 16 --lr 2e-3 "
            f"--low-res-epochs {recipe['low_res_epochs']} --low-res-size {recipe['low_res_size']} "
            f"--train-sizes {make['LITE_TRAIN_SIZES']} --patience 0") in budget.replace("\\ ", "")
    shipped = REPO / "models" / "liteseg" / "defectseg.json"
    if shipped.is_file():
        config = json.loads(shipped.read_text())["train_config"]
        assert {key: config[key] for key in recipe} == recipe
