#!/usr/bin/env python
"""Average the weights of several checkpoints of one LiteSeg run (e.g. its last epochs) into one folder.

    python scripts/average_checkpoints.py runs/snaps/ep18 runs/snaps/ep19 runs/snaps/ep20 --out runs/avg-18-20
    python evaluate.py --model runs/avg-18-20 --data data/full --split valid

Every floating-point tensor of the state dict is the plain mean over the checkpoints: the weights and the
batch norms' running statistics alike, which is close to re-estimating the statistics when the
checkpoints lie near each other (the last epochs of a cosine schedule take small steps). Integer buffers
(batch counters) come from the last checkpoint. The folders must share one architecture (config.json).

The new folder gets the last checkpoint's ``defectseg.json`` (task table, thresholds, training config)
without its epoch and validation metrics, which described other weights, and with ``averaged_from``
listing the sources; ``evaluate.py`` tunes thresholds for the averaged weights.
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


def main(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        print(f"error: {args.out} exists; pick a new folder", file=sys.stderr)
        return 1
    models = []
    for folder in args.checkpoints:
        try:
            model, processor = load_model(folder)
        except ModelLoadError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if not isinstance(model, lite.LiteSeg):
            print(f"error: {folder} is not a LiteSeg checkpoint (averaging is for LiteSeg runs)", file=sys.stderr)
            return 1
        if models and model.config != models[0].config:
            print(f"error: {folder} has another architecture than {args.checkpoints[0]} (config.json differs)",
                  file=sys.stderr)
            return 1
        models.append(model)
    model.load_state_dict(average_state_dicts([m.state_dict() for m in models]))
    meta = {k: v for k, v in read_metadata(args.checkpoints[-1]).items() if k not in ("epoch", "metrics")}
    meta["averaged_from"] = [str(folder) for folder in args.checkpoints]
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
