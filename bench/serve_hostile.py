"""Hostile-load check of the OpenAI server: many concurrent clients, ragged prompts, and 1 request in
10 deliberately bad; every good request's text must equal its solo text and no good request may fail.

    python bench/serve_hostile.py                       # CPU: demo preset, 320 requests, 64 clients, 16 slots
    python bench/serve_hostile.py --requests 640 --bad-every 5 --seconds 300

Loopback only (the server and the clients on this machine), bounded (--seconds: no new request
starts after that long). The clients run in a child process (asyncio + httpx, so they do not share
the server's interpreter lock), `--concurrency` of them closed-loop, each sending the next request
of one shared list when its last is answered. Good requests: a random token-id prompt (--prompt-len,
BOS first) and max_tokens (--new), greedy, half of them streamed (SSE, read to [DONE]). Bad ones, in
turn (BAD): a top_k of 2**31 (the value that once overflowed the shared decode step for every
client), a seed of 2**63, max_tokens 2**70, JSON nested 100,000 deep, a lone surrogate in the
prompt, 4 MB of prompt text, a Content-Length of 600 MB with a few bytes sent, a 20 MB chunked body,
a client gone mid-body and one gone mid-stream. A bad request passes when it gets its expected status
(the disconnects: when the server carries on). Meanwhile a poller times /health every 50 ms.

Passes over the same good requests, same server, alternating --rounds times: clean (the good
requests alone), then hostile (the bad ones mixed in). Each good request's text is compared with `lj.generate` on that request
alone (one greedy run to the longest max_tokens per request, cut: greedy text is a prefix of the
longer one). Reported per pass: good requests ok / failed / text differing from solo, bad requests by
kind with the statuses seen, generated tokens/s, latency p50/p99 of the good requests, /health
latency max and p99; the hostile/clean tokens/s ratio is what the bad requests cost the good ones.
Exit status 1 when a good request failed or differed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve import TOKENIZER, IdsAsText, make_requests, measure  # noqa: E402

BAD = {  # kind: the status it must get (None: a client that goes away; the server must carry on)
    "top_k 2**31": 400, "seed 2**63": 400, "max_tokens 2**70": 400, "JSON nested 100,000 deep": 400,
    "lone surrogate": 400, "4 MB of text": 400, "Content-Length 600 MB": 413, "chunked 20 MB": 413,
    "gone mid-body": None, "gone mid-stream": None,
}


def make_jobs(requests: list[dict], bad_every: int) -> list[dict]:
    """The good requests (half streamed) with a bad one after every `bad_every - 1` of them."""
    jobs, kinds = [], list(BAD)
    for i, r in enumerate(requests):
        jobs.append({"good": i, "body": {**r, "temperature": 0, "stream": i % 2 == 1}})
        if bad_every and (i + 1) % (bad_every - 1) == 0:
            jobs.append({"bad": kinds[(i + 1) // (bad_every - 1) % len(kinds) - 1]})
    return jobs


# --- the clients (a child process: stdlib + httpx only) --------------------------------------------


def _client_process(url: str, jobs: list[dict], concurrency: int, seconds: float, out) -> None:
    out.put(asyncio.run(_clients(url, jobs, concurrency, seconds)))


async def _raw(host: str, port: int, head: bytes, parts=(), hang_up: bool = False) -> int | None:
    """A raw HTTP exchange: the status (None when we hang up first)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head)
        for part in parts:
            writer.write(part)
            await writer.drain()
        if hang_up:
            return None
        line = await reader.readline()
        return int(line.split(b" ", 2)[1])
    except (ConnectionError, OSError):  # it answered and closed while we were still sending
        line = await reader.readline()
        return int(line.split(b" ", 2)[1]) if line else -1
    finally:
        writer.close()


def _post_head(length: int | None, chunked: bool = False) -> bytes:
    size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{size}\r\n\r\n".encode()


async def _bad(client, url: str, kind: str) -> int | None:
    host, port = url.removeprefix("http://").split(":")
    port = int(port)

    async def post(body: str) -> int:
        r = await client.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        return r.status_code

    if kind == "top_k 2**31":
        return await post(json.dumps({"prompt": [1, 5, 9], "max_tokens": 8, "top_k": 2**31}))
    if kind == "seed 2**63":
        return await post(json.dumps({"prompt": [1, 5, 9], "max_tokens": 8, "temperature": 1, "seed": 2**63}))
    if kind == "max_tokens 2**70":
        return await post(json.dumps({"prompt": [1, 5, 9], "max_tokens": 2**70}))
    if kind == "JSON nested 100,000 deep":
        return await post('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}")
    if kind == "lone surrogate":
        return await post('{"prompt": "a \\ud800 b"}')
    if kind == "4 MB of text":
        return await post(json.dumps({"prompt": "word " * 800_000}))
    if kind == "Content-Length 600 MB":
        return await _raw(host, port, _post_head(600_000_000), [b'{"prompt": '])
    if kind == "chunked 20 MB":
        return await _raw(host, port, _post_head(None, chunked=True),
                          (b"10000\r\n" + b" " * 65536 + b"\r\n" for _ in range(320)))
    if kind == "gone mid-body":
        return await _raw(host, port, _post_head(1000), [b'{"prompt": [1, 5'], hang_up=True)
    if kind == "gone mid-stream":
        body = {"prompt": [1, 5, 9], "max_tokens": 100, "temperature": 0, "stream": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                break
        return None
    raise ValueError(kind)


async def _good(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    text, tokens, error = "", 0, None
    if body["stream"]:
        async with client.stream("POST", url + "/v1/completions",
                                 json={**body, "stream_options": {"include_usage": True}}) as response:
            if response.status_code != 200:
                error = f"status {response.status_code}"
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                text += "".join(c["text"] for c in chunk.get("choices", []))
    else:
        r = await client.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            error = f"status {r.status_code}: {r.text[:200]}"
        else:
            text, tokens = r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]
    return {"text": text, "tokens": tokens, "error": error, "seconds": time.perf_counter() - start}


async def _clients(url: str, jobs: list[dict], concurrency: int, seconds: float) -> dict:
    import httpx2 as httpx

    good, bad, health = {}, [], []
    next_index, done = 0, asyncio.Event()
    start = time.perf_counter()

    async def loop(client) -> None:
        nonlocal next_index
        while next_index < len(jobs) and time.perf_counter() - start < seconds:
            job, next_index = jobs[next_index], next_index + 1
            try:
                if "good" in job:
                    good[job["good"]] = await _good(client, url, job["body"])
                else:
                    bad.append((job["bad"], await _bad(client, url, job["bad"])))
            except Exception as e:  # noqa: BLE001 - a failure of the request, recorded
                if "good" in job:
                    good[job["good"]] = {"text": "", "tokens": 0, "error": f"{type(e).__name__}: {e}", "seconds": 0}
                else:
                    bad.append((job["bad"], f"{type(e).__name__}: {e}"))

    async def poll(client) -> None:
        while not done.is_set():
            t = time.perf_counter()
            ok = (await client.get(url + "/health")).status_code == 200
            health.append(time.perf_counter() - t if ok else float("inf"))
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client, httpx.AsyncClient(timeout=600) as poller:
        polling = asyncio.ensure_future(poll(poller))
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        done.set()
        await polling
    return {"good": good, "bad": bad, "health": health, "wall": wall}


# --- the server side ---------------------------------------------------------------------------------


def summary(measured: dict, solo: dict[int, str]) -> dict:
    good = measured["good"]
    failed = {i: r["error"] for i, r in good.items() if r["error"]}
    differ = [i for i, r in good.items() if not r["error"] and r["text"] != solo[i]]
    bad: dict[str, dict] = {}
    for kind, status in measured["bad"]:
        seen = bad.setdefault(kind, {})
        seen[str(status)] = seen.get(str(status), 0) + 1
    wrong = {k: v for k, v in bad.items() if set(v) != {str(BAD[k])}}
    seconds = [r["seconds"] for r in good.values() if not r["error"]]
    health = measured["health"] or [0.0]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"good": len(good), "good_failed": len(failed), "good_differ": len(differ), "bad": len(measured["bad"]),
            "bad_statuses": bad, "bad_unexpected": wrong, "tokens": sum(r["tokens"] for r in good.values()),
            "wall_s": measured["wall"], "tokens_per_s": sum(r["tokens"] for r in good.values()) / measured["wall"],
            "latency_p50_s": pct(seconds, 50), "latency_p99_s": pct(seconds, 99), "health_polls": len(health),
            "health_max_ms": max(health) * 1e3, "health_p99_ms": pct(health, 99) * 1e3,
            "failures": dict(list(failed.items())[:5]), "differing": differ[:10]}


def solo_texts(params, cfg, tokenizer, requests: list[dict]) -> dict[int, str]:
    """Each good request's text from lj.generate on it alone (greedy, to the longest max_tokens, cut)."""
    import llama_jax as lj

    longest = max(r["max_tokens"] for r in requests)
    out = {}
    for i, r in enumerate(requests):
        tokens = lj.generate(params, cfg, [r["prompt"]], max_new_tokens=longest, eos_id=tokenizer.eos_id)[0]
        out[i] = tokenizer.decode(tokens[:r["max_tokens"]])
    return out


def main() -> int:
    import llama_jax as lj
    from bench.common import device_name, row, write_result
    from llama_jax.generate.batcher import Batcher

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--requests", type=int, default=288, help="good requests (the bad ones come on top)")
    p.add_argument("--bad-every", type=int, default=10, help="1 request in this many is bad (0: none)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(4, 100), metavar=("MIN", "MAX"))
    p.add_argument("--new", type=int, nargs=2, default=(4, 32), metavar=("MIN", "MAX"))
    p.add_argument("--seconds", type=float, default=600, help="no new request starts after this long (each pass)")
    p.add_argument("--rounds", type=int, default=2, help="clean and hostile passes, alternating")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()

    cfg = lj.LlamaConfig.preset(args.preset)
    if args.prompt_len[1] + args.new[1] > cfg.max_seq_len:
        p.error(f"--prompt-len max + --new max exceeds the model's context {cfg.max_seq_len}")
    tokenizer = lj.Tokenizer(TOKENIZER) if cfg.vocab_size == 512 else IdsAsText(cfg.vocab_size)
    params = lj.init_params(cfg, 0)
    requests = make_requests(args.requests, cfg.vocab_size, args.prompt_len, args.new)
    start = time.perf_counter()
    solo = solo_texts(params, cfg, tokenizer, requests)
    print(f"# solo texts: {len(solo)} lj.generate runs in {time.perf_counter() - start:.0f} s", flush=True)
    batcher = Batcher(params, cfg, slots=args.max_batch, decode=tokenizer.decode, eos_id=tokenizer.eos_id,
                      max_waiting=args.requests * 2)
    print(f"# compiled {batcher.warmup()} programs", flush=True)
    stats = {}
    for round_ in range(1, args.rounds + 1):  # alternating, so a change of the machine's load hits both
        for name, bad_every in (("clean", 0), ("hostile", args.bad_every)):
            name = f"{name} {round_}"
            load = os.getloadavg()[0]
            measured = measure(batcher, tokenizer, make_jobs(requests, bad_every), args, clients=_client_process)
            stats[name] = {**summary(measured, solo),
                           "load_average": (load + os.getloadavg()[0]) / 2}
            print(f"# {name}: {json.dumps(stats[name])}", flush=True)

    config = (f"{args.preset} fp32, {args.requests} good requests, 1 in {args.bad_every} bad, conc {args.concurrency}, "
              f"{args.max_batch} slots, prompt {args.prompt_len[0]}-{args.prompt_len[1]}, new {args.new[0]}-{args.new[1]}")
    print(f"# {config}, device {device_name()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'pass':10} {'good':>5} {'failed':>6} {'differ':>6} {'bad':>4} {'tok/s':>7} {'p50 s':>6} {'p99 s':>6} "
          f"{'health max ms':>13} {'p99 ms':>7} {'load':>5}")
    for name, s in stats.items():
        print(f"{name:10} {s['good']:>5} {s['good_failed']:>6} {s['good_differ']:>6} {s['bad']:>4} "
              f"{s['tokens_per_s']:>7.1f} {s['latency_p50_s']:>6.2f} {s['latency_p99_s']:>6.2f} "
              f"{s['health_max_ms']:>13.1f} {s['health_p99_ms']:>7.1f} {s['load_average']:>5.1f}")
    print("bad requests (kind: statuses seen):", json.dumps(stats[f"hostile {args.rounds}"]["bad_statuses"]))
    rate = {kind: sum(s["tokens"] for n, s in stats.items() if n.startswith(kind))
            / sum(s["wall_s"] for n, s in stats.items() if n.startswith(kind)) for kind in ("clean", "hostile")}
    rows = [row(config, "good tokens/s with bad requests vs without (all rounds)", rate["hostile"], rate["clean"],
                "tok/s")]
    print(f"good tokens/s over all rounds: hostile {rate['hostile']:.1f}, clean {rate['clean']:.1f} "
          f"({rate['hostile'] / rate['clean']:.2f}x)")
    write_result(args.out, {"bench": "serve_hostile", "device": device_name(), "args": vars(args), "rows": rows,
                            "stats": stats, "load_average": os.getloadavg()})
    ok = all(s["good_failed"] == 0 and s["good_differ"] == 0 and not s["bad_unexpected"] for s in stats.values())
    print("every good request answered with its solo text" if ok else "FAILED: see failures / differing / bad_unexpected")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
