#!/usr/bin/env python
"""A local web page for inspectors: photos in, masks out, with the shipped LiteSeg model or any checkpoint.

    pip install -r requirements-app.txt      # once: gradio (the core install does not need it)
    python app.py                            # then open http://127.0.0.1:7860
    python app.py --model runs/exp/best --port 8080

Upload photos (or pick bundled samples), tick the prompts, set each prompt's threshold (it starts at the
checkpoint's tuned value) and press Segment: for every photo and prompt the page shows the mask over the
photo, the mask and the share of the photo it covers, and offers the masks as predict.py names them
(<image_stem>__<prompt_slug>.png; a zip when there are several). The masks are predict.py's own: the page
calls its ``predict_images``, so a mask downloaded here is byte for byte the file predict.py writes.

The same is an API, ``/segment`` (image file, prompt, threshold -> mask PNG), for ``gradio_client``;
docs/app.md has the example. The server listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

import predict
from defectseg.cli import fail, int_at_least, nonempty, run, setup_logging
from defectseg.inference import Segmenter, check_device, thresholds_mismatch
from defectseg.io import ImageReadError, load_image, read_mask_png
from defectseg.manifest import mask_name
from defectseg.model import MODEL_ENV_VAR, SHIPPED_MODEL, ModelLoadError, read_metadata, resolve_model_arg
from defectseg.tasks import TaskTableError, prompt_slug

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger("app")

REPO = Path(__file__).resolve().parent
SAMPLES = sorted(REPO.glob("sample_data/*/valid/*.jpg"))
PREVIEW_SIDE = 1024  # longest side of the pictures the page shows; masks are written at the photo's size
INSTALL_HINT = "the web app needs gradio: pip install -r requirements-app.txt"
ZIP_NAME = "masks.zip"
REQUEST_TTL_S = 3600  # how long a request's masks (and gradio's copies of them) are kept


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=nonempty, default=None,
                        help="Hub id, save_pretrained folder, runs/<name>/best or decoder .safetensors file "
                             f"(default: ${MODEL_ENV_VAR}, else the shipped model models/{SHIPPED_MODEL.name})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the page to the network (default: %(default)s)")
    parser.add_argument("--port", type=int_at_least(1, below=65536), default=7860, help="port (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


# -- segmenting: predict.py's own path, no gradio ---------------------------------------------------


@dataclass
class MaskResult:
    """One photo and prompt.

    mask_file: predict.py's file, <folder>/<image_stem>__<prompt_slug>.png, (H, W) {0, 255} at the photo's size.
    covered: share of the photo's pixels in the mask, 0 to 1.
    overlay: (h, w, 3) uint8, the photo at most PREVIEW_SIDE pixels a side with the mask tinted over it.
    mask: (h, w) uint8 {0, 255}, the mask at the overlay's size.
    """

    image: Path
    prompt: str
    threshold: float
    mask_file: Path
    covered: float
    overlay: np.ndarray
    mask: np.ndarray


@dataclass
class Page:
    """What one press of Segment shows: results, the file to download (a PNG, a zip for several, or
    None) and messages for the user (unreadable photos, untrained prompts, input to fix)."""

    results: list[MaskResult] = field(default_factory=list)
    download: Path | None = None
    messages: list[str] = field(default_factory=list)


def preview(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, 3) overlay and (h, w) {0, 255} mask at most PREVIEW_SIDE a side, from the (H, W, 3) photo
    and its (H, W) bool mask."""
    scale = min(1.0, PREVIEW_SIDE / max(mask.shape))
    if scale < 1.0:
        size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA) > 127
    return predict.tint(image, mask), np.where(mask, 255, 0).astype(np.uint8)


def tidy(message: str, paths: Sequence[Path]) -> str:
    """``message`` with each of ``paths`` (upload folders the user never saw) shortened to its file name."""
    for path in sorted(paths, key=lambda p: -len(str(p))):
        message = message.replace(str(path), path.name)
    return message


def why_unreadable(path: Path) -> str:
    """The loader's own message for an image predict.py could not read."""
    try:
        load_image(path)
    except ImageReadError as err:
        return str(err)
    return f"{path}: could not be segmented"


class Inspector:
    """The page's work without the page: a loaded model, and a folder for each request's masks."""

    def __init__(self, segmenter: Segmenter, workdir: Path) -> None:
        self.segmenter = segmenter
        self.workdir = Path(workdir)
        self.task_prompts = [task.prompt for task in segmenter.tasks.values()]

    def threshold(self, prompt: str) -> float:
        """The checkpoint's tuned threshold for the prompt's task, else the default (as predict.py)."""
        return self.segmenter.threshold(prompt) if prompt.strip() else self.segmenter.default_threshold

    def new_folder(self) -> Path:
        """A folder for one request's masks; the folders of requests older than REQUEST_TTL_S go first,
        so a server left running does not fill its disk (the page's downloads last as long)."""
        cutoff = time.time() - REQUEST_TTL_S
        for old in self.workdir.glob("request-*"):
            try:
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:  # removed meanwhile
                pass
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.workdir))

    def segment_files(self, paths: list[Path], thresholds: dict[str, float]) -> tuple[list[MaskResult], list[str]]:
        """Masks of every photo for every prompt (its threshold), written by predict.py's ``predict_images``
        into a new folder; returns the results and one message per photo that could not be read.
        Raises predict.InputError for prompts or photos whose mask files would collide."""
        prompts = predict.check_prompts(list(thresholds), [""])
        predict.check_unique_outputs(paths, prompts, [""], remedy="Rename one of them and upload again, or "
                                     "segment them in separate requests")
        thresholds = {p.strip(): t for p, t in thresholds.items()}
        out = self.new_folder()
        stats = predict.predict_images(self.segmenter, paths, thresholds, out, suffixes=[""], workers=0)
        results = []
        for path in (p for p in paths if p not in stats.failed):
            image = load_image(path)
            for prompt in prompts:
                mask_file = out / mask_name(path.name, prompt_slug(prompt))
                mask = read_mask_png(mask_file)
                overlay, small = preview(image, mask)
                results.append(MaskResult(path, prompt, thresholds[prompt], mask_file, float(mask.mean()),
                                          overlay, small))
        return results, [why_unreadable(p) for p in stats.failed]

    def page(self, paths: list[Path], thresholds: dict[str, float]) -> Page:
        """Everything one press of Segment shows; never raises for bad input (it becomes a message)."""
        if not paths:
            return Page(messages=["Upload a photo or pick a sample first."])
        if not any(p.strip() for p in thresholds):
            return Page(messages=["Tick a prompt or type one."])
        page = Page(messages=[f"{p!r} is not a prompt the model was trained on ({', '.join(self.task_prompts)}): "
                              "its mask may mean little" for p in thresholds if not self.segmenter.trained_on(p)])
        page.messages += [f"{p[:40]!r}... is longer than the model reads: only its start conditions the mask"
                          for p in thresholds if self.segmenter.cuts(p)]
        try:
            page.results, problems = self.segment_files(paths, thresholds)
        except predict.InputError as err:
            return Page(messages=[tidy(str(err), paths)])
        page.messages += [tidy(m, paths) for m in problems]
        files = list(dict.fromkeys(r.mask_file for r in page.results))
        if len(files) == 1:
            page.download = files[0]
        elif files:
            page.download = files[0].parent / ZIP_NAME
            with zipfile.ZipFile(page.download, "w", zipfile.ZIP_STORED) as archive:
                for file in files:
                    archive.write(file, file.name)
        return page

    def segment(self, image: str | Path, prompt: str, threshold: float | None = None) -> Path:
        """The API: one photo and prompt -> predict.py's mask PNG (threshold None: the checkpoint's).
        Raises predict.InputError for an empty prompt, ImageReadError for a file that is not an image."""
        path = Path(image)
        if not prompt or not prompt.strip():
            raise predict.InputError("the prompt must not be empty")
        threshold = self.threshold(prompt) if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise predict.InputError(f"the threshold must be in [0, 1], got {threshold:g}")
        results, problems = self.segment_files([path], {prompt: threshold})
        if problems:
            raise ImageReadError(tidy(problems[0], [path]))
        return results[0].mask_file


# -- the page (gradio) ------------------------------------------------------------------------------


def chosen_paths(files: list[str] | None, samples: list[str] | None) -> list[Path]:
    """Uploaded files, then the picked samples (paths relative to the repository)."""
    return list(dict.fromkeys([Path(f) for f in files or []] + [REPO / s for s in samples or []]))  # each once


def build_ui(inspector: Inspector, model: str) -> gr.Blocks:
    """The gradio Blocks: the inspection page, and the one-image form behind the ``/segment`` API."""
    import gradio as gr

    with gr.Blocks(title="defectseg", delete_cache=(REQUEST_TTL_S, REQUEST_TTL_S)) as demo:
        gr.Markdown(f"# Defect segmentation\nModel: `{model}`")
        with gr.Tab("Inspect"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="Photos", file_count="multiple", type="filepath", elem_id="photos")
                    samples = gr.Dropdown([(f"{p.parts[-3]}: {p.name}", str(p.relative_to(REPO))) for p in SAMPLES],
                                          multiselect=True, label="…or bundled samples", elem_id="samples")
                with gr.Column():
                    checked = gr.CheckboxGroup(inspector.task_prompts, value=inspector.task_prompts,
                                               label="Prompts", elem_id="prompts")
                    sliders = [gr.Slider(0, 1, value=inspector.threshold(p), step=0.01, label=f"threshold: {p}")
                               for p in inspector.task_prompts]
                    text = gr.Textbox(label="Other prompt (optional)", placeholder="segment spalling", elem_id="text")
                    text_slider = gr.Slider(0, 1, value=inspector.segmenter.default_threshold, step=0.01,
                                            label="threshold: other prompt")
                    # whether the user moved that slider since typing the prompt: until then the prompt's own
                    # threshold is used, even when Segment is pressed before the slider shows it
                    text_touched = gr.State(False)
            button = gr.Button("Segment", variant="primary", elem_id="run")
            status = gr.Markdown(elem_id="status")
            table = gr.Markdown(elem_id="table")
            gallery = gr.Gallery(label="Overlay and mask", columns=2, height="auto", elem_id="gallery",
                                 format="png")  # lossless: a saved preview of the mask is still {0, 255}
            download = gr.File(label="Masks (PNG as predict.py names them; a zip for several)", elem_id="download")
        with gr.Tab("API: /segment"):
            gr.Markdown("One photo and prompt to predict.py's mask PNG; `gradio_client` calls it as "
                        "`/segment` (docs/app.md). An empty threshold means the checkpoint's.")
            api_image = gr.File(label="Photo", type="filepath")
            api_prompt = gr.Textbox(label="Prompt", value=inspector.task_prompts[0] if inspector.task_prompts else "")
            api_threshold = gr.Number(label="Threshold", value=None, minimum=0, maximum=1, step=0.01)
            api_button = gr.Button("Segment")
            api_mask = gr.File(label="Mask")

        def show(files: list[str] | None, samples: list[str] | None, prompts: list[str] | None, other: str,
                 other_threshold: float, other_touched: bool, *thresholds: float) -> tuple[str, str, list, str | None]:
            wanted = {p: t for p, t in zip(inspector.task_prompts, thresholds) if p in (prompts or [])}
            if other and other.strip():
                wanted.setdefault(other.strip(), other_threshold if other_touched else inspector.threshold(other))
            page = inspector.page(chosen_paths(files, samples), wanted)
            for message in page.messages:
                gr.Warning(message)
            rows = [f"| {r.image.name} | {r.prompt} | {r.threshold:g} | {r.covered:.2%} | {r.mask_file.name} |"
                    for r in page.results]
            head = "| photo | prompt | threshold | covered | mask file |\n|---|---|---|---|---|\n" if rows else ""
            pictures = [item for r in page.results for item in
                        ((r.overlay, f"{r.image.name} · {r.prompt}: {r.covered:.2%}"), (r.mask, "mask"))]
            count = len(page.results)
            note = "\n\n".join([*(f"⚠ {m}" for m in page.messages), f"{count} mask{'s' * (count != 1)}."])
            return note, head + "\n".join(rows), pictures, str(page.download) if page.download else None

        def api(image: str | None, prompt: str, threshold: float | None) -> str:
            if not image:
                raise gr.Error("upload a photo", print_exception=False)
            try:
                return str(inspector.segment(image, prompt, threshold))
            except (predict.InputError, ImageReadError) as err:
                raise gr.Error(str(err), print_exception=False) from None  # the user's input: no traceback

        button.click(show, [files, samples, checked, text, text_slider, text_touched, *sliders],
                     [status, table, gallery, download], api_visibility="private", concurrency_id="model")
        text.change(lambda prompt: (inspector.threshold(prompt), False), text, [text_slider, text_touched],
                    api_visibility="private")
        text_slider.input(lambda: True, None, text_touched, api_visibility="private")
        api_button.click(api, [api_image, api_prompt, api_threshold], api_mask, api_name="segment",
                         concurrency_id="model")
    return demo


def load_segmenter(model: str, device: str) -> Segmenter:
    """The model the page serves (without TTA); a warning when its thresholds, the sliders' starting
    values, were tuned with TTA or the synonym ensemble. Raises ModelLoadError, TaskTableError."""
    segmenter = Segmenter.load(model, device)
    if mismatch := thresholds_mismatch(read_metadata(model), model, None, False):
        log.warning("%s", mismatch)
    return segmenter


def main(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests to itself
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    try:
        import gradio  # noqa: F401
    except ImportError:
        return fail(INSTALL_HINT)
    if problem := check_device(args.device):
        return fail(problem)
    model = resolve_model_arg(args.model, SHIPPED_MODEL)
    try:
        segmenter = load_segmenter(model, args.device)
    except (ModelLoadError, TaskTableError) as err:
        return fail(str(err))
    with tempfile.TemporaryDirectory(prefix="defectseg-app-") as workdir:
        demo = build_ui(Inspector(segmenter, Path(workdir)), model)
        log.info("serving %s on http://%s:%d (Ctrl-C stops it)", model, args.host, args.port)
        demo.queue(default_concurrency_limit=1)  # with one concurrency_id: one request at a time on the model
        try:
            demo.launch(server_name=args.host, server_port=args.port, quiet=args.quiet, show_error=True)
        except (OSError, OverflowError) as err:  # the port is taken, or --host is no address of this machine
            return fail(f"cannot serve on {args.host}:{args.port} ({str(err).splitlines()[0][:120]}): pass another "
                        "--port, or a --host of this machine")
    return 0


if __name__ == "__main__":
    run(main, build_parser())
