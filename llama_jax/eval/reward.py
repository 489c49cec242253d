"""Scoring with a reward model (llama_jax/reward.py): token sequences -> one reward each, batched and
bucketed as the Scorer batches (a few compiled programs for any mix of lengths); held-out preference
pairs -> accuracy (the share with r_chosen > r_rejected) and the mean margin r_chosen - r_rejected.

Right padding needs no mask: attention is causal, so the padding after a sequence cannot change
the hidden state of its last token, where the head reads the reward.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import jax
import numpy as np

from llama_jax import reward
from llama_jax.config import LlamaConfig
from llama_jax.eval.scoring import check_batch_size, length_bucket
from llama_jax.preference import Pair, pair_sequences
from llama_jax.tokenizer import Tokenizer
from sharding import batch_sharding


@functools.partial(jax.jit, static_argnames="cfg")
def _rewards(params: Any, tokens: jax.Array, lengths: jax.Array, *, cfg: LlamaConfig) -> jax.Array:
    return reward.rewards(params, tokens, lengths, cfg)


class RewardScorer:
    """Rewards of token sequences under one reward model (optionally on a mesh), `batch_size` rows per
    forward pass (a multiple of the mesh's data x fsdp)."""

    def __init__(self, params: Any, cfg: LlamaConfig, batch_size: int = 8, mesh: jax.sharding.Mesh | None = None):
        check_batch_size(batch_size, mesh)
        self.params, self.cfg, self.batch_size, self.mesh = params, cfg, batch_size, mesh

    def __call__(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float64 (N,) rewards, each at its sequence's last token."""
        for i, seq in enumerate(sequences):
            if not 1 <= len(seq) <= self.cfg.max_seq_len:
                raise ValueError(f"sequence {i}: {len(seq)} tokens; expected 1 to the model's context "
                                 f"max_seq_len={self.cfg.max_seq_len}")
        out = np.zeros(len(sequences), np.float64)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                length = length_bucket(len(sequences[rows[0]]), self.cfg.max_seq_len)
                tokens = np.zeros((self.batch_size, length), np.int32)
                lengths = np.ones((self.batch_size,), np.int32)
                for r, i in enumerate(rows):
                    tokens[r, :len(sequences[i])], lengths[r] = sequences[i], len(sequences[i])
                arrays = (tokens, lengths)
                if self.mesh is not None:
                    arrays = tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays)
                out[rows] = np.asarray(jax.device_get(_rewards(self.params, *arrays, cfg=self.cfg)))[:len(rows)]
        return out


def score_pairs(scorer: RewardScorer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, Pair]], template: str,
                max_len: int | None = None) -> dict:
    """{"accuracy", "margin", "pairs", "skipped"} of (where, Pair)s: each side laid out and cut to max_len
    (default: the model's context) exactly as training lays it out (llama_jax/preference.py)."""
    max_len = max_len or scorer.cfg.max_seq_len
    if max_len > scorer.cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's context max_seq_len={scorer.cfg.max_seq_len}")
    sequences, skipped = [], 0
    for where, pair in pairs:
        laid_out = pair_sequences(tokenizer, pair, template, max_len, where)
        if laid_out is None:
            skipped += 1
            continue
        sequences += [laid_out[0][0], laid_out[1][0]]
    if not sequences:
        raise ValueError(f"no pairs to score ({skipped} skipped: an answer longer than max_len {max_len} - 1)")
    scores = scorer(sequences).reshape(-1, 2)
    margin = scores[:, 0] - scores[:, 1]
    return {"accuracy": float(np.mean(margin > 0)), "margin": float(np.mean(margin)), "pairs": len(scores),
            "skipped": skipped}
