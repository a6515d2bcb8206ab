#!/usr/bin/env python
"""Give a LiteSeg checkpoint the pyramid context block (``lite.PyramidContext``) at the identity, to fine-tune
it: the new folder computes exactly what the old one did until training moves the block.

    python scripts/add_context.py models/liteseg runs/liteseg-context [--bins 1 2 3 6]
    python train.py --data data/full --model runs/liteseg-context --epochs 3 --lr 5e-4 --patience 0 --out runs/ft-ctx

The folder gets the old config with ``context`` set, the old weights plus the block's (its last projection
zero), and the old ``defectseg.json`` (task table, thresholds). This is how the block was measured on the
shipped model (models/liteseg/README.md); a model trained from scratch with it is ``train.py --model lite-ctx``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectseg import lite  # noqa: E402
from defectseg.cli import int_at_least  # noqa: E402
from defectseg.model import read_metadata, save_checkpoint  # noqa: E402


def main(args: argparse.Namespace) -> int:
    try:
        old = lite.LiteSeg.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        print(f"error: cannot load a LiteSeg from {args.model}: {err}", file=sys.stderr)
        return 1
    if old.config.context:
        print(f"error: {args.model} already has a context block (bins {old.config.context})", file=sys.stderr)
        return 1
    if Path(args.out).exists():
        print(f"error: {args.out} exists; pick a new folder", file=sys.stderr)
        return 1
    model = lite.LiteSeg(lite.LiteConfig(**{**asdict(old.config), "context": args.bins}))
    model.load_state_dict(old.state_dict(), strict=False)  # every old weight; the block keeps its own
    try:  # all or nothing: the folder never lacks its task table and thresholds
        save_checkpoint(model, lite.LiteProcessor.for_model(model), args.out, read_metadata(args.model))
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {args.model} with context bins {args.bins}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a LiteSeg checkpoint folder")
    parser.add_argument("out", help="the new folder (must not exist)")
    parser.add_argument("--bins", type=int_at_least(1), nargs="+", default=[1, 2, 3, 6],
                        help="cells per side of each pooling (default: %(default)s)")
    sys.exit(main(parser.parse_args()))
