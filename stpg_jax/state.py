"""The functional train state: four networks (two students, two EMA teachers), two optimisers, the contrastive state.

Modes use subsets: 'supervised' holds only the Gen-Student; 'mean_teacher' the Gen-Student and its teacher; 'stpg'
all four. Unused networks are None, so they cost neither memory nor checkpoint space.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from stpg_jax import losses
from stpg_jax.models.pretrained import merge_backbone
from stpg_jax.recipe import Recipe


@struct.dataclass
class Network:
    params: Any
    batch_stats: Any

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}


@struct.dataclass
class ContrastState:
    """anchors (C, D) fixed unit vectors; prototypes (C, D); assignment (C,) int32 (class c → anchor index, set on
    the host by the Hungarian matching); bank: per-class memory bank of labelled teacher features."""

    anchors: jax.Array
    prototypes: jax.Array
    assignment: jax.Array
    initial_anchors: jax.Array  # the random unit vectors used as assigned anchors before the first matching
    matched: jax.Array  # bool scalar: has a matching been run
    bank: losses.MemoryBank

    def assigned_anchors(self):
        matched = losses.assigned_anchors(self.anchors, self.assignment)
        return jnp.where(self.matched, matched, self.initial_anchors)


@struct.dataclass
class TrainState:
    step: jax.Array
    rng: jax.Array
    gen_student: Network
    gen_opt_state: Any
    gen_teacher: Optional[Network] = None
    pro_student: Optional[Network] = None
    pro_opt_state: Any = None
    pro_teacher: Optional[Network] = None
    contrast: Optional[ContrastState] = None


def init_state(recipe: Recipe, key, anchors=None, pretrained=None) -> TrainState:
    """The initial state of a run: students from ``key`` (each its own init of the heads; with ``pretrained``
    (params, batch_stats), the ImageNet backbone), each teacher equal to its student, fresh optimisers, and for STPG the
    contrastive state around ``anchors`` (C, D).

    Pure: ``jax.eval_shape`` of it is the target a checkpoint restores into, ``jax.jit`` of it with output shardings
    builds the state on the devices (``stpg_jax.build``). The students are initialised by one vmapped initialiser
    (the same numbers as one call per key), so the network's hundreds of random initialisers are traced and compiled
    once, not once per student.
    """
    mode, model = recipe.mode, recipe.model
    k_gen, k_pro, k_proto, k_init_anchor, k_run = jax.random.split(key, 5)
    crop = min(recipe.config.data.crop_size, 64)  # the initialiser's dummy forward pass needs no more

    def init_network(k):
        variables = model.init({"params": k, "dropout": k}, jnp.zeros((1, crop, crop, 3), jnp.uint8), train=False)
        if pretrained is not None:
            variables = merge_backbone(flax.core.unfreeze(variables), *pretrained)  # strict: any mismatch raises
        return Network(variables["params"], variables["batch_stats"])

    keys = jnp.stack([k_gen, k_pro] if mode == "stpg" else [k_gen])
    students = jax.vmap(init_network)(keys)
    gen = jax.tree_util.tree_map(lambda x: x[0], students)
    tx, _ = recipe.optimizer(gen.params)
    state = TrainState(step=jnp.zeros((), jnp.int32), rng=k_run, gen_student=gen, gen_opt_state=tx.init(gen.params))
    if mode in ("mean_teacher", "stpg"):
        state = state.replace(gen_teacher=jax.tree_util.tree_map(jnp.copy, gen))  # its own buffers
    if mode == "stpg":
        if anchors is None:
            raise ValueError("stpg mode needs the anchors (losses.make_anchors)")
        pro = jax.tree_util.tree_map(lambda x: x[1], students)
        classes, dim = recipe.num_classes, anchors.shape[1]
        contrast = ContrastState(
            anchors=jnp.asarray(anchors, jnp.float32),
            prototypes=losses.init_prototypes(k_proto, classes, dim),
            assignment=jnp.arange(classes, dtype=jnp.int32),
            initial_anchors=losses.init_prototypes(k_init_anchor, classes, dim),
            matched=jnp.zeros((), bool),
            bank=losses.init_memory_bank(classes, recipe.config.stpg.bank_capacity, dim),
        )
        state = state.replace(pro_student=pro, pro_opt_state=tx.init(pro.params),
                              pro_teacher=jax.tree_util.tree_map(jnp.copy, pro), contrast=contrast)
    return state


def ema(teacher: Network, student: Network, decay: float) -> Network:
    """Teacher ← decay·teacher + (1−decay)·student on parameters only.

    BatchNorm statistics are not averaged: a teacher runs in train mode (batch statistics, as in the released
    code), and its running averages are the ones its own forward passes accumulate.
    """
    # optax's step·new + (1 − step)·old with new = teacher, step = decay: decay·t + (1 − decay)·s term for term.
    # The other reading (new = student, step = 1 − decay) sums the products in the other order, which XLA fuses
    # into another multiply-add: last-bit differences, another trajectory.
    params = optax.incremental_update(teacher.params, student.params, step_size=decay)
    return teacher.replace(params=params)
