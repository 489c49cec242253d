"""The training recipe schema: YAML files in configs/ plus `key=value` overrides (dotted for nesting).

Every key is declared here with its type and default, so a typo in a recipe or on the command line
fails at start-up with the list of known keys instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import yaml

from llama_jax.config import ATTENTION_IMPLEMENTATIONS, DTYPES, PROJECTIONS, REMAT_POLICIES, LlamaConfig
from llama_jax.quant import FORMATS as QUANT_FORMATS

BASE_DTYPES = ("bfloat16", "float32", *QUANT_FORMATS)
# model.overrides may set any LlamaConfig field but these (the recipe's model.* and lora.* keys set them)
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(LlamaConfig)
                    if f.name not in ("dtype", "param_dtype", "remat", "attention") and not f.name.startswith("lora_"))


@dataclasses.dataclass
class ModelConfig:
    preset: str | None = None  # a LlamaConfig preset; None when init_from gives the architecture
    overrides: dict = dataclasses.field(default_factory=dict)  # LlamaConfig fields (dim, n_layers, ...)
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators); master params stay float32
    remat: str = "none"  # none | full | save_dots
    attention: str = "xla"  # xla | cudnn (NVIDIA GPUs) | splash (TPUs)


DATA_FORMATS = ("alpaca", "chat", "pretrain", "tokens", "auto", "preference")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "reward")  # sft: next-token loss on targets; the others: on pairs
# The objectives' beta when preference.beta is unset: DPO's and ORPO's (lambda) 0.1 as in their papers and TRL,
# SimPO's 2.0 (the paper's setting for its length-normalised rewards).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}


@dataclasses.dataclass
class DataConfig:
    format: str = "alpaca"  # alpaca | chat | pretrain | tokens (python -m train.tokenize folders) | auto | preference
    train: list = dataclasses.field(default_factory=list)  # files, globs, folders, hf:NAME, gs://... (train/data/formats.py)
    max_len: int = 512  # tokens per example/row (a row holds max_len inputs)
    pack: bool = False  # pack several examples per row (segment ids keep them apart)
    text_key: str = "text"  # field of a JSONL line holding a document (pretrain)
    weights: list[float] = dataclasses.field(default_factory=list)  # tokens: mixture weight per data.train entry


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (after warmup)
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int | None = None  # None: warmup_ratio * steps
    warmup_ratio: float = 0.0  # warmup as a share of the steps, when warmup_steps is None
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    eps: float = 1e-5  # AdamW epsilon
    weight_decay: float = 0.1  # AdamW decoupled decay, on every matrix (none on the RMSNorm weights)
    clip_norm: float = 1.0  # global-norm clipping; 0 disables it
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) over target tokens


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1  # split batch rows AND every parameter and Adam moment (-1: fill)
    context: int = 1  # split each sequence (long context; data.max_len a multiple of 2 x context) and the params
    tensor: int = 1  # split attention heads and MLP columns inside each layer (-1: fill)
    dcn_data: int = 1  # several TPU slices: copies of the model across the data-centre network
    dcn_fsdp: int = 1  # ... or parameters split across slices (rarely worth the slow network)
    dcn_context: int = 1  # ... or sequences split across slices


@dataclasses.dataclass
class EvalConfig:
    data: str | None = None  # Alpaca JSON of held-out examples: exact-match accuracy, greedy decoding
    examples: int = 0  # how many of them (0 = all)
    max_new_tokens: int = 32  # longest greedy answer for the exact-match check
    loss_data: str | None = None  # held-out file in data.format: eval_loss / eval_ppl over its target tokens
    every: int = 0  # steps between validation passes (0: only at the start and the end)
    batches: int = 0  # batches of batch_size rows per validation pass (0 = all of loss_data)


@dataclasses.dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning; > 0: train only rank-r adapters on a frozen init_from base
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.05  # on the adapters' input, training only
    targets: list = dataclasses.field(default_factory=lambda: list(PROJECTIONS))  # of wq wk wv wo w1 w2 w3
    base_dtype: str = "bfloat16"  # the frozen base in memory: bfloat16 | float32 | int8 | nf4 (QLoRA)


@dataclasses.dataclass
class PreferenceConfig:
    beta: float | None = None  # dpo: KL weight; orpo: lambda (odds-ratio weight); simpo: reward scale; None: DEFAULT_BETA
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma (TRL's default)
    margin_key: str = "margin"  # reward: the record field holding the pair's margin m (0 when absent)
    template: str = "chat"  # how a string prompt is laid out: chat (the tokenizer's chat format) | alpaca


@dataclasses.dataclass
class TrainConfig:
    """A whole recipe: the top-level keys and one section per block (docs/reference/recipe.md lists them)."""

    output_dir: str = "runs/default"  # the run folder: checkpoints, metrics.jsonl, tb/; the same one resumes
    steps: int = 0  # optimizer steps; 0 = derived from `epochs`
    epochs: float = 0.0  # used when steps is 0
    checkpoint_every: int = 100  # steps between checkpoints (the last step and SIGTERM always save)
    keep_checkpoints: int = 3  # newest checkpoints kept in output_dir
    seed: int = 0  # initialisation, data order and LoRA dropout masks
    batch_size: int = 8  # global batch (rows per optimizer step)
    grad_accum: int = 1  # microbatches per step (batch_size must be divisible by it)
    log_every: int = 10  # steps between fetching metrics from the device (and writing metrics.jsonl)
    init_from: str | None = None  # a checkpoint (lj.save_checkpoint / converter / a training run)
    tokenizer: str = "data/tokenizer.model"  # tokenizer.model, tokenizer.json, a folder, a URL or a Hub repo id
    peak_tflops: float = 0.0  # per-chip peak for MFU; 0 = look up the chip (unknown chip: no MFU)
    async_checkpointing: bool = True  # saves overlap the next steps (Orbax async)
    tensorboard: bool = True  # also write TensorBoard logs to output_dir/tb
    objective: str = "sft"  # sft | dpo | orpo | simpo | reward (train/objectives.py); all but sft need data.format preference
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the architecture and how it runs
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # training data: files, format, rows
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # AdamW, clipping, schedule, z-loss
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # the device mesh (data, fsdp, context, tensor)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # validation loss and exact match
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # low-rank adapters on a frozen base
    preference: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)  # DPO/ORPO/SimPO/reward settings

    @property
    def beta(self) -> float:
        """The preference objective's beta: preference.beta, or the objective's default."""
        return self.preference.beta if self.preference.beta is not None else DEFAULT_BETA.get(self.objective, 0.0)

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
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return raw


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML recipe (or defaults when path is None) and `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path!r} (expected a YAML recipe, e.g. configs/demo.yaml)")
        try:
            with open(path, "rb") as f:
                raw = yaml.safe_load(f.read().decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"config file {path!r} is not valid UTF-8 YAML ({' '.join(str(e).split())})") from None
        except RecursionError:
            raise ValueError(f"config file {path!r}: YAML nested too deeply") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of keys, got {type(raw).__name__}")
    cfg = _build(TrainConfig, apply_overrides(raw, overrides), "")
    validate(cfg)
    return cfg


# The allowed range of every numeric recipe key, in interval notation ("(0, inf)": > 0). A new
# numeric key gets its line here (tests/test_safety.py checks that none is missing). Integers must
# also fit the device's int32 (seed: uint32, as jax.random.key takes it).
RANGES = {
    "steps": "[0, inf)", "epochs": "[0, inf)", "checkpoint_every": "[1, inf)", "keep_checkpoints": "[1, inf)",
    "seed": "[0, 4294967296)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "log_every": "[1, inf)",
    "peak_tflops": "[0, inf)",
    "data.max_len": "[2, inf)",
    "optim.lr": "(0, inf)", "optim.warmup_steps": "[0, inf)", "optim.warmup_ratio": "[0, 1)",
    "optim.min_lr_ratio": "[0, 1]", "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "(0, inf)",
    "optim.weight_decay": "[0, inf)", "optim.clip_norm": "[0, inf)", "optim.z_loss": "[0, inf)",
    "mesh.data": "[-1, inf)", "mesh.fsdp": "[-1, inf)", "mesh.context": "[-1, inf)",  # -1 fills; 0 refused below
    "mesh.tensor": "[-1, inf)",
    "mesh.dcn_data": "[1, inf)", "mesh.dcn_fsdp": "[1, inf)", "mesh.dcn_context": "[1, inf)",
    "eval.examples": "[0, inf)", "eval.max_new_tokens": "[1, inf)", "eval.every": "[0, inf)", "eval.batches": "[0, inf)",
    "lora.rank": "[0, inf)", "lora.alpha": "(0, inf)", "lora.dropout": "[0, 1)",
    "preference.beta": "(0, inf)", "preference.simpo_gamma": "[0, inf)",
}
INT32_MAX = 2**31 - 1


def _in_range(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def numeric_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every int/float field of the recipe (None for unset optional ones)."""
    out = {}
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(numeric_keys(value, f"{key}."))
        elif ("int" in str(f.type) or "float" in str(f.type)) and not any(t in str(f.type) for t in ("bool", "list")):
            out[key] = value
    return out


def validate(cfg: TrainConfig) -> None:
    """Ranges of every numeric key, then cross-field checks, with messages that say which key to fix."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"config: {message}")

    for key, value in numeric_keys(cfg).items():
        if value is None:
            continue
        need(math.isfinite(value), f"{key} must be a finite number, got {value}")
        need(_in_range(value, RANGES[key]), f"{key} must be in {RANGES[key]}, got {value}")
        need(not isinstance(value, int) or key == "seed" or value <= INT32_MAX,
             f"{key} = {value} is too large (at most {INT32_MAX})")
    for axis in ("data", "fsdp", "context", "tensor"):
        need(getattr(cfg.mesh, axis) != 0, f"mesh.{axis} must be -1 (fill) or >= 1, got 0")
    need(cfg.steps > 0 or cfg.epochs > 0,
         f"set steps (> 0) or epochs (> 0); got steps={cfg.steps}, epochs={cfg.epochs}")
    need(cfg.batch_size % cfg.grad_accum == 0,
         f"batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum}")
    need(cfg.model.preset is not None or cfg.init_from is not None,
         "set model.preset (e.g. demo, llama2-7b) or init_from (a converted checkpoint)")
    unknown = sorted(set(cfg.model.overrides) - set(OVERRIDABLE))
    need(not unknown, f"model.overrides: unknown key(s) {unknown}; known: {list(OVERRIDABLE)} "
                      "(dtype, remat and attention are model.dtype, model.remat, model.attention)")
    need(cfg.data.format in DATA_FORMATS, f"data.format must be one of {DATA_FORMATS}, got {cfg.data.format!r}")
    need(not cfg.data.weights or len(cfg.data.weights) == len(cfg.data.train),
         f"data.weights has {len(cfg.data.weights)} entries for {len(cfg.data.train)} data.train entries")
    need(all(math.isfinite(w) and w > 0 for w in cfg.data.weights),
         f"data.weights must be finite numbers > 0, got {cfg.data.weights}")
    need(len(cfg.data.train) > 0, "data.train must name at least one file")
    need(cfg.optim.schedule in ("cosine", "linear", "constant"),
         f"optim.schedule must be cosine, linear or constant, got {cfg.optim.schedule!r}")
    need(cfg.model.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}, got {cfg.model.remat!r}")
    need(cfg.model.dtype in DTYPES, f"model.dtype must be one of {tuple(DTYPES)}, got {cfg.model.dtype!r}")
    need(cfg.model.attention in ATTENTION_IMPLEMENTATIONS,
         f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {cfg.model.attention!r}")
    need(cfg.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    pairs = cfg.objective != "sft"
    need(pairs == (cfg.data.format == "preference"),
         f"objective {cfg.objective} needs data.format {'preference' if pairs else 'alpaca, chat, pretrain, tokens or auto'}"
         f", got {cfg.data.format!r}" + ("" if pairs else " (preference pairs train with objective dpo, orpo, simpo or "
                                                            "reward)"))
    need(not (pairs and cfg.data.pack), "data.pack: preference pairs are not packed (each pair is two padded rows)")
    need(cfg.preference.template in ("chat", "alpaca"),
         f"preference.template must be chat or alpaca, got {cfg.preference.template!r}")
    need(not (cfg.objective == "reward" and cfg.preference.beta is not None),
         "preference.beta is not used by objective reward (its loss is -log sigmoid(r_chosen - r_rejected - margin))")
    need(not (cfg.objective == "reward" and cfg.lora.rank), "objective reward trains the whole model: set lora.rank 0")
    need(not (cfg.objective == "reward" and cfg.eval.data),
         "eval.data (exact match of generated answers) needs a language model; a reward model is evaluated on "
         "held-out pairs: eval.loss_data")
    lora = cfg.lora
    if lora.rank:
        need(cfg.init_from is not None, "lora.rank > 0 trains adapters on a base model: set init_from=CKPT")
        need(bool(lora.targets) and set(lora.targets) <= set(PROJECTIONS) and len(set(lora.targets)) == len(lora.targets),
             f"lora.targets must be distinct names from {list(PROJECTIONS)}, got {lora.targets}")
        need(lora.base_dtype in BASE_DTYPES, f"lora.base_dtype must be one of {BASE_DTYPES}, got {lora.base_dtype!r}")
