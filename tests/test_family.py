"""The Llama-family checkpoints users pick from the Hub, against transformers on tiny random models with
their configs: Llama-2 derivatives with linear RoPE scaling, CodeLlama (theta 1e6, 16k context), TinyLlama
(GQA 32/4, 22 layers), Llama 3.1 (GQA, theta 500000, llama3 scaling, tokenizer.json + chat template) and
Llama 3.2 (tied embeddings). Each: an HF folder written by transformers -> `python -m llama_jax.convert hf`
-> logits within 1e-5 (relative) and greedy tokens equal -> `export-hf` -> transformers reads the same RoPE
scaling back and gives the same logits.

Why 1e-5 separates right from wrong: the right conversion measures ~1e-7 here (float32 on both sides), and
each config's feature, dropped from transformers' own model, moves its logits by more than 1e-2 (asserted
below, so a config whose feature did not matter on these tokens could not pass silently).

Greedy decoding is argmax over our forward for every member (one compiled shape), and also runs through
our KV-cache engine for Llama 3.2 (`lj.generate`: scaled RoPE at cache positions, the tied output) and
Llama 3.1 (`Generator.chat`); each engine compile costs ~10 s on the shared 2-core machine. Llama 3.1's
end tokens (generation_config.json lists three) stop every entry point where transformers' generate stops.
"""

import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import llama_jax as lj
from llama_jax.convert import __main__ as convert_cli
from llama_jax.model import rope_frequencies
from reference import LLAMA3_CHAT_TEMPLATE, LLAMA3_ENDS, hf_greedy, hf_logits, hf_model_of, llama3_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
L3_VOCAB = 428  # reference.llama3_tokenizer: 420 BPE pieces + 8 special tokens
SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-5)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)  # 64: with head_dim 16 a frequency falls in each of the 3 bands
# transformers LlamaConfig keywords as those checkpoints' config.json spell them, at tiny sizes; then what
# dropping the config's feature means (it must change the logits).
FAMILY = {
    "llama2-linear": (dict(SMALL, vocab_size=512, max_position_embeddings=512, rope_theta=10000.0,
                           rope_scaling={"type": "linear", "factor": 4.0}), dict(rope_scaling=None)),
    "codellama": (dict(SMALL, vocab_size=512, max_position_embeddings=16384, rope_theta=1e6),
                  dict(rope_theta=10000.0)),
    "tinyllama": (dict(hidden_size=128, intermediate_size=352, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=512, max_position_embeddings=2048),
                  None),  # GQA 32/4 over 22 layers: nothing to drop, the layout is the test
    "llama3.1": (dict(SMALL, intermediate_size=192, num_key_value_heads=2, vocab_size=L3_VOCAB,
                      max_position_embeddings=512, rope_theta=500000.0, rope_scaling=LLAMA3),
                 dict(rope_scaling=None)),
    "llama3.2-tied": (dict(SMALL, num_key_value_heads=1, vocab_size=L3_VOCAB, max_position_embeddings=512,
                           rope_theta=500000.0, rope_scaling=dict(LLAMA3, factor=32.0), tie_word_embeddings=True),
                      dict(rope_scaling=None)),
}
PROMPT = [5, 77, 300, 12, 9, 401, 250, 33, 64, 128, 7, 19, 200, 311, 45, 99, 3, 210, 150, 60, 8, 350, 17, 281]
NEW = 8
ENGINE = ("llama3.2-tied",)  # greedy through lj.generate too (llama3.1: through Generator.chat)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=sorted(FAMILY))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, our converted checkpoint) of one family member."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = hf_model_of(FAMILY[name][0], seed=3, sharpen=4.0)
    src = str(root / "hf")
    model.save_pretrained(src)  # safetensors + config.json as transformers writes them
    if name.startswith("llama3"):
        llama3_tokenizer(src)
    else:
        shutil.copyfile(SP_TOKENIZER, os.path.join(src, "tokenizer.model"))
    out = str(root / "ckpt")
    convert_cli.main(["hf", src, out, "--no-progress"])
    return name, model, src, out


def test_rope_frequencies_equal_transformers():
    """Our float32 frequencies against transformers' own (ROPE_INIT_FUNCTIONS) for every scaling type, real
    Llama 3.1/3.2 settings included: at most 1 ulp apart (only pow may round differently, see
    rope_frequencies); a formula slip (llama3's band edges, positions instead of frequencies scaled...)
    moves them by far more."""
    for name in ("llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "codellama-7b", "tinyllama-1.1b"):
        cfg = lj.LlamaConfig.preset(name)
        hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
        rope_type = hf.rope_parameters["rope_type"]
        if rope_type == "default":
            dim = cfg.head_dim
            expected = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        else:
            expected = ROPE_INIT_FUNCTIONS[rope_type](hf)[0]
        ours = rope_frequencies(cfg)
        assert ours.dtype == np.float32
        np.testing.assert_array_max_ulp(ours, expected.numpy(), maxulp=1)
    for name, (config, _) in FAMILY.items():
        hf = transformers.LlamaConfig(**config)
        if hf.rope_parameters["rope_type"] != "default":
            ours = rope_frequencies(lj.LlamaConfig.from_hf_config(hf.to_dict()))
            np.testing.assert_array_max_ulp(ours, ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf)[0].numpy(),
                                            maxulp=1)


def test_logits_and_greedy_tokens_equal_transformers(family):
    name, model, _, out = family
    cfg, params = lj.load_checkpoint(out, dtype="float32")
    assert cfg == lj.LlamaConfig.from_hf_config(model.config.to_dict()).replace(param_dtype="float32")
    expected = hf_greedy(model, PROMPT, NEW)
    if name in ENGINE:
        assert lj.generate(params, cfg, [PROMPT], max_new_tokens=NEW, temperature=0.0, eos_id=None)[0] == expected
    tokens = np.zeros((1, len(PROMPT) + NEW), np.int32)  # causal: the zeros after position t do not change it
    tokens[0, :len(PROMPT)] = PROMPT
    for t in range(len(PROMPT), tokens.shape[1]):
        tokens[0, t] = int(np.argmax(np.asarray(lj.forward(params, tokens, cfg))[0, t - 1]))
    assert tokens[0, len(PROMPT):].tolist() == expected
    reference = hf_logits(model, tokens)
    assert rel_err(lj.forward(params, tokens, cfg), reference) <= 1e-5
    dropped = FAMILY[name][1]
    if dropped is not None:  # the feature matters on these tokens: transformers without it is far off
        without = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**FAMILY[name][0], **dropped}))
        without.load_state_dict(model.state_dict())
        assert rel_err(hf_logits(without.eval(), tokens), reference) > 1e-2


def test_export_hf_writes_the_rope_scaling_back(family, tmp_path):
    name, model, _, out = family
    back = str(tmp_path / "back")
    convert_cli.main(["export-hf", out, back, "--no-progress"])
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back, dtype=torch.float32, attn_implementation="eager")
    rope = {k: v for k, v in model.config.rope_parameters.items() if k != "type"}  # "type": 4.x's spelling
    assert reloaded.config.rope_parameters == rope
    for key in ("tie_word_embeddings", "num_key_value_heads", "max_position_embeddings"):
        assert getattr(reloaded.config, key) == getattr(model.config, key), key
    tokens = np.asarray([PROMPT[:12]])
    assert rel_err(hf_logits(reloaded, tokens), hf_logits(model, tokens)) <= 1e-5
    if name.startswith("llama3"):  # tokenizer.json travels with its side files; config.json has its BOS/EOS ids
        tok = transformers.AutoTokenizer.from_pretrained(back)
        assert (reloaded.config.bos_token_id, reloaded.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
        assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|eot_id|>"


def test_llama3_chat_from_the_converted_checkpoint_equals_transformers(tmp_path_factory):
    """--chat on a Llama 3 checkpoint: the converted folder carries tokenizer.json, the prompt is Llama 3's chat
    template (transformers' apply_chat_template) and the greedy answer is transformers' greedy continuation of
    it up to <|eot_id|>."""
    root = tmp_path_factory.mktemp("llama3_chat")
    model = hf_model_of(FAMILY["llama3.1"][0], seed=4, sharpen=4.0)
    src, out = str(root / "hf"), str(root / "ckpt")
    model.save_pretrained(src)
    llama3_tokenizer(src)
    convert_cli.main(["hf", src, out, "--no-progress"])
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, file)), file
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you today?"}]
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    assert theirs.chat_template == LLAMA3_CHAT_TEMPLATE
    prompt = theirs.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)["input_ids"]
    generator = lj.Generator(out)
    assert generator.prompt_ids(dialog[1]["content"], "chat", history=dialog[:1]) == prompt
    answer = generator.chat(dialog, temperature=0.0, max_new_tokens=NEW)["content"]
    expected = hf_greedy(model, prompt, NEW, eos_id=transformers.GenerationConfig.from_pretrained(src).eos_token_id)
    assert answer == theirs.decode(expected, skip_special_tokens=True)


TEXT = "The quick brown fox jumps over the lazy dog. Hello world! How are you today?"  # 23 ids: chat's bucket


@pytest.fixture(scope="module")
def llama31_ends(tmp_path_factory):
    """A tiny Llama 3.1 whose greedy continuation of TEXT says <|eom_id|> (the second of the three end
    tokens generation_config.json lists, not the tokenizer's EOS <|eot_id|>) at step k >= 2, saved by
    transformers and converted. Built from a random model's free continuation: the token it gives at
    step k is swapped with <|eom_id|> in the embedding and output rows (the same model under relabelled
    ids), so the relabelled model says <|eom_id|> there. Returns (HF folder, checkpoint, prompt ids, k)."""
    root = tmp_path_factory.mktemp("llama31_ends")
    src, out = str(root / "hf"), str(root / "ckpt")
    llama3_tokenizer(src)
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    ends = [theirs.convert_tokens_to_ids(t) for t in LLAMA3_ENDS]
    eom = ends[1]
    model = hf_model_of(FAMILY["llama3.1"][0], seed=4, sharpen=4.0)
    prompt = theirs(TEXT)["input_ids"]
    free = hf_greedy(model, prompt, NEW)
    k = next(k for k in range(2, NEW) if free[k] not in free[:k] + prompt + ends)
    with torch.no_grad():
        for w in (model.model.embed_tokens.weight, model.lm_head.weight):
            w[[free[k], eom]] = w[[eom, free[k]]]
    model.generation_config = transformers.GenerationConfig.from_pretrained(src)  # written back by save_pretrained
    model.save_pretrained(src)
    convert_cli.main(["hf", src, out, "--no-progress"])
    return src, out, prompt, k, free


def test_llama31_end_tokens_stop_every_entry_point_as_transformers(llama31_ends):
    """transformers' greedy `generate` of the saved folder (its generation_config.json: three eos ids)
    stops at <|eom_id|>; so do lj.generate with the converted checkpoint's Tokenizer.eos_ids, Generator,
    the generate CLI, the server (through the official openai client) and the lm-eval harness LM, all
    reading the end tokens from the checkpoint without a flag. The tokenizer's single EOS would run on.
    (Not capsys: uvicorn's log handler would keep its stream, closed after the test.)"""
    import contextlib
    import io

    import openai
    from lm_eval.api.instance import Instance

    from llama_jax.eval.harness import LlamaJaxLM
    from llama_jax.generate.__main__ import main as generate_cli
    from llama_jax.serve import running
    from llama_jax.serve.__main__ import _build, _parse

    src, out, prompt, k, free = llama31_ends
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    ends = reloaded.generation_config.eos_token_id
    expected = hf_greedy(reloaded, prompt, NEW, eos_id=ends)
    assert expected == free[:k] and ends[1] == theirs.convert_tokens_to_ids("<|eom_id|>") != theirs.eos_token_id
    answer = theirs.decode(expected, skip_special_tokens=True)

    tok = lj.Tokenizer(out)
    assert tok.eos_id == theirs.eos_token_id and sorted(tok.eos_ids) == sorted(ends)
    # converted with a tokenizer from elsewhere (no generation_config.json): the model folder's is stored
    bare, again = os.path.join(os.path.dirname(out), "bare"), os.path.join(os.path.dirname(out), "again")
    os.makedirs(bare)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, file), bare)
    assert lj.Tokenizer(bare).eos_ids == (tok.eos_id,)
    convert_cli.main(["hf", src, again, "--tokenizer", bare, "--no-progress"])
    assert lj.Tokenizer(again).eos_ids == tok.eos_ids
    cfg, params = lj.load_checkpoint(out)
    assert tok.encode(TEXT) == prompt
    assert lj.generate(params, cfg, [prompt], max_new_tokens=NEW, eos_id=tok.eos_ids)[0] == expected
    assert len(lj.generate(params, cfg, [prompt], max_new_tokens=NEW, eos_id=tok.eos_id)[0]) > k  # runs past it

    assert lj.Generator(out).complete(TEXT, temperature=0.0, max_new_tokens=NEW) == answer
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate_cli(["--checkpoint", out, "--prompt", TEXT, "--temperature", "0", "--max-new-tokens", str(NEW)])
    assert printed.getvalue() == answer + "\n"

    app, sock, _ = _build(_parse(["--checkpoint", out, "--no-warmup", "--port", "0", "--max-batch", "1"]))
    sock.close()
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model="ckpt", prompt=TEXT, max_tokens=NEW, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (answer, "stop", k)

    lm = LlamaJaxLM(out, max_gen_toks=NEW)
    request = Instance("generate_until", {}, (TEXT, {"until": ["\n\n\n"], "do_sample": False}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == [answer]
