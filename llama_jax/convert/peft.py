"""PEFT LoRA adapters <-> llama_jax: a LoRA run -> a PEFT adapter folder, a PEFT adapter + base -> a merged checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from llama_jax import layout, lora
from llama_jax.checkpoint import (Staging, StreamingWriter, checkpoint_tokenizer, join, leaf_paths, load_adapters,
                                  open_checkpoint, read_config, read_lora_base, write_config)
from llama_jax.config import LlamaConfig
from llama_jax.convert.streaming import OUT_DTYPES
from llama_jax.convert.torch_io import load_pth, to_numpy
from llama_jax.tokenizer import Tokenizer
from llama_jax.model import param_shapes


def export_peft(run: str, out: str, overwrite: bool = False) -> LlamaConfig:
    """Write `out/adapter_config.json` + `out/adapter_model.safetensors` (float32) from a LoRA run's
    newest adapters: `peft.PeftModel.from_pretrained(hf_base_model, out)` loads them."""
    cfg = read_config(run)
    record = read_lora_base(run) if cfg.lora_rank else None
    if record is None:
        raise ValueError(f"{run}: not a LoRA training run (no lora.json; train with lora.rank > 0)")
    tensors = lora.to_peft(load_adapters(run, cfg), cfg)
    with Staging(out, overwrite, sources=(run, record["base"])) as stage:
        save_file(tensors, os.path.join(stage.path, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(stage.path, "adapter_config.json"), "w") as f:
            json.dump(lora.peft_config(cfg, base_model=record["base"]), f, indent=2)
    return cfg


def read_peft(adapter_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json, {name: array}) of a PEFT adapter folder (safetensors, or a weights-only .bin)."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; expected a PEFT adapter folder")
    with open(config_path) as f:
        config = json.load(f)
    safe, pickled = (os.path.join(adapter_dir, n) for n in ("adapter_model.safetensors", "adapter_model.bin"))
    if os.path.isfile(safe):
        return config, load_file(safe)
    if os.path.isfile(pickled):
        return config, {k: to_numpy(v) for k, v in load_pth(pickled).items()}
    raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def import_peft(adapter_dir: str, base: str, out: str, dtype: str | None = None, overwrite: bool = False,
                progress: bool = True) -> LlamaConfig:
    """Merge a PEFT LoRA adapter into the base checkpoint `base` and write the result to `out`.

    Streams one layer's slice at a time: W + (alpha / r) A B in float32, stored in `dtype`
    (default: the base's). The base is only read.
    """
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {OUT_DTYPES}")
    config, tensors = read_peft(adapter_dir)
    base_cfg, leaves = open_checkpoint(base)
    lora_cfg, adapters = lora.from_peft(tensors, config, base_cfg, where=adapter_dir)
    cfg = base_cfg.replace(param_dtype=dtype or base_cfg.param_dtype)
    merged = {layout.projection(t).path: t for t in lora_cfg.lora_targets}
    shapes = {leaf: s.shape for leaf, s in leaf_paths(param_shapes(cfg))}
    with Staging(out, overwrite, sources=(adapter_dir, base)) as stage:
        writer = StreamingWriter(join(stage.path, "params"), shapes, cfg.param_dtype)
        for leaf, shape in tqdm(shapes.items(), desc="merge", disable=not progress):
            if leaf not in merged:
                writer.write(leaf, None, leaves[leaf].read())
                continue
            node = adapters
            for key in leaf[:-1]:
                node = node[key]
            a, b = node[f"{leaf[-1]}_lora_a"], node[f"{leaf[-1]}_lora_b"]
            for i in range(shape[0]):
                w = leaves[leaf].read(i).astype(np.float32)
                writer.write(leaf, i, w + lora.delta(w.shape, a[i], b[i], lora_cfg.lora_scale))
        writer.finish()
        tokenizer = checkpoint_tokenizer(base)
        if tokenizer is not None:
            Tokenizer(tokenizer).save(stage.path)
        write_config(stage.path, cfg)
    return cfg
