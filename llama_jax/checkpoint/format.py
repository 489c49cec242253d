"""The llama_jax checkpoint format: `path/config.json` + `path/params/` (an Orbax PyTree of the
params), or a training run folder (its newest complete step); saving, loading, opening leaf by leaf."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from llama_jax.checkpoint.files import Staging, is_remote, join, parse_json, read_text, write_text
from llama_jax.checkpoint.integrity import verify
from llama_jax.checkpoint.orbax_glue import leaf_paths, open_leaves, restore_pytree, save_pytree, stored_arrays
from llama_jax.checkpoint.runs import complete_steps
from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.errors import note
from llama_jax.model import check_params, param_shapes
from sharding import param_shardings

FORMAT = {"format": "llama_jax", "version": 1}


def write_config(folder: str, cfg: LlamaConfig) -> None:
    write_text(join(folder, "config.json"), json.dumps({**cfg.to_dict(), **FORMAT}, indent=2))


def read_config(folder: str) -> LlamaConfig:
    path = join(folder, "config.json")
    text = read_text(path)
    if text is None:
        raise FileNotFoundError(f"{folder}: no config.json; expected a llama_jax checkpoint "
                                "(config.json + params/) or a training run folder")
    d = parse_json(text, path, dict, "a llama_jax model config (a JSON object)")
    if d.get("format") != FORMAT["format"]:
        raise ValueError(f"{path}: format is {d.get('format')!r}, expected 'llama_jax' "
                         "(a Hugging Face folder? convert it with `python -m llama_jax.convert hf`)")
    if d.get("version") != FORMAT["version"]:
        raise ValueError(f"{path}: version {d.get('version')!r}, expected {FORMAT['version']}")
    try:
        return LlamaConfig.from_dict({k: v for k, v in d.items() if k not in FORMAT})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def checkpoint_tokenizer(path: str) -> str | None:
    """The tokenizer.model a checkpoint or run folder carries (the converter and the trainer copy it there)."""
    candidate = join(str(path), "tokenizer.model")
    if is_remote(candidate):
        return candidate if read_text(candidate) is not None else None
    return candidate if os.path.isfile(candidate) else None


def save_checkpoint(path: str, cfg: LlamaConfig, params: Any, overwrite: bool = False) -> None:
    """Write `path/config.json` + `path/params/` (Orbax PyTree) + `checksums.json`, via a temporary
    sibling. config.json records the dtype the arrays have (param_dtype)."""
    check_params(params, cfg, f"save_checkpoint({path})")
    dtypes = {jax.numpy.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"save_checkpoint({path}): params must all have one of {sorted(DTYPES)}, got {sorted(dtypes)}")
    cfg = cfg.replace(param_dtype=dtypes.pop())
    with Staging(path, overwrite) as stage:
        save_pytree(join(stage.path, "params"), params)
        if stage.main:
            write_config(stage.path, cfg)


def params_dir(path: str) -> str:
    """`path/params`, or the newest complete step's params of a training run folder."""
    params = join(path, "params")
    if is_remote(path):
        if read_text(join(params, "_METADATA")) is None:
            raise FileNotFoundError(f"{path}: no params/_METADATA; expected a llama_jax checkpoint")
        return params
    if os.path.isfile(os.path.join(params, "_METADATA")):
        return params
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: {'not a folder' if os.path.exists(path) else 'no such checkpoint folder'}")
    steps = complete_steps(path)
    if not steps:
        if os.path.isfile(os.path.join(path, "config.json")):
            read_config(path)  # says so when it is another format's (a Hugging Face folder)
        raise FileNotFoundError(f"{path}: neither a checkpoint (params/ with an Orbax _METADATA) nor a training "
                                "run folder (numeric step folders holding params/)")
    return os.path.join(path, str(steps[0]), "params")


def check_params_dir(folder: str, cfg: LlamaConfig) -> None:
    """Check a params folder's files against the checksums written at save and its stored shapes
    and dtypes against config.json's model: a damaged or edited checkpoint never loads."""
    if not is_remote(folder):
        saved_as = os.path.dirname(folder)  # the checkpoint, or the run's step folder
        if not verify(saved_as, under=("params/",)):
            note(f"{saved_as} has no checksums.json (saved before llama_jax wrote checksums): loaded unverified")
    stored = stored_arrays(folder)
    expected = {leaf: (s.shape, cfg.param_dtype) for leaf, s in leaf_paths(param_shapes(cfg))}
    if stored != expected:
        diff = [f"{'.'.join(leaf)} stored {stored.get(leaf, 'missing')}, expected {expected.get(leaf, 'none')}"
                for leaf in sorted(set(stored) | set(expected)) if stored.get(leaf) != expected.get(leaf)]
        raise ValueError(f"{folder}: stored params do not match config.json's model (as (shape, dtype): "
                         f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''})")


def _absolute(path: str) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)  # Orbax misreads relative paths


def load_checkpoint(path: str, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None) -> tuple[LlamaConfig, Any]:
    """Load (cfg, params) from a checkpoint or a training run folder (its newest complete step).

    mesh: restore every leaf straight into its NamedSharding from the logical-axis rules (each
    host reads only its shards). dtype: "bfloat16"/"float32" casts the params (and cfg.param_dtype).
    """
    path = _absolute(path)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    folder = params_dir(path)
    cfg = read_config(path)
    check_params_dir(folder, cfg)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    shapes = param_shapes(cfg)
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
    check_params_dir(folder, cfg)
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
