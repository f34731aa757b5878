"""What a run's config fixes about its step: the network, the optimiser and the method's phases in steps.

A `Recipe` is the static argument of the jitted step (``stpg_jax.train_step``) and of the state's initialiser
(``stpg_jax.state.init_state``): hashable, compared by value, so a second run in the same process with the same
recipe finds jit's own cache and compiles nothing again. It holds the config's sections the step reads, as they are
(no copy of their fields), and the three facts the config does not say: the dataset's class count, the run's length
and the phase starts converted from epochs to steps once, here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from stpg_jax.config import FIELDS_ADDED_LATER
from stpg_jax.models.deeplab import DeepLabV3Plus
from stpg_jax.models.resnet import STAGE_BLOCKS

# The config's parts a training step depends on; the rest (logging, checkpoints, evaluation, data loading) does not
# enter its trace, so changing them compiles nothing again.
STEP_SECTIONS = ("mode", "model", "loss", "optim", "stpg")
STEP_DATA_FIELDS = ("ignore_index", "batch_labeled", "crop_size")
# Fields of those sections that only the host reads: when it dispatches a step, and the backbone weights' file, which
# the state's initialiser takes as an argument (its arrays, not its path).
HOST_ONLY_FIELDS = {"stpg": ("speculative_matching",), "model": ("pretrained",)}


@dataclasses.dataclass(frozen=True)
class Phases:
    """DESIGN.md §3's schedule in steps (0-based step indices; ``matching_freeze`` -1: never frozen)."""

    bank_start: int = 0
    contrastive_start: int = 0
    proximity_start: int = 0
    matching_freeze: int = -1

    @classmethod
    def of(cls, stpg_config, steps_per_epoch: int) -> "Phases":
        t = stpg_config
        freeze = t.matching_freeze_epoch
        return cls(t.bank_start_epoch * steps_per_epoch, t.contrastive_start_epoch * steps_per_epoch,
                   t.proximity_start_epoch * steps_per_epoch, freeze * steps_per_epoch if freeze >= 0 else -1)

    def matching_after(self, step: int) -> bool:
        """Whether the Hungarian matching re-runs after training step ``step``."""
        return step >= self.bank_start and (self.matching_freeze < 0 or step < self.matching_freeze)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """``config``: the step's sections of the run's config (frozen); ``batch_groups``: the devices the batch axis is
    split over, which joined inputs are laid out for (``stpg_jax.sharding.concat_local``)."""

    config: ml_collections.FrozenConfigDict
    num_classes: int
    total_steps: int
    phases: Phases = Phases()
    batch_groups: int = 1

    @classmethod
    def of(cls, config, num_classes: int, steps_per_epoch: int, total_steps: int, batch_groups: int = 1) -> "Recipe":
        sections = {name: config[name] for name in STEP_SECTIONS}
        for name, fields in HOST_ONLY_FIELDS.items():
            sections[name] = {k: v for k, v in sections[name].items() if k not in fields}
        sections["data"] = {name: config.data[name] for name in STEP_DATA_FIELDS}
        return cls(ml_collections.FrozenConfigDict(sections), num_classes, total_steps,
                   Phases.of(config.stpg, steps_per_epoch), batch_groups)

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def feature_dim(self) -> int:
        """The width D of the features the contrastive part sees: the projection head's (or the decoder's)."""
        return self.config.model.proj_dim or self.config.model.decoder_channels

    @property
    def model(self) -> DeepLabV3Plus:
        return model_from_config(self.config.model, self.num_classes)

    def optimizer(self, params):
        """(optax transformation, learning-rate schedule) for a student's parameter tree ``params``."""
        return make_optimizer(self.config.optim, self.total_steps, params, self.config.stpg.train_projection_head)


def model_from_config(model_config, num_classes: int) -> DeepLabV3Plus:
    """The network a config's ``model`` section describes (fields it lacks, as configs and exports written before
    they existed, take the value those had)."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if model_config.dtype not in dtypes:
        raise ValueError(f"config.model.dtype must be one of {sorted(dtypes)}, got {model_config.dtype!r}")
    if model_config.depth not in STAGE_BLOCKS and not model_config.stage_blocks:
        raise ValueError(f"config.model.depth must be one of {sorted(STAGE_BLOCKS)}, got {model_config.depth}")
    fields = {f.name for f in dataclasses.fields(DeepLabV3Plus)} - {"parent", "name", "num_classes", "bn_groups"}
    values = {name: model_config.get(name, FIELDS_ADDED_LATER.get(f"model.{name}")) for name in fields}
    values.update(stage_blocks=tuple(values["stage_blocks"]) or None, dtype=dtypes[model_config.dtype])
    return DeepLabV3Plus(num_classes=num_classes, **values)


def _is_decayed(path, _):
    # Weight decay on conv/dense kernels only: not on BatchNorm scales/biases nor on any bias.
    return path[-1].key == "kernel" if hasattr(path[-1], "key") else False


def make_optimizer(optim_config, total_steps: int, params, train_projection_head: bool = True):
    """SGD with momentum, L2 on kernels only (PyTorch-style, added to the gradient), poly learning rate per step."""
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
