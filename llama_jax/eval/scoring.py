"""Log-likelihood of token spans through the jitted forward: the engine under perplexity and the harness.

A request is (tokens, n_scored): the log-probability of the last `n_scored` tokens, each given
every token before it, and whether greedy decoding would have produced all of them. Requests are
sorted by length, right-padded into a few length buckets (16, 24, 32, 48, 64, 96, ... up to the
model's context) and stacked into batches of a fixed size, so a whole evaluation compiles one
program per bucket, never one per request. Right padding needs no attention mask: attention is
causal, so padding after a row's tokens cannot change the logits of those tokens.

Requests that differ only in their last token (multiple choice with one-token answers, as in
MMLU's " A"/" B"/" C"/" D") share one row: the forward returns each row's log-softmax at its last
scored position, and every request of the row reads its own last token from it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
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
def score_batch(params: Any, inputs: jax.Array, targets: jax.Array, scored: jax.Array, last: jax.Array, *,
                cfg: LlamaConfig) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per row of (B, T) inputs, with `last` (B,) its last scored position: the sum of
    log p(targets) over the scored positions before `last`, whether each of those targets is the
    argmax, and at `last` the log-softmax (B, V) and its argmax (float32, as lm-eval and HF)."""
    logits = Llama(cfg).apply({"params": params}, inputs).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
    body = scored & (jnp.arange(inputs.shape[1]) != last[:, None])
    total = jnp.sum(jnp.where(body, logprob, 0.0), axis=-1)
    greedy = jnp.all(~body | (jnp.argmax(logits, axis=-1) == targets), axis=-1)
    at_last = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return total, greedy, jax.nn.log_softmax(at_last, axis=-1), jnp.argmax(at_last, axis=-1)


def length_bucket(n: int, max_len: int) -> int:
    """The padded length of an input of n tokens: the smallest of 16, 24, 32, 48, 64, 96, ...
    (powers of two and their midpoints: at most 1.5x padding) that holds it, at most max_len."""
    bucket = MIN_BUCKET
    while bucket < n:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return min(bucket, max_len)


def check_batch_size(batch_size: Any, mesh: jax.sharding.Mesh | None) -> None:
    """A scorer's rows per forward pass: an int >= 1, a multiple of the mesh's data x fsdp."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if mesh is not None and batch_size % batch_groups(mesh):
        raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's data x fsdp = "
                         f"{batch_groups(mesh)}")


class Scorer:
    """Batched, bucketed log-likelihoods of token spans under one model (optionally on a mesh).

    `batch_size` rows go through the forward at once (a multiple of the mesh's data x fsdp
    groups); every call pads to it, so the compiled programs are one per length bucket.
    """

    def __init__(self, params: Any, cfg: LlamaConfig, batch_size: int = 8,
                 mesh: jax.sharding.Mesh | None = None) -> None:
        check_batch_size(batch_size, mesh)
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
        rows: dict[tuple, int] = {}  # (n_scored, input tokens) -> row: requests that differ in the last token only
        members: list[list[int]] = []
        for i, (seq, n) in enumerate(zip(sequences, n_scored)):
            row = rows.setdefault((n, tuple(seq[:-1])), len(members))
            if row == len(members):
                members.append([])
            members[row].append(i)
        totals = np.zeros(len(sequences), np.float64)
        greedy = np.ones(len(sequences), bool)
        order = sorted(range(len(members)), key=lambda r: -len(sequences[members[r][0]]))
        in_flight: collections.deque = collections.deque()
        with tqdm(total=len(sequences), desc=desc, disable=desc is None, dynamic_ncols=True) as bar, \
                (jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()):
            for start in range(0, len(order), self.batch_size):  # longest first: a bucket's rows stay together
                batch = [members[r] for r in order[start:start + self.batch_size]]
                in_flight.append((batch, self._dispatch([sequences[m[0]] for m in batch],
                                                        [n_scored[m[0]] for m in batch])))
                if len(in_flight) > 2:  # keep the device busy while the host pads the next batch
                    self._collect(*in_flight.popleft(), sequences, n_scored, totals, greedy, bar)
            while in_flight:
                self._collect(*in_flight.popleft(), sequences, n_scored, totals, greedy, bar)
        return totals, greedy

    def _dispatch(self, sequences: list, n_scored: list) -> tuple:
        length = length_bucket(len(sequences[0]) - 1, self.cfg.max_seq_len)
        inputs = np.zeros((self.batch_size, length), np.int32)
        targets = np.zeros((self.batch_size, length), np.int32)
        scored = np.zeros((self.batch_size, length), bool)
        last = np.zeros((self.batch_size,), np.int32)
        for r, (seq, n) in enumerate(zip(sequences, n_scored)):
            t = len(seq) - 1
            inputs[r, :t], targets[r, :t] = seq[:-1], seq[1:]
            scored[r, t - n:t] = True
            last[r] = t - 1
        arrays = (inputs, targets, scored, last)
        if self.mesh is not None:
            arrays = tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays)
        return score_batch(self.params, *arrays, cfg=self.cfg)

    @staticmethod
    def _collect(batch: list, result: tuple, sequences: Sequence, n_scored: Sequence, totals: np.ndarray,
                 greedy: np.ndarray, bar: tqdm) -> None:
        body, body_greedy, last_logprobs, last_argmax = jax.device_get(result)
        for r, requests in enumerate(batch):
            for i in requests:
                if n_scored[i] == 0:
                    totals[i], greedy[i] = 0.0, True
                    continue
                token = sequences[i][-1]
                totals[i] = float(body[r]) + float(last_logprobs[r, token])
                greedy[i] = bool(body_greedy[r]) and int(last_argmax[r]) == token
            bar.update(len(requests))
