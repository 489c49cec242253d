"""One writer per folder: a lock file that names its holder, and the clean-up of what killed
writers left behind (`OUT.tmp-PID`, `OUT.old-PID`, half-written small files).

The lock is an flock(2) on a small file. The kernel drops it when the holder exits for any
reason (kill -9 included), so a lock whose holder is dead is simply taken over; nobody has to
delete anything. The file holds the holder's pid, host, start time and command, so a refused
writer can say who holds the folder. A network filesystem that keeps a dead host's locks is the
one case that needs a person: the message says which file to delete.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from typing import Any, Iterator

from llama_jax.errors import note


class FolderInUse(FileExistsError):
    """Another live process writes this folder (a training run, a conversion to the same OUT)."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:300]}


def _describe(holder: dict) -> str:
    parts = [f"pid {holder.get('pid', '?')}"]
    parts += [f"on {holder['host']}"] if holder.get("host") else []
    parts += [f"since {holder['since']}"] if holder.get("since") else []
    parts += [f"({holder['command']})"] if holder.get("command") else []
    return " ".join(parts)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # empty or damaged: nobody we can name
        return {}


class FolderLock:
    """An exclusive lock held while the `with` block runs; `what` names the folder in messages.

    Refuses at once (FolderInUse, naming the holder) when a live process holds it; takes over,
    with a note, a lock whose holder died. The lock file is removed on release.
    """

    def __init__(self, path: str, what: str):
        self.path, self.what = str(path), what
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderInUse(
                    f"{self.what} is in use by {_describe(holder) if holder else 'another process'}; wait for it "
                    f"to finish. If that process is gone (a crashed machine, or a network filesystem that keeps "
                    f"its locks), delete {self.path}") from None
            except OSError as e:  # a filesystem without flock: fall back to the pid in the file
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                if holder and (holder.get("host") != socket.gethostname() or pid_alive(int(holder.get("pid", 0)))):
                    os.close(fd)
                    raise FolderInUse(f"{self.what} is in use by {_describe(holder)} (this filesystem has no "
                                      f"locks, so the pid decides); if that process is gone, delete {self.path}")
            # A holder that finished unlinks the file; we must hold the file that is at the path now.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            note(f"{self.what}: took over the lock of {_describe(previous)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: the next writer then creates a fresh file
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def locked_folder(folder: str, lock_name: str, what: str) -> Iterator[None]:
    """Create `folder` (like mkdir -p) and hold its lock file `lock_name` (a FolderLock) while the
    `with` block runs; a folder created here and left empty (a refused or failed run) is removed."""
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        with FolderLock(os.path.join(folder, lock_name), what):
            yield
    finally:
        if created and not os.listdir(folder):
            with contextlib.suppress(OSError):  # another writer's lock appeared meanwhile: not ours to remove
                os.rmdir(folder)


def clean_leftovers(out: str) -> None:
    """Remove `OUT.tmp-PID` and `OUT.old-PID` siblings whose writer (PID) is dead, saying so.

    Call it while holding OUT's lock. An `OUT.old-PID` with no OUT beside it is the previous
    complete OUT of an overwrite killed between its two renames: it is put back, not deleted.
    """
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return
    pattern = re.compile(re.escape(name) + r"\.(old|tmp)-(\d+)")
    found = sorted((m.group(1), int(m.group(2)), entry) for entry in os.listdir(parent)
                   if (m := pattern.fullmatch(entry)))
    for kind, pid, entry in found:  # "old" sorts before "tmp": restore first, then drop the new copy
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(parent, entry)
        if kind == "old" and not os.path.lexists(out):
            os.rename(path, out)
            note(f"restored {out} from {entry}: an overwrite was killed (pid {pid}) before it finished")
            continue
        remove(path)
        note(f"removed {path}, left by a writer that was killed (pid {pid} is not running)")


def clean_run_leftovers(run_dir: str) -> None:
    """In a training run folder: half-written small files (`NAME.tmp-PID`) of dead processes and
    unfinished Orbax step saves (`N.orbax-checkpoint-tmp-*`). Call it while holding the run's lock."""
    for entry in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, entry)
        small = re.fullmatch(r".+\.tmp-(\d+)", entry)
        if small and not pid_alive(int(small.group(1))):
            remove(path)
            note(f"removed {path}, left by a writer that was killed (pid {small.group(1)} is not running)")
        step = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", entry)
        if step:
            remove(path)
            note(f"removed {path}: the save of step {step.group(1)} was interrupted (never complete)")


def remove(path: str) -> None:
    """Delete a file, a link or a folder tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
