"""PASCAL VOC 2012, "classic" protocol: labelled images drawn from the 1464 fine ones, the rest of 10582 unlabelled.

Command:  python launch.py --config=configs/voc_classic.py:1_4 --workdir=runs/voc_classic_1_4
Reproduces the paper's classic-VOC table (ResNet-101, STPG vs supervised only, mIoU %), labelled counts:
  183 (1_8): 72.29 vs 54.32   366 (1_4): 77.69 vs 62.31   732 (1_2): 79.08 vs 67.36   1464 (full): 80.45 vs 72.12
(1_16 = 92 labelled; no paper figure.) The paper uses ResNet-101; the released code only ResNet-50
(``model.depth=50`` reproduces the release).
Hardware: global batch 8 + 8 at crop 512; the learning rate is for that global batch.
Data: config.data.root holds VOCdevkit/VOC2012; config.data.sbd_root holds SegmentationClassAug/ (or SBD's cls/).
"""

from stpg_jax.config import base_config, finalize

SPLITS = {
    "1_16": {"data.num_labeled": 92, "schedule.epochs": 32, "stpg.bank_k": 21},
    "1_8": {"data.num_labeled": 183, "schedule.epochs": 34, "stpg.bank_k": 7},
    "1_4": {"data.num_labeled": 366, "schedule.epochs": 40, "stpg.bank_k": 7},
    "1_2": {"data.num_labeled": 732, "schedule.epochs": 60, "stpg.bank_k": 1},
    "full": {"data.num_labeled": 1464, "schedule.epochs": 80, "stpg.bank_k": 1},
}


def get_config(arg=None):
    c = base_config()
    c.data.dataset = "voc"
    c.data.protocol = "classic"
    c.data.root = "data/voc"
    c.data.sbd_root = "data/voc/SegmentationClassAug"
    c.data.crop_size = 512
    c.eval.window = 512
    c.optim.lr = 0.005
    c.model.depth = 101
    c.model.pretrained = "weights/resnet101_v1c.pth"
    c.eval.every_steps = 5000
    return finalize(c, arg, SPLITS)
