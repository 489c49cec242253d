"""A training run's folder: numbered step folders written by an Orbax CheckpointManager (items
params / opt_state / train_state, plus checksums.json) beside the run's config.json. The one place
that knows this layout."""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from llama_jax.checkpoint.integrity import CorruptCheckpoint, verify, write_manifest
from llama_jax.checkpoint.orbax_glue import NoOrbaxTracebacks
from llama_jax.errors import note
from sharding import is_main_process

ITEMS = ("params", "opt_state", "train_state")  # the items of every step folder


def complete_steps(run_dir: str) -> list[int]:
    """The steps of a local run folder whose params are complete (Orbax wrote their _METADATA), newest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted((int(name) for name in os.listdir(run_dir) if name.isdigit()
                   and os.path.isfile(os.path.join(run_dir, name, "params", "_METADATA"))), reverse=True)


class RunCheckpoints:
    """Orbax CheckpointManager for a run folder: async saves, keep-last-N, atomic step folders.

    Each step folder gets its checksums.json before it appears: with async saves, Orbax calls
    back once every host has written its files and before it renames the temporary step folder
    into place (the main process then hashes the step); synchronous saves hash right after.
    """

    def __init__(self, run_dir: str, keep: int, async_save: bool = True):
        self.dir = os.path.abspath(run_dir)
        self.async_save = async_save
        self.saving: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._checksum_unrenamed_step)
            if async_save else None)
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=ITEMS)
        self.quiet = NoOrbaxTracebacks()
        logging.getLogger("absl").addFilter(self.quiet)

    def _checksum_unrenamed_step(self) -> None:
        """Orbax's post-finalization callback (main process, all files written, not yet renamed)."""
        folders = glob.glob(os.path.join(self.dir, f"{self.saving}.orbax-checkpoint-tmp*"))
        if len(folders) != 1:
            raise RuntimeError(f"{self.dir}: expected one unfinished folder of step {self.saving}, found {folders}")
        write_manifest(folders[0])

    def check_room(self, state: dict) -> None:
        """Refuse, before any file is written, a disk that cannot hold one more step (else a full disk
        would stop the run only at a save, after the work since the last one)."""
        if not os.path.isdir(self.dir):  # another host's folder (multi-host, local disks): its own check
            return
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))
        free = shutil.disk_usage(self.dir).free
        if free < need * 1.05:
            raise OSError(errno.ENOSPC, f"{self.dir}: {free / 2**20:,.1f} MiB free, a checkpoint needs about "
                                        f"{need / 2**20:,.1f} MiB; free some space or choose another output_dir")

    def save(self, step: int, state: dict, train_state: dict) -> None:
        """Start saving step `step` ({"params", "opt_state"} arrays + a JSON train_state); returns at once."""
        self.manager.wait_until_finished()  # one save in flight: the callback knows which step it hashes
        self.check_room(state)
        self.saving = step
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            train_state=ocp.args.JsonSave(train_state)), force=True)
        if not self.async_save and is_main_process():
            write_manifest(os.path.join(self.dir, str(step)))

    def restore_newest(self, abstract_state: dict) -> tuple[dict, dict] | None:
        """(state, train_state) of the newest step that restores, or None when there is none.

        A newer step that fails while an older one restores was cut short or damaged: it is moved
        aside (`N.corrupt-TIME`) with a warning. When no step restores, nothing is moved and the
        run stops: the settings changed (model, optimizer), not the files.
        """
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                if not verify(os.path.join(self.dir, str(step))):
                    note(f"step {step} in {self.dir} has no checksums.json (saved before llama_jax wrote "
                         "checksums): restored unverified")
                out = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                    train_state=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - judged below, once we know whether any step restores
                failed.append((step, e))
                continue
            for bad, error in failed:
                corrupt = os.path.join(self.dir, f"{bad}.corrupt-{int(time.time())}")
                note(f"checkpoint step {bad} in {self.dir} could not be restored ({type(error).__name__}: "
                     f"{_one_line(error)}); moved it to {corrupt} and resumed from step {step}")
                if is_main_process():
                    os.rename(os.path.join(self.dir, str(bad)), corrupt)
            if failed:
                self.manager.reload()
            state = {"params": out["params"], "opt_state": out["opt_state"],
                     "step": jnp.asarray(out["train_state"]["step"], jnp.int32)}
            return state, dict(out["train_state"])
        if failed and all(isinstance(e, CorruptCheckpoint) for _, e in failed):
            raise CorruptCheckpoint(f"{self.dir}: every checkpoint is damaged ({failed[0][1]}); nothing was moved. "
                                    "Restore the files from a backup, or start a new output_dir")
        if failed:
            step, error = failed[0]
            raise ValueError(
                f"{self.dir} holds checkpoints (newest: step {step}) that none of this run's settings can "
                f"restore ({type(error).__name__}: {_one_line(error)}). Did the model or optimizer settings "
                "change (e.g. model.overrides, optim.clip_norm)? Resume with the run's own settings "
                f"({os.path.join(self.dir, 'train_config.yaml')}) or start a new output_dir.")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        finally:
            logging.getLogger("absl").removeFilter(self.quiet)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
