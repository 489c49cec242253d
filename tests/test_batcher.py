"""The continuous batcher against `lj.generate` on each request alone (greedy token for token,
seeded sampling draw for draw), its compiled-program bounds, stop strings and cancellation, and
the streamed text against a decode of the whole sequence."""

import jax
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.generate import batcher as batcher_module
from llama_jax.generate.batcher import Batcher, ContextTooLong, QueueFull, Request
from llama_jax.generate.stops import StopMatcher
from reference import hf_model, hf_params

TOKENIZER = "data/tokenizer.model"
LONGEST = 20


@pytest.fixture(scope="module")
def model():
    cfg = lj.LlamaConfig.preset("tiny-gqa")
    return cfg, hf_params(hf_model(cfg, seed=2, sharpen=4.0), cfg), lj.Tokenizer(TOKENIZER)


def requests(seed, count):
    """Ragged prompts (two length buckets), ragged max_new_tokens, greedy and sampled rows."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        sampled = i % 2 == 1
        out.append(Request(rng.integers(3, 512, int(rng.integers(2, 30))).tolist(), int(rng.choice([3, 11, LONGEST])),
                           temperature=0.8 if sampled else 0.0, top_p=0.9 if i % 4 == 1 else 1.0,
                           top_k=20 if i % 4 == 3 else 0, seed=100 + i))
    return out


def alone(model, r):
    """What lj.generate gives this request by itself. A request's step-s token does not depend on
    max_new_tokens, so one LONGEST run (one compiled shape) cut to its length serves every length."""
    cfg, params, tok = model
    new = lj.generate(params, cfg, [r.prompt], max_new_tokens=LONGEST, temperature=r.temperature, top_p=r.top_p,
                      top_k=r.top_k, seed=r.seed, eos_id=tok.eos_id)[0]
    return new[:r.max_new_tokens]


def test_every_request_equals_generate_alone_and_reads_a_bounded_cache(model, monkeypatch):
    cfg, params, tok = model
    reads = []
    decode = batcher_module._decode
    monkeypatch.setattr(batcher_module, "_decode", lambda *a, **kw: reads.append(kw["kv_len"]) or decode(*a, **kw))
    b = Batcher(params, cfg, slots=3, decode=tok.decode, eos_id=tok.eos_id, steps_per_call=2)
    batch = b.run(requests(0, 10))  # 10 requests through 3 slots: slots are reused mid-flight
    for r in batch:
        assert r.tokens == alone(model, r), (r.temperature, len(r.prompt))
        assert r.text == tok.decode(r.tokens)
        assert r.finish_reason == ("length" if len(r.tokens) == r.max_new_tokens else "stop")
    assert any(r.temperature > 0 for r in batch) and b.served == 10 and b.live == 0
    assert set(reads) == {128} and cfg.max_seq_len == 256  # the decode read half the cache, not all of it
    # new prompt lengths and settings in the same buckets compile nothing new
    sizes = batcher_module._admit._cache_size(), decode._cache_size()
    more = b.run(requests(1, 6))
    assert all(r.tokens == alone(model, r) for r in more)
    assert (batcher_module._admit._cache_size(), decode._cache_size()) == sizes


def test_chunked_prefill_admission_equals_generate_alone(model):
    """Prompts admitted 16 positions at a time (the 32 bucket in two chunks; lengths not a multiple of
    16) decode exactly as `lj.generate` (one-step prefill) gives each alone; with several end tokens a
    request stops at the one it meets (here the second)."""
    cfg, params, tok = model
    batch = [r for r in requests(3, 8) if len(r.prompt) > 16 and len(r.prompt) % 16][:3]
    assert len(batch) == 3
    b = Batcher(params, cfg, slots=3, decode=tok.decode, eos_id=tok.eos_id, steps_per_call=2, prefill_chunk=16)
    assert all(r.tokens == alone(model, r) for r in b.run(batch))
    first = batch[0]
    free = alone(model, first)
    j = next(j for j in range(1, len(free)) if free[j] not in free[:j])
    b = Batcher(params, cfg, slots=3, decode=tok.decode, eos_id=[tok.eos_id, free[j]], steps_per_call=2,
                prefill_chunk=16)
    [again] = b.run([Request(first.prompt, first.max_new_tokens, first.temperature, first.top_p, first.top_k,
                             first.seed)])
    assert again.tokens == free[:j] and again.finish_reason == "stop"


def test_stop_strings_cancel_and_limits(model):
    cfg, params, tok = model
    b = Batcher(params, cfg, slots=2, decode=tok.decode, eos_id=tok.eos_id, max_waiting=2)
    greedy = Request(tok.encode("Once upon", bos=True), LONGEST)
    full = tok.decode(alone(model, greedy))
    start = next(i for i in range(len(full) // 2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = Request(greedy.prompt, LONGEST, stop=[full[start:start + 2], "zzzz"])
    b.submit(stop)
    cancelled = b.submit(Request(greedy.prompt, LONGEST))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        b.submit(Request(greedy.prompt, 4))
    b.cancel(cancelled)
    b.run([])
    assert stop.text == full[:full.find(full[start:start + 2])] and stop.finish_reason == "stop"
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == []
    with pytest.raises(ContextTooLong, match="ask for at most 56 new tokens"):
        b.submit(Request([1] * 200, 100))
    with pytest.raises(ValueError, match="top_p must be in"):
        b.submit(Request([1], 4, top_p=0.0))
    with pytest.raises(ValueError, match="stop strings need text"):
        Batcher(params, cfg, slots=1).submit(Request([1], 4, stop="x"))


def test_streamed_text_is_always_a_prefix_of_the_whole_decode(model):
    """Random ids (byte pieces, stray bytes, lone space pieces, whose space SentencePiece drops at
    the start of a text): after every token the text handed out is a prefix of decode(ids so far),
    and with finish() it is all of it."""
    tok = model[2]
    rng = np.random.default_rng(0)
    space = tok.piece_to_id("\u2581")
    for _ in range(150):
        ids = rng.integers(3, tok.vocab_size, 30).tolist()
        ids[rng.integers(1, 30)] = space
        matcher, text = StopMatcher(None, tok.decode), ""
        for n in range(1, len(ids) + 1):
            matcher.update(ids[:n])
            text += matcher.take()
            assert tok.decode(ids[:n]).startswith(text)
        text += matcher.finish()
        assert text == tok.decode(ids)


def test_tensor_parallel_batcher_equals_generate_alone(model):
    """Params split over 2 devices by the logical-axis rules (the CLI's --tensor-parallel 2)."""
    import jax

    from sharding import make_mesh, shard_params

    cfg, params, tok = model
    mesh = make_mesh(1, 1, 2, devices=jax.devices()[:2])
    b = Batcher(shard_params(params, cfg, mesh), cfg, slots=2, decode=tok.decode, eos_id=tok.eos_id, mesh=mesh)
    batch = b.run(requests(2, 3))
    assert b.state["cache"]["k"].sharding.spec != jax.sharding.PartitionSpec()  # the cache is split too
    assert all(r.tokens == alone(model, r) for r in batch)


def _planted(kind, real_admit, real_decode):
    """A stand-in for the batcher's compiled programs that fails as `kind` says (else the real one):
    prefill: the prefill of a prompt starting with token 499 raises; decode: a decode step with
    top_k 77 in any row raises (found only by taking that row out); lost: the third decode call runs,
    then its outputs and the state it returned are gone (as after a failure on the device)."""
    calls, admits = [], []

    def admit(params, state, tokens, *args, **kw):
        admits.append(1)
        if kind == "prefill" and tokens[0, 0] == 499:
            raise RuntimeError("planted prefill failure")
        return real_admit(params, state, tokens, *args, **kw)

    def decode(params, state, **kw):
        if kind == "decode" and 77 in np.asarray(state["top_k"]):
            raise RuntimeError("planted decode failure")
        calls.append(1)
        state, out = real_decode(params, state, **kw)
        if kind == "lost" and len(calls) == 3:
            for x in jax.tree.leaves((state, out)):
                x.delete()
        return state, out

    return admit, decode, admits


@pytest.mark.parametrize("kind", ["top_k 2**31", "prefill", "decode", "lost"])
def test_a_failing_request_ends_alone_and_the_others_equal_generate_alone(model, monkeypatch, kind):
    """Three requests decoding, three waiting, and a fourth live one that makes a device call fail
    (or, `top_k 2**31`, whose value once overflowed the shared step for everyone): only that one ends
    (with an error), and every other answer, streamed or whole, is what lj.generate gives it alone."""
    cfg, params, tok = model
    admit, decode, admits = _planted(kind, batcher_module._admit, batcher_module._decode)
    monkeypatch.setattr(batcher_module, "_admit", admit)
    monkeypatch.setattr(batcher_module, "_decode", decode)
    batch = requests(4, 7)  # greedy and sampled, ragged; the first four need 11-20 tokens
    culprit = batch[1]  # admitted second: a failed decode takes out the two newer ones first
    culprit.prompt = [499] + culprit.prompt[1:]
    culprit.top_k = {"top_k 2**31": 2**31, "decode": 77}.get(kind, culprit.top_k)
    streamed = {id(r): [] for r in batch}
    for r in batch:
        r.on_update = lambda u, r=r: streamed[id(r)].append(u)
    b = Batcher(params, cfg, slots=4, decode=tok.decode, eos_id=tok.eos_id)
    b.run(batch)
    fails = kind in ("prefill", "decode")
    for r in batch:
        if r is culprit and fails:
            assert r.finish_reason == "error" and "planted" in r.error, (r.finish_reason, r.error)
            assert streamed[id(r)][-1].error == r.error
            continue
        assert r.error is None and r.tokens == alone(model, r), (kind, batch.index(r))
        assert "".join(u.text for u in streamed[id(r)]) == r.text == tok.decode(r.tokens)
        assert streamed[id(r)][-1].finish_reason == r.finish_reason in ("stop", "length")
    assert b.live == 0 and b.served == len(batch)
    # prefills: one per request, plus the replays: the two newer ones taken out of the failed decode
    # step (decode), or the four live when the state was lost (lost)
    assert len(admits) == len(batch) + {"decode": 2, "lost": 4}.get(kind, 0)


def test_a_kv_cache_larger_than_the_free_memory_is_refused_before_it_is_allocated(model, monkeypatch):
    """Device memory where JAX reports it (a stand-in GPU here: 1 GB, 0.4 GB in use), else host RAM."""
    cfg, params, _ = model

    class GPU:
        platform, device_kind = "gpu", "Stand-in GPU"

        def memory_stats(self):
            return {"bytes_limit": 10**9, "bytes_in_use": 4 * 10**8}

    monkeypatch.setattr(jax, "devices", lambda *a: [GPU()])
    # 2 (K, V) x 2 layers x 5000 slots x 256 positions x 2 kv heads x 16 x 4 bytes = 655,360,000
    with pytest.raises(ValueError, match=r"the KV cache of 5000 slots x 256 positions needs 0\.66 GB \(655,360,000 "
                                         r"bytes\) but 0\.60 GB is free on 1 Stand-in GPU device\(s\)"):
        Batcher(params, cfg, slots=5000)
    batcher_module._check_cache_fits(cfg, 4000, 256, None)  # 524,288,000 bytes: fits
