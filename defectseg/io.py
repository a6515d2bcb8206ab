"""Reading images and writing files safely.

``load_image`` is the one way the project reads a photo: EXIF orientation applied, any mode
(grayscale, palette, RGBA, 16-bit) turned into 8-bit RGB. Every writer here is atomic: it writes a
temporary file beside the target and renames it into place, so an interrupted run never leaves a
truncated PNG, CSV or JSON where a good one was. By default the data also reaches the disk (fsync)
before the rename, so a power cut cannot leave an empty file either; bulk writers of files that can be
made again (masks, cached activations) pass ``sync=False``, which keeps the rename but skips the
fsync, the slow part on some disks. A folder (a checkpoint, a report) is written the same way by
``AtomicFolder``: in full beside its target, then swapped in by two renames.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

_UMASK = os.umask(0)
os.umask(_UMASK)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112


class ImageReadError(OSError):
    """An image file that is missing, unreadable or not an image."""


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8 RGB; 16-bit and float images are scaled, not clipped (a float
    image whose values lie in [0, 1] as such, one above 1 as 8-bit values, one above 255 as 16-bit ones)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0)
        hi = 65535.0 if img.mode.startswith("I;16") or top > 255 else 1.0 if img.mode == "F" and top <= 1 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite onto white so transparent areas look like what a viewer shows.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a copy: np.asarray's view of PIL's bytes is read-only


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation, 1 to 8; 1 when absent or not a valid value (as PIL's exif_transpose
    treats it: a camera's garbage tag does not make the photo unreadable)."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return 1
    return value if 1 <= value <= 8 else 1


_BIG_PHOTO_FILTER = ("ignore", None, Image.DecompressionBombWarning, None, 0)  # as filterwarnings stores it


def _ignore_big_photo_warning() -> None:
    """A big photo (up to twice Pillow's limit: above that it raises, and ``open_image`` names the file)
    is read without Pillow's warning. The filter is checked per call and added only where missing (a
    caller's catch_warnings block, pytest's, may have dropped it): a catch_warnings block per call is not
    safe in the reading threads, and adding a filter each time would reset every warning's once-only
    record, so others would repeat."""
    if _BIG_PHOTO_FILTER not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_image(path: str | Path) -> tuple[np.ndarray, tuple[int, int], int]:
    """Fully decode an image file.

    Returns (rgb, raw_size, orientation): rgb is (H, W, 3) uint8 with the EXIF orientation applied,
    raw_size is (width, height) as stored in the file before any rotation, orientation the EXIF tag
    (1 when absent). Raises ImageReadError naming the file for a missing, truncated or non-image file.
    """
    path = Path(path)
    _ignore_big_photo_warning()
    try:
        with Image.open(path) as img:
            raw_size = img.size
            orientation = exif_orientation(img)
            img.load()  # full decode: truncated or corrupt data raises here, not later
            # the pixels turned as exif_transpose turns them, without writing the EXIF back (a phone's odd
            # tag makes that raise after the photo decoded fine)
            img = img.transpose(_ORIENTATION_TRANSPOSE[orientation]) if orientation != 1 else img
            return _to_rgb_uint8(img), raw_size, orientation
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as err:  # a decompression bomb, or just a huge picture
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise ImageReadError(f"{path}: image too large to read safely ({err}); images over {limit:.0f} megapixels "
                             "are refused, downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot read image ({err})") from None
    except Exception as err:  # a decoder's own error on a damaged file (struct.error, TypeError, ...)
        raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, writable, EXIF orientation applied. Raises ImageReadError naming the file."""
    return open_image(path)[0]


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; not macOS's ``._`` resource files beside them."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("._") and p.is_file())


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries (a rename inside it), to the disk. Folders are skipped where
    the system cannot open them (Windows, which also needs a writable handle to flush a file)."""
    if os.name != "posix" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest start of ``text`` that is at most ``max_bytes`` bytes in UTF-8 (never half a character).

    >>> utf8_prefix("größe", 3)
    'gr'
    """
    return text.encode("utf-8", "surrogateescape")[:max_bytes].decode("utf-8", "ignore")


# Most of the target's name that a temporary file's name repeats: with mkstemp's dot, 8 random characters
# and ".tmp" it stays under the 255-byte limit on a file name even for a target close to that limit.
_TMP_NAME_BYTES = 200


@contextmanager
def atomic_path(target: str | Path, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``, else delete it.

    sync: flush the file before the rename and the folder after it, so the new content survives a
    power cut (see the module's docstring). The temporary name is ``.<target name>.<random>.tmp``, the
    target's name cut to ``_TMP_NAME_BYTES`` bytes, so any target name the disk accepts works.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{utf8_prefix(target.name, _TMP_NAME_BYTES)}."
    tmp_path: Path | None = None
    try:  # the file made inside: an interrupt right after mkstemp still removes it
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
        tmp_path = Path(tmp)
        os.close(fd)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        if sync:
            fsync_path(tmp_path)
        os.replace(tmp_path, target)
        if sync:
            fsync_path(target.parent)
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(target: str | Path, data: bytes, sync: bool = True) -> None:
    with atomic_path(target, sync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | Path, obj) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) uint8 or (H, W, 3) RGB uint8 array."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def write_mask_png(target: str | Path, mask: np.ndarray) -> None:
    """Write a binary mask as a single-channel 8-bit PNG with values {0, 255}, atomically (no fsync:
    masks are written by the thousand and can be made again).

    mask: (H, W) bool or integer array; any non-zero value is foreground.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    write_bytes_atomic(target, encode_png(np.where(mask > 0, 255, 0).astype(np.uint8)), sync=False)


def read_mask_values(path: str | Path) -> np.ndarray:
    """(H, W) pixel values of a mask image as stored: a colour file gives its largest colour channel, and
    a file with an alpha channel 0 where it is fully transparent (an opaque black-and-white RGBA mask
    reads as its colours, a white shape on a transparent background as that shape). Raises ImageReadError."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(f"{path}: cannot read mask")
    if arr.ndim == 2:
        return arr
    if arr.shape[2] in (2, 4):  # grey + alpha or BGRA
        return np.where(arr[:, :, -1] > 0, arr[:, :, :-1].max(axis=2), 0).astype(arr.dtype)
    return arr.max(axis=2)


def read_mask_png(path: str | Path) -> np.ndarray:
    """(H, W) bool mask from a PNG (any non-zero pixel is foreground). Raises ImageReadError."""
    return read_mask_values(path) > 0


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip a (H, W) array exactly as PIL's exif_transpose does for that EXIF orientation."""
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    if method is None:
        return array
    return np.array(Image.fromarray(array).transpose(method))  # writable, like the unturned input


def cores_per_process(world: int | None = None) -> int:
    """This machine's cores shared out among the ``world`` processes of a multi-GPU run (at least 1, at
    most 8): how many threads one process may give to work that runs beside the others'. ``world``
    None: torchrun's ``WORLD_SIZE`` (1 outside torchrun)."""
    if world is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // max(1, world)))


def prefetched(fn: Callable, items: Sequence, depth: int = 2) -> Iterator[tuple]:
    """Yield (item, fn(item)) in order, computing up to ``depth`` items ahead in ``depth`` threads, so
    reading files (cached activations, images, masks) overlaps the model's work; ``depth=0``: each in
    turn, in the caller's thread."""
    if depth == 0:
        yield from ((item, fn(item)) for item in items)
        return
    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending = deque(pool.submit(fn, item) for item in items[:depth])
        for i, item in enumerate(items):
            result = pending.popleft().result()
            if i + depth < len(items):
                pending.append(pool.submit(fn, items[i + depth]))
            yield item, result


class _Calls:
    """``fn`` over ``items`` as a map-style dataset: element i is fn(items[i])."""

    def __init__(self, fn: Callable, items: Sequence):
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.fn(self.items[i])


def _single_threaded_opencv(_: int) -> None:
    """A forked worker inherits OpenCV's thread pool without its threads (a known cause of hangs after a
    fork): it runs OpenCV single-threaded instead; its parallelism is the workers."""
    cv2.setNumThreads(0)


def in_processes(fn: Callable, items: Sequence, workers: int, depth: int = 2) -> Iterator[tuple]:
    """As ``prefetched``, with ``fn`` run in ``workers`` forked processes, up to ``depth`` items ahead each:
    for CPU-bound work that holds Python's lock (augmentation), which threads cannot spread over cores.
    ``fn`` and what it references (e.g. the decoded images) are inherited by the fork, not copied; results
    come back pickled (tensors through shared memory), in order. Needs the fork start method (Linux, macOS)."""
    import torch.utils.data

    loader = torch.utils.data.DataLoader(_Calls(fn, items), batch_size=None, num_workers=workers,
                                         prefetch_factor=depth, multiprocessing_context="fork",
                                         worker_init_fn=_single_threaded_opencv)
    yield from zip(items, loader)


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError):
    """A JSON file's content (a UTF-8 byte-order mark is allowed, as Roboflow and Windows editors write
    one). Raises ``error`` with one line naming the file and the problem: not found, a folder, unreadable,
    or not valid JSON. ``what`` names the kind of file in those lines, e.g. "annotations file"."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({os_reason(err)})") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, and ints over Python's digit limit
        raise error(f"{path}: invalid JSON ({err})") from None


def os_reason(err: OSError) -> str:
    """An OSError in a few words, with the file it names: "No space left on device (/data/x.png)"."""
    reason = err.strerror or str(err)
    return f"{reason} ({err.filename})" if err.filename else reason


def pid_alive(pid: str) -> bool:
    """Whether the process ``pid`` (text, as found in a temp folder's name) still runs. This process
    counts as gone: its own leftovers from an earlier attempt are stale too."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the temp folders ``<parent>/<prefix><pid>...`` left by processes that no longer run (never
    a live writer's); returns what was removed."""
    stale = [p for p in parent.glob(glob.escape(prefix) + "*") if not pid_alive(p.name[len(prefix):].split("-")[0])]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


class AtomicFolder:
    """Write a whole folder beside ``target``, then put it in place at ``commit``; the one way this project
    writes a folder (checkpoints, reports).

    >>> with AtomicFolder(out) as folder:
    ...     (folder.path / "a.json").write_text("{}")
    ...     folder.commit()

    ``target`` is taken with symlinks resolved (a linked folder is replaced where it lies, the link kept).
    ``path`` is a hidden sibling ``.<name>.tmp-<pid>``. ``commit`` flushes the new folder to the disk
    (each file too, unless ``sync=False``: files written by ``write_*_atomic`` are flushed already, and
    masks can be made again), then swaps: the old ``target`` is renamed aside (``.<name>.old-<pid>``),
    the new folder renamed into place, the old one deleted. Leaving the block without ``commit`` (an
    error, Ctrl-C, SIGTERM) deletes the new folder and leaves ``target`` as it was. A crash between the
    two renames leaves ``target`` missing and its old copy aside: the next ``AtomicFolder`` of it, or
    ``recover_folder``, puts that back. Temp folders of processes that no longer run are removed on
    entry. Raises OSError (NotADirectoryError for a ``target`` that is a file).
    """

    def __init__(self, target: str | Path, sync: bool = True) -> None:
        self.target = Path(os.path.realpath(target))
        self.sync = sync
        self.path = _sibling(self.target, "tmp", os.getpid())
        self._aside = _sibling(self.target, "old", os.getpid())

    def __enter__(self) -> AtomicFolder:
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(self.target))
        recover_folder(self.target)
        remove_stale(self.target.parent, _sibling(self.target, "tmp").name)
        if self.target.exists():
            remove_stale(self.target.parent, _sibling(self.target, "old").name)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        entries = sorted(self.path.rglob("*"))
        for file in (p for p in entries if p.is_file()):  # mkstemp and safetensors make 0600 files
            os.chmod(file, 0o666 & ~_UMASK)
        for entry in [*(p for p in entries if self.sync or p.is_dir()), self.path]:
            fsync_path(entry)  # on the disk before the swap: a power cut loses the new or the old, never both
        if self.target.exists():
            try:
                os.rename(self.target, self._aside)
                os.rename(self.path, self.target)
            except BaseException:  # an error, or a signal: put the old folder back unless the new one is in
                if not self.target.exists() and self._aside.exists():
                    os.rename(self._aside, self.target)
                raise
            shutil.rmtree(self._aside, ignore_errors=True)
        else:
            os.rename(self.path, self.target)
        fsync_path(self.target.parent)


def _sibling(target: Path, kind: str, pid: int | None = None) -> Path:
    """``<parent>/.<name>.<kind>-<pid>`` (without the pid: the prefix of all of them). A name too long to
    repeat is cut and given a hash of the whole, so two long names never share their temp folders."""
    name = target.name
    if len(name.encode("utf-8", "surrogateescape")) > _TMP_NAME_BYTES:
        digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{utf8_prefix(name, _TMP_NAME_BYTES - 9)}~{digest}"
    return target.parent / f".{name}.{kind}-{'' if pid is None else pid}"


def remove_folder(target: str | Path) -> None:
    """Delete a folder ``AtomicFolder`` wrote, and the old copies its interrupted swaps set aside (which
    ``recover_folder`` would otherwise put back in its place)."""
    target = Path(os.path.realpath(target))
    shutil.rmtree(target, ignore_errors=True)
    remove_stale(target.parent, _sibling(target, "old").name)


def recover_folder(target: str | Path) -> None:
    """Finish a swap that a crash interrupted: when ``target`` is missing but the copy a process that no
    longer runs renamed aside (``.<name>.old-<pid>``) is there, put the newest such copy back (a live
    writer's is left alone: it is between its two renames). Raises OSError."""
    target = Path(os.path.realpath(target))
    if target.exists():
        return
    prefix = _sibling(target, "old").name
    try:
        aside = sorted((p for p in target.parent.glob(glob.escape(prefix) + "*")
                        if p.is_dir() and not pid_alive(p.name[len(prefix):])), key=lambda p: p.stat().st_mtime)
        if aside:
            logging.getLogger(__name__).warning("restoring %s from %s (a save was interrupted)", target, aside[-1])
            aside[-1].rename(target)
    except OSError:
        if not target.exists():  # else another process (a DDP rank resuming too) put it back first
            raise
