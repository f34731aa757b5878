"""Checkpoint save and restore time of a run's whole train state through ``stpg_jax.checkpoint.Checkpointer``, and
what a new run (its initial state) and a resumed one (the traced restore target) build before their first step.

    python benchmarks/checkpoint_save.py --config=configs/demo.py --cpu_devices 4 --repeats 3 [--min_slice_mib 0]

Orbax writes a replicated array one slice per device, each slice a program compiled at the first save; the
Checkpointer slices only arrays whose slices reach ``--min_slice_mib`` (default its MIN_SLICE_BYTES; 0: all).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from common import arg_parser, load_config, report_header, run_cli, write_json


def parse_args(argv=None):
    p = arg_parser(__doc__, "configs/demo.py")
    p.add_argument("--cpu_devices", type=int, default=0,
                   help="run on this many virtual CPU devices (0: the machine's own devices)")
    p.add_argument("--repeats", type=int, default=3, help="saves (and restores) timed, each into a new directory")
    p.add_argument("--min_slice_mib", type=float, default=None,
                   help="slice replicated arrays across devices only from this size per slice, in MiB (default: "
                        "the Checkpointer's, stpg_jax.checkpoint.MIN_SLICE_BYTES; 0: every array, as Orbax does)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_devices:  # before jax starts its backends
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.cpu_devices}")
    import jax

    from stpg_jax import checkpoint, train

    min_slice_bytes = (checkpoint.MIN_SLICE_BYTES if args.min_slice_mib is None
                       else int(args.min_slice_mib * 2 ** 20) or None)
    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train.Trainer(config, os.path.join(tmp, "run"), load_weights=False)
        # What a new run builds (its weights file read, the networks initialised, the anchors made), and what a
        # resumed run builds instead: the restore target, traced.
        t0 = time.perf_counter()
        state = jax.block_until_ready(trainer.init_state())
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        target = trainer.parts.abstract_state()
        target_s = time.perf_counter() - t0
        print(f"initial state built in {init_s:.2f} s (a new run); restore target in {target_s:.2f} s (a resumed run)",
              flush=True)
        leaves = jax.tree_util.tree_leaves(state)
        size = sum(x.nbytes for x in leaves)
        sliced = "any size" if min_slice_bytes is None else f"{min_slice_bytes / 2 ** 20:g} MiB per slice"
        print(f"state: {len(leaves)} arrays, {size / 2 ** 20:.1f} MiB, on {trainer.parts.mesh.devices.size} device(s) "
              f"({jax.devices()[0].platform}); arrays sliced across devices from {sliced}", flush=True)
        saves, restores = [], []
        for i in range(args.repeats):
            ckpt = checkpoint.Checkpointer(os.path.join(tmp, f"save_{i}"), min_slice_bytes=min_slice_bytes)
            t0 = time.perf_counter()
            ckpt.save(1, state, {"step": 1})
            ckpt.wait()
            t1 = time.perf_counter()
            restored, _ = ckpt.restore(target)
            jax.block_until_ready(restored)
            t2 = time.perf_counter()
            ckpt.close()
            saves.append(t1 - t0)
            restores.append(t2 - t1)
            print(f"  save {i + 1}: {saves[-1]:.2f} s, restore {restores[-1]:.2f} s", flush=True)
    report = {
        **report_header("checkpoint_save.py", argv),
        "device": f"{trainer.parts.mesh.devices.size} x {jax.devices()[0].device_kind}",
        "arrays": len(leaves), "state_mib": size / 2 ** 20, "min_slice_bytes": min_slice_bytes,
        "init_state_s": init_s, "restore_target_s": target_s,
        "first_save_s": saves[0],
        "later_saves_median_s": statistics.median(saves[1:]) if len(saves) > 1 else None,
        "restore_median_s": statistics.median(restores),
    }
    later = report["later_saves_median_s"]
    print(f"first save {saves[0]:.2f} s | later saves (median) "
          f"{'n/a' if later is None else f'{later:.2f} s'} | restore (median) {report['restore_median_s']:.2f} s")
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    run_cli(main)
