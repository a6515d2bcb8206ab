"""app.py, the inspectors' web page, on the shipped model: its masks are predict.py's, byte for byte.

Three levels: the page's work as plain functions (runs everywhere), the ``/segment`` API through
gradio_client and the page in headless Chromium driven by Playwright (both skip where gradio,
Playwright or a system Chromium is missing: ``pip install -r requirements-app.txt``,
``apt-get install -y chromium``).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from conftest import REPO, SAMPLE
from PIL import Image

import app
import predict
from defectseg.inference import Segmenter
from defectseg.io import ImageReadError, read_mask_png
from defectseg.model import SHIPPED_MODEL, read_metadata

PHOTO = SAMPLE / "cracks" / "valid" / "2416_jpg.rf.bf2b80646c006685421f2dfd20b1cd06.jpg"
PROMPT = "segment crack"
# the shipped model's tuned threshold for cracks, as its checkpoint records it: the page's slider starts there
THRESHOLD = read_metadata(SHIPPED_MODEL)["thresholds"][PROMPT]
STARTUP_S = 600  # the server's start (imports, model) on a loaded 2-core machine
# .ci/run sets it where the app's extra and Chromium installed: a test that would skip for want of them fails
REQUIRED = os.environ.get("DEFECTSEG_REQUIRE_APP") == "1"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing(reason: str) -> NoReturn:
    """Skip the test for want of the app's extra or Chromium; fail it where CI installed them."""
    if REQUIRED:
        pytest.fail(f"{reason}, though DEFECTSEG_REQUIRE_APP=1 (.ci/run installed it)")
    pytest.skip(reason)


def need(module: str):
    """``module``, imported (as ``pytest.importorskip``, with ``missing`` where it cannot be)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing(f"no {module} ({err}; pip install -r requirements-app.txt)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """predict.py's mask of PHOTO for PROMPT at THRESHOLD."""
    out = tmp_path_factory.mktemp("predict")
    args = ["--image", str(PHOTO), "--prompt", PROMPT, "--threshold", str(THRESHOLD), "--out", str(out),
            "--device", "cpu", "--workers", "0", "-q"]
    assert predict.main(predict.build_parser().parse_args(args)) == 0
    return (out / "2416_jpg.rf.bf2b80646c006685421f2dfd20b1cd06__segment_crack.png").read_bytes()


@pytest.fixture(scope="module")
def inspector(tmp_path_factory: pytest.TempPathFactory) -> app.Inspector:
    return app.Inspector(Segmenter.load(str(SHIPPED_MODEL), "cpu"), tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What inspectors upload by mistake or from odd cameras."""
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    forms = {
        "gray": Image.fromarray(rng.integers(0, 255, (61, 97), dtype=np.uint8)),
        "rgba": Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8)),
        "deep": Image.fromarray(rng.integers(0, 65535, (33, 65), dtype=np.uint16)),
    }
    paths = {}
    for name, img in forms.items():
        img.save(paths.setdefault(name, folder / f"{name}.png"))
    assert Image.open(paths["deep"]).mode.startswith("I")  # really 16-bit
    (paths.setdefault("text", folder / "notes.jpg")).write_text("not an image")
    (paths.setdefault("empty", folder / "empty.png")).write_bytes(b"")
    return paths


# -- the page's work, no gradio ---------------------------------------------------------------------


def test_the_page_mask_is_predict_py_mask(inspector, reference):
    assert inspector.threshold(PROMPT) == THRESHOLD
    assert inspector.task_prompts == ["segment crack", "segment taping area"]
    assert PHOTO in app.SAMPLES and app.chosen_paths(None, [str(PHOTO.relative_to(REPO))]) == [PHOTO]
    mask = inspector.segment(PHOTO, PROMPT, THRESHOLD)
    assert mask.name == "2416_jpg.rf.bf2b80646c006685421f2dfd20b1cd06__segment_crack.png"
    assert mask.read_bytes() == reference
    assert inspector.segment(PHOTO, PROMPT).read_bytes() == reference  # None: the tuned threshold


def test_several_masks_come_as_one_zip_named_as_predict_names_them(inspector):
    photos = sorted((SAMPLE / "drywall" / "valid").glob("*.jpg"))[:2]
    page = inspector.page(photos, {p: inspector.threshold(p) for p in inspector.task_prompts})
    assert page.messages == [] and len(page.results) == 4 and page.download.name == "masks.zip"
    import zipfile

    with zipfile.ZipFile(page.download) as archive:
        assert sorted(archive.namelist()) == sorted(
            predict.mask_name(p.name, s) for p in photos for s in ("segment_crack", "segment_taping_area"))
    taping = [r for r in page.results if r.prompt == "segment taping area"]
    assert all(0.001 < r.covered < 0.6 for r in taping)  # real, partial masks
    for r in page.results:
        assert r.overlay.shape[:2] == r.mask.shape and max(r.mask.shape) <= app.PREVIEW_SIDE


def test_bad_uploads_are_messages_and_the_good_ones_are_still_segmented(inspector, odd_files):
    page = inspector.page(list(odd_files.values()), {PROMPT: 0.5})
    assert sorted(r.image.name for r in page.results) == ["deep.png", "gray.png", "rgba.png"]
    assert len(page.messages) == 2
    assert any("notes.jpg: cannot read image" in m for m in page.messages)
    assert any("empty.png: cannot read image" in m for m in page.messages)
    assert all(str(odd_files["text"].parent) not in m for m in page.messages)  # no server folders shown
    for r in page.results:
        assert read_mask_png(r.mask_file).shape == Image.open(r.image).size[::-1]
    with pytest.raises(ImageReadError, match="notes.jpg: cannot read image"):
        inspector.segment(odd_files["text"], PROMPT, 0.5)
    assert inspector.page([], {PROMPT: 0.5}).messages == ["Upload a photo or pick a sample first."]
    assert inspector.page([PHOTO], {}).messages == ["Tick a prompt or type one."]
    same_stem = [odd_files["gray"], odd_files["gray"].with_suffix(".jpg")]
    message = inspector.page(same_stem, {PROMPT: 0.5}).messages[0]
    assert "same file stem" in message and "upload again" in message and "--out" not in message
    assert "not a prompt the model was trained on" in inspector.page([PHOTO], {"segment rust": 0.5}).messages[0]
    with pytest.raises(predict.InputError):
        inspector.segment(PHOTO, " ", 0.5)
    assert inspector.segment(PHOTO, PROMPT, THRESHOLD).is_file()  # and the next request is served


def test_a_huge_photo_is_shown_scaled_and_its_mask_is_full_size(inspector, tmp_path):
    ramp = np.linspace(0, 255, 8000, dtype=np.uint8)
    photo = tmp_path / "huge.jpg"
    Image.fromarray(np.broadcast_to(ramp[None, :, None], (6000, 8000, 3)).copy()).save(photo, quality=80)
    (result,) = inspector.page([photo], {PROMPT: THRESHOLD}).results
    assert read_mask_png(result.mask_file).shape == (6000, 8000)
    assert result.overlay.shape == (768, 1024, 3) and result.mask.shape == (768, 1024)


def test_a_photo_given_twice_is_segmented_once(inspector):
    assert app.chosen_paths([str(PHOTO), str(PHOTO)], [str(PHOTO.relative_to(REPO))]) == [PHOTO]
    page = inspector.page(app.chosen_paths([str(PHOTO), str(PHOTO)], None), {PROMPT: THRESHOLD})
    assert len(page.results) == 1 and page.download == page.results[0].mask_file


def test_a_prompt_longer_than_the_model_reads_is_said_on_the_page(inspector):
    long = "segment crack along the plaster near the window frame and down to the skirting board, then the door"
    page = inspector.page([PHOTO], {long: 0.5})
    assert len(page.results) == 1
    assert any("longer than the model reads: only its start conditions the mask" in m for m in page.messages)
    assert not any("longer than" in m for m in inspector.page([PHOTO], {PROMPT: 0.5}).messages)


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path, capsys):
    need("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = app.main(app.build_parser().parse_args(["--port", str(port), "--device", "cpu", "-q"]))
    assert code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert f"cannot serve on 127.0.0.1:{port}" in line and "pass another --port" in line
    with pytest.raises(SystemExit) as info:
        app.build_parser().parse_args(["--port", "70000"])
    assert info.value.code == 2


def test_without_gradio_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        app.build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert app.main(app.build_parser().parse_args([])) == 1
    assert "pip install -r requirements-app.txt" in capsys.readouterr().err


def test_a_bad_model_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradio", type(sys)("gradio"))  # present, never reached
    monkeypatch.delenv("DEFECTSEG_MODEL", raising=False)
    assert app.main(app.build_parser().parse_args(["--model", str(tmp_path / "missing")])) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert str(tmp_path / "missing") in line


def test_thresholds_tuned_with_tta_warn_the_app_that_runs_without(tmp_path, caplog):
    from defectseg.evaluation import write_thresholds

    model = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, model, ignore=shutil.ignore_patterns("report", "ablations"))
    assert app.load_segmenter(str(model), "cpu") and "were tuned with" not in caplog.text
    write_thresholds(model, {"segment crack": 0.5}, {"split": "valid", "tta": "d4", "ensemble": True})
    segmenter = app.load_segmenter(str(model), "cpu")
    assert segmenter.threshold("segment crack") == 0.5
    assert "were tuned with --tta d4 and --ensemble (evaluate.py --write-thresholds on valid)" in caplog.text


# -- the running app: gradio_client and Chromium ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """http://127.0.0.1:<port>/ of ``python app.py`` (the shipped model, by default) in a subprocess. The free
    port is found before app.py binds it, so another program may take it in between: then another port."""
    need("gradio")
    log = tmp_path_factory.mktemp("server") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("DEFECTSEG_MODEL", None)
    for attempt in range(3):
        port = free_port()
        with open(log, "w") as sink:
            proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--device", "cpu"], cwd=REPO,
                                    env=env, stdout=sink, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + STARTUP_S
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"app.py did not answer in {STARTUP_S} s:\n{log.read_text()}"
                try:
                    urllib.request.urlopen(url, timeout=5).close()
                    break
                except OSError:
                    time.sleep(1)
            else:
                assert attempt < 2 and "cannot serve on" in log.read_text(), f"app.py ended:\n{log.read_text()}"
                continue
            yield url
            return
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_the_segment_api_from_gradio_client(server, reference, odd_files):
    client_module = need("gradio_client")
    client = client_module.Client(server, verbose=False)
    mask = client.predict(client_module.handle_file(str(PHOTO)), PROMPT, THRESHOLD, api_name="/segment")
    assert Path(mask).read_bytes() == reference
    with pytest.raises(Exception, match="notes.jpg: cannot read image"):
        client.predict(client_module.handle_file(str(odd_files["text"])), PROMPT, 0.5, api_name="/segment")
    mask = client.predict(client_module.handle_file(str(odd_files["deep"])), PROMPT, None, api_name="/segment")
    assert Path(mask).name == "deep__segment_crack.png" and read_mask_png(mask).shape == (33, 65)


def test_the_docs_client_example_runs(server, reference):
    need("gradio_client")
    docs = (REPO / "docs" / "app.md").read_text(encoding="utf-8")
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "gradio_client" in block]
    assert len(example.strip().splitlines()) <= 6
    code = example.replace("http://127.0.0.1:7860/", server) + "\nimport sys; sys.stdout.write('\\nMASK=' + mask)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.split("MASK=")[-1].strip()).read_bytes() == reference


@pytest.fixture
def page():
    """A page of headless Chromium (Playwright driving the system's browser); skips where either is missing."""
    sync_api = need("playwright.sync_api")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        missing("no chromium on this machine (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(300_000)
        try:
            yield page
        finally:
            browser.close()


def test_in_chromium_a_bad_file_then_a_photo_whose_mask_is_predict_py_mask(server, page, reference, odd_files,
                                                                            tmp_path):
    sync_api = need("playwright.sync_api")
    page.goto(server)
    page.locator("#photos input[type=file]").set_input_files(str(odd_files["text"]))
    page.locator("#text textarea").fill("segment cracks")  # a synonym: its task's tuned threshold
    page.locator("#text textarea").blur()
    other = page.get_by_role("spinbutton", name="number input for threshold: other prompt")
    sync_api.expect(other).to_have_value(str(THRESHOLD))
    page.locator("#run").click()
    sync_api.expect(page.locator("#status")).to_contain_text("notes.jpg: cannot read image")
    page.screenshot(path=tmp_path / "bad_file.png", full_page=True)

    page.goto(server)  # the server goes on: a fresh page, a real photo, one prompt
    page.locator("#photos input[type=file]").set_input_files(str(PHOTO))
    page.get_by_role("checkbox", name="segment taping area").uncheck()
    page.locator("#run").click()
    sync_api.expect(page.locator("#status")).to_contain_text("1 mask.")
    sync_api.expect(page.locator("#gallery img")).to_have_count(2)  # overlay and mask
    sync_api.expect(page.locator("#table")).to_contain_text("segment crack")
    with page.expect_download() as download:
        page.locator("#download a[download]").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    page.screenshot(path=tmp_path / "result.png", full_page=True)
    assert saved.name == "2416_jpg.rf.bf2b80646c006685421f2dfd20b1cd06__segment_crack.png"
    assert saved.read_bytes() == reference
    assert (tmp_path / "result.png").stat().st_size > 10_000


def test_in_chromium_a_typed_synonym_clicked_at_once_gets_its_task_s_threshold(server, page):
    """Typing a synonym and pressing Segment at once (the slider's update not yet back from the server)
    still segments at its task's tuned threshold, as predict.py would; a slider the user moves wins."""
    sync_api = need("playwright.sync_api")
    page.goto(server)
    page.locator("#photos input[type=file]").set_input_files(str(PHOTO))
    for name in ("segment crack", "segment taping area"):
        page.get_by_role("checkbox", name=name).uncheck()
    page.locator("#text textarea").fill("segment cracks")
    page.locator("#run").click()
    sync_api.expect(page.locator("#status")).to_contain_text("1 mask.")
    sync_api.expect(page.locator("#table")).to_contain_text("segment cracks")
    cells = page.locator("#table tbody tr").first.locator("td").all_inner_texts()
    other = page.get_by_role("spinbutton", name="number input for threshold: other prompt")
    sync_api.expect(other).to_have_value(f"{THRESHOLD:g}")  # the slider caught up
    other.fill("0.3")
    other.press("Enter")
    page.locator("#run").click()
    sync_api.expect(page.locator("#table tbody tr").first.locator("td").nth(2)).to_have_text("0.3")
    assert [c.strip() for c in cells[1:3]] == ["segment cracks", f"{THRESHOLD:g}"]


def test_old_requests_are_deleted_when_a_new_one_comes(inspector: app.Inspector) -> None:
    """A server left running keeps each request's masks for REQUEST_TTL_S, not until it stops."""
    old, recent = inspector.new_folder(), inspector.new_folder()
    (old / "a.png").write_bytes(b"x")
    stale = time.time() - app.REQUEST_TTL_S - 60
    os.utime(old, (stale, stale))
    new = inspector.new_folder()
    assert not old.exists() and recent.is_dir() and new.is_dir()
