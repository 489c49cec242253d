"""Evaluation during training: validation loss on held-out rows, and exact match of greedy answers
on held-out Alpaca records (the demo's proof of learning)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from llama_jax.config import LlamaConfig
from llama_jax.generate import generate
from llama_jax.tokenizer import Tokenizer, format_alpaca
from sharding import global_batch
from train.step import token_sums


def make_validation_loss(cfg: LlamaConfig) -> Callable:
    """The jitted (params, global batch) -> {"ce", "count", ...}: the train step's token sums (same
    targets and masking), without z-loss and without an update."""
    return jax.jit(lambda params, batch: token_sums(params, batch, cfg, 0.0)[1])


def validation_loss(loss_fn: Callable, params: Any, batches: Sequence[dict], mesh: Mesh) -> tuple[float, float]:
    """(eval_loss, eval_ppl): mean cross-entropy per target token over all batches, and its exp.
    Call it under the training mesh."""
    sums = jax.device_get([loss_fn(params, global_batch(batch, mesh)) for batch in batches])
    count = sum(float(s["count"]) for s in sums)
    if count == 0:
        raise ValueError("validation data has no target tokens")
    loss = sum(float(s["ce"]) for s in sums) / count
    return loss, math.exp(loss)


def exact_match(params: Any, cfg: LlamaConfig, tokenizer: Tokenizer, records: Sequence[dict],
                max_new_tokens: int = 32) -> tuple[float, list[dict]]:
    """Fraction of records whose greedy answer (up to EOS, stripped) equals the output exactly.

    Returns (accuracy, [{"instruction", "input", "expected", "got"}, ...]). Call it under the
    training mesh when params are sharded.
    """
    if not records:
        raise ValueError("exact_match: no evaluation records")
    prompts = [tokenizer.encode(format_alpaca(r["instruction"], r.get("input", "")), bos=True) for r in records]
    answers = generate(params, cfg, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_id=tokenizer.eos_id)
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "expected": r["output"],
             "got": tokenizer.decode(a)} for r, a in zip(records, answers)]
    hits = sum(row["got"].strip() == row["expected"].strip() for row in rows)
    return hits / len(rows), rows
