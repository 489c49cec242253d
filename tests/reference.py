"""Helpers that build tiny random Hugging Face Llama models: the reference for our numerics."""

from __future__ import annotations

import copy

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
    model = hf_llama(cfg, "float32", "eager")
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


def hf_greedy(model, prompt: list[int], n: int, eos_id: int | None = None) -> list[int]:
    """HF's greedy `generate`: up to n new tokens, cut before EOS (as Meta's and ours are)."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=0 if eos_id else n,
                         eos_token_id=eos_id, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos_id)] if eos_id in new else new
