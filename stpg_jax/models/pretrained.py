"""ImageNet-pretrained ResNet weights from PyTorch checkpoints, mapped strictly onto `stpg_jax.models.ResNet`.

Accepted files (docs/weights.md lists the exact key names):

- ``.pth`` / ``.pt``: a PyTorch state dict, read with ``torch.load(weights_only=True)`` so that a weights file can
  never run code (torch is the optional extra ``stpg_jax[torch]`` and is imported only here). A dict holding the state
  dict under ``'state_dict'`` or ``'model'`` is unwrapped; a ``'module.'`` prefix (DataParallel) and then a
  ``'backbone.'`` prefix are removed when every key carries it.
- ``.npz`` with the same torchvision key names and PyTorch layouts (conv OIHW; float16 is accepted and cast to
  float32).
- ``.npz`` written by ``python -m stpg_jax.convert_weights``: flax paths (``params/layer1_0/conv1/kernel``,
  ``batch_stats/bn1/mean``) plus a ``'__flax__'`` entry holding JSON metadata (stem, stage_blocks, width).

Stems: ``'standard'`` reads ``conv1`` (7×7) + ``bn1``. ``'deep'`` (three 3×3 convs width→width→2·width) reads either
the ``nn.Sequential`` form ``conv1.{0,3,6}`` convs, ``conv1.{1,4}`` BNs and ``bn1`` (CPS/TorchSemiSeg, U2PL, and the
STPG release built on them) or the PSPNet ``deep_base`` form ``conv1/bn1/conv2/bn2/conv3/bn3``.

Loading is strict: every source key must be used (only an ``fc.*`` classifier and ``num_batches_tracked`` counters
are skipped), every flax leaf filled and every shape equal; otherwise one `WeightsMismatchError` lists the keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

FLAX_MARKER = "__flax__"
FORMAT_VERSION = 1

# BatchNorm: PyTorch name -> (flax collection, flax name).
_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_SKIPPED = re.compile(r"(^fc\.|(^|\.)num_batches_tracked$)")

# Flax stem module -> source module, per deep-stem naming.
_DEEP_STEMS = {
    "sequential": {  # conv1 = nn.Sequential(conv, bn, relu, conv, bn, relu, conv); bn1 after it
        "stem_conv1": "conv1.0", "stem_bn1": "conv1.1",
        "stem_conv2": "conv1.3", "stem_bn2": "conv1.4",
        "stem_conv3": "conv1.6", "stem_bn3": "bn1",
    },
    "deep_base": {  # PSPNet-style separate modules
        "stem_conv1": "conv1", "stem_bn1": "bn1",
        "stem_conv2": "conv2", "stem_bn2": "bn2",
        "stem_conv3": "conv3", "stem_bn3": "bn3",
    },
}

Tree = Dict[str, Any]


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the backbone: lists the unused, missing and mis-shaped keys."""


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Reads a ``.pth``/``.pt``/``.npz`` file of torchvision-named arrays into numpy, unwrapped and unprefixed."""
    path = os.fspath(path)
    if path.endswith((".pth", ".pt")):
        state = _read_torch(path)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            if FLAX_MARKER in f.files:
                raise ValueError(f"{path} is an already converted file; load it with load_backbone_weights")
            state = {k: f[k] for k in f.files}
    else:
        raise ValueError(f"unsupported weights file {path!r}: expected .pth, .pt or .npz")
    return _strip_prefixes(state)


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            f"reading {path} needs PyTorch: pip install 'stpg_jax[torch]', or convert the file to .npz elsewhere"
        ) from e
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001  torch's unpickler fails on other bytes in many ways (IndexError, ...)
        import pickle

        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def _strip_prefixes(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------------------------------------
# Layout of the backbone


def infer_layout(keys: Iterable[str]) -> Tuple[str, Tuple[int, ...]]:
    """``(stem, stage_blocks)`` of a torchvision-named state dict, from its key names alone."""
    keys = set(keys)
    if any(k.startswith("stem.") for k in keys):
        raise WeightsMismatchError(
            "keys 'stem.*' are mmcv/mmseg ResNetV1c names (a 32-32-64 deep stem), which this backbone's "
            "64-64-128 deep stem does not take"
        )
    stem = "deep" if ("conv1.0.weight" in keys or "conv2.weight" in keys) else "standard"
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not ids:
            raise WeightsMismatchError(f"no keys 'layer{stage}.*' found: not a ResNet state dict")
        blocks.append(max(ids) + 1)
    return stem, tuple(blocks)


def expected_shapes(stem: str, stage_blocks: Sequence[int], width: int) -> Tree:
    """Shapes of the backbone variables, ``{'params': {...}, 'batch_stats': {...}}``, as the model defines them."""
    import jax
    import jax.numpy as jnp

    from stpg_jax.models.resnet import ResNet

    model = ResNet(stage_blocks=tuple(stage_blocks), width=width, stem=stem)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), dict(shapes))


def _flax_to_source(shapes: Tree, deep_naming: str) -> Dict[Tuple[str, ...], str]:
    """Maps each flax leaf path (collection, module..., leaf) of the ``shapes`` tree to its PyTorch key."""
    mapping = {}
    for collection, tree in shapes.items():
        for path in traverse_util.flatten_dict(tree):
            module, leaf = path[:-1], path[-1]
            if module[0].startswith("stem_"):
                source_module = _DEEP_STEMS[deep_naming][module[0]]
            elif module[0].startswith("layer"):
                stage, block = module[0][len("layer"):].split("_")
                name = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(module[1], module[1])
                source_module = f"layer{stage}.{block}.{name}"
            else:  # standard stem conv1 / bn1
                source_module = module[0]
            if leaf == "kernel":
                source_leaf = "weight"
            else:
                source_leaf = next(t for t, (c, f) in _BN_FIELDS.items() if (c, f) == (collection, leaf))
            mapping[(collection,) + path] = f"{source_module}.{source_leaf}"
    return mapping


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    *,
    stem: Optional[str] = None,
    stage_blocks: Optional[Sequence[int]] = None,
    width: Optional[int] = None,
) -> Tuple[Tree, Tree, Dict[str, Any]]:
    """Converts torchvision-named arrays to flax ``(params, batch_stats, report)``.

    ``stem``/``stage_blocks``/``width`` default to what the key names and shapes say; pass the model's values to
    have a file that does not fit it rejected. ``report`` has ``used`` and ``skipped`` key lists, ``deep_naming``
    and the layout.
    """
    found_stem, found_blocks = infer_layout(state)
    stem = stem or found_stem
    stage_blocks = tuple(stage_blocks) if stage_blocks else found_blocks
    if stem not in ("standard", "deep"):
        raise ValueError(f"stem must be 'standard' or 'deep', got {stem!r}")
    if width is None:
        if "layer1.0.conv1.weight" not in state:
            raise WeightsMismatchError("missing key 'layer1.0.conv1.weight' (needed to read the width)")
        width = int(state["layer1.0.conv1.weight"].shape[0])
    deep_naming = "deep_base" if "conv2.weight" in state else "sequential"

    shape_tree = expected_shapes(stem, stage_blocks, width)
    mapping = _flax_to_source(shape_tree, deep_naming)
    shapes = traverse_util.flatten_dict(shape_tree)
    skipped = sorted(k for k in state if _SKIPPED.search(k))
    wanted = set(mapping.values())
    unused = sorted(k for k in state if k not in wanted and k not in skipped)
    missing = sorted(v for v in mapping.values() if v not in state)

    out: Dict[Tuple[str, ...], np.ndarray] = {}
    misshaped = []
    for flax_path, key in mapping.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        if flax_path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
        want = shapes[flax_path]
        if value.shape != want:
            misshaped.append(f"{key}: file {tuple(np.shape(state[key]))}, model needs {_torch_shape(flax_path, want)}")
            continue
        out[flax_path] = value.astype(np.float32)

    _raise_if_mismatched(unused, missing, misshaped, f"stem={stem!r}, stage_blocks={stage_blocks}, width={width}")
    variables = traverse_util.unflatten_dict(out)
    params, batch_stats = variables.get("params", {}), variables.get("batch_stats", {})
    report = {
        "used": sorted(mapping.values()),
        "skipped": skipped,
        "stem": stem,
        "deep_naming": deep_naming if stem == "deep" else None,
        "stage_blocks": stage_blocks,
        "width": width,
    }
    return params, batch_stats, report


def _torch_shape(flax_path, shape):
    return (shape[3], shape[2], shape[0], shape[1]) if flax_path[-1] == "kernel" else shape


def _raise_if_mismatched(unused, missing, misshaped, what):
    if not (unused or missing or misshaped):
        return
    lines = [f"weights do not fit the backbone ({what}):"]
    if unused:
        lines.append(f"  {len(unused)} unused keys in the file: {', '.join(unused)}")
    if missing:
        lines.append(f"  {len(missing)} keys missing from the file: {', '.join(missing)}")
    if misshaped:
        lines.append(f"  {len(misshaped)} keys with the wrong shape: " + "; ".join(sorted(misshaped)))
    raise WeightsMismatchError("\n".join(lines))


def load_backbone_weights(
    path: str,
    *,
    stem: Optional[str],
    stage_blocks: Optional[Sequence[int]],
    width: Optional[int] = None,
) -> Tuple[Tree, Tree]:
    """Backbone ``(params, batch_stats)`` flax trees from a source or converted weights file (see module docstring).

    ``stem`` and ``stage_blocks`` are the model's (config.model); ``None`` takes them from the file. A file whose
    layout differs from the model's raises `WeightsMismatchError` naming the keys.
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            if FLAX_MARKER in f.files:
                return _load_converted(path, {k: f[k] for k in f.files}, stem, stage_blocks, width)
    params, batch_stats, _ = convert_state_dict(
        read_state_dict(path), stem=stem, stage_blocks=stage_blocks, width=width
    )
    return params, batch_stats


def load_backbone_weights_for(model_config) -> Tuple[Tree, Tree]:
    """`load_backbone_weights` of ``model_config.pretrained`` with the stem, blocks and width of that ``model``
    config section (``stage_blocks`` empty means those of ``depth``)."""
    from stpg_jax.models.resnet import STAGE_BLOCKS

    if not model_config.pretrained:
        raise ValueError("config.model.pretrained is empty: no backbone weights to load")
    stage_blocks = tuple(model_config.stage_blocks) or STAGE_BLOCKS[model_config.depth]
    return load_backbone_weights(
        model_config.pretrained, stem=model_config.stem, stage_blocks=stage_blocks, width=model_config.width
    )


def save_converted(path: str, params: Tree, batch_stats: Tree, *, stem: str, stage_blocks, width: int, source=""):
    """Writes the converted ``.npz`` (flax paths + ``'__flax__'`` metadata) that `load_backbone_weights` reads."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"converted weights are written as .npz, got {path!r}")
    meta = {
        "format_version": FORMAT_VERSION,
        "stem": stem,
        "stage_blocks": list(stage_blocks),
        "width": int(width),
        "source": os.path.basename(source),
    }
    arrays = {"/".join(k): np.asarray(v, np.float32)
              for k, v in traverse_util.flatten_dict({"params": params, "batch_stats": batch_stats}).items()}
    arrays[FLAX_MARKER] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def _load_converted(path, arrays, stem, stage_blocks, width) -> Tuple[Tree, Tree]:
    meta = json.loads(str(arrays.pop(FLAX_MARKER)))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: converted-weights format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    stem = stem or meta["stem"]
    stage_blocks = tuple(stage_blocks) if stage_blocks else tuple(meta["stage_blocks"])
    width = width or meta["width"]
    shapes = traverse_util.flatten_dict(expected_shapes(stem, stage_blocks, width))
    got = {tuple(k.split("/")): v for k, v in arrays.items()}
    unused = sorted("/".join(k) for k in got if k not in shapes)
    missing = sorted("/".join(k) for k in shapes if k not in got)
    misshaped = [
        f"{'/'.join(k)}: file {got[k].shape}, model needs {shapes[k]}"
        for k in sorted(set(got) & set(shapes))
        if got[k].shape != shapes[k]
    ]
    what = f"stem={stem!r}, stage_blocks={stage_blocks}, width={width}; file made for {meta['stem']!r}, " \
           f"{tuple(meta['stage_blocks'])}, width {meta['width']}"
    _raise_if_mismatched(unused, missing, misshaped, what)
    variables = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in got.items()})
    params, batch_stats = variables.get("params", {}), variables.get("batch_stats", {})
    return params, batch_stats


# ----------------------------------------------------------------------------------------------------------------
# Into a DeepLabV3+ variables dict


def merge_backbone(variables: Mapping[str, Any], params: Tree, batch_stats: Tree) -> Dict[str, Any]:
    """Returns a copy of DeepLabV3+ ``variables`` whose ``'backbone'`` subtrees are ``params``/``batch_stats``.

    The heads keep their values. Any difference in tree structure, shape or a missing ``'backbone'`` raises
    `WeightsMismatchError` listing the paths; leaves take the dtype of the leaves they replace.
    """
    import jax.numpy as jnp

    out = {k: v for k, v in variables.items()}
    problems = []
    for collection, new in (("params", params), ("batch_stats", batch_stats)):
        tree = variables.get(collection)
        if not isinstance(tree, Mapping) or "backbone" not in tree:
            problems.append(f"variables[{collection!r}] has no 'backbone' subtree")
            continue
        old = traverse_util.flatten_dict(tree["backbone"])
        new = traverse_util.flatten_dict(new)
        for k in sorted(set(old) - set(new)):
            problems.append(f"{collection}/backbone/{'/'.join(k)}: not in the loaded weights")
        for k in sorted(set(new) - set(old)):
            problems.append(f"{collection}/backbone/{'/'.join(k)}: not in the model")
        for k in sorted(set(old) & set(new)):
            if tuple(np.shape(old[k])) != tuple(np.shape(new[k])):
                problems.append(
                    f"{collection}/backbone/{'/'.join(k)}: model {np.shape(old[k])}, weights {np.shape(new[k])}"
                )
        merged = {k: jnp.asarray(new[k], dtype=old[k].dtype) for k in old if k in new}
        out[collection] = {**tree, "backbone": traverse_util.unflatten_dict(merged)}
    if problems:
        raise WeightsMismatchError("backbone weights do not fit the model:\n  " + "\n  ".join(problems))
    return out


@contextlib.contextmanager
def reading_weights(path: str, field: str):
    """Turns a weights file that numpy, zipfile or torch cannot read (random bytes, a truncated archive, a pickle of
    more than tensors, which torch's weights_only loading refuses for safety) into a WeightsMismatchError naming
    the file and the ``field`` or argument that gave it. A file that reads but does not fit keeps its own message."""
    import pickle
    import zipfile

    try:
        yield
    except WeightsMismatchError:
        raise
    except ImportError as error:  # a .pth file without PyTorch installed: the message says what to do
        raise WeightsMismatchError(f"{error}, {field} = {path!r}, expected PyTorch or an .npz file") from error
    except (ValueError, OSError, EOFError, KeyError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        if isinstance(error, FileNotFoundError):
            reason = "no such file"
        elif isinstance(error, pickle.UnpicklingError):
            reason = "torch's safe loading refused it: not a plain state dict of tensors, or not a torch file"
        elif "pickle" in str(error):
            reason = "not an .npz archive, and unpickling it is refused for safety"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise WeightsMismatchError(
            f"not a usable weights file ({reason}), {field} = {path!r}, expected a .pth/.npz state dict of an "
            "ImageNet ResNet or a file written by python -m stpg_jax.convert_weights") from error
