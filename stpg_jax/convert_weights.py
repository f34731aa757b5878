"""Converts ImageNet ResNet weights (PyTorch ``.pth``/``.pt`` or torchvision-named ``.npz``) to the flax backbone.

    python -m stpg_jax.convert_weights resnet50_v1c.pth r50_deep.npz --stem=deep

The output is the ``.npz`` that ``config.model.pretrained`` accepts (as does the source file itself); conversion is
strict, see `stpg_jax.models.pretrained`.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from stpg_jax import cli
from stpg_jax.models import pretrained


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m stpg_jax.convert_weights", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="PyTorch state dict (.pth/.pt) or .npz with torchvision key names")
    parser.add_argument("out", help="converted weights, .npz")
    parser.add_argument("--stem", choices=("standard", "deep"), default=None, help="default: read from the key names")
    parser.add_argument(
        "--stage_blocks", default=None, help="blocks per stage, e.g. 3,4,6,3 (default: read from the key names)"
    )
    args = parser.parse_args(argv)

    try:
        stage_blocks = tuple(int(n) for n in args.stage_blocks.split(",")) if args.stage_blocks else None
    except ValueError:
        parser.error(f"--stage_blocks={args.stage_blocks!r}: expected positive integers, e.g. 3,4,6,3")
    if stage_blocks is not None and (len(stage_blocks) != 4 or min(stage_blocks) < 1):
        parser.error(f"--stage_blocks={args.stage_blocks!r}: expected four positive integers, e.g. 3,4,6,3")
    if not args.out.endswith(".npz"):
        raise cli.InputError(f"the output is not a .npz file, out = {args.out!r}, expected a path ending in .npz")
    cli.check_new_file(args.out, "out")  # before the conversion; an earlier result is not overwritten
    with pretrained.reading_weights(args.source, "source"):
        state = pretrained.read_state_dict(args.source)
    params, batch_stats, report = pretrained.convert_state_dict(state, stem=args.stem, stage_blocks=stage_blocks)
    pretrained.save_converted(
        args.out, params, batch_stats, stem=report["stem"], stage_blocks=report["stage_blocks"],
        width=report["width"], source=args.source,
    )
    count = lambda tree: sum(int(np.size(v)) for v in traverse_util.flatten_dict(tree).values())  # noqa: E731
    stem = report["stem"] + (f" ({report['deep_naming']} names)" if report["deep_naming"] else "")
    print(f"{args.source}: {len(state)} keys, {len(report['used'])} used, {len(report['skipped'])} skipped"
          + (f" ({', '.join(report['skipped'])})" if report["skipped"] else ""))
    print(f"stem {stem}, stage_blocks {report['stage_blocks']}, width {report['width']}")
    print(f"{count(params):,} parameters + {count(batch_stats):,} batch statistics -> {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)  # one `error:` line and exit status 2 for a file that cannot be read or written
