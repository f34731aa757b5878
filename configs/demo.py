"""The embedded demo: STPG on procedurally generated road scenes, a small DeepLabV3+, on a 2-core CPU.

Command:  python launch.py --config=configs/demo.py --workdir=runs/demo
          (baseline: python launch.py --config=configs/demo.py:1_8,mode=supervised --workdir=runs/demo_sup)
Reproduces nothing from the paper: it shows the whole method end to end in minutes, without any download.
README.md gives the measured mIoU and time. Hardware: any CPU (or GPU); global batch 8 labelled + 8 unlabelled.
Data: generated in memory from config.data.synthetic.seed (see docs/data.md for the class shares).
"""

from stpg_jax.config import base_config, finalize

# Labelled share of the generated training pool (the splits mirror the paper's ratios). 240 scenes: 1_8 is 30
# labelled (26 steps per epoch) and the whole STPG demo about 10 minutes on 2 cores.
POOL = 240
SPLITS = {name: {"data.synthetic.num_labeled": POOL // r, "data.synthetic.num_unlabeled": POOL - POOL // r}
          for name, r in (("1_16", 16), ("1_8", 8), ("1_4", 4), ("1_2", 2))}
SPLITS["full"] = {"data.synthetic.num_labeled": POOL, "data.synthetic.num_unlabeled": POOL}


def get_config(arg=None):
    c = base_config()
    c.data.dataset = "synthetic"
    c.data.synthetic.num_val = 100
    c.data.crop_size = 64
    c.data.scales = (0.75, 1.0, 1.25)
    c.data.workers = 0
    c.model.stage_blocks = (1, 1, 1, 1)
    c.model.width = 16
    c.model.aspp_channels = 64
    c.model.decoder_channels = 64
    c.model.low_level_channels = 16
    c.model.proj_dim = 32
    c.model.output_stride = 8
    c.model.stem = "deep"
    c.optim.lr = 0.02
    # OHEM CE, the paper's loss for long-tailed Cityscapes: once the large classes' pixels are confident (p > 0.7)
    # they drop out of the supervised loss and the rare classes' carry it. min_kept 320 of a crop's 4096 pixels is
    # Cityscapes' 50000 of 800x800 (7.8 %).
    c.loss.supervised = "ohem"
    c.loss.ohem_threshold = 0.7
    c.loss.ohem_min_kept = 320
    c.schedule.epochs = 12
    # The paper's phase epochs (6/11/16/20 of 40) scaled to the short schedule.
    c.stpg.bank_start_epoch = 2
    c.stpg.contrastive_start_epoch = 4
    c.stpg.proximity_start_epoch = 6
    c.stpg.matching_freeze_epoch = 8
    c.stpg.bank_k = 4
    c.stpg.anchor_steps = 2000
    c.eval.window = 96
    c.eval.windows_per_batch = 4
    c.log_every_steps = 25
    c.log_images_every_steps = 100  # TensorBoard pictures of the pseudo-labels and the selection (README.md)
    c.checkpoint_every_steps = 50
    return finalize(c, arg, SPLITS, default_split="1_8")
