"""The configuration schema shared by every file in ``configs/``, and parsing of the ``:split,key=value`` argument.

Every hyperparameter of DESIGN.md §5 and every switch of §6 is a field here, with the paper's value by default. A
config file sets what differs for its dataset and calls :func:`finalize` with the argument given after the colon,
e.g. ``configs/voc_blender.py:1_4`` or ``configs/camvid.py:1_8,mode=supervised,model.dtype=bfloat16``.
"""

from __future__ import annotations

import ast
from typing import Mapping

import ml_collections

SPLITS = ("1_16", "1_8", "1_4", "1_2", "full")
MODES = ("stpg", "supervised", "mean_teacher")
# The networks of each mode's train state.
MODE_NETWORKS = {"stpg": ("gen_student", "pro_student", "gen_teacher", "pro_teacher"),
                 "supervised": ("gen_student",), "mean_teacher": ("gen_student", "gen_teacher")}
SELECTION_VARIANTS = ("consistent", "consistent+low", "consistent+high", "all")


class ConfigError(ValueError):
    """A config field or argument that is unknown or has an unusable value; the message names it."""


# Fields added after runs and exports were written without them, with the value those had (the network's behaviour
# before the field existed). Checkpoint resumption and model building fill them in from here.
# The fields of the released training step (DESIGN.md §8) entered later: runs and exports from before follow the
# project's earlier behaviour, which each field keeps one switch away.
FIELDS_ADDED_LATER = {
    "model.remat": False, "model.bn_backward": "autodiff", "model.proj_dropout": 0.1,
    "model.bn_statistics": "joined", "model.bn_running_var": "biased", "model.aspp_activation": "relu",
    "model.proj_conv_bias": False, "model.proj_dropout_kind": "element", "model.head_init": "legacy",
    "stpg.assignment_timing": "previous_step", "stpg.anchors_file": "", "data.augmentation": "legacy",
    "reference": "paper",
}

# What `reference=release` in the config argument sets: every point where the paper and the released code differ
# (DESIGN.md §6). Fields given explicitly in the same argument win.
RELEASE_FIELDS = {"stpg.prototype_momentum": 0.9, "stpg.bank_source": "pro_teacher",
                  "stpg.train_projection_head": False, "model.depth": 50}
REFERENCES = ("paper", "release")


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default and meaning. One statement a field, so that the schema reads as one list: that
    is why this function is long."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # 'stpg' (the method), 'supervised' (labelled data only, the paper's baseline), 'mean_teacher' (one student).
    c.mode = "stpg"
    c.split = "1_4"
    # 'release' sets the released code's choice wherever it differs from the paper (RELEASE_FIELDS); the points where
    # the paper is silent (DESIGN.md §8) follow the release either way.
    c.reference = "paper"

    c.data = d = ml_collections.ConfigDict()
    d.dataset = "synthetic"
    d.root = ""  # manual directory holding the dataset in its official layout
    d.sbd_root = ""  # VOC: SegmentationClassAug/ or SBD's dataset/ (cls/*.mat) for the 10582 aug set
    d.data_dir = ""  # where prepared array_record files go ('' = the data module's default)
    d.prepare_if_missing = True
    d.protocol = "blender"  # VOC: 'blender' (labelled drawn from 10582) or 'classic' (from the 1464)
    d.num_labeled = -1  # set from the split; -1 = every training image labelled
    d.labeled_list = ""  # public split files (one id per line); '' = seeded split
    d.unlabeled_list = ""
    d.split_seed = 0
    d.class_names = ()
    d.ignore_index = 255
    d.crop_size = 512
    d.scales = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
    # 'release': scaled size rounded down, bilinear without antialiasing, crop then centred padding with exactly 0
    # after normalisation (DESIGN.md §8.7). 'legacy': rounded size, PIL's antialiased bilinear, top-left image in
    # mean-colour padding, then the crop.
    d.augmentation = "release"
    d.batch_labeled = 8  # GLOBAL batch sizes, split over all devices of all hosts
    d.batch_unlabeled = 8
    d.workers = 4
    d.prefetch = 2
    d.synthetic = ml_collections.ConfigDict(
        dict(num_labeled=40, num_unlabeled=360, num_val=100, height=96, width=128, seed=0)
    )

    c.model = m = ml_collections.ConfigDict()
    m.depth = 50
    m.stage_blocks = ()  # overrides depth when set (tests build tiny networks)
    m.width = 64
    m.stem = "deep"  # 'deep' (v1c checkpoints) or 'standard' (7x7)
    m.stride_in_1x1 = False
    m.output_stride = 16
    m.aspp_channels = 256
    m.decoder_channels = 256
    m.low_level_channels = 48
    m.proj_dim = 256
    m.proj_dropout = 0.1  # dropout in the projection head, between its BN + ReLU and its 1x1 conv
    m.proj_dropout_kind = "channel"  # 'channel' (whole channels, PyTorch's Dropout2d, as released) or 'element'
    m.proj_conv_bias = True  # the projection head's 3x3 conv has a bias (as released)
    m.aspp_activation = "leaky_relu"  # ASPP's three activations: 'leaky_relu' (slope 0.01, as released) or 'relu'
    m.head_init = "kaiming_fan_in"  # layers after the backbone: 'kaiming_fan_in' (as released) or 'legacy'
    # BatchNorm statistics of a network that sees several inputs in one step: 'per_input' (each input normalised by
    # its own statistics and the running averages updated once per input, in order, as the released code's separate
    # passes; computed in one joined pass) or 'joined' (one set of statistics over all inputs).
    m.bn_statistics = "per_input"
    m.bn_running_var = "unbiased"  # running variance stored as PyTorch does (x n/(n-1)), or 'biased' (flax)
    m.dtype = "float32"  # compute dtype; parameters stay float32
    m.remat = False  # recompute block activations in the backward pass: less memory, more compute; same parameters
    # BatchNorm's backward pass: 'autodiff' (nn.BatchNorm differentiated by JAX) or 'closed_form' (written out, with
    # the following ReLU's; same parameters and forward values, fewer passes over the activations).
    m.bn_backward = "autodiff"
    m.pretrained = ""  # ImageNet backbone weights (.npz / .pth / converted); '' = random init

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 0.005  # for the global batch above; not rescaled with the device count
    o.momentum = 0.9
    o.weight_decay = 1e-4  # not applied to BatchNorm parameters or biases
    o.poly_power = 0.9

    c.schedule = s = ml_collections.ConfigDict()
    s.epochs = 40
    s.steps_per_epoch = 0  # 0 = max(#labelled, #unlabelled) // batch (DESIGN.md §5)
    s.total_steps = 0  # 0 = epochs * steps_per_epoch

    c.loss = lo = ml_collections.ConfigDict()
    lo.supervised = "ce"  # 'ce' or 'ohem' (Cityscapes)
    lo.ohem_threshold = 0.7
    lo.ohem_min_kept = 50000
    lo.ohem_class_weights = ()  # () = uniform; cityscapes.py sets the 19 usual weights
    lo.unsup_weight = 1.0  # λ_u
    lo.contrastive_weight = 0.1  # λ_c

    c.stpg = t = ml_collections.ConfigDict()
    t.ema_decay = 0.99
    t.cross_supervision = True  # Table 4 "dual mean teacher": each teacher supervises the other module's student
    t.selection = "consistent+high"  # Table 5 variants; 'all' switches pixel selection off (Table 4)
    t.contrastive = True  # Table 4 "dual contrastive learning"
    t.contrastive_temperature = 0.5
    t.anchor_temperature = 0.07
    t.anchor_steps = 10000
    t.prototype_momentum = 0.99  # paper; the released code uses 0.9
    t.bank_source = "gen_teacher"  # paper; the released code uses 'pro_teacher'
    t.train_projection_head = True  # paper; the released code never optimises it (False)
    t.bank_capacity = 256
    t.bank_k = 7  # rows added per labelled image per class and step: n_add = batch_labeled * bank_k
    t.bank_confidence = 0.95
    # A (C, D) .npy file of anchors (the released code ships VOC's 21x256 and Cityscapes' 19x256) used instead of
    # optimising new ones; '' = optimise (anchor_steps, anchor_temperature, seed).
    t.anchors_file = ""
    # 'same_step': a step's contrastive losses use the assignment matched after that step's prototype and bank
    # update (as released); 'previous_step': the one matched after the previous step.
    t.assignment_timing = "same_step"
    # Schedule in epochs (counted from 0), turned into steps with the run's steps_per_epoch.
    t.bank_start_epoch = 6
    t.contrastive_start_epoch = 11
    t.proximity_start_epoch = 16
    t.matching_freeze_epoch = 20  # -1: matching never frozen (Cityscapes)
    # Start each step while the host still matches the previous step's prototypes, and run it again only when the
    # assignment changed (same trajectory, bit for bit; costs one copy of the train state on the device). False:
    # the device waits for every matching. See stpg_jax/host_matching.py.
    t.speculative_matching = True

    c.eval = e = ml_collections.ConfigDict()
    e.window = 512  # sliding window side (crop size of the dataset's protocol)
    e.stride_rate = 2 / 3
    e.windows_per_batch = 4
    e.every_steps = 0  # 0 = only at the end
    e.max_images = 0  # 0 = the whole val split
    # Also run each window mirrored left-right and add its logits, mirrored back (off in the paper's protocol).
    e.flip = False
    # Networks evaluated at each evaluation: the Gen-Student (the method's model) and any other of the mode's, each
    # logged and recorded apart (eval/<network>/... in TensorBoard, "networks" in eval_<step>.json).
    e.networks = ("gen_student",)

    c.log_every_steps = 50
    # TensorBoard panels (stpg_jax/visualize.py): pseudo-labels, confidence, selection and predictions of a fixed
    # set of unlabelled and val images, every N steps by a separate jitted function (0 = off; the step is unchanged).
    c.log_images_every_steps = 0
    c.log_images_count = 3  # images of each set (unlabelled, val)
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2
    return c


# The config argument's ``key=value`` items (``configs/demo.py:1_8,mode=supervised``). ml_collections' config_flags
# parses overrides only as separate absl flags (``--config.mode=supervised``, which launch.py accepts too); the
# argument keeps a run's whole config in one string that the benchmark scripts and ``--config`` of the evaluate and
# predict commands pass on and print as it is, so its items are parsed here, to a value of the field's type.
def _parse_value(text: str, current, key: str):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(current, tuple) and current and all(isinstance(v, str) for v in current):
            # Names need no quotes: eval.networks=(gen_student,gen_teacher)
            return tuple(n.strip(" '\"") for n in text.strip(" ()[]").split(",") if n.strip(" '\""))
        raise ConfigError(f"config override {key}={text!r}: cannot parse the value for a {type(current).__name__} field")
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"config override {key}={text!r}: expected True or False")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)
    if type(value) is not type(current) and not (isinstance(current, tuple) and isinstance(value, tuple)):
        raise ConfigError(
            f"config override {key}={text!r}: expected a {type(current).__name__}, got {type(value).__name__}"
        )
    return value


def parent_of(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding dotted ``key`` and the key's last part; KeyError naming the allowed fields if unknown."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(parts[:i]) or "<top level>"
            allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"unknown config key {key!r}: {prefix} has no field {part!r}; allowed: {allowed}")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, str]) -> None:
    """Sets dotted ``key=value`` overrides, refusing unknown keys (naming the allowed ones)."""
    for key, text in overrides.items():
        node, name = parent_of(config, key)
        node[name] = _parse_value(text, node[name], key)


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets and quotes, so ``model.stage_blocks=(1,1,1,1)`` stays one item."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def split_arg(arg: str | None, default_split: str, splits=SPLITS) -> tuple[str, dict]:
    """Parses ``'1_4,a.b=1,c=x'`` into ('1_4', {'a.b': '1', 'c': 'x'})."""
    split, overrides = default_split, {}
    for i, item in enumerate(p.strip() for p in _split_top_level(arg or "")):
        if not item:
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            overrides[k.strip()] = v.strip()
        elif i == 0:
            split = item
        else:
            raise ConfigError(f"config argument {arg!r}: {item!r} is neither the split (first) nor key=value")
    if split not in splits:
        raise ConfigError(f"unknown split {split!r}; allowed: {list(splits)}")
    return split, overrides


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks values whose mistakes would otherwise surface deep inside training."""
    if c.mode not in MODES:
        raise ConfigError(f"config.mode must be one of {list(MODES)}, got {c.mode!r}")
    if c.stpg.selection not in SELECTION_VARIANTS:
        raise ConfigError(f"config.stpg.selection must be one of {list(SELECTION_VARIANTS)}, got {c.stpg.selection!r}")
    if c.stpg.bank_source not in ("gen_teacher", "pro_teacher"):
        raise ConfigError(f"config.stpg.bank_source must be 'gen_teacher' or 'pro_teacher', got {c.stpg.bank_source!r}")
    if c.loss.supervised not in ("ce", "ohem"):
        raise ConfigError(f"config.loss.supervised must be 'ce' or 'ohem', got {c.loss.supervised!r}")
    if c.model.proj_dim <= 0 and c.mode == "stpg" and c.stpg.contrastive:
        raise ConfigError("config.model.proj_dim must be > 0 when config.stpg.contrastive is on")
    if c.model.stem not in ("deep", "standard"):
        raise ConfigError(f"config.model.stem must be 'deep' or 'standard', got {c.model.stem!r}")
    if c.model.output_stride not in (8, 16):
        raise ConfigError(f"config.model.output_stride must be 8 or 16, got {c.model.output_stride}")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype must be 'float32' or 'bfloat16', got {c.model.dtype!r}")
    if not isinstance(c.stpg.speculative_matching, bool):
        raise ConfigError(f"config.stpg.speculative_matching must be True or False, got {c.stpg.speculative_matching!r}")
    if not isinstance(c.model.remat, bool):
        raise ConfigError(f"config.model.remat must be True or False, got {c.model.remat!r}")
    if not 0.0 <= c.model.proj_dropout < 1.0:
        raise ConfigError(f"config.model.proj_dropout must be in [0, 1), got {c.model.proj_dropout!r}")
    if c.model.bn_backward not in ("autodiff", "closed_form"):
        raise ConfigError(f"config.model.bn_backward must be 'autodiff' or 'closed_form', got {c.model.bn_backward!r}")
    choices = {"reference": REFERENCES, "data.augmentation": ("release", "legacy"),
               "model.proj_dropout_kind": ("channel", "element"), "model.aspp_activation": ("leaky_relu", "relu"),
               "model.head_init": ("kaiming_fan_in", "legacy"), "model.bn_statistics": ("per_input", "joined"),
               "model.bn_running_var": ("unbiased", "biased"),
               "stpg.assignment_timing": ("same_step", "previous_step")}
    for key, allowed in choices.items():
        node, name = parent_of(c, key)
        if node[name] not in allowed:
            raise ConfigError(f"config.{key} must be one of {list(allowed)}, got {node[name]!r}")
    if not isinstance(c.model.proj_conv_bias, bool):
        raise ConfigError(f"config.model.proj_conv_bias must be True or False, got {c.model.proj_conv_bias!r}")
    if not c.model.stage_blocks and c.model.depth not in (50, 101):
        raise ConfigError(f"config.model.depth must be 50 or 101 (or set model.stage_blocks), got {c.model.depth}")
    networks = tuple(c.eval.networks)
    if "gen_student" not in networks or len(set(networks)) != len(networks) or not set(networks) <= set(
            MODE_NETWORKS.get(c.mode, ())):
        raise ConfigError(f"config.eval.networks must list 'gen_student' and others of the {c.mode!r} mode's "
                          f"networks {list(MODE_NETWORKS.get(c.mode, ()))}, each once; got {list(networks)}")
    for name in ("log_images_every_steps", "log_images_count"):
        if not isinstance(c[name], int) or c[name] < 0:
            raise ConfigError(f"config.{name} must be an int >= 0, got {c[name]!r}")
    for name in ("batch_labeled", "batch_unlabeled", "crop_size"):
        if c.data[name] <= 0:
            raise ConfigError(f"config.data.{name} must be positive, got {c.data[name]}")
    # Counts and sizes that zero or less would turn into a division by zero deep inside, or a silent no-op.
    for key, least in (("model.width", 1), ("model.aspp_channels", 1), ("model.decoder_channels", 1),
                       ("model.low_level_channels", 1), ("eval.window", 1), ("eval.windows_per_batch", 1),
                       ("log_every_steps", 1), ("checkpoint_every_steps", 1), ("keep_checkpoints", 1),
                       ("schedule.epochs", 0), ("schedule.steps_per_epoch", 0), ("schedule.total_steps", 0),
                       ("data.workers", 0), ("eval.every_steps", 0), ("eval.max_images", 0)):
        node, name = parent_of(c, key)
        if node[name] < least:
            raise ConfigError(f"config.{key} must be at least {least}, got {node[name]!r}")
    if not 0.0 < c.eval.stride_rate <= 1.0:
        raise ConfigError(f"config.eval.stride_rate must be in (0, 1], got {c.eval.stride_rate!r}")


def finalize(c: ml_collections.ConfigDict, arg: str | None, split_fields: Mapping[str, Mapping], default_split="1_4"):
    """Applies the split named by ``arg`` (its per-split fields), then the overrides, then validates."""
    split, overrides = split_arg(arg, default_split, tuple(split_fields))
    c.split = split
    apply_overrides(c, {k: repr(v) if not isinstance(v, str) else v for k, v in split_fields[split].items()})
    apply_overrides(c, overrides)
    if c.reference == "release":
        apply_reference(c, explicit=overrides)
    validate(c)
    return c


def apply_reference(c: ml_collections.ConfigDict, explicit: Mapping = ()) -> None:
    """Sets the released code's value of every paper-vs-release field (RELEASE_FIELDS) not in ``explicit``."""
    for key, value in RELEASE_FIELDS.items():
        if key not in explicit:
            node, name = parent_of(c, key)
            node[name] = value
