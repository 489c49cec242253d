"""Stop strings: the incremental matcher against a brute-force reference (decode every prefix,
look for the stops), the engine's `stop` check (truncation, early exit), and the text level
against Hugging Face's `generate(stop_strings=..., tokenizer=...)` on the same tiny model
exported with export-hf (the token where HF stops must be ours; the text must end before the stop)."""

import numpy as np
import pytest
import torch
import transformers

import llama_jax as lj
from llama_jax.generate import StopMatcher
from llama_jax.generate.__main__ import main

TOKENIZER = "data/tokenizer.model"
NEW = 40
PROMPTS = ["Once upon a time", "日本語", "The large banana was"]


@pytest.fixture(scope="module")
def tok():
    return lj.Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def models(tiny_export):
    _, _, ckpt, hf_dir = tiny_export
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    gen = lj.Generator(ckpt, TOKENIZER)  # its params also drive lj.generate: one set of compiled programs
    return gen.cfg, gen.params, gen, hf, hf_tok, ckpt


# --- the matcher against brute force ---------------------------------------------------------------


def reference_stop(tok, tokens, stops):
    """(tokens kept, text) by decoding every prefix: the first prefix whose text holds a stop."""
    for n in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:n])
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return n, text[:min(found)]
    return None, tok.decode(tokens)


def token_sequences(tok, count=24, seed=0):
    """Encoded text with multi-byte characters (byte-fallback pieces), spliced with random ids
    (stray bytes that never complete a character)."""
    rng = np.random.default_rng(seed)
    texts = ["héllo 日本語 wörld — ünïcode ✓ ok", "The clear picture was blue.\n\nWhy? Nobody knows!",
             "x = {\"travel\": 18} // ☃ snow", "Answer: 42. Next:\nQ"]
    out = []
    for i in range(count):
        ids = tok.encode(texts[i % len(texts)], bos=False)
        noise = rng.integers(3, tok.vocab_size, int(rng.integers(0, 6))).tolist()
        cut = int(rng.integers(0, len(ids) + 1))
        out.append(ids[:cut] + noise + ids[cut:] if i % 3 else ids)
    return out


def test_matcher_equals_brute_force_reference(tok):
    rng = np.random.default_rng(1)
    checked = stopped = 0
    for tokens in token_sequences(tok):
        full = tok.decode(tokens)
        clean = [i for i in range(len(full)) if "\ufffd" not in full[i:i + 4]]
        stop_sets = [[]]  # no stop: the incremental text must equal decode()
        for _ in range(3):  # substrings of the text, so most of them stop (often across token boundaries)
            starts = rng.choice(clean, size=2) if clean else []
            stop_sets.append([full[s:s + int(rng.integers(1, 5))] for s in starts] + ["never appears"])
        for stops in stop_sets:
            want_kept, want_text = reference_stop(tok, tokens, stops)
            for chunk in (1, 3, len(tokens) or 1):
                m = StopMatcher(stops, tok.decode)
                shown, kept = "", None
                for end in range(chunk, len(tokens) + chunk, chunk):
                    kept = m.update(tokens[:end])
                    shown += m.take()
                    assert want_text.startswith(shown), (tokens, stops, shown)  # never a stop's text
                    if kept is not None:
                        break
                shown += m.finish()
                assert (kept, shown, m.text) == (want_kept, want_text, want_text), (tokens, stops, chunk)
                checked += 1
                stopped += kept is not None
    assert checked > 200 and stopped > 60  # the property was exercised with and without stops


def test_matcher_holds_back_a_possible_stop_and_rejects_bad_stops(tok):
    ids = tok.encode("one two three", bos=False)
    partial = next(n for n in range(1, len(ids) + 1) if tok.decode(ids[:n]).endswith("t"))  # "one t"
    for stops, shown in ((["two!", "tw"], "one "), (["two!"], "one two three")):
        m = StopMatcher(stops, tok.decode)
        assert m.update(ids[:partial]) is None and m.take() == "one "  # "t" may start a stop: held back
        kept = m.update(ids)
        assert m.take() + m.finish() == shown[4:] and m.text == shown
        assert kept == (None if len(stops) == 1 else len(tok.encode("one tw", bos=False)))
    for bad in ([""], [3], [None]):
        with pytest.raises((ValueError, TypeError)):
            StopMatcher(bad, tok.decode)
    with pytest.raises(TypeError, match="stop must be"):
        StopMatcher(42, tok.decode)


# --- the engine's stop check --------------------------------------------------------------------------


def test_engine_stop_check_truncates_and_exits_early(models):
    cfg, params, *_ = models
    prompts = [[1, 15, 300, 42], [1, 99], [1, 7, 7, 7, 7, 7, 7]]
    free = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None)
    ends = {0: 5, 1: 9, 2: 3}
    calls = []

    def stop(row, tokens):
        calls.append((row, len(tokens)))
        assert tokens == free[row][:len(tokens)]
        return ends[row] if len(tokens) >= ends[row] else None

    out = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, stop=stop, chunk=4)
    assert out == [free[i][:ends[i]] for i in range(3)]
    assert max(n for _, n in calls) <= 9 + 4  # all rows ended: the loop stopped long before NEW tokens
    streamed = list(lj.generate_stream(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, stop=stop, chunk=4))
    assert [sum((c[i] for c in streamed), []) for i in range(3)] == out
    _, logprobs = lj.generate(params, cfg, prompts, max_new_tokens=NEW, eos_id=None, stop=stop, logprobs=True)
    assert [len(lp) for lp in logprobs] == [5, 9, 3]
    with pytest.raises(ValueError, match="returned 99"):
        lj.generate(params, cfg, prompts, max_new_tokens=NEW, stop=lambda row, tokens: 99)


# --- text level against Hugging Face's stop_strings ----------------------------------------------------


def hf_new_tokens(hf, hf_tok, ids, stops):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                      max_new_tokens=NEW, stop_strings=stops, tokenizer=hf_tok, eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist()


def candidate_stops(tok, prompt_ids, new):
    """Stops cut from the greedy text: across a token boundary, ending inside a token, a non-ASCII
    character; none that could begin inside the prompt or in a run of U+FFFD."""
    pieces = [tok.decode(new[:n]) for n in range(len(new) + 1)]
    text, prompt_text = pieces[-1], tok.decode(prompt_ids)
    whole = tok.decode(prompt_ids + new)
    out = []
    for n in range(2, len(new) - 2):
        b = len(pieces[n])
        for stop in (text[b - 2:b + 2], text[b - 1:b + 1], text[b + 1:b + 4]):
            if len(stop) >= 2 and "\ufffd" not in stop and stop not in out and whole.find(stop) >= len(prompt_text):
                out.append(stop)
    out += [c for c in dict.fromkeys(text) if ord(c) > 127 and c != "\ufffd"][:2]
    return out[::3]


def test_stop_strings_stop_where_hf_stops(models, tok):
    cfg, params, gen, hf, hf_tok, _ = models
    compared = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        free = lj.generate(params, cfg, [ids], max_new_tokens=NEW, eos_id=tok.eos_id)[0]
        stops = candidate_stops(tok, ids, free)
        for stop in stops[:4]:
            want = hf_new_tokens(hf, hf_tok, ids, [stop])
            m = StopMatcher([stop], tok.decode)
            ours = lj.generate(params, cfg, [ids], max_new_tokens=NEW, eos_id=tok.eos_id,
                               stop=lambda _, t: m.update(t), chunk=3)[0]
            assert ours == want, (prompt, stop)  # the same token count: HF stops where we do
            text = tok.decode(want)
            assert gen.complete(prompt, stop=stop, temperature=0, max_new_tokens=NEW) == text[:text.index(stop)]
            compared += 1
        pair = stops[1:3]  # two stops: the first to complete wins
        want = tok.decode(hf_new_tokens(hf, hf_tok, ids, pair))
        cut = min(i for i in (want.find(s) for s in pair) if i >= 0)
        pieces = list(gen.stream(prompt, stop=pair, temperature=0, max_new_tokens=NEW))
        assert "".join(pieces) == want[:cut] == gen.complete([prompt], stop=pair, temperature=0,
                                                              max_new_tokens=NEW)[0]
    assert compared >= 8
    batch = gen.complete(PROMPTS, stop=["a", "T"], temperature=0, max_new_tokens=NEW)  # rows end at different steps
    assert batch == [gen.complete(p, stop=["a", "T"], temperature=0, max_new_tokens=NEW) for p in PROMPTS]
    assert gen.alpaca("List two colors.", stop="e", temperature=0, max_new_tokens=NEW) == \
        gen.complete(lj.format_alpaca("List two colors."), stop="e", temperature=0, max_new_tokens=NEW).strip()
    chat = gen.chat([{"role": "user", "content": "Hi"}], stop=["s"], temperature=0, max_new_tokens=NEW)
    assert "s" not in chat["content"]


def test_cli_stop_is_repeatable(models, capsys):
    *_, gen, _, _, ckpt = models
    main(["--checkpoint", ckpt, "--tokenizer", TOKENIZER, "--temperature", "0", "--max-new-tokens", str(NEW),
          "--prompt", PROMPTS[0], "--stop", "ua", "--stop", "hat"])
    assert capsys.readouterr().out == gen.complete(PROMPTS[0], stop=["ua", "hat"], temperature=0,
                                                   max_new_tokens=NEW) + "\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", ckpt, "--tokenizer", TOKENIZER, "--prompt", "x", "--stop", ""])
    assert exit_info.value.code == 2 and "non-empty" in capsys.readouterr().err
