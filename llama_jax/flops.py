"""The ONE place for FLOP and byte formulas of a Llama model: MFU, the planner and the benchmarks use these.

Conventions: a multiply-add is 2 FLOPs; the input embedding is a lookup (0 FLOPs); with a causal
mask a token attends to half of a `context`-long window on average, so attention costs
2 x layers x (heads x head_dim) x context per token forward (QK^T and PV, halved).
"""

from __future__ import annotations

from typing import Any


def matmul_params(cfg: Any) -> int:
    """Parameters a token's forward multiplies by: all but the input embedding (norms included, as MFU counts);
    a tied embedding is the output projection too, so it counts."""
    return cfg.num_params() - (0 if getattr(cfg, "tie_word_embeddings", False) else cfg.vocab_size * cfg.dim)


def attention_flops_per_token(cfg: Any, context: int) -> float:
    """Forward attention FLOPs of one token over a causal window of `context` tokens (half the square)."""
    return 2.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def forward_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs per token: 2 x matmul params + causal attention over `context`."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, context)


def lora_params(cfg: Any) -> int:
    """Parameters of the LoRA adapters (A and B of every target, every layer); 0 without LoRA."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    in_out = {"wq": d + q, "wk": d + kv, "wv": d + kv, "wo": q + d, "w1": d + f, "w3": d + f, "w2": f + d}
    rank = getattr(cfg, "lora_rank", 0)
    return cfg.n_layers * rank * sum(in_out[t] for t in cfg.lora_targets) if rank else 0


def train_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token for MFU: 3 x forward (backward is twice the forward); no remat counted.

    = 6 x (params - input embedding) + 6 x layers x heads x head_dim x seq_len. LoRA (frozen
    weights get no weight gradient): 4 x (params - input embedding) + 6 x the adapters + 6 x the
    attention term.
    """
    if getattr(cfg, "lora_rank", 0):
        return 4.0 * matmul_params(cfg) + 6.0 * lora_params(cfg) + 3.0 * attention_flops_per_token(cfg, seq_len)
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def prefill_flops(cfg: Any, prompt_len: int) -> float:
    """A prompt's forward with logits for its last token only (time to first token)."""
    body = matmul_params(cfg) - cfg.vocab_size * cfg.dim  # the output projection runs once, not per token
    return (2.0 * body + attention_flops_per_token(cfg, prompt_len)) * prompt_len + 2.0 * cfg.dim * cfg.vocab_size


def compiled_train_step_flops(cfg: Any, batch: int, seq: int) -> float:
    """A training step's matmul FLOPs as XLA counts them: the full (unmasked) score square, backward
    twice the forward (LoRA: once for the frozen weights, which get no weight gradient), and remat
    "full" recomputing each layer's forward once more; LoRA adds its adapters' matmuls (3 passes + remat)."""
    d, hd, h, kv, f = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    weights, scores = 2 * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * f), 4 * seq * h * hd
    remat = 1 if cfg.remat == "full" else 0
    weight_passes = 2 if getattr(cfg, "lora_rank", 0) else 3
    per_token = (cfg.n_layers * (weights * (weight_passes + remat) + scores * (3 + remat))
                 + 2 * lora_params(cfg) * (3 + remat))
    return float(batch * seq * (per_token + weight_passes * 2 * d * cfg.vocab_size))


def kv_cache_bytes(cfg: Any, batch: int, slots: int, itemsize: int) -> int:
    """Bytes of a K and V cache of `slots` positions (kv heads, not query heads)."""
    return 2 * cfg.n_layers * batch * slots * cfg.n_kv_heads * cfg.head_dim * itemsize


def mfu(tokens_per_s: float, cfg: Any, seq_len: int, n_chips: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: training FLOP/s achieved over n_chips x peak (FLOP/s per chip); None without a peak."""
    if not peak_flops:
        return None
    return tokens_per_s * train_flops_per_token(cfg, seq_len) / (n_chips * peak_flops)
