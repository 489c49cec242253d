"""A checkpoint loaded for evaluation: its dtype (params and compute), its device mesh, its tokenizer."""

from __future__ import annotations

from typing import Any

import jax

from llama_jax.checkpoint import checkpoint_tokenizer, load_checkpoint
from llama_jax.config import LlamaConfig
from sharding import inference_mesh


# (1, fsdp, tensor_parallel) over the first devices, or None for one: generate's and serve's mesh too.
eval_mesh = inference_mesh


def load_for_eval(checkpoint: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                  head: str = "lm") -> tuple[LlamaConfig, Any]:
    """(cfg, params) of a checkpoint (or training run; head "reward": a reward model), placed on `mesh`.
    `dtype` sets both the params and the compute dtype (bfloat16 on accelerators); logits stay float32."""
    cfg, params = load_checkpoint(checkpoint, mesh=mesh, dtype=dtype, head=head)
    return (cfg if dtype is None else cfg.replace(dtype=dtype)), params


def tokenizer_path(checkpoint: Any, tokenizer: str | None) -> Any:
    """`tokenizer` if given, else the tokenizer a checkpoint or run folder carries."""
    if tokenizer is not None:
        return tokenizer
    found = checkpoint_tokenizer(str(checkpoint)) if isinstance(checkpoint, str) else None
    if found is None:
        raise ValueError("no tokenizer given and the checkpoint carries none (tokenizer.model or tokenizer.json); "
                         "pass --tokenizer (e.g. Meta's tokenizer.model, or the Hub repo id)")
    return found
