"""A recipe's data block -> this host's batches: rows in memory (alpaca, chat, pretrain files)
or streamed from tokenized shards (tokens). Training and evaluation both build batches here."""

from __future__ import annotations

from typing import Any

from llama_jax.checkpoint.files import join
from llama_jax.tokenizer import Tokenizer
from train.data import storage
from train.data.pairs import build_pair_rows, pair_batch
from train.data.rows import Batches, build_rows, validation_batches
from train.data.shards import MANIFEST
from train.data.stream import StreamBatches, open_rows


def is_tokenized(path: str) -> bool:
    return not path.startswith("hf:") and storage.exists(join(path, MANIFEST))


def make_batches(data: Any, tokenizer: Tokenizer, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, preference: Any = None) -> tuple[Batches | StreamBatches, dict]:
    """(batches, summary) for a data block (train.config.DataConfig: format, train, max_len, pack,
    text_key, weights); batches(k) is this host's slice of global batch k, a pure function of (seed, k).
    Format preference reads pairs with the recipe's preference block (template, margin_key).

    summary: examples, truncated (cut to max_len), skipped (no target left), rows, row_len.
    """
    row_len = data.max_len + 1
    fmt = data.format
    if fmt == "auto" and all(is_tokenized(p) for p in data.train):
        fmt = "tokens"
    if fmt == "tokens":
        sources = [open_rows(p, row_len, data.pack, tokenizer.fingerprint) for p in data.train]
        batches = StreamBatches(sources, data.weights or None, batch_size, seed, process_index, process_count)
        summary = {"examples": sum(s.summary["documents"] for s in sources),
                   "truncated": sum(s.summary["truncated"] for s in sources),
                   "skipped": sum(s.summary["skipped"] for s in sources),
                   "rows": batches.num_rows, "row_len": row_len, "tokens": sum(s.summary["tokens"] for s in sources)}
        if batches.num_rows < batch_size:
            raise ValueError(f"the data set has {batches.num_rows} rows, fewer than batch_size {batch_size}")
        return batches, summary
    if data.weights:
        raise ValueError("data.weights (a mixture) needs tokenized data sets: data.format: tokens "
                         "(python -m train.tokenize makes them)")
    if fmt == "preference":
        rows, summary = pair_rows(data, data.train, tokenizer, preference)
        return Batches(rows, batch_size, seed, process_index, process_count, to_batch=pair_batch), summary
    rows, summary = build_rows(fmt, data.train, tokenizer, data.max_len, data.pack, seed, data.text_key)
    return Batches(rows, batch_size, seed, process_index, process_count), summary


def held_out_batches(data: Any, path: str, tokenizer: Tokenizer, batch_size: int, limit: int, seed: int,
                     process_index: int = 0, process_count: int = 1) -> list[dict]:
    """This host's share of fixed held-out batches from `path`, read in the recipe's data format: the first
    `limit` batches (0 = all). The same batches every call, so validation numbers depend only on the params."""
    fmt = data.format
    if fmt == "tokens" or (fmt == "auto" and is_tokenized(path)):
        stream = StreamBatches([open_rows(path, data.max_len + 1, data.pack, tokenizer.fingerprint)], None,
                               batch_size, seed, process_index, process_count)
        return [stream(k) for k in range(min(limit, stream.per_epoch) if limit else stream.per_epoch)]
    rows, _ = build_rows(fmt, [path], tokenizer, data.max_len, data.pack, seed, data.text_key)
    return validation_batches(rows, batch_size, limit, process_index, process_count)


def pair_rows(data: Any, paths: list, tokenizer: Tokenizer, preference: Any) -> tuple[dict, dict]:
    """The pair-row table (train/data/pairs.py) of preference files, read as the recipe says."""
    return build_pair_rows(paths, tokenizer, data.max_len, preference.template, preference.margin_key)
