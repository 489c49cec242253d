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

Failures end only the request that caused them (a slot is one request; one bad request must never
hurt another). Every request is checked on submit and again, with its values converted to the
device's dtypes on the host, when it is admitted, so a value that cannot go into the shared arrays
fails there, alone. A failed prefill ends its request. A shared decode call that fails is retried
without its newest request, then the next newest, and so on (failures a request can cause, e.g. a
value or a shape, raise when the call is made, before the state is given to the device); the one
whose removal made the call go through ends with the error and the others removed on the way are
rebuilt ("replayed": a prefill of prompt + the tokens they already have samples their next token
with the key of that step, so they continue as they would have). When the device state itself is
lost (a call failed while running, its donated buffers gone), every live request is replayed into a
fresh state; a failure that comes back right after that is not a request's, and then the requests
in flight end with it.

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
from llama_jax.flops import kv_cache_bytes
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
def _admit(params: Any, state: dict, tokens: Array, length: Array, done: Array, row: Array, settings: dict, *,
           cfg: LlamaConfig, chunk: int | None) -> tuple[dict, tuple]:
    """Prefill `length` tokens (1, T) (right-padded to its bucket; `chunk` positions a step) into
    cache row `row` and sample the next token as `generate` does for row 0 at step `done`: with key
    fold_in(fold_in(key(seed), 0), done). The tokens are a prompt (done = 0), or a replayed request's
    prompt + the `done` tokens it already has."""
    t = tokens.shape[1]
    last, cache, _ = prefill(params, cfg, tokens, length[None], init_cache(cfg, 1, t), chunk)  # last: (1, V)
    keys = jax.random.fold_in(jax.random.key(settings["seed"]), 0)[None]
    token = sample(_step_keys(keys, done[None]), last, *(settings[k][None] for k in SAMPLING))
    put = lambda old, new: old.at[row].set(new)  # noqa: E731
    state = {**state,
             "cache": {k: lax.dynamic_update_slice(v, cache[k].astype(v.dtype), (0, row, 0, 0, 0))
                       for k, v in state["cache"].items()},
             "last": put(state["last"], token[0]), "lengths": put(state["lengths"], length - done),
             "step": put(state["step"], done + 1), "keys": put(state["keys"], jax.random.key_data(keys)[0]),
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
    admitted: int = 0  # when it was admitted (larger = newer): a failed decode call suspects the newest first
    prefill: bool = False  # its row is (re)built by a prefill before it decodes again


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
        _check_cache_fits(cfg, slots, max_seq_len, mesh)
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
        self._admissions = 0  # requests admitted so far (each slot's `admitted` stamp)
        self._lost = False  # this round lost the device state: dispatch nothing more, replay next round
        self._losses = 0  # state losses since the last decode read back whole
        self._updates: dict[Request, Update] = {}  # this round's updates, sent at its end
        self.state = self._fresh_state()

    def _mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _fresh_state(self) -> dict:
        with self._mesh():
            return _empty_state(cfg=self.cfg, slots=len(self.slots), length=self.max_seq_len)

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

    def _settings(self, request: Request) -> dict:
        """The request's row of the device's sampling arrays, converted here on the host (top-k
        clamped to the vocabulary, as generate's), so a value that does not fit its dtype fails for
        this request, never inside a shared call."""
        return {"temperature": np.float32(request.temperature), "top_p": np.float32(request.top_p),
                "top_k": np.int32(min(int(request.top_k), self.cfg.vocab_size)), "seed": np.uint32(request.seed)}

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
        """Serve `requests` to completion in this thread (no background loop); returns them. A
        request that failed has finish_reason "error" and its `error`; the others are unaffected."""
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
        settings = self._settings(Request([1], 1))
        with self._mesh():
            for t in lengths:
                self.state, _ = _admit(self.params, self.state, np.zeros((1, t), np.int32), np.int32(1), np.int32(0),
                                       np.int32(0), settings, cfg=self.cfg, chunk=prefill_step(self.prefill_chunk, t))
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
            except Exception as e:  # a bug in the host code (device failures are handled in _iterate)
                traceback.print_exc()
                self._fail_all(f"{type(e).__name__}: {e}")

    def _has_work(self) -> bool:
        return bool(self.waiting or self._cancelled or self._pending or self.live)

    # --- one round: admit, decode, read back ---------------------------------------------------------

    def _iterate(self) -> bool:
        """Free cancelled slots, prefill waiting (and replayed) requests into their slots, dispatch a
        decode call, then read back the previous call and the prefills. Returns False when there is
        nothing left."""
        with self._lock:
            for slot in self.slots:
                if slot.request in self._cancelled:
                    self._finish(slot, "cancelled")
            self.waiting = collections.deque(r for r in self.waiting if r not in self._cancelled)
            for r in self._cancelled:
                r.finish_reason = r.finish_reason or "cancelled"
            self._cancelled.clear()
            self._take_waiting()
        self._lost = False
        with self._mesh():
            prefills = [self._dispatch_admit(slot) for slot in self.slots if slot.prefill and not self._lost]
            decode = self._dispatch_decode() if not self._lost else None
        pending, self._pending = self._pending, decode
        for dispatched in ([pending] if pending is not None else []) + [p for p in prefills if p is not None]:
            if not self._read_back(dispatched):
                break  # the state is lost: the later calls were built on it, their rows are replayed
        updates, self._updates = self._updates, {}
        for request, update in updates.items():
            if request.on_update is not None:
                request.on_update(update)
        return bool(self._pending or self.waiting or self.live)

    def _take_waiting(self) -> None:
        """Waiting requests (first come, first served) into the free slots, to be prefilled."""
        for slot in self.slots:
            if not self.waiting:
                break
            if slot.request is None:
                request = self.waiting.popleft()
                self._admissions += 1
                slot.request, slot.issued, slot.admitted, slot.prefill = request, 0, self._admissions, True
                slot.matcher = StopMatcher(request.stop, self.decode) if self.decode is not None else None

    def _dispatch_admit(self, slot: _Slot) -> tuple | None:
        """Prefill one request into its slot: prompt (+ the tokens it has, when replayed) padded to a
        power of two (>= 16), so every length shares a few compiled programs. A failure ends this
        request alone; None then."""
        request = slot.request
        if _deleted(self.state):  # lost by an earlier call (not this request's)
            self._lose_state(keep_pending=True, blamed=False)
            return None
        try:
            self.check(request)  # again: a Request object changed since submit() fails here, alone
        except (ValueError, TypeError) as e:
            self._fail(slot, f"refused when admitted: {e}")
            return None
        try:
            ids = list(request.prompt) + request.tokens
            t = min(max(_pow2(len(ids)), MIN_LENGTH_BUCKET), self.max_seq_len)
            tokens = np.zeros((1, t), np.int32)
            tokens[0, :len(ids)] = ids
            self.state, out = _admit(self.params, self.state, tokens, np.int32(len(ids)), np.int32(len(request.tokens)),
                                     np.int32(slot.index), self._settings(request), cfg=self.cfg,
                                     chunk=prefill_step(self.prefill_chunk, t))
        except Exception as e:  # noqa: BLE001 - whatever it is, it is this request's
            self._fail(slot, f"its prefill failed: {type(e).__name__}: {e}")
            if _deleted(self.state):  # it died on the device with the state donated to it
                self._lose_state(keep_pending=True, blamed=True)
            return None
        slot.prefill, slot.issued = False, len(request.tokens) + 1
        return out, [(0, slot, request)], "prefill"

    def _dispatch_decode(self) -> tuple | None:
        """One decode call for all slots if any live request still needs tokens. When the call
        fails, it is made again without the newest request, then without the next newest, ...: the
        last one taken out ends with the error, the others taken out are replayed next round. When
        it fails with none of them, it is not theirs: they all end with it."""
        needing = [s for s in self.slots if s.request is not None and not s.prefill
                   and s.issued < s.request.max_new_tokens]
        if not needing:
            return None
        if _deleted(self.state):
            self._lose_state(keep_pending=True, blamed=False)
            return None
        steps, out, removed, error = self.steps_per_call, None, [], None
        while out is None:
            rows = [s for s in needing if s not in removed]
            reach = max([len(s.request.prompt) + s.issued + steps - 1 for s in rows], default=1)
            kv_len = min(max(_pow2(reach), MIN_KV_BUCKET), self.max_seq_len)
            try:
                self.state, out = _decode(self.params, self.state, cfg=self.cfg, kv_len=kv_len, steps=steps)
            except Exception as e:  # noqa: BLE001 - found out below whose it is
                error = error or f"{type(e).__name__}: {e}"
                if _deleted(self.state):
                    self._lose_state(keep_pending=True, blamed=False)
                    return None
                if not rows:
                    for s in needing:
                        self._fail(s, f"the decode step failed: {error}")
                    return None
                newest = max(rows, key=lambda s: s.admitted)
                removed.append(newest)
                self._neutral_rows([newest.index])
        if removed:
            self._fail(removed[-1], f"the decode step failed with this request in it: {error} (the requests "
                                    "decoded with it went on)")
            for s in removed[:-1]:
                s.prefill = True
        for s in needing:
            if s not in removed:
                s.issued += steps
        return out, [(s.index, s, s.request) for s in needing if s not in removed], "decode"

    def _neutral_rows(self, rows: list[int]) -> None:
        """Greedy, no top-p/top-k in these rows (a removed request's settings leave the shared arrays)."""
        self.state = {**self.state, "temperature": self.state["temperature"].at[np.array(rows)].set(0.0),
                      "top_p": self.state["top_p"].at[np.array(rows)].set(1.0),
                      "top_k": self.state["top_k"].at[np.array(rows)].set(0)}

    def _lose_state(self, keep_pending: bool, blamed: bool) -> None:
        """The device state is gone (a call failed while running): a fresh one, and every live request
        is replayed into it next round. An unexplained loss (`blamed`: the request whose call it was
        has ended) that comes again before a decode is read back whole is not any request's doing:
        then everything in flight ends with an error."""
        if not keep_pending:
            self._pending = None
        if not blamed and not self._lost:  # one loss per round, however many calls show it
            self._losses += 1
        self._lost = True
        if self._losses > 1:
            self._pending, self._losses = None, 0
            for slot in self.slots:
                if slot.request is not None:
                    self._fail(slot, "the device failed twice in a row with these requests; they were ended")
        for slot in self.slots:
            slot.prefill = slot.request is not None
        self.state = self._fresh_state()

    def _read_back(self, dispatched: tuple) -> bool:
        """Hand each request its tokens from a finished device call (blocks until it is done).
        Returns False when the call failed on the device (the state is lost then)."""
        (tokens, logprobs, top_ids, top_lp), owners, kind = dispatched  # (steps, rows, ...) or a prefill's (rows, ...)
        try:
            tokens, logprobs, top_ids, top_lp = jax.device_get((tokens, logprobs, top_ids, top_lp))
        except Exception as e:  # noqa: BLE001 - the device ran it and failed
            if kind == "prefill" and owners[0][1].request is owners[0][2]:
                self._fail(owners[0][1], f"its prefill failed on the device: {type(e).__name__}: {e}")
            self._lose_state(keep_pending=False, blamed=kind == "prefill")
            return False
        if kind == "decode":
            self._losses = 0
        if tokens.ndim == 1:  # a prefill: one step
            tokens, logprobs, top_ids, top_lp = tokens[None], logprobs[None], top_ids[None], top_lp[None]
        for row, slot, request in owners:
            try:
                for k in range(tokens.shape[0]):
                    if request.done or slot.request is not request:
                        break
                    update = self._updates.setdefault(request, Update([], [], [], ""))
                    top = list(zip(top_ids[k, row, :request.top_logprobs].tolist(),
                                   top_lp[k, row, :request.top_logprobs].tolist()))
                    self._accept(slot, int(tokens[k, row]), float(logprobs[k, row]), top, update)
            except Exception as e:  # noqa: BLE001 - e.g. its text or stop strings: this request's alone
                if slot.request is request:
                    self._fail(slot, f"{type(e).__name__}: {e}")
        return True

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
        if slot.matcher is not None and reason not in ("cancelled", "error"):
            rest = slot.matcher.finish()
            reason = "stop" if slot.matcher.stopped else reason  # the held-back tail may complete a stop
            request.text = slot.matcher.text
            if update is not None:
                update.text += rest
        elif slot.matcher is not None:
            request.text = slot.matcher.text  # what was given out
        request.finish_reason = reason
        if update is not None:
            update.finish_reason = reason
        slot.request, slot.matcher, slot.prefill = None, None, False
        self.served += 1

    def _fail(self, slot: _Slot, message: str) -> None:
        """End the slot's request with an error (sent with this round's updates); the others go on."""
        request = slot.request
        update = self._updates.setdefault(request, Update([], [], [], ""))
        self._finish(slot, "error", update)
        request.error = update.error = message

    def _fail_all(self, message: str) -> None:
        """After a failure in the host code itself: every request in flight ends with an error; fresh state."""
        self._pending = None
        for slot in self.slots:
            if slot.request is not None:
                self._fail(slot, message)
        updates, self._updates = self._updates, {}
        for request, update in updates.items():
            if request.on_update is not None:
                request.on_update(update)
        self.state = self._fresh_state()


def _deleted(state: dict) -> bool:
    """Whether the state's buffers were given to a device call that failed (donated, now gone)."""
    return any(x.is_deleted() for x in jax.tree.leaves(state))


def _free_memory(devices: Sequence[Any]) -> tuple[int | None, str]:
    """Bytes free for new arrays on these devices and where that number comes from: the device
    memory JAX reports (GPU, TPU), else this host's available RAM (CPU), else None."""
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_limit" in s for s in stats):
        return sum(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats), \
            f"free on {len(devices)} {devices[0].device_kind} device(s)"
    try:
        with open("/proc/meminfo") as f:
            meminfo = dict(line.split(":", 1) for line in f)
        return int(meminfo["MemAvailable"].split()[0]) * 1024, "available host RAM (MemAvailable)"
    except (OSError, KeyError, ValueError):
        return None, "unknown"


def _check_cache_fits(cfg: LlamaConfig, slots: int, max_seq_len: int, mesh: jax.sharding.Mesh | None) -> None:
    """Refuse, before allocating it, a KV cache larger than the memory free for it."""
    need = kv_cache_bytes(cfg, slots, max_seq_len, jnp.dtype(cfg.compute_dtype).itemsize)
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    if devices[0].platform == "cpu":
        devices = devices[:1]  # host devices share one RAM
    free, where = _free_memory(devices)
    if free is not None and need > free:
        raise ValueError(f"the KV cache of {slots} slots x {max_seq_len} positions needs {need / 1e9:,.2f} GB "
                         f"({need:,} bytes) but {free / 1e9:,.2f} GB is {where}; lower the slots (--max-batch) "
                         "or max_seq_len (--max-seq-len)")
