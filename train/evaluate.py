"""Exact-match accuracy of greedy answers on held-out Alpaca records (the demo's proof of learning)."""

from __future__ import annotations

from typing import Any, Sequence

from llama_jax.config import LlamaConfig
from llama_jax.generate import generate
from llama_jax.tokenizer import Tokenizer, format_alpaca


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
