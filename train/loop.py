"""The training loop: data -> sharded train step -> metrics and Orbax checkpoints, resumable.

A run folder `output_dir/` holds:
- `config.json`: the model config in lj.save_checkpoint's format, so lj.load_checkpoint(output_dir)
  loads the newest step's params;
- `N/` step folders from an Orbax CheckpointManager with items "params" (the same PyTree format
  as lj.save_checkpoint), "opt_state", and "train_state" (JSON: step, data index, RNG key);
- `metrics.jsonl` (one {"step": .., "loss": .., ...} per logged step), `tb/` (TensorBoard),
  `train_config.yaml` (the resolved recipe).

The same command resumes from the newest checkpoint that restores; a newer one that does not
(e.g. cut short by a crash) is set aside as `N.corrupt` with a warning. SIGTERM (preemption)
saves the current step and exits cleanly. A non-finite loss or gradient stops the run before it
is saved, so the last good checkpoint stays the newest.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

import llama_jax as lj
from llama_jax.checkpoint import read_config, write_config, write_text
from sharding import global_batch, is_main_process, make_mesh
from train import data as data_lib
from train import step as step_lib
from train.config import TrainConfig
from train.evaluate import exact_match, per_task, report


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving that state."""


def model_config(cfg: TrainConfig) -> tuple[lj.LlamaConfig, str | None]:
    """The architecture (preset + overrides, or the init_from checkpoint's) with the run's dtype/remat."""
    run = dict(dtype=cfg.model.dtype, remat=cfg.model.remat, param_dtype="float32")
    if cfg.init_from is not None:  # local or gs://...: read_config names a missing checkpoint
        return read_config(cfg.init_from).replace(**cfg.model.overrides, **run), cfg.init_from
    return lj.LlamaConfig.preset(cfg.model.preset, **cfg.model.overrides, **run), None


class Checkpoints:
    """Orbax CheckpointManager for the run folder: async saves, keep-last-N, atomic step folders."""

    def __init__(self, cfg: TrainConfig):
        self.dir = os.path.abspath(cfg.output_dir)
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpointing,
            cleanup_tmp_directories=True)
        self.items = ("params", "opt_state", "train_state")
        self.manager = ocp.CheckpointManager(self.dir, options=self.options, item_names=self.items)

    def save(self, step: int, state: dict, train_state: dict) -> None:
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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MetricsLog:
    """metrics.jsonl (+ TensorBoard) on the main process; a resumed run drops lines past its step."""

    def __init__(self, cfg: TrainConfig, resumed_step: int):
        self.main = is_main_process()
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.tb = None
        if not self.main:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill
                        continue
                    if record.get("step", 0) <= resumed_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        write_text(self.path, "".join(kept))
        self.file = open(self.path, "a")
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tb"))

    def write(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def run(cfg: TrainConfig) -> dict:
    """Train (or resume) as the recipe says; returns a summary (final loss, eval accuracy, times)."""
    t_start = time.time()
    main = is_main_process()
    say = print if main else (lambda *a, **k: None)
    os.makedirs(cfg.output_dir, exist_ok=True)

    # The model and mesh are checked first: tokenizing the data set can take minutes.
    mcfg, init_path = model_config(cfg)
    if cfg.data.max_len > mcfg.max_seq_len:
        raise ValueError(f"data.max_len {cfg.data.max_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg=mcfg, batch=cfg.batch_size)
    micro = cfg.batch_size // cfg.grad_accum
    groups = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % groups:
        raise ValueError(f"microbatch {micro} (batch_size / grad_accum) is not divisible by data x fsdp = {groups}")

    saved_config = os.path.join(cfg.output_dir, "config.json")
    if os.path.exists(saved_config):  # resuming: the architecture must be the one the run started with
        before = read_config(cfg.output_dir)
        shape_fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")
        changed = {f: (getattr(before, f), getattr(mcfg, f)) for f in shape_fields
                   if getattr(before, f) != getattr(mcfg, f)}
        if changed:
            raise ValueError(f"{cfg.output_dir} holds a run of a different model ({changed}, as (saved, now)); "
                             "use a new output_dir or the run's own settings")

    tokenizer = lj.Tokenizer(cfg.tokenizer)
    rows, data_summary = data_lib.build_rows(cfg.data.format, cfg.data.train, tokenizer, cfg.data.max_len,
                                             cfg.data.pack, cfg.seed, cfg.data.text_key)
    batches = data_lib.Batches(rows, cfg.batch_size, cfg.seed, jax.process_index(), jax.process_count())
    steps = cfg.steps or int(math.ceil(cfg.epochs * batches.per_epoch))
    say(f"data: {data_summary['examples']} examples -> {data_summary['rows']} rows of {data_summary['row_len']} "
        f"tokens, {data_summary['truncated']} truncated to max_len {cfg.data.max_len}; "
        f"{batches.per_epoch} batches of {cfg.batch_size} per epoch; {steps} steps")

    warmup = step_lib.warmup_steps_for(steps, cfg.optim.warmup_steps, cfg.optim.warmup_ratio)
    schedule = step_lib.lr_schedule(cfg.optim.lr, steps, cfg.optim.schedule, warmup, cfg.optim.min_lr_ratio)
    optimizer = step_lib.make_optimizer(schedule, cfg.optim.b1, cfg.optim.b2, cfg.optim.eps,
                                        cfg.optim.weight_decay, cfg.optim.clip_norm)
    shardings = step_lib.state_shardings(mcfg, optimizer, mesh)
    seq = cfg.data.max_len
    train_step = step_lib.make_train_step(mcfg, optimizer, schedule, mesh, (cfg.batch_size, seq),
                                          cfg.grad_accum, cfg.optim.z_loss)

    if main:
        write_config(cfg.output_dir, mcfg.replace(dtype="float32"))
        write_text(os.path.join(cfg.output_dir, "train_config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    ckpts = Checkpoints(cfg)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(lambda p: step_lib.init_state(p, optimizer), lj.param_shapes(mcfg)),
                            shardings)
    with jax.set_mesh(mesh):
        restored = ckpts.restore_newest(abstract)
        if restored is not None:
            state, train_state = restored
            if train_state.get("data_rows") != batches.num_rows:
                raise ValueError(f"{cfg.output_dir}: the checkpoint was trained on {train_state.get('data_rows')} "
                                 f"rows but the data now gives {batches.num_rows}; resume with the same data "
                                 "and max_len, or use a new output_dir")
            rng = jax.random.wrap_key_data(jnp.asarray(train_state["rng"], jnp.uint32))
            say(f"resumed from step {train_state['step']} in {cfg.output_dir}")
        else:
            rng = jax.random.key(cfg.seed)
            init_rng, rng = jax.random.split(rng)
            if init_path is not None:
                _, params = lj.load_checkpoint(init_path, mesh=mesh, dtype="float32")
                say(f"initialised from {init_path}")
            else:
                params = lj.init_params(mcfg, init_rng)
            state = jax.jit(lambda p: step_lib.init_state(p, optimizer), out_shardings=shardings,
                            donate_argnums=0)(params)
            train_state = {"step": 0}
    start = int(train_state["step"])
    log = MetricsLog(cfg, start)
    summary: dict[str, Any] = {"steps": steps, "start_step": start, "data": data_summary}

    eval_records = []
    if cfg.eval.data:
        eval_records = data_lib.load_alpaca(cfg.eval.data)
        eval_records = eval_records[: cfg.eval.examples or len(eval_records)]

    def evaluate(step: int, name: str) -> None:
        with jax.set_mesh(mesh):
            acc, rows_out = exact_match(state["params"], mcfg, tokenizer, eval_records, cfg.eval.max_new_tokens)
        summary[f"eval_{name}"], summary[f"eval_{name}_per_task"] = acc, per_task(rows_out)
        log.write({"step": step, "eval_exact_match": acc})
        for line in report(rows_out, name, n_examples=3 if name == "before" else 8):
            say(line)

    if eval_records and start == 0:
        evaluate(0, "before")

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    peak = cfg.peak_tflops or step_lib.peak_tflops(jax.devices()[0])
    tokens_per_step = cfg.batch_size * seq
    pending: list[tuple[int, Any]] = []
    last_saved = start
    timer = {"t": time.time(), "steps": 0, "compile_s": None}
    recent_losses: collections.deque = collections.deque(maxlen=50)

    def flush() -> None:
        """Fetch pending metrics, stop on NaN/inf, log them with throughput."""
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        now = time.time()
        if timer["compile_s"] is None:  # the first fetch includes compiling the step
            timer["compile_s"] = now - t_loop
            summary["first_step_s"] = timer["compile_s"]
            elapsed, n = None, 0
        else:
            elapsed, n = now - timer["t"], len(pending)
        timer["t"] = now
        for (s, _), m in zip(pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                raise TrainingDiverged(
                    f"step {s}: loss {m['loss']}, grad norm {m['grad_norm']}: training diverged. Stopped without "
                    f"saving; the last good checkpoint is step {last_saved} in {cfg.output_dir}. Lower optim.lr, "
                    "raise warmup, or check the data.")
            record = {"step": s, **m}
            if elapsed:
                step_s = elapsed / n
                record.update(step_time_s=step_s, tokens_per_s=tokens_per_step / step_s,
                              mfu=step_lib.mfu(tokens_per_step / step_s, mcfg, seq, jax.device_count(), peak))
            log.write(record)
            summary["loss"] = m["loss"]
            summary.setdefault("first_loss", m["loss"])
            recent_losses.append(m["loss"])  # the summary's loss_last50: less noisy than one step
            summary["loss_last50"] = sum(recent_losses) / len(recent_losses)
        bar.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{fetched[-1]['lr']:.2e}")
        pending.clear()

    def save(step: int) -> None:
        nonlocal last_saved
        flush()  # never save a state whose loss was not checked
        ckpts.save(step, state, {"step": step, "data_index": step, "data_rows": batches.num_rows,
                                 "rng": np.asarray(jax.random.key_data(rng)).tolist()})
        last_saved = step

    bar = tqdm(total=steps, initial=start, disable=not main, desc="train", dynamic_ncols=True)
    t_loop = time.time()
    try:
        with jax.set_mesh(mesh):
            for k in range(start, steps):
                batch = global_batch(batches(k), mesh)
                state, metrics = train_step(state, batch)
                s = k + 1
                pending.append((s, metrics))
                bar.update(1)
                if s % cfg.log_every == 0 or s == steps:
                    flush()
                if s % cfg.checkpoint_every == 0 or s == steps:
                    save(s)
                if stop["signal"] is not None:
                    if last_saved != s:
                        save(s)
                    ckpts.manager.wait_until_finished()
                    say(f"\nSIGTERM: saved step {s} to {cfg.output_dir}; run the same command to resume")
                    summary["preempted_at"] = s
                    break
            flush()
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
        ckpts.close()
    summary["train_s"] = time.time() - t_loop
    if eval_records and "preempted_at" not in summary:
        evaluate(steps, "after")
    log.close()
    summary["total_s"] = time.time() - t_start
    return summary
