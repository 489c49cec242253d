"""The OpenAI-compatible server through the official `openai` client (and raw HTTP for malformed
requests) against a server on a free loopback port: answers equal Generator's / lj.generate's for
the same request alone, streaming joins to the whole answer, stop strings cut exactly, many
concurrent requests (some streamed, some dropped midway) all get their solo answers, and bad
requests get OpenAI's error JSON with the right status while the server keeps answering."""

import asyncio
import concurrent.futures
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest

import llama_jax as lj
from llama_jax.generate.batcher import Batcher
from llama_jax.serve import create_app, running
from llama_jax.serve.__main__ import _build, _parse, main
from reference import hf_greedy, hf_int8_rounded, hf_model, hf_params

TOKENIZER = "data/tokenizer.model"
SLOTS = 4
MODEL = "tiny-chat"
KEY = "sk-test-123"
PROMPTS = ["Hello there", "The quick brown", "a", "Once upon a time"]  # <= 16 tokens: one prefill bucket


@pytest.fixture(scope="module")
def model():
    cfg = lj.LlamaConfig.preset("tiny-gqa")
    params = hf_params(hf_model(cfg, seed=1, sharpen=4.0), cfg)  # sharpened: greedy has no near-ties
    tok = lj.Tokenizer(TOKENIZER)
    return cfg, params, tok, lj.Generator((cfg, params), tok)


@pytest.fixture(scope="module")
def server(model):
    """One server for the module (4 slots, so concurrent tests queue); `submitted` records every
    engine request so tests can look at what the engine did."""
    cfg, params, tok, _ = model
    batcher = Batcher(params, cfg, slots=SLOTS, decode=tok.decode, eos_id=tok.eos_id)
    submitted = []
    submit = batcher.submit
    batcher.submit = lambda r: submitted.append(submit(r)) or r
    with running(create_app(batcher, tok, MODEL)) as url:
        yield url, batcher, submitted


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def solo(model, ids, n, **kw):
    """lj.generate on this one request alone (the reference every served answer must equal)."""
    cfg, params, tok, _ = model
    return lj.generate(params, cfg, [ids], max_new_tokens=n, eos_id=tok.eos_id, **kw)[0]


def test_completions_and_chat_equal_generator_with_usage(model, client):
    cfg, params, tok, gen = model
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == gen.complete(prompt, max_new_tokens=24, temperature=0)
        ids = tok.encode(prompt, bos=True)
        tokens = solo(model, ids, 24)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
        assert r.usage.total_tokens == len(ids) + len(tokens)
        assert r.choices[0].finish_reason == ("length" if len(tokens) == 24 else "stop")
    dialog = [{"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == gen.chat(dialog, max_new_tokens=24, temperature=0)["content"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.encode_dialog(dialog))
    # token ids as the prompt, and logprobs equal generate's (the model's own log p of each token)
    ids = tok.encode(PROMPTS[3], bos=True)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, logprobs=2)
    tokens, logprobs = lj.generate(params, cfg, [ids], max_new_tokens=24, eos_id=tok.eos_id, logprobs=True)
    assert r.choices[0].text == tok.decode(tokens[0])
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(logprobs[0], abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= lp - 1e-5
               for top, lp in zip(r.choices[0].logprobs.top_logprobs, logprobs[0]))


def test_max_tokens_gives_length_and_models_lists_the_model(client, model):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_streamed_chunks_join_to_the_whole_answer(client):
    for kw in ({}, {"stop": ["e"]}):
        whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, **kw)
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_cut_exactly(client, model):
    _, _, tok, gen = model
    full = gen.complete(PROMPTS[0], max_new_tokens=24, temperature=0)
    # a stop string from the middle of the answer, of plain characters (not a half-decoded byte)
    start = next(i for i in range(len(full) // 3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    expected = full[:full.find(stop)]
    for stops in (stop, [stop, "never appears"], ["never appears"]):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stops)
        if stops == ["never appears"]:
            assert r.choices[0].text == full
        else:
            assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
            # the tokens kept run up to the one that completed the stop string
            tokens = solo(model, tok.encode(PROMPTS[0], bos=True), 24)
            kept = r.usage.completion_tokens
            assert full.find(stop) + len(stop) <= len(tok.decode(tokens[:kept]))
            assert full.find(stop) + len(stop) > len(tok.decode(tokens[:kept - 1]))


def test_seeded_sampling_equals_generate_alone(client, model):
    _, _, tok, _ = model
    ids = tok.encode(PROMPTS[3], bos=True)
    kw = dict(temperature=0.9, top_p=0.95, seed=11)
    texts = {client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=24, **kw).choices[0].text
             for _ in range(2)}
    assert texts == {tok.decode(solo(model, ids, 24, **kw))}
    assert texts != {tok.decode(solo(model, ids, 24, temperature=0.9, top_p=0.95, seed=12))}


def test_concurrent_mixed_requests_equal_solo_and_cancelled_ones_free_slots(server, model):
    url, batcher, submitted = server
    _, _, tok, _ = model
    words = "the cat sat on a mat and then it ran far away".split()
    jobs = [(" ".join(words[i % 8:i % 8 + 1 + i % 3]) + f" {i}", (6, 16, 24)[i % 3], i % 4 == 1, i % 8 == 3)
            for i in range(24)]  # (prompt of 3 to 14 tokens, max_tokens, stream, cancel after the first chunk)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    before = len(submitted)

    def send(job):
        prompt, n, stream, cancel = job
        if cancel:  # a client that goes away mid-answer
            with client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0,
                                           stream=True) as s:
                next(iter(s))
            return None
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True))
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs, timeout=600))
    longest = max(n for _, n, _, _ in jobs)
    for (prompt, n, _, cancel), answer in zip(jobs, answers):
        if not cancel:
            tokens = solo(model, tok.encode(prompt, bos=True), longest)  # greedy: a prefix is the shorter answer
            assert answer == tok.decode(tokens[:n]), prompt
    mine = submitted[before:]
    assert len(mine) == len(jobs) > SLOTS  # more requests than slots: slots were reused
    deadline = time.time() + 30
    while (batcher.live or batcher.waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert batcher.live == 0 and not batcher.waiting  # nobody starves, nothing is left holding a slot
    cancelled = [r for r in mine if r.max_new_tokens == 100]
    assert len(cancelled) == 3 and all(r.finish_reason == "cancelled" and len(r.tokens) < 100 for r in cancelled)


def test_a_client_that_hangs_up_while_waiting_is_cancelled(server, client):
    """A non-streamed request whose client gives up (here: queued behind 4 long streams) is
    cancelled at once, not generated for nobody."""
    url, batcher, submitted = server
    before = len(submitted)
    streams = [client.completions.create(model=MODEL, prompt=f"block {i}", max_tokens=110, temperature=0, stream=True)
               for i in range(SLOTS)]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json={"prompt": "hang up", "max_tokens": 110, "temperature": 0},
                   timeout=0.05)
    for stream in streams:
        stream.close()
    deadline = time.time() + 30
    while (batcher.live or batcher.waiting) and time.time() < deadline:
        time.sleep(0.05)
    hung = submitted[before + SLOTS]
    assert hung.prompt == tok_ids("hang up") and hung.finish_reason == "cancelled" and len(hung.tokens) < 110


def tok_ids(text):
    return lj.Tokenizer(TOKENIZER).encode(text, bos=True)


BAD = [  # (body, status, words the message must contain)
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature: Input should be greater than or equal to 0"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p: Input should be greater than 0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p: Input should be less than or equal to 1"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
    ({"prompt": 5}, 400, "prompt: expected one of list[int], list[list[int]], list[str], str; got int 5"),
    ({"prompt": "x", "stop": ""}, 400, "stop strings must be non-empty"),
    ({"prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": [1, 9999]}, 400, "token id 9999 outside the vocabulary [0, 512)"),
    ({"max_tokens": 3}, 400, "prompt: this field is required"),
    ({"prompt": "x", "model": "gpt-4"}, 404, 'the model "gpt-4" does not exist'),
    ({"prompt": "hello " * 100_000}, 400, "cannot fit the context of 256 tokens"),
    ({"prompt": [1] * 200, "max_tokens": 100}, 400, "ask for at most 56 new tokens"),
    ('{"prompt": "x",', 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
    # every field that reaches the shared decode step is checked here, naming the field (issue 22)
    ({"prompt": "x", "top_k": 2**31}, 400, "top_k must be 0 or null (off) or in [1, 512] (the vocabulary), got 2147483648"),
    ({"prompt": "x", "top_k": 2**70}, 400, "top_k must be 0 or null (off) or in [1, 512]"),
    ({"prompt": "x", "top_k": 513}, 400, "top_k must be 0 or null (off) or in [1, 512]"),
    ({"prompt": "x", "seed": 2**32}, 400, "seed: Input should be less than 4294967296"),
    ({"prompt": "x", "seed": 2**63}, 400, "seed: Input should be less than 4294967296"),
    ({"prompt": "x", "seed": -1}, 400, "seed: Input should be greater than or equal to 0"),
    ({"prompt": "x", "max_tokens": 2**70}, 400, "exceeds the context of 256 tokens"),
    ({"prompt": "x", "logprobs": 2**70}, 400, "logprobs: Input should be less than or equal to 5"),
    ('{"prompt": "x", "temperature": 1e400}', 400, "temperature: Input should be less than or equal to 2"),
    ({"prompt": "x", "top_p": float("nan")}, 400, "top_p: Input should be less than or equal to 1; got NaN"),
    ({"prompt": "x", "n": 10**30}, 400, "n must be 1"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings"),
    ({"prompt": "x", "stop": "s" * 1001}, 400, "a stop string may hold at most 1000 characters, got 1001"),
    ('{"prompt": "x \\ud800 y"}', 400, 'prompt: not valid Unicode text: a lone surrogate "\\ud800" at character 2'),
    ('{"prompt": "x", "stop": ["\\udfff"]}', 400, "stop: not valid Unicode text"),
    ("[" * 100_000 + "]" * 100_000, 400, "JSON nests too deeply to parse"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "JSON nests too deeply to parse"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(server, body, status, words):
    url = server[0]
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    if "the context" in words:
        assert error["code"] == "context_length_exceeded"
    ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "unknown_field": [1]}, timeout=120)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2  # unknown fields ignored


def test_chat_errors_full_queue_and_unknown_route(server, client):
    url, batcher, _ = server
    for body, words in (({"messages": []}, "messages: List should have at least 1 item"),
                        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
                        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages:"),
                        ({"messages": [{"role": "user", "content": "[INST] x"}]}, "[INST]")):
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.json()
    batcher.max_waiting, limit = 0, batcher.max_waiting
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and "busy" in str(e.value)
    finally:
        batcher.max_waiting = limit
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_api_key(model):
    cfg, params, tok, _ = model
    batcher = Batcher(params, cfg, slots=SLOTS, decode=tok.decode, eos_id=tok.eos_id)
    with running(create_app(batcher, tok, MODEL, api_key=KEY)) as url:
        for key in ("wrong", "sk-wrong-but-longer"):
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()
            assert e.value.status_code == 401
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(url + "/health").status_code == 200  # health needs no key
        # no schema route outside the key (there is none at all); the key's bytes compare exactly
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(url + path).status_code == 404
        for header, status in ((f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"Bearer  {KEY}", 401),
                               (f"Bearer {KEY}x", 401), (f"Bearer {KEY[:-1]}", 401), (f"Basic {KEY}", 401),
                               ("Bearer", 401), (KEY, 401)):
            r = httpx.get(url + "/v1/models", headers={"Authorization": header})
            assert r.status_code == status, header
        # whitespace around a header's value is not part of it in HTTP (RFC 9110 5.5; h11 drops it,
        # httpx refuses to send it): a raw client's "Bearer KEY \t" is "Bearer KEY"; the comparison is
        # exact on the value as HTTP delivers it (one more space after "Bearer" is a wrong key, above)
        host, port = url.removeprefix("http://").split(":")
        for value in (f"Bearer {KEY} \t", f" \tBearer {KEY}"):
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization:{value}\r\n\r\n".encode())
                assert sock.recv(4096).startswith(b"HTTP/1.1 200 "), value
    for key, words in (("", "api_key is empty"), (" ", "api_key holds a space at character 0 of 1"),
                       ("sk-1 ", "holds a space at character 4 of 5"), ("sk 1", "holds a space at character 2"),
                       ("sk\t1", "holds a space"), ("\tsk-1", "holds a space at character 0 of 5"),
                       ("sk-1\r\n", "holds a space at character 4 of 6"), ("sk-\u00e9", "not visible ASCII at character 3")):
        with pytest.raises(ValueError, match=re.escape(words)):
            create_app(batcher, tok, MODEL, api_key=key)


def test_cli_refuses_keys_that_cannot_be_sent(monkeypatch, capsys):
    """`--api-key ''` (or $LLAMA_JAX_API_KEY='') does not silently mean no key, and a key with a
    space in it is refused: one line, exit status 2, before anything is loaded."""
    for argv, env, words in ((["--api-key", ""], None, "--api-key (default $LLAMA_JAX_API_KEY) is empty"),
                             ([], "", "--api-key (default $LLAMA_JAX_API_KEY) is empty"),
                             (["--api-key", "sk-mine "], None, "holds a space at character 7 of 8"),
                             ([], " sk", "holds a space at character 0 of 3")):
        if env is None:
            monkeypatch.delenv("LLAMA_JAX_API_KEY", raising=False)
        else:
            monkeypatch.setenv("LLAMA_JAX_API_KEY", env)
        with pytest.raises(SystemExit) as e:
            _parse(["--checkpoint", "unused", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1] and err[-1].startswith("python -m llama_jax.serve: error:")


def test_a_request_that_fails_in_the_shared_decode_step_ends_alone(server, model, monkeypatch):
    """Issue 22: one request that makes the shared decode step fail (planted here: a step with
    top_k 77 in any row raises, as top_k 2**31 once overflowed it) while 3 streams decode and 3
    requests wait: it gets a 500 alone, every other client gets its solo answer."""
    from llama_jax.generate import batcher as batcher_module

    url = server[0]
    _, _, tok, _ = model
    real = batcher_module._decode

    def decode(params, state, **kw):
        if 77 in np.asarray(state["top_k"]):
            raise OverflowError("planted: a value that does not fit the step")
        return real(params, state, **kw)

    monkeypatch.setattr(batcher_module, "_decode", decode)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = [f"stream {i} of the story" for i in range(3)] + [f"wait {i}" for i in range(3)]  # (32 tokens: the compiled buckets of the tests above)
    streams = [client.completions.create(model=MODEL, prompt=p, max_tokens=32, temperature=0, stream=True)
               for p in prompts[:3]]
    firsts = [next(iter(s)).choices[0].text for s in streams]  # all three are decoding now

    def send(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bad = pool.submit(httpx.post, url + "/v1/completions", timeout=300,
                          json={"prompt": "the bad one", "max_tokens": 32, "temperature": 0.5, "top_k": 77})
        waiting = [pool.submit(send, p) for p in prompts[3:]]
        texts = [f + "".join(c.choices[0].text for c in s) for f, s in zip(firsts, streams)]
        texts += [w.result() for w in waiting]
        r = bad.result()
    assert r.status_code == 500 and "decode step failed with this request" in r.json()["error"]["message"]
    for prompt, text in zip(prompts, texts):
        assert text == tok.decode(solo(model, tok.encode(prompt, bos=True), 32)), prompt


def test_body_limits_are_kept_while_reading(model):
    """A body over the limit is refused on its Content-Length without reading it, and a chunked one
    as soon as the bytes read pass the limit (the server reads at most limit + one chunk)."""
    cfg, params, tok, _ = model
    app = create_app(Batcher(params, cfg, slots=1, decode=tok.decode, eos_id=tok.eos_id), tok, MODEL)
    chunk = b"x" * (64 << 10)

    def call(headers, chunks):
        pulled, sent = [0], []

        async def receive():
            pulled[0] += 1
            return {"type": "http.request", "body": chunk, "more_body": pulled[0] < chunks}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
        asyncio.run(app(scope, receive, send))
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, pulled[0] * len(chunk), json.loads(b"".join(m.get("body", b"") for m in sent))

    status, read, body = call([(b"content-length", b"600000000")], 10_000)
    assert status == 413 and read == 0 and "600000000 bytes exceeds the limit of 16777216" in body["error"]["message"]
    status, read, body = call([(b"transfer-encoding", b"chunked")], 1024)  # 64 MB, no length given
    assert status == 413 and read <= (16 << 20) + len(chunk), read
    # over a real socket: the 413 comes back at once, though the 600 MB never arrive
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 600000000\r\n\r\n{\"prompt\": ")
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")


class _SlowTexts:
    """A tokenizer that waits 1 s (without the interpreter lock, as a slower machine's tokenizer
    would take longer) before encoding a text of over a million characters: off the event loop that
    wait stalls nobody; on it, every stream and /health would wait >= 1 s whatever the load."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, **kw):
        if len(text) > 1_000_000:
            time.sleep(1.0)
        return self._tok.encode(text, **kw)


def test_health_and_a_live_stream_go_on_while_big_prompts_arrive(model):
    """Eight clients send big prompts at once to a server with a 256k-token context: 3 MB of text
    (tokenized in a worker thread: it fits the byte bound, then is too many tokens; the tokenizer
    also waits 1 s first, _SlowTexts) and seven 2 MB token-id lists (parsed in a worker thread).
    Meanwhile /health keeps answering and a stream that was already decoding keeps receiving tokens
    (the issue measured /health blocked 7.3 s and other clients' streams stalled 3.3 s)."""
    cfg, params, tok, _ = model
    long = cfg.replace(max_seq_len=1 << 18)  # (RoPE has no table: the same params serve any context)
    stop, latencies = threading.Event(), []
    streaming, arrivals = threading.Event(), []  # the live stream: decoding steadily; each chunk's arrival time

    def poll(url):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                start = time.perf_counter()
                assert c.get(url + "/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)

    def live(url):  # one stream, decoding before the burst starts and closed (cancelled) once it ends
        # 1100 prompt tokens: the whole answer (up to 948 tokens; ~150 a second here, ~450 in the burst)
        # reads the cache in one compiled bucket (1024 < positions <= 2048), as on a warmed-up server;
        # crossing into a new bucket would compile for ~1-2 s and stall the stream for that
        prompt = tok.encode("the cat sat on a mat " * 200, bos=True)[:1100]
        body = {"prompt": prompt, "max_tokens": 2048 - 1100, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 6:  # past the prefill and the decode step's compile
                        streaming.set()
                if stop.is_set():
                    return

    with running(create_app(Batcher(params, long, slots=1, decode=tok.decode, eos_id=tok.eos_id), _SlowTexts(tok),
                            MODEL)) as url:
        threads = [threading.Thread(target=poll, args=(url,)), threading.Thread(target=live, args=(url,))]
        for thread in threads:
            thread.start()
        try:
            bodies = [json.dumps({"prompt": "hello world " * 250_000}) if i == 3 else
                      json.dumps({"prompt": [1] + [15043] * 350_000}) for i in range(8)]  # (while it compiles)
            assert streaming.wait(60), "the stream never started"
            burst = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda b: httpx.post(url + "/v1/completions", content=b, timeout=120,
                                                             headers={"content-type": "application/json"}), bodies))
            burst = (burst, time.perf_counter())
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert [a.status_code for a in answers] == [400] * 8
    assert all(a.json()["error"]["code"] == "context_length_exceeded" for a in answers)
    assert all("exceeds the context of 262144 tokens" in a.json()["error"]["message"] for a in answers)
    assert len(latencies) > 3 and max(latencies) < 1.0, sorted(latencies)[-3:]
    # The stream's chunks during the burst, and the first one after it (which closes the last gap).
    # Bound 1 s for both: with the work in worker threads the largest gap was 0.10-0.14 s and /health
    # 0.06-0.11 s (2-core CPU shared with other jobs, load 2-4; the threads still take the interpreter
    # lock in turns: json.loads is one C call), /health 0.28 s at load ~20, so 1 s is ~8x what was
    # measured. With the work on the event loop (the code before) the stream's largest gap was 1.68-2.71 s
    # here: the 1 s wait alone reaches the bound on any machine (without it: 0.84-0.92 s, under it).
    during = [t for t in arrivals if burst[0] <= t <= burst[1]] + [t for t in arrivals if t > burst[1]][:1]
    gaps = np.diff([t for t in arrivals if t < burst[0]][-1:] + during)
    assert arrivals[-1] > burst[1], "the stream ended before the burst did"
    assert len(during) >= 2 and gaps.max() < 1.0, (len(during), sorted(gaps)[-3:], burst[1] - burst[0])


def test_short_errors_and_one_log_line_per_client_gone_mid_body(server):
    """A 1 MB model name is a short 404; a lone surrogate in a chat message is a 400 naming it; a
    client that hangs up in the middle of its body is one log line (no traceback), and the server
    goes on."""
    url = server[0]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "model": "m" * (1 << 20)})
    assert r.status_code == 404 and len(r.content) < 400 and "does not exist" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content='{"messages": [{"role": "user", "content": "a\\udc80"}]}')
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages.0.content: not valid Unicode")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(5):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                             b'{"prompt": "half')
            time.sleep(0.1)
        deadline = time.time() + 10
        while len(records) < 5 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert len(records) == 5 and not any(r.exc_info for r in records), [r.getMessage() for r in records]
    assert all("went away while sending a request body (16 bytes of 1000 received)" in r.getMessage()
               for r in records)
    assert httpx.get(url + "/health").status_code == 200


def test_cli_serves_a_checkpoint_and_refuses_bad_flags(model, tmp_path, capsys):
    """`python -m llama_jax.serve` end to end (tokenizer from the checkpoint folder, a free port, an
    API key), and user errors as one line with exit status 2."""
    cfg, params, _, gen = model
    path = tmp_path / "ckpt"
    lj.save_checkpoint(path, cfg, params)
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    for argv, words in ((["--checkpoint", str(tmp_path / "nope")], "no such checkpoint folder"),
                        (["--checkpoint", str(path), "--max-seq-len", "999"], "max_seq_len must be an int in [2, 256]"),
                        (["--checkpoint", str(path), "--max-batch", "0"], "--max-batch must be >= 1"),
                        (["--checkpoint", str(path), "--quantize", "int4"], "--quantize 'int4' is not one of int8, nf4"),
                        (["--checkpoint", str(path), "--max-batch", str(10**7)],
                         "the KV cache of 10000000 slots x 256 positions needs 1,310.72 GB (1,310,720,000,000 bytes) "
                         "but ")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--no-warmup"])
        err = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]  # (argparse adds usage)
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    taken = socket.create_server(("127.0.0.1", 0))
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(path), "--no-warmup", "--port", str(taken.getsockname()[1])])
    assert f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}" in capsys.readouterr().err
    taken.close()

    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.serve", "--checkpoint", str(path), "--port", "0",
                             "--max-batch", "2", "--no-warmup", "--api-key", KEY], stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", banner).group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        r = client.completions.create(model="ckpt", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert r.choices[0].text == gen.complete(PROMPTS[0], max_new_tokens=24, temperature=0)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_cli_quantize_int8_serves_the_int8_model(model, tmp_path):
    """`--quantize int8` (the CLI's own parsing and loading, served in-process): a completion at
    temperature 0 through the official client is HF's greedy text of the model whose projections hold
    the numpy int8 round trip, and the banner says int8. (A bad value: test_cli_serves_a_checkpoint...)"""
    cfg, params, tok, _ = model
    path = tmp_path / "ckpt"
    lj.save_checkpoint(path, cfg, params)
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    app, sock, banner = _build(_parse(["--checkpoint", str(path), "--quantize", "int8", "--max-batch", "2",
                                       "--no-warmup", "--port", "0"]))
    sock.close()
    assert re.search(r"\(weights \d+\.\d\d GB int8, KV cache", banner), banner
    ids = tok.encode(PROMPTS[3], bos=True)
    want = tok.decode(hf_greedy(hf_int8_rounded(hf_model(cfg, seed=1, sharpen=4.0)), ids, 24, eos_id=tok.eos_id))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model="ckpt", prompt=PROMPTS[3], max_tokens=24, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(ids)
