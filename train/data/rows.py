"""Rows in memory: examples -> fixed-length rows -> deterministic, resumable, per-host batches.

Examples come from train/data/formats.py (Alpaca, chat, pretraining text). This is the path for
data sets that fit a host's memory; tokenized shards stream instead (train/data/stream.py) with
the same row conventions.

Rows hold `max_len + 1` tokens so the model sees `max_len` inputs (a multiple of 128 stays one).
Packed rows carry segment ids (1, 2, ... per example, 0 = padding) and positions that restart
per example, so attention never crosses examples and each one is computed as if alone.

The order is a pure function of (seed, batch index): batch k of epoch e takes rows
permutation(seed, e)[...]; the data state saved in a checkpoint is just the next batch index, so
a resumed run sees exactly the batches an uninterrupted one would. Each host builds the same row
table and keeps only its slice of every global batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from llama_jax.tokenizer import Tokenizer
from train.data import storage
from train.data.formats import Example, detect_kind, iter_records, record_tokens, truncate

# --- rows ----------------------------------------------------------------------------------

Rows = dict  # "tokens", "loss_mask", "segment_ids", "positions": int32 arrays (N, row_len)


def empty_rows(n: int, row_len: int) -> Rows:
    return {k: np.zeros((n, row_len), np.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}


def pad_rows(examples: Sequence[Example], row_len: int) -> Rows:
    """One example per row, right-padded (segment id 0, no loss)."""
    rows = empty_rows(len(examples), row_len)
    for i, (tokens, mask) in enumerate(examples):
        n = len(tokens)
        if n > row_len:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {row_len}")
        rows["tokens"][i, :n], rows["loss_mask"][i, :n] = tokens, mask
        rows["segment_ids"][i, :n], rows["positions"][i, :n] = 1, np.arange(n)
    return rows


def pack_rows(examples: Sequence[Example], row_len: int) -> Rows:
    """Examples placed greedily in order into rows of `row_len`, each its own segment."""
    placed: list[list[Example]] = [[]]
    used = 0
    for i, ex in enumerate(examples):
        n = len(ex[0])
        if n > row_len:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {row_len}")
        if used + n > row_len:
            placed.append([])
            used = 0
        placed[-1].append(ex)
        used += n
    placed = [p for p in placed if p]
    rows = empty_rows(len(placed), row_len)
    for r, group in enumerate(placed):
        start = 0
        for seg, (tokens, mask) in enumerate(group, 1):
            end = start + len(tokens)
            rows["tokens"][r, start:end], rows["loss_mask"][r, start:end] = tokens, mask
            rows["segment_ids"][r, start:end], rows["positions"][r, start:end] = seg, np.arange(end - start)
            start = end
    return rows


def stream_rows(documents: Sequence[list[int]], row_len: int) -> Rows:
    """Pretraining: documents (BOS..EOS) concatenated and cut into rows of `row_len` that overlap by
    one token, so every token is a target exactly once. A document cut at a row start continues
    there as a new segment with positions restarting at 0 (a long document never exceeds the
    model's context)."""
    tokens = np.concatenate([np.asarray(d, np.int32) for d in documents])
    doc_ids = np.concatenate([np.full(len(d), i + 1, np.int32) for i, d in enumerate(documents)])
    stride = row_len - 1
    n = (len(tokens) - 1) // stride
    if n == 0:
        raise ValueError(f"pretraining data has {len(tokens)} tokens, fewer than one row of {row_len}")
    rows = empty_rows(n, row_len)
    for r in range(n):
        t = tokens[r * stride: r * stride + row_len]
        d = doc_ids[r * stride: r * stride + row_len]
        seg = np.cumsum(np.concatenate([[1], d[1:] != d[:-1]])).astype(np.int32)
        starts = np.flatnonzero(np.concatenate([[True], seg[1:] != seg[:-1]]))
        pos = np.arange(row_len) - starts[seg - 1]
        rows["tokens"][r], rows["segment_ids"][r], rows["positions"][r] = t, seg, pos
        rows["loss_mask"][r] = 1  # a BOS starts a new segment, so model_batch never makes it a target
    return rows


def model_batch(rows: Rows) -> dict[str, np.ndarray]:
    """Rows of length T+1 -> the step's inputs of length T.

    weights[i] = 1 where targets[i] (the next token) is a training target in the same segment.
    """
    seg = rows["segment_ids"]
    same_segment = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {
        "tokens": rows["tokens"][:, :-1],
        "targets": rows["tokens"][:, 1:],
        "weights": (rows["loss_mask"][:, 1:] * same_segment).astype(np.float32),
        "positions": rows["positions"][:, :-1],
        "segment_ids": seg[:, :-1],
    }


def build_rows(fmt: str, paths: Sequence[str], tokenizer: Tokenizer, max_len: int, pack: bool,
               seed: int = 0, text_key: str = "text") -> tuple[Rows, dict]:
    """The row table of a data set (fmt alpaca | chat | pretrain | auto) and a summary (examples,
    truncated and skipped counts, rows, targets). Records with no target left after truncation
    to max_len are skipped."""
    row_len = max_len + 1
    truncated = skipped = 0
    examples: list[Example] = []
    docs: list[list[int]] = []
    for path in storage.expand(paths):
        for where, record in iter_records(path, text_key):
            kind = {"pretrain": "text", "auto": None}.get(fmt, fmt) or detect_kind(record, where, text_key)
            if fmt == "pretrain" or (fmt == "auto" and kind == "text"):
                docs.append(record_tokens(tokenizer, "text", record, where, text_key)[0])
                continue
            ex, cut = truncate(record_tokens(tokenizer, kind, record, where, text_key), max_len)
            truncated += cut
            if sum(ex[1]) > 0:  # an example whose targets were all truncated teaches nothing
                examples.append(ex)
            else:
                skipped += 1
    if docs and examples:
        raise ValueError(f"{list(paths)} mix pretraining documents with instruction records; train them apart "
                         "or tokenize both (python -m train.tokenize) and mix them with data.weights")
    if docs:
        rows = stream_rows(docs, row_len)
        examples_count = len(docs)
    else:
        if not examples:
            raise ValueError(f"no training examples with targets in {list(paths)}")
        order = np.random.default_rng(seed).permutation(len(examples))
        examples = [examples[i] for i in order]
        rows = pack_rows(examples, row_len) if pack else pad_rows(examples, row_len)
        examples_count = len(examples)
    summary = {"examples": examples_count, "truncated": truncated, "skipped": skipped, "rows": len(rows["tokens"]),
               "row_len": row_len, "targets": int(model_batch(rows)["weights"].sum())}
    return rows, summary


class Batches:
    """Global batch number k -> this host's rows, the same on every run with the same seed.

    Epoch e visits rows in np.random.default_rng([seed, e]).permutation order; the last partial
    batch of an epoch is dropped. The data-iterator state is the next batch index. `to_batch` turns
    the selected rows into the step's arrays (model_batch; train/data/pairs.py's pair_batch for pairs).
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                 to_batch: Callable[[Rows], dict] = model_batch):
        self.rows, self.batch_size, self.seed, self.to_batch = rows, batch_size, seed, to_batch
        self.num_rows = len(rows["tokens"])
        if self.num_rows < batch_size:
            raise ValueError(f"the data set has {self.num_rows} rows, fewer than batch_size {batch_size}")
        if batch_size % process_count != 0:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} hosts")
        self.per_epoch = self.num_rows // batch_size
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self._perm_epoch, self._perm = -1, None

    def global_indices(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perm[i * self.batch_size: (i + 1) * self.batch_size]

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        idx = self.global_indices(k)[self.offset: self.offset + self.local]
        return self.to_batch({name: a[idx] for name, a in self.rows.items()})


def validation_batches(rows: Rows, batch_size: int, limit: int = 0, process_index: int = 0,
                       process_count: int = 1, to_batch: Callable[[Rows], dict] = model_batch) -> list[dict[str, np.ndarray]]:
    """Held-out rows in their order, as this host's share of global batches of `batch_size` (the
    last one padded with empty rows, which hold no targets); the first `limit` batches (0 = all).
    The same rows every time: validation numbers depend only on the params."""
    n, local = len(rows["tokens"]), batch_size // process_count
    count = -(-n // batch_size)
    batches = []
    for b in range(min(count, limit) if limit else count):
        index = b * batch_size + process_index * local + np.arange(local)
        chunk = {k: np.zeros((local,) + a.shape[1:], a.dtype) for k, a in rows.items()}
        for k, a in rows.items():
            chunk[k][index < n] = a[index[index < n]]
        batches.append(to_batch(chunk))
    return batches
