"""Log-likelihood of token spans through the jitted forward: the engine under perplexity and the harness.

A request is (tokens, n_scored): the log-probability of the last `n_scored` tokens, each given
every token before it, and whether greedy decoding would have produced all of them. Requests are
sorted by length, right-padded into a few length buckets (powers of two from 16 up to the
model's context) and stacked into batches of a fixed size, so a whole evaluation compiles one
program per bucket, never one per request. Right padding needs no attention mask: attention is
causal, so padding after a row's tokens cannot change the logits of those tokens.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from sharding import batch_groups, batch_sharding

MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnames="cfg")
def score_batch(params: Any, inputs: jax.Array, targets: jax.Array, scored: jax.Array, *,
                cfg: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """Per row of (B, T) inputs: the sum of log p(targets) where `scored`, and whether every
    scored target is the argmax (float32 log-softmax, as lm-eval and HF compute it)."""
    logits = Llama(cfg).apply({"params": params}, inputs).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
    total = jnp.sum(jnp.where(scored, logprob, 0.0), axis=-1)
    greedy = jnp.all(~scored | (jnp.argmax(logits, axis=-1) == targets), axis=-1)
    return total, greedy


def length_bucket(n: int, max_len: int) -> int:
    """The padded length of an input of n tokens: the next power of two >= 16, at most max_len."""
    return min(max(1 << max(0, math.ceil(math.log2(max(n, 1)))), MIN_BUCKET), max_len)


class Scorer:
    """Batched, bucketed log-likelihoods of token spans under one model (optionally on a mesh).

    `batch_size` rows go through the forward at once (a multiple of the mesh's data x fsdp
    groups); every call pads to it, so the compiled programs are one per length bucket.
    """

    def __init__(self, params: Any, cfg: LlamaConfig, batch_size: int = 8,
                 mesh: jax.sharding.Mesh | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if mesh is not None and batch_size % batch_groups(mesh):
            raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's data x fsdp = "
                             f"{batch_groups(mesh)}")
        self.params, self.cfg, self.batch_size, self.mesh = params, cfg, batch_size, mesh

    def __call__(self, sequences: Sequence[Sequence[int]], n_scored: Sequence[int],
                 desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(log-likelihood sums as float64 (N,), all-greedy flags (N,)) of the last n_scored[i]
        tokens of each sequences[i]. A progress bar is shown when `desc` is given."""
        if len(sequences) != len(n_scored):
            raise ValueError(f"{len(sequences)} sequences but {len(n_scored)} n_scored values")
        for i, (seq, n) in enumerate(zip(sequences, n_scored)):
            if not 0 <= n < len(seq):
                raise ValueError(f"request {i}: cannot score {n} of {len(seq)} tokens (the first token has no "
                                 "context, so at most len - 1)")
            if len(seq) - 1 > self.cfg.max_seq_len:
                raise ValueError(f"request {i}: {len(seq) - 1} input tokens exceed the model's context "
                                 f"max_seq_len={self.cfg.max_seq_len}")
        totals = np.zeros(len(sequences), np.float64)
        greedy = np.ones(len(sequences), bool)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        batches = []
        for start in range(0, len(order), self.batch_size):  # longest first: a bucket's rows stay together
            rows = order[start:start + self.batch_size]
            batches.append((rows, length_bucket(len(sequences[rows[0]]) - 1, self.cfg.max_seq_len)))
        in_flight: collections.deque = collections.deque()
        with tqdm(total=len(sequences), desc=desc, disable=desc is None, dynamic_ncols=True) as bar, \
                (jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()):
            for rows, length in batches:
                in_flight.append((rows, self._dispatch([sequences[i] for i in rows], [n_scored[i] for i in rows],
                                                       length)))
                if len(in_flight) > 2:  # keep the device busy while the host pads the next batch
                    self._collect(*in_flight.popleft(), totals, greedy, bar)
            while in_flight:
                self._collect(*in_flight.popleft(), totals, greedy, bar)
        return totals, greedy

    def _dispatch(self, sequences: list, n_scored: list, length: int) -> tuple[jax.Array, jax.Array]:
        inputs = np.zeros((self.batch_size, length), np.int32)
        targets = np.zeros((self.batch_size, length), np.int32)
        scored = np.zeros((self.batch_size, length), bool)
        for r, (seq, n) in enumerate(zip(sequences, n_scored)):
            t = len(seq) - 1
            inputs[r, :t], targets[r, :t] = seq[:-1], seq[1:]
            scored[r, t - n:t] = True
        arrays = (inputs, targets, scored)
        if self.mesh is not None:
            arrays = jax.device_put(arrays, batch_sharding(self.mesh, 2))
        return score_batch(self.params, *arrays, cfg=self.cfg)

    @staticmethod
    def _collect(rows: list, result: tuple, totals: np.ndarray, greedy: np.ndarray, bar: tqdm) -> None:
        total, all_greedy = jax.device_get(result)
        totals[rows] = total[:len(rows)]
        greedy[rows] = all_greedy[:len(rows)]
        bar.update(len(rows))
