"""The training recipe schema: YAML files in configs/ plus `key=value` overrides (dotted for nesting).

Every key is declared here with its type and default, so a typo in a recipe or on the command line
fails at start-up with the list of known keys instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import yaml

from llama_jax.config import ATTENTION_IMPLEMENTATIONS, DTYPES, REMAT_POLICIES


@dataclasses.dataclass
class ModelConfig:
    preset: str | None = None  # a LlamaConfig preset; None when init_from gives the architecture
    overrides: dict = dataclasses.field(default_factory=dict)  # LlamaConfig fields (dim, n_layers, ...)
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators); master params stay float32
    remat: str = "none"  # none | full | save_dots
    attention: str = "xla"  # xla | cudnn (NVIDIA GPUs) | splash (TPUs)


DATA_FORMATS = ("alpaca", "chat", "pretrain", "tokens", "auto")


@dataclasses.dataclass
class DataConfig:
    format: str = "alpaca"  # alpaca | chat | pretrain | tokens (python -m train.tokenize folders) | auto
    train: list = dataclasses.field(default_factory=list)  # files, globs, folders, hf:NAME, gs://... (train/data/formats.py)
    max_len: int = 512  # tokens per example/row (a row holds max_len inputs)
    pack: bool = False  # pack several examples per row (segment ids keep them apart)
    text_key: str = "text"  # field of a JSONL line holding a document (pretrain)
    weights: list[float] = dataclasses.field(default_factory=list)  # tokens: mixture weight per data.train entry


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int | None = None  # None: warmup_ratio * steps
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 disables it
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) over target tokens


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1  # several TPU slices: copies of the model across the data-centre network
    dcn_fsdp: int = 1  # ... or parameters split across slices (rarely worth the slow network)


@dataclasses.dataclass
class EvalConfig:
    data: str | None = None  # Alpaca JSON of held-out examples: exact-match accuracy, greedy decoding
    examples: int = 0  # how many of them (0 = all)
    max_new_tokens: int = 32
    loss_data: str | None = None  # held-out file in data.format: eval_loss / eval_ppl over its target tokens
    every: int = 0  # steps between validation passes (0: only at the start and the end)
    batches: int = 0  # batches of batch_size rows per validation pass (0 = all of loss_data)


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    steps: int = 0  # optimizer steps; 0 = derived from `epochs`
    epochs: float = 0.0  # used when steps is 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    batch_size: int = 8  # global batch (rows per optimizer step)
    grad_accum: int = 1  # microbatches per step (batch_size must be divisible by it)
    log_every: int = 10
    init_from: str | None = None  # a checkpoint (lj.save_checkpoint / converter / a training run)
    tokenizer: str = "data/tokenizer.model"
    peak_tflops: float = 0.0  # per-chip peak for MFU; 0 = look up the chip (unknown chip: no MFU)
    async_checkpointing: bool = True
    tensorboard: bool = True
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict, where: str) -> Any:
    """Dataclass `cls` from a dict, refusing unknown keys and values of the wrong type."""
    if not isinstance(values, dict):
        raise ValueError(f"config {where or 'root'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config {where or 'root'}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    out = {}
    defaults = cls()
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            out[name] = _build(type(default), value or {}, key)
        else:
            out[name] = _check_type(key, value, default, fields[name].type)
    return cls(**out)


def _check_type(key: str, value: Any, default: Any, annotation: str) -> Any:
    optional = "None" in str(annotation)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config {key}: must not be null")
    if "list[float]" in str(annotation):
        value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"config {key}: expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if isinstance(default, bool) or "bool" in str(annotation):
        if not isinstance(value, bool):
            raise ValueError(f"config {key}: expected true/false, got {value!r}")
        return value
    if "float" in str(annotation):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config {key}: expected a number, got {value!r}")
        return float(value)
    if "int" in str(annotation):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config {key}: expected an integer, got {value!r}")
        return value
    if "list" in str(annotation):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"config {key}: expected a file name or a list of them, got {value!r}")
        return value
    if "dict" in str(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"config {key}: expected a mapping, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"config {key}: expected a string, got {value!r}")
    return value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict; values are parsed as YAML (1e-4, true, [a, b])."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. steps=100)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML recipe (or defaults when path is None) and `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path!r} (expected a YAML recipe, e.g. configs/demo.yaml)")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of keys, got {type(raw).__name__}")
    cfg = _build(TrainConfig, apply_overrides(raw, overrides), "")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks with messages that say which key to fix."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"config: {message}")

    need(cfg.steps > 0 or cfg.epochs > 0, f"set steps (> 0) or epochs (> 0); got steps={cfg.steps}, epochs={cfg.epochs}")
    need(cfg.steps >= 0, f"steps must be >= 0, got {cfg.steps}")
    need(cfg.checkpoint_every > 0, f"checkpoint_every must be > 0, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints > 0, f"keep_checkpoints must be > 0, got {cfg.keep_checkpoints}")
    need(cfg.log_every > 0, f"log_every must be > 0, got {cfg.log_every}")
    need(cfg.batch_size > 0 and cfg.grad_accum > 0, "batch_size and grad_accum must be > 0")
    need(cfg.batch_size % cfg.grad_accum == 0,
         f"batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum}")
    need(cfg.model.preset is not None or cfg.init_from is not None,
         "set model.preset (e.g. demo, llama2-7b) or init_from (a converted checkpoint)")
    need(cfg.data.format in DATA_FORMATS, f"data.format must be one of {DATA_FORMATS}, got {cfg.data.format!r}")
    need(not cfg.data.weights or len(cfg.data.weights) == len(cfg.data.train),
         f"data.weights has {len(cfg.data.weights)} entries for {len(cfg.data.train)} data.train entries")
    need(len(cfg.data.train) > 0, "data.train must name at least one file")
    need(cfg.data.max_len >= 2, f"data.max_len must be >= 2, got {cfg.data.max_len}")
    need(cfg.optim.schedule in ("cosine", "constant"), f"optim.schedule must be cosine or constant, got {cfg.optim.schedule!r}")
    need(0.0 <= cfg.optim.warmup_ratio < 1.0, f"optim.warmup_ratio must be in [0, 1), got {cfg.optim.warmup_ratio}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.eval.every >= 0 and cfg.eval.batches >= 0,
         f"eval.every and eval.batches must be >= 0, got {cfg.eval.every} and {cfg.eval.batches}")
    need(cfg.model.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}, got {cfg.model.remat!r}")
    need(cfg.model.dtype in DTYPES, f"model.dtype must be one of {tuple(DTYPES)}, got {cfg.model.dtype!r}")
    need(cfg.model.attention in ATTENTION_IMPLEMENTATIONS,
         f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {cfg.model.attention!r}")
