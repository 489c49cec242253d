"""Serving benchmark: continuous batching (the OpenAI server over loopback HTTP) against static
`lj.generate` batches, on the same ragged requests from the same number of concurrent clients.

    python bench/serve.py                        # CPU: demo preset, 96 requests, concurrency 32, 16 slots
    python bench/serve.py --preset llama-1b --requests 32 --max-seq-len 512 --new 8 96
    python bench/serve.py --preset llama2-7b --dtype bfloat16 --requests 256 --max-seq-len 512   # a GPU (its default)
    python bench/serve.py --quantize int8 --modes continuous     # the same, int8 weights (llama_jax/quant.py)

Closed-loop clients: `--concurrency` clients (a child process: asyncio + httpx, SSE, so they do
not share the server's interpreter lock) each send a request, read its streamed answer to the end
and send the next, until `--requests` are done or `--seconds` have passed (then no new request
starts). Prompts (random token ids) and max_tokens are drawn uniformly from --prompt-len and --new;
greedy decoding, EOS honoured, random weights. Both modes are served by the same llama_jax.serve
app over loopback HTTP:
- continuous: a Batcher with --max-batch slots (warmed up first: every program compiled).
- static: up to --max-batch waiting requests run as one `lj.generate_stream` batch to the longest
  max_tokens in it; the next batch starts when it ends (an untimed first pass compiles its shapes).
Reported per mode: generated tokens/s over the wall time, time to first token (from the request's
send) and time per output token after the first, p50 and p99, and whether every request's text is
identical in both modes. Vocabularies other than the 512-piece test tokenizer's are served with a
stand-in tokenizer whose text is the token ids (the server's text path is the same).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tokenizer.model")


class IdsAsText:
    """A stand-in tokenizer for vocabularies without a tokenizer file: the text of ids is "<id>" each."""

    eos_id, bos_id = 2, 1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids if int(i) not in (self.bos_id, self.eos_id))

    def id_to_piece(self, i: int) -> str:
        return f"<{i}>"


def make_requests(n: int, vocab: int, prompt_len: tuple[int, int], new: tuple[int, int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": [1] + rng.integers(3, vocab, int(rng.integers(prompt_len[0], prompt_len[1] + 1)) - 1).tolist(),
             "max_tokens": int(rng.integers(new[0], new[1] + 1))} for _ in range(n)]


# --- the clients (a child process: stdlib + httpx only) --------------------------------------------


def _client_process(url: str, requests: list[dict], concurrency: int, seconds: float, out) -> None:
    out.put(asyncio.run(_clients(url, requests, concurrency, seconds)))


async def _clients(url: str, requests: list[dict], concurrency: int, seconds: float) -> dict:
    import httpx2 as httpx

    results: dict[int, dict] = {}
    next_index = 0
    start = time.perf_counter()

    async def one(client, i: int) -> None:
        body = {"prompt": requests[i]["prompt"], "max_tokens": requests[i]["max_tokens"], "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        first = last = None
        text, tokens = "", 0
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    now = time.perf_counter()
                    if choice["text"] or choice["logprobs"]:
                        first = first or now
                    last = now
                    text += choice["text"]
        results[i] = {"text": text, "tokens": tokens, "sent": sent - start, "first": (first or last) - start,
                      "done": last - start}

    async def client_loop(client) -> None:
        nonlocal next_index
        while next_index < len(requests) and time.perf_counter() - start < seconds:
            i, next_index = next_index, next_index + 1
            await one(client, i)

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return {"results": results, "wall": time.perf_counter() - start}


# --- the two servers ----------------------------------------------------------------------------------


class StaticBatches:
    """The static-batching peer, behind the same HTTP app as the Batcher (it has the interface the app
    uses): up to `slots` waiting requests run as one `lj.generate_stream` batch, to the longest
    max_tokens among them; the next batch starts when this one has ended. Greedy only."""

    def __init__(self, params, cfg, slots: int, max_seq_len: int, decode, eos_id: int, chunk: int) -> None:
        import collections
        import threading

        self.params, self.cfg, self.decode, self.eos_id, self.chunk = params, cfg, decode, eos_id, chunk
        self.slots, self.max_seq_len = [None] * slots, max_seq_len
        self.waiting, self.served, self.live = collections.deque(), 0, 0
        self._lock, self._thread, self._stopping = threading.Condition(), None, False

    def submit(self, request):
        with self._lock:
            self.waiting.append(request)
            self._lock.notify()
        return request

    def cancel(self, request) -> None:
        pass  # a static batch runs to its end whatever its clients do

    def start(self):
        import threading

        self._stopping = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting:
                    self._lock.wait()
                if self._stopping:
                    return
                batch = [self.waiting.popleft() for _ in range(min(len(self.slots), len(self.waiting)))]
            self.live = len(batch)
            self._run(batch)
            self.live = 0

    def _run(self, batch) -> None:
        import llama_jax as lj
        from llama_jax.generate.batcher import Update
        from llama_jax.generate.stops import StopMatcher

        matchers = [StopMatcher(None, self.decode) for _ in batch]
        for pieces in lj.generate_stream(self.params, self.cfg, [r.prompt for r in batch],
                                         max_new_tokens=max(r.max_new_tokens for r in batch), temperature=0.0,
                                         eos_id=self.eos_id, chunk=self.chunk):
            for r, m, piece in zip(batch, matchers, pieces):
                piece = [] if r.done else piece[:r.max_new_tokens - len(r.tokens)]
                if piece:
                    r.tokens += piece
                    m.update(r.tokens)
                    text = m.take()
                    if len(r.tokens) == r.max_new_tokens:
                        text += m.finish()
                        r.finish_reason, r.text = "length", m.text
                        self.served += 1
                    r.on_update(Update(piece, [0.0] * len(piece), [[]] * len(piece), text, r.finish_reason))
        for r, m in zip(batch, matchers):
            if not r.done:  # ended by EOS
                rest = m.finish()
                r.finish_reason, r.text = "stop", m.text
                self.served += 1
                r.on_update(Update([], [], [], rest, "stop"))


def measure(engine, tokenizer, requests, args, clients=_client_process) -> dict:
    """Serve `engine` over loopback HTTP and run the clients in a child process:
    clients(url, requests, concurrency, seconds, out queue) puts its measurements on the queue."""
    from llama_jax.serve import create_app, running

    context = multiprocessing.get_context("spawn")
    with running(create_app(engine, tokenizer, "bench")) as url:
        out = context.Queue()
        child = context.Process(target=clients, args=(url, requests, args.concurrency, args.seconds, out))
        child.start()
        measured = out.get()
        child.join()
    return measured


def summary(measured: dict) -> dict:
    results = measured["results"].values()
    tokens = sum(r["tokens"] for r in results)
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    ttft = [r["first"] - r["sent"] for r in results]
    tpot = [(r["done"] - r["first"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    return {"requests": len(measured["results"]), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "tpot_p50_ms": pct(tpot, 50),
            "tpot_p99_ms": pct(tpot, 99)}


def main() -> None:
    import jax

    import llama_jax as lj
    from bench.common import device_name, row, write_result
    from llama_jax import quant

    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama2-7b" if gpu else "demo")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16" if gpu else "float32")
    p.add_argument("--requests", type=int, default=256 if gpu else 96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="slots (continuous) and batch size (static)")
    p.add_argument("--max-seq-len", type=int, default=512 if gpu else None,
                   help="cache positions per slot (default: 512 on a GPU, else the model's context)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 200) if gpu else (4, 100), metavar=("MIN", "MAX"))
    p.add_argument("--new", type=int, nargs=2, default=(16, 256) if gpu else (4, 128), metavar=("MIN", "MAX"))
    p.add_argument("--quantize", choices=quant.FORMATS, help="serve the weights quantised (both modes)")
    p.add_argument("--steps-per-call", type=int, default=1, help="continuous: decode steps per device call")
    p.add_argument("--static-chunk", type=int, default=8, help="static: decode steps per generate_stream call")
    p.add_argument("--seconds", type=float, default=600, help="no new request starts after this long (each mode)")
    p.add_argument("--modes", nargs="+", default=("static", "continuous"), choices=("static", "continuous"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes whatever the device (a CPU check of gpu.sh)")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.dtype, args.requests, args.concurrency, args.max_batch = "demo", "float32", 16, 8, 4
        args.prompt_len, args.new, args.max_seq_len = (4, 40), (4, 32), None

    cfg = lj.LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    args.max_seq_len = args.max_seq_len or cfg.max_seq_len
    if args.prompt_len[1] + args.new[1] > args.max_seq_len:
        p.error(f"--prompt-len max + --new max ({args.prompt_len[1] + args.new[1]}) exceeds --max-seq-len "
                f"{args.max_seq_len}")
    tokenizer = lj.Tokenizer(TOKENIZER) if cfg.vocab_size == 512 else IdsAsText(cfg.vocab_size)
    params = lj.init_params(cfg, 0)
    if args.quantize:
        params = quant.quantize_params(params, cfg, args.quantize)
    requests = make_requests(args.requests, cfg.vocab_size, args.prompt_len, args.new)
    from llama_jax.generate.batcher import Batcher

    measured = {}
    if "static" in args.modes:
        static = StaticBatches(params, cfg, args.max_batch, args.max_seq_len, tokenizer.decode, tokenizer.eos_id,
                               args.static_chunk)
        warm = measure(static, tokenizer, requests, args)  # compiles the batch shapes the timed pass meets
        print(f"# static: untimed pass {warm['wall']:.1f} s", flush=True)
        measured["static"] = measure(static, tokenizer, requests, args)
    if "continuous" in args.modes:
        batcher = Batcher(params, cfg, slots=args.max_batch, max_seq_len=args.max_seq_len, decode=tokenizer.decode,
                          eos_id=tokenizer.eos_id, max_waiting=len(requests) + 1, steps_per_call=args.steps_per_call)
        start = time.perf_counter()
        programs = batcher.warmup()
        print(f"# continuous: compiled {programs} programs in {time.perf_counter() - start:.1f} s", flush=True)
        measured["continuous"] = measure(batcher, tokenizer, requests, args)
    stats = {mode: summary(m) for mode, m in measured.items()}
    same = None
    if len(measured) == 2:
        both = set(measured["static"]["results"]) & set(measured["continuous"]["results"])
        same = sum(measured["static"]["results"][i]["text"] == measured["continuous"]["results"][i]["text"]
                   for i in both) / max(len(both), 1)

    config = (f"{args.preset} {args.dtype}{' ' + args.quantize if args.quantize else ''} {args.requests} req, conc {args.concurrency}, batch {args.max_batch}, "
              f"prompt {args.prompt_len[0]}-{args.prompt_len[1]}, new {args.new[0]}-{args.new[1]}")
    print(f"# {config}, device {device_name()}")
    print(f"{'mode':12} {'requests':>8} {'tokens':>7} {'wall s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9}  (ms)")
    for mode, s in stats.items():
        print(f"{mode:12} {s['requests']:>8} {s['tokens']:>7} {s['wall_s']:>8.2f} {s['tokens_per_s']:>9.1f} "
              f"{s['ttft_p50_ms']:>9.1f} {s['ttft_p99_ms']:>9.1f} {s['tpot_p50_ms']:>9.2f} {s['tpot_p99_ms']:>9.2f}")
    if same is not None:
        print(f"identical texts: {same:.1%} of {len(both)} requests")
    rows = []
    if len(stats) == 2:
        c, s = stats["continuous"], stats["static"]
        rows = [row(config, "serving tokens/s (continuous vs static)", c["tokens_per_s"], s["tokens_per_s"], "tok/s",
                    identical=same),
                row(config, "1 / TTFT p50", 1e3 / c["ttft_p50_ms"], 1e3 / s["ttft_p50_ms"], "1/s")]
    write_result(args.out, {"bench": "serve", "device": device_name(), "args": vars(args), "rows": rows,
                            "stats": stats, "identical": same})


if __name__ == "__main__":
    main()
