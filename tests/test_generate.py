"""Generation against independent references: HF transformers' greedy `generate` and logits
(tiny random float32 models, output sharpened so greedy has no near-ties), Meta's top-p code
written out in torch, hand-made distributions, and a chi-square test of the sampler."""

import numpy as np
import pytest
import torch
from scipy import stats

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import llama_jax as lj
from llama_jax.generate import sample
from llama_jax.generate.__main__ import main
from llama_jax.model import Llama
from llama_jax import quant
from reference import hf_greedy, hf_int8_rounded, hf_model, hf_params
from sharding.rules import shard_params

TOKENIZER = "data/tokenizer.model"
NEW = 24  # one max_new_tokens for most tests: fewer distinct compiled shapes


@pytest.fixture(scope="module")
def gqa():
    cfg = lj.LlamaConfig.preset("tiny-gqa")
    model = hf_model(cfg, seed=1, sharpen=4.0)
    return cfg, model, hf_params(model, cfg)


@pytest.fixture(scope="module")
def generator(gqa, tmp_path_factory):
    """A Generator loaded from a saved checkpoint: the same params placement as the CLI's, so the
    text-level tests share compiled programs."""
    cfg, _, params = gqa
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    lj.save_checkpoint(path, cfg, params)
    return lj.Generator(str(path), TOKENIZER), path


def ragged_prompts(seed=0, lengths=(5, 13, 2, 9)):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, n).tolist() for n in lengths]


def hf_token_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from one HF forward over the whole sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


# --- cache correctness ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_cache_logits_equal_full_forward_every_step(preset):
    """Prefill a right-padded ragged batch, then feed one token per step at each row's own position:
    every step's logits equal the full forward over that row's whole sequence."""
    cfg = lj.LlamaConfig.preset(preset)
    params = lj.init_params(cfg, 3)
    lengths, steps, pad_to, slots = [3, 7, 5], 6, 8, 16
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, cfg.vocab_size, n + steps).tolist() for n in lengths]
    model = Llama(cfg)
    apply = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, None, c))

    tokens = np.zeros((3, pad_to), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = seqs[i][:n]
    positions = np.broadcast_to(np.arange(pad_to), (3, pad_to))
    logits, cache = apply(params, tokens, positions, lj.init_cache(cfg, 3, slots))
    got = [[np.asarray(logits[i, n - 1])] for i, n in enumerate(lengths)]
    for s in range(steps):
        pos = np.array([[n + s] for n in lengths], np.int32)
        tok = np.array([[seqs[i][n + s]] for i, n in enumerate(lengths)], np.int32)
        logits, cache = apply(params, tok, pos, cache)
        for i in range(3):
            got[i].append(np.asarray(logits[i, 0]))
    whole = np.zeros((3, max(lengths) + steps), np.int32)  # right padding never changes earlier logits
    for i, seq in enumerate(seqs):
        whole[i, :len(seq)] = seq
    full_logits = np.asarray(lj.forward(params, whole, cfg))
    for i, n in enumerate(lengths):
        full = full_logits[i, n - 1:n + steps]
        rel = np.abs(np.stack(got[i]) - full).max() / np.abs(full).max()
        assert rel < 1e-5, (preset, i, rel)


# --- greedy vs Hugging Face -------------------------------------------------------------------------


def test_greedy_ragged_batch_equals_hf_with_logprobs_and_echo(gqa):
    cfg, model, params = gqa
    prompts = ragged_prompts()
    out, logprobs = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, logprobs=True, echo=True)
    for prompt, row, lp in zip(prompts, out, logprobs):
        assert row == prompt + hf_greedy(model, prompt, NEW)
        assert len(lp) == len(row) and lp[0] == 0.0
        np.testing.assert_allclose(lp[1:], hf_token_logprobs(model, row), rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_one_step_prefill_and_hf(gqa):
    """A ragged batch prefilled 6 positions at a time (bucket 16 = two chunks + a tail of 4; rows end in
    the first chunk, the second and the tail, at lengths that are no multiple of 6): the KV cache and
    every prompt token's log p equal the one-step prefill's to float32 rounding, and the greedy tokens
    (and echo log-probs) are HF's."""
    from llama_jax.generate import engine

    cfg, model, params = gqa
    prompts = ragged_prompts()  # lengths 5, 13, 2, 9
    one = engine._start(params, cfg, prompts, NEW, 0.0, 1.0, 0, 0, None, None)
    chunked = engine._start(params, cfg, prompts, NEW, 0.0, 1.0, 0, 0, None, 6)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        for name in ("k", "v"):  # every layer's K/V at the prompt's positions
            np.testing.assert_allclose(chunked[1]["cache"][name][:, i, :n], one[1]["cache"][name][:, i, :n],
                                       rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(chunked[2][i, :n - 1], one[2][i, :n - 1], rtol=1e-5, atol=1e-5)
    assert np.array_equal(chunked[1]["tokens"][:, 0], one[1]["tokens"][:, 0])
    np.testing.assert_allclose(chunked[1]["logprobs"][:, 0], one[1]["logprobs"][:, 0], rtol=1e-5, atol=1e-6)
    out, logprobs = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, logprobs=True, echo=True,
                                prefill_chunk=6)
    assert out == lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, echo=True, prefill_chunk=None)
    for prompt, row, lp in zip(prompts, out, logprobs):
        assert row == prompt + hf_greedy(model, prompt, NEW)
        np.testing.assert_allclose(lp[1:], hf_token_logprobs(model, row), rtol=1e-4, atol=1e-4)


def test_stream_chunks_join_to_generate_and_greedy_equals_hf(gqa):
    cfg, model, params = gqa
    prompts = ragged_prompts()
    full = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None)
    chunks = list(lj.generate_stream(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, chunk=5))
    assert len(chunks) == 1 + -(-(NEW - 1) // 5)  # first token after prefill, then 5 steps a chunk
    assert [len(c[0]) for c in chunks] == [1, 5, 5, 5, 5, 3]
    for i, prompt in enumerate(prompts):
        joined = sum((c[i] for c in chunks), [])
        assert joined == full[i] == hf_greedy(model, prompt, NEW)


def test_eos_stops_each_row_and_max_length(gqa):
    cfg, model, params = gqa
    prompts = ragged_prompts()
    free = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None)
    assert [len(r) for r in free] == [NEW] * 4
    # an "EOS" that row 0 produces at step k >= 2 but not before: row 0 must stop there, rows without it run on
    k = next(k for k in range(2, NEW) if free[0][k] not in free[0][:k])
    eos = free[0][k]
    out = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=eos)
    assert out[0] == free[0][:k]
    for prompt, row in zip(prompts, out):
        assert row == hf_greedy(model, prompt, NEW, eos_id=eos)
    assert any(len(row) == NEW for row in out), "expected at least one row never to hit the EOS"
    stream = list(lj.generate_stream(params, cfg, prompts, max_new_tokens=NEW, eos_id=eos, chunk=4))
    assert [sum((c[i] for c in stream), []) for i in range(4)] == out
    # several end tokens (Llama 3.1's list): each row stops at the first of any of them, as HF's generate
    j = next(j for j in range(2, NEW) if free[1][j] not in free[1][:j] and free[1][j] != eos)
    ends = [free[1][j], eos]  # row 1 stops at the first, row 0 at the second
    out = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=ends)
    assert out[0] == free[0][:k] and len(out[1]) <= j
    for prompt, row in zip(prompts, out):
        assert row == hf_greedy(model, prompt, NEW, eos_id=ends)
    stream = list(lj.generate_stream(params, cfg, prompts, max_new_tokens=NEW, eos_id=tuple(ends), chunk=4))
    assert [sum((c[i] for c in stream), []) for i in range(4)] == out


def test_sharded_decode_equals_single_device(gqa):
    cfg, _, params = gqa
    prompts = ragged_prompts(lengths=(5, 13, 2))
    want, want_lp = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, logprobs=True)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = shard_params(params, cfg, mesh)
    assert sharded["layers"]["attention"]["wq"].sharding.spec[2] == "tensor"
    with jax.set_mesh(mesh):
        got, got_lp = lj.generate(sharded, cfg, prompts, max_new_tokens=NEW, eos_id=None, logprobs=True)
    assert got == want
    np.testing.assert_allclose(np.array(got_lp), np.array(want_lp), rtol=1e-5, atol=1e-5)


def test_int8_greedy_equals_hf_with_numpy_int8_rounded_weights(gqa):
    """int8 weight-only decoding (prefill + cached decode, ragged batch): token for token HF's greedy
    on the float model whose projections hold the int8 round trip written in numpy on HF's (out, in)
    layout. Same weights, so only summation order differs (the output is sharpened: no near-ties);
    a wrong scale axis or rounding would change the tokens. Log-probs agree as closely as the float
    model's do (1e-4)."""
    cfg, model, params = gqa
    rounded = hf_int8_rounded(model)
    prompts = ragged_prompts()
    q = quant.quantize_params(params, cfg, "int8")
    assert q["layers"]["feed_forward"]["w2"].values.dtype == jnp.int8
    out, logprobs = lj.generate(q, cfg, prompts, max_new_tokens=NEW, eos_id=None, logprobs=True)
    for prompt, row, lp in zip(prompts, out, logprobs):
        assert row == hf_greedy(rounded, prompt, NEW)
        np.testing.assert_allclose(lp, hf_token_logprobs(rounded, prompt + row)[len(prompt) - 1:], rtol=1e-4,
                                   atol=1e-4)
    want = hf_token_logprobs(model, prompts[0] + out[0])[len(prompts[0]) - 1:]  # the float model: not the same
    assert np.abs(np.array(logprobs[0]) - want).max() > 1e-3


# --- samplers ----------------------------------------------------------------------------------------


def meta_sample_top_p_kept(probs, p):
    """Meta's llama/generation.py sample_top_p, up to the draw: the renormalised distribution."""
    probs = torch.tensor(np.array(probs), dtype=torch.float32)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.zeros_like(probs).scatter(-1, probs_idx, probs_sort).numpy()


def test_top_p_kept_set_hand_made():
    probs = np.array([0.0625, 0.25, 0.5, 0.0625, 0.125], np.float32)  # exact in binary
    # sorted: id2 .5, id1 .25, id4 .125, id0 .0625, id3 .0625 (ties keep id order); mass before each:
    # 0, .5, .75, .875, .9375. A token is kept when the mass before it is <= p (the crossing token stays).
    cases = {1.0: {0, 1, 2, 3, 4}, 0.9: {0, 1, 2, 4}, 0.875: {0, 1, 2, 4}, 0.75: {1, 2, 4}, 0.7: {1, 2},
             0.5: {1, 2}, 0.3: {2}, 0.01: {2}}
    for top_p, kept in cases.items():
        got = np.asarray(lj.filter_probs(probs, top_p))
        assert set(np.flatnonzero(got)) == kept, top_p
        want = np.where(np.isin(np.arange(5), list(kept)), probs, 0) / probs[list(kept)].sum()
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # top-k keeps the k most likely, then top-p applies to the renormalised rest
    assert set(np.flatnonzero(np.asarray(lj.filter_probs(probs, 1.0, top_k=2)))) == {1, 2}
    assert set(np.flatnonzero(np.asarray(lj.filter_probs(probs, 0.6, top_k=3)))) == {1, 2}  # 0.5/0.875 < 0.6


def test_top_p_matches_meta_on_random_distributions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)) * rng.uniform(0.5, 4, size=(64, 1))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
    for p in (0.1, 0.5, 0.9, 0.95):
        np.testing.assert_allclose(np.asarray(lj.filter_probs(probs, p)), meta_sample_top_p_kept(probs, p),
                                   rtol=1e-5, atol=1e-7)


def test_sampling_frequencies_chi_square():
    logits = jnp.log(jnp.array([0.05, 0.3, 0.02, 0.4, 0.2, 0.03], jnp.float32)) * 1.5
    temperature, top_p, n = 1.2, 0.85, 20000
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-p)
    preceding = np.cumsum(p[order]) - p[order]
    kept = order[preceding <= top_p]
    expected = np.zeros(6)
    expected[kept] = p[kept] / p[kept].sum()
    assert 1 < len(kept) < 6  # the hand rule keeps some and drops some: a real test of both
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(sample)(keys, jnp.broadcast_to(logits, (n, 6)), jnp.float32(temperature),
                                       jnp.float32(top_p), jnp.int32(0)))
    counts = np.bincount(draws, minlength=6)
    assert counts[expected == 0].sum() == 0
    assert stats.chisquare(counts[kept], n * expected[kept]).pvalue > 1e-3


# --- sampling statistics inside the real decode loop ---------------------------------------------------
# A hand-built model whose next-token logits are one chosen vector whatever the input: every layer's
# output projections are zero (the residual stream stays the embedding), every embedding row is ones,
# so the final RMSNorm gives ones / sqrt(1 + eps) and output row 0 holds the chosen logits. lj.generate
# then draws ROWS x STEPS tokens (prefill + the on-device decode loop) from one known distribution.

ROWS, STEPS = 64, 128
FIXED = lj.LlamaConfig.preset("tiny")


def fixed_logits_params(logits):
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), lj.param_shapes(FIXED))
    params["tok_embeddings"][:] = 1.0
    for norm in (params["norm"], params["layers"]["attention_norm"], params["layers"]["ffn_norm"]):
        norm["weight"][:] = 1.0
    params["output"][0] = np.asarray(logits, np.float32) * np.sqrt(1.0 + FIXED.norm_eps)
    return params


def draw(logits, **sampling):
    """(ROWS, STEPS) tokens from the decode loop; every row has the same prompt."""
    out = lj.generate(fixed_logits_params(logits), FIXED, [[1, 5]] * ROWS, max_new_tokens=STEPS, eos_id=None,
                      **sampling)
    return np.array(out)


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def assert_draws_follow(tokens, expected):
    """No token outside the support of `expected` ever appears, and the counts inside it pass a
    chi-square test (p > 1e-3; the seeds are fixed, so the test is deterministic)."""
    counts = np.bincount(tokens.ravel(), minlength=FIXED.vocab_size)
    support = expected > 0
    assert counts[~support].sum() == 0, f"tokens outside the support: {np.flatnonzero(counts * ~support)[:10]}"
    assert stats.chisquare(counts[support], tokens.size * expected[support]).pvalue > 1e-3


def test_fixed_logits_model_really_gives_the_chosen_logits():
    logits = np.random.default_rng(0).normal(size=FIXED.vocab_size)
    got = lj.forward(fixed_logits_params(logits), np.array([[1, 7, 300], [2, 9, 511]]), FIXED)
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(logits, got.shape), rtol=1e-5, atol=1e-5)


def test_decode_loop_top_k_support_and_frequencies():
    """top_k=7 on a flat-ish distribution (99% of the mass outside the 7): over 8192 draws no other
    token may appear, and the 7 follow the renormalised softmax."""
    logits = np.random.default_rng(1).normal(size=FIXED.vocab_size)
    top = np.argsort(-logits)[:7]
    expected = np.zeros(FIXED.vocab_size)
    expected[top] = softmax64(logits)[top] / softmax64(logits)[top].sum()
    assert_draws_follow(draw(logits, temperature=1.0, top_p=1.0, top_k=7, seed=3), expected)


def test_decode_loop_top_p_support_and_frequencies():
    """top_p=0.8 at temperature 0.7 with Meta's rule (keep a token when the mass before it is <= p),
    computed here in float64 (no token's preceding mass is within 1e-4 of p, far above float32's
    ~1e-6 cumulative-sum error, so both keep the same 40 tokens)."""
    logits = np.random.default_rng(2).normal(size=FIXED.vocab_size) * 1.5
    p = softmax64(logits / 0.7)
    order = np.argsort(-p)
    preceding = np.cumsum(p[order]) - p[order]
    assert np.min(np.abs(preceding - 0.8)) > 1e-4
    kept = order[preceding <= 0.8]
    expected = np.zeros(FIXED.vocab_size)
    expected[kept] = p[kept] / p[kept].sum()
    assert len(kept) == 40
    assert_draws_follow(draw(logits, temperature=0.7, top_p=0.8, seed=4), expected)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_decode_loop_temperature_scales_logits(temperature):
    """p ~ softmax(logits / T) on 8 tokens (the rest at -1e4): T=0.5 sharpens, T=2 flattens; a T that
    multiplies or is ignored gives a very different histogram (chi-square p ~ 0)."""
    logits = np.full(FIXED.vocab_size, -1e4)
    logits[[3, 40, 41, 100, 200, 300, 400, 511]] = [0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8]
    assert_draws_follow(draw(logits, temperature=temperature, top_p=1.0, seed=5), softmax64(logits / temperature))


def test_decode_loop_keys_differ_per_step_and_per_row():
    """Uniform logits: every token is equally likely at every step and row. With a fresh key per step
    and per row, a row repeats its previous token 1/512 of the time (64 x 127 pairs: ~16 expected, so
    < 48 is 8 standard deviations) and two rows agree at a step as rarely; a key reused across steps
    (or rows) repeats it every time, and reusing the prefill's key for the first decode step alone adds 64."""
    tokens = draw(np.zeros(FIXED.vocab_size), temperature=1.0, top_p=1.0, seed=6)
    assert np.sum(tokens[:, 1:] == tokens[:, :-1]) < 48
    assert np.sum(tokens[1:] == tokens[:-1]) < 48
    assert_draws_follow(tokens, np.full(FIXED.vocab_size, 1.0 / FIXED.vocab_size))


def test_seeded_sampling_reproducible_and_streaming_identical(gqa):
    cfg, _, params = gqa
    prompts = ragged_prompts()
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.95, top_k=50, eos_id=None)
    a = lj.generate(params, cfg, prompts, seed=7, **kw)
    assert a == lj.generate(params, cfg, prompts, seed=7, **kw)
    assert a != lj.generate(params, cfg, prompts, seed=8, **kw)
    assert a != lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None)  # not greedy
    stream = list(lj.generate_stream(params, cfg, prompts, seed=7, chunk=8, **kw))
    assert [sum((c[i] for c in stream), []) for i in range(4)] == a


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts,kw,match", [
    ([[1, 5], []], {}, r"prompts\[1\] is empty"),
    ([], {}, "non-empty list"),
    ("hello", {}, "non-empty list"),
    (["hello"], {}, r"prompts\[0\] must be a list of token ids"),
    ([[1, 512]], {}, "outside the vocabulary"),
    ([[1.5, 2]], {}, "must hold int token ids"),
    ([[1] * 250], {"max_new_tokens": 10}, r"250 tokens\) \+ max_new_tokens \(10\) exceeds .*max_seq_len=256"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be"),
    ([[1]], {"temperature": -0.5}, "temperature must be"),
    ([[1]], {"temperature": float("nan")}, "temperature must be"),
    ([[1]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ([[1]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ([[1]], {"top_k": -1}, "top_k must be"),
    ([[1]], {"eos_id": 600}, "eos_id must be"),
    ([[1]], {"eos_id": [2, 600]}, r"eos_id must be None, a token id or a list of token ids in \[0, 512\)"),
    ([[1]], {"prefill_chunk": 0}, "prefill_chunk must be None"),
])
def test_bad_requests_raise_clear_errors(gqa, prompts, kw, match):
    cfg, _, params = gqa
    with pytest.raises((ValueError, TypeError), match=match):
        lj.generate(params, cfg, prompts, **kw)


# --- text level: Generator and the CLI ---------------------------------------------------------------------


def test_generator_complete_chat_alpaca_stream_equal_hf(gqa, generator):
    cfg, model, params = gqa
    gen = generator[0]
    tok = gen.tokenizer
    greedy = dict(temperature=0.0, max_new_tokens=NEW)

    def want(ids):
        return tok.decode(hf_greedy(model, ids, NEW, eos_id=tok.eos_id))

    texts = ["The capital of France is", "Once upon a time"]  # (batched completion: see the ragged tests)
    assert gen.complete(texts[:1], **greedy) == [want(tok.encode(texts[0], bos=True))]
    assert gen.complete(texts[0], **greedy) == want(tok.encode(texts[0], bos=True))
    dialog = [{"role": "user", "content": "Hi there"}]
    assert gen.chat(dialog, **greedy) == {"role": "assistant", "content": want(tok.encode_dialog(dialog))}
    assert gen.alpaca("List two colors.", **greedy) == want(tok.encode(lj.format_alpaca("List two colors."))).strip()
    pieces = list(gen.stream(texts[1], **greedy))
    assert len(pieces) > 1 and "".join(pieces) == gen.complete(texts[1], **greedy)
    with pytest.raises(TypeError, match="unknown sampling keyword"):
        gen.complete("x", temprature=0.5)
    with pytest.raises(ValueError, match="vocab_size"):
        lj.Generator((cfg.replace(vocab_size=1024), params), TOKENIZER)


def test_cli_prompt_chat_and_interactive(generator, capsys, monkeypatch):
    gen, path = generator
    common = ["--checkpoint", str(path), "--tokenizer", TOKENIZER, "--temperature", "0",
              "--max-new-tokens", str(NEW)]
    main(common + ["--prompt", "Once upon a time"])
    assert capsys.readouterr().out == gen.complete("Once upon a time", temperature=0, max_new_tokens=NEW) + "\n"

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("And then?\n\n"))
    main(common + ["--chat", "--prompt", "Hello", "--interactive"])
    turn = [{"role": "user", "content": "Hello"}]
    first = gen.chat(turn, temperature=0, max_new_tokens=NEW)["content"]
    second = gen.chat(turn + [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}],
                      temperature=0, max_new_tokens=NEW)["content"]
    assert capsys.readouterr().out == first + "\n" + second + "\n"

    # A long chat keeps going: the oldest turns give way once the context is 3/4 full.
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Tell me more.\nAgain.\n\n"))
    main(["--checkpoint", str(path), "--tokenizer", TOKENIZER, "--temperature", "0", "--chat", "--interactive",
          "--prompt", "Hello"])  # no --max-new-tokens: every reply may run to the end of the context
    assert len(capsys.readouterr().out.splitlines()) >= 3

    # User mistakes end with one "error:" line and exit status 2, not a traceback.
    for bad in (["--checkpoint", str(path) + "-missing", "--tokenizer", TOKENIZER, "--prompt", "x"],
                common + ["--prompt", "x", "--top-p", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_chat_history_drops_only_the_oldest_turns(generator):
    """A chat past 3/4 of the context loses its oldest (user, assistant) pairs, one at a time, and keeps
    the system message and the newest pairs. Reference: the longest suffix of whole pairs whose Llama-2
    prompt (built here from literal [INST]/<<SYS>> text) fits in 3/4 of max_seq_len."""
    from llama_jax.generate.__main__ import _fit_history

    gen = generator[0]
    tok, limit = gen.tokenizer, gen.cfg.max_seq_len * 3 // 4
    system = "Answer briefly."
    pairs = [(f"Question {i}: what is {i} + {i}?", f"It is {2 * i}, as always.") for i in range(12)]
    text = "And the next one?"

    def literal_prompt(kept):  # the system message folds into the first kept user turn
        ids = []
        for n, (user, answer) in enumerate(kept):
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}" if n == 0 else user
            ids += tok.encode(f"[INST] {user} [/INST] {answer} ", bos=True, eos=True)
        return ids + tok.encode(f"[INST] {text} [/INST]", bos=True)

    n = max(k for k in range(1, len(pairs) + 1) if len(literal_prompt(pairs[-k:])) <= limit)
    assert n < len(pairs)
    history = [{"role": "system", "content": system}]
    for user, answer in pairs:
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    ids = _fit_history(gen, history, text, "chat", "")
    assert ids == literal_prompt(pairs[-n:])
    assert history[0] == {"role": "system", "content": system}
    assert [m["content"] for m in history[1:]] == [c for pair in pairs[-n:] for c in pair]


@pytest.fixture(scope="module")
def cli_run(generator):
    """Run the CLI; return (stdout, the Generator it built) so tests can see its params placement."""
    from llama_jax.generate import __main__ as cli

    _, path = generator
    made = []

    class Recording(lj.Generator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def run(capsys, monkeypatch, *args):
        monkeypatch.setattr(cli, "Generator", Recording)
        main(["--checkpoint", str(path), "--tokenizer", TOKENIZER, "--max-new-tokens", str(NEW), *args])
        return capsys.readouterr().out, made[-1]
    return run


STANFORD_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "Add the numbers.\n\n### Input:\n2+3\n\n### Response:")


def test_cli_alpaca_input_and_chat_system_prompts_equal_hf(gqa, cli_run, capsys, monkeypatch):
    """--alpaca --input and --chat --system build the prompts written out literally here (Stanford's
    template; Meta's <<SYS>> folding), and the greedy answer is HF's for those ids."""
    _, model, _ = gqa
    tok = lj.Tokenizer(TOKENIZER)

    def hf_text(prompt):
        return tok.decode(hf_greedy(model, tok.encode(prompt, bos=True), NEW, eos_id=tok.eos_id))

    out, _ = cli_run(capsys, monkeypatch, "--temperature", "0", "--alpaca", "--prompt", "Add the numbers.",
                     "--input", "2+3")
    assert out == hf_text(STANFORD_WITH_INPUT) + "\n"
    out, _ = cli_run(capsys, monkeypatch, "--temperature", "0", "--chat", "--system", "Be terse.", "--prompt", "Hello")
    assert out == hf_text("[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nHello [/INST]") + "\n"


def test_cli_top_k_and_seed(gqa, cli_run, capsys, monkeypatch):
    """--top-k 1 at temperature 1.5 is greedy (only the argmax is left: HF's greedy text); --seed picks
    the draw: the same seed gives the same text, another seed another text."""
    _, model, _ = gqa
    tok = lj.Tokenizer(TOKENIZER)
    prompt = "Once upon a time"
    greedy = tok.decode(hf_greedy(model, tok.encode(prompt, bos=True), NEW, eos_id=tok.eos_id))
    out, _ = cli_run(capsys, monkeypatch, "--temperature", "1.5", "--top-k", "1", "--prompt", prompt)
    assert out == greedy + "\n"
    hot = ("--temperature", "1.5", "--top-p", "1.0", "--prompt", prompt)
    seeded = [cli_run(capsys, monkeypatch, *hot, "--seed", seed)[0] for seed in ("1", "1", "2")]
    assert seeded[0] == seeded[1] != seeded[2] and seeded[0] != greedy + "\n"


def test_cli_tensor_parallel_dtype_and_generator_mesh(gqa, cli_run, capsys, monkeypatch):
    """--tensor-parallel 2 places the params on a (data 1, fsdp 1, tensor 2) mesh (specs written out
    by hand) and decodes HF's greedy text; Generator(mesh=) from (cfg, params) does the same. --dtype
    bfloat16 loads bfloat16 params: float32 compute on bf16-rounded weights, i.e. HF's greedy text of the
    model with its weights rounded to bfloat16."""
    from jax.sharding import PartitionSpec as P

    cfg, model, params = gqa
    tok = lj.Tokenizer(TOKENIZER)
    prompt = "The capital of France is"
    ids = tok.encode(prompt, bos=True)
    greedy = tok.decode(hf_greedy(model, ids, NEW, eos_id=tok.eos_id))
    tensor2 = {("layers", "attention", "wq"): P(None, None, "tensor", None),
               ("layers", "attention", "wk"): P(None, None, "tensor", None),
               ("layers", "attention", "wo"): P(None, "tensor", None, None),
               ("layers", "feed_forward", "w1"): P(None, None, "tensor"),
               ("layers", "feed_forward", "w2"): P(None, "tensor", None),
               ("tok_embeddings",): P("tensor", None), ("output",): P(None, "tensor"), ("norm", "weight"): P(None)}

    def assert_tensor2(gen):
        for path, spec in tensor2.items():
            leaf = gen.params
            for key in path:
                leaf = leaf[key]
            assert leaf.sharding.spec == spec and len(leaf.sharding.device_set) == 2, path

    out, gen = cli_run(capsys, monkeypatch, "--temperature", "0", "--tensor-parallel", "2", "--prompt", prompt)
    assert out == greedy + "\n"
    assert_tensor2(gen)
    mesh_gen = lj.Generator((cfg, params), TOKENIZER, mesh=gen.mesh)
    assert_tensor2(mesh_gen)
    assert mesh_gen.complete(prompt, temperature=0, max_new_tokens=NEW) == greedy

    out, gen = cli_run(capsys, monkeypatch, "--temperature", "0", "--dtype", "bfloat16", "--prompt", prompt)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(gen.params))
    rounded = hf_model(cfg, seed=1, sharpen=4.0)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert out == tok.decode(hf_greedy(rounded, ids, NEW, eos_id=tok.eos_id)) + "\n"


def test_cli_and_generator_quantize_int8(gqa, cli_run, capsys, monkeypatch):
    """--quantize int8 (with --tensor-parallel 2: the int8 values split like the float weight, specs by
    hand) decodes HF's greedy text of the numpy int8-rounded model; Generator(quantize=) from
    (cfg, params) the same; a bad --quantize value is one line naming it, exit status 2."""
    from jax.sharding import PartitionSpec as P

    cfg, model, params = gqa
    tok = lj.Tokenizer(TOKENIZER)
    prompt = "The capital of France is"
    want = tok.decode(hf_greedy(hf_int8_rounded(model), tok.encode(prompt, bos=True), NEW, eos_id=tok.eos_id))
    out, gen = cli_run(capsys, monkeypatch, "--temperature", "0", "--quantize", "int8", "--tensor-parallel", "2",
                       "--prompt", prompt)
    assert out == want + "\n"
    wq, w2 = gen.params["layers"]["attention"]["wq"], gen.params["layers"]["feed_forward"]["w2"]
    assert (wq.values.dtype, wq.values.sharding.spec, wq.scale.shape) == (jnp.int8, P(None, None, "tensor", None),
                                                                          (cfg.n_layers, 1, cfg.n_heads, cfg.head_dim))
    assert (w2.values.sharding.spec, w2.scale.sharding.spec) == (P(None, "tensor", None), P(None, None, None))
    assert lj.Generator((cfg, params), tok, quantize="int8").complete(prompt, temperature=0, max_new_tokens=NEW) == want

    with pytest.raises(SystemExit) as e:
        cli_run(capsys, monkeypatch, "--quantize", "int4", "--prompt", prompt)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: --quantize 'int4' is not one of int8, nf4\n"
    with pytest.raises(ValueError, match="quantize 'fp8' is not one of int8, nf4"):
        lj.Generator((cfg, params), tok, quantize="fp8")
