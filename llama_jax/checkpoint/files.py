"""Files of a checkpoint, local or remote: small text files, copies, and the staging folder that
makes a local checkpoint appear only when complete (write a temporary sibling, fsync, rename)."""

from __future__ import annotations

import os
import shutil

import jax
import tensorstore as ts


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
    """Write a small text file, locally via a temporary sibling and a rename (atomic), or to a URL."""
    if is_remote(path):
        folder, name = str(path).rsplit("/", 1)
        ts.KvStore.open(kvstore(folder)).result().write(name, text.encode()).result()
    else:  # a temporary sibling, then rename: a reader never sees half a file
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
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
    """A small text file's contents, or None when it does not exist."""
    data = read_bytes(path)
    return None if data is None else data.decode()


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


class OutputExists(FileExistsError):
    """The output folder exists and overwrite was not asked for (command lines name their --overwrite)."""

    def __init__(self, path: str):
        super().__init__(f"{path} already exists; pass overwrite=True to replace it")
        self.path = path


class Staging:
    """Write into a temporary sibling of `out`; `commit()` renames it to `out` when complete.

    An existing `out` is only replaced with overwrite=True (and only at commit). URL destinations
    are written in place: there is no rename on object stores, so config.json is written last.
    In a multi-host job every process writes its shards into the same sibling and process 0
    alone creates and renames it, between barriers.
    """

    def __init__(self, out: str, overwrite: bool = False):
        self.out = str(out)
        self.main = jax.process_index() == 0
        if is_remote(self.out):
            self.path = self.out
            return
        self.out = os.path.abspath(self.out)
        if os.path.exists(self.out) and not overwrite:
            raise OutputExists(self.out)
        os.makedirs(os.path.dirname(self.out), exist_ok=True)  # like mkdir -p: "out/llama2-7b" just works
        shared = jax.process_count() > 1  # every process must name the same folder
        self.path = f"{self.out}.tmp-{'multihost' if shared else os.getpid()}"
        if self.main:
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path)
        barrier(f"staging {self.path}")

    def commit(self) -> None:
        if is_remote(self.out):
            return
        barrier(f"written {self.path}")
        if self.main:
            fsync_tree(self.path)  # every byte on disk before the name says the checkpoint is complete
            if os.path.exists(self.out):
                old = f"{self.out}.old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.path, self.out)
                shutil.rmtree(old)
            else:
                os.rename(self.path, self.out)
        barrier(f"committed {self.out}")

    def abort(self) -> None:
        if not is_remote(self.out) and self.main:
            shutil.rmtree(self.path, ignore_errors=True)

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
