"""DPO's reference log-probs: scored once over every pair row before training, kept in the run folder.

Why precomputed rather than a reference model beside the policy: the reference is the model training
starts from, so its log-probs of the (fixed) training pairs never change. One forward pass over the
data before step 1 replaces a second forward in every step (a third of a step's compute, forever) and
a second copy of the weights in memory (full fine-tuning could not share them); it works the same
for full fine-tuning, LoRA and QLoRA (for LoRA the frozen base is the reference: its adapters start at
zero). The numbers are stored in `output_dir/reference_logps.npz` (written before the first step,
atomically), so a resumed run, after kill -9 or on another mesh, trains on exactly the same targets;
the file also records a fingerprint of the rows it scored, and rows that no longer match are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.checkpoint.files import read_bytes, write_bytes
from sharding import global_batch, is_main_process
from train.data.pairs import PAIR_KEYS, pair_batch

FILE = "reference_logps.npz"


def fingerprint(rows: dict) -> str:
    """sha256 of a pair-row table's token and mask arrays: which pairs, in which order."""
    digest = hashlib.sha256()
    for key in ("tokens", "loss_mask"):
        digest.update(np.ascontiguousarray(rows[key]).tobytes())
    return digest.hexdigest()


def score_rows(reference_fn: Callable, params: Any, rows: dict, batch_size: int, mesh: Mesh) -> np.ndarray:
    """(N, 2) float32 reference log-probs of every pair row, in order: global batches of batch_size rows
    (the last one padded), each host giving its slice; the results are replicated on every host."""
    n = len(rows["tokens"])
    local = batch_size // jax.process_count()
    out = []
    for start in range(0, n, batch_size):
        index = start + jax.process_index() * local + np.arange(local)
        chunk = {k: np.zeros((local,) + rows[k].shape[1:], rows[k].dtype) for k in (*PAIR_KEYS, "margin")}
        for k in chunk:
            chunk[k][index < n] = rows[k][index[index < n]]
        out.append(jax.device_get(reference_fn(params, global_batch(pair_batch(chunk), mesh))))
    return np.concatenate(out)[:n].astype(np.float32)


def save(output_dir: str, scores: dict[str, np.ndarray], tables: dict[str, dict]) -> None:
    """Write the scores of each row table ("train", "eval") with the tables' fingerprints (main process)."""
    if not is_main_process():
        return
    buffer = io.BytesIO()
    np.savez(buffer, **scores, **{f"{name}_fingerprint": np.asarray(fingerprint(t)) for name, t in tables.items()})
    write_bytes(os.path.join(output_dir, FILE), buffer.getvalue())


def load(output_dir: str, tables: dict[str, dict]) -> dict[str, np.ndarray] | None:
    """The stored scores of each table, or None when the file is absent. Refuses a file that scored other
    rows (the data changed since the run started) or that cannot be read."""
    path = os.path.join(output_dir, FILE)
    data = read_bytes(path)
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data)) as stored:
            arrays = {k: stored[k] for k in stored.files}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to score the reference again from the run's "
                         "starting model") from None
    out = {}
    for name, rows in tables.items():
        if name not in arrays or str(arrays.get(f"{name}_fingerprint")) != fingerprint(rows):
            raise ValueError(f"{path}: its reference log-probs were computed on other {name} pairs than the data "
                             "gives now; resume with the run's own data (or use a new output_dir)")
        out[name] = arrays[name].astype(np.float32)
    return out
