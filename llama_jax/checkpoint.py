"""Checkpoint I/O: one on-disk format for the converter, the trainer, generation and export.

A checkpoint is a folder `path/` holding `config.json` (LlamaConfig.to_dict() plus
{"format": "llama_jax", "version": 1}) and `params/`, an Orbax PyTree checkpoint of the params
tree. A training run folder (numeric step folders from an Orbax CheckpointManager, each with an
item "params", plus `config.json` at the top) loads its newest complete step.

`StreamingWriter` writes the same Orbax layout leaf by leaf and slice by slice with TensorStore
(zarr, one chunk per layer), so the converter never holds more than one tensor in memory;
Orbax (and `load_checkpoint`) read it like any other PyTree checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.model import check_params, param_shapes

FORMAT = {"format": "llama_jax", "version": 1}


# --- paths: local folders are written to a temporary sibling and renamed; URLs are written in place


def is_remote(path: str) -> bool:
    """gs://, s3://, ... destinations: TensorStore/epath write them directly (no atomic rename)."""
    return "://" in str(path)


def _join(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


def _kvstore(path: str) -> dict | str:
    """A TensorStore kvstore spec for a folder (local path or URL)."""
    if is_remote(path):
        return str(path).rstrip("/") + "/"
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def write_text(path: str, text: str) -> None:
    """Write a small text file, locally via a temporary sibling and a rename (atomic), or to a URL."""
    if is_remote(path):
        folder, name = str(path).rsplit("/", 1)
        ts.KvStore.open(_kvstore(folder)).result().write(name, text.encode()).result()
    else:  # a temporary sibling, then rename: a reader never sees half a file
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def _read_text(path: str) -> str | None:
    if is_remote(path):
        folder, name = str(path).rsplit("/", 1)
        result = ts.KvStore.open(_kvstore(folder)).result().read(name).result()
        return result.value.decode() if result.state == "value" else None
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def _barrier(name: str) -> None:
    """Wait for every process of a multi-host job (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Staging:
    """Write into a temporary sibling of `out`; `commit()` renames it to `out` when complete.

    An existing `out` is only replaced with overwrite=True (and only at commit). URL destinations
    are written in place: there is no rename on object stores, so config.json is written last.
    In a multi-host job every process writes its shards into the same sibling and process 0
    alone creates and renames it, between barriers.
    """

    def __init__(self, out: str, overwrite: bool = False):
        self.out = str(out)
        self.main = jax.process_index() == 0
        if is_remote(self.out):
            self.path = self.out
            return
        self.out = os.path.abspath(self.out)
        if os.path.exists(self.out) and not overwrite:
            raise FileExistsError(f"{self.out} already exists; pass overwrite=True (--overwrite) to replace it")
        os.makedirs(os.path.dirname(self.out), exist_ok=True)  # like mkdir -p: "out/llama2-7b" just works
        shared = jax.process_count() > 1  # every process must name the same folder
        self.path = f"{self.out}.tmp-{'multihost' if shared else os.getpid()}"
        if self.main:
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path)
        _barrier(f"staging {self.path}")

    def commit(self) -> None:
        if is_remote(self.out):
            return
        _barrier(f"written {self.path}")
        if self.main:
            _fsync_tree(self.path)  # every byte on disk before the name says the checkpoint is complete
            if os.path.exists(self.out):
                old = f"{self.out}.old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.path, self.out)
                shutil.rmtree(old)
            else:
                os.rename(self.path, self.out)
        _barrier(f"committed {self.out}")

    def abort(self) -> None:
        if not is_remote(self.out) and self.main:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_config(folder: str, cfg: LlamaConfig) -> None:
    write_text(_join(folder, "config.json"), json.dumps({**cfg.to_dict(), **FORMAT}, indent=2))


def read_config(folder: str) -> LlamaConfig:
    text = _read_text(_join(folder, "config.json"))
    if text is None:
        raise FileNotFoundError(f"{folder}: no config.json; expected a llama_jax checkpoint "
                                "(config.json + params/) or a training run folder")
    d = json.loads(text)
    if d.get("format") != FORMAT["format"]:
        raise ValueError(f"{_join(folder, 'config.json')}: format is {d.get('format')!r}, expected 'llama_jax' "
                         "(a Hugging Face folder? convert it with `python -m llama_jax.convert hf`)")
    if d.get("version") != FORMAT["version"]:
        raise ValueError(f"{_join(folder, 'config.json')}: version {d.get('version')!r}, expected {FORMAT['version']}")
    return LlamaConfig.from_dict({k: v for k, v in d.items() if k not in FORMAT})


# --- saving ----------------------------------------------------------------------------------


def save_checkpoint(path: str, cfg: LlamaConfig, params: Any, overwrite: bool = False) -> None:
    """Write `path/config.json` + `path/params/` (Orbax PyTree), via a temporary sibling."""
    check_params(params, cfg, f"save_checkpoint({path})")
    with Staging(path, overwrite) as stage:
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(_join(stage.path, "params"), args=ocp.args.PyTreeSave(params))  # every process: its shards
        if stage.main:
            write_config(stage.path, cfg)


def _leaf_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(k.key for k in keys), leaf) for keys, leaf in flat]


class StreamingWriter:
    """Writes an Orbax PyTree checkpoint (non-OCDBT zarr layout) one slice at a time.

    The layout is exactly what Orbax 0.12's PyTreeCheckpointHandler(use_ocdbt=False) writes for
    numpy leaves: one zarr v2 array per leaf in a folder named by the dotted tree path, and a
    `_METADATA` file describing the tree. Stacked leaves get one chunk per layer, so writing a
    layer touches only its own chunk file and a sharded restore reads only what it needs.
    """

    def __init__(self, params_dir: str, cfg: LlamaConfig, dtype: str):
        self.dir, self.cfg, self.dtype = str(params_dir), cfg, dtype
        self.shapes = {path: s.shape for path, s in _leaf_paths(param_shapes(cfg))}
        self.arrays: dict[tuple[str, ...], Any] = {}
        self.lock = threading.Lock()  # write() is called from several threads
        # No fsync per chunk file: Staging.commit() syncs the whole folder once before the rename.
        self.context = ts.Context({"file_io_concurrency": {"limit": 8}, "file_io_sync": False})

    def open(self, path: tuple[str, ...]) -> Any:
        with self.lock:
            if path not in self.arrays:
                shape = self.shapes[path]
                chunks = (1, *shape[1:]) if path[0] == "layers" else shape
                spec = {
                    "driver": "zarr",
                    "kvstore": _kvstore(_join(self.dir, ".".join(path))),
                    "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": _zarr_dtype(self.dtype),
                                 "compressor": None, "fill_value": None, "order": "C", "dimension_separator": "."},
                }
                self.arrays[path] = ts.open(spec, create=True, open=False, context=self.context).result()
            return self.arrays[path]

    def write(self, path: tuple[str, ...], layer: int | None, value: np.ndarray, donate: bool = False) -> None:
        """Write one full leaf (layer None) or one layer's slice; returns once it is written.

        Thread-safe: the converter keeps a few of these in flight so reading, transposing and
        writing overlap. `value` should be C-contiguous in the checkpoint's dtype (else copied).
        donate=True: nothing else uses or changes `value`, so TensorStore may write it without
        copying it first.
        """
        array = self.open(path)
        target = array if layer is None else array[layer]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{'/'.join(path)}: got shape {value.shape}, expected {tuple(target.shape)}")
        array = np.ascontiguousarray(value, dtype=DTYPES[self.dtype])
        target.write(array, can_reference_source_data_indefinitely=donate or array is not value).result()

    def finish(self) -> None:
        """Check every leaf was written, then write Orbax's metadata files."""
        missing = [".".join(p) for p in self.shapes if p not in self.arrays]
        if missing:
            raise ValueError(f"no tensors were written for {missing}")
        tree = {str(path): {"key_metadata": [{"key": k, "key_type": 2} for k in path],
                            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                for path in self.shapes}
        meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        write_text(_join(self.dir, "_METADATA"), json.dumps(meta))
        now = time.time_ns()
        write_text(_join(self.dir, "_CHECKPOINT_METADATA"), json.dumps({
            "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now, "custom_metadata": {}}))


def _zarr_dtype(dtype: str) -> str:
    return {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16"}[dtype]


# --- loading ---------------------------------------------------------------------------------


class _SkipKnownOrbaxNoise(logging.Filter):
    """Orbax warns that a CheckpointManager's "params" item has no _CHECKPOINT_METADATA of its own,
    and, per tensor, that a ParamInfo has no TensorStore context: both expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Metadata file does not exist" not in message and "ts_context=None" not in message


@contextlib.contextmanager
def _quiet_orbax():
    quiet = _SkipKnownOrbaxNoise()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _params_dir(path: str) -> str:
    """`path/params`, or the newest complete step's params of a training run folder."""
    params = _join(path, "params")
    if _read_text(_join(params, "_METADATA")) is not None:
        return params
    if is_remote(path):
        raise FileNotFoundError(f"{path}: no params/_METADATA; expected a llama_jax checkpoint")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: {'not a folder' if os.path.exists(path) else 'no such checkpoint folder'}")
    steps = sorted((int(name) for name in os.listdir(path) if name.isdigit()
                    and os.path.isfile(os.path.join(path, name, "params", "_METADATA"))), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{path}: neither a checkpoint (params/ with an Orbax _METADATA) nor a training "
                                "run folder (numeric step folders holding params/)")
    return os.path.join(path, str(steps[0]), "params")


def load_checkpoint(path: str, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None) -> tuple[LlamaConfig, Any]:
    """Load (cfg, params) from a checkpoint or a training run folder (its newest complete step).

    mesh: restore every leaf straight into its NamedSharding from the logical-axis rules (each
    host reads only its shards). dtype: "bfloat16"/"float32" casts the params (and cfg.param_dtype).
    """
    path = str(path) if is_remote(path) else os.path.abspath(path)  # Orbax misreads relative paths
    params_dir = _params_dir(path)
    cfg = read_config(path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        cfg = cfg.replace(param_dtype=dtype)
    shapes = param_shapes(cfg)
    with ocp.PyTreeCheckpointer() as ckptr, _quiet_orbax():
        stored = ckptr.metadata(params_dir)
        stored = getattr(stored, "item_metadata", stored)
        stored = {path: tuple(m.shape) for path, m in _leaf_paths(dict(stored))}
        expected = {path: s.shape for path, s in _leaf_paths(shapes)}
        if stored != expected:
            diff = sorted(set(stored.items()) ^ set(expected.items()))[:4]
            raise ValueError(f"{params_dir}: stored params do not match config.json's model "
                             f"(differences as (leaf, shape), stored vs expected: {diff})")
        cast = None if dtype is None else DTYPES[dtype]
        if mesh is not None:
            from sharding.rules import param_shardings

            args = jax.tree.map(lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape, dtype=cast),
                                shapes, param_shardings(cfg, mesh))
        else:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=device, global_shape=s.shape, dtype=cast),
                                shapes)
        params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=shapes, restore_args=args))
    return cfg, params


def open_checkpoint(path: str) -> tuple[LlamaConfig, dict[tuple[str, ...], Any]]:
    """(cfg, {leaf path: TensorStore}) of a checkpoint or run folder; no weights are read yet.

    For consumers that stream (export-hf): `leaves["layers", "attention", "wq"][i].read().result()`
    reads one layer's slice, so memory stays at one slice whatever the model size. Works for the
    converter's zarr layout and for Orbax's default OCDBT checkpoints (save_checkpoint, trainer).
    """
    from etils import epath

    path = str(path) if is_remote(path) else os.path.abspath(path)  # Orbax misreads relative paths
    params_dir = _params_dir(path)
    cfg = read_config(path)
    meta = json.loads(_read_text(_join(params_dir, "_METADATA")))
    use_ocdbt, use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    leaves = {}
    for leaf, shape in _leaf_paths(param_shapes(cfg)):
        name = ".".join(leaf)
        with _quiet_orbax():
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(params_dir),
                                               is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            store = ts.open(spec, context=context).result()
        except ValueError as e:
            raise ValueError(f"{params_dir}: cannot open parameter {name}: {e}") from None
        if tuple(store.shape) != tuple(shape.shape):
            raise ValueError(f"{params_dir}: parameter {name} has shape {tuple(store.shape)}, config.json's model "
                             f"expects {tuple(shape.shape)}")
        leaves[leaf] = store
    return cfg, leaves
