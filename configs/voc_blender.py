"""PASCAL VOC 2012, "blender" protocol: labelled images drawn from all 10582 (1464 fine + SBD), DeepLabV3+ R50.

Command:  python launch.py --config=configs/voc_blender.py:1_4 --workdir=runs/voc_blender_1_4
Reproduces the paper's blender-VOC table (STPG vs supervised only, mIoU %):
  1/16: 73.88 vs 61.72   1/8: 75.49 vs 66.83   1/4: 76.97 vs 71.52   1/2: 77.39 vs 73.96
('full' labels all 10582 images; the paper reports no figure for it.)
Hardware: global batch 8 labelled + 8 unlabelled pairs at crop 512 (the paper's 8 GPUs × 1 + 1). The learning rate
is for that global batch and does not change with the device count.
Data: config.data.root holds VOCdevkit/VOC2012; config.data.sbd_root holds SegmentationClassAug/ (or SBD's cls/).
"""

from stpg_jax.config import base_config, finalize

# N = 10582 / ratio; bank_k = max(1, int(7 * round(256 / (1464 / ratio)))) as in the released code.
SPLITS = {
    "1_16": {"data.num_labeled": 662, "schedule.epochs": 32, "stpg.bank_k": 21},
    "1_8": {"data.num_labeled": 1323, "schedule.epochs": 34, "stpg.bank_k": 7},
    "1_4": {"data.num_labeled": 2646, "schedule.epochs": 40, "stpg.bank_k": 7},
    "1_2": {"data.num_labeled": 5291, "schedule.epochs": 60, "stpg.bank_k": 1},
    "full": {"data.num_labeled": -1, "schedule.epochs": 80, "stpg.bank_k": 1},
}


def get_config(arg=None):
    c = base_config()
    c.data.dataset = "voc"
    c.data.protocol = "blender"
    c.data.root = "data/voc"
    c.data.sbd_root = "data/voc/SegmentationClassAug"
    c.data.crop_size = 512
    c.eval.window = 512
    c.optim.lr = 0.005
    c.model.pretrained = "weights/resnet50_v1c.pth"
    c.eval.every_steps = 5000
    return finalize(c, arg, SPLITS)
