"""Files of a checkpoint, local or remote: small text files, copies, and the staging folder that
makes a local checkpoint appear only when complete (write a temporary sibling, fsync, rename)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import tensorstore as ts

from llama_jax.checkpoint.integrity import write_manifest
from llama_jax.checkpoint.locks import FolderLock, clean_leftovers, remove


def is_remote(path: str) -> bool:
    """gs://, s3://, ... destinations: TensorStore/epath write them directly (no atomic rename)."""
    return "://" in str(path)


def join(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


def kvstore(path: str) -> dict | str:
    """A TensorStore kvstore spec for a folder (local path or URL)."""
    if is_remote(path):
        return str(path).rstrip("/") + "/"
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def write_text(path: str, text: str) -> None:
    """Write a small text file (UTF-8), locally via a temporary sibling and a rename (atomic), or to a URL."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file, locally via a temporary sibling and a rename (atomic), or to a URL."""
    if is_remote(path):
        folder, name = str(path).rsplit("/", 1)
        ts.KvStore.open(kvstore(folder)).result().write(name, data).result()
    else:  # a temporary sibling, then rename: a reader never sees half a file
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def read_bytes(path: str) -> bytes | None:
    """A file's bytes (local path or URL), or None when it does not exist."""
    if is_remote(path):
        folder, name = str(path).rsplit("/", 1)
        result = ts.KvStore.open(kvstore(folder)).result().read(name).result()
        return result.value if result.state == "value" else None
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str | None:
    """A small text file's contents, or None when it does not exist; bytes that are not UTF-8
    raise an error naming the file."""
    data = read_bytes(path)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_json(path: str, expected: type = dict, what: str = "a JSON object") -> Any:
    """A JSON file's value, or one error naming the file when it is missing, not UTF-8, not valid
    JSON (nesting too deep included) or not of the `expected` type (`what` says what was expected)."""
    text = read_text(path)
    if text is None:
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    return parse_json(text, path, expected, what)


def parse_json(text: str, path: str, expected: type = dict, what: str = "a JSON object") -> Any:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply; expected {what}") from None
    if not isinstance(value, expected):
        kind = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
        raise ValueError(f"{path}: expected {what}, got a JSON {kind.get(type(value), 'null')}")
    return value


def copy_file(src: str, dst: str) -> None:
    """Copy a small file between local paths and URLs."""
    if is_remote(src) or is_remote(dst):
        data = read_bytes(src)
        if data is None:
            raise FileNotFoundError(f"{src}: no such file")
        if is_remote(dst):
            folder, name = dst.rsplit("/", 1)
            ts.KvStore.open(kvstore(folder)).result().write(name, data).result()
        else:
            with open(dst, "wb") as f:
                f.write(data)
    else:
        shutil.copyfile(src, dst)


def barrier(name: str) -> None:
    """Wait for every process of a multi-host job (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_apart(out: str, sources: tuple[str, ...]) -> None:
    """Refuse an output that is, contains or lies inside one of its sources (links resolved):
    writing it would replace or delete the source before the new copy exists."""
    if is_remote(out):
        return
    target = os.path.realpath(out)
    for src in sources:
        if is_remote(src):
            continue
        source = os.path.realpath(src)
        if target == source:
            relation = "is the same folder as"
        elif target.startswith(source.rstrip(os.sep) + os.sep):
            relation = "lies inside"
        elif source.startswith(target.rstrip(os.sep) + os.sep):
            relation = "contains"
        else:
            continue
        raise ValueError(f"output {out} {relation} the source {src} (resolved: {target} vs {source}); "
                         "write to a folder outside the source")


class OutputExists(FileExistsError):
    """The output folder exists and overwrite was not asked for (command lines name their --overwrite)."""

    def __init__(self, path: str):
        super().__init__(f"{path} already exists; pass overwrite=True to replace it")
        self.path = path


class Staging:
    """Write into a temporary sibling of `out`; `commit()` renames it to `out` when complete.

    Before anything is written: `out` must not overlap `sources`; an existing `out` is only
    replaced with overwrite=True (and only at commit); `OUT.lock` is taken, so two writers of
    the same `out` never replace each other (the second stops, naming the first); leftovers of
    killed writers of `out` are cleaned up. checksums=True writes `checksums.json` (see
    integrity.py) at commit; `known` takes digests computed while the bytes were in memory.
    URL destinations are written in place: there is no rename on object stores, so config.json
    is written last (and there is no lock or manifest). In a multi-host job every process writes
    its shards into the same sibling and process 0 alone locks, creates and renames it, between
    barriers.
    """

    def __init__(self, out: str, overwrite: bool = False, sources: tuple[str, ...] = (), checksums: bool = True):
        self.out, self.overwrite, self.checksums = str(out), overwrite, checksums
        self.known: dict[str, str] = {}
        self.main = jax.process_index() == 0
        self.lock: FolderLock | None = None
        if is_remote(self.out):
            self.path = self.out
            return
        check_apart(self.out, sources)
        self.out = os.path.abspath(self.out)
        self._refuse_existing()
        os.makedirs(os.path.dirname(self.out), exist_ok=True)  # like mkdir -p: "out/llama2-7b" just works
        shared = jax.process_count() > 1  # every process must name the same folder
        self.path = f"{self.out}.tmp-{'multihost' if shared else os.getpid()}"
        if self.main:
            self.lock = FolderLock(f"{self.out}.lock", self.out).acquire()
            try:
                clean_leftovers(self.out)
                self._refuse_existing()  # a writer that finished while we waited, or a restored OUT
                shutil.rmtree(self.path, ignore_errors=True)
                os.makedirs(self.path)
            except BaseException:
                self.lock.release()
                raise
        barrier(f"staging {self.path}")

    def _refuse_existing(self) -> None:
        if os.path.lexists(self.out) and not self.overwrite:
            raise OutputExists(self.out)

    def commit(self) -> None:
        if is_remote(self.out):
            return
        barrier(f"written {self.path}")
        if self.main:
            try:
                if self.checksums:
                    write_manifest(self.path, self.known)
                fsync_tree(self.path)  # every byte on disk before the name says the checkpoint is complete
                self._refuse_existing()
                if os.path.lexists(self.out):
                    old = f"{self.out}.old-{os.getpid()}"
                    os.rename(self.out, old)
                    try:
                        os.rename(self.path, self.out)
                    except BaseException:
                        os.rename(old, self.out)
                        raise
                    remove(old)
                else:
                    os.rename(self.path, self.out)
            except BaseException:
                self.abort()
                raise
            self.lock.release()
        barrier(f"committed {self.out}")

    def abort(self) -> None:
        if not is_remote(self.out) and self.main:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
