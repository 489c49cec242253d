"""Preference pairs in memory: records (llama_jax/preference.py schemas) -> pair rows -> batches.

A pair row holds the chosen and the rejected sequence side by side: "tokens", "loss_mask",
"segment_ids", "positions" are (N, 2, max_len + 1) int32 ([:, 0] chosen, [:, 1] rejected, each
right-padded like train/data/rows.py's `pad_rows`), "margin" (N,) float32, and once the reference
model has scored them (DPO, train/objectives.py) "reference" (N, 2) float32. Pairs keep their file
order, so row i is pair i; `Batches(rows, ..., to_batch=pair_batch)` draws them per epoch as for SFT,
and `pair_batch` gives the step (B, 2, T) inputs/targets/weights (model_batch on each sequence).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llama_jax.preference import Pair, pair_of, pair_sequences
from llama_jax.tokenizer import Tokenizer
from train.data import storage
from train.data.formats import iter_records
from train.data.rows import Rows, model_batch, pad_rows

PAIR_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


def read_pairs(paths: Sequence[str], margin_key: str = "margin") -> list[tuple[str, Pair]]:
    """(where, Pair) of every record of the files (globs, folders, hf:NAME, as train/data/formats.py reads)."""
    return [(where, pair_of(record, where, margin_key)) for path in storage.expand(paths)
            for where, record in iter_records(path)]


def build_pair_rows(paths: Sequence[str], tokenizer: Tokenizer, max_len: int, template: str = "chat",
                    margin_key: str = "margin") -> tuple[Rows, dict]:
    """The pair-row table of preference files and a summary (examples, truncated: prompts cut to fit,
    skipped: an answer longer than max_len - 1, rows, row_len, targets: answer tokens of both sides)."""
    chosen, rejected, margins = [], [], []
    truncated = skipped = examples = 0
    for where, pair in read_pairs(paths, margin_key):
        examples += 1
        sequences = pair_sequences(tokenizer, pair, template, max_len, where)
        if sequences is None:
            skipped += 1
            continue
        c, r, cut = sequences
        truncated += cut
        chosen.append(c)
        rejected.append(r)
        margins.append(pair.margin)
    if not chosen:
        raise ValueError(f"no preference pairs in {list(paths)}" + (f" ({skipped} skipped: an answer longer than "
                                                                   f"max_len {max_len} - 1)" if skipped else ""))
    row_len = max_len + 1
    sides = pad_rows(chosen, row_len), pad_rows(rejected, row_len)
    rows = {k: np.stack([sides[0][k], sides[1][k]], axis=1) for k in PAIR_KEYS}
    rows["margin"] = np.asarray(margins, np.float32)
    summary = {"examples": examples, "truncated": truncated, "skipped": skipped, "rows": len(chosen),
               "row_len": row_len, "targets": int(pair_batch(rows)["weights"].sum())}
    return rows, summary


def pair_batch(rows: Rows) -> dict[str, Any]:
    """Pair rows (n, 2, T+1) -> the step's (n, 2, T) tokens/targets/weights/positions/segment_ids, plus
    margin (n,) and, when present, reference (n, 2)."""
    n, _, row_len = rows["tokens"].shape
    flat = model_batch({k: rows[k].reshape(2 * n, row_len) for k in PAIR_KEYS})
    batch = {k: v.reshape(n, 2, row_len - 1) for k, v in flat.items()}
    batch["margin"] = rows["margin"]
    if "reference" in rows:
        batch["reference"] = rows["reference"]
    return batch
