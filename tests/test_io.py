"""defectseg.io and defectseg.cli helpers: reading odd files, durable writes, SIGTERM, argument types."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, write_image
from PIL import Image, TiffImagePlugin

import defectseg.io as io_module
from defectseg.cli import nonempty, split_name
from defectseg.io import (
    AtomicFolder,
    load_image,
    open_image,
    read_mask_values,
    recover_folder,
    write_mask_png,
)
from defectseg.manifest import mask_name, write_manifest
from defectseg.tiny import build_tiny_model

SQUARE = np.zeros((4, 4), np.uint8)
SQUARE[1:3, 1:3] = 255


@pytest.mark.parametrize("name,pixels", [
    ("grey", SQUARE),
    ("bgr", np.dstack([SQUARE] * 3)),
    ("opaque_bgra", np.dstack([SQUARE] * 3 + [np.full_like(SQUARE, 255)])),  # alpha 255 everywhere
    ("white_on_transparent", np.dstack([np.full_like(SQUARE, 255)] * 3 + [SQUARE])),  # the shape is in alpha
])
def test_mask_files_read_as_their_shape_whatever_the_channels(tmp_path, name, pixels):
    path = tmp_path / f"{name}.png"
    cv2.imwrite(str(path), pixels)
    np.testing.assert_array_equal(read_mask_values(path), SQUARE)


def test_grey_alpha_mask(tmp_path):
    Image.fromarray(np.dstack([SQUARE, np.full_like(SQUARE, 255)]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask_values(tmp_path / "la.png"), SQUARE)


@pytest.mark.parametrize("tag,tag_type", [("abc", 2), (TiffImagePlugin.IFDRational(6, 0), 5), (9, 3), (0, 3)])
def test_a_garbage_exif_orientation_is_ignored(tmp_path, tag, tag_type):
    """Cameras and editors write broken tags (text, 6/0, out of range); PIL's exif_transpose ignores
    them, so the image is read as stored."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"MM")
    ifd.tagtype[0x0112] = tag_type
    ifd[0x0112] = tag
    exif = io.BytesIO()
    ifd.save(exif)
    path = write_image(tmp_path / "x.jpg", 16, 12)
    Image.open(path).save(path, exif=b"Exif\x00\x00" + exif.getvalue())
    rgb, raw_size, orientation = open_image(path)
    assert rgb.shape == (12, 16, 3) and raw_size == (16, 12) and orientation == 1
    assert load_image(path).shape == (12, 16, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_pixels_as_pil_does(tmp_path, orientation):
    """open_image turns the pixels itself (exif_transpose writes the EXIF back, which can raise): the same
    result as PIL's exif_transpose for each of the 8 orientations."""
    from PIL import ImageOps

    path = tmp_path / "x.png"
    pixels = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    rgb, raw_size, read = open_image(path)
    assert read == orientation and raw_size == (7, 5)
    np.testing.assert_array_equal(rgb, expected)


def test_a_phone_photo_with_a_tag_pil_cannot_write_back_is_turned_and_read(tmp_path):
    """Orientation 6 beside an ExposureBias of -1/0 (real phones write such tags): PIL's exif_transpose
    raised struct.error re-encoding the EXIF after the photo decoded, and predict.py stopped with a
    traceback before writing any mask."""
    import struct

    ifd = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x9204, 10, 1, struct.pack("<I", 8 + 2 + 2 * 12 + 4))]
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(ifd))
    tiff += b"".join(struct.pack("<HHI", t, kind, n) + v for t, kind, n, v in ifd) + struct.pack("<I", 0)
    tiff += struct.pack("<ii", -1, 0)
    path = write_image(tmp_path / "phone.jpg", 16, 12)
    stored = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(stored).save(path, exif=b"Exif\x00\x00" + tiff, quality=100)
    rgb, raw_size, orientation = open_image(path)
    assert orientation == 6 and raw_size == (16, 12) and rgb.shape == (16, 12, 3)  # turned upright
    np.testing.assert_array_equal(rgb, np.rot90(np.asarray(Image.open(path).convert("RGB")), -1))


def test_a_decoder_s_own_error_is_an_image_read_error(tmp_path, monkeypatch):
    import struct

    path = write_image(tmp_path / "x.jpg", 8, 8)

    def broken(self, *args):
        raise struct.error("argument out of range")

    monkeypatch.setattr(Image.Image, "load", broken)
    with pytest.raises(io_module.ImageReadError, match=r"x.jpg: cannot read image \(error: argument out of range\)"):
        open_image(path)


def test_macos_resource_files_are_not_images(tmp_path):
    for name in ("a.jpg", "._a.jpg", "b.PNG"):
        write_image(tmp_path / name, 4, 4)
    assert [p.name for p in io_module.list_images(tmp_path)] == ["a.jpg", "b.PNG"]


@pytest.mark.parametrize("text,split", [("valid", "valid"), ("test/", "test"), ("./test", "test"), (" train ", "train")])
def test_split_names(text, split):
    assert split_name(text) == split


@pytest.mark.parametrize("text", ["", "a/b", "..", "/", "../test"])
def test_bad_split_names(text):
    with pytest.raises(argparse.ArgumentTypeError):
        split_name(text)


def test_empty_paths_are_refused():
    """An unset shell variable (--out "$OUT") must not mean the current folder."""
    with pytest.raises(argparse.ArgumentTypeError):
        nonempty("  ")
    assert nonempty("runs/x") == "runs/x"
    assert nonempty("~/runs/x") == str(Path.home() / "runs" / "x")  # --out=~/runs/x: no shell expands it


@pytest.mark.parametrize("values,expected", [
    ([0.0, 0.5, 1.0], [0, 128, 255]),  # a float image in [0, 1]: scaled by 255
    ([0.0, 100.0, 255.0], [0, 100, 255]),  # above 1: 8-bit values as floats
    ([0.0, 1000.0, 65535.0], [0, 4, 255]),  # above 255: 16-bit values as floats
])
def test_float_images_are_scaled_by_their_range(tmp_path, values, expected):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([values], dtype=np.float32), "F").save(path)
    np.testing.assert_array_equal(load_image(path)[0], np.repeat(np.array(expected, np.uint8)[:, None], 3, 1))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16"])
def test_a_decoded_image_is_a_writable_array_of_its_own(tmp_path, mode):
    """Callers may draw on the photo they read (an overlay, a test's edit): numpy's view of Pillow's
    bytes is read-only, so a photo of every mode comes back as a writable copy, and so does a mask turned
    by a photo's EXIF tag."""
    path = tmp_path / "x.png"
    Image.new(mode, (3, 2)).save(path)
    for rgb in (load_image(path), io_module.apply_orientation(np.zeros((2, 3), np.uint8), 6)):
        assert rgb.flags.writeable
        rgb[0, 0] = 1


class Stderr:
    """A process's stderr, read by a thread, so that waiting for a line never blocks past its deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.text, self.lines = proc, [], queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.text.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, marker: str, timeout: float = 600) -> None:  # imports and model on a loaded 2-core machine
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if marker in line:
                return
        raise AssertionError(f"{marker!r} never came: {''.join(self.text)}")

    def all(self, timeout: float = 120) -> str:
        """Everything, once the process has ended."""
        self.proc.wait(timeout)
        self.reader.join(timeout)
        return "".join(self.text)


@contextlib.contextmanager
def started(argv: list[str]):
    """A script run in its own process group, killed with its workers however the test ends (a failed
    or timed-out test must not leave them busy on CI's cores)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield proc, Stderr(proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("iotiny") / "tiny", seed=0)


@pytest.fixture(scope="module")
def many_big_images(tmp_path_factory) -> Path:
    """300 copies of a 1600x1200 photo: seconds of decoding, so a signal lands mid-run."""
    folder = tmp_path_factory.mktemp("big")
    first = write_image(folder / "img000.png", 1600, 1200)
    for i in range(1, 300):
        os.link(first, folder / f"img{i:03d}.png")
    return folder


def test_sigterm_to_the_process_group_is_one_line(tiny_model_dir, many_big_images, tmp_path):
    """kill -TERM -PGID (timeout, job schedulers) reaches predict.py and its image-loading workers: one
    line, exit 143, no traceback from the workers, no temp files."""
    out = tmp_path / "pred"
    with started(["predict.py", "--model", str(tiny_model_dir), "--image", str(many_big_images), "--prompt",
                  "segment crack", "--out", str(out), "--workers", "2", "--batch-size", "2"]) as (proc, stderr):
        stderr.wait_for("images x 1 prompts")
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGTERM)
        err = stderr.all()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err and "Error" not in err.replace("ERROR", ""), err
    assert not list(out.glob(".*"))  # no temp file left


def test_sigterm_leaves_no_half_report(many_big_images, tiny_model_dir, tmp_path):
    """evaluate.py stopped by SIGTERM mid-scoring leaves no --out and no temp folder beside it."""
    data = tmp_path / "processed"
    write_mask_png(data / "valid" / "masks" / "first.png", np.ones((1200, 1600), bool))
    rows = []
    for image in sorted(many_big_images.iterdir()):
        mask = data / "valid" / "masks" / mask_name(image.name, "segment_crack")
        os.link(data / "valid" / "masks" / "first.png", mask)
        rows.append({"image": str(image), "mask": str(mask), "task": "cracks", "prompt": "segment crack"})
    write_manifest(data / "valid" / "manifest.csv", rows)
    out = tmp_path / "reports" / "new"
    with started(["evaluate.py", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                  "--save-masks", "--batch-size", "2"]) as (proc, stderr):
        stderr.wait_for("scoring")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)  # the main process only
        err = stderr.all()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert not out.exists() and not list((tmp_path / "reports").iterdir())


def test_files_saved_with_a_byte_order_mark_are_read(tmp_path):
    """Windows editors save UTF-8 with a BOM: annotations, manifests and task files still read."""
    from defectseg.coco import load_coco
    from defectseg.manifest import read_manifest
    from defectseg.tasks import load_tasks

    bom = "\ufeff"
    coco = tmp_path / "_annotations.coco.json"
    coco.write_text(bom + '{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}], '
                    '"annotations": [], "categories": [{"id": 1, "name": "crack"}]}', encoding="utf-8")
    assert [e.file_name for e in load_coco(coco).images] == ["a.jpg"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(bom + "image,mask,task,prompt\na.jpg,m.png,cracks,segment crack\n", encoding="utf-8")
    assert read_manifest(manifest)[0]["task"] == "cracks"
    tasks = tmp_path / "tasks.json"
    tasks.write_text(bom + '{"tasks": {"rust": {"prompt": "segment rust"}}}', encoding="utf-8")
    assert load_tasks(tasks)["rust"].prompt == "segment rust"


# --- AtomicFolder: the one way a folder (checkpoint, report) is written


def write_folder(target: Path, content: str, **kwargs) -> None:
    with AtomicFolder(target, **kwargs) as folder:
        (folder.path / "a.txt").write_text(content)
        folder.commit()


def test_atomic_folder_replaces_the_whole_folder_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out"
    write_folder(target, "one")
    (target / "old.txt").write_text("from the first write")
    write_folder(target, "two", sync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError), AtomicFolder(target) as folder:  # no commit: nothing changes
        (folder.path / "a.txt").write_text("three")
        raise RuntimeError
    assert (target / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_through_a_link_replaces_the_linked_folder_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    write_folder(tmp_path / "link", "new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a.txt").read_text() == "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        write_folder(tmp_path / "file", "new")


def test_long_names_that_share_their_start_never_share_temp_folders(tmp_path):
    a, b = tmp_path / ("x" * 240 + "a"), tmp_path / ("x" * 240 + "b")
    write_folder(a, "a")
    os.rename(a, io_module._sibling(a, "old", 999999999))  # a's save cut between its renames by a crash
    write_folder(b, "b")  # does not take a's old copy for its own
    assert (b / "a.txt").read_text() == "b"
    recover_folder(a)
    assert (a / "a.txt").read_text() == "a"


def test_a_swap_cut_between_its_renames_is_repaired_unless_its_writer_still_runs(tmp_path):
    target = tmp_path / "last"
    write_folder(target, "old")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live process
    try:
        os.rename(target, tmp_path / f".last.old-{writer.pid}")  # a writer between its two renames
        recover_folder(target)
        assert not target.exists()
    finally:
        writer.kill()
        writer.wait()
    os.rename(tmp_path / f".last.old-{writer.pid}", tmp_path / ".last.old-999999999")  # no such process: a crash
    recover_folder(target)
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_two_processes_repairing_one_swap_both_succeed(tmp_path, monkeypatch):
    """Every DDP rank resuming a run repairs last/; the one that loses the race finds it put back."""
    target = tmp_path / "last"
    write_folder(target, "old")
    aside = tmp_path / ".last.old-999999999"
    os.rename(target, aside)

    def other_rank_wins(pid: str) -> bool:  # the other process renames between our look and our rename
        if aside.exists():
            os.rename(aside, target)
        return False

    monkeypatch.setattr(io_module, "pid_alive", other_rank_wins)
    recover_folder(target)
    assert (target / "a.txt").read_text() == "old"


def test_in_processes_gives_prefetched_results_in_order_after_the_parent_used_opencv_threads():
    """Augmentation in forked workers (train.py --augment-workers): each item's own result, in order, and no
    hang when the parent had already spun up OpenCV's thread pool (a fork inherits it without its threads).
    Run in a subprocess with a time limit, so a hang fails the test instead of stalling the suite."""
    code = (
        "import cv2, numpy as np\n"
        "from defectseg.io import in_processes, prefetched\n"
        "cv2.setNumThreads(2)\n"
        "big = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)\n"
        "cv2.resize(big, (1000, 1000))  # the parent's thread pool is up\n"
        "fn = lambda i: cv2.resize(np.roll(big, i, axis=0), (300 + i, 200), interpolation=cv2.INTER_AREA)\n"
        "items = list(range(7))\n"
        "got = list(in_processes(fn, items, workers=2))\n"
        "want = list(prefetched(fn, items, 0))\n"
        "assert [i for i, _ in got] == items\n"
        "assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))\n"
        "print('same')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]


@pytest.mark.parametrize("cores, world, expected", [(16, 1, 8), (16, 2, 8), (16, 4, 4), (16, 32, 1), (2, 1, 2),
                                                    (None, 1, 1)])
def test_cores_are_shared_out_among_the_processes_of_a_run(monkeypatch, cores, world, expected):
    """Decoding and augmenting threads: the machine's cores divided by the processes of a multi-GPU run,
    at least 1 (also where Python cannot count the cores), at most 8."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert io_module.cores_per_process(world) == expected
    monkeypatch.setenv("WORLD_SIZE", str(world))  # as torchrun sets it: the default
    assert io_module.cores_per_process() == expected
