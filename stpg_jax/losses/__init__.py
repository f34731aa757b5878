"""STPG's losses and their state as pure JAX functions of fixed-shape arrays (DESIGN.md §2 steps 3–7, §3).

Self-contained: imports nothing else from stpg_jax, so `from stpg_jax import losses` works on its own.
"""

from stpg_jax.losses.anchors import make_anchors, uniformity_objective
from stpg_jax.losses.contrastive import bank_candidates, dual_contrastive_loss
from stpg_jax.losses.matching import assigned_anchors, hungarian_assignment
from stpg_jax.losses.memory_bank import (
    MemoryBank,
    init_memory_bank,
    memory_bank_contents,
    push_rows,
    select_rows,
    update_memory_bank,
)
from stpg_jax.losses.mixing import cutmix_box_mask, mix, pseudo_labels
from stpg_jax.losses.prototypes import class_sums, init_prototypes, update_prototypes
from stpg_jax.losses.selection import VARIANTS, confusion_counts, confusion_matrix, mismatch_scores, select_pixels
from stpg_jax.losses.supervised import (
    CITYSCAPES_CLASS_WEIGHTS,
    cross_entropy,
    ohem_cross_entropy,
    weighted_cross_entropy,
)
from stpg_jax.losses.utils import l2_normalize, nearest_downsample, nearest_resize

__all__ = [
    "CITYSCAPES_CLASS_WEIGHTS", "MemoryBank", "VARIANTS", "assigned_anchors", "bank_candidates", "class_sums",
    "confusion_counts", "confusion_matrix", "cross_entropy", "cutmix_box_mask", "dual_contrastive_loss", "hungarian_assignment",
    "init_memory_bank", "init_prototypes", "l2_normalize", "make_anchors", "memory_bank_contents", "mismatch_scores",
    "mix", "nearest_downsample", "nearest_resize", "ohem_cross_entropy", "pseudo_labels", "push_rows",
    "select_pixels", "select_rows", "uniformity_objective", "update_memory_bank", "update_prototypes",
    "weighted_cross_entropy",
]
