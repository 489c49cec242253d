"""Perplexity of held-out text with the sliding window of the transformers perplexity guide.

A document is encoded once as one sequence, BOS first, no EOS. Windows of up to `max_len`
tokens start every `stride` tokens (the last one ends at the end of the sequence); each window
scores only the tokens the previous window did not reach, with the window's earlier tokens as
context, so every token is scored once and the first token (BOS) never. With stride == max_len
the windows do not overlap and the first token of each window has no context: it is not scored
(as in the guide). nll is the mean negative log-likelihood in nats over the scored tokens.

The guide's own loop weights each window's mean loss by (labels - 1), which undercounts by one
token every window whose first label is already masked (all windows after the first when
stride < max_len); here every scored token counts once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

from llama_jax.eval.scoring import Scorer


def sliding_windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each window over a sequence of n_tokens: tokens[begin:end] with
    its last n_scored tokens scored (the guide's begin/end/trg_len loop)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one token of context, one scored), got {max_len}")
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_len, n_tokens)
        windows.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return [w for w in windows if w[2] > 0]


def perplexity(scorer: Scorer, documents: Sequence[Sequence[int]], max_len: int | None = None,
               stride: int | None = None, progress: bool = False) -> dict:
    """{"ppl", "nll", "tokens"} over documents (token lists, BOS first), each scored on its own
    and aggregated over tokens. Defaults: max_len = the model's context, stride = max_len // 2."""
    max_len = max_len or scorer.cfg.max_seq_len
    if max_len > scorer.cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's context max_seq_len={scorer.cfg.max_seq_len}")
    stride = stride or max(1, max_len // 2)
    spans, n_scored = [], []
    for doc in documents:
        for begin, end, n in sliding_windows(len(doc), max_len, stride):
            spans.append(doc[begin:end])
            n_scored.append(n)
    tokens = sum(n_scored)
    if tokens == 0:
        raise ValueError("nothing to score: every document has fewer than 2 tokens")
    totals, _ = scorer(spans, n_scored, desc="perplexity" if progress else None)
    nll = -float(totals.sum()) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens}


def read_texts(path: str, text_key: str = "text") -> list[str]:
    """The documents of a file: a .jsonl file holds one per line (its `text_key` field); any other
    file is one document, read whole."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [f.read()]
        texts = []
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{path}:{n}: expected a JSON object with a string {text_key!r} field "
                                 "(choose the field with --text-key)")
            texts.append(record[text_key])
    return texts
