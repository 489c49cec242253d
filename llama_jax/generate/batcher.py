"""Continuous batching: requests join and leave a fixed set of decode slots between decode steps.

How it runs (read `Batcher._iterate`):
- The device holds `slots` rows of KV cache (each `max_seq_len` positions) and, per row, the last
  token, prompt length, step count, sampling settings and seed key. A request owns one row from
  its prefill until it finishes or is cancelled; then the row is free for the next request.
- Admission: each waiting request goes into a free row with one jitted prefill (its prompt padded
  to a power-of-two length bucket, so a few compiled programs serve every length; a long prompt
  runs `prefill_chunk` positions at a time, engine.prefill), which writes its cache row and
  samples its first token in the same program. Rows decoding are untouched.
- Decoding: ONE jitted step for all rows, reading the cache only up to the longest live length
  (a power-of-two bucket, `kv_len`), `steps_per_call` tokens per call. Free rows compute garbage
  that nobody reads. The host dispatches the next call before reading the previous one's tokens,
  so Python bookkeeping (detokenising, stop strings) overlaps the device.
- Every row is sampled as `generate` samples row 0 of a batch: step s of a request draws with
  fold_in(fold_in(key(seed), 0), s). So a request's tokens are the ones `generate` gives it alone
  (greedy: token for token; seeded sampling: the same draws), whatever else shares the batch.
- Stop strings, the end tokens (one EOS id or several) and max_new_tokens are checked on the host
  per token; tokens the device made past a request's end are dropped. Text and stop strings go
  through `StopMatcher` (stops.py).

`Batcher.run(requests)` serves a list synchronously; `start()` runs the loop in a thread for a
server (`submit`, `cancel`, `on_update` callbacks from that thread).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import threading
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from llama_jax.config import LlamaConfig
from llama_jax.generate.engine import (MIN_LENGTH_BUCKET, PREFILL_CHUNK, _check_request, _pow2, check_prefill_chunk,
                                       end_ids, prefill, prefill_step, sample)
from llama_jax.generate.stops import StopMatcher, check_stops
from llama_jax.model import Llama, init_cache

Array = jax.Array
TOP_LOGPROBS = 5  # alternatives reported per token at most (OpenAI's completions limit)
MIN_KV_BUCKET = 128  # the decode reads the cache up to a power of two >= this (few compiled variants)
SAMPLING = ("temperature", "top_p", "top_k")  # per-slot settings the device keeps beside the seed key


class QueueFull(RuntimeError):
    """More requests are waiting than the batcher accepts (`max_waiting`)."""


class ContextTooLong(ValueError):
    """The prompt plus the tokens asked for do not fit in a slot (`max_seq_len`)."""


@dataclasses.dataclass
class Update:
    """What a request produced since its last update (sent to `Request.on_update`)."""

    tokens: list[int]
    logprobs: list[float]  # log p of each token under the model (before temperature / top-p)
    top_logprobs: list[list[tuple[int, float]]]  # per token, the `top_logprobs` likeliest (id, log p)
    text: str  # new text that is safe to show (complete characters, never a partial stop string)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or "error" on the last update
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate, with its own sampling settings; results fill in as it runs."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: str | Sequence[str] | None = None
    top_logprobs: int = 0
    on_update: Callable[[Update], None] | None = None
    # filled in by the batcher (EOS and tokens after a stop string are not kept):
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    text_offsets: list[int] = dataclasses.field(default_factory=list)  # where each token's text starts
    finish_reason: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


# --- the compiled programs --------------------------------------------------------------------------


def _top(logits: Array, tokens: Array) -> tuple[Array, Array, Array]:
    """log p of `tokens` and the TOP_LOGPROBS likeliest (ids, log p) of each row of logits (..., V)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = lax.top_k(logp, TOP_LOGPROBS)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], top_ids.astype(jnp.int32), top_lp


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "length"))
def _empty_state(*, cfg: LlamaConfig, slots: int, length: int) -> dict:
    zeros = lambda dtype: jnp.zeros((slots,), dtype)  # noqa: E731
    return {"cache": init_cache(cfg, slots, length), "last": zeros(jnp.int32), "lengths": zeros(jnp.int32),
            "step": zeros(jnp.int32), "keys": jnp.zeros((slots, 2), jnp.uint32),
            "temperature": zeros(jnp.float32), "top_p": jnp.ones((slots,), jnp.float32), "top_k": zeros(jnp.int32)}


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"), donate_argnums=1)
def _admit(params: Any, state: dict, tokens: Array, length: Array, row: Array, settings: dict, *,
           cfg: LlamaConfig, chunk: int | None) -> tuple[dict, tuple]:
    """Prefill one prompt (1, T) (right-padded to its bucket; `chunk` positions a step) into cache
    row `row` and sample its first token as `generate` does for row 0: with key
    fold_in(fold_in(key(seed), 0), 0)."""
    t = tokens.shape[1]
    last, cache, _ = prefill(params, cfg, tokens, length[None], init_cache(cfg, 1, t), chunk)  # last: (1, V)
    keys = jax.random.fold_in(jax.random.key(settings["seed"]), 0)[None]
    token = sample(_step_keys(keys, jnp.zeros((1,), jnp.int32)), last, *(settings[k][None] for k in SAMPLING))
    put = lambda old, new: old.at[row].set(new)  # noqa: E731
    state = {**state,
             "cache": {k: lax.dynamic_update_slice(v, cache[k].astype(v.dtype), (0, row, 0, 0, 0))
                       for k, v in state["cache"].items()},
             "last": put(state["last"], token[0]), "lengths": put(state["lengths"], length),
             "step": put(state["step"], 1), "keys": put(state["keys"], jax.random.key_data(keys)[0]),
             **{k: put(state[k], settings[k]) for k in SAMPLING}}
    return state, (token, *_top(last, token))


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len", "steps"), donate_argnums=1)
def _decode(params: Any, state: dict, *, cfg: LlamaConfig, kv_len: int, steps: int) -> tuple[dict, tuple]:
    """`steps` decode steps for every row, attending to cache positions < kv_len only. Returns the new
    state and per step (steps, slots): tokens, their log p, the top (ids, log p)."""
    model = Llama(cfg)
    keys = jax.random.wrap_key_data(state["keys"])

    def one(carry, _):
        cache, last, step = carry
        positions = state["lengths"] + step - 1  # where `last` goes
        logits, cache = model.apply({"params": params}, last[:, None], positions[:, None], None, cache)
        logits = logits[:, 0]
        token = sample(_step_keys(keys, step), logits, *(state[k] for k in SAMPLING))
        return (cache, token, step + 1), (token, *_top(logits, token))

    live = {k: v[:, :, :kv_len] for k, v in state["cache"].items()}
    (live, last, step), out = lax.scan(one, (live, state["last"], state["step"]), length=steps)
    cache = {k: v.at[:, :, :kv_len].set(live[k]) for k, v in state["cache"].items()}
    return {**state, "cache": cache, "last": last, "step": step}, out


def _buckets(smallest: int, limit: int) -> list[int]:
    """The powers of two from `smallest` below `limit`, then `limit` (what min(max(pow2(n), smallest), limit) gives)."""
    out = []
    while smallest < limit:
        out.append(smallest)
        smallest *= 2
    return out + [limit]


def _step_keys(keys: Array, steps: Array) -> Array:
    """Each row's key for its own step: fold_in(key_r, step_r) (generate's rule, per row)."""
    return jax.vmap(jax.random.fold_in)(keys, steps)


# --- the host side ------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Slot:
    index: int
    request: Request | None = None
    issued: int = 0  # tokens the device will have made for this request once all dispatched calls finish
    matcher: StopMatcher | None = None  # its text and stop strings (None without a decode function)


class Batcher:
    """A continuous-batching engine over one model: `slots` requests decode together, each with its
    own prompt, sampling settings, seed, stop strings and length limit.

    decode: the tokenizer's decode (ids -> str) for text and stop strings; None = tokens only.
    max_seq_len: cache positions per slot (prompt + new tokens), default the model's context.
    steps_per_call: decode steps per device call (more = less host overhead, later admission).
    eos_id: the end token, or several (`Tokenizer.eos_ids`: Llama 3.1 ends on any of three); None = none.
    prefill_chunk: prompt positions per prefill step (None = a whole prompt at once; engine.prefill).
    mesh: run under this mesh (params already placed on it, e.g. tensor parallel).
    """

    def __init__(self, params: Any, cfg: LlamaConfig, slots: int = 16, max_seq_len: int | None = None,
                 decode: Callable[[Sequence[int]], str] | None = None, eos_id: int | Sequence[int] | None = 2,
                 max_waiting: int = 256, steps_per_call: int = 1, mesh: jax.sharding.Mesh | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, got {slots!r}")
        if not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be an int in [2, {cfg.max_seq_len}] (the model's context), "
                             f"got {max_seq_len!r}")
        if not isinstance(steps_per_call, int) or steps_per_call < 1:
            raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
        check_prefill_chunk(prefill_chunk)
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.max_seq_len, self.decode, self.prefill_chunk = max_seq_len, decode, prefill_chunk
        self.eos_ids = end_ids(eos_id, cfg.vocab_size)
        self.max_waiting, self.steps_per_call = max_waiting, steps_per_call
        self.slots = [_Slot(i) for i in range(slots)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.served = 0  # requests finished (any reason), for /health and tests
        self._cancelled: set[Request] = set()
        self._lock = threading.Condition()
        self._pending: tuple | None = None  # the last dispatched decode: (outputs, owners)
        self._thread: threading.Thread | None = None
        self._stopping = False
        with self._mesh():
            self.state = _empty_state(cfg=cfg, slots=slots, length=max_seq_len)

    def _mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # --- requests in and out -------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raise ContextTooLong / ValueError / TypeError when `request` cannot be served."""
        n = len(request.prompt) if isinstance(request.prompt, Sequence) else 0
        if n and isinstance(request.max_new_tokens, int) and n + request.max_new_tokens > self.max_seq_len:
            raise ContextTooLong(
                f"the prompt ({n} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the context of "
                f"{self.max_seq_len} tokens" + (f"; ask for at most {self.max_seq_len - n} new tokens"
                                                if n < self.max_seq_len else "; shorten the prompt"))
        _check_request(self.cfg.replace(max_seq_len=self.max_seq_len), [request.prompt], request.max_new_tokens,
                       request.temperature, request.top_p, request.top_k, request.seed, self.eos_ids)
        check_stops(request.stop)
        if request.stop and self.decode is None:
            raise ValueError("stop strings need text: give the Batcher a decode function (the tokenizer's)")
        if not (isinstance(request.top_logprobs, int) and 0 <= request.top_logprobs <= TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an int in [0, {TOP_LOGPROBS}], got {request.top_logprobs!r}")
        if not -2**31 <= request.seed < 2**31:
            raise ValueError(f"seed must fit in int32 (as generate's), got {request.seed}")

    def submit(self, request: Request) -> Request:
        """Queue a request (checked first); it starts at the next free slot. Raises QueueFull."""
        self.check(request)
        request.prompt = [int(t) for t in request.prompt]
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit); retry later")
            self.waiting.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client went away): its slot is freed before the next decode step."""
        with self._lock:
            if not request.done:
                self._cancelled.add(request)
                self._lock.notify()

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Serve `requests` to completion in this thread (no background loop); returns them."""
        if self._thread is not None:
            raise RuntimeError("run() while the background loop is running; use submit()")
        for r in requests:
            self.submit(r)
        while self._iterate():
            pass
        return list(requests)

    def warmup(self) -> int:
        """Compile now every program serving can need (a prefill per prompt-length bucket, a decode
        per cache-length bucket) instead of on the first request that needs each. Call before
        serving (it runs dummy work in free slots). Returns how many programs there are."""
        if self.live or self.waiting or self._thread is not None:
            raise RuntimeError("warmup() is for an idle batcher, before serving")
        lengths, reads = _buckets(MIN_LENGTH_BUCKET, self.max_seq_len), _buckets(MIN_KV_BUCKET, self.max_seq_len)
        settings = {"temperature": np.float32(0), "top_p": np.float32(1), "top_k": np.int32(0), "seed": np.int32(0)}
        with self._mesh():
            for t in lengths:
                self.state, _ = _admit(self.params, self.state, np.zeros((1, t), np.int32), np.int32(1), np.int32(0),
                                       settings, cfg=self.cfg, chunk=prefill_step(self.prefill_chunk, t))
            for kv_len in reads:
                self.state, _ = _decode(self.params, self.state, cfg=self.cfg, kv_len=kv_len, steps=self.steps_per_call)
        jax.block_until_ready(self.state)
        return len(lengths) + len(reads)

    @property
    def live(self) -> int:
        return sum(s.request is not None for s in self.slots)

    # --- the background loop -------------------------------------------------------------------------

    def start(self) -> "Batcher":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llama_jax-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._has_work():
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self._iterate()
            except Exception as e:  # a failed device call: fail the requests in flight, keep serving
                traceback.print_exc()
                self._fail_all(f"{type(e).__name__}: {e}")

    def _has_work(self) -> bool:
        return bool(self.waiting or self._cancelled or self._pending or self.live)

    # --- one round: admit, decode, read back ---------------------------------------------------------

    def _iterate(self) -> bool:
        """Free cancelled slots, prefill waiting requests into free slots, dispatch a decode call,
        then read back the previous call and the prefill. Returns False when there is nothing left."""
        with self._lock:
            for slot in self.slots:
                if slot.request in self._cancelled:
                    self._finish(slot, "cancelled")
            self.waiting = collections.deque(r for r in self.waiting if r not in self._cancelled)
            for r in self._cancelled:
                r.finish_reason = r.finish_reason or "cancelled"
            self._cancelled.clear()
            admitted = self._take_waiting()
        with self._mesh():
            prefills = [self._dispatch_admit(slot, request) for slot, request in admitted]
            decode = self._dispatch_decode()
        pending, self._pending = self._pending, decode
        touched: dict[Request, Update] = {}
        for dispatched in ([pending] if pending is not None else []) + prefills:
            self._read_back(dispatched, touched)
        for request, update in touched.items():
            if request.on_update is not None:
                request.on_update(update)
        return bool(self._pending or self.waiting or self.live)

    def _take_waiting(self) -> list[tuple[_Slot, Request]]:
        """Waiting requests (first come, first served) for the free slots."""
        taken = []
        for slot in self.slots:
            if not self.waiting:
                break
            if slot.request is None:
                request = self.waiting.popleft()
                slot.request, slot.issued = request, 1
                slot.matcher = StopMatcher(request.stop, self.decode) if self.decode is not None else None
                taken.append((slot, request))
        return taken

    def _dispatch_admit(self, slot: _Slot, request: Request) -> tuple:
        """Prefill one request into its slot: prompt padded to a power of two (>= 16), so every
        prompt length shares a few compiled programs."""
        t = min(max(_pow2(len(request.prompt)), MIN_LENGTH_BUCKET), self.max_seq_len)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :len(request.prompt)] = request.prompt
        settings = {"temperature": np.float32(request.temperature), "top_p": np.float32(request.top_p),
                    "top_k": np.int32(request.top_k), "seed": np.int32(request.seed)}
        self.state, out = _admit(self.params, self.state, tokens, np.int32(len(request.prompt)),
                                 np.int32(slot.index), settings, cfg=self.cfg, chunk=prefill_step(self.prefill_chunk, t))
        return out, [(0, slot, request)]

    def _dispatch_decode(self) -> tuple | None:
        """One decode call for all slots if any live request still needs tokens."""
        needing = [s for s in self.slots if s.request is not None and s.issued < s.request.max_new_tokens]
        if not needing:
            return None
        steps = self.steps_per_call
        reach = max(len(s.request.prompt) + s.issued + steps - 1 for s in needing)
        kv_len = min(max(_pow2(reach), MIN_KV_BUCKET), self.max_seq_len)
        self.state, out = _decode(self.params, self.state, cfg=self.cfg, kv_len=kv_len, steps=steps)
        for s in needing:
            s.issued += steps
        return out, [(s.index, s, s.request) for s in needing]

    def _read_back(self, dispatched: tuple, touched: dict[Request, Update]) -> None:
        """Hand each request its tokens from a finished device call (blocks until it is done)."""
        (tokens, logprobs, top_ids, top_lp), owners = dispatched  # (steps, rows, ...) or a prefill's (rows, ...)
        tokens, logprobs, top_ids, top_lp = jax.device_get((tokens, logprobs, top_ids, top_lp))
        if tokens.ndim == 1:  # a prefill: one step
            tokens, logprobs, top_ids, top_lp = tokens[None], logprobs[None], top_ids[None], top_lp[None]
        for row, slot, request in owners:
            for k in range(tokens.shape[0]):
                if request.done or slot.request is not request:
                    break
                update = touched.setdefault(request, Update([], [], [], ""))
                top = list(zip(top_ids[k, row, :request.top_logprobs].tolist(),
                               top_lp[k, row, :request.top_logprobs].tolist()))
                self._accept(slot, int(tokens[k, row]), float(logprobs[k, row]), top, update)

    def _accept(self, slot: _Slot, token: int, logprob: float, top: list, update: Update) -> None:
        request = slot.request
        if token in self.eos_ids:
            return self._finish(slot, "stop", update)
        request.text_offsets.append(len(slot.matcher.text) if slot.matcher else 0)
        for seq, item in ((request.tokens, token), (request.logprobs, logprob), (request.top, top),
                          (update.tokens, token), (update.logprobs, logprob), (update.top_logprobs, top)):
            seq.append(item)
        if slot.matcher is not None and slot.matcher.update(request.tokens) is not None:
            return self._finish(slot, "stop", update)
        if len(request.tokens) >= request.max_new_tokens:
            return self._finish(slot, "length", update)
        if slot.matcher is not None:
            update.text += slot.matcher.take()

    def _finish(self, slot: _Slot, reason: str, update: Update | None = None) -> None:
        """End the slot's request (reason stop | length | cancelled | error) and free the slot."""
        request = slot.request
        if slot.matcher is not None and reason != "cancelled":
            rest = slot.matcher.finish()
            reason = "stop" if slot.matcher.stopped else reason  # the held-back tail may complete a stop
            request.text = slot.matcher.text
            if update is not None:
                update.text += rest
        request.finish_reason = reason
        if update is not None:
            update.finish_reason = reason
        slot.request, slot.matcher = None, None
        self.served += 1

    def _fail_all(self, message: str) -> None:
        """After a failed device call: every request in flight ends with an error; fresh state."""
        self._pending = None
        failed = [s.request for s in self.slots if s.request is not None]
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, "error")
        for request in failed:
            request.error = message
            if request.on_update is not None:
                request.on_update(Update([], [], [], "", "error", message))
        with self._mesh():
            self.state = _empty_state(cfg=self.cfg, slots=len(self.slots), length=self.max_seq_len)

