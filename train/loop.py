"""The training loop: data -> sharded train step -> metrics and Orbax checkpoints, resumable.

`run(cfg)` reads as its four steps: `set_up` (model, mesh, data, optimizer, compiled step),
`resume_or_start` (the newest good checkpoint of output_dir, or fresh/`init_from` weights),
`train` (the steps, with metrics and periodic saves) and a final evaluation.

A run folder `output_dir/` holds `config.json` (the model, so lj.load_checkpoint(output_dir)
loads the newest step), the step folders of llama_jax/checkpoint/runs.py, `metrics.jsonl` (one
{"step": .., "loss": .., ...} per logged step), `tb/` (TensorBoard) and `train_config.yaml`.
The same command resumes from the newest checkpoint that restores. SIGTERM (preemption) saves
the current step and exits cleanly. A non-finite loss or gradient stops the run before it is
saved, so the last good checkpoint stays the newest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.sharding import Mesh
from tqdm import tqdm

import llama_jax as lj
from llama_jax import flops
from llama_jax.checkpoint import RunCheckpoints, copy_file, is_remote, read_config, write_config, write_text
from sharding import batch_groups, chip_of, global_batch, is_main_process, make_mesh
from train import data as data_lib
from train import step as step_lib
from train.config import TrainConfig
from train.evaluate import exact_match, make_validation_loss, validation_loss


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving that state."""


def say(*args: Any, **kwargs: Any) -> None:
    """print, on the main process only."""
    if is_main_process():
        print(*args, **kwargs)


def model_config(cfg: TrainConfig) -> tuple[lj.LlamaConfig, str | None]:
    """The architecture (preset + overrides, or the init_from checkpoint's) with the run's dtype/remat/attention."""
    run = dict(dtype=cfg.model.dtype, remat=cfg.model.remat, attention=cfg.model.attention, param_dtype="float32")
    if cfg.init_from is not None:  # local or gs://...: read_config names a missing checkpoint
        return read_config(cfg.init_from).replace(**cfg.model.overrides, **run), cfg.init_from
    return lj.LlamaConfig.preset(cfg.model.preset, **cfg.model.overrides, **run), None


# --- set-up ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Everything a run needs that does not change while it trains."""

    cfg: TrainConfig
    model: lj.LlamaConfig
    init_from: str | None
    mesh: Mesh
    batches: data_lib.Batches | data_lib.StreamBatches
    data_summary: dict
    steps: int
    optimizer: optax.GradientTransformation
    state_shardings: Any
    train_step: Callable
    tokenizer: lj.Tokenizer
    eval_records: list
    validation: list = dataclasses.field(default_factory=list)  # held-out batches for eval_loss (eval.loss_data)
    validation_fn: Callable | None = None


def check_resumable(cfg: TrainConfig, model: lj.LlamaConfig) -> None:
    """A resumed run must be the same architecture as the one that wrote output_dir."""
    if not os.path.exists(os.path.join(cfg.output_dir, "config.json")):
        return
    before = read_config(cfg.output_dir)
    shape_fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")
    changed = {f: (getattr(before, f), getattr(model, f)) for f in shape_fields if getattr(before, f) != getattr(model, f)}
    if changed:
        raise ValueError(f"{cfg.output_dir} holds a run of a different model ({changed}, as (saved, now)); "
                         "use a new output_dir or the run's own settings")


def set_up(cfg: TrainConfig) -> Setup:
    """Model and mesh first (they fail fast), then the data, the optimizer and the compiled step."""
    model, init_from = model_config(cfg)
    if cfg.data.max_len > model.max_seq_len:
        raise ValueError(f"data.max_len {cfg.data.max_len} exceeds the model's max_seq_len {model.max_seq_len}")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, dcn_data=cfg.mesh.dcn_data,
                     dcn_fsdp=cfg.mesh.dcn_fsdp, cfg=model, batch=cfg.batch_size)
    micro = cfg.batch_size // cfg.grad_accum
    if micro % batch_groups(mesh):
        raise ValueError(f"microbatch {micro} (batch_size / grad_accum) is not divisible by data x fsdp = "
                         f"{batch_groups(mesh)}")
    check_resumable(cfg, model)

    tokenizer = lj.Tokenizer(cfg.tokenizer)
    batches, data_summary = data_lib.make_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed, jax.process_index(),
                                                  jax.process_count())
    steps = cfg.steps or int(math.ceil(cfg.epochs * batches.per_epoch))
    say(f"data: {data_summary['examples']} examples -> {data_summary['rows']} rows of {data_summary['row_len']} "
        f"tokens, {data_summary['truncated']} truncated to max_len {cfg.data.max_len}, "
        f"{data_summary['skipped']} skipped (no target left); "
        f"{batches.per_epoch} batches of {cfg.batch_size} per epoch; {steps} steps")
    eval_records = []
    if cfg.eval.data:
        eval_records = data_lib.load_alpaca(cfg.eval.data)
        eval_records = eval_records[: cfg.eval.examples or len(eval_records)]

    validation = []
    if cfg.eval.loss_data:
        try:
            validation = data_lib.held_out_batches(cfg.data, cfg.eval.loss_data, tokenizer, cfg.batch_size,
                                                   cfg.eval.batches, cfg.seed, jax.process_index(),
                                                   jax.process_count())
        except ValueError as e:
            raise ValueError(f"eval.loss_data: {e}") from None

    o = cfg.optim
    schedule = step_lib.lr_schedule(o.lr, steps, o.schedule, step_lib.warmup_steps_for(steps, o.warmup_steps,
                                                                                        o.warmup_ratio), o.min_lr_ratio)
    optimizer = step_lib.make_optimizer(schedule, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm)
    train_step = step_lib.make_train_step(model, optimizer, schedule, mesh, (cfg.batch_size, cfg.data.max_len),
                                          cfg.grad_accum, o.z_loss)
    return Setup(cfg, model, init_from, mesh, batches, data_summary, steps, optimizer,
                 step_lib.state_shardings(model, optimizer, mesh), train_step, tokenizer, eval_records,
                 validation, make_validation_loss(model) if validation else None)


# --- resume --------------------------------------------------------------------------------------


def resume_or_start(run: Setup, ckpts: RunCheckpoints) -> tuple[dict, jax.Array, int]:
    """(train state, RNG key, first step): the newest checkpoint that restores, else a fresh start."""
    cfg = run.cfg
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(lambda p: step_lib.init_state(p, run.optimizer), lj.param_shapes(run.model)),
                            run.state_shardings)
    with jax.set_mesh(run.mesh):
        restored = ckpts.restore_newest(abstract)
        if restored is not None:
            state, train_state = restored
            if train_state.get("data_rows") != run.batches.num_rows:
                raise ValueError(f"{cfg.output_dir}: the checkpoint was trained on {train_state.get('data_rows')} "
                                 f"rows but the data now gives {run.batches.num_rows}; resume with the same data "
                                 "and max_len, or use a new output_dir")
            say(f"resumed from step {train_state['step']} in {cfg.output_dir}")
            return state, jax.random.wrap_key_data(jnp.asarray(train_state["rng"], jnp.uint32)), int(train_state["step"])
        init_rng, rng = jax.random.split(jax.random.key(cfg.seed))
        if run.init_from is not None:
            _, params = lj.load_checkpoint(run.init_from, mesh=run.mesh, dtype="float32")
            say(f"initialised from {run.init_from}")
        else:
            params = lj.init_params(run.model, init_rng)
        state = jax.jit(lambda p: step_lib.init_state(p, run.optimizer), out_shardings=run.state_shardings,
                        donate_argnums=0)(params)
    return state, rng, 0


# --- metrics ---------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (+ TensorBoard) on the main process; a resumed run drops lines past its step.

    Step metrics stay on the device until `flush` (every log_every steps and before each save), so
    the host does not stall the accelerator every step; `flush` also stops a diverged run.
    """

    def __init__(self, run: Setup, resumed_step: int):
        cfg = run.cfg
        self.main = is_main_process()
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.pending: list[tuple[int, Any]] = []
        self.tokens_per_step = cfg.batch_size * cfg.data.max_len
        self.model, self.seq = run.model, cfg.data.max_len
        self.peak = cfg.peak_tflops * 1e12 or getattr(chip_of(jax.devices()[0]), "peak_bf16_flops", None)
        self.last_fetch: float | None = None  # None until the first fetch (which includes compiling)
        self.first_step_s: float | None = None
        self.first_loss: float | None = None
        self.loss: float | None = None
        self.eval_loss: float | None = None  # the latest validation loss
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

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))

    def flush(self, started: float, last_saved: int, output_dir: str) -> None:
        """Fetch the pending metrics, stop on NaN/inf, log them with throughput."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        now = time.time()
        if self.last_fetch is None:  # the first fetch includes compiling the step
            self.first_step_s = now - started
            step_s = None
        else:
            step_s = (now - self.last_fetch) / len(self.pending)
        self.last_fetch = now
        for (s, _), m in zip(self.pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                raise TrainingDiverged(
                    f"step {s}: loss {m['loss']}, grad norm {m['grad_norm']}: training diverged. Stopped without "
                    f"saving; the last good checkpoint is step {last_saved} in {output_dir}. Lower optim.lr, "
                    "raise warmup, or check the data.")
            record = {"step": s, **m}
            if step_s:
                tokens_per_s = self.tokens_per_step / step_s
                record.update(step_time_s=step_s, tokens_per_s=tokens_per_s,
                              mfu=flops.mfu(tokens_per_s, self.model, self.seq, jax.device_count(), self.peak))
            self.write(record)
            self.loss = m["loss"]
            self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.pending.clear()

    def write(self, record: dict) -> None:
        self.eval_loss = record.get("eval_loss", self.eval_loss)
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, record["step"])

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# --- the loop --------------------------------------------------------------------------------------


class Preemption:
    """SIGTERM (spot/preemptible VMs) sets `requested` instead of killing the process mid-step."""

    def __enter__(self) -> "Preemption":
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def train(run: Setup, state: dict, rng: jax.Array, start: int, ckpts: RunCheckpoints,
          log: MetricsLog) -> tuple[dict, int | None]:
    """Steps start..run.steps: metrics every log_every steps, a checkpoint every checkpoint_every, at the
    end and on SIGTERM. Returns the final state and the step a SIGTERM stopped at (None: all steps ran)."""
    cfg = run.cfg
    last_saved, started = start, time.time()
    with tqdm(total=run.steps, initial=start, disable=not is_main_process(), desc="train",
              dynamic_ncols=True) as bar, Preemption() as preemption, jax.set_mesh(run.mesh), \
            data_lib.Prefetch(run.batches, start, run.steps) as batches:
        for k, batch in zip(range(start, run.steps), batches):
            state, metrics = run.train_step(state, global_batch(batch, run.mesh))
            step = k + 1
            log.add(step, metrics)
            bar.update(1)
            if step % cfg.log_every == 0 or step == run.steps:
                log.flush(started, last_saved, cfg.output_dir)
                bar.set_postfix(loss=f"{log.loss:.4f}")
            if run.validation and (step == run.steps or cfg.eval.every and step % cfg.eval.every == 0):
                log.flush(started, last_saved, cfg.output_dir)
                validate(run, state["params"], step, log)  # before the save: a resume never skips it
            if step % cfg.checkpoint_every == 0 or step == run.steps or preemption.requested:
                log.flush(started, last_saved, cfg.output_dir)  # never save a state whose loss was not checked
                ckpts.save(step, state, {"step": step, "data_index": step, "data_rows": run.batches.num_rows,
                                         "rng": np.asarray(jax.random.key_data(rng)).tolist()})
                last_saved = step
            if preemption.requested:
                ckpts.wait()
                return state, step
        log.flush(started, last_saved, cfg.output_dir)
    return state, None


def evaluate(run: Setup, params: Any, step: int, name: str, log: MetricsLog) -> float:
    """Exact match of greedy answers on the held-out records; logged and printed with a few examples."""
    with jax.set_mesh(run.mesh):
        acc, rows = exact_match(params, run.model, run.tokenizer, run.eval_records, run.cfg.eval.max_new_tokens)
    log.write({"step": step, "eval_exact_match": acc})
    say(f"exact match on {len(rows)} held-out examples ({name}): {acc:.1%}")
    for r in rows[:3]:
        say(f"  {r['instruction']} {r['input']!r} -> {r['got']!r} (expected {r['expected']!r})")
    return acc


def validate(run: Setup, params: Any, step: int, log: MetricsLog) -> float:
    """eval_loss / eval_ppl on the held-out batches (eval.loss_data), logged: at step 0, every
    eval.every steps and at the last step."""
    with jax.set_mesh(run.mesh):
        loss, ppl = validation_loss(run.validation_fn, params, run.validation, run.mesh)
    log.write({"step": step, "eval_loss": loss, "eval_ppl": ppl})
    return loss


def run(cfg: TrainConfig) -> dict:
    """Train (or resume) as the recipe says; returns a summary (final loss, eval accuracy, times)."""
    t_start = time.time()
    os.makedirs(cfg.output_dir, exist_ok=True)
    setup = set_up(cfg)
    if is_main_process():
        write_config(cfg.output_dir, setup.model.replace(dtype="float32"))
        write_text(os.path.join(cfg.output_dir, "train_config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tokenizer_copy = os.path.join(cfg.output_dir, "tokenizer.model")  # generate/export-hf find it there
        if not os.path.exists(tokenizer_copy) or is_remote(cfg.tokenizer) or not os.path.samefile(cfg.tokenizer,
                                                                                                   tokenizer_copy):
            copy_file(cfg.tokenizer, tokenizer_copy)

    ckpts = RunCheckpoints(cfg.output_dir, cfg.keep_checkpoints, cfg.async_checkpointing)
    try:
        state, rng, start = resume_or_start(setup, ckpts)
        if start >= setup.steps:
            say(f"{cfg.output_dir} has already trained {start} of {setup.steps} steps: nothing to do "
                "(raise steps= to train longer, or use a new output_dir)")
            return {"steps": setup.steps, "start_step": start, "finished": True}
        log = MetricsLog(setup, start)
        summary: dict[str, Any] = {"steps": setup.steps, "start_step": start, "data": setup.data_summary}
        if setup.eval_records and start == 0:
            summary["eval_before"] = evaluate(setup, state["params"], 0, "before", log)
        if setup.validation and start == 0:
            summary["eval_loss_before"] = validate(setup, state["params"], 0, log)
        t_loop = time.time()
        state, preempted_at = train(setup, state, rng, start, ckpts, log)
    finally:
        ckpts.close()
    summary.update(train_s=time.time() - t_loop, first_step_s=log.first_step_s, first_loss=log.first_loss,
                   loss=log.loss, eval_loss=log.eval_loss)
    if preempted_at is not None:
        say(f"\nSIGTERM: saved step {preempted_at} to {cfg.output_dir}; run the same command to resume")
        summary["preempted_at"] = preempted_at
    elif setup.eval_records:
        summary["eval_after"] = evaluate(setup, state["params"], setup.steps, "after", log)
    log.close()
    summary["total_s"] = time.time() - t_start
    return summary
