"""Tests for defectseg.model on a tiny random CLIPSeg built locally (no Hub, no mocks of the model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import SafetensorError
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from defectseg import tiny
from defectseg.model import (
    DEFAULT_MODEL,
    METADATA_FILE,
    HubUnreachableError,
    ModelLoadError,
    count_parameters,
    decode,
    decoder_parameter_names,
    deepest_layer,
    encode_images,
    encode_prompts,
    load_decoder,
    load_model,
    read_metadata,
    resolve_model_arg,
    save_checkpoint,
    save_decoder,
    used_vision_layers,
)

PROMPTS = ["segment crack", "segment rust", "a much longer prompt about concrete spalling"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "clipseg-tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """Shared, read-only: tests that change weights load their own copy."""
    return load_model(tiny_dir)


def pixels(batch: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hf_logits(model, processor, prompts: list[str], pixel_values: torch.Tensor) -> torch.Tensor:
    """Reference: the plain HF forward."""
    tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixel_values
        ).logits


def split_logits(model, processor, prompts: list[str], pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decode(model, encode_images(model, pixel_values), encode_prompts(model, processor, prompts))


def perturb_decoder(model: CLIPSegForImageSegmentation, seed: int = 1) -> None:
    """Stand-in for training: change every decoder weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# --- tiny model and loading ---------------------------------------------------------------------------


def test_tiny_model_shape(tiny_dir: Path, tiny_model) -> None:
    model, processor = tiny_model
    cfg = model.config
    assert cfg.vision_config.num_hidden_layers > deepest_layer(model) + 1  # truncation really skips layers
    assert cfg.text_config.max_position_embeddings >= processor.tokenizer.model_max_length
    assert cfg.use_complex_transposed_convolution
    assert (tiny_dir / "model.safetensors").is_file()
    ids = processor.tokenizer(["ünïcode ✓ 123 crack"])["input_ids"][0]
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.unk_token_id not in ids[1:-1]


def test_load_model_round_trip_matches_plain_from_pretrained(tiny_dir: Path, tiny_model) -> None:
    model, processor = tiny_model
    assert not model.training
    plain = CLIPSegForImageSegmentation.from_pretrained(tiny_dir).eval()
    plain_processor = CLIPSegProcessor.from_pretrained(tiny_dir)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    pv = pixels(2)
    torch.testing.assert_close(
        hf_logits(model, processor, PROMPTS[:2], pv), hf_logits(plain, plain_processor, PROMPTS[:2], pv)
    )


def test_cli_builds_loadable_model(tmp_path: Path) -> None:
    tiny.main([str(tmp_path / "m"), "--seed", "3", "--image-size", "32"])
    model, processor = load_model(str(tmp_path / "m"))
    assert processor.image_processor.size["height"] == 32
    assert split_logits(model, processor, ["x"], pixels(1, 32)).shape == (1, 32, 32)


def test_cli_refuses_a_size_that_is_not_a_multiple_of_the_patch_with_a_usage_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny.main([str(tmp_path / "m"), "--image-size", "50"])
    assert exit_info.value.code == 2 and "not a multiple of patch_size" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_resolve_model_arg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEFECTSEG_MODEL", raising=False)
    assert resolve_model_arg(None) == DEFAULT_MODEL
    monkeypatch.setenv("DEFECTSEG_MODEL", "models/local")
    assert resolve_model_arg(None) == "models/local"
    assert resolve_model_arg("other") == "other"


def test_load_model_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "runs" / "nope" / "best"
    with pytest.raises(ModelLoadError) as info:
        load_model(str(missing))
    assert type(info.value) is ModelLoadError
    assert str(info.value) == f"model path {missing} does not exist"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "decoder.safetensors")


def test_a_name_that_is_neither_a_path_nor_a_hub_id_is_not_looked_up(tmp_path: Path, monkeypatch) -> None:
    """Every Hub id is owner/name: a bare name that is no local path here is a typo, said at once (no
    minutes of Hub retries, no advice to download it)."""
    monkeypatch.chdir(tmp_path)
    for name, hint in (("clipseg-rd64-refined", False), ("lite-ctxx", True)):
        with pytest.raises(ModelLoadError) as info:
            load_model(name)
        assert type(info.value) is ModelLoadError and "nor a Hub id (owner/name)" in str(info.value)
        assert ("lite, lite-wide, lite-ctx, lite-tiny" in str(info.value)) == hint


def test_load_model_missing_folder_under_existing_dir_is_not_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model models/clipseg-rd64-refined` before copying the folder: a path error, not a Hub lookup."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="^model path models/clipseg-rd64-refined does not exist$"):
        load_model("models/clipseg-rd64-refined")


def test_load_model_dir_that_is_not_clipseg(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a CLIPSeg checkpoint"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' model, not a CLIPSeg"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="cannot read config.json"):
        load_model(tmp_path)


def test_load_model_points_at_the_right_thing(tiny_dir: Path, tmp_path: Path) -> None:
    """Likely mix-ups: a training run folder instead of its best/, the full weights file instead of its folder."""
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "best")
    (run / "config.json").write_text(json.dumps({"epochs": 2}))
    with pytest.raises(ModelLoadError, match=r"is a training run folder; pass its checkpoint: .*best"):
        load_model(run)
    with pytest.raises(ModelLoadError, match=r"not a decoder file written by training .*; pass its folder"):
        load_model(run / "best" / "model.safetensors")


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HF cache (huggingface_hub reads its env vars at import, so patch constants too)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def assert_unreachable_message(err: ModelLoadError, repo_id: str) -> None:
    assert type(err) is HubUnreachableError  # a ModelLoadError that train.py adds its offline way to
    msg = str(err)
    assert f"Could not load '{repo_id}' from the Hugging Face Hub" in msg
    assert f"hf download {repo_id} --local-dir models/" in msg
    assert "--model models/" in msg and "DEFECTSEG_MODEL=" in msg


def test_load_model_hub_offline(empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model(DEFAULT_MODEL)
    assert_unreachable_message(info.value, DEFAULT_MODEL)
    monkeypatch.setenv("MAKELEVEL", "1")  # run by make: the hint names make's variable, not the flag
    with pytest.raises(ModelLoadError) as info:
        load_model(DEFAULT_MODEL)
    assert "MODEL=models/clipseg-rd64-refined" in str(info.value) and "--model" not in str(info.value)


def test_load_model_hub_unreachable_fails_fast(empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode but no network: the probe fails and nothing is downloaded or retried."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    def must_not_download(*args, **kwargs):
        raise AssertionError("from_pretrained should not reach the Hub after a failed probe")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    real_from_pretrained = CLIPSegForImageSegmentation.from_pretrained.__func__

    def cache_only(cls, source, *args, **kwargs):
        if not kwargs.get("local_files_only"):
            must_not_download()
        return real_from_pretrained(cls, source, *args, **kwargs)

    monkeypatch.setattr(CLIPSegForImageSegmentation, "from_pretrained", classmethod(cache_only))
    with pytest.raises(ModelLoadError) as info:
        load_model(DEFAULT_MODEL)
    assert_unreachable_message(info.value, DEFAULT_MODEL)


# --- split forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "size"), [(1, 64), (3, 64), (2, 96)])
def test_split_forward_matches_hf_forward(tiny_model, batch: int, size: int) -> None:
    model, processor = tiny_model
    pv = pixels(batch, size)
    prompts = PROMPTS[:batch]
    ref = hf_logits(model, processor, prompts, pv)
    out = split_logits(model, processor, prompts, pv)
    assert ref.shape == out.shape == (batch, size, size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)


def test_encode_images_returns_hf_hidden_states(tiny_model) -> None:
    model, _ = tiny_model
    pv = pixels(2)
    with torch.no_grad():
        hidden = model.clip.vision_model(pixel_values=pv, output_hidden_states=True).hidden_states
        acts = encode_images(model, pv)
    assert len(acts) == len(model.config.extract_layers)
    for act, i in zip(acts, model.config.extract_layers):
        assert act.shape == (2, 1 + (64 // 16) ** 2, model.config.vision_config.hidden_size)
        torch.testing.assert_close(act, hidden[i + 1], atol=1e-6, rtol=0)


def test_encode_images_skips_layers_after_deepest(tiny_model) -> None:
    model, _ = tiny_model
    layers = model.clip.vision_model.encoder.layers
    deepest = deepest_layer(model)
    assert len(used_vision_layers(model)) == deepest + 1
    calls: list[int] = []
    handles = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            encode_images(model, pixels(1))
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(deepest + 1))


def test_gradients_reach_last_used_vision_layer(tiny_dir: Path) -> None:
    model, processor = load_model(tiny_dir)
    with torch.no_grad():
        cond = encode_prompts(model, processor, PROMPTS[:2])
    decode(model, encode_images(model, pixels(2)), cond).mean().backward()

    layers = model.clip.vision_model.encoder.layers
    deepest = deepest_layer(model)
    assert all(p.grad is not None for p in layers[deepest].parameters())
    assert model.clip.vision_model.embeddings.patch_embedding.weight.grad is not None
    for layer in layers[deepest + 1 :]:
        assert all(p.grad is None for p in layer.parameters())
    assert all(p.grad is None for p in model.clip.vision_model.post_layernorm.parameters())
    assert all(p.grad is None for p in model.clip.text_model.parameters())
    assert all(model.get_parameter(n).grad is not None for n in decoder_parameter_names(model))


def test_decode_casts_half_activations(tiny_model) -> None:
    model, processor = tiny_model
    pv = pixels(1)
    with torch.no_grad():
        acts = [a.half() for a in encode_images(model, pv)]
        out = decode(model, acts, encode_prompts(model, processor, PROMPTS[:1]).half())
    assert out.dtype == torch.float32 and out.shape == (1, 64, 64)
    ref = split_logits(model, processor, PROMPTS[:1], pv)
    assert (out - ref).abs().max() < 1e-2 * ref.abs().max()


def test_parameter_helpers(tiny_model) -> None:
    model, _ = tiny_model
    names = decoder_parameter_names(model)
    assert names and all(n.startswith("decoder.") for n in names)
    assert count_parameters(model.decoder) == sum(model.get_parameter(n).numel() for n in names)
    assert count_parameters(model) > count_parameters(model.decoder)


# --- saving --------------------------------------------------------------------------------------------


def test_save_checkpoint_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    model, processor = load_model(tiny_dir)
    perturb_decoder(model)
    out = tmp_path / "runs" / "exp" / "best"
    meta = {"epoch": 3, "val_iou": 0.5, "prompts": ["segment crack"]}
    save_checkpoint(model, processor, out, meta)

    assert read_metadata(out) == meta
    assert json.loads((out / METADATA_FILE).read_text()) == meta
    pv = pixels(2)
    expected = split_logits(model, processor, PROMPTS[:2], pv)
    loaded, loaded_processor = load_model(str(out))
    torch.testing.assert_close(split_logits(loaded, loaded_processor, PROMPTS[:2], pv), expected)
    plain = CLIPSegForImageSegmentation.from_pretrained(out).eval()
    torch.testing.assert_close(
        hf_logits(plain, CLIPSegProcessor.from_pretrained(out), PROMPTS[:2], pv), expected
    )


def temp_siblings(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_save_checkpoint_replaces_existing(tiny_dir: Path, tmp_path: Path) -> None:
    model, processor = load_model(tiny_dir)
    out = tmp_path / "best"
    save_checkpoint(model, processor, out, {"epoch": 1})
    (out / "stale.txt").write_text("from the previous save")
    perturb_decoder(model)
    save_checkpoint(model, processor, out, {"epoch": 2})

    assert read_metadata(out) == {"epoch": 2}
    assert not (out / "stale.txt").exists()
    assert temp_siblings(out) == []
    loaded, _ = load_model(out)
    for name in decoder_parameter_names(model):
        assert torch.equal(loaded.get_parameter(name), model.get_parameter(name)), name


def test_interrupted_save_keeps_previous_checkpoint(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, processor = load_model(tiny_dir)
    out = tmp_path / "best"
    save_checkpoint(model, processor, out, {"epoch": 1})
    before = {n: model.get_parameter(n).clone() for n in decoder_parameter_names(model)}

    perturb_decoder(model)
    real_save = model.save_pretrained

    def crash_after_writing(save_directory, *args, **kwargs):
        real_save(save_directory, *args, **kwargs)  # weights half-way into the new checkpoint ...
        raise OSError("No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(model, "save_pretrained", crash_after_writing)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, processor, out, {"epoch": 2})

    def library_error(save_directory, *args, **kwargs):  # safetensors raises its own error type
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(model, "save_pretrained", library_error)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*best: Error while serializing"):
        save_checkpoint(model, processor, out, {"epoch": 2})

    assert read_metadata(out) == {"epoch": 1}
    assert temp_siblings(out) == []
    loaded, _ = load_model(out)
    for name, value in before.items():
        assert torch.equal(loaded.get_parameter(name), value), name


def test_save_decoder_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    model, processor = load_model(tiny_dir)
    perturb_decoder(model)
    path = tmp_path / "decoder.safetensors"
    meta = {"epoch": 7, "task": "cracks"}
    save_decoder(model, path, meta, base_model=str(tiny_dir))

    assert path.stat().st_size < (tiny_dir / "model.safetensors").stat().st_size / 2
    assert [p.name for p in tmp_path.iterdir()] == ["decoder.safetensors"]
    assert read_metadata(path) == meta
    pv = pixels(3)
    expected = split_logits(model, processor, PROMPTS, pv)

    loaded, loaded_processor = load_model(str(path))
    assert not loaded.training
    torch.testing.assert_close(split_logits(loaded, loaded_processor, PROMPTS, pv), expected)
    base, _ = load_model(tiny_dir)  # sanity: the decoder file really changed the logits
    assert not torch.allclose(split_logits(base, processor, PROMPTS, pv), expected)


def test_save_decoder_base_model_override(tiny_dir: Path, tmp_path: Path) -> None:
    model, _ = load_model(tiny_dir)
    path = tmp_path / "decoder.safetensors"
    save_decoder(model, path, {}, base_model=str(tmp_path / "moved-away"))
    with pytest.raises(ModelLoadError, match="moved-away"):
        load_model(path)
    loaded, _ = load_model(path, base_model=str(tiny_dir))
    assert read_metadata(path) == {}
    assert isinstance(loaded, CLIPSegForImageSegmentation)


def test_decoder_file_refuses_a_base_whose_weights_changed(tiny_dir: Path, tmp_path: Path) -> None:
    """The decoder file names its base by path or Hub id; another model saved there since (a retrained
    runs/a/best, an edited folder) must not silently carry a decoder trained on other features."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    model, processor = load_model(base)
    path = tmp_path / "decoder.safetensors"
    save_decoder(model, path, {}, base_model=str(base))
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    assert isinstance(load_model(path, base_model=str(moved))[0], CLIPSegForImageSegmentation)  # same weights
    with torch.no_grad():
        model.clip.text_model.final_layer_norm.weight.add_(0.01)  # the decoder reads the text tower too
    model.save_pretrained(base)
    for arg in ({}, {"base_model": str(base)}):
        with pytest.raises(ModelLoadError, match=f"decoder file {path} was trained on base model .* weights have changed"):
            load_model(path, **arg)


def test_load_decoder_rejects_mismatched_file(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, _ = load_model(tiny_dir)
    state = {f"decoder.{k}": v.clone() for k, v in model.decoder.state_dict().items()}
    state["decoder.film_mul.weight"] = torch.zeros(3, 3)
    del state["decoder.film_add.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ModelLoadError, match="missing 1 decoder weights.*shape mismatches"):
        load_decoder(model, bad)


def test_read_metadata_absent(tiny_dir: Path, tmp_path: Path) -> None:
    assert read_metadata(tiny_dir) == {}
    assert read_metadata(tmp_path / "nothing-here") == {}
    assert read_metadata(DEFAULT_MODEL) == {}


def test_checkpoint_files_get_the_usual_permissions(tiny_dir, tmp_path):
    model, processor = load_model(tiny_dir)
    umask = os.umask(0)
    os.umask(umask)
    save_checkpoint(model, processor, tmp_path / "ckpt", {"x": 1})
    save_decoder(model, tmp_path / "decoder.safetensors", {}, base_model=str(tiny_dir))
    files = [p for p in (tmp_path / "ckpt").iterdir()] + [tmp_path / "decoder.safetensors"]
    assert files and all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in files)


def test_interrupted_swap_is_recovered(tiny_dir, tmp_path):
    """A crash between the two renames leaves only the folder set aside; the next load or save puts it back."""
    model, processor = load_model(tiny_dir)
    out = tmp_path / "last"
    save_checkpoint(model, processor, out, {"epoch": 1})
    out.rename(tmp_path / ".last.old-999999999")
    loaded, _ = load_model(out)
    assert out.is_dir() and read_metadata(out) == {"epoch": 1}
    assert not list(tmp_path.glob(".last.old-*"))
    del loaded


def test_corrupt_metadata_is_a_model_load_error(tiny_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    (folder / "defectseg.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="defectseg.json: metadata is not valid JSON"):
        read_metadata(folder)
    (folder / "defectseg.json").write_bytes('{"note": "fissure é"}'.encode("cp1252"))  # a Windows editor's save
    with pytest.raises(ModelLoadError, match="defectseg.json: metadata is not UTF-8 text"):
        read_metadata(folder)
    (folder / "defectseg.json").write_bytes('{"note": "é"}'.encode("utf-8-sig"))  # with a BOM: fine
    assert read_metadata(folder) == {"note": "é"}


def test_metadata_of_a_folder_set_aside_by_an_interrupted_save_is_read(tiny_dir, tmp_path):
    """Its thresholds and tasks, not the defaults: the metadata is read first, so it puts the folder back."""
    from defectseg.inference import Segmenter

    folder = tmp_path / "best"
    shutil.copytree(tiny_dir, folder)
    (folder / "defectseg.json").write_text(json.dumps({"thresholds": {"segment crack": 0.3}}))
    folder.rename(tmp_path / ".best.old-999999999")
    assert Segmenter.load(str(folder), "cpu").threshold("segment crack") == 0.3


def test_a_clipseg_folder_without_its_vocabulary_is_refused(tiny_dir, tmp_path):
    """Copied without vocab.json, merges.txt and tokenizer.json, CLIP's tokenizer loads empty: every prompt
    gave the same mask."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="reads different prompts as the same tokens"):
        load_model(folder)


def test_missing_weights_warn_and_load(tiny_dir, tmp_path, caplog):
    """transformers 5 reports missing keys as a set: the warning used to be a failed load."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("decoder."))[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors", {"format": "pt"})
    model, _ = load_model(folder)
    assert f"1 weights were missing and randomly initialized (e.g. {dropped})" in caplog.text


def test_a_liteseg_whose_weights_do_not_fit_its_config_names_the_mismatch(tmp_path):
    from defectseg import lite

    folder = tmp_path / "lite"
    lite.build("lite-tiny", seed=0)[0].save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "text_dim": 8}))
    with pytest.raises(ModelLoadError) as err:
        load_model(folder)
    assert "model.safetensors does not fit" in str(err.value) and "prompt_encoder.embed.weight" in str(err.value)
    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors: "):
        load_model(folder)


def test_a_save_stopped_while_flushing_leaves_no_temp_folder(tiny_dir, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM during the flush (most of a real save's time): the temp folder goes, the previous
    checkpoint stays; folders set aside by an earlier killed swap are removed by the next save."""
    import defectseg.io as io_module

    model, processor = load_model(tiny_dir)
    out = tmp_path / "last"
    save_checkpoint(model, processor, out, {"epoch": 1})
    (tmp_path / ".last.old-999999999").mkdir()  # a swap killed before it deleted the old folder
    calls = []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(io_module, "fsync_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, processor, out, {"epoch": 2})
    assert read_metadata(out) == {"epoch": 1} and temp_siblings(out) == []


def test_stop_if_terminated_raises_after_a_lost_sigterm(monkeypatch):
    from defectseg import cli

    cli.stop_if_terminated()  # nothing came
    monkeypatch.setattr(cli, "_sigterm_came", True)  # a SIGTERM whose exception a GC callback swallowed
    with pytest.raises(cli.Terminated):
        cli.stop_if_terminated()
