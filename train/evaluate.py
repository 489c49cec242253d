"""Evaluation during training: validation loss on held-out rows (for preference objectives also the
held-out reward accuracy and margin), and exact match of greedy answers on held-out Alpaca records
(the demo's proof of learning), overall and per task (records grouped by their instruction), with a
short printable report."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from llama_jax.config import LlamaConfig
from llama_jax.generate import generate
from llama_jax.tokenizer import Tokenizer, format_alpaca
from sharding import global_batch
from train.objectives import pair_sums
from train.step import token_sums


def make_validation_loss(cfg: LlamaConfig, objective: str = "sft", beta: float = 0.0,
                         simpo_gamma: float = 0.0) -> Callable:
    """The jitted (params, global batch) -> {"ce", "count", ...}: the train step's token sums (same
    targets and masking), without z-loss and without an update; for a preference objective its pair
    sums (train/objectives.py)."""
    if objective == "sft":
        return jax.jit(lambda params, batch: token_sums(params, batch, cfg, 0.0)[1])
    return jax.jit(lambda params, batch: pair_sums(params, batch, cfg, objective, beta, simpo_gamma)[1])


def validation_loss(loss_fn: Callable, params: Any, batches: Sequence[dict], mesh: Mesh) -> tuple[float, float]:
    """(eval_loss, eval_ppl): mean cross-entropy per target token over all batches, and its exp.
    Call it under the training mesh."""
    sums = jax.device_get([loss_fn(params, global_batch(batch, mesh)) for batch in batches])
    count = sum(float(s["count"]) for s in sums)
    if count == 0:
        raise ValueError("validation data has no target tokens")
    loss = sum(float(s["ce"]) for s in sums) / count
    return loss, math.exp(loss)


def validation_metrics(loss_fn: Callable, params: Any, batches: Sequence[dict], mesh: Mesh,
                       objective: str = "sft") -> dict[str, float]:
    """{"eval_loss", "eval_ppl"} (sft), or for pairs the means over held-out pairs of the train step's
    metrics: eval_loss, eval_reward_accuracy, eval_reward_margin, eval_rewards_chosen, ..."""
    if objective == "sft":
        loss, ppl = validation_loss(loss_fn, params, batches, mesh)
        return {"eval_loss": loss, "eval_ppl": ppl}
    sums = jax.device_get([loss_fn(params, global_batch(batch, mesh)) for batch in batches])
    count = sum(float(s["count"]) for s in sums)
    if count == 0:
        raise ValueError("validation data has no pairs with answer tokens")
    return {f"eval_{k}": sum(float(s[k]) for s in sums) / count for k in sums[0] if k not in ("count", "target_tokens")}


def exact_match(params: Any, cfg: LlamaConfig, tokenizer: Tokenizer, records: Sequence[dict],
                max_new_tokens: int = 32) -> tuple[float, list[dict]]:
    """Fraction of records whose greedy answer (up to EOS, stripped) equals the output exactly.

    Returns (accuracy, [{"instruction", "input", "expected", "got", "correct"}, ...]). Call it under
    the training mesh when params are sharded.
    """
    if not records:
        raise ValueError("exact_match: no evaluation records")
    prompts = [tokenizer.encode(format_alpaca(r["instruction"], r.get("input", "")), bos=True) for r in records]
    answers = generate(params, cfg, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_id=tokenizer.eos_ids)
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "expected": r["output"],
             "got": tokenizer.decode(a)} for r, a in zip(records, answers)]
    for row in rows:
        row["correct"] = row["got"].strip() == row["expected"].strip()
    return sum(row["correct"] for row in rows) / len(rows), rows


def _by_task(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by instruction, in the order the instructions first occur."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["instruction"], []).append(row)
    return groups


def per_task(rows: Sequence[dict]) -> dict[str, float]:
    """Accuracy per instruction, in the order the instructions first occur in rows."""
    return {task: sum(r["correct"] for r in g) / len(g) for task, g in _by_task(rows).items()}


def examples(rows: Sequence[dict], n: int) -> list[dict]:
    """Up to n rows, taken round-robin over the instructions (so every task shows up)."""
    groups = list(_by_task(rows).values())
    picked: list[dict] = []
    for i in range(max((len(g) for g in groups), default=0)):
        picked += [g[i] for g in groups if i < len(g)]
    return picked[:n]


def report(rows: Sequence[dict], name: str, n_examples: int = 4) -> list[str]:
    """Printable lines: the overall accuracy, one line per task, then n_examples answers to check by eye."""
    hits = sum(row["correct"] for row in rows)
    lines = [f"exact match on {len(rows)} held-out examples ({name}): {hits / len(rows):.1%}"]
    groups = _by_task(rows)
    width = max(len(task) for task in groups)
    for task, g in groups.items():
        h = sum(r["correct"] for r in g)
        lines.append(f"  {task:<{width}}  {h:>3}/{len(g):<3} {h / len(g):6.1%}")
    for row in examples(rows, n_examples):
        lines.append(f"  {'ok ' if row['correct'] else 'BAD'} {row['instruction']} input {row['input']!r}: "
                     f"expected {row['expected']!r}, got {row['got']!r}")
    return lines
