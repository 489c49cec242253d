"""A training run's output_dir: what it may be, who may write it, and what a resume may change.

- `claim(output_dir)`: refuses a file, a checkpoint (config.json + params/) or a folder holding
  someone else's config.json; takes the folder's lock (`run.lock`, naming its holder; see
  llama_jax/checkpoint/locks.py) and removes what killed runs left behind, saying so.
- `check_resume(cfg, model)`: a run folder's saved recipe (train_config.yaml) and model
  (config.json) against the new ones. Only the keys in CHANGEABLE_ON_RESUME may differ; every
  other difference is refused, naming the key with its old and new value.
- `record(cfg, model, tokenizer)`: writes config.json (with a reward model's head; a LoRA run's lora.json), train_config.yaml and the
  tokenizer's files, called only once the resume was accepted (or the run starts fresh), so a refused
  resume leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import yaml

import llama_jax as lj
from llama_jax.checkpoint import read_config, write_config, write_lora_base, write_text
from llama_jax.checkpoint.locks import clean_run_leftovers, locked_folder
from sharding import is_main_process
from train.config import TrainConfig

LOCK = "run.lock"
RECIPE = "train_config.yaml"

# What a resumed run may change, and why that is safe. Every other recipe key (and every model
# architecture field) must equal the saved run's. A recipe section that adds keys (lora.*, ...)
# is refused on resume unless it adds its safe keys here; "section.*" covers a whole section.
CHANGEABLE_ON_RESUME = {
    "output_dir": "the folder itself (a moved or differently spelled run folder resumes)",
    "steps": "extends or shortens the run (the learning-rate schedule is recomputed for the new total)",
    "epochs": "the same, counted in epochs",
    "checkpoint_every": "how often to save",
    "keep_checkpoints": "how many saves to keep",
    "log_every": "how often metrics are fetched and logged",
    "async_checkpointing": "whether saves overlap training",
    "tensorboard": "whether TensorBoard logs are written",
    "peak_tflops": "only the MFU figure",
    "grad_accum": "microbatches per step: the same batch and update (to float rounding), less memory",
    "mesh.*": "the device layout: checkpoints restore into any mesh",
    "model.remat": "what the backward pass recomputes: the same numbers",
    "model.attention": "the attention kernel: the same math",
    "eval.*": "held-out evaluation does not change training",
}


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


UNSET = _Unset()


def changeable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in CHANGEABLE_ON_RESUME)


def check_output_dir(output_dir: str) -> None:
    """Refuse an output_dir that is not (or cannot become) a training run folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is a file; expected a training run folder (new or existing)")
    if os.path.isdir(os.path.join(output_dir, "params")):
        raise ValueError(f"output_dir {output_dir} is a checkpoint (config.json + params/), not a training run "
                         "folder; train from it with init_from=" + output_dir + " and a new output_dir")
    if os.path.isfile(os.path.join(output_dir, "config.json")):
        try:
            read_config(output_dir, head=None)
        except ValueError as e:
            raise ValueError(f"output_dir {output_dir} holds a config.json that is not a llama_jax run's ({e}); "
                             "choose a new output_dir") from None


@contextlib.contextmanager
def claim(output_dir: str) -> Iterator[None]:
    """Check, create and lock output_dir (main process) for the duration of a run; a folder it
    created stays only if something was written into it."""
    check_output_dir(output_dir)
    if not is_main_process():
        yield
        return
    with locked_folder(output_dir, LOCK, f"training run folder {output_dir}"):  # a refused run leaves no folder
        clean_run_leftovers(output_dir)
        try:
            yield
        finally:  # a save that failed (a full disk) leaves no unfinished step folder behind
            clean_run_leftovers(output_dir)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def _saved_recipe(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RECIPE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            saved = yaml.safe_load(f.read().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: unreadable ({' '.join(str(e).split())}); it records the run's settings: "
                         "repair it or start a new output_dir") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a mapping of the run's settings, got {type(saved).__name__}")
    return saved


def check_resume(cfg: TrainConfig, model: lj.LlamaConfig) -> None:
    """Refuse to resume output_dir with settings other than its own (see CHANGEABLE_ON_RESUME)."""
    output_dir = cfg.output_dir
    changes = []
    saved = _saved_recipe(output_dir)
    if saved is not None:
        defaults, old, new = _flat(TrainConfig().to_dict()), _flat(saved), _flat(cfg.to_dict())
        for key in sorted(set(old) | set(new)):
            before, after = old.get(key, defaults.get(key, UNSET)), new.get(key, defaults.get(key, UNSET))
            if before != after and not changeable(key):
                changes.append(f"{key}: {before!r} -> {after!r}")
    if os.path.isfile(os.path.join(output_dir, "config.json")):
        before_model, after_model = read_config(output_dir, head=None).architecture(), model.architecture()
        changes += [f"model {key}: {before_model[key]!r} -> {after_model[key]!r}" for key in before_model
                    if before_model[key] != after_model[key]]
    if changes:
        allowed = ", ".join(CHANGEABLE_ON_RESUME)
        raise ValueError(f"output_dir {output_dir} holds a run with other settings; changed: {'; '.join(changes)}. "
                         f"A resume may change only {allowed}. Resume with the run's own settings "
                         f"({os.path.join(output_dir, RECIPE)}) or use a new output_dir")


def record(cfg: TrainConfig, model: lj.LlamaConfig, tokenizer: lj.Tokenizer) -> None:
    """Write the run's model (config.json, for load_checkpoint), a LoRA run's base (lora.json),
    recipe (train_config.yaml) and tokenizer (tokenizer.model or tokenizer.json + its side files,
    which generate and export-hf find there)."""
    if not is_main_process():
        return
    write_config(cfg.output_dir, model.replace(dtype="float32"), "reward" if cfg.objective == "reward" else "lm")
    if model.lora_rank:
        write_lora_base(cfg.output_dir, cfg.init_from, cfg.lora.base_dtype)
    write_text(os.path.join(cfg.output_dir, RECIPE), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tokenizer.save(cfg.output_dir)  # its bytes are in memory: safe when it was read from there
