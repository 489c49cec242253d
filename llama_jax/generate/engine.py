"""The token-level generation engine: a jitted prefill, an on-device decode loop over a
preallocated KV cache, and Meta's samplers (`generate`, `generate_stream`).

How a batch runs (read `generate`):
- Prompts of different lengths are right-padded into one (batch, length) array. The prefill runs
  the whole array at positions 0..T-1 and fills cache slots 0..T-1; row b then decodes at
  positions len_b, len_b + 1, ..., so its padding slots are overwritten before any query can read
  them (attention reads slots <= the query position). No position shift, no attention mask.
- A long prompt is prefilled `prefill_chunk` positions at a time (`prefill`, a `lax.scan` over
  chunks): each chunk writes its K/V into the cache and attends to the cache so far plus itself,
  causally, so activations (attention scores, MLP, logits) grow with the chunk, not the prompt.
- The decode is one `lax.while_loop` on device (buffers donated) that stops when every row has
  produced one of the end tokens (`eos_id`: one id or several, as Llama 3.1's) or
  `max_new_tokens` tokens: no Python per token.
- Batch and prompt length are rounded up to powers of two and the cache to prompt bucket +
  power-of-two new tokens, so a handful of compiled programs serve every request. Temperature
  (0 = greedy, a lax.cond), top-p, top-k, seed, the end tokens (up to EOS_SLOTS of them) and
  max_new_tokens are traced values: changing them never recompiles.
- Streaming (`generate_stream`) runs the same compiled decode loop a chunk of steps at a time.
- A `stop` check (stop strings: generate/stops.py) runs on the host between chunks of the same
  loop; a row it ends gets its done flag set on the device, and the loop exits once all are done.
- Sampling draws row r's step-s token with key fold_in(fold_in(key(seed), r), s), so a prompt's
  text depends only on (seed, its index, the settings), not on the batch bucket or on streaming.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama, init_cache

Array = jax.Array
MIN_LENGTH_BUCKET = 16
PREFILL_CHUNK = 512  # prompt positions per prefill step (scores B*H*512*S floats, not B*H*T*S); None = all at once
EOS_SLOTS = 4  # end-token ids go to the device padded to a multiple of this (changing them never recompiles)


# --- samplers ---------------------------------------------------------------------------------


def _sorted_filtered(probs: Array, top_p: Array, top_k: Array) -> tuple[Array, Array]:
    """Sort probs (..., V) descending; keep the top_k ranks (0 = all), renormalise, then keep
    tokens whose preceding cumulative mass is <= top_p (the token that crosses p stays, Meta's
    rule), renormalise. Returns (kept probs in sorted order, the sort order)."""
    order = jnp.argsort(-probs, axis=-1, stable=True)
    p = jnp.take_along_axis(probs, order, axis=-1)
    rank = jnp.arange(p.shape[-1])
    p = jnp.where((top_k <= 0) | (rank < top_k), p, 0.0)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    preceding = jnp.cumsum(p, axis=-1) - p
    p = jnp.where((top_p >= 1.0) | (preceding <= top_p), p, 0.0)
    return p / jnp.sum(p, axis=-1, keepdims=True), order


def filter_probs(probs: Array, top_p: float = 1.0, top_k: int = 0) -> Array:
    """The renormalised distribution (..., V) that nucleus / top-k sampling draws from."""
    p, order = _sorted_filtered(jnp.asarray(probs, jnp.float32), jnp.float32(top_p), jnp.int32(top_k))
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(p, inverse, axis=-1)


def sample(keys: Array, logits: Array, temperature: Array, top_p: Array, top_k: Array) -> Array:
    """One token per row of logits (B, V): argmax where temperature == 0, else temperature, then
    top-k, then top-p (Meta's keep rule), then a draw with each row's key (B,). The settings are
    scalars (one for all rows) or (B,) arrays (one per row, as the continuous batcher's slots)."""
    rows = logits.shape[0]
    temperature, top_p, top_k = (jnp.broadcast_to(x, (rows,))[:, None] for x in (temperature, top_p, top_k))
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        # Shift so the largest logit is 0 before dividing: any finite temperature > 0 then gives
        # values in [-inf, 0] (never inf - inf = NaN); a temperature below float32's smallest
        # normal (which a CPU may flush to 0) is held there, which is greedy in effect. Rows at
        # temperature 0 take the greedy token below (their draw is discarded).
        logits = logits.astype(jnp.float32)
        shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
        safe_t = jnp.where(temperature > 0, jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny), 1.0)
        probs = jax.nn.softmax(shifted / safe_t, axis=-1)
        p, order = _sorted_filtered(probs, top_p, top_k)
        index = jax.vmap(jax.random.categorical)(keys, jnp.log(p))
        drawn = jnp.take_along_axis(order, index[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature[:, 0] > 0, drawn, greedy)

    return lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, logits)


def _logprob(logits: Array, tokens: Array) -> Array:
    """log p(token) under the model's own distribution (before temperature/top-p), as Meta reports."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


# --- the compiled prefill and decode loop ------------------------------------------------------


def _step_keys(row_keys: Array, step: Array) -> Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


def prefill(params: Any, cfg: LlamaConfig, tokens: Array, lengths: Array, cache: dict,
            chunk: int | None) -> tuple[Array, dict, Array]:
    """Run right-padded prompts (B, T) into `cache` at positions 0..T-1, `chunk` positions per step
    (None or >= T: one step). Returns (each row's logits after its last prompt token (B, V), the
    cache, log p of every prompt token after the first (B, T-1), for echo).

    Each chunk goes through the model's KV-cache path: its K/V are written at its positions and
    its queries attend to every slot at or before their own position, i.e. the chunks before it
    and itself, causally: the same attention as one step over the whole prompt. The chunks are a
    `lax.scan` (one compiled body) plus one shorter tail when `chunk` does not divide T."""
    b, t = tokens.shape
    model = Llama(cfg)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)  # what each position predicts (last: unused)

    def step(cache: dict, last: Array, start: int | Array, toks: Array, targets: Array):
        n = toks.shape[1]
        positions = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (b, n))
        logits, cache = model.apply({"params": params}, toks, positions, None, cache)
        at = lengths - 1 - start  # this chunk's index of each row's last prompt token (if it is here)
        picked = jnp.take_along_axis(logits, jnp.clip(at, 0, n - 1)[:, None, None], axis=1)[:, 0]
        last = jnp.where(((at >= 0) & (at < n))[:, None], picked, last)
        return cache, last, _logprob(logits, targets)

    last = jnp.zeros((b, cfg.vocab_size), jnp.float32)
    chunk = t if chunk is None else min(chunk, t)
    full, tail = divmod(t, chunk)
    if full == 1 and not tail:
        cache, last, logprobs = step(cache, last, 0, tokens, nxt)
        return last, cache, logprobs[:, :-1]

    def body(carry, xs):
        cache, last = carry
        start, toks, targets = xs
        cache, last, logprobs = step(cache, last, start, toks, targets)
        return (cache, last), logprobs

    split = lambda x: x[:, :full * chunk].reshape(b, full, chunk).swapaxes(0, 1)  # noqa: E731  (chunks, B, chunk)
    starts = jnp.arange(full, dtype=jnp.int32) * chunk
    (cache, last), logprobs = lax.scan(body, (cache, last), (starts, split(tokens), split(nxt)))
    logprobs = logprobs.swapaxes(0, 1).reshape(b, full * chunk)
    if tail:
        cache, last, rest = step(cache, last, full * chunk, tokens[:, full * chunk:], nxt[:, full * chunk:])
        logprobs = jnp.concatenate([logprobs, rest], axis=1)
    return last, cache, logprobs[:, :-1]


def is_end(tokens: Array, eos_ids: Array) -> Array:
    """Whether each token is one of the end tokens `eos_ids` (padded with -2, never a token)."""
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "new_bucket", "chunk"))
def _prefill(params: Any, tokens: Array, lengths: Array, active: Array, sampling: dict, *, cfg: LlamaConfig,
             slots: int, new_bucket: int, chunk: int | None) -> tuple[dict, Array]:
    """Run the padded prompts (B, T) (in chunks: `prefill`), sample each row's first new token,
    return the loop state and the log-probability of every prompt token after the first (for
    echo; fused, nearly free)."""
    b, t = tokens.shape
    last, cache, prompt_logprobs = prefill(params, cfg, tokens, lengths, init_cache(cfg, b, slots), chunk)
    seed_key = jax.random.key(sampling["seed"])
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed_key, jnp.arange(b))
    token = sample(_step_keys(row_keys, 0), last, sampling["temperature"], sampling["top_p"],
                   sampling["top_k"])
    token = jnp.where(active, token, -1)
    out = jnp.full((b, new_bucket), -1, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((b, new_bucket), jnp.float32).at[:, 0].set(_logprob(last, token))
    state = {"cache": cache, "tokens": out, "logprobs": logprobs, "step": jnp.int32(1), "last": token,
             "lengths": lengths, "done": ~active | is_end(token, sampling["eos_ids"]), "row_keys": row_keys}
    return state, prompt_logprobs


@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=1)
def _decode(params: Any, state: dict, until: Array, sampling: dict, *, cfg: LlamaConfig) -> dict:
    """Decode on device until every row is done or `until` tokens exist (state["step"] counts them)."""
    model = Llama(cfg)

    def cond(s):
        return (s["step"] < until) & ~jnp.all(s["done"])

    def body(s):
        step = s["step"]
        positions = (s["lengths"] + step - 1)[:, None]  # where the last token goes
        logits, cache = model.apply({"params": params}, jnp.maximum(s["last"], 0)[:, None], positions, None,
                                    s["cache"])
        logits = logits[:, 0]
        token = sample(_step_keys(s["row_keys"], step), logits, sampling["temperature"], sampling["top_p"],
                       sampling["top_k"])
        token = jnp.where(s["done"], -1, token)
        logprob = jnp.where(s["done"], 0.0, _logprob(logits, jnp.maximum(token, 0)))
        return {**s, "cache": cache, "step": step + 1, "last": token,
                "tokens": s["tokens"].at[:, step].set(token), "logprobs": s["logprobs"].at[:, step].set(logprob),
                "done": s["done"] | is_end(token, sampling["eos_ids"])}

    return lax.while_loop(cond, body, state)


# --- the public token-level API ------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _check_request(cfg: LlamaConfig, prompts: Any, max_new_tokens: Any, temperature: Any, top_p: Any,
                   top_k: Any, seed: Any, eos_id: Any) -> list[list[int]]:
    """Raise a clear error for anything generate cannot honour; return the prompts as int lists."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists, e.g. [[1, 15043]], "
                         f"got {type(prompts).__name__}")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(prompt).__name__} "
                            "(use Generator to generate from text)")
        if any(not isinstance(x, (int, np.integer)) or isinstance(x, bool) for x in prompt):
            raise TypeError(f"prompts[{i}] must hold int token ids, got {[type(x).__name__ for x in prompt][:3]}...")
        row = [int(x) for x in prompt]
        if len(row) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token (e.g. BOS = 1)")
        bad = [x for x in row if not 0 <= x < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}] has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        rows.append(row)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_seq_len:
        if longest >= cfg.max_seq_len:
            raise ValueError(f"the longest prompt ({longest} tokens) alone fills the model's context "
                             f"max_seq_len={cfg.max_seq_len}; shorten it")
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context max_seq_len={cfg.max_seq_len}; shorten the prompt or ask for at most "
                         f"{cfg.max_seq_len - longest} new tokens")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {top_k!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    end_ids(eos_id, cfg.vocab_size)
    return rows


def end_ids(eos_id: Any, vocab_size: int) -> tuple[int, ...]:
    """The end tokens as a tuple: `eos_id` is None (never stop early), one token id, or a sequence
    of them (Llama 3.1 ends on <|end_of_text|>, <|eom_id|> and <|eot_id|>: `Tokenizer.eos_ids`)."""
    ids = () if eos_id is None else (eos_id,) if isinstance(eos_id, (int, np.integer)) else eos_id
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_id must be None, a token id or a list of token ids in [0, {vocab_size}), "
                         f"got {eos_id!r}")
    return tuple(int(i) for i in ids)


def _device_end_ids(ids: tuple[int, ...]) -> Array:
    """The end tokens as the int32 array the compiled programs compare with: padded with -2 (never
    a token, nor the -1 of finished rows) to a multiple of EOS_SLOTS, so their number rarely recompiles."""
    padded = np.full((-(-max(len(ids), 1) // EOS_SLOTS) * EOS_SLOTS,), -2, np.int32)
    padded[:len(ids)] = ids
    return jnp.asarray(padded)


def check_prefill_chunk(chunk: Any, name: str = "prefill_chunk") -> None:
    if chunk is not None and (not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"{name} must be None (the whole prompt in one step) or an int >= 1, got {chunk!r}")


def prefill_step(chunk: int | None, length: int) -> int | None:
    """The static chunk a prompt bucket of `length` compiles with: None when one step covers it
    (so short prompts share the one-step programs whatever the chunk setting)."""
    return None if chunk is None or chunk >= length else int(chunk)


def _start(params: Any, cfg: LlamaConfig, prompts: Any, max_new_tokens: int, temperature: float, top_p: float,
           top_k: int, seed: int, eos_id: Any, prefill_chunk: int | None):
    """Validate, pad into buckets and prefill. Returns (rows, state, prompt logprobs, sampling)."""
    rows = _check_request(cfg, prompts, max_new_tokens, temperature, top_p, top_k, seed, eos_id)
    check_prefill_chunk(prefill_chunk)
    batch = _pow2(len(rows))
    length = min(max(_pow2(max(len(r) for r in rows)), MIN_LENGTH_BUCKET), cfg.max_seq_len)
    new_bucket = _pow2(max_new_tokens)
    slots = min(length + new_bucket, cfg.max_seq_len)
    tokens = np.zeros((batch, length), np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        lengths[i] = len(row)
    sampling = {"temperature": jnp.float32(temperature), "top_p": jnp.float32(top_p),
                "top_k": jnp.int32(min(top_k, cfg.vocab_size)), "seed": jnp.uint32(seed),
                "eos_ids": _device_end_ids(end_ids(eos_id, cfg.vocab_size))}
    active = np.arange(batch) < len(rows)
    state, prompt_logprobs = _prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(active),
                                      sampling, cfg=cfg, slots=slots, new_bucket=new_bucket,
                                      chunk=prefill_step(prefill_chunk, length))
    return rows, state, prompt_logprobs, sampling


def _kept(tokens: np.ndarray, eos_ids: tuple[int, ...]) -> int:
    """How many of a row's new tokens to return: up to (not including) an end token or the first unused slot."""
    stop = [i for i, t in enumerate(tokens) if t < 0 or t in eos_ids]
    return stop[0] if stop else len(tokens)


StopCheck = Callable[[int, list[int]], int | None]  # (row, its new tokens so far) -> None or tokens to keep


def _chunks(params: Any, cfg: LlamaConfig, rows: list[list[int]], state: dict, sampling: dict, max_new_tokens: int,
            eos_ids: tuple[int, ...], chunk: int, stop: StopCheck | None,
            kept: list[int | None]) -> Iterator[tuple[list[list[int]], dict]]:
    """Decode `chunk` steps per call of the compiled loop; yield (each row's new tokens since the
    last yield, the state). After each chunk `stop(row, its new tokens so far)` may end a row:
    kept[row] records how many tokens it keeps, and its done flag is set on the device, so the
    loop exits as soon as every row has ended (EOS, max_new_tokens or a stop)."""
    seen: list[list[int]] = [[] for _ in rows]
    ended = [False] * len(rows)
    done_until = 0
    while True:
        step = int(state["step"])
        new = np.asarray(state["tokens"])[: len(rows), done_until:step]  # a few KB to the host, no slicing op
        pieces, stopped_now = [], []
        for i in range(len(rows)):
            piece = [] if ended[i] else new[i, :_kept(new[i], eos_ids)].tolist()
            ended[i] = ended[i] or len(piece) < new.shape[1]
            if stop is not None and piece:
                seen[i] += piece
                keep = stop(i, seen[i])
                if keep is not None:
                    lowest = len(seen[i]) - len(piece)
                    if not isinstance(keep, (int, np.integer)) or not lowest <= keep <= len(seen[i]):
                        raise ValueError(f"stop({i}, tokens) returned {keep!r}: expected None or a token count in "
                                         f"[{lowest}, {len(seen[i])}] (earlier tokens were already returned)")
                    piece = piece[:keep - lowest]
                    kept[i], ended[i] = int(keep), True
                    stopped_now.append(i)
            pieces.append(piece)
        yield pieces, state
        done_until = step
        if step >= max_new_tokens or all(ended):
            return
        if stopped_now:
            ended_now = np.zeros(state["done"].shape, bool)
            ended_now[stopped_now] = True
            state = {**state, "done": state["done"] | ended_now}
        state = _decode(params, state, jnp.int32(min(step + chunk, max_new_tokens)), sampling, cfg=cfg)


def _check_chunk(chunk: Any) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")


def generate(params: Any, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             eos_id: int | Sequence[int] | None = 2, logprobs: bool = False, echo: bool = False,
             stop: StopCheck | None = None, chunk: int = 16, prefill_chunk: int | None = PREFILL_CHUNK) -> Any:
    """New tokens for each prompt (list of token-id lists, any lengths), the end token not included.

    temperature 0 is greedy; otherwise temperature, then top-k (0 = off), then nucleus top-p with
    Meta's keep rule, then a seeded draw. A row ends at its first token in `eos_id` (one id, or a
    list: `Tokenizer.eos_ids`, e.g. Llama 3.1's three end tokens); `eos_id=None` never stops early.
    With `logprobs=True` returns (tokens, logprobs): the log-probability of each returned token
    under the model (before temperature/top-p, as Meta reports). With `echo=True` the returned rows
    start with the prompt, whose logprobs are those of each prompt token given the ones before (0.0
    for the first token), as in Meta's reference. Run it under `with mesh:` for sharded decoding.

    `prefill_chunk`: prompt positions per prefill step (`prefill`); the results equal one step's
    (None) to float32 rounding, and a long prompt's activations stay those of a chunk.
    `stop(row, new_tokens_so_far)` is called every `chunk` decode steps for each running row and
    returns None to go on or how many of its tokens to keep (the row ends there: see
    `StopMatcher.update` for stop strings). Without it the whole decode is one on-device loop.
    """
    _check_chunk(chunk)
    rows, state, prompt_logprobs, sampling = _start(params, cfg, prompts, max_new_tokens, temperature,
                                                    top_p, top_k, seed, eos_id, prefill_chunk)
    ends = end_ids(eos_id, cfg.vocab_size)
    kept: list[int | None] = [None] * len(rows)
    if stop is None:
        state = _decode(params, state, jnp.int32(max_new_tokens), sampling, cfg=cfg)
    else:
        for _, state in _chunks(params, cfg, rows, state, sampling, max_new_tokens, ends, chunk, stop, kept):
            pass
    out_tokens, out_logprobs = np.asarray(state["tokens"]), np.asarray(state["logprobs"])
    prompt_logprobs = np.asarray(prompt_logprobs) if echo else None
    results, scores = [], []
    for i, row in enumerate(rows):
        n = _kept(out_tokens[i, :max_new_tokens], ends)
        n = n if kept[i] is None else min(n, kept[i])
        new, new_lp = out_tokens[i, :n].tolist(), out_logprobs[i, :n].tolist()
        if echo:
            new = row + new
            new_lp = [0.0] + prompt_logprobs[i, :len(row) - 1].tolist() + new_lp
        results.append(new)
        scores.append(new_lp)
    return (results, scores) if logprobs else results


def generate_stream(params: Any, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                    eos_id: int | Sequence[int] | None = 2, chunk: int = 8, stop: StopCheck | None = None,
                    prefill_chunk: int | None = PREFILL_CHUNK) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields each row's new tokens as they come: a list (one entry per prompt)
    of the tokens produced since the last yield (empty for rows that are done). The first yield
    comes right after the prefill; then one per `chunk` decode steps, each chunk one call of the
    same compiled on-device loop. Concatenating the yields gives exactly `generate`'s output
    (with the same `stop`, which is checked before each yield)."""
    _check_chunk(chunk)
    rows, state, _, sampling = _start(params, cfg, prompts, max_new_tokens, temperature, top_p, top_k, seed,
                                      eos_id, prefill_chunk)
    for pieces, _ in _chunks(params, cfg, rows, state, sampling, max_new_tokens, end_ids(eos_id, cfg.vocab_size),
                             chunk, stop, [None] * len(rows)):
        yield pieces
