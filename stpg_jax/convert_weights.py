"""Converts ImageNet ResNet weights (PyTorch ``.pth``/``.pt`` or torchvision-named ``.npz``) to the flax backbone.

    python -m stpg_jax.convert_weights resnet50_v1c.pth r50_deep.npz --stem=deep

The output is the ``.npz`` that ``config.model.pretrained`` accepts (as does the source file itself); conversion is
strict, see `stpg_jax.models.pretrained`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from stpg_jax.models import pretrained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stpg_jax.convert_weights", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="PyTorch state dict (.pth/.pt) or .npz with torchvision key names")
    parser.add_argument("out", help="converted weights, .npz")
    parser.add_argument("--stem", choices=("standard", "deep"), default=None, help="default: read from the key names")
    parser.add_argument(
        "--stage_blocks", default=None, help="blocks per stage, e.g. 3,4,6,3 (default: read from the key names)"
    )
    args = parser.parse_args(argv)

    stage_blocks = tuple(int(n) for n in args.stage_blocks.split(",")) if args.stage_blocks else None
    state = pretrained.read_state_dict(args.source)
    try:
        params, batch_stats, report = pretrained.convert_state_dict(state, stem=args.stem, stage_blocks=stage_blocks)
    except pretrained.WeightsMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pretrained.save_converted(
        args.out, params, batch_stats, stem=report["stem"], stage_blocks=report["stage_blocks"],
        width=report["width"], source=args.source,
    )
    count = lambda tree: sum(int(np.size(v)) for v in pretrained._flatten(tree).values())  # noqa: E731
    stem = report["stem"] + (f" ({report['deep_naming']} names)" if report["deep_naming"] else "")
    print(f"{args.source}: {len(state)} keys, {len(report['used'])} used, {len(report['skipped'])} skipped"
          + (f" ({', '.join(report['skipped'])})" if report["skipped"] else ""))
    print(f"stem {stem}, stage_blocks {report['stage_blocks']}, width {report['width']}")
    print(f"{count(params):,} parameters + {count(batch_stats):,} batch statistics -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
