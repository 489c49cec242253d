"""Helpers that build tiny random Hugging Face Llama models: the reference for our numerics."""

from __future__ import annotations

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


def hf_state_dict(model) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_params(model, cfg: LlamaConfig) -> dict:
    return params_from_state_dict(hf_state_dict(model), cfg, "hf")


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
