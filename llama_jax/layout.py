"""The ONE table that maps our parameter names to Meta's and Hugging Face's, both directions.

Torch checkpoints store linear weights as (out, in); we store (in, ..., out) with separate head
axes. Meta rotates interleaved RoPE pairs and HF (and this model) half-split pairs, so Meta's
wq/wk rows are permuted per head on the way in and back on the way out. Every converter
(Meta -> ours, HF -> ours, ours -> HF) goes through `to_ours` / `from_ours` and `TABLE`; PEFT
adapter names (`peft_key`, `hf_module`) are the HF names of the same entries.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from llama_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # where it lives in our params pytree
    hf: str  # HF name; "{i}" is the layer index
    meta: str  # Meta name
    kind: str  # how torch (out, in) maps to ours: copy | transpose | heads_out | heads_in
    meta_split_dim: int | None  # axis Meta's model-parallel shards are concatenated on (None: replicated)
    rope_heads: str | None = None  # "n_heads" / "n_kv_heads": Meta rows need the RoPE permutation

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def n_in(self) -> int:
        """How many leading axes of our array are the matmul's input: (heads, head_dim) for wo, else one."""
        return 2 if self.kind == "heads_in" else 1

    @property
    def hf_module(self) -> str:
        """The HF Linear's short name (q_proj, ..., down_proj): PEFT's `target_modules` entries."""
        return self.hf.split(".")[-2]

    def peft_key(self, layer: int, matrix: str) -> str:
        """PEFT's saved name of LoRA matrix "A" or "B" of this entry's layer `layer`."""
        module = self.hf.format(i=layer).rsplit(".", 1)[0]
        return f"base_model.model.{module}.lora_{matrix}.weight"


TABLE: tuple[Entry, ...] = (
    Entry(("tok_embeddings",), "model.embed_tokens.weight", "tok_embeddings.weight", "copy", 1),
    Entry(("layers", "attention_norm", "weight"), "model.layers.{i}.input_layernorm.weight",
          "layers.{i}.attention_norm.weight", "copy", None),
    Entry(("layers", "attention", "wq"), "model.layers.{i}.self_attn.q_proj.weight",
          "layers.{i}.attention.wq.weight", "heads_out", 0, "n_heads"),
    Entry(("layers", "attention", "wk"), "model.layers.{i}.self_attn.k_proj.weight",
          "layers.{i}.attention.wk.weight", "heads_out", 0, "n_kv_heads"),
    Entry(("layers", "attention", "wv"), "model.layers.{i}.self_attn.v_proj.weight",
          "layers.{i}.attention.wv.weight", "heads_out", 0),
    Entry(("layers", "attention", "wo"), "model.layers.{i}.self_attn.o_proj.weight",
          "layers.{i}.attention.wo.weight", "heads_in", 1),
    Entry(("layers", "ffn_norm", "weight"), "model.layers.{i}.post_attention_layernorm.weight",
          "layers.{i}.ffn_norm.weight", "copy", None),
    Entry(("layers", "feed_forward", "w1"), "model.layers.{i}.mlp.gate_proj.weight",
          "layers.{i}.feed_forward.w1.weight", "transpose", 0),
    Entry(("layers", "feed_forward", "w3"), "model.layers.{i}.mlp.up_proj.weight",
          "layers.{i}.feed_forward.w3.weight", "transpose", 0),
    Entry(("layers", "feed_forward", "w2"), "model.layers.{i}.mlp.down_proj.weight",
          "layers.{i}.feed_forward.w2.weight", "transpose", 1),
    Entry(("norm", "weight"), "model.norm.weight", "norm.weight", "copy", None),
    Entry(("output",), "lm_head.weight", "output.weight", "transpose", 0),
)

def projection(name: str) -> Entry:
    """The entry of a projection matrix by our name (wq ... w3)."""
    for entry in TABLE:
        if entry.path[-1] == name and entry.path[0] == "layers":
            return entry
    raise KeyError(name)


META_IGNORED = ("rope.freqs",)  # an unused buffer in Meta's checkpoints
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older HF checkpoints saved per layer


def names(cfg: LlamaConfig, fmt: str) -> Iterator[tuple[Entry, int | None, str]]:
    """Every (entry, layer index or None, torch name) of a model in format "hf" or "meta" (no output
    projection when it is tied to the embedding)."""
    for entry in TABLE:
        if entry.path == ("output",) and cfg.tie_word_embeddings:
            continue
        template = getattr(entry, fmt)
        if entry.per_layer:
            for i in range(cfg.n_layers):
                yield entry, i, template.format(i=i)
        else:
            yield entry, None, template


def torch_shape(entry: Entry, cfg: LlamaConfig) -> tuple[int, ...]:
    """The full (unsharded) torch shape of one tensor (one layer's, for per-layer entries)."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.hidden_dim
    shapes = {
        ("tok_embeddings",): (cfg.vocab_size, d),
        ("output",): (cfg.vocab_size, d),
        ("norm", "weight"): (d,),
        ("layers", "attention_norm", "weight"): (d,),
        ("layers", "ffn_norm", "weight"): (d,),
        ("layers", "attention", "wq"): (cfg.n_heads * hd, d),
        ("layers", "attention", "wk"): (cfg.n_kv_heads * hd, d),
        ("layers", "attention", "wv"): (cfg.n_kv_heads * hd, d),
        ("layers", "attention", "wo"): (d, cfg.n_heads * hd),
        ("layers", "feed_forward", "w1"): (f, d),
        ("layers", "feed_forward", "w3"): (f, d),
        ("layers", "feed_forward", "w2"): (d, f),
    }
    return shapes[entry.path]


def meta_to_hf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Permute wq/wk rows from Meta's interleaved RoPE pairs to half-split pairs (per head)."""
    out_dim, in_dim = w.shape
    return w.reshape(heads, out_dim // heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `meta_to_hf_rows`."""
    out_dim, in_dim = w.shape
    return w.reshape(heads, 2, out_dim // heads // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def contiguous(a: np.ndarray) -> np.ndarray:
    """np.ascontiguousarray(a), fast for the views `to_ours`/`from_ours` return.

    Those are a contiguous torch matrix transposed (then split into head axes): `a` is `base`
    with its trailing axes moved to the front. numpy copies such a view element by element
    through cache misses (~0.1 GB/s for bfloat16); as a tiled 2-D transpose on 8-byte words
    (`transpose_2d`) it is ~10x faster and moves the same bits.
    """
    if a.flags.c_contiguous:
        return a
    for j in range(1, a.ndim):
        base = a.transpose(*range(j, a.ndim), *range(j))
        if base.flags.c_contiguous:
            rows, cols = int(np.prod(a.shape[j:])), int(np.prod(a.shape[:j]))
            return transpose_2d(base.reshape(rows, cols)).reshape(a.shape)
    return np.ascontiguousarray(a)


def transpose_2d(m: np.ndarray, out: np.ndarray | None = None, block: int = 64, tile: int = 64) -> np.ndarray:
    """m.T into `out` (a new C-contiguous array if None), for a C-contiguous 2-D `m` (bits unchanged).

    `out` may be a column or row block of a bigger array (its last axis contiguous), so Meta's
    model-parallel shards are transposed straight into their place in the merged tensor.
    Works on `block` columns of k-element groups at a time: step 1 transposes the groups as single
    8-byte words, `tile` rows at a time, into a small scratch (its rows padded so they do not all
    fall on the same cache sets); step 2 untangles each group's k elements into `out`. Unsigned-int
    views keep numpy on its plain copy loops (ml_dtypes' bfloat16 copies are slower).
    """
    rows, cols = m.shape
    out = np.empty((cols, rows), m.dtype) if out is None else out
    k = 8 // m.itemsize if m.itemsize in (1, 2, 4) and cols % (8 // m.itemsize) == 0 else 1
    if k == 1:
        out[...] = m.T
        return out
    plain = np.dtype(f"u{m.itemsize}")
    words, dst, n_words = m.view(np.uint64), out.view(plain), cols // k
    scratch = np.empty((min(block, n_words), rows + 8), np.uint64)[:, :rows]
    for c in range(0, n_words, block):
        b = min(block, n_words - c)
        step1 = scratch[:b]
        for i in range(0, rows, tile):
            step1[:, i:i + tile] = words[i:i + tile, c:c + b].T
        dst[c * k:(c + b) * k].reshape(b, k, rows)[...] = step1.view(plain).reshape(b, rows, k).transpose(0, 2, 1)
    return out


def to_ours(entry: Entry, w: np.ndarray, cfg: LlamaConfig, fmt: str = "hf") -> np.ndarray:
    """One full torch-layout tensor (HF or Meta) -> our layout (for one layer if per-layer)."""
    expected = torch_shape(entry, cfg)
    if tuple(w.shape) != expected:
        raise ValueError(f"{getattr(entry, fmt)}: shape {tuple(w.shape)} does not match the config's {expected}")
    if fmt == "meta" and entry.rope_heads:
        w = meta_to_hf_rows(w, getattr(cfg, entry.rope_heads))
    if entry.kind == "copy":
        return w
    if entry.kind == "transpose":
        return w.T
    if entry.kind == "heads_out":  # (heads*hd, dim) -> (dim, heads, hd)
        return w.T.reshape(cfg.dim, -1, cfg.head_dim)
    if entry.kind == "heads_in":  # (dim, heads*hd) -> (heads, hd, dim)
        return w.T.reshape(-1, cfg.head_dim, cfg.dim)
    raise AssertionError(entry.kind)


def from_ours(entry: Entry, w: np.ndarray, cfg: LlamaConfig, fmt: str = "hf") -> np.ndarray:
    """Inverse of `to_ours`: our layout -> full torch-layout tensor (HF or Meta)."""
    if entry.kind == "copy":
        out = w
    elif entry.kind == "transpose":
        out = w.T
    elif entry.kind == "heads_out":
        out = w.reshape(cfg.dim, -1).T
    elif entry.kind == "heads_in":
        out = w.reshape(-1, cfg.dim).T
    else:
        raise AssertionError(entry.kind)
    if fmt == "meta" and entry.rope_heads:
        out = hf_to_meta_rows(out, getattr(cfg, entry.rope_heads))
    return contiguous(out)


def params_from_state_dict(state_dict: dict, cfg: LlamaConfig, fmt: str = "hf", dtype=np.float32) -> dict:
    """Build our params pytree (numpy) from a complete in-memory state dict of numpy arrays.

    For small models and tests; big checkpoints stream through llama_jax.convert instead.
    """
    missing = [name for _, _, name in names(cfg, fmt) if name not in state_dict]
    if missing:
        raise KeyError(f"state dict is missing {len(missing)} tensors, e.g. {missing[:3]}")
    params: dict = {}
    for entry, layer, name in names(cfg, fmt):
        w = to_ours(entry, np.asarray(state_dict[name]), cfg, fmt).astype(dtype)
        node = params
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        if layer is None:
            node[entry.path[-1]] = w
        else:
            node.setdefault(entry.path[-1], [None] * cfg.n_layers)[layer] = w
    def stack(tree):
        return {k: (np.stack(v) if isinstance(v, list) else stack(v) if isinstance(v, dict) else v)
                for k, v in tree.items()}
    return stack(params)
