#!/usr/bin/env python
"""Average the weights of several checkpoints of one LiteSeg run (e.g. its last epochs) into one folder.

train.py keeps only best/ and last/ (rewritten each epoch), so copy last/ aside after each epoch you want
to average (e.g. to runs/snaps/ep18), then:

    python scripts/average_checkpoints.py runs/snaps/ep18 runs/snaps/ep19 runs/snaps/ep20 --out runs/avg-18-20
    python evaluate.py --model runs/avg-18-20 --data data/full --split valid --write-thresholds

Every floating-point tensor of the state dict is the plain mean over the checkpoints: the weights and the
batch norms' running statistics alike, which is close to re-estimating the statistics when the
checkpoints lie near each other (the last epochs of a cosine schedule take small steps). Integer buffers
(batch counters) come from the last checkpoint. The folders must share one architecture (config.json)
and one task table.

The new folder gets the last checkpoint's ``defectseg.json`` (task table, epoch, training config) without
its validation metrics and best-epoch selection, which described other weights, and with
``averaged_from`` listing the sources. Its thresholds stay the last checkpoint's until ``evaluate.py
--write-thresholds`` tunes them for the averaged weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg import lite  # noqa: E402
from defectseg.model import ModelLoadError, load_model, read_metadata, save_checkpoint  # noqa: E402


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating-point tensor over ``states`` (same keys, shapes and dtypes; computed in
    float64, stored in the tensor's dtype); any other tensor is taken from the last state."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def _load(folder: str) -> tuple[lite.LiteSeg, lite.LiteProcessor, dict]:
    """A LiteSeg checkpoint folder's model, processor and metadata; ``ValueError`` with a one-line reason
    (a folder first: a mistyped path would otherwise be looked up on the Hub)."""
    if not Path(folder).is_dir():
        raise ValueError(f"{folder} is not a folder")
    try:
        model, processor = load_model(Path(folder))
        meta = read_metadata(folder)
    except ModelLoadError as err:
        raise ValueError(str(err)) from None
    if not isinstance(model, lite.LiteSeg):
        raise ValueError(f"{folder} is not a LiteSeg checkpoint ({type(model).__name__}); averaging is for LiteSeg runs")
    return model, processor, meta


def main(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        print(f"error: {args.out} exists; pick a new folder", file=sys.stderr)
        return 1
    models, metas = [], []
    for folder in args.checkpoints:
        try:
            model, processor, meta = _load(folder)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for what, differs in (("architecture (config.json)", models and model.config != models[0].config),
                              ("task table (defectseg.json)", metas and meta.get("tasks") != metas[0].get("tasks"))):
            if differs:
                print(f"error: {folder} has another {what} than {args.checkpoints[0]}: not the same run", file=sys.stderr)
                return 1
        models.append(model)
        metas.append(meta)
    model.load_state_dict(average_state_dicts([m.state_dict() for m in models]))
    meta = {k: v for k, v in metas[-1].items() if k not in ("metrics", "selection", "selection_split")}
    meta["averaged_from"] = [str(Path(folder).resolve()) for folder in args.checkpoints]
    try:
        save_checkpoint(model, processor, args.out, meta)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: the mean of {len(models)} checkpoints")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="LiteSeg checkpoint folders of one run (two or more)")
    parser.add_argument("--out", required=True, help="the new folder (must not exist)")
    args = parser.parse_args()
    if len(args.checkpoints) < 2:
        parser.error("give two or more checkpoint folders")
    sys.exit(main(args))
