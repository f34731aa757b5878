"""From a config to the parts of a run: the step's recipe, the network, the mesh and its shardings, the jitted step,
the initial state and its abstract shape. The training loop, its evaluation and every benchmark build them here.

``build(config, num_classes, steps_per_epoch)`` needs only what the dataset says (its class count and, for the
schedule, its steps per epoch); reading the data, the weights file and the anchors stays with the caller
(`load_pretrained`, `Parts.anchors`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from stpg_jax import checkpoint, losses, sharding, state as state_lib
from stpg_jax.config import ConfigError
from stpg_jax.host_matching import HostMatching, SameStepMatching
from stpg_jax.models.pretrained import load_backbone_weights_for, reading_weights
from stpg_jax.recipe import Recipe
from stpg_jax.train_step import train_step


class Parts:
    """A run's compiled parts for one config on one mesh (see the module docstring)."""

    def __init__(self, config, recipe: Recipe, mesh):
        self.config, self.recipe, self.mesh = config, recipe, mesh
        self.model = recipe.model
        self.replicated = sharding.replicated(mesh)
        self.batch_sharding = sharding.batch_sharded(mesh)

    @property
    def matches(self) -> bool:
        """Whether the run matches prototypes to anchors on the host (STPG with the contrastive part)."""
        return self.config.mode == "stpg" and self.config.stpg.contrastive

    @property
    def same_step(self) -> bool:
        """Whether the contrastive losses use the assignment matched within the same step (DESIGN.md §8.3)."""
        return self.matches and self.config.stpg.assignment_timing == "same_step"

    @property
    def speculates(self) -> bool:
        """Whether steps start ahead of their host matching (stpg_jax.host_matching), which needs a step that keeps
        its input state. Not on several CPU devices: there, two steps in flight can hang in XLA's CPU collectives
        (seen with virtual devices on 2 cores), and the host shares the cores anyway."""
        if not (self.matches and self.config.stpg.speculative_matching):
            return False
        return self.mesh.devices.size == 1 or self.mesh.devices.flat[0].platform != "cpu"

    @property
    def donates_state(self) -> bool:
        """Whether the step may donate its input state: not when a step may run again from its input (steps ahead of
        the matching, or the same-step assignment)."""
        return not (self.speculates or self.same_step)

    def jitted_step(self, donate: bool | None = None):
        """``jax.jit`` of ``train_step`` with the recipe static and the mesh's shardings; called as
        ``f(recipe, state, batch, assignment)``. jit's own cache serves a second run with an equal recipe."""
        donate = self.donates_state if donate is None else donate
        return jax.jit(train_step, static_argnums=0,
                       in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                       out_shardings=(self.replicated, self.replicated), donate_argnums=(1,) if donate else ())

    def step(self, donate: bool | None = None):
        """The step as the loop calls it: ``step(state, batch, assignment) -> (state, metrics)``."""
        return functools.partial(self.jitted_step(donate), self.recipe)

    def matching(self, anchors_host):
        """The host matching between (or within) steps, for the run's assignment timing."""
        kind = SameStepMatching if self.same_step else HostMatching
        return kind(anchors_host, self.replicated, speculate=self.speculates)

    def _anchor_shape(self):
        if self.config.mode != "stpg":
            return None
        return jax.ShapeDtypeStruct((self.recipe.num_classes, self.recipe.feature_dim), jnp.float32)

    def anchors(self) -> np.ndarray | None:
        """STPG's (C, D) anchors: read from ``stpg.anchors_file`` or optimised from ``seed``; None for other modes."""
        c, classes, dim = self.config, self.recipe.num_classes, self.recipe.feature_dim
        if c.mode != "stpg":
            return None
        if c.stpg.anchors_file:
            return load_anchors(c, classes, dim)
        return losses.make_anchors(classes, dim, seed=c.seed, steps=c.stpg.anchor_steps,
                                   temperature=c.stpg.anchor_temperature)

    def init_state(self, anchors=None, pretrained=None) -> state_lib.TrainState:
        """The initial state, built by one compiled program straight onto the mesh (the weights and anchors enter as
        arguments, not as constants baked into the program)."""
        init = jax.jit(state_lib.init_state, static_argnums=0, out_shardings=self.replicated)
        key = jax.device_put(jax.random.PRNGKey(self.config.seed), self.replicated)
        put = functools.partial(jax.device_put, device=self.replicated)
        return init(self.recipe, key, None if anchors is None else put(np.asarray(anchors, np.float32)),
                    None if pretrained is None else put(pretrained))

    def abstract_state(self) -> state_lib.TrainState:
        """Shapes, dtypes and placement of the state, the target a checkpoint is restored into: traced, not run."""
        shapes = jax.eval_shape(functools.partial(state_lib.init_state, self.recipe),
                                jax.eval_shape(jax.random.PRNGKey, 0), self._anchor_shape())
        return checkpoint.abstract_like(shapes, self.replicated)


def build(config, num_classes: int, steps_per_epoch: int, mesh=None) -> Parts:
    """The parts of a run of ``config`` on ``mesh`` (default: every device of every process)."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    total = config.schedule.total_steps or config.schedule.epochs * steps_per_epoch
    return Parts(config, Recipe.of(config, num_classes, steps_per_epoch, total, mesh.devices.size), mesh)


def load_pretrained(model_config):
    """(params, batch_stats) of the ImageNet backbone named by ``model.pretrained``, or None for a random init."""
    if not model_config.pretrained:
        return None
    if not os.path.exists(model_config.pretrained):
        raise FileNotFoundError(
            f"config.model.pretrained = {model_config.pretrained!r}: no such file. Point it at ImageNet backbone "
            "weights (.npz, .pth or a converted file; see docs/weights.md), or set it to '' for a random init."
        )

    with reading_weights(model_config.pretrained, "config.model.pretrained"):
        return load_backbone_weights_for(model_config)


def load_anchors(config, num_classes: int, dim: int) -> np.ndarray:
    """The (C, D) anchors of ``stpg.anchors_file`` (a .npy of unit rows, e.g. the released code's VOC 21x256 or
    Cityscapes 19x256 files), or ConfigError naming the field and what was expected."""
    path = config.stpg.anchors_file
    field = f"config.stpg.anchors_file = {path!r}"
    if not os.path.isfile(path):
        raise ConfigError(f"{field}: no such file; expected a .npy file of a ({num_classes}, {dim}) float array")
    try:
        anchors = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{field}: not a readable .npy array ({e}); expected a ({num_classes}, {dim}) float "
                          "array") from None
    if anchors.shape != (num_classes, dim) or not np.issubdtype(anchors.dtype, np.floating):
        raise ConfigError(f"{field}: holds a {anchors.dtype} array of shape {anchors.shape}; expected a "
                          f"({num_classes}, {dim}) float array (classes x model.proj_dim)")
    norms = np.linalg.norm(anchors.astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        raise ConfigError(f"{field}: rows must be unit vectors; their norms range from {norms.min():.4f} to "
                          f"{norms.max():.4f}")
    return anchors.astype(np.float32)
