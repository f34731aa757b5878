"""CamVid (11 classes, SegNet layout, 367 train / 101 val frames of 360x480), DeepLabV3+ on an ImageNet ResNet-50.

Command:  python launch.py --config=configs/camvid.py:1_8 --workdir=runs/camvid_1_8
          (baselines: append ,mode=supervised or ,mode=mean_teacher to the argument)
No paper figure: this is the project's real-data check on long-tailed driving scenes (BENCHMARKS.md holds the
measured table). The backbone is the shared ImageNet ResNet-50 (standard 7x7 stem, stride in the 1x1 conv).
Hardware: global batch 8 + 8 at crop 352; one GPU suffices.
Data: config.data.root is the SegNet CamVid folder (train/, trainannot/, val/, valannot/, train.txt, val.txt).
"""

from stpg_jax.config import base_config, finalize

# Labelled counts are round(367 / ratio); bank_k = max(1, int(round(256 / N_labelled))).
SPLITS = {
    "1_16": {"data.num_labeled": 23, "stpg.bank_k": 11},
    "1_8": {"data.num_labeled": 46, "stpg.bank_k": 6},
    "1_4": {"data.num_labeled": 92, "stpg.bank_k": 3},
    "1_2": {"data.num_labeled": 184, "stpg.bank_k": 1},
    "full": {"data.num_labeled": -1, "stpg.bank_k": 1},
}


def get_config(arg=None):
    c = base_config()
    c.data.dataset = "camvid"
    c.data.root = "../shared/data/camvid"
    c.data.crop_size = 352
    c.eval.window = 352
    c.eval.every_steps = 500
    c.optim.lr = 0.005
    c.schedule.epochs = 40
    c.model.stem = "standard"
    c.model.stride_in_1x1 = True
    c.model.pretrained = "../shared/weights/resnet50_imagenet.npz"
    return finalize(c, arg, SPLITS, default_split="1_8")
