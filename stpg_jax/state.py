"""The functional train state: four networks (two students, two EMA teachers), two optimisers, the contrastive state.

Modes use subsets: 'supervised' holds only the Gen-Student; 'mean_teacher' the Gen-Student and its teacher; 'stpg'
all four. Unused networks are None, so they cost neither memory nor checkpoint space.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from stpg_jax import losses
from stpg_jax.models.pretrained import merge_backbone


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


def _is_decayed(path, _):
    # Weight decay on conv/dense kernels only: not on BatchNorm scales/biases nor on any bias.
    return path[-1].key == "kernel" if hasattr(path[-1], "key") else False


def make_optimizer(optim_config, total_steps: int, params, train_projection_head: bool = True):
    """SGD with momentum, decoupled-free L2 on kernels only (PyTorch-style), poly learning rate per step."""
    schedule = optax.polynomial_schedule(
        init_value=optim_config.lr, end_value=0.0, power=optim_config.poly_power, transition_steps=max(1, total_steps)
    )
    decay_mask = jax.tree_util.tree_map_with_path(_is_decayed, params)
    tx = optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=optim_config.momentum),
    )
    if not train_projection_head:
        # The released code never hands the projection head to the optimiser: it stays at its random init.
        labels = jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if str(getattr(p[0], "key", "")).startswith("proj_") else "train", params
        )
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def init_network(model, key, crop_size: int, pretrained=None) -> Network:
    """Random init (``key`` decides the heads), then the pretrained backbone if given as (params, batch_stats)."""
    dummy = jnp.zeros((1, crop_size, crop_size, 3), jnp.float32)
    variables = model.init({"params": key, "dropout": key}, dummy, train=False)
    if pretrained is not None:
        variables = merge_backbone(flax.core.unfreeze(variables), *pretrained)  # strict: any mismatch raises
    return Network(variables["params"], variables["batch_stats"])


def create_train_state(model, tx, key, *, mode: str, num_classes: int, crop_size: int, proj_dim: int,
                       anchors=None, bank_capacity: int = 256, pretrained=None, init_net=None) -> TrainState:
    """Builds the initial state. Students differ by init key; each teacher starts equal to its student.

    Run as it is, each operation compiles on its own; `init_train_state` builds the same state from two compiled
    programs. ``init_net(key, pretrained) -> Network`` replaces `init_network`.
    """
    if init_net is None:
        def init_net(k, weights):
            return init_network(model, k, crop_size, weights)
    k_gen, k_pro = _student_keys(key)
    gen = init_net(k_gen, pretrained)
    pro = init_net(k_pro, pretrained) if mode == "stpg" else None
    return assemble_train_state(tx, key, gen, pro, mode=mode, num_classes=num_classes, proj_dim=proj_dim,
                                anchors=anchors, bank_capacity=bank_capacity)


def _student_keys(key):
    return tuple(jax.random.split(key, 5)[:2])


def assemble_train_state(tx, key, gen: Network, pro: Optional[Network], *, mode: str, num_classes: int,
                         proj_dim: int, anchors=None, bank_capacity: int = 256) -> TrainState:
    """The initial state around initialised students (``pro`` only for 'stpg'): teachers, optimisers, the
    contrastive state and the run's RNG."""
    _, _, k_proto, k_init_anchor, k_run = jax.random.split(key, 5)
    state = TrainState(step=jnp.zeros((), jnp.int32), rng=k_run, gen_student=gen, gen_opt_state=tx.init(gen.params))
    if mode in ("mean_teacher", "stpg"):
        state = state.replace(gen_teacher=jax.tree_util.tree_map(jnp.copy, gen))
    if mode == "stpg":
        if anchors is None:
            raise ValueError("stpg mode needs the anchors (losses.make_anchors)")
        contrast = ContrastState(
            anchors=jnp.array(anchors, jnp.float32),  # a copy: the state is donated
            prototypes=losses.init_prototypes(k_proto, num_classes, proj_dim),
            assignment=jnp.arange(num_classes, dtype=jnp.int32),
            initial_anchors=losses.init_prototypes(k_init_anchor, num_classes, proj_dim),
            matched=jnp.zeros((), bool),
            bank=losses.init_memory_bank(num_classes, bank_capacity, proj_dim),
        )
        state = state.replace(
            pro_student=pro,
            pro_opt_state=tx.init(pro.params),
            pro_teacher=jax.tree_util.tree_map(jnp.copy, pro),
            contrast=contrast,
        )
    return state


@functools.lru_cache(maxsize=8)
def _network_initialiser(model, crop_size: int, sharding):
    """`init_network` compiled for ``model`` with outputs placed as ``sharding``; one per model in a process, so that
    building another state for the same model (a run resumed in the same process) traces and compiles nothing."""
    return jax.jit(lambda k, weights: init_network(model, k, crop_size, weights), out_shardings=sharding)


@contextlib.contextmanager
def threefry_kernels():
    """On a GPU, jax.random's threefry lowered to one kernel per call instead of XLA's unrolled rounds while the
    block traces and compiles (``jax_threefry_gpu_kernel_lowering``; the same threefry2x32 function, so the same
    numbers; no effect on a CPU). A network's hundreds of random initialisers are most of its initialiser's compile
    time: for an H100, the R50 DeepLabV3+ initialiser compiled in 22–24 s with XLA's rounds and 6–7 s with the
    kernels (BENCHMARKS.md §1).
    The flag is part of jit's cache key, so a function compiled inside the block is found again only inside it."""
    name = "jax_threefry_gpu_kernel_lowering"
    before = getattr(jax.config, name)
    jax.config.update(name, True)
    try:
        yield
    finally:
        jax.config.update(name, before)


def init_train_state(model, tx, key, sharding, *, mode: str, crop_size: int, anchors=None, pretrained=None,
                     **kwargs) -> TrainState:
    """`create_train_state` in two compiled programs whose outputs are placed with ``sharding`` (the replicated
    sharding of the training mesh): one network initialiser, run once per student, then the rest of the state
    around them. ``kwargs``: the other keyword arguments of `create_train_state`.

    Run op by op, building the state costs one small compilation per operation and array shape (about a hundred for
    STPG's four networks and two optimisers), each a kernel build on a GPU. Compiling the whole state as one program
    would trace the initialiser once per student, and the random initialisers are most of its compile time.
    """
    def put(tree):
        return None if tree is None else jax.device_put(tree, sharding)

    with threefry_kernels():
        return _init_train_state(model, tx, put(key), sharding, put, mode=mode, crop_size=crop_size,
                                 anchors=anchors, pretrained=put(pretrained), **kwargs)


def _init_train_state(model, tx, key, sharding, put, *, mode, crop_size, anchors, pretrained, **kwargs):
    init_net = _network_initialiser(model, crop_size, sharding)
    k_gen, k_pro = jax.jit(_student_keys, out_shardings=sharding)(key)
    gen = init_net(k_gen, pretrained)
    pro = init_net(k_pro, pretrained) if mode == "stpg" else None
    # The students are donated: the state's student buffers are theirs, and each teacher gets a copy.
    assemble = jax.jit(functools.partial(assemble_train_state, tx, mode=mode, **kwargs), out_shardings=sharding,
                       donate_argnums=(1, 2))
    return assemble(key, gen, pro, anchors=put(anchors))


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
