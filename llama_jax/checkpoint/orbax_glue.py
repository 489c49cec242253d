"""Everything that knows Orbax's internals, in one shim: its on-disk PyTree layout (written by hand
for streaming), its per-leaf TensorStore specs, and the restore calls (an Orbax upgrade is mended here)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from llama_jax.checkpoint.files import join, kvstore, read_text, write_text
from llama_jax.checkpoint.integrity import digest
from llama_jax.config import DTYPES

ZARR_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16"}


def leaf_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """[(("layers", "attention", "wq"), leaf), ...] of a dict tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(k.key for k in keys), leaf) for keys, leaf in flat]


class _SkipKnownOrbaxNoise(logging.Filter):
    """Orbax warns that a CheckpointManager's "params" item has no _CHECKPOINT_METADATA of its own,
    and, per tensor, that a ParamInfo has no TensorStore context: both expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Metadata file does not exist" not in message and "ts_context=None" not in message


class NoOrbaxTracebacks(logging.Filter):
    """Orbax logs a failed background save (a full disk) with a traceback per thread; the error
    itself reaches the caller, so its log lines keep their one-line message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def quiet_orbax():
    quiet = _SkipKnownOrbaxNoise()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(quiet)


# --- writing ---------------------------------------------------------------------------------------


def orbax_path(path: str) -> str:
    """Orbax's paths (etils.epath) know gs:// but not file://, which is a local path."""
    return str(path).removeprefix("file://")


def save_pytree(params_dir: str, tree: Any) -> None:
    """Orbax's PyTree checkpoint of `tree` at `params_dir` (every process writes its own shards)."""
    params_dir = orbax_path(params_dir)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(params_dir, args=ocp.args.PyTreeSave(tree))


class StreamingWriter:
    """Writes an Orbax PyTree checkpoint (non-OCDBT zarr layout) one slice at a time.

    The layout is exactly what Orbax 0.12's PyTreeCheckpointHandler(use_ocdbt=False) writes for
    numpy leaves: one zarr v2 array per leaf in a folder named by the dotted tree path, and a
    `_METADATA` file describing the tree. Stacked leaves get one chunk per layer, so writing a
    layer touches only its own chunk file and a sharded restore reads only what it needs.
    Chunks are uncompressed, so a chunk file holds exactly the bytes written: `digests` records
    each file's checksum from memory ({"leaf.name/chunk key": digest}, for checksums.json).
    """

    def __init__(self, params_dir: str, shapes: dict[tuple[str, ...], tuple[int, ...]], dtype: str):
        self.dir, self.shapes, self.dtype = str(params_dir), shapes, dtype
        self.arrays: dict[tuple[str, ...], Any] = {}
        self.digests: dict[str, str] = {}
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
                    "kvstore": kvstore(join(self.dir, ".".join(path))),
                    "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": ZARR_DTYPES[self.dtype],
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
        chunk = ".".join(([] if layer is None else [str(layer)]) + ["0"] * len(target.shape))  # zarr v2 key
        self.digests[f"{'.'.join(path)}/{chunk}"] = digest(array.reshape(-1).view(np.uint8).data)
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
        write_text(join(self.dir, "_METADATA"), json.dumps(meta))
        now = time.time_ns()
        write_text(join(self.dir, "_CHECKPOINT_METADATA"), json.dumps({
            "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now, "custom_metadata": {}}))


# --- reading ---------------------------------------------------------------------------------------


def stored_arrays(params_dir: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """{leaf path: (shape, dtype name)} of a PyTree checkpoint, from its metadata (no array is read)."""
    try:
        with ocp.PyTreeCheckpointer() as ckptr, quiet_orbax():
            stored = ckptr.metadata(orbax_path(params_dir))
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{params_dir}: unreadable checkpoint metadata ({type(e).__name__}: {str(e)[:200]})") from None
    stored = getattr(stored, "item_metadata", stored)
    return {path: (tuple(m.shape), np.dtype(m.dtype).name) for path, m in leaf_paths(dict(stored))}


def restore_pytree(params_dir: str, shapes: Any, shardings: Any, dtype: Any = None) -> Any:
    """The arrays of a PyTree checkpoint, each restored into its sharding (and cast to `dtype`)."""
    args = jax.tree.map(lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape, dtype=dtype),
                        shapes, shardings)
    with ocp.PyTreeCheckpointer() as ckptr, quiet_orbax():
        return ckptr.restore(orbax_path(params_dir), args=ocp.args.PyTreeRestore(item=shapes, restore_args=args))


def open_leaves(params_dir: str, names: list[str]) -> dict[str, Any]:
    """{dotted leaf name: TensorStore} of a PyTree checkpoint (zarr or OCDBT), opened without reading."""
    from etils import epath

    meta = json.loads(read_text(join(params_dir, "_METADATA")))
    use_ocdbt, use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    stores = {}
    for name in names:
        with quiet_orbax():
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(orbax_path(params_dir)),
                                               is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            stores[name] = ts.open(spec, context=context).result()
        except ValueError as e:
            raise ValueError(f"{params_dir}: cannot open parameter {name}: {e}") from None
    return stores
