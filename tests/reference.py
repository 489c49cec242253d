"""Helpers that build tiny random Hugging Face Llama models and a tiny Llama-3-style tokenizer.json:
the references for our numerics and token ids."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
import transformers

from llama_jax.config import LlamaConfig
from llama_jax.convert import hf_llama
from llama_jax.layout import params_from_state_dict


def hf_model(cfg: LlamaConfig, seed: int = 0, sharpen: float = 1.0) -> transformers.LlamaForCausalLM:
    """A random float32 HF LlamaForCausalLM with our config, non-unit norm weights.

    `sharpen` scales the output projection so greedy decoding has no near-ties.
    """
    torch.manual_seed(seed)
    return _randomize(hf_llama(cfg, "float32", "eager"), sharpen)


def hf_model_of(config: dict, seed: int = 0, sharpen: float = 1.0) -> transformers.LlamaForCausalLM:
    """Like `hf_model`, from a transformers LlamaConfig's keywords written by hand (not from our config),
    so our reading of config.json is checked too."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**config)
    hf_cfg._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = transformers.LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    return _randomize(model.eval(), sharpen)


def _randomize(model, sharpen: float):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # non-unit norms catch a missed weight
            else:
                p.copy_(0.08 * torch.randn_like(p))
        model.lm_head.weight.mul_(sharpen)
    return model


HF_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_int8_rounded(model) -> transformers.LlamaForCausalLM:
    """A copy of `model` whose seven projections hold their int8 round trip, written in numpy on HF's
    (out, in) layout: per output row s = max|w| / 127, w -> clip(round(w / s), -127, 127) * s."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.split(".")[-2] in HF_PROJECTIONS:
                w = p.detach().numpy()
                s = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
                p.copy_(torch.from_numpy(np.clip(np.round(w / s), -127, 127) * s))
    return rounded


def hf_state_dict(model) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_params(model, cfg: LlamaConfig) -> dict:
    return params_from_state_dict(hf_state_dict(model), cfg, "hf")


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int, eos_id: int | list[int] | None = None) -> list[int]:
    """HF's greedy `generate`: up to n new tokens, cut before the end token (one id, or a list: it stops
    at any of them), as Meta's and ours are."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=0 if eos_id else n,
                         eos_token_id=eos_id, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    new = out[0, len(prompt):].tolist()
    ends = [eos_id] if isinstance(eos_id, int) else eos_id or []
    return next((new[:i] for i, t in enumerate(new) if t in ends), new)


# --- a tiny Llama-3-style tokenizer.json (byte-level BPE, Llama 3's split regex and special tokens) -------

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|reserved_special_token_2|>", "<|eot_id|>"]
LLAMA3_ENDS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # Llama-3.1-8B-Instruct's generation_config.json
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, character for character.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! How are you today?",
          "Add 3 and 5. The answer is 8. 12345 + 678 = 13023", "def f(x):\n    return {\"a\": x % 7}\n",
          "Café, naïve, déjà vu, 日本語のテキスト, Ελληνικά, русский", "I'm sure they'll say we've done it, didn't we?",
          "user assistant system You are a helpful assistant. Reply politely and be brief."]


def llama3_tokenizer(folder: str, vocab: int = 420, eos: str | None = "<|eot_id|>") -> str:
    """Write a tiny Llama-3-layout tokenizer (tokenizer.json trained here with the `tokenizers` library,
    tokenizer_config.json with Llama 3's BOS/EOS and chat template, generation_config.json listing Llama
    3.1 Instruct's end tokens [<|end_of_text|>, <|eom_id|>, <|eot_id|>]) into `folder`; `vocab` BPE pieces
    then the 8 special tokens. `eos=None`: the config names no eos_token (generation_config.json's first
    eos_token_id then decides)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([  # as Llama 3's: BOS added by add_special_tokens=True
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast",
              "chat_template": LLAMA3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}
    if eos is not None:
        config["eos_token"] = eos
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": [tok.token_to_id(t) for t in LLAMA3_ENDS]}, f)
    return folder
