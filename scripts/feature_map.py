#!/usr/bin/env python
"""Draw the digits feature map (the 8x8 input pixels the first layer still reads) from a trained model.

    lightreg-train experiment=feature_selection_digits          # writes feature_map.png itself, at fit end
    python scripts/feature_map.py outputs/2026-01-01/12-00-00   # a run directory: its checkpoints/last.ckpt
    python scripts/feature_map.py path/to/last.ckpt -o map.png --layer net.0.weight

The drawing is ``lightreg.app.feature_map.draw_feature_map`` (the app calls the same function): pixel ``j`` is in
use when column ``j`` of the first layer's weight has any non-zero; the colour is that column's norm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightreg.app.feature_map import draw_feature_map, used_features


def load_weight(source: Path, layer: str) -> torch.Tensor:
    """``layer``'s weight from a Lightning checkpoint, or from ``<run dir>/checkpoints/last.ckpt``."""
    path = source / "checkpoints" / "last.ckpt" if source.is_dir() else source
    if not path.is_file():
        raise SystemExit(f"feature_map: no checkpoint at {path} (run with the default callbacks, which save last.ckpt)")
    # A Lightning checkpoint holds config objects besides tensors: load only checkpoints you trust.
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    if layer not in state:
        raise SystemExit(f"feature_map: {layer!r} is not in {path}; it holds {sorted(state)}")
    return state[layer]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a run directory or a .ckpt file")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: feature_map.png next to the run)")
    parser.add_argument("--layer", default="net.0.weight", help="the first layer's weight in the checkpoint")
    args = parser.parse_args(argv)
    weight = load_weight(args.source, args.layer)
    out = args.output or (args.source if args.source.is_dir() else args.source.parent) / "feature_map.png"
    draw_feature_map(weight, out)
    print(f"{int(used_features(weight).sum())} of {weight.shape[1]} pixels in use: {out}")
    return out


if __name__ == "__main__":
    main()
