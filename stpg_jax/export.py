"""A trained Gen-Student as one self-contained directory, readable without the training state.

Layout of ``out_dir``::

    model.json    format version, the config's ``model`` section, num_classes, dataset name, class names and the
                  evaluation protocol (window side, stride rate)
    variables/    Orbax checkpoint of {'params', 'batch_stats'}, float32

    model, variables, meta = stpg_jax.export.load_model(out_dir)
    logits = model.apply(variables, images_uint8, train=False)['logits']  # (B, H, W, 3) RGB; normalised inside
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from stpg_jax.checkpoint import CheckpointError, read_json, reading, this_process_options
from stpg_jax.recipe import model_from_config

FORMAT_VERSION = 1
META_FILE = "model.json"
VARIABLES_DIR = "variables"
COLLECTIONS = ("params", "batch_stats")


def _plain(value):
    """ConfigDict / tuples → JSON-ready dicts and lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def export_model(
    out_dir: str,
    *,
    model_config,
    num_classes: int,
    dataset_name: str,
    class_names: Sequence[str],
    variables: Mapping[str, Any],
    eval_window: int,
    eval_stride_rate: float = 2 / 3,
    eval_flip: bool = False,
    overwrite: bool = False,
) -> str:
    """Writes the Gen-Student ``variables`` and its model config to ``out_dir``; returns the absolute path.

    ``model_config`` is the config's ``model`` section (ConfigDict or dict). A non-empty ``out_dir`` is refused
    unless ``overwrite``, which replaces it.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out_dir)
    missing = [c for c in COLLECTIONS if c not in variables]
    if missing:
        raise ValueError(f"variables lack {missing}; expected the collections {list(COLLECTIONS)}")
    class_names = list(class_names)
    if class_names and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")

    model_dict = _plain(model_config)
    model_dict["pretrained"] = ""  # the exported weights are complete; no ImageNet file is needed
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_dict,
        "num_classes": int(num_classes),
        "dataset_name": dataset_name,
        "class_names": class_names,
        "eval_window": int(eval_window),
        "eval_stride_rate": float(eval_stride_rate),
        "eval_flip": bool(eval_flip),
    }
    # Fail before writing anything if the variables do not fit the model the config describes.
    model = _build_model(meta)
    _check_structure(_abstract_variables(model), variables)

    import orbax.checkpoint as ocp

    os.makedirs(out_dir, exist_ok=True)
    tree = {c: jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), _to_dict(variables[c]))
            for c in COLLECTIONS}
    # Written by the calling process alone: in a multi-process run only process 0 exports, and Orbax would otherwise
    # wait at a barrier for the others.
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process_options())
    checkpointer.save(os.path.join(out_dir, VARIABLES_DIR), tree)
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def read_meta(path: str) -> dict:
    file = os.path.join(os.fspath(path), META_FILE)
    meta = read_json(file, "the export's description")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"export format {version}, {file}, expected format {FORMAT_VERSION} (written by "
                              "stpg_jax.export.export_model)")
    return meta


def load_model(path: str) -> Tuple[Any, dict, dict]:
    """``(model, variables, meta)`` of an exported Gen-Student; ``meta`` is the content of ``model.json``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not is_export(path):
        raise FileNotFoundError(f"{path} has no {META_FILE}: not a directory written by export_model")
    meta = read_meta(path)
    model = _build_model(meta)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), _abstract_variables(model)
    )
    with reading(path, VARIABLES_DIR):  # a truncated or missing file: one CheckpointError naming the export
        variables = ocp.StandardCheckpointer().restore(os.path.join(path, VARIABLES_DIR), target)
    return model, dict(variables), meta


def _build_model(meta: dict):
    return model_from_config(ml_collections.ConfigDict(meta["model"]), meta["num_classes"])


def _abstract_variables(model) -> dict:
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return {c: _to_dict(shapes[c]) for c in COLLECTIONS}


def _to_dict(tree):
    return {k: _to_dict(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _check_structure(abstract: Mapping, variables: Mapping) -> None:
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {
        jax.tree_util.keystr(p): tuple(np.shape(v))
        for p, v in jax.tree_util.tree_leaves_with_path({c: _to_dict(variables[c]) for c in COLLECTIONS})
    }
    problems = [f"{k}: not in the variables" for k in sorted(set(want) - set(got))]
    problems += [f"{k}: not in the model" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: model {want[k]}, variables {got[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if problems:
        raise ValueError("variables do not fit the model config:\n  " + "\n  ".join(problems))
