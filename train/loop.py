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

LoRA (`lora.rank > 0`): the init_from checkpoint is loaded as the frozen base (in
`lora.base_dtype`, quantised while loading for int8/nf4) and never written; the step folders hold
the adapters and their optimizer state only, and `lora.json` names the base, so
lj.load_checkpoint(output_dir) returns the merged model.

Preference objectives (`objective`: dpo | orpo | simpo | reward, train/objectives.py) train on
pairs (data.format preference). DPO's reference log-probs are scored once, before the first step,
and kept in the run folder (train/reference.py). A reward model's run folder records its head in
config.json (lj.load_checkpoint(output_dir, head="reward") loads it); it starts from init_from's
backbone (a language model; a reward model continues as it is) with a fresh head.
"""

from __future__ import annotations

import collections
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
from jax.sharding import Mesh
from tqdm import tqdm

import llama_jax as lj
from llama_jax import flops, lora, reward
from llama_jax.checkpoint import RunCheckpoints, read_config, read_head, write_text
from llama_jax.errors import note
from sharding import batch_groups, chip_of, global_batch, is_main_process, make_mesh
from train import data as data_lib
from train import reference, run_folder
from train import step as step_lib
from train.config import TrainConfig
from train.data.pairs import pair_batch
from train.data.spec import pair_rows
from train.evaluate import exact_match, make_validation_loss, per_task, report, validation_metrics
from train.objectives import make_reference_fn


# what fixes the params' shapes: an init_from checkpoint's own values win over model.overrides
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "multiple_of", "ffn_dim_multiplier",
                "tie_word_embeddings")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving that state."""


def say(*args: Any, **kwargs: Any) -> None:
    """print, on the main process only."""
    if is_main_process():
        print(*args, **kwargs)


def model_config(cfg: TrainConfig) -> tuple[lj.LlamaConfig, str | None]:
    """The architecture (preset + overrides, or the init_from checkpoint's) with the run's dtype/remat/attention."""
    run = dict(dtype=cfg.model.dtype, remat=cfg.model.remat, attention=cfg.model.attention, param_dtype="float32",
               lora_rank=cfg.lora.rank)
    if cfg.lora.rank:
        run.update(lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, lora_targets=tuple(cfg.lora.targets))
    if cfg.init_from is not None:  # local or gs://...: read_config names a missing checkpoint
        base = read_config(cfg.init_from, None if cfg.objective == "reward" else "lm")
        # The checkpoint gives the architecture, so one recipe (e.g. configs/demo.yaml) serves any base.
        ignored = {k: v for k, v in cfg.model.overrides.items() if k in SHAPE_FIELDS and getattr(base, k) != v}
        if ignored:
            say(f"init_from {cfg.init_from} gives the architecture: model.overrides {ignored} not applied")
        kept = {k: v for k, v in cfg.model.overrides.items() if k not in ignored}
        return base.replace(**kept, **run), cfg.init_from
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
    train_step: Callable  # (state, batch) -> (state, metrics); a LoRA step has its frozen base bound
    tokenizer: lj.Tokenizer
    eval_records: list
    validation: list = dataclasses.field(default_factory=list)  # held-out batches for eval_loss (eval.loss_data)
    validation_fn: Callable | None = None
    base: Any = None  # LoRA: the frozen base params (float or quantised), else None
    validation_rows: dict | None = None  # preference: the held-out pair rows (DPO scores them before batching)

    @property
    def objective(self) -> str:
        return self.cfg.objective


def set_up(cfg: TrainConfig) -> Setup:
    """Model and mesh first (they fail fast), then the data, the optimizer and the compiled step."""
    model, init_from = model_config(cfg)
    if cfg.data.max_len > model.max_seq_len:
        raise ValueError(f"data.max_len {cfg.data.max_len} exceeds the model's max_seq_len {model.max_seq_len}")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, context=cfg.mesh.context,
                     dcn_data=cfg.mesh.dcn_data, dcn_fsdp=cfg.mesh.dcn_fsdp, dcn_context=cfg.mesh.dcn_context,
                     cfg=model, batch=cfg.batch_size, seq=cfg.data.max_len)
    micro = cfg.batch_size // cfg.grad_accum
    if micro % batch_groups(mesh):
        raise ValueError(f"microbatch {micro} (batch_size / grad_accum) is not divisible by data x fsdp = "
                         f"{batch_groups(mesh)}")
    run_folder.check_resume(cfg, model)

    tokenizer = lj.Tokenizer(cfg.tokenizer)
    batches, data_summary = data_lib.make_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed, jax.process_index(),
                                                  jax.process_count(), cfg.preference)
    steps = cfg.steps or int(math.ceil(cfg.epochs * batches.per_epoch))
    if cfg.objective == "sft":
        say(f"data: {data_summary['examples']} examples -> {data_summary['rows']} rows of {data_summary['row_len']} "
            f"tokens, {data_summary['truncated']} truncated to max_len {cfg.data.max_len}, "
            f"{data_summary['skipped']} skipped (no target left); "
            f"{batches.per_epoch} batches of {cfg.batch_size} per epoch; {steps} steps")
    else:
        say(f"data: {data_summary['examples']} preference pairs -> {data_summary['rows']} pairs of rows of "
            f"{data_summary['row_len']} tokens, {data_summary['truncated']} with the prompt cut to max_len "
            f"{cfg.data.max_len}, {data_summary['skipped']} skipped (an answer longer than max_len - 1); "
            f"{batches.per_epoch} batches of {cfg.batch_size} pairs per epoch; {steps} steps; objective "
            f"{cfg.objective}" + (f", beta {cfg.beta:g}" if cfg.objective != "reward" else ""))
    eval_records = []
    if cfg.eval.data:
        eval_records = data_lib.load_alpaca(cfg.eval.data)
        eval_records = eval_records[: cfg.eval.examples or len(eval_records)]

    validation, validation_rows = [], None
    if cfg.eval.loss_data:
        try:
            if cfg.objective == "sft":
                validation = data_lib.held_out_batches(cfg.data, cfg.eval.loss_data, tokenizer, cfg.batch_size,
                                                       cfg.eval.batches, cfg.seed, jax.process_index(),
                                                       jax.process_count())
            else:
                validation_rows = pair_rows(cfg.data, [cfg.eval.loss_data], tokenizer, cfg.preference)[0]
                if cfg.eval.batches:  # only the pairs validation reads (DPO scores them all first)
                    validation_rows = {k: v[:cfg.eval.batches * cfg.batch_size] for k, v in validation_rows.items()}
        except ValueError as e:
            raise ValueError(f"eval.loss_data: {e}") from None

    o = cfg.optim
    schedule = step_lib.lr_schedule(o.lr, steps, o.schedule, step_lib.warmup_steps_for(steps, o.warmup_steps,
                                                                                        o.warmup_ratio), o.min_lr_ratio)
    optimizer = step_lib.make_optimizer(schedule, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm)
    train_step = step_lib.make_train_step(model, optimizer, schedule, mesh, (cfg.batch_size, cfg.data.max_len),
                                          cfg.grad_accum, o.z_loss, cfg.lora.base_dtype, cfg.seed, cfg.objective,
                                          cfg.beta, cfg.preference.simpo_gamma)
    base = None
    if model.lora_rank:
        base = load_base(cfg, model, mesh)
        lora_step = train_step
        train_step = lambda state, batch: lora_step(state, batch, base)  # noqa: E731
    run = Setup(cfg, model, init_from, mesh, batches, data_summary, steps, optimizer,
                step_lib.state_shardings(model, optimizer, mesh, cfg.objective), train_step, tokenizer, eval_records,
                validation, None, base, validation_rows)
    if validation_rows is not None and cfg.objective != "dpo":  # DPO batches them once they are scored
        pair_validation_batches(run)
    if validation_rows is not None or validation:
        run.validation_fn = make_validation_loss(model, cfg.objective, cfg.beta, cfg.preference.simpo_gamma)
    return run


def pair_validation_batches(run: Setup) -> None:
    """The held-out pair rows as fixed batches (eval.batches of them; 0 = all)."""
    cfg = run.cfg
    run.validation = data_lib.validation_batches(run.validation_rows, cfg.batch_size, cfg.eval.batches,
                                                 jax.process_index(), jax.process_count(), to_batch=pair_batch)


def load_base(cfg: TrainConfig, model: lj.LlamaConfig, mesh: Mesh) -> Any:
    """A LoRA run's frozen base from init_from, in lora.base_dtype (int8/nf4: quantised layer by layer)."""
    dtype = cfg.lora.base_dtype
    quantize = dtype if dtype in ("int8", "nf4") else None
    _, base = lj.load_checkpoint(cfg.init_from, mesh=mesh, dtype="bfloat16" if quantize else dtype, quantize=quantize)
    trainable, total = lora.adapter_count(model), model.num_params()
    say(f"LoRA rank {model.lora_rank}, alpha {model.lora_alpha:g}, dropout {model.lora_dropout:g} on "
        f"{' '.join(model.lora_targets)}: {trainable:,} trainable parameters ({100 * trainable / total:.2f}% of "
        f"{total:,}); base {cfg.init_from} held as {dtype}, frozen")
    return base


def model_params(run: Setup, state: dict) -> Any:
    """The params the model runs on: the trained ones, or (LoRA) the base with the trained adapters."""
    return state["params"] if run.base is None else lora.combine(run.base, state["params"])


# --- resume --------------------------------------------------------------------------------------


def resume_or_start(run: Setup, ckpts: RunCheckpoints) -> tuple[dict, jax.Array, int]:
    """(train state, RNG key, first step): the newest checkpoint that restores, else a fresh start."""
    cfg = run.cfg
    trainable = step_lib.trainable_layout(run.model, cfg.objective)[1]
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(lambda p: step_lib.init_state(p, run.optimizer), trainable),
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
        params = initial_params(run, init_rng, announce=True)
        state = jax.jit(lambda p: step_lib.init_state(p, run.optimizer), out_shardings=run.state_shardings,
                        donate_argnums=0)(params)
    return state, rng, 0


def initial_params(run: Setup, init_rng: jax.Array, announce: bool = False) -> Any:
    """What training starts from: fresh adapters (LoRA), init_from's weights, or a seeded random init; a
    reward model gets its backbone from them and a fresh head (init_from a reward model: kept as it is)."""
    if run.base is not None:
        return lora.init_adapters(run.model, init_rng)
    head_rng = jax.random.fold_in(init_rng, 1)
    if run.init_from is not None:
        head = read_head(run.init_from)
        _, params = lj.load_checkpoint(run.init_from, mesh=run.mesh, dtype="float32", head=head)
        if announce:
            say(f"initialised from {run.init_from}" + (", a fresh reward head on its backbone"
                                                      if run.objective == "reward" and head == "lm" else ""))
        if run.objective == "reward" and head == "lm":
            with jax.set_mesh(run.mesh):
                params = reward.from_lm(params, run.model, head_rng)
        return params
    params = lj.init_params(run.model, init_rng)
    if run.objective == "reward":
        params = reward.from_lm(params, run.model, head_rng)
    return params


def attach_reference(run: Setup, state: dict, start: int) -> None:
    """DPO: the reference log-probs of every training (and held-out) pair, scored by the starting model
    before step 1 and stored in the run folder; a resumed run reads them back (train/reference.py)."""
    if run.objective != "dpo":
        return
    cfg = run.cfg
    tables = {"train": run.batches.rows}
    if run.validation_rows is not None:
        tables["eval"] = run.validation_rows
    scores = reference.load(cfg.output_dir, tables) if start else None
    if scores is None:
        if run.base is not None:
            params = run.base  # the LoRA base: the starting model (its adapters are zero)
        elif start == 0:
            params = state["params"]
        else:
            note(f"{cfg.output_dir} has no {reference.FILE}: scoring the reference again from the starting model")
            params = initial_params(run, jax.random.split(jax.random.key(cfg.seed))[0])
        t = time.time()
        score = make_reference_fn(run.model, run.mesh)
        with jax.set_mesh(run.mesh):
            scores = {name: reference.score_rows(score, params, rows, cfg.batch_size // cfg.grad_accum, run.mesh)
                      for name, rows in tables.items()}
        reference.save(cfg.output_dir, scores, tables)
        say(f"reference log-probs of {sum(len(s) for s in scores.values())} pairs scored in {time.time() - t:.1f} s "
            f"(once; kept in {os.path.join(cfg.output_dir, reference.FILE)})")
    for name, rows in tables.items():
        rows["reference"] = scores[name]
    if run.validation_rows is not None:
        pair_validation_batches(run)


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
        self.tokens_per_step = cfg.batch_size * cfg.data.max_len * (1 if cfg.objective == "sft" else 2)
        self.model, self.seq = run.model, cfg.data.max_len
        self.peak = cfg.peak_tflops * 1e12 or getattr(chip_of(jax.devices()[0]), "peak_bf16_flops", None)
        self.last_fetch: float | None = None  # None until the first fetch (which includes compiling)
        self.first_step_s: float | None = None
        self.first_loss: float | None = None
        self.loss: float | None = None
        self.recent: collections.deque = collections.deque(maxlen=50)  # loss_last50: less noisy than one step
        self.eval_loss: float | None = None  # the latest validation loss
        self.eval_latest: dict = {}  # the latest validation metrics
        self.tb = None
        if not self.main:
            return
        write_text(self.path, "".join(_metrics_up_to(self.path, resumed_step)))
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
            self.recent.append(m["loss"])
            self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.pending.clear()

    def write(self, record: dict) -> None:
        self.eval_loss = record.get("eval_loss", self.eval_loss)
        if "eval_loss" in record:
            self.eval_latest = {k: v for k, v in record.items() if k.startswith("eval_")}
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


def _metrics_up_to(path: str, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step`; unreadable lines (cut by a kill, or damaged) are
    dropped with a note naming them."""
    if not os.path.exists(path):
        return []
    kept, dropped = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                record = json.loads(line)
                step_of = record.get("step", 0) if isinstance(record, dict) else None
                if not isinstance(step_of, int):
                    raise ValueError("no integer step")
            except ValueError:  # UnicodeDecodeError and JSONDecodeError included
                dropped.append(n)
                continue
            if step_of <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        note(f"{path}: dropped {len(dropped)} unreadable line(s) (line {', '.join(map(str, dropped[:5]))})")
    return kept


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
    ckpts.check_room(state)
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
                validate(run, model_params(run, state), step, log)  # before the save: a resume never skips it
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


def evaluate(run: Setup, params: Any, step: int, name: str, log: MetricsLog) -> tuple[float, dict[str, float]]:
    """Exact match of greedy answers on the held-out records, overall and per task; logged, and printed
    with a few answers to check by eye (more after training)."""
    with jax.set_mesh(run.mesh):
        acc, rows = exact_match(params, run.model, run.tokenizer, run.eval_records, run.cfg.eval.max_new_tokens)
    log.write({"step": step, "eval_exact_match": acc})
    for line in report(rows, name, n_examples=3 if name == "before" else 8):
        say(line)
    return acc, per_task(rows)


def validate(run: Setup, params: Any, step: int, log: MetricsLog) -> dict[str, float]:
    """eval_loss / eval_ppl on the held-out batches (eval.loss_data; preference objectives: eval_loss,
    eval_reward_accuracy, eval_reward_margin, ...), logged: at step 0, every eval.every steps and at
    the last step."""
    with jax.set_mesh(run.mesh):
        metrics = validation_metrics(run.validation_fn, params, run.validation, run.mesh, run.objective)
    log.write({"step": step, **metrics})
    if run.objective != "sft":
        say(f"held-out pairs at step {step}: loss {metrics['eval_loss']:.4f}, reward accuracy "
            f"{metrics['eval_reward_accuracy']:.1%}, reward margin {metrics['eval_reward_margin']:.4f}")
    return metrics


def run(cfg: TrainConfig) -> dict:
    """Train (or resume) as the recipe says; returns a summary (final loss, eval accuracy, times).

    The run holds output_dir's lock throughout; nothing in the folder is written until the resume
    is accepted (train/run_folder.py)."""
    with run_folder.claim(cfg.output_dir):
        return _run_claimed(cfg)


def _run_claimed(cfg: TrainConfig) -> dict:
    t_start = time.time()
    setup = set_up(cfg)
    ckpts = RunCheckpoints(cfg.output_dir, cfg.keep_checkpoints, cfg.async_checkpointing)
    try:
        state, rng, start = resume_or_start(setup, ckpts)
        if start >= setup.steps:
            say(f"{cfg.output_dir} has already trained {start} of {setup.steps} steps: nothing to do "
                "(raise steps= to train longer, or use a new output_dir)")
            return {"steps": setup.steps, "start_step": start, "finished": True}
        run_folder.record(cfg, setup.model, setup.tokenizer)
        attach_reference(setup, state, start)
        log = MetricsLog(setup, start)
        summary: dict[str, Any] = {"steps": setup.steps, "start_step": start, "data": setup.data_summary}
        if setup.eval_records and start == 0:
            summary["eval_before"], summary["eval_before_per_task"] = evaluate(
                setup, model_params(setup, state), 0, "before", log)
        if setup.validation and start == 0:
            before = validate(setup, model_params(setup, state), 0, log)
            summary["eval_loss_before"] = before["eval_loss"]
            summary.update({f"{k}_before": v for k, v in before.items() if k.startswith("eval_reward_")})
        t_loop = time.time()
        state, preempted_at = train(setup, state, rng, start, ckpts, log)
    finally:
        ckpts.close()
    summary.update(train_s=time.time() - t_loop, first_step_s=log.first_step_s, first_loss=log.first_loss,
                   loss=log.loss, loss_last50=sum(log.recent) / len(log.recent) if log.recent else None,
                   eval_loss=log.eval_loss)
    if cfg.objective != "sft":
        summary.update({f"{k}_after": v for k, v in log.eval_latest.items() if k.startswith("eval_reward_")})
    if preempted_at is not None:
        say(f"\nSIGTERM: saved step {preempted_at} to {cfg.output_dir}; run the same command to resume")
        summary["preempted_at"] = preempted_at
    elif setup.eval_records:
        summary["eval_after"], summary["eval_after_per_task"] = evaluate(
            setup, model_params(setup, state), setup.steps, "after", log)
    log.close()
    summary["total_s"] = time.time() - t_start
    return summary
