"""Reference implementations a conversion is checked against: Meta's forward in numpy (on Meta-layout
weights) and Hugging Face transformers' LlamaForCausalLM; `verify` compares them with the result."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from llama_jax import layout
from llama_jax.checkpoint import load_checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.convert.sources import MetaSource
from llama_jax.convert.torch_io import to_numpy
from llama_jax.model import forward


def meta_reference_logits(weights: Callable[[str], np.ndarray], cfg: LlamaConfig, tokens: np.ndarray) -> np.ndarray:
    """Meta's llama/model.py forward in numpy float32, on Meta-layout weights (interleaved RoPE).

    Independent of our model and of the RoPE permutation, so it checks the conversion end to end.
    """
    t, hd = tokens.shape[1], cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2)[: hd // 2] / hd)
    rot = np.exp(1j * np.outer(np.arange(t), freqs))  # (T, hd/2)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    def rotate(x):  # (B, T, heads, hd): rotate interleaved pairs as complex numbers
        c = x.reshape(*x.shape[:-1], hd // 2, 2)
        c = (c[..., 0] + 1j * c[..., 1]) * rot[None, :, None]
        return np.stack([c.real, c.imag], -1).reshape(x.shape)

    x = weights("tok_embeddings.weight")[tokens]
    b = x.shape[0]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg.n_layers):
        w = lambda n: weights(f"layers.{i}.{n}")  # noqa: E731
        h = norm(x, w("attention_norm.weight"))
        q = rotate((h @ w("attention.wq.weight").T).reshape(b, t, cfg.n_heads, hd))
        k = rotate((h @ w("attention.wk.weight").T).reshape(b, t, cfg.n_kv_heads, hd))
        v = (h @ w("attention.wv.weight").T).reshape(b, t, cfg.n_kv_heads, hd)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # repeat_kv: interleaved
        scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, -1)
        x = x + out @ w("attention.wo.weight").T
        h = norm(x, w("ffn_norm.weight"))
        a, g = h @ w("feed_forward.w1.weight").T, h @ w("feed_forward.w3.weight").T
        x = x + (a / (1 + np.exp(-a)) * g) @ w("feed_forward.w2.weight").T
    return norm(x, weights("norm.weight")) @ weights("output.weight").T


def _our_logits(out: str, tokens: np.ndarray, n_layers: int) -> np.ndarray:
    cfg, params = load_checkpoint(out, dtype="float32")
    if n_layers < cfg.n_layers:
        params = {**params, "layers": jax.tree.map(lambda a: a[:n_layers], params["layers"])}
        cfg = cfg.replace(n_layers=n_layers)
    return np.asarray(forward(params, tokens, cfg))


def hf_llama(cfg: LlamaConfig, dtype: str = "float32", attn: str = "eager", device: str = "cpu") -> Any:
    """A randomly initialised transformers LlamaForCausalLM of the same architecture, built on
    `device` in `dtype`: the reference model of the tests and the PyTorch peer of the benchmarks."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items()
                                         if k not in ("architectures", "torch_dtype", "model_type")})
    hf_cfg._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _hf_logits(folder: str, tokens: np.ndarray, n_layers: int, progress: bool = True) -> np.ndarray:
    import torch
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, num_hidden_layers=n_layers,
                                                          attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(torch.as_tensor(tokens)).logits.float().numpy()


def verify(kind: str, src: str, out: str, cfg: LlamaConfig, layers: int | None = None,
           source: MetaSource | None = None, progress: bool = True) -> float:
    """Run 8 tokens through the source weights and the result; print and return the max logit diff.

    `layers` limits both models to their first N layers, so big models verify in little memory.
    """
    n = cfg.n_layers if layers is None else max(1, min(layers, cfg.n_layers))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8)).astype(np.int32)
    if kind == "meta":
        entries = {name: entry for entry, _, name in layout.names(cfg, "meta")}

        def weights(name: str) -> np.ndarray:
            return to_numpy(source.get(entries[name], name)).astype(np.float32)

        reference = meta_reference_logits(weights, cfg.replace(n_layers=n), tokens)
        result = _our_logits(out, tokens, n)
    elif kind == "hf":
        reference, result = _hf_logits(src, tokens, n, progress), _our_logits(out, tokens, n)
    else:  # export-hf: src is our checkpoint, out the HF folder
        reference, result = _our_logits(src, tokens, n), _hf_logits(out, tokens, n, progress)
    diff = float(np.max(np.abs(reference - result)))
    scale = float(np.max(np.abs(reference)))
    print(f"verify ({n} of {cfg.n_layers} layers, 8 tokens): max |logit diff| = {diff:.3g} "
          f"(relative {diff / max(scale, 1e-30):.3g})")
    return diff
