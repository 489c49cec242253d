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
from reference import hf_model, hf_params
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


def hf_greedy(model, prompt, n, eos_id=None):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=0 if eos_id else n,
                         eos_token_id=eos_id, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos_id)] if eos_id in new else new  # ours stops before EOS, like Meta's


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
