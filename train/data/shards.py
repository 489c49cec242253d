"""Tokenized shards: the on-disk layout, the writer that cuts a token stream into fixed-size
shards, and the reader of token ranges (local files or URLs).

A data set folder holds shard-00000.bin, shard-00001.bin, ... and manifest.json, written last:
a folder without a manifest is unfinished and training refuses it. The documents' tokens are
one stream cut every `shard_tokens` tokens (a document may continue in the next shard), so
global token t lives in shard t // shard_tokens. One shard file is

    [4096-byte JSON header, space padded][ids: n x uint16 (vocab <= 65536) or uint32]
    [document starts: n bits, little-endian bit order][loss mask: n x uint8, SFT sets only]

and is written under a temporary name and renamed when complete. Readers compute every offset
from the manifest alone, so reading a row is a few byte-range reads (os.pread locally, ranged GETs
on object storage), and nothing is memory-mapped.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from llama_jax.checkpoint.files import join, read_text
from train.data import storage

FORMAT = {"format": "llama_jax-tokens", "version": 1}
HEADER_BYTES = 4096
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def layout(n: int, itemsize: int) -> dict[str, tuple[int, int]]:
    """Byte ranges of a shard's regions for n tokens."""
    tokens = (HEADER_BYTES, HEADER_BYTES + n * itemsize)
    starts = (tokens[1], tokens[1] + (n + 7) // 8)
    return {"tokens": tokens, "starts": starts, "mask": (starts[1], starts[1] + n)}


def read_manifest(folder: str) -> dict | None:
    text = read_text(join(folder, MANIFEST))
    return None if text is None else json.loads(text)


def read_header(path: str) -> dict | None:
    """A shard file's header, or None when it is not a complete shard of this format."""
    try:
        header = json.loads(storage.Blob(path).read(0, HEADER_BYTES))
    except (ValueError, OSError):
        return None
    return header if {k: header.get(k) for k in FORMAT} == FORMAT else None


class ShardWriter:
    """Documents in, fixed-size shards out. `header` (the run's settings) goes into every shard;
    each shard also records where the input stream stands after it (`resume`), so an interrupted
    run continues from its last complete shard."""

    def __init__(self, folder: str, shard_tokens: int, dtype: np.dtype, has_mask: bool, header: dict,
                 first_shard: int = 0):
        self.folder, self.capacity, self.dtype, self.has_mask = folder, shard_tokens, np.dtype(dtype), has_mask
        self.header, self.index = header, first_shard
        self.tokens = np.zeros(shard_tokens, self.dtype)
        self.starts = np.zeros(shard_tokens, bool)
        self.mask = np.zeros(shard_tokens, np.uint8) if has_mask else None
        self.used = 0
        self.totals = [0, 0]  # tokens, documents written by this writer

    def add(self, tokens: np.ndarray, mask: np.ndarray | None, record: int, skipped: int, skip: int = 0,
            start: bool = True) -> None:
        """Append record `record`'s document (minus its first `skip` tokens, already in a shard);
        `skipped` counts the records skipped before it. `start=False`: the record is a later piece of
        the document before it (no document start)."""
        done = skip
        first = start
        while done < len(tokens):
            take = min(len(tokens) - done, self.capacity - self.used)
            span = slice(self.used, self.used + take)
            self.tokens[span] = tokens[done: done + take]
            self.starts[span] = False
            self.starts[self.used] = first and skip == 0
            if self.has_mask:
                self.mask[span] = mask[done: done + take]
            self.used += take
            done += take
            first = False
            if self.used == self.capacity:
                at_end = done == len(tokens)
                self.flush({"record": record + at_end, "token": 0 if at_end else done, "skipped": skipped})

    def flush(self, resume: dict) -> None:
        """Write the current shard (if it holds tokens) with the input position after it."""
        n = self.used
        if n == 0:
            return
        regions = layout(n, self.dtype.itemsize)
        header = {**FORMAT, **self.header, "shard": self.index, "tokens": n, "docs": int(self.starts[:n].sum()),
                  "resume": resume, "regions": regions}
        text = json.dumps(header).encode()
        if len(text) > HEADER_BYTES:
            raise ValueError(f"shard header of {len(text)} bytes exceeds {HEADER_BYTES}")
        chunks = [text.ljust(HEADER_BYTES), memoryview(self.tokens[:n]),
                  np.packbits(self.starts[:n], bitorder="little").tobytes()]
        if self.has_mask:
            chunks.append(memoryview(self.mask[:n]))
        storage.write_bytes(join(self.folder, shard_name(self.index)), chunks)
        self.totals = [self.totals[0] + n, self.totals[1] + header["docs"]]
        self.index += 1
        self.used = 0


class TokenSet:
    """A finished tokenized data set: token ranges [a, b) across shards, with document starts
    and (SFT sets) the loss mask."""

    def __init__(self, folder: str):
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"{folder}: no {MANIFEST}; not a tokenized data set, or its tokenization did "
                                    "not finish (run `python -m train.tokenize ...` again with the same arguments: "
                                    "it resumes)")
        if {k: manifest.get(k) for k in FORMAT} != FORMAT:
            raise ValueError(f"{join(folder, MANIFEST)}: format {manifest.get('format')!r} version "
                             f"{manifest.get('version')!r}, expected {FORMAT}")
        self.folder, self.manifest = folder, manifest
        self.n_tokens, self.capacity = int(manifest["tokens"]), int(manifest["shard_tokens"])
        self.dtype, self.has_mask = np.dtype(manifest["dtype"]), bool(manifest["has_mask"])
        self.fingerprint, self.kind = manifest["tokenizer"], manifest["kind"]
        self.n_shards = int(manifest["shards"])
        self._blobs: dict[int, storage.Blob] = {}

    def _blob(self, shard: int) -> storage.Blob:
        if shard not in self._blobs:
            if len(self._blobs) >= 64:  # keep few files open; a closed one reopens on demand
                self._blobs.pop(next(iter(self._blobs))).close()
            self._blobs[shard] = storage.Blob(join(self.folder, shard_name(shard)))
        return self._blobs[shard]

    def shard_size(self, shard: int) -> int:
        return min(self.capacity, self.n_tokens - shard * self.capacity)

    def read(self, spans: Sequence[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(ids int32, document starts bool, loss mask uint8 or None) of each global range [a, b)."""
        pieces: dict[int, list[tuple[int, int, int]]] = {}  # shard -> (span number, lo, hi) in the shard
        for i, (a, b) in enumerate(spans):
            if not 0 <= a < b <= self.n_tokens:
                raise IndexError(f"{self.folder}: token range [{a}, {b}) outside [0, {self.n_tokens})")
            for shard in range(a // self.capacity, (b - 1) // self.capacity + 1):
                base = shard * self.capacity
                pieces.setdefault(shard, []).append((i, max(a, base) - base, min(b, base + self.capacity) - base))
        parts: list[list[tuple[int, Any]]] = [[] for _ in spans]
        requests = []
        for shard, wanted in pieces.items():
            regions = layout(self.shard_size(shard), self.dtype.itemsize)
            ranges = []
            for _, lo, hi in wanted:
                ranges.append((regions["tokens"][0] + lo * self.dtype.itemsize, regions["tokens"][0] + hi * self.dtype.itemsize))
                ranges.append((regions["starts"][0] + lo // 8, regions["starts"][0] + (hi + 7) // 8))
                if self.has_mask:
                    ranges.append((regions["mask"][0] + lo, regions["mask"][0] + hi))
            requests.append((shard, wanted, self._blob(shard).request(ranges)))
        for shard, wanted, request in requests:
            data = iter(request())
            for i, lo, hi in wanted:
                ids = np.frombuffer(next(data), self.dtype).astype(np.int32)
                bits = np.unpackbits(np.frombuffer(next(data), np.uint8), bitorder="little")[lo % 8: lo % 8 + hi - lo]
                mask = np.frombuffer(next(data), np.uint8) if self.has_mask else None
                parts[i].append((shard, (ids, bits.astype(bool), mask)))
        out = []
        for got in parts:
            ids, starts, masks = zip(*(p for _, p in sorted(got, key=lambda x: x[0])))
            out.append((np.concatenate(ids), np.concatenate(starts),
                        np.concatenate(masks) if self.has_mask else None))
        return out

    def document_starts(self) -> np.ndarray:
        """Global token index of every document's first token (read shard by shard)."""
        found = []
        for shard in range(self.n_shards):
            n = self.shard_size(shard)
            lo, hi = layout(n, self.dtype.itemsize)["starts"]
            bits = np.unpackbits(np.frombuffer(self._blob(shard).read(lo, hi), np.uint8), bitorder="little")[:n]
            found.append(np.flatnonzero(bits) + shard * self.capacity)
        return np.concatenate(found) if found else np.zeros(0, np.int64)
