"""The llama_jax checkpoint format: `path/config.json` + `path/params/` (an Orbax PyTree of the
params), or a training run folder (its newest complete step); saving, loading, opening leaf by leaf."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from llama_jax.checkpoint.files import Staging, is_remote, join, read_text, write_text
from llama_jax.checkpoint.orbax_glue import leaf_paths, open_leaves, restore_pytree, save_pytree, stored_shapes
from llama_jax.checkpoint.runs import complete_steps
from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.model import check_params, param_shapes
from sharding import param_shardings

FORMAT = {"format": "llama_jax", "version": 1}


def write_config(folder: str, cfg: LlamaConfig) -> None:
    write_text(join(folder, "config.json"), json.dumps({**cfg.to_dict(), **FORMAT}, indent=2))


def read_config(folder: str) -> LlamaConfig:
    text = read_text(join(folder, "config.json"))
    if text is None:
        raise FileNotFoundError(f"{folder}: no config.json; expected a llama_jax checkpoint "
                                "(config.json + params/) or a training run folder")
    d = json.loads(text)
    if d.get("format") != FORMAT["format"]:
        raise ValueError(f"{join(folder, 'config.json')}: format is {d.get('format')!r}, expected 'llama_jax' "
                         "(a Hugging Face folder? convert it with `python -m llama_jax.convert hf`)")
    if d.get("version") != FORMAT["version"]:
        raise ValueError(f"{join(folder, 'config.json')}: version {d.get('version')!r}, expected {FORMAT['version']}")
    return LlamaConfig.from_dict({k: v for k, v in d.items() if k not in FORMAT})


def checkpoint_tokenizer(path: str) -> str | None:
    """The tokenizer.model a checkpoint or run folder carries (the converter and the trainer copy it there)."""
    candidate = join(str(path), "tokenizer.model")
    if is_remote(candidate):
        return candidate if read_text(candidate) is not None else None
    return candidate if os.path.isfile(candidate) else None


def save_checkpoint(path: str, cfg: LlamaConfig, params: Any, overwrite: bool = False) -> None:
    """Write `path/config.json` + `path/params/` (Orbax PyTree), via a temporary sibling."""
    check_params(params, cfg, f"save_checkpoint({path})")
    with Staging(path, overwrite) as stage:
        save_pytree(join(stage.path, "params"), params)
        if stage.main:
            write_config(stage.path, cfg)


def params_dir(path: str) -> str:
    """`path/params`, or the newest complete step's params of a training run folder."""
    params = join(path, "params")
    if read_text(join(params, "_METADATA")) is not None:
        return params
    if is_remote(path):
        raise FileNotFoundError(f"{path}: no params/_METADATA; expected a llama_jax checkpoint")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: {'not a folder' if os.path.exists(path) else 'no such checkpoint folder'}")
    steps = complete_steps(path)
    if not steps:
        raise FileNotFoundError(f"{path}: neither a checkpoint (params/ with an Orbax _METADATA) nor a training "
                                "run folder (numeric step folders holding params/)")
    return os.path.join(path, str(steps[0]), "params")


def _absolute(path: str) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)  # Orbax misreads relative paths


def load_checkpoint(path: str, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None) -> tuple[LlamaConfig, Any]:
    """Load (cfg, params) from a checkpoint or a training run folder (its newest complete step).

    mesh: restore every leaf straight into its NamedSharding from the logical-axis rules (each
    host reads only its shards). dtype: "bfloat16"/"float32" casts the params (and cfg.param_dtype).
    """
    path = _absolute(path)
    folder = params_dir(path)
    cfg = read_config(path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        cfg = cfg.replace(param_dtype=dtype)
    shapes = param_shapes(cfg)
    stored = stored_shapes(folder)
    expected = {leaf: s.shape for leaf, s in leaf_paths(shapes)}
    if stored != expected:
        diff = sorted(set(stored.items()) ^ set(expected.items()))[:4]
        raise ValueError(f"{folder}: stored params do not match config.json's model "
                         f"(differences as (leaf, shape), stored vs expected: {diff})")
    if mesh is not None:
        shardings = param_shardings(cfg, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    params = restore_pytree(folder, shapes, shardings, None if dtype is None else DTYPES[dtype])
    return cfg, params


def open_checkpoint(path: str) -> tuple[LlamaConfig, dict[tuple[str, ...], Any]]:
    """(cfg, {leaf path: TensorStore}) of a checkpoint or run folder; no weights are read yet.

    For consumers that stream (export-hf): `leaves["layers", "attention", "wq"][i].read().result()`
    reads one layer's slice, so memory stays at one slice whatever the model size. Works for the
    converter's zarr layout and for Orbax's default OCDBT checkpoints (save_checkpoint, trainer).
    """
    path = _absolute(path)
    folder = params_dir(path)
    cfg = read_config(path)
    shapes = dict(leaf_paths(param_shapes(cfg)))
    stores = open_leaves(folder, [".".join(leaf) for leaf in shapes])
    leaves = {}
    for leaf, shape in shapes.items():
        store = stores[".".join(leaf)]
        if tuple(store.shape) != tuple(shape.shape):
            raise ValueError(f"{folder}: parameter {'.'.join(leaf)} has shape {tuple(store.shape)}, config.json's "
                             f"model expects {tuple(shape.shape)}")
        leaves[leaf] = store
    return cfg, leaves
