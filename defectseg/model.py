"""Loading, saving and the split forward pass of CLIPSeg.

Everything that touches ``CLIPSegForImageSegmentation`` internals lives here.

Loading (``load_model``) accepts a Hub id, a local ``save_pretrained`` folder (including a training
run's ``runs/<name>/best``) or a decoder-only ``*.safetensors`` file, and turns every failure into
one ``ModelLoadError`` whose message is written for the user.

Saving writes either a full checkpoint folder (``save_checkpoint``) or only the decoder
(``save_decoder``, 4.5 MB for rd64), both atomically so a crash never leaves a broken file behind.

The split forward is what makes training fast. HF's ``CLIPSegForImageSegmentation.forward`` runs the
whole frozen vision tower (all 12 layers) and the text tower on every call. Instead::

    acts = encode_images(model, pixel_values)        # vision layers 0..deepest only
    cond = encode_prompts(model, processor, prompts)  # once per prompt, not per image
    logits = decode(model, acts, cond)               # the trainable decoder

gives the same logits as ``model(input_ids=..., attention_mask=..., pixel_values=...).logits``, while
letting callers cache ``acts`` (e.g. in fp16) and prompt embeddings, and fine-tune the last vision layers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
from transformers.utils import logging as hf_logging

from . import lite
from .io import AtomicFolder, atomic_path, os_reason, recover_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
# The LiteSeg checkpoint trained from scratch that ships in the repo (models/liteseg/README.md): what
# predict.py and evaluate.py use when neither --model nor $DEFECTSEG_MODEL is given.
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "liteseg"
MODEL_ENV_VAR = "DEFECTSEG_MODEL"
METADATA_FILE = "defectseg.json"
DECODER_FILE = "decoder.safetensors"  # the decoder alone, inside a training checkpoint folder

# safetensors header keys of a decoder-only file
_BASE_MODEL_KEY = "base_model"
_METADATA_KEY = "defectseg"
_DECODER_PREFIX = "decoder."
_BASE_FINGERPRINT_KEY = "base_fingerprint"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUTHY = {"1", "ON", "YES", "TRUE"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded. The message is meant for the user, printed as-is (no traceback)."""


class HubUnreachableError(ModelLoadError):
    """A Hub id that is not cached here could not be downloaded (no internet, or offline mode)."""


# --------------------------------------------------------------------------------------------------
# Loading


def resolve_model_arg(arg: str | None, fallback: str | Path = DEFAULT_MODEL) -> str:
    """The model to load: ``arg`` if given, else ``$DEFECTSEG_MODEL``, else ``fallback``: CLIPSeg's Hub id
    for train.py's base, ``SHIPPED_MODEL`` for predict.py and evaluate.py."""
    if arg:
        return arg
    return os.environ.get(MODEL_ENV_VAR) or str(fallback)


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    *,
    base_model: str | None = None,
) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """Load a CLIPSeg model and its processor, in eval mode on ``device``.

    ``name_or_path`` is one of:
      - a Hub id (``"CIDAS/clipseg-rd64-refined"``): the local HF cache is tried first, then the Hub;
      - a local folder written by ``save_pretrained`` / ``save_checkpoint`` / ``hf download``;
      - a decoder-only ``*.safetensors`` file from ``save_decoder``, or a folder holding only one (a CLIPSeg
        run's ``last/``): its base model (recorded in the file, or ``base_model`` if given: a moved copy,
        checked against the file's fingerprint) is loaded first, then the decoder weights on top.

    Raises ``ModelLoadError`` with a user-facing message on any failure.
    """
    if isinstance(name_or_path, Path) or _looks_like_local_path(name_or_path):
        path = Path(name_or_path).expanduser()
        _recover(path)
        if not path.exists():
            raise ModelLoadError(f"model path {path} does not exist")
        if path.is_file():
            model, processor = _load_decoder_file(path, base_model)
        else:
            model, processor = _load_local_dir(path, base_model)
    else:
        model, processor = _load_from_hub(name_or_path)
    model.to(device).eval()
    return model, processor


def _recover(path: Path) -> None:
    """Put back a checkpoint folder that an interrupted save set aside (``recover_folder``)."""
    try:
        recover_folder(path)
    except OSError as exc:  # e.g. a read-only copy of the runs folder
        raise ModelLoadError(f"model path {path} is missing and the copy an interrupted save set aside "
                             f"cannot be put back ({os_reason(exc)}); rename it to {path.name}") from None


def _looks_like_local_path(name: str) -> bool:
    """True when ``name`` means a local path: it exists, is not shaped like a Hub id ("org/name"),
    or is "dir/name" with ``dir`` an existing local folder (``models/clipseg-rd64-refined``).
    """
    path = Path(name).expanduser()
    if path.exists() or name.endswith(".safetensors"):
        return True
    if "/" in name and path.parent.is_dir():
        return True
    return not _HUB_ID.fullmatch(name)


def decoder_only_file(folder: Path) -> Path | None:
    """The decoder file of a folder that holds only one (a decoder-only run's last/: no config.json)."""
    decoder = folder / DECODER_FILE
    return decoder if not (folder / "config.json").is_file() and decoder.is_file() else None


def _load_local_dir(path: Path, base_model: str | None = None) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """Load model + processor from a ``save_pretrained`` folder, after checking it is a CLIPSeg one (or
    from a folder holding only a decoder file, on ``base_model`` if given)."""
    config_file = path / "config.json"
    if (path / "best").is_dir() or (path / "last").is_dir():
        raise ModelLoadError(f"{path} is a training run folder; pass its checkpoint: {path / 'best'} (or {path / 'last'})")
    if decoder := decoder_only_file(path):
        return _load_decoder_file(decoder, base_model)
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path} is not a CLIPSeg checkpoint folder (no config.json); expected a folder written by "
            f"save_pretrained, by training (runs/<name>/best) or by `hf download {DEFAULT_MODEL}`"
        )
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: JSON that is not an object
        raise ModelLoadError(
            f"{path} is not a CLIPSeg checkpoint folder: cannot read config.json ({exc})"
        ) from exc
    if model_type not in ("clipseg", lite.MODEL_TYPE):
        raise ModelLoadError(f"{path} holds a {model_type!r} model, not a CLIPSeg or LiteSeg checkpoint")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(f"{path} has a config.json but no model weights (model.safetensors)")
    try:
        if model_type == lite.MODEL_TYPE:
            model = lite.LiteSeg.from_pretrained(path)
            return model, lite.LiteProcessor.for_model(model)
        return _from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"could not load the {model_type} checkpoint in {path}: {_first_line(exc)}") from exc


def _load_decoder_file(
    path: Path, base_model: str | None
) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """Load the base model a decoder file was trained on, then the file's decoder weights."""
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{path} is a file but not a decoder .safetensors file; pass a checkpoint folder, a Hub id, "
            "or a decoder file written by training"
        )
    header = _safetensors_header(path)
    base = base_model or header.get(_BASE_MODEL_KEY)
    full = (path.parent / "config.json").is_file()  # beside a full checkpoint (best/), not in a decoder-only last/
    if not base:
        hint = f"pass its folder {path.parent}" if full else "pass a checkpoint folder"
        raise ModelLoadError(f"{path} is not a decoder file written by training (it records no base model); {hint}")
    if base.endswith(".safetensors"):
        raise ModelLoadError(f"decoder file {path}: its base model {base!r} must be a Hub id or a folder")
    try:
        model, processor = load_model(base)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"decoder file {path} is built on base model {base!r}, which could not be loaded: {exc}"
            + (f" (or pass the full checkpoint folder {path.parent} instead of the decoder file)" if full else "")
        ) from exc
    recorded = header.get(_BASE_FINGERPRINT_KEY)  # files from before it was recorded: not checked
    if recorded and recorded != base_fingerprint(model):
        if base != header.get(_BASE_MODEL_KEY):  # base_model given: not the copy it was meant to be
            raise ModelLoadError(f"{base} holds other weights than the base model decoder file {path} was trained "
                                 f"on ({header.get(_BASE_MODEL_KEY)!r})")
        raise ModelLoadError(
            f"decoder file {path} was trained on base model {base!r} as it was then; its weights have changed "
            "since, so the decoder would answer for another model: restore that model"
            + (f" or pass the full checkpoint folder {path.parent}" if full else "")
        )
    load_decoder(model, path)
    return model, processor


def _load_from_hub(repo_id: str) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """Load from the HF cache if present (no network), else from the Hub; clear errors when unreachable.

    A quick metadata request is made before downloading, so an unreachable Hub fails in well under a
    second instead of after the minutes of retries ``from_pretrained`` would spend.
    """
    if "/" not in repo_id:  # every CLIPSeg on the Hub is owner/name: this was meant as a local path
        raise ModelLoadError(f"{repo_id!r} is neither a local folder or file (none here) nor a Hub id (owner/name)"
                             + (f"; LiteSeg architectures to train from scratch: {', '.join(lite.ARCHS)}"
                                if repo_id.startswith("lite") else ""))
    try:
        return _from_pretrained(repo_id, local_files_only=True)
    except Exception as exc:  # not cached (or a broken cache entry): the Hub is the only source left
        logger.debug("%s not loadable from the local HF cache: %s", repo_id, _first_line(exc))
    if _hub_offline():
        raise HubUnreachableError(_unreachable_message(repo_id, "HF_HUB_OFFLINE is set"))
    _probe_hub(repo_id)
    try:
        return _from_pretrained(repo_id)
    except Exception as exc:  # one guard: whatever went wrong, the line says how to load it without the Hub
        raise HubUnreachableError(_unreachable_message(repo_id, _first_line(exc))) from exc


def _probe_hub(repo_id: str) -> None:
    """Raise ``ModelLoadError`` fast if the Hub does not answer, or does not know ``repo_id``."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=10)
    except Exception as exc:
        if {"RepositoryNotFoundError", "GatedRepoError", "HFValidationError"} & _class_names(exc):
            raise ModelLoadError(
                f"{repo_id!r} is neither a local folder nor a model on the Hugging Face Hub "
                "(or it is private/gated and you are not logged in)"
            ) from exc
        raise HubUnreachableError(_unreachable_message(repo_id, _first_line(exc))) from exc


def _from_pretrained(source: str, **kwargs: Any) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """``from_pretrained`` for both model and processor; warns if model weights had to be initialized."""
    model, info = CLIPSegForImageSegmentation.from_pretrained(source, output_loading_info=True, **kwargs)
    processor = CLIPSegProcessor.from_pretrained(source, **kwargs)
    missing = sorted(info.get("missing_keys") or [])  # a list, or a set in transformers 5
    if missing:
        logger.warning(
            "%s: %d weights were missing and randomly initialized (e.g. %s)", source, len(missing), missing[0]
        )
    ids = processor.tokenizer(["segment crack", "segment taping area"], padding=True)["input_ids"]
    if ids[0] == ids[1]:  # a folder copied without vocab.json / merges.txt / tokenizer.json
        raise ValueError("its tokenizer reads different prompts as the same tokens (are vocab.json and "
                         "merges.txt missing?), so every prompt would give the same mask")
    return model, processor


def _hub_offline() -> bool:
    """Offline mode as huggingface_hub saw it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env.strip().upper() in _TRUTHY


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _unreachable_message(repo_id: str, reason: str) -> str:
    local = f"models/{repo_id.split('/')[-1]}"
    return (
        f"Could not load {repo_id!r} from the Hugging Face Hub (no cached copy, and the Hub failed: {reason}). "
        f"On a machine with internet run `hf download {repo_id} --local-dir {local}`, copy that folder here "
        + (f"and run make again with `MODEL={local}` (train.py's model; `EVAL_MODEL=` sets the one predict.py "
           "and evaluate.py use)."
           if os.environ.get("MAKELEVEL") else f"and pass `--model {local}` (or set {MODEL_ENV_VAR}={local}).")
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Metadata and saving


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The defectseg metadata of a checkpoint folder (``defectseg.json``) or decoder file (header).

    Returns {} when there is none (including Hub ids and paths that do not exist).
    """
    path = Path(path).expanduser()
    if not path.exists() and _looks_like_local_path(str(path)):
        _recover(path)  # before its metadata is read, not only before its weights
    try:
        if path.is_dir():
            meta_file = path / METADATA_FILE
            raw, where = (meta_file.read_text(encoding="utf-8-sig") if meta_file.is_file() else None), meta_file
        elif path.is_file() and path.suffix == ".safetensors":
            raw, where = _safetensors_header(path).get(_METADATA_KEY), path
        else:
            return {}
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the metadata ({os_reason(exc)})") from None
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path / METADATA_FILE}: metadata is not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start}); save it as UTF-8") from None
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ModelLoadError(f"{where}: metadata is not valid JSON ({exc}); restore it or delete it") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{where}: metadata must be a JSON object")
    return meta


def save_checkpoint(
    model: CLIPSegForImageSegmentation,
    processor: CLIPSegProcessor,
    out_dir: str | Path,
    metadata: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
    full: bool = True,
) -> None:
    """Write a full ``save_pretrained`` folder (weights, config, processor) + ``defectseg.json``, atomically.

    ``extra(folder)``, when given, writes more files (decoder file, trainer state) into the folder
    before it is swapped in, so they are part of the same atomic update. ``full=False`` leaves out the
    model and processor (a decoder-only run's last/: ``extra`` writes the decoder file, which names
    its base model; ``load_model`` loads such a folder through it).

    The folder is written through ``io.AtomicFolder``: in full beside ``out_dir``, flushed to the disk,
    then swapped in, so a crash or power cut while writing leaves the previous ``out_dir`` untouched. The
    folder loads with ``load_model`` or plain ``CLIPSegForImageSegmentation.from_pretrained``.
    """
    out = Path(out_dir)
    try:
        with AtomicFolder(out) as folder:
            if full:
                with _quiet_hf_progress():  # its "Writing model shards" bar would open every epoch's log
                    model.save_pretrained(folder.path)
                processor.save_pretrained(folder.path)
            (folder.path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n",
                                                      encoding="utf-8")
            if extra is not None:
                extra(folder.path)
            folder.commit()
    except SafetensorError as exc:  # its own error type on a full disk: an OSError to callers
        raise OSError(f"could not write the checkpoint {out}: {_first_line(exc)}") from exc
    logger.info("saved checkpoint to %s", out)


@contextlib.contextmanager
def _quiet_hf_progress():
    """transformers' progress bars off for the block, then as they were."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def new_model(name: str, seed: int = 0) -> tuple[lite.LiteSeg, lite.LiteProcessor] | None:
    """A fresh, randomly initialized model when ``name`` names a from-scratch architecture
    (``lite.ARCHS``: "lite", "lite-wide", "lite-ctx", "lite-tiny"), else None (``name`` is then a model to load)."""
    return lite.build(name, seed) if name in lite.ARCHS else None


def trains_from_scratch(model: nn.Module) -> bool:
    """Whether every weight of ``model`` trains (LiteSeg), rather than a decoder on a frozen base (CLIPSeg)."""
    return isinstance(model, lite.LiteSeg)


def base_model_ref(name_or_path: str) -> str:
    """What a decoder file records as its base: a Hub id as is, a local folder as an absolute path (so
    the file loads from any working directory), and for a decoder file, or a folder holding only one (a
    CLIPSeg run's last/), the base that file records."""
    if not _looks_like_local_path(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser().resolve()
    if path.is_dir() and (decoder := decoder_only_file(path)):
        path = decoder
    if path.is_file() and path.suffix == ".safetensors":
        return _safetensors_header(path).get(_BASE_MODEL_KEY) or str(path.parent)
    return str(path)


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the weights a decoder file is trained on top of: every parameter outside the decoder (16 hex).
    Each tensor is hashed alone and the hashes sorted, so renamed or reordered keys (another transformers
    version) leave it unchanged, while a changed value changes it (two same-shaped tensors swapped would not)."""
    digests = sorted(
        hashlib.blake2b(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=16).hexdigest()
        for name, p in model.named_parameters() if not name.startswith(_DECODER_PREFIX)
    )
    return hashlib.blake2b("".join(digests).encode(), digest_size=8).hexdigest()


def save_decoder(
    model: CLIPSegForImageSegmentation,
    path: str | Path,
    metadata: dict[str, Any],
    base_model: str,
    fingerprint: str | None = None,
) -> None:
    """Write only the decoder weights (keys ``decoder.*``) to a small ``.safetensors`` file, atomically.

    The header records ``base_model`` (what ``load_model(path)`` loads underneath), its ``base_fingerprint``
    (``fingerprint`` when given, computed once by a caller that saves often; loading refuses a base whose
    weights changed since) and ``metadata`` (JSON, read back by ``read_metadata``). Written to a temp file
    then ``os.replace``-d into place.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"decoder file must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        _DECODER_PREFIX + name: tensor.detach().cpu().contiguous()
        for name, tensor in model.decoder.state_dict().items()
    }
    header = {
        _BASE_MODEL_KEY: str(base_model),
        _BASE_FINGERPRINT_KEY: fingerprint or base_fingerprint(model),
        _METADATA_KEY: json.dumps(metadata, default=str),
        "format": "pt",
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    logger.debug("saved decoder (%d tensors) to %s", len(tensors), path)


def update_decoder_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    """Replace the defectseg metadata in a decoder file's header (weights and base model kept), atomically."""
    path = Path(path)
    header = _safetensors_header(path)
    header[_METADATA_KEY] = json.dumps(metadata, default=str)
    tensors = load_file(str(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_decoder(model: CLIPSegForImageSegmentation, path: str | Path) -> None:
    """Load a ``save_decoder`` file into ``model.decoder`` in place (strict: same keys, same shapes).

    Raises ``ModelLoadError`` naming the mismatch when the file does not fit the model's decoder.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read decoder file {path}: {_first_line(exc)}") from exc
    state = {k[len(_DECODER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_DECODER_PREFIX)}
    expected = model.decoder.state_dict()
    problems = []
    if foreign := sorted(k for k in tensors if not k.startswith(_DECODER_PREFIX)):
        problems.append(f"non-decoder keys {foreign[:3]}")
    if missing := sorted(set(expected) - set(state)):
        problems.append(f"missing {len(missing)} decoder weights (e.g. {missing[0]})")
    if unexpected := sorted(set(state) - set(expected)):
        problems.append(f"unexpected weights {unexpected[:3]}")
    if mismatched := [k for k in state if k in expected and state[k].shape != expected[k].shape]:
        k = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
            f"model {tuple(expected[k].shape)})"
        )
    if problems:
        raise ModelLoadError(
            f"decoder file {path} does not fit this model's decoder ({'; '.join(problems)}); "
            "was it trained on a different base model?"
        )
    model.decoder.load_state_dict(state, strict=True)


def _safetensors_header(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header ({} if none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable .safetensors file: {_first_line(exc)}") from exc


# --------------------------------------------------------------------------------------------------
# Split forward: encode_images -> encode_prompts -> decode


def deepest_layer(model: CLIPSegForImageSegmentation) -> int:
    """Index (0-based) of the deepest vision encoder layer the decoder reads; layers after it are unused."""
    return max(model.config.extract_layers)


def used_vision_layers(model: CLIPSegForImageSegmentation) -> list[nn.Module]:
    """The vision encoder layers that ``encode_images`` runs: layers 0..deepest_layer(model) (none for
    LiteSeg, which has no frozen vision tower)."""
    if trains_from_scratch(model):
        return []
    return list(model.clip.vision_model.encoder.layers[: deepest_layer(model) + 1])


def encode_images(model: CLIPSegForImageSegmentation, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The vision activations the decoder reads, running only the vision layers it needs.

    pixel_values: float (B, 3, H, W), normalized by the processor; H == W, multiples of the patch size
        (other sizes than the config's image size use interpolated position embeddings, as HF does).
    Returns: one tensor per ``config.extract_layers`` entry, in that order, each (B, 1 + n_patches,
        hidden) in the model's dtype: exactly HF's ``[hidden_states[i + 1] for i in extract_layers]``.

    No ``torch.no_grad`` here: wrap the call in one for a frozen encoder, or leave it out to
    fine-tune the last used vision layers.

    LiteSeg answers with its own encoder's features (strides 2..32, see ``lite.py``); so do
    ``encode_prompts`` and ``decode``: this is the one place that tells the model families apart.
    """
    if trains_from_scratch(model):
        return model.encode_images(pixel_values)
    vision = model.clip.vision_model
    embeddings = vision.embeddings
    pixel_values = pixel_values.to(dtype=embeddings.patch_embedding.weight.dtype)
    if _accepts(type(embeddings).forward, "interpolate_pos_encoding"):
        hidden = embeddings(pixel_values, interpolate_pos_encoding=True)
    else:  # transformers < 4.44 interpolates automatically when the size differs
        hidden = embeddings(pixel_values)
    hidden = vision.pre_layrnorm(hidden)

    wanted = set(model.config.extract_layers)
    captured: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(used_vision_layers(model)):
        hidden = _run_encoder_layer(layer, hidden)
        if index in wanted:
            captured[index] = hidden
    return [captured[i] for i in model.config.extract_layers]


def _run_encoder_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One ``CLIPSegEncoderLayer`` without attention masks, called as ``CLIPSegEncoder`` does.

    transformers >= 5 takes ``(hidden, attention_mask)`` and returns a tensor; 4.x also takes a
    ``causal_attention_mask`` and returns a tuple.
    """
    if _accepts(type(layer).forward, "causal_attention_mask"):
        out = layer(hidden, None, None)
    else:
        out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def encode_prompts(
    model: CLIPSegForImageSegmentation,
    processor: CLIPSegProcessor,
    prompts: list[str],
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Text conditioning vectors: float (P, projection_dim), one row per prompt, in the model's dtype.

    Tokenizes with padding (and truncation to the tokenizer's max length) like the processor does,
    then ``model.clip.get_text_features``. ``device`` defaults to the model's device. No no_grad here.
    """
    if device is None:
        device = next(model.parameters()).device
    tokens = processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
    if trains_from_scratch(model):
        return model.encode_prompts(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    features = model.clip.get_text_features(
        input_ids=tokens["input_ids"].to(device),
        attention_mask=tokens["attention_mask"].to(device),
    )
    if not isinstance(features, torch.Tensor):  # transformers >= 5 returns an output object
        features = features.pooler_output
    return features


def decode(
    model: CLIPSegForImageSegmentation,
    activations: list[torch.Tensor],
    cond: torch.Tensor,
) -> torch.Tensor:
    """Decoder logits: float (B, H, W) for activations from a (B, 3, H, W) input.

    activations: ``encode_images`` output, possibly cached in another dtype/device (e.g. fp16 on CPU);
        cast to the decoder's dtype and device here.
    cond: float (B, projection_dim), one conditioning vector per image (index ``encode_prompts``).
    The batch dim is kept for B == 1 (older transformers squeezed it away).
    """
    param = next(model.decoder.parameters())
    activations = [a.to(device=param.device, dtype=param.dtype) for a in activations]
    cond = cond.to(device=param.device, dtype=param.dtype)
    if trains_from_scratch(model):
        return model.decode(activations, cond)
    out = model.decoder(activations, cond)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    return logits


# --------------------------------------------------------------------------------------------------
# Parameter bookkeeping


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (only those with requires_grad if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(model: nn.Module) -> dict[str, int | None]:
    """The model's scalar parameters, and its decoder's (None for a model without a ``decoder``)."""
    decoder = getattr(model, "decoder", None)
    return {"parameters": count_parameters(model),
            "decoder_parameters": count_parameters(decoder) if decoder is not None else None}


def fold_batchnorm(model: nn.Module) -> int:
    """For inference: fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into
    that conv (its weights scaled, a bias added), and drop it. The model computes the same function (fp32
    logits agree to about 1e-5; under bf16 autocast the rounding differs, by about as much as bf16 differs
    from fp32) with one memory-bound pass fewer per folded layer: LiteSeg has 42 (``bench/bench_inference.py``
    times it folded and not); CLIPSeg has none. The model must be in eval mode, and its batch norms are
    gone afterwards, so it is not for training or saving. Returns how many were folded."""
    folded = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
                folded += 1
    return folded


def decoder_parameter_names(model: CLIPSegForImageSegmentation) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the decoder's parameters, e.g. "decoder.film_mul.weight"."""
    return [name for name, _ in model.named_parameters() if name.startswith(_DECODER_PREFIX)]
