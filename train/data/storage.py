"""Where data lives: local paths or URLs (gs://, s3://, file://, ...) read and written through
TensorStore kvstores, as checkpoints are: globs, streamed reads, byte ranges, whole-file writes.

Local files are read with os.pread (no memory map, so pages read stay out of the process's RSS)
and written under a temporary name, then renamed: a reader never sees half a file. Object stores
have no rename; a URL write is a single PUT, which is atomic there.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import os
from typing import Callable, Iterator, Sequence

import tensorstore as ts

from llama_jax.checkpoint.files import is_remote, kvstore

WILDCARDS = "*?["


def _split(url: str) -> tuple[str, str]:
    folder, name = url.rstrip("/").rsplit("/", 1)
    return folder, name


def _store(folder: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore(folder)).result()


def expand(inputs: Sequence[str]) -> list[str]:
    """Files named by `inputs` (paths, globs, URLs, URL globs; hf: names pass), each pattern's matches sorted.

    A pattern that matches nothing is an error: a typo must not silently drop data."""
    out = []
    for pattern in inputs:
        if pattern.startswith("hf:") or not any(c in pattern for c in WILDCARDS):
            out.append(pattern)
            continue
        if is_remote(pattern):
            head = pattern[: min(pattern.index(c) for c in WILDCARDS if c in pattern)]
            folder = head.rsplit("/", 1)[0]
            keys = [k.decode() for k in _store(folder).list().result()]
            found = sorted(f"{folder}/{k}" for k in keys if fnmatch.fnmatchcase(f"{folder}/{k}", pattern))
        else:
            found = sorted(glob.glob(pattern))
        if not found:
            raise FileNotFoundError(f"{pattern}: matches no file")
        out.extend(found)
    return out


def exists(path: str) -> bool:
    if is_remote(path):
        folder, name = _split(path)
        return _store(folder).read(name, byte_range=slice(0, 0)).result().state == "value"
    return os.path.exists(path)


def stamp(path: str) -> str:
    """What changes when a file changes (size and mtime; an object's generation), for fingerprints."""
    if is_remote(path):
        folder, name = _split(path)
        result = _store(folder).read(name, byte_range=slice(0, 0)).result()
        if result.state != "value":
            raise FileNotFoundError(f"{path}: no such file")
        return result.stamp.generation.hex()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


class Blob:
    """One file's bytes by range: os.pread locally, TensorStore byte-range reads for URLs
    (issued together, so a batch of rows from object storage costs one round trip)."""

    def __init__(self, path: str):
        self.path = path
        if is_remote(path):
            folder, self.key = _split(path)
            self.store, self.fd = _store(folder), None
        else:
            self.store, self.fd = None, os.open(path, os.O_RDONLY)

    def request(self, ranges: Sequence[tuple[int, int]]) -> Callable[[], list[bytes]]:
        """Start reading byte ranges; the returned function waits for them (URL reads of several
        files started before any wait overlap)."""
        if self.store is None:
            data = [os.pread(self.fd, stop - start, start) for start, stop in ranges]
            return lambda: data
        futures = [self.store.read(self.key, byte_range=slice(start, stop)) for start, stop in ranges]
        return lambda: [f.result().value for f in futures]

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return self.request(ranges)()

    def read(self, start: int, stop: int) -> bytes:
        return self.read_many([(start, stop)])[0]

    def close(self, _close=os.close) -> None:  # os.close bound early: __del__ may run at interpreter exit
        if self.fd is not None:
            _close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()


class _UrlStream(io.RawIOBase):
    """A URL read front to back in blocks (the size is not known up front)."""

    def __init__(self, path: str, block: int = 8 << 20):
        folder, self.key = _split(path)
        self.store, self.block, self.pos, self.done = _store(folder), block, 0, False
        if self.store.read(self.key, byte_range=slice(0, 0)).result().state != "value":
            raise FileNotFoundError(f"{path}: no such file")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.done:
            return 0
        want = min(len(buffer), self.block)
        try:
            data = self.store.read(self.key, byte_range=slice(self.pos, self.pos + want)).result().value
        except ValueError:  # OUT_OF_RANGE: the last, shorter block
            data = self.store.read(self.key, byte_range=slice(self.pos, None)).result().value
            self.done = True
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_text(path: str) -> io.TextIOBase:
    """A text file (UTF-8) streamed front to back, local or URL, without reading it whole."""
    if is_remote(path):
        return io.TextIOWrapper(io.BufferedReader(_UrlStream(path), 1 << 20), encoding="utf-8")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    return open(path, encoding="utf-8")


def write_bytes(path: str, chunks: Sequence[bytes | memoryview]) -> None:
    """Write a file whole: locally to a temporary sibling, fsync, rename; a URL in one PUT."""
    if is_remote(path):
        folder, name = _split(path)
        _store(folder).write(name, b"".join(bytes(c) for c in chunks)).result()
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_names(folder: str) -> list[str]:
    """Names of the files directly in a folder (empty when it does not exist)."""
    if is_remote(folder):
        return sorted(k.decode() for k in _store(folder).list().result() if b"/" not in k)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def remove(path: str) -> None:
    if is_remote(path):
        folder, name = _split(path)
        _store(folder).delete_range(ts.KvStore.KeyRange(name, name + "\0")).result()
    elif os.path.exists(path):
        os.remove(path)


def iter_lines(path: str, limit: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, streamed; a line that is not UTF-8, or longer than
    `limit` bytes (read no further than that), is named."""
    with open_text(path) as f:
        raw = f.buffer
        n = 0
        while line := raw.readline(-1 if limit is None else limit + 1):
            n += 1
            if limit is not None and len(line) > limit and not line.endswith(b"\n"):
                size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
                raise ValueError(f"{path}:{n}: a line longer than {size}, the most one record may hold; split "
                                 "the record")
            try:
                yield n, line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {line[e.start]:#04x})") from None


def read_utf8(f: io.TextIOBase, size: int, path: str) -> str:
    """f.read(size) of a text file, naming the file when its bytes are not UTF-8."""
    try:
        return f.read(size)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
