"""Checksums of every file of a checkpoint: `checksums.json` written when it is saved, verified
whenever it is loaded, so flipped bits, truncated files or edited metadata stop the load with the
file's name instead of returning wrong weights.

One manifest per saved thing: `CKPT/checksums.json` (save_checkpoint, the converter) and
`RUN/N/checksums.json` (each training step, written inside Orbax's temporary step folder before
its atomic rename). It maps each file's path (relative to the manifest's folder) to its size and
xxh3-64 digest. Why a manifest and not zarr3's crc32c codec: see README "Safety and recovery".
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import xxhash

MANIFEST = "checksums.json"
UNCHECKED = (MANIFEST, "_CHECKPOINT_METADATA")  # Orbax rewrites the latter's timestamps after saving; no weights
ALGORITHM = "xxh3_64"
_BLOCK = 16 << 20


class CorruptCheckpoint(ValueError):
    """A file of a checkpoint differs from what was saved (damaged, truncated, edited or missing)."""


def digest(data: bytes | memoryview) -> str:
    """The digest the manifest records for a file's bytes (also for bytes still in memory)."""
    return xxhash.xxh3_64_hexdigest(data)


def file_digest(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if name not in UNCHECKED:
                out.append(os.path.relpath(os.path.join(root, name), folder))
    return out


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def write_manifest(folder: str, known: dict[str, str] | None = None) -> None:
    """Hash every file under `folder` into `folder/checksums.json` (atomically).

    `known`: digests of files whose bytes were hashed while still in memory (the converter's
    chunks), keyed by relative path; the others are read back from disk.
    """
    known = known or {}
    files = _files(folder)
    with ThreadPoolExecutor(_workers()) as pool:  # xxhash and file reads release the GIL
        digests = list(pool.map(lambda rel: known.get(rel) or file_digest(os.path.join(folder, rel)), files))
    entries = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "xxh3": d} for rel, d in zip(files, digests)}
    manifest = {"algorithm": ALGORITHM, "files": entries}
    path = os.path.join(folder, MANIFEST)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: str) -> dict[str, dict] | None:
    """{relative path: {"size", "xxh3"}} of a folder's manifest; None when it has none."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode())
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpoint(f"{path}: damaged checksum manifest ({e}); the checkpoint cannot be verified") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("algorithm") != ALGORITHM or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("xxh3"), str)
            for e in files.values()):
        raise CorruptCheckpoint(f"{path}: damaged checksum manifest (expected {{'algorithm': '{ALGORITHM}', "
                                "'files': {path: {'size': int, 'xxh3': str}}}); the checkpoint cannot be verified")
    return files


def verify(folder: str, under: Iterable[str] = ("",)) -> bool:
    """Check the files of `folder`'s manifest whose paths start with one of `under` (all by default).

    Returns False when the folder has no manifest (saved before checksums existed); raises
    CorruptCheckpoint naming the first bad files otherwise. In a multi-host job each process
    checks its share of the files and all of them learn the verdict.
    """
    files = read_manifest(folder)
    if files is None:
        return False
    prefixes = tuple(under)
    todo = sorted(rel for rel in files if rel.startswith(prefixes))
    import jax

    count, index = jax.process_count(), jax.process_index()
    mine = todo[index::count]

    def problem(rel: str) -> str | None:
        path, want = os.path.join(folder, rel), files[rel]
        if not os.path.isfile(path):
            return f"{path}: missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{path}: {size} bytes, {want['size']} when saved (truncated or overwritten)"
        if file_digest(path) != want["xxh3"]:
            return f"{path}: checksum mismatch (the bytes changed after saving)"
        return None

    with ThreadPoolExecutor(_workers()) as pool:
        problems = [p for p in pool.map(problem, mine) if p]
    if count > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        bad = int(np.sum(multihost_utils.process_allgather(np.int32(len(problems)))))
        if bad and not problems:
            problems = [f"{folder}: {bad} damaged file(s), found by another host (see its error)"]
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CorruptCheckpoint(f"damaged checkpoint: {'; '.join(problems[:2])}{more}")
    return True
