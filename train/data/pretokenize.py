"""The offline tokenizer: input files -> records -> worker processes -> fixed-size token shards.

This process reads the inputs in order and hands chunks of raw records (text, JSON lines, rows)
to `workers` processes, which parse and encode them (sentencepiece holds the GIL, so threads would
not help); results are written back in input order, so the shards are byte-identical whatever the
number of workers. At most 2 x workers + 2 chunks are in flight and one shard is buffered, so
memory stays bounded for any input size.

A document longer than PIECE_CHARS comes in pieces, cut where the tokenizer's ids do not change
(`Tokenizer.cut`: before a space that follows a word): a plain-text document is read piece by piece
and a long JSON record is encoded piece by piece, so memory does not grow with the length of a
document either. One JSON line may hold MAX_UNCUT bytes, and a text document as many characters
without a place to cut; more is an error naming it.

Every shard records the input position after it, and manifest.json is written last: running the
same command again is a no-op when the manifest matches the inputs (their sizes and modification
times), continues after the last complete shard when it was interrupted, and refuses a folder that
holds another data set. A local output folder is locked (OUTPUT/tokenize.lock, as the converter and
the trainer lock theirs) while a run writes it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from typing import Any, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from llama_jax.checkpoint.files import check_apart, is_remote, join, write_text
from llama_jax.checkpoint.locks import locked_folder
from llama_jax.errors import note
from llama_jax.tokenizer import Tokenizer
from train.data import formats, shards, storage

# --format -> (record kind, how files are read: None = by their name, as training reads them)
FORMATS = {"text": ("text", "text"), "jsonl": ("text", "jsonl"), "parquet": ("text", "parquet"),
           "alpaca": ("alpaca", None), "chat": ("chat", None)}
CHUNK_RECORDS, CHUNK_CHARS = 512, 1 << 20
PIECE_CHARS = 1 << 18  # a longer document is encoded in pieces of about this many characters
MAX_UNCUT = 1 << 26  # the most bytes in one JSON line, characters of text without a place to cut
MAX_SHARD_TOKENS = 1 << 30  # the writer holds one shard: 3-6 bytes a token
MAX_WORKERS = 1024
LOCK = "tokenize.lock"
OURS = re.compile(r"(shard-\d+\.bin|manifest\.json)(\.tmp-\d+)?|" + re.escape(LOCK))  # the names in a folder


class TokenizeError(ValueError):
    """Bad input or output for the offline tokenizer (the command line prints it and exits 2)."""


class Piece(NamedTuple):
    """Part of a plain-text document too long to read whole (`formats.text_pieces`)."""
    text: str
    first: bool
    last: bool


def _raw_records(path: str, reader: str | None, text_key: str, tok: Tokenizer) -> Iterator[tuple[str, Any]]:
    """(where, raw record): JSON lines stay text here and are parsed in the workers; plain text comes
    as Pieces."""
    if reader == "text":
        first = True
        for i, piece, last in formats.text_pieces(path, tok.cut, PIECE_CHARS, MAX_UNCUT):
            yield f"{path} document {i}", Piece(piece, first, last)
            first = last
    elif reader == "jsonl" or (reader is None and path.endswith(".jsonl")):
        for n, line in storage.iter_lines(path, MAX_UNCUT):
            if line.strip():
                yield f"{path}:{n}", line
    elif reader == "parquet" and not path.endswith(".parquet"):
        raise TokenizeError(f"{path}: --format parquet expects .parquet files")
    else:
        yield from formats.iter_records(path, text_key)


def _size(raw: Any) -> int:
    """About how many characters a raw record holds (what bounds the chunks in flight)."""
    if isinstance(raw, str):
        return len(raw)
    if isinstance(raw, Piece):
        return len(raw.text)
    if isinstance(raw, dict):
        return 256 + sum(len(v) for v in raw.values() if isinstance(v, str))
    return 256


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


def encode_chunk(kind: str, text_key: str, dtype: str, items: list[tuple[str, Any]], piece_chars: int) -> tuple:
    """(ids, lengths (0 = skipped: no target), loss mask or None, worker stats) of a chunk of raw records."""
    ids, lengths, mask = _encode(kind, text_key, np.dtype(dtype), items, piece_chars)
    return ids, lengths, mask, _worker_stats()


def _encode(kind: str, text_key: str, dtype: np.dtype, items: list[tuple[str, Any]], piece_chars: int) -> tuple:
    tok = _TOKENIZER
    records = [(where, formats.parse_json(raw, where) if isinstance(raw, str) else raw) for where, raw in items]
    if kind == "text":
        texts = [raw if isinstance(raw, Piece) else Piece(formats.text_of(raw, where, text_key), True, True)
                 for where, raw in records]
        short = [i for i, p in enumerate(texts) if p.first and len(p.text) <= piece_chars]
        encoded: list[Any] = [None] * len(texts)
        for i, e in zip(short, tok.encode_batch([texts[i].text for i in short], bos=True)):  # one batched call
            encoded[i] = np.asarray(e, dtype)
        for i, p in enumerate(texts):  # long texts in pieces (one thread: the processes are the parallelism)
            if encoded[i] is None:
                pieces = formats.split_text(p.text, tok.cut, piece_chars)
                parts = [np.asarray(tok.encode(pieces[0], bos=True), dtype)] if p.first else []
                parts += [np.asarray(tok.encode_rest([piece])[0], dtype) for piece in pieces[int(p.first):]]
                encoded[i] = np.concatenate(parts) if parts else np.zeros(0, dtype)
        eos = np.asarray([tok.eos_id], dtype)
        encoded = [np.concatenate([e, eos]) if p.last else e for e, p in zip(encoded, texts)]
        lengths = np.asarray([len(e) for e in encoded], np.int64)
        return (np.concatenate(encoded) if encoded else np.zeros(0, dtype)), lengths, None
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
    temporary files and shards of other runs, of another piece size (their positions count other
    items) or after a gap."""
    names = storage.list_names(output)
    for name in names:
        if ".tmp-" in name and OURS.fullmatch(name):
            storage.remove(join(output, name))
    kept, resume, totals, removed = 0, {"record": 0, "token": 0, "skipped": 0}, [0, 0], 0
    for name in sorted(n for n in names if n.startswith("shard-") and n.endswith(".bin")):
        header = shards.read_header(join(output, name))
        if header is not None and header.get("run") == run and header.get("pieces") == PIECE_CHARS \
                and name == shards.shard_name(kept):
            kept, resume = kept + 1, header["resume"]
            totals = [totals[0] + header["tokens"], totals[1] + header["docs"]]
        else:
            storage.remove(join(output, name))
            removed += 1
    if removed:
        note(f"{output}: removed {removed} shard(s) of an unfinished run of other inputs or settings (or after a "
             "gap); starting from " + (f"shard {kept}" if kept else "the beginning"))
    return kept, resume, totals


def check_output(output: str, files: list[str]) -> None:
    """Refuse an --output that cannot be this run's folder: a file (an input, or any other), a path
    under a file, or a folder that is, holds or lies inside an input."""
    if not output.strip():
        raise TokenizeError("--output is empty; expected a folder path")
    if is_remote(output):
        return
    local = [f for f in files if not f.startswith("hf:") and not is_remote(f)]
    if os.path.lexists(output) and not os.path.isdir(output):
        what = ("a broken link" if not os.path.exists(output) else "an input of this run"
                if any(os.path.exists(f) and os.path.samefile(output, f) for f in local) else "a file")
        raise TokenizeError(f"--output {output} is {what}; expected a folder (a new one, or one this command "
                            "wrote before)")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise TokenizeError(f"--output {output}: {parent} is a file, so no folder can be made under it; expected "
                            "a folder path")
    try:
        check_apart(output, tuple(local))
    except ValueError as e:
        raise TokenizeError(f"--{e}") from None
    others = [n for n in storage.list_names(output) if not OURS.fullmatch(n)]
    if others:
        raise TokenizeError(f"--output {output} holds files this command does not write ({', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}); expected a new folder or one holding "
                            f"{shards.shard_name(0)}... and {shards.MANIFEST}")


@contextlib.contextmanager
def claim(output: str) -> Iterator[None]:
    """Create and lock a local output folder for one run (a second run stops, naming this one); a
    folder this run created and left empty is removed."""
    if is_remote(output):  # object stores have no locks: one writer per URL is the user's to keep
        yield
        return
    with locked_folder(output, LOCK, f"tokenized data set folder {output}"):
        yield


def _check_numbers(shard_tokens: Any, workers: Any) -> None:
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) \
            or not 1024 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise TokenizeError(f"--shard-tokens must be an integer in [1024, {MAX_SHARD_TOKENS}] (2^30: one shard is "
                            f"held in memory, 3-6 bytes a token), got {shard_tokens}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or not 1 <= workers <= MAX_WORKERS):
        raise TokenizeError(f"--workers must be an integer in [1, {MAX_WORKERS}], got {workers}")


def tokenize(tokenizer: str, fmt: str, inputs: list[str], output: str, text_key: str = "text",
             workers: int | None = None, shard_tokens: int = 1 << 25, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Tokenize `inputs` into `output`; returns its manifest (see the module docstring) with the
    workers' CPU seconds and peak RSS of this run added."""
    if fmt not in FORMATS:
        raise TokenizeError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    _check_numbers(shard_tokens, workers)
    files = storage.expand(inputs)
    check_output(output, files)
    tok = Tokenizer(tokenizer)
    settings = _settings(tok, fmt, files, text_key, shard_tokens)
    with claim(output):
        return _run(tok, fmt, files, output, text_key, workers or os.cpu_count() or 1, shard_tokens, overwrite,
                    progress, settings)


def _run(tok: Tokenizer, fmt: str, files: list[str], output: str, text_key: str, workers: int, shard_tokens: int,
         overwrite: bool, progress: bool, settings: dict) -> dict:
    kind, reader = FORMATS[fmt]
    run = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    manifest = shards.read_manifest(output)
    if manifest is not None:
        if manifest.get("run") == run and not overwrite:
            return {**manifest, "already": True}
        if not overwrite:
            raise TokenizeError(f"{output} already holds a tokenized data set of other inputs or settings "
                                f"({shards.MANIFEST}); choose a new --output or pass --overwrite")
        storage.remove(join(output, shards.MANIFEST))
    first_shard, resume, totals = _resume_point(output, run)

    dtype = shards.token_dtype(tok.vocab_size)
    header = {"run": run, "tokenizer": tok.fingerprint, "pieces": PIECE_CHARS}
    writer = shards.ShardWriter(output, shard_tokens, dtype, kind != "text", header, first_shard)
    # Workers fork from a clean server process, not from this one: a caller may run JAX's threads,
    # and forking a multithreaded process can deadlock the child.
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])
    item, records, skipped = 0, 0, resume["skipped"]  # items: records, or pieces of long documents
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc=f"tokenize ({workers} workers)",
               initial=totals[0], dynamic_ncols=True)
    pool = ctx.Pool(workers, initializer=_start_worker, initargs=(tok,))
    worker_stats: dict[int, tuple[float, int]] = {}  # pid -> (CPU seconds, peak RSS kB)
    try:
        pending: collections.deque = collections.deque()  # (first item, starts, size, job)
        in_flight = 0  # characters in the pending chunks

        def drain(limit: int) -> None:
            nonlocal skipped, in_flight
            while len(pending) > limit or (pending and in_flight > (limit + 1) * CHUNK_CHARS):
                first_item, starts, size, job = pending.popleft()
                in_flight -= size
                ids, lengths, mask, (pid, cpu, peak) = job.get()
                worker_stats[pid] = (cpu, peak)
                offset = 0
                for j, n in enumerate(lengths):
                    r = first_item + j
                    if n == 0:
                        skipped += mask is not None
                        continue
                    skip = resume["token"] if r == resume["record"] else 0
                    writer.add(ids[offset: offset + n], None if mask is None else mask[offset: offset + n],
                               r, skipped, skip, starts[j])
                    offset += n
                bar.update(int(lengths.sum()))

        def send(chunk: list, first_item: int, size: int) -> None:
            nonlocal in_flight
            starts = [not isinstance(raw, Piece) or raw.first for _, raw in chunk]
            job = pool.apply_async(encode_chunk, (kind, text_key, dtype.str, chunk, PIECE_CHARS))
            pending.append((first_item, starts, size, job))
            in_flight += size
            drain(2 * workers + 2)

        chunk: list = []
        chars = 0
        chunk_first = resume["record"]
        for path in files:
            for where, raw in _raw_records(path, reader, text_key, tok):
                records += not isinstance(raw, Piece) or raw.first
                if item < resume["record"]:
                    item += 1
                    continue
                chunk.append((where, raw))
                chars += _size(raw)
                item += 1
                if len(chunk) >= CHUNK_RECORDS or chars >= CHUNK_CHARS:
                    send(chunk, chunk_first, chars)
                    chunk, chars, chunk_first = [], 0, item
        if chunk:
            send(chunk, chunk_first, chars)
        drain(0)
        if item < resume["record"]:
            raise TokenizeError(f"{output}: the inputs hold {records} records, fewer than its shards already cover; "
                                "pass --overwrite to start again")
        writer.flush({"record": item, "token": 0, "skipped": skipped})
    finally:
        pool.terminate()
        bar.close()
    manifest = {**shards.FORMAT, "run": run, "kind": kind, "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size,
                "dtype": dtype.str, "has_mask": kind != "text", "shard_tokens": shard_tokens, "shards": writer.index,
                "tokens": totals[0] + writer.totals[0], "docs": totals[1] + writer.totals[1],
                "records": records, "skipped": skipped, "settings": settings}
    write_text(join(output, shards.MANIFEST), json.dumps(manifest, indent=1))
    return {**manifest, "workers_cpu_s": sum(c for c, _ in worker_stats.values()),
            "workers_peak_rss_mb": round(max((p for _, p in worker_stats.values()), default=0) / 1024)}
