"""Model configuration: the LLaMA / Llama 2 / Llama-family presets and conversions to and from Meta/HF configs.

`LlamaConfig` is a frozen (hashable) dataclass so it can be a static argument of `jax.jit`.
Architecture fields come first (RoPE scaling as a frozen `RopeScaling`: transformers' `linear` and
`llama3` types, computed in llama_jax/model.py's `rope_frequencies`); the last few fields (`dtype`, `param_dtype`, `remat`,
`scan_layers`, `attention`) choose how the same architecture runs, not what it computes; the
`lora_*` fields add low-rank adapters to some projections (llama_jax/lora.py; rank 0 = none).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the matrices LoRA can adapt and quant.py quantises
RUN_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention")  # how it runs, not what it computes


def _whole(config: dict, key: str, default: Any = None) -> Any:
    """config[key] as an int; a fraction, string or non-finite number is refused, never truncated."""
    value = config.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    return int(value)


def _real(config: dict, key: str) -> float:
    """config[key] as a float; anything but a number is refused, naming the key."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width rule: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


ROPE_SCALINGS = ("linear", "llama3")  # transformers' rope_type names; "default" is no scaling (None)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are stretched for a longer context, with transformers' names and meaning.

    linear (Llama-2 derivatives, "position interpolation"): every frequency divided by `factor`.
    llama3 (Llama 3.1+): wavelengths above original_max_position_embeddings / low_freq_factor are
    divided by `factor`, those below original_max_position_embeddings / high_freq_factor kept, and
    the ones between blended smoothly.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only: the context it was pre-trained with

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"RoPE scaling {self.rope_type!r}: {message}")

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(self.rope_type in ROPE_SCALINGS, f"not supported (supported: default, {', '.join(ROPE_SCALINGS)}; "
                                              "not dynamic, yarn, longrope, ...)")
        need(number(self.factor) and self.factor > 0, f"factor must be a number > 0, got {self.factor!r}")
        object.__setattr__(self, "factor", float(self.factor))  # JSON's 8 and 8.0: one config, one hash
        llama3 = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if self.rope_type == "linear":
            extra = [name for name in llama3 if getattr(self, name) is not None]
            need(not extra, f"takes only a factor, got {extra}")
            return
        for name in llama3:
            need(number(getattr(self, name)) and getattr(self, name) > 0,
                 f"needs {name} (a number > 0), got {getattr(self, name)!r}")
        need(float(self.original_max_position_embeddings).is_integer(),
             f"original_max_position_embeddings must be a whole number, got {self.original_max_position_embeddings!r}")
        object.__setattr__(self, "original_max_position_embeddings", int(self.original_max_position_embeddings))
        object.__setattr__(self, "low_freq_factor", float(self.low_freq_factor))
        object.__setattr__(self, "high_freq_factor", float(self.high_freq_factor))
        need(self.low_freq_factor < self.high_freq_factor,
             f"low_freq_factor {self.low_freq_factor} must be below high_freq_factor {self.high_freq_factor}")

    @classmethod
    def from_hf(cls, rope: dict) -> "RopeScaling | None":
        """From a config.json rope_scaling / rope_parameters object; None for plain RoPE ("default")."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"RoPE scaling {rope_type!r}: partial_rotary_factor {rope['partial_rotary_factor']!r} "
                             "is not supported (LLaMA rotates the whole head)")
        if rope_type == "default":
            return None
        keys = ("factor",) if rope_type == "linear" else tuple(f.name for f in dataclasses.fields(cls)[1:])
        return cls(rope_type, **{key: rope.get(key) for key in keys})

    def to_hf(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family architecture and how to run it: frozen and hashable (jit takes it as a static
    argument); `preset(name)` gives the published shapes, and every field can be overridden."""

    vocab_size: int = 32000  # tokenizer pieces = embedding and output rows
    dim: int = 4096  # model width (embedding size)
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads; head_dim = dim / n_heads
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    multiple_of: int = 256  # the FFN size is rounded up to a multiple of this (Meta's rule)
    ffn_dim_multiplier: float | None = None  # scales Meta's FFN size before rounding (70B: 1.3)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (CodeLlama 1e6, Llama 3 5e5)
    max_seq_len: int = 4096  # the context: longest tokens + generated sequence
    hidden_dim: int | None = None  # None: Meta's rule from dim/multiple_of/ffn_dim_multiplier
    rope_scaling: RopeScaling | None = None  # None: plain RoPE (a dict is read as RopeScaling(**dict))
    tie_word_embeddings: bool = False  # True: the output projection is tok_embeddings' transpose (Llama 3.2 1B/3B)
    # How to run it (does not change the numbers beyond dtype rounding):
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "none"  # none | full | save_dots: what the backward pass recomputes
    scan_layers: bool = True  # False unrolls the layer loop (same params, longer compile)
    attention: str = "xla"  # xla (everywhere) | cudnn (NVIDIA GPUs) | splash (TPUs)
    # LoRA: y = x W + (lora_alpha / lora_rank) * dropout(x) A B on each of lora_targets (rank 0: no adapters).
    lora_rank: int = 0  # adapter rank; 0 = no adapters
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # applied only when the caller passes a "dropout" RNG (training)
    lora_targets: tuple = PROJECTIONS  # which of wq wk wv wo w1 w2 w3 get adapters

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives a list; jit needs hashable
        if isinstance(self.rope_scaling, dict):  # config.json and YAML give a mapping
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as e:
                raise ValueError(f"LlamaConfig: rope_scaling {self.rope_scaling!r}: {e}") from None
        self._check_numbers()
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.hidden_dim is None:
            object.__setattr__(
                self, "hidden_dim", meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            )
        self._validate()

    def _check_numbers(self) -> None:
        """Types and ranges of the numeric fields, before anything is computed from them."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if not (value is None and name in ("n_kv_heads", "hidden_dim")) and not (
                    isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31):
                raise ValueError(f"LlamaConfig: {name} must be a positive int (below 2**31), got {value!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if not (value is None and name == "ffn_dim_multiplier") and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise ValueError(f"LlamaConfig: {name} must be a finite number > 0, got {value!r}")

    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"LlamaConfig: {message}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(self.dim % self.n_heads == 0, f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}",
        )
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} (dim/n_heads) must be even for RoPE")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
             f"rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")
        need(isinstance(self.tie_word_embeddings, bool),
             f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        need(self.dtype in DTYPES, f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        need(self.param_dtype in DTYPES, f"param_dtype {self.param_dtype!r} is not one of {sorted(DTYPES)}")
        need(self.remat in REMAT_POLICIES, f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        need(
            self.attention in ATTENTION_IMPLEMENTATIONS,
            f"attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}",
        )
        need(isinstance(self.lora_rank, int) and self.lora_rank >= 0, f"lora_rank must be an int >= 0, got {self.lora_rank!r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        unknown = [t for t in self.lora_targets if t not in PROJECTIONS]
        need(not unknown and len(set(self.lora_targets)) == len(self.lora_targets) and
             (self.lora_targets or not self.lora_rank),
             f"lora_targets must be distinct names from {PROJECTIONS}, got {list(self.lora_targets)}")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def lora_scale(self) -> float:
        """alpha / rank, the factor on the adapters' output (PEFT's `scaling`)."""
        return self.lora_alpha / self.lora_rank

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def num_params(self) -> int:
        """Exact parameter count (no biases; a tied output projection is the embedding, counted once)."""
        d, hd = self.dim, self.head_dim
        attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        feed_forward = 3 * d * self.hidden_dim
        per_layer = attention + feed_forward + 2 * d
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * d
        return embeddings + self.n_layers * per_layer + d

    def architecture(self) -> dict[str, Any]:
        """The fields that decide what the model computes (all but RUN_FIELDS)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUN_FIELDS}

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed (hidden_dim is kept unless given)."""
        return dataclasses.replace(self, **changes)

    # --- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named architecture (see PRESETS), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # --- Meta params.json ----------------------------------------------------------------
    @classmethod
    def from_meta_params(
        cls, params: dict, vocab_size: int = 32000, max_seq_len: int = 4096, **overrides: Any
    ) -> "LlamaConfig":
        """From Meta's params.json; its vocab_size of -1 means "use `vocab_size`".

        params.json does not record the context: `max_seq_len` is 4096 for Llama 2, 2048 for LLaMA-1.
        """
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size",
                 "use_scaled_rope"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"params.json has keys this model does not know: {unknown}")
        if params.get("use_scaled_rope"):
            raise ValueError("params.json asks for scaled RoPE (Llama 3.1); only LLaMA/Llama 2 are supported")
        for key in ("dim", "n_layers", "n_heads"):
            if key not in params:
                raise ValueError(f"params.json is missing {key!r}")
        file_vocab = params.get("vocab_size", -1)
        return cls(
            vocab_size=vocab_size if file_vocab in (None, -1) else _whole(params, "vocab_size"),
            dim=_whole(params, "dim"),
            n_layers=_whole(params, "n_layers"),
            n_heads=_whole(params, "n_heads"),
            n_kv_heads=_whole(params, "n_kv_heads"),
            multiple_of=_whole(params, "multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=_real({"norm_eps": 1e-5, **params}, "norm_eps"),
            rope_theta=_real({"rope_theta": 10000.0, **params}, "rope_theta"),
            max_seq_len=_whole({"max_seq_len": max_seq_len, **params}, "max_seq_len"),
            **overrides,
        )

    # --- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict, **overrides: Any) -> "LlamaConfig":
        """From a transformers LlamaConfig dict: v4's top-level rope_theta + rope_scaling, or v5's
        rope_parameters; RoPE scaling `linear` and `llama3` (others are refused), tied embeddings."""
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json model_type is {model_type!r}, expected 'llama'")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in config:
                raise ValueError(f"config.json is missing {key!r}: not a Llama config")
        if config.get("attention_bias", False) or config.get("mlp_bias", False):
            raise ValueError("config.json asks for biases; LLaMA has none")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act is {config['hidden_act']!r}, expected 'silu'")
        tied = config.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ValueError(f"config.json tie_word_embeddings must be true or false, got {tied!r}")
        ropes = {key: config[key] for key in ("rope_parameters", "rope_scaling") if config.get(key) is not None}
        scalings = []
        for key, rope in ropes.items():  # transformers 5.x and 4.x spellings; both must say the same
            if not isinstance(rope, dict):
                raise ValueError(f"config.json {key} must be an object, got {rope!r}")
            try:
                scalings.append(RopeScaling.from_hf(rope))
            except ValueError as e:
                raise ValueError(f"config.json {key}: {e}") from None
        if len(scalings) == 2 and scalings[0] != scalings[1]:
            raise ValueError(f"config.json rope_parameters {ropes['rope_parameters']} and rope_scaling "
                             f"{ropes['rope_scaling']} disagree")
        rope_theta = ropes.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
        dim, heads = _whole(config, "hidden_size"), _whole(config, "num_attention_heads")
        head_dim = _whole(config, "head_dim")
        if head_dim is not None and dim > 0 and heads > 0 and head_dim != dim // heads:
            raise ValueError(f"config.json head_dim {head_dim} != hidden_size/heads {dim // heads}")
        return cls(
            vocab_size=_whole(config, "vocab_size", 32000),
            dim=dim,
            n_layers=_whole(config, "num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=_whole(config, "num_key_value_heads") or heads,
            hidden_dim=_whole(config, "intermediate_size"),
            norm_eps=_real({"rms_norm_eps": 1e-6, **config}, "rms_norm_eps"),
            rope_theta=_real({"rope_theta": rope_theta}, "rope_theta"),
            max_seq_len=_whole(config, "max_position_embeddings", 4096),
            rope_scaling=scalings[0] if scalings else None,
            tie_word_embeddings=tied,
            **overrides,
        )

    def to_hf_config(self, torch_dtype: str = "float32", bos_id: int = 1, eos_id: int = 2) -> dict:
        """A config.json that transformers' LlamaForCausalLM loads (v4 and v5 styles both present);
        bos/eos ids are the tokenizer's (LLaMA's 1 and 2 by default)."""
        scaling = {} if self.rope_scaling is None else self.rope_scaling.to_hf()
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling or None,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta, **scaling},  # 5.x
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": torch_dtype,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {unknown}")
        return cls(**d)


_LLAMA1 = dict(vocab_size=32000, multiple_of=256, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, multiple_of=256, max_seq_len=4096, norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, norm_eps=1e-5, rope_theta=500000.0)
_LLAMA31_ROPE = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_LLAMA32_ROPE = dataclasses.replace(_LLAMA31_ROPE, factor=32.0)

PRESETS: dict[str, dict] = {
    "llama-7b": dict(_LLAMA1, dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6),
    "llama-13b": dict(_LLAMA1, dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6),
    "llama-33b": dict(_LLAMA1, dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6),
    "llama-65b": dict(_LLAMA1, dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5),
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       multiple_of=4096, ffn_dim_multiplier=1.3),
    # Llama-family checkpoints from the Hugging Face Hub (shapes and context from their config.json).
    "codellama-7b": dict(_LLAMA2, vocab_size=32016, dim=4096, n_layers=32, n_heads=32, rope_theta=1e6,
                         max_seq_len=16384),
    "tinyllama-1.1b": dict(_LLAMA2, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                           max_seq_len=2048),
    "llama3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, max_seq_len=8192),
    "llama3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, hidden_dim=28672, max_seq_len=8192),
    "llama3.1-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, max_seq_len=131072,
                        rope_scaling=_LLAMA31_ROPE),
    "llama3.1-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, hidden_dim=28672, max_seq_len=131072,
                         rope_scaling=_LLAMA31_ROPE),
    "llama3.2-1b": dict(_LLAMA3, dim=2048, n_layers=16, n_heads=32, hidden_dim=8192, max_seq_len=131072,
                        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama3.2-3b": dict(_LLAMA3, dim=3072, n_layers=28, n_heads=24, hidden_dim=8192, max_seq_len=131072,
                        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    # ~0.95B, the benchmark's "1B" (Llama-2 shapes: head_dim 128, 32000 vocab).
    "llama-1b": dict(_LLAMA2, dim=2048, n_layers=16, n_heads=16),
    # Tiny models for tests and the CPU demo (vocab matches the shipped 512-piece tokenizer).
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=256),
    "tiny-gqa": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                     max_seq_len=256),
    "demo": dict(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64,
                 max_seq_len=256),
}
