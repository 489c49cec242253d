"""The offline tokenizer: input files -> records -> worker processes -> fixed-size token shards.

This process reads the inputs in order and hands chunks of raw records (text, JSON lines, rows)
to `workers` processes, which parse and encode them (sentencepiece holds the GIL, so threads would
not help); results are written back in input order, so the shards are byte-identical whatever the
number of workers. At most 2 x workers + 2 chunks are in flight and one shard is buffered, so
memory stays bounded for any input size.

Every shard records the input position after it, and manifest.json is written last: running the
same command again is a no-op when the manifest matches the inputs (their sizes and modification
times), continues after the last complete shard when it was interrupted, and refuses a folder that
holds another data set.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import time
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from llama_jax.checkpoint.files import is_remote, join, write_text
from llama_jax.tokenizer import Tokenizer
from train.data import formats, shards, storage

# --format -> (record kind, how files are read: None = by their name, as training reads them)
FORMATS = {"text": ("text", "text"), "jsonl": ("text", "jsonl"), "parquet": ("text", "parquet"),
           "alpaca": ("alpaca", None), "chat": ("chat", None)}
CHUNK_RECORDS, CHUNK_CHARS = 512, 1 << 20


class TokenizeError(ValueError):
    """Bad input or output for the offline tokenizer (the command line prints it and exits 2)."""


def _raw_records(path: str, reader: str | None, text_key: str) -> Iterator[tuple[str, Any]]:
    """(where, raw record): JSON lines stay text here and are parsed in the workers."""
    if reader == "text":
        for i, doc in enumerate(formats.text_documents(path)):
            yield f"{path} document {i}", {text_key: doc}
    elif reader == "jsonl" or (reader is None and path.endswith(".jsonl")):
        for n, line in storage.iter_lines(path):
            if line.strip():
                yield f"{path}:{n}", line
    elif reader == "parquet" and not path.endswith(".parquet"):
        raise TokenizeError(f"{path}: --format parquet expects .parquet files")
    else:
        yield from formats.iter_records(path, text_key)


# --- worker processes --------------------------------------------------------------------------

_TOKENIZER: Tokenizer | None = None


def _start_worker(tokenizer: Tokenizer) -> None:  # pickled as its files' bytes
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _worker_stats() -> tuple[int, float, int]:
    """(pid, CPU seconds so far, peak RSS in kB) of this worker."""
    with open("/proc/self/status") as f:
        peak = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    return os.getpid(), time.process_time(), peak


def encode_chunk(kind: str, text_key: str, dtype: str, items: list[tuple[str, Any]]) -> tuple:
    """(ids, lengths (0 = skipped: no target), loss mask or None, worker stats) of a chunk of raw records."""
    ids, lengths, mask = _encode(kind, text_key, dtype, items)
    return ids, lengths, mask, _worker_stats()


def _encode(kind: str, text_key: str, dtype: str, items: list[tuple[str, Any]]) -> tuple:
    tok = _TOKENIZER
    records = [(where, formats.parse_json(raw, where) if isinstance(raw, str) else raw) for where, raw in items]
    if kind == "text":  # one batched call (one thread: the processes are the parallelism)
        texts = [formats.text_of(record, where, text_key) for where, record in records]
        encoded = tok.encode_batch(texts, bos=True, eos=True)
        lengths = np.asarray([len(e) for e in encoded], np.int64)
        return np.fromiter(itertools.chain.from_iterable(encoded), dtype, int(lengths.sum())), lengths, None
    ids, lengths, masks = [], [], []
    for where, record in records:
        tokens, mask = formats.record_tokens(tok, kind, record, where, text_key)
        if not any(mask):
            lengths.append(0)  # nothing to learn from (e.g. a dialog without an answer)
            continue
        ids.extend(tokens)
        masks.extend(mask)
        lengths.append(len(tokens))
    return np.asarray(ids, dtype), np.asarray(lengths, np.int64), np.asarray(masks, np.uint8)


# --- the run -------------------------------------------------------------------------------------


def _settings(tok: Tokenizer, fmt: str, files: list[str], text_key: str, shard_tokens: int) -> dict:
    stamps = [[f, f if f.startswith("hf:") else storage.stamp(f)] for f in files]
    return {"reader": fmt, "kind": FORMATS[fmt][0], "text_key": text_key, "tokenizer": tok.fingerprint,
            "shard_tokens": shard_tokens, "inputs": stamps}


def _resume_point(output: str, run: str) -> tuple[int, dict, list[int]]:
    """(complete shards to keep, input position after them, [tokens, docs] in them); removes
    temporary files and shards of other runs or after a gap."""
    names = storage.list_names(output)
    for name in names:
        if ".tmp-" in name:
            storage.remove(join(output, name))
    kept, resume, totals = 0, {"record": 0, "token": 0, "skipped": 0}, [0, 0]
    for name in sorted(n for n in names if n.startswith("shard-") and n.endswith(".bin")):
        header = shards.read_header(join(output, name))
        if header is not None and header.get("run") == run and name == shards.shard_name(kept):
            kept, resume = kept + 1, header["resume"]
            totals = [totals[0] + header["tokens"], totals[1] + header["docs"]]
        else:
            storage.remove(join(output, name))
    return kept, resume, totals


def tokenize(tokenizer: str, fmt: str, inputs: list[str], output: str, text_key: str = "text",
             workers: int | None = None, shard_tokens: int = 1 << 25, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Tokenize `inputs` into `output`; returns its manifest (see the module docstring) with the
    workers' CPU seconds and peak RSS of this run added."""
    if fmt not in FORMATS:
        raise TokenizeError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if shard_tokens < 1024:
        raise TokenizeError(f"--shard-tokens must be >= 1024, got {shard_tokens}")
    tok = Tokenizer(tokenizer)
    kind, reader = FORMATS[fmt]
    files = storage.expand(inputs)
    settings = _settings(tok, fmt, files, text_key, shard_tokens)
    run = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    manifest = shards.read_manifest(output)
    if manifest is not None:
        if manifest.get("run") == run and not overwrite:
            return {**manifest, "already": True}
        if not overwrite:
            raise TokenizeError(f"{output} already holds a tokenized data set of other inputs or settings "
                                f"({shards.MANIFEST}); choose a new --output or pass --overwrite")
        storage.remove(join(output, shards.MANIFEST))
    if not is_remote(output):
        os.makedirs(output, exist_ok=True)
    first_shard, resume, totals = _resume_point(output, run)

    dtype = shards.token_dtype(tok.vocab_size)
    writer = shards.ShardWriter(output, shard_tokens, dtype, kind != "text", {"run": run, "tokenizer": tok.fingerprint},
                                first_shard)
    workers = workers or os.cpu_count() or 1
    # Workers fork from a clean server process, not from this one: a caller may run JAX's threads,
    # and forking a multithreaded process can deadlock the child.
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])
    record, skipped = 0, resume["skipped"]
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc=f"tokenize ({workers} workers)",
               initial=totals[0], dynamic_ncols=True)
    pool = ctx.Pool(workers, initializer=_start_worker, initargs=(tok,))
    worker_stats: dict[int, tuple[float, int]] = {}  # pid -> (CPU seconds, peak RSS kB)
    try:
        pending: collections.deque = collections.deque()

        def drain(limit: int) -> None:
            nonlocal skipped
            while len(pending) > limit:
                first_record, job = pending.popleft()
                ids, lengths, mask, (pid, cpu, peak) = job.get()
                worker_stats[pid] = (cpu, peak)
                offset = 0
                for j, n in enumerate(lengths):
                    r = first_record + j
                    if n == 0:
                        skipped += 1
                        continue
                    skip = resume["token"] if r == resume["record"] else 0
                    writer.add(ids[offset: offset + n], None if mask is None else mask[offset: offset + n],
                               r, skipped, skip)
                    offset += n
                bar.update(int(lengths.sum()))

        chunk: list = []
        chars = 0
        chunk_first = resume["record"]
        for path in files:
            for where, raw in _raw_records(path, reader, text_key):
                if record < resume["record"]:
                    record += 1
                    continue
                chunk.append((where, raw))
                chars += len(raw) if isinstance(raw, str) else 256
                record += 1
                if len(chunk) >= CHUNK_RECORDS or chars >= CHUNK_CHARS:
                    pending.append((chunk_first, pool.apply_async(encode_chunk, (kind, text_key, dtype.str, chunk))))
                    chunk, chars, chunk_first = [], 0, record
                    drain(2 * workers + 2)
        if chunk:
            pending.append((chunk_first, pool.apply_async(encode_chunk, (kind, text_key, dtype.str, chunk))))
        drain(0)
        if record < resume["record"]:
            raise TokenizeError(f"{output}: the inputs hold {record} records, fewer than its shards already cover "
                                f"({resume['record']}); pass --overwrite to start again")
        writer.flush({"record": record, "token": 0, "skipped": skipped})
    finally:
        pool.terminate()
        bar.close()
    manifest = {**shards.FORMAT, "run": run, "kind": kind, "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size,
                "dtype": dtype.str, "has_mask": kind != "text", "shard_tokens": shard_tokens, "shards": writer.index,
                "tokens": totals[0] + writer.totals[0], "docs": totals[1] + writer.totals[1],
                "records": record, "skipped": skipped, "settings": settings}
    write_text(join(output, shards.MANIFEST), json.dumps(manifest, indent=1))
    return {**manifest, "workers_cpu_s": sum(c for c, _ in worker_stats.values()),
            "workers_peak_rss_mb": round(max((p for _, p in worker_stats.values()), default=0) / 1024)}
