"""Cityscapes (19 classes), DeepLabV3+ R50, OHEM cross entropy.

Command:  python launch.py --config=configs/cityscapes.py:1_8 --workdir=runs/cityscapes_1_8
Reproduces the paper's Cityscapes table (STPG vs supervised only, mIoU %):
  1/16 (186): 68.46 vs 60.43   1/8 (372): 75.14 vs 66.74   1/4 (744): 77.01 vs 71.16
(1/2 = 1488 labelled and 'full' have no paper figure.)
Hardware: global batch 3 labelled + 3 unlabelled pairs at crop 800, sliding-window evaluation at 800 on the full
1024x2048 frames; the learning rate is for that global batch.
Data: config.data.root holds leftImg8bit/ and gtFine/.
"""

from stpg_jax.config import base_config, finalize

SPLITS = {
    "1_16": {"data.num_labeled": 186, "schedule.epochs": 128},
    "1_8": {"data.num_labeled": 372, "schedule.epochs": 137},
    "1_4": {"data.num_labeled": 744, "schedule.epochs": 160},
    "1_2": {"data.num_labeled": 1488, "schedule.epochs": 240},
    "full": {"data.num_labeled": -1, "schedule.epochs": 240},
}

CLASS_WEIGHTS = (
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
    0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507,
)


def get_config(arg=None):
    c = base_config()
    c.data.dataset = "cityscapes"
    c.data.root = "data/cityscapes"
    c.data.crop_size = 800
    c.data.batch_labeled = 3
    c.data.batch_unlabeled = 3
    c.eval.window = 800
    c.eval.every_steps = 10000
    c.optim.lr = 0.01
    c.loss.supervised = "ohem"
    c.loss.ohem_threshold = 0.7
    c.loss.ohem_min_kept = 50000
    c.loss.ohem_class_weights = CLASS_WEIGHTS
    c.stpg.bank_k = 1  # max(1, int(round(256 / N_labelled)))
    c.stpg.proximity_start_epoch = 11
    c.stpg.matching_freeze_epoch = -1  # never frozen
    c.model.pretrained = "weights/resnet50_v1c.pth"
    return finalize(c, arg, SPLITS)
