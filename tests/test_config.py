"""LlamaConfig: presets against the published table, Meta/HF config round trips, validation."""

import jax
import numpy as np
import pytest
import transformers

import llama_jax as lj

# DESIGN.md's reference table: (dim, layers, heads, kv heads, hidden_dim, norm_eps, ctx, params).
TABLE = {
    "llama-7b": (4096, 32, 32, 32, 11008, 1e-6, 2048, 6_738_415_616),
    "llama-13b": (5120, 40, 40, 40, 13824, 1e-6, 2048, 13_015_864_320),
    "llama-33b": (6656, 60, 52, 52, 17920, 1e-6, 2048, 32_528_943_616),
    "llama-65b": (8192, 80, 64, 64, 22016, 1e-5, 2048, 65_285_660_672),
    "llama2-7b": (4096, 32, 32, 32, 11008, 1e-5, 4096, 6_738_415_616),
    "llama2-13b": (5120, 40, 40, 40, 13824, 1e-5, 4096, 13_015_864_320),
    "llama2-70b": (8192, 80, 64, 8, 28672, 1e-5, 4096, 68_976_648_192),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_matches_reference_table(name):
    dim, layers, heads, kv, hidden, eps, ctx, count = TABLE[name]
    cfg = lj.LlamaConfig.preset(name)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (dim, layers, heads, kv)
    assert (cfg.hidden_dim, cfg.norm_eps, cfg.max_seq_len) == (hidden, eps, ctx)
    assert (cfg.vocab_size, cfg.head_dim, cfg.rope_theta) == (32000, 128, 10000.0)
    assert cfg.num_params() == count
    # The same count from the real parameter shapes (eval_shape: nothing is allocated).
    shapes = lj.param_shapes(cfg)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == count


META_PARAMS = {  # params.json files as Meta ships them
    "llama-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                 "vocab_size": -1},
    "llama2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                   "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
}


def test_from_meta_params_reproduces_presets():
    llama7 = lj.LlamaConfig.from_meta_params(META_PARAMS["llama-7b"], max_seq_len=2048)
    assert llama7 == lj.LlamaConfig.preset("llama-7b")
    llama70 = lj.LlamaConfig.from_meta_params(META_PARAMS["llama2-70b"])
    assert llama70.hidden_dim == 28672 and llama70.n_kv_heads == 8
    assert llama70.num_params() == 68_976_648_192
    assert lj.LlamaConfig.from_meta_params({**META_PARAMS["llama-7b"], "vocab_size": 32001}).vocab_size == 32001
    assert lj.LlamaConfig.from_meta_params({**META_PARAMS["llama-7b"], "rope_theta": 1e6}).rope_theta == 1e6
    with pytest.raises(ValueError, match="unknown_key"):
        lj.LlamaConfig.from_meta_params({**META_PARAMS["llama-7b"], "unknown_key": 1})


def test_hf_config_old_and_new_rope_styles():
    base = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 128}
    old = lj.LlamaConfig.from_hf_config({**base, "rope_theta": 500000.0})
    new = lj.LlamaConfig.from_hf_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert old == new and old.rope_theta == 500000.0 and old.hidden_dim == 160 and old.n_kv_heads == 2
    with pytest.raises(ValueError, match="RoPE scaling"):
        lj.LlamaConfig.from_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="ties embeddings"):
        lj.LlamaConfig.from_hf_config({**base, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="missing 'hidden_size'"):
        lj.LlamaConfig.from_hf_config({"model_type": "llama"})


def test_hf_config_round_trip_through_transformers():
    cfg = lj.LlamaConfig.preset("llama2-70b", rope_theta=1e6)
    hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    assert hf.intermediate_size == 28672 and hf.num_key_value_heads == 8
    back = lj.LlamaConfig.from_hf_config(hf.to_dict())
    assert (back.dim, back.n_layers, back.n_heads, back.n_kv_heads, back.hidden_dim) == (8192, 80, 64, 8, 28672)
    assert back.rope_theta == 1e6 and back.norm_eps == 1e-5 and back.max_seq_len == 4096


@pytest.mark.parametrize("fields, message", [
    (dict(dim=100, n_heads=3), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(dim=36, n_heads=4), "must be even"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(attention="magic"), "attention"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_configs_raise_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        lj.LlamaConfig.preset("tiny", **fields)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="llama2-7b"):
        lj.LlamaConfig.preset("llama3-8b")


def test_config_is_hashable_and_a_valid_static_argument():
    a, b = lj.LlamaConfig.preset("tiny"), lj.LlamaConfig.preset("tiny")
    assert hash(a) == hash(b) and a == b and a != a.replace(rope_theta=1e6)
    assert jax.jit(lambda x, cfg: x * cfg.dim, static_argnums=1)(2, a) == 128
