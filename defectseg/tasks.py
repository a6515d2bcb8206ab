"""The one table of tasks and prompts.

Every script asks this module which tasks exist, which folder of a Roboflow export belongs to a task,
which canonical prompt a task answers to, and which synonyms may stand for it. Nothing else in the
project spells a prompt.

Users extend or override the table without code through a JSON file (``--tasks-file``)::

    {"tasks": {
        "spalling": {"prompt": "segment spalling", "synonyms": ["segment concrete spalling"],
                     "dirs": ["spalling", "spalling-xyz12"]}
    }}

A task given in the file replaces the built-in task of the same name; other built-ins stay. Each
``dirs`` entry (the task's name when there are none) is one folder name under the data root, and a task
may not be named ``mean`` (training's metrics.csv has ``<task>_iou`` beside ``mean_iou``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from .io import read_json


@dataclass(frozen=True)
class Task:
    """One segmentation task.

    name: short id used on the command line and in manifests ("cracks").
    prompt: the canonical prompt ("segment crack"); its slug names mask files.
    synonyms: other phrasings used for prompt augmentation and ensembling.
    dirs: folder names under a data root that hold this task's export (first match wins).
    categories: COCO category names to keep (one that holds no annotation keeps the categories it is the
        supercategory of: ``coco.load_coco``); empty means every category of the export (mapped per dataset,
        never per id: ids differ between exports).
    """

    name: str
    prompt: str
    synonyms: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    categories: tuple[str, ...] = field(default=())

    @property
    def slug(self) -> str:
        return prompt_slug(self.prompt)

    @property
    def prompts(self) -> tuple[str, ...]:
        """Canonical prompt first, then the synonyms."""
        return (self.prompt, *self.synonyms)


DEFAULT_TASKS: dict[str, Task] = {
    "cracks": Task(
        name="cracks",
        prompt="segment crack",
        synonyms=("segment wall crack", "segment cracks"),
        dirs=("cracks", "cracks-3ii36"),
    ),
    "drywall": Task(
        name="drywall",
        prompt="segment taping area",
        synonyms=("segment joint/tape", "segment drywall seam"),
        dirs=("drywall", "drywall-join-detect"),
    ),
}

_SLUG_RE = re.compile(r"[^a-z0-9]+")
SLUG_MAX = 100


def prompt_slug(prompt: str) -> str:
    """Lower-case the prompt and turn every run of characters other than a-z, 0-9 into "_".

    >>> prompt_slug("segment crack")
    'segment_crack'
    >>> prompt_slug("Segment  joint/tape!")
    'segment_joint_tape_'

    A prompt with characters beyond ASCII (which the rule would drop), or a slug over
    ``SLUG_MAX`` characters, gets 8 hex characters of a hash of the prompt appended, so that
    different prompts never share a file name and names stay short enough for any file system:

    >>> prompt_slug("segment 裂缝")
    'segment__3ac17fea'
    """
    slug = _SLUG_RE.sub("_", prompt.lower())
    if prompt.isascii() and len(slug) <= SLUG_MAX:
        return slug
    digest = hashlib.sha1(normalize_prompt(prompt).encode()).hexdigest()[:8]
    return f"{slug[:SLUG_MAX]}_{digest}"


def normalize_prompt(prompt: str) -> str:
    """Case- and whitespace-insensitive form used to look prompts up."""
    return " ".join(prompt.lower().split())


class TaskTableError(ValueError):
    """A tasks file that cannot be used."""


# Task names that training's metrics.csv could not tell apart from its overall columns (``<task>_iou`` next
# to ``mean_iou``).
RESERVED_NAMES = ("mean",)


def is_folder_name(text: str) -> bool:
    """Whether ``text`` names one folder inside another: not empty, ``.``, ``..`` or a path with a slash
    (a task's folder or a split must not lead out of the data root or the output folder)."""
    return text not in ("", ".", "..") and not any(sep in text for sep in ("/", "\\"))


def _task_from_dict(name: str, spec: dict, source: str) -> Task:
    if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str) or not spec["prompt"].strip():
        raise TaskTableError(f"{source}: task {name!r} needs a non-empty string 'prompt'")
    for key in ("synonyms", "dirs", "categories"):
        value = spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TaskTableError(f"{source}: task {name!r}: '{key}' must be a list of strings")
    dirs = tuple(spec.get("dirs", [])) or (name,)
    if bad := [d for d in dirs if not is_folder_name(d)]:
        raise TaskTableError(f"{source}: task {name!r}: {bad[0]!r} is not one folder name under the data "
                             "root ('dirs' entries, or the name without them, must not be . or .. or hold /)")
    return Task(
        name=name,
        prompt=spec["prompt"].strip(),
        synonyms=tuple(s.strip() for s in spec.get("synonyms", []) if s.strip()),
        dirs=dirs,
        categories=tuple(spec.get("categories", [])),
    )


def load_tasks(path: str | Path | None = None) -> dict[str, Task]:
    """The built-in table, extended or overridden by the JSON file at ``path`` (if given).

    Raises TaskTableError naming the file when it cannot be read or parsed, a spec is malformed, a task
    is named like one of ``RESERVED_NAMES``, a folder in ``dirs`` is not one plain folder name, or two
    tasks share a prompt or slug."""
    tasks = dict(DEFAULT_TASKS)
    if path is None:
        return tasks
    path = Path(path)
    raw = read_json(path, "tasks file", TaskTableError)
    table = raw.get("tasks", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise TaskTableError(f"{path}: expected an object mapping task names to specs")
    for name, spec in table.items():
        if name in RESERVED_NAMES:
            raise TaskTableError(f"{path}: task name {name!r} is reserved (training's metrics.csv has "
                                 f"{name}_iou for the mean over tasks); pick another name")
        if not is_folder_name(name):  # it names files and folders: examples_<task>.png, the task's default folder
            raise TaskTableError(f"{path}: task name {name!r} must be one folder name (not . or .., no / or \\)")
        tasks[name] = _task_from_dict(name, spec, str(path))
    check_tasks(tasks, str(path))
    return tasks


def check_tasks(tasks: dict[str, Task], source: str = "task table") -> None:
    """Refuse tables where two tasks share a prompt or a slug (masks would collide)."""
    owner: dict[str, str] = {}
    for task in tasks.values():
        for prompt in task.prompts:
            key = normalize_prompt(prompt)
            if key in owner and owner[key] != task.name:
                raise TaskTableError(
                    f"{source}: prompt {prompt!r} belongs to both {owner[key]!r} and {task.name!r}"
                )
            owner[key] = task.name
    slugs: dict[str, str] = {}
    for task in tasks.values():
        if task.slug in slugs:
            raise TaskTableError(f"{source}: tasks {slugs[task.slug]!r} and {task.name!r} share slug {task.slug!r}")
        slugs[task.slug] = task.name


def task_for_prompt(prompt: str, tasks: dict[str, Task] | None = None) -> Task | None:
    """The task whose canonical prompt or synonym matches ``prompt`` (case/space-insensitive)."""
    key = normalize_prompt(prompt)
    for task in (tasks or DEFAULT_TASKS).values():
        if any(normalize_prompt(p) == key for p in task.prompts):
            return task
    return None


def find_task_dir(data_root: Path, task: Task) -> Path | None:
    """The first folder under ``data_root`` named like one of the task's ``dirs``."""
    for name in task.dirs or (task.name,):
        candidate = data_root / name
        if candidate.is_dir():
            return candidate
    return None


def tasks_to_dict(tasks: dict[str, Task]) -> dict[str, dict]:
    """The table as plain JSON (what checkpoints store in their metadata)."""
    return {
        t.name: {"prompt": t.prompt, "synonyms": list(t.synonyms), "dirs": list(t.dirs),
                 "categories": list(t.categories)}
        for t in tasks.values()
    }


def load_tasks_from_metadata(metadata: dict, source: str = "checkpoint metadata") -> dict[str, Task]:
    """The task table a checkpoint was trained with: its own tasks only (a model trained on cracks alone
    was not trained on the built-in drywall task), or the built-ins when it records none. Raises
    TaskTableError starting with ``source`` (the file) when it is malformed."""
    specs = metadata.get("tasks") or {}
    if not isinstance(specs, dict):
        raise TaskTableError(f"{source}: 'tasks' must be an object mapping task names to specs, "
                             f"got {type(specs).__name__}")
    tasks = {} if specs else dict(DEFAULT_TASKS)
    for name, spec in specs.items():
        tasks[name] = _task_from_dict(name, spec, source)
    return tasks
