"""Small pieces every script's command line shares: logging, the task flags, clean failure."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn, TextIO

from tqdm import tqdm

from .tasks import DEFAULT_TASKS, Task, TaskTableError, load_tasks

log = logging.getLogger("defectseg")


def _not_torchvision_notice(record: logging.LogRecord) -> bool:
    """Drop transformers' notice that ViTImageProcessor falls back to PIL without torchvision: the
    project does not need torchvision, and the notice would open every run."""
    return "requires torchvision" not in record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not the one at set-up: a caller that
    swaps it (pytest's capture, a notebook) never leaves the log pointing at a closed stream."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(
        handlers=[_StderrHandler()],
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_not_torchvision_notice)
    if "transformers" in sys.modules:  # its own progress bars ("Loading weights") follow -q too
        from transformers.utils import logging as hf_logging

        if quiet:
            hf_logging.disable_progress_bar()
        elif not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
            hf_logging.enable_progress_bar()


class LogProgress:
    """Progress as plain log lines, for output that is not a terminal (CI, ``| tee``, a scheduler's log
    file), where a bar's carriage returns would glue it onto the log lines: one line per tenth of the
    work, or per ``interval`` seconds, whichever comes first, and one at the end. tqdm's ``update`` and
    context-manager interface, and iteration."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, interval: float = 60.0):
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start = 0, time.perf_counter()
        self.logged_n, self.logged_at = 0, self.start

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        tenth = self.total and self.n * 10 // self.total > self.logged_n * 10 // self.total
        if (tenth and self.n < self.total) or now - self.logged_at >= self.interval:
            self._log(now)

    def _log(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        rate = self.n / max(now - self.start, 1e-9)
        log.info("%s: %s %s (%.0f s, %.1f %s/s)", self.desc or "progress", done, self.unit, now - self.start, rate,
                 self.unit)
        self.logged_n, self.logged_at = self.n, now

    def close(self) -> None:
        if self.n != self.logged_n:
            self._log(time.perf_counter())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True) -> tqdm | LogProgress:
    """A progress bar on a terminal, plain periodic log lines elsewhere (``LogProgress``), nothing when not
    ``enabled``. Use like tqdm: iterate over it, or ``update(n)`` inside ``with``."""
    if not enabled or not log.isEnabledFor(logging.INFO):
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return LogProgress(iterable, total, desc, unit)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a job scheduler, torchrun stopping its other processes), raised wherever
    the program is so that it unwinds like Ctrl-C: temp files and folders are removed, worker
    processes are shut down. Forked workers inherit the handler and end quietly too."""


_sigterm_came = False


def _terminated(signum: int, frame: object) -> None:
    global _sigterm_came
    _sigterm_came = True
    # The whole process group may be going down: a helper thread that loses its peer now (e.g.
    # multiprocessing's resource sharer, handing a tensor to a DataLoader worker that just ended) would
    # print a traceback through sys.excepthook; the run's one line says what happened.
    sys.excepthook = lambda *exc_info: None
    raise Terminated()


def stop_if_terminated() -> None:
    """Raise Terminated again if SIGTERM came: the handler's exception is lost when the signal lands in a
    garbage-collector or weakref callback, so long loops call this once per step."""
    if _sigterm_came:
        raise Terminated()


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser) -> NoReturn:
    """A script's entry point: ``main(args)``'s exit code; Ctrl-C ends it with one line (exit 130),
    SIGTERM likewise (exit 143)."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        code = main(parser.parse_args())
    except Terminated:
        code = fail("terminated (SIGTERM)", 128 + signal.SIGTERM)
    except KeyboardInterrupt:
        code = fail("interrupted", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


def run_script(main: Callable[[], object]) -> NoReturn:
    """A research script's entry point (scripts/): bad input that the package names in one line (a
    missing or unreadable file, a folder that is not a checkpoint, a broken manifest) ends it with that
    line on stderr and exit 1, not a stack trace; Ctrl-C with exit 130."""
    from .model import ModelLoadError  # not at the top: model imports torch and transformers

    try:
        main()
    except (ModelLoadError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


def fail(message: str, code: int = 1) -> int:
    """Report an error the user can act on (no stack trace) and return the exit code."""
    logging.getLogger("defectseg").error(message)
    return code


def int_at_least(minimum: int, below: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (and < ``below`` when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}, got {value}")
        return value

    return parse


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [low, high]; ``low_open`` / ``high_open`` leave out an end."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if (not math.isfinite(value) or not (low < value if low_open else low <= value)
                or not (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def split_name(text: str) -> str:
    """argparse type: a split, the name of one folder in the processed dataset ("valid", "test"); a
    trailing slash or a leading "./" is dropped, so "test/" is the test split too."""
    parts = Path(text.strip()).parts
    if len(parts) != 1 or parts[0] in (".", "..", "/"):
        raise argparse.ArgumentTypeError(f"a split is one folder name such as valid or test, got {text!r}")
    return parts[0]


def nonempty(text: str) -> str:
    """argparse type for paths: refuses an empty value (an unset shell variable would otherwise mean the
    current folder) and expands a leading ``~``, which the shell leaves in ``--out=~/x``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return os.path.expanduser(text)


def add_tasks_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="TASK",
                        help=f"tasks to use, names from the task table (default: {' '.join(DEFAULT_TASKS)})")
    parser.add_argument("--tasks-file", default=None,
                        help="JSON file that adds or overrides tasks, prompts and synonyms (see defectseg/tasks.py)")


def pick_tasks(args: argparse.Namespace) -> list[Task]:
    """The tasks named by ``--tasks`` from the table (extended by ``--tasks-file``); exits on error."""
    try:
        table = load_tasks(args.tasks_file)
    except TaskTableError as err:
        sys.exit(fail(str(err)))
    unknown = [name for name in args.tasks if name not in table]
    if unknown:
        sys.exit(fail(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(table)}"))
    return [table[name] for name in args.tasks]
