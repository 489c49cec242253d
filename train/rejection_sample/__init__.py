"""Rejection sampling (Llama 2-Chat's RLHF step before PPO): K answers per prompt from the policy,
scored by a reward model; the best becomes SFT data, or the best and the worst a new preference pair.

Generation is the batched engine's (`lj.generate`): the K samples of a prompt are K rows of one
call, so they differ by their row's key; each call of up to `batch_size` rows draws with its own
seed (derived from `seed` and the call's number), so a run is reproducible. Every answer is scored
as training would lay it out (llama_jax/preference.py's `answer_sequence`: prompt template + answer
+ EOS) by the reward model's scorer (llama_jax/eval/reward.py).

Records written (one per prompt, in prompt order):
- keep "best": SFT data the trainer reads as it is: {"instruction", "input", "output", "reward"}
  (string prompts under the alpaca template: data.format alpaca), else {"messages": [... the prompt,
  {"role": "assistant", "content": best}], "reward"} (data.format chat);
- keep "pairs": {"prompt" (or "messages"), "input"?, "chosen": best, "rejected": worst,
  "reward_chosen", "reward_rejected"} (data.format preference); a prompt whose K answers all have
  the same reward gives no pair (counted as skipped).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.eval.reward import RewardScorer
from llama_jax.generate import generate
from llama_jax.preference import answer_sequence, encode_prompt
from llama_jax.tokenizer import Tokenizer

KEEP = ("best", "pairs")


@dataclasses.dataclass
class Sampling:
    k: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 64  # rows (prompt copies) per generate call


def call_seed(seed: int, call: int) -> int:
    """The seed of generate call number `call`: distinct per call, a pure function of (seed, call)."""
    return int(np.random.SeedSequence([seed, call]).generate_state(1)[0])


def sample_answers(params: Any, cfg: LlamaConfig, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                   sampling: Sampling) -> list[list[str]]:
    """K decoded answers (EOS cut) per prompt's ids, generated `batch_size` rows at a time."""
    if sampling.k < 1 or sampling.batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got {sampling.k} and {sampling.batch_size}")
    rows = [p for p in prompts for _ in range(sampling.k)]
    answers: list[str] = []
    for call, start in enumerate(range(0, len(rows), sampling.batch_size)):
        new = generate(params, cfg, rows[start:start + sampling.batch_size], sampling.max_new_tokens,
                       sampling.temperature, sampling.top_p, sampling.top_k, call_seed(sampling.seed, call),
                       tokenizer.eos_id)
        answers += [tokenizer.decode(ids) for ids in new]
    return [answers[i * sampling.k:(i + 1) * sampling.k] for i in range(len(prompts))]


def rejection_sample(policy: tuple[LlamaConfig, Any], scorer: RewardScorer, tokenizer: Tokenizer,
                     prompts: Sequence[tuple[str, Any, str]], sampling: Sampling, template: str = "chat",
                     keep: str = "best") -> tuple[list[dict], dict]:
    """(records, summary) for (where, prompt, Alpaca input) triples: K samples each, scored, the best
    (keep "best") or the best and the worst (keep "pairs") written as the module docstring says."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    cfg, params = policy
    ids = [encode_prompt(tokenizer, prompt, template, extra, where) for where, prompt, extra in prompts]
    answers = sample_answers(params, cfg, tokenizer, ids, sampling)
    sequences = [answer_sequence(tokenizer, prompt, a, template, extra, where)[0]
                 for (where, prompt, extra), group in zip(prompts, answers) for a in group]
    scores = scorer(sequences).reshape(len(prompts), sampling.k)
    records, skipped = [], 0
    for (_, prompt, extra), group, r in zip(prompts, answers, scores):
        best, worst = int(np.argmax(r)), int(np.argmin(r))
        if keep == "best":
            records.append(sft_record(prompt, extra, group[best], float(r[best]), template))
        elif r[best] > r[worst]:
            records.append(pair_record(prompt, extra, group[best], group[worst], float(r[best]), float(r[worst])))
        else:
            skipped += 1
    summary = {"prompts": len(prompts), "samples": int(scores.size), "kept": len(records), "skipped": skipped,
               "mean_reward": float(scores.mean()), "mean_best_reward": float(scores.max(axis=1).mean())}
    return records, summary


def _prompt_fields(prompt: Any, extra: str) -> dict:
    fields = {"prompt": prompt} if isinstance(prompt, str) else {"messages": [dict(m) for m in prompt]}
    return {**fields, "input": extra} if extra else fields


def sft_record(prompt: Any, extra: str, answer: str, score: float, template: str) -> dict:
    if isinstance(prompt, str) and template == "alpaca":
        return {"instruction": prompt, "input": extra, "output": answer, "reward": score}
    dialog = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return {"messages": dialog + [{"role": "assistant", "content": answer}], "reward": score}


def pair_record(prompt: Any, extra: str, chosen: str, rejected: str, r_chosen: float, r_rejected: float) -> dict:
    return {**_prompt_fields(prompt, extra), "chosen": chosen, "rejected": rejected, "reward_chosen": r_chosen,
            "reward_rejected": r_rejected}
