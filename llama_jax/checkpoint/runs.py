"""A training run's folder: numbered step folders written by an Orbax CheckpointManager (items
params / opt_state / train_state) beside the run's config.json. The one place that knows this layout."""

from __future__ import annotations

import os
import time
import warnings

import jax.numpy as jnp
import orbax.checkpoint as ocp

from sharding import is_main_process

ITEMS = ("params", "opt_state", "train_state")  # the items of every step folder


def complete_steps(run_dir: str) -> list[int]:
    """The steps of a local run folder whose params are complete (Orbax wrote their _METADATA), newest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted((int(name) for name in os.listdir(run_dir) if name.isdigit()
                   and os.path.isfile(os.path.join(run_dir, name, "params", "_METADATA"))), reverse=True)


class RunCheckpoints:
    """Orbax CheckpointManager for a run folder: async saves, keep-last-N, atomic step folders."""

    def __init__(self, run_dir: str, keep: int, async_save: bool = True):
        self.dir = os.path.abspath(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=ITEMS)

    def save(self, step: int, state: dict, train_state: dict) -> None:
        """Start saving step `step` ({"params", "opt_state"} arrays + a JSON train_state); returns at once."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            train_state=ocp.args.JsonSave(train_state)), force=True)

    def restore_newest(self, abstract_state: dict) -> tuple[dict, dict] | None:
        """(state, train_state) of the newest step that restores, or None when there is none.

        A newer step that fails while an older one restores was cut short or damaged: it is moved
        aside (`N.corrupt-TIME`) with a warning. When no step restores, nothing is moved and the
        run stops: the settings changed (model, optimizer), not the files.
        """
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                    train_state=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - judged below, once we know whether any step restores
                failed.append((step, e))
                continue
            for bad, error in failed:
                corrupt = os.path.join(self.dir, f"{bad}.corrupt-{int(time.time())}")
                warnings.warn(f"checkpoint step {bad} in {self.dir} could not be restored "
                              f"({type(error).__name__}: {str(error)[:300]}); moved it to {corrupt} and "
                              f"resumed from step {step}")
                if is_main_process():
                    os.rename(os.path.join(self.dir, str(bad)), corrupt)
            if failed:
                self.manager.reload()
            state = {"params": out["params"], "opt_state": out["opt_state"],
                     "step": jnp.asarray(out["train_state"]["step"], jnp.int32)}
            return state, dict(out["train_state"])
        if failed:
            step, error = failed[0]
            raise ValueError(
                f"{self.dir} holds checkpoints (newest: step {step}) that none of this run's settings can "
                f"restore ({type(error).__name__}: {str(error)[:300]}). Did the model or optimizer settings "
                "change (e.g. model.overrides, optim.clip_norm)? Resume with the run's own settings "
                f"({os.path.join(self.dir, 'train_config.yaml')}) or start a new output_dir.")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
