"""Networks: dilated ResNet backbones and DeepLabV3+ with a projection head."""

from stpg_jax.models.deeplab import DeepLabV3Plus, resize_bilinear_align_corners
from stpg_jax.models.resnet import ResNet

__all__ = ["DeepLabV3Plus", "ResNet", "resize_bilinear_align_corners"]
