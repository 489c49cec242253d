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
    for rope_type in ("dynamic", "yarn", "longrope"):
        with pytest.raises(ValueError, match=f"RoPE scaling '{rope_type}': not supported"):
            lj.LlamaConfig.from_hf_config({**base, "rope_scaling": {"rope_type": rope_type, "factor": 2.0}})
    with pytest.raises(ValueError, match="'llama3': needs low_freq_factor"):
        lj.LlamaConfig.from_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0,
                                                                   "factor": 8.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        lj.LlamaConfig.from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0,
                                                                "partial_rotary_factor": 0.5}})
    with pytest.raises(ValueError, match="disagree"):
        lj.LlamaConfig.from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0},
                                       "rope_parameters": {"rope_type": "linear", "factor": 4.0}})
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
        lj.LlamaConfig.preset("llama4-8b")


def test_config_is_hashable_and_a_valid_static_argument():
    a, b = lj.LlamaConfig.preset("tiny"), lj.LlamaConfig.preset("tiny")
    assert hash(a) == hash(b) and a == b and a != a.replace(rope_theta=1e6)
    assert jax.jit(lambda x, cfg: x * cfg.dim, static_argnums=1)(2, a) == 128


# --- Llama-family checkpoints from the Hub ----------------------------------------------------------------

# Their config.json files as published on the Hub (transformers 4.x spelling: top-level rope_theta and
# rope_scaling), copied by hand, keys that do not change the architecture left out.
PUBLISHED = {
    "codellama-7b": {  # codellama/CodeLlama-7b-hf
        "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 16384, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": False, "vocab_size": 32016},
    "tinyllama-1.1b": {  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 2048,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "vocab_size": 32000},
    "llama3-8b": {  # meta-llama/Meta-Llama-3-8B
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256},
    "llama3.1-8b": {  # meta-llama/Llama-3.1-8B
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256},
    "llama3.2-1b": {  # meta-llama/Llama-3.2-1B
        "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256},
}


def _count(vocab, dim, layers, heads, kv_heads, head_dim, ffn, tied):
    """Parameters from the published tensor shapes: embed_tokens (vocab, dim); per layer q_proj (heads*hd, dim),
    k_proj/v_proj (kv*hd, dim), o_proj (dim, heads*hd), gate/up (ffn, dim), down (dim, ffn), two norms (dim);
    the final norm; lm_head (vocab, dim) unless tied to embed_tokens."""
    layer = (heads * head_dim * dim + 2 * kv_heads * head_dim * dim + dim * heads * head_dim + 3 * ffn * dim + 2 * dim)
    return vocab * dim + layers * layer + dim + (0 if tied else vocab * dim)


FAMILY = {  # preset: (vocab, dim, layers, heads, kv heads, head_dim, ffn, tied, ctx, theta, params as published)
    "codellama-7b": (32016, 4096, 32, 32, 32, 128, 11008, False, 16384, 1e6, "6.74B"),
    "tinyllama-1.1b": (32000, 2048, 22, 32, 4, 64, 5632, False, 2048, 1e4, "1.1B"),
    "llama3-8b": (128256, 4096, 32, 32, 8, 128, 14336, False, 8192, 5e5, "8.03B"),
    "llama3-70b": (128256, 8192, 80, 64, 8, 128, 28672, False, 8192, 5e5, "70.55B"),
    "llama3.1-8b": (128256, 4096, 32, 32, 8, 128, 14336, False, 131072, 5e5, "8.03B"),
    "llama3.1-70b": (128256, 8192, 80, 64, 8, 128, 28672, False, 131072, 5e5, "70.55B"),
    "llama3.2-1b": (128256, 2048, 16, 32, 8, 64, 8192, True, 131072, 5e5, "1.24B"),
    "llama3.2-3b": (128256, 3072, 28, 24, 8, 128, 8192, True, 131072, 5e5, "3.21B"),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_presets_match_published_shapes(name):
    vocab, dim, layers, heads, kv, hd, ffn, tied, ctx, theta, published = FAMILY[name]
    cfg = lj.LlamaConfig.preset(name)
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        vocab, dim, layers, heads, kv, hd)
    assert (cfg.hidden_dim, cfg.tie_word_embeddings, cfg.max_seq_len, cfg.rope_theta) == (ffn, tied, ctx, theta)
    count = _count(vocab, dim, layers, heads, kv, hd, ffn, tied)
    assert cfg.num_params() == count
    assert f"{count / 1e9:.{len(published.split('.')[1]) - 1}f}B" == published  # the size the model card states
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(lj.param_shapes(cfg))) == count
    scaling = cfg.rope_scaling
    if name.startswith(("llama3.1", "llama3.2")):  # Meta's use_scaled_rope constants (32 for 3.2 1B/3B)
        factor = 8.0 if name.startswith("llama3.1") else 32.0
        assert scaling == lj.RopeScaling("llama3", factor, 1.0, 4.0, 8192)
    else:
        assert scaling is None


def test_exact_family_counts():
    """The counts by hand, once, so a wrong shape formula in _count cannot hide a wrong preset."""
    assert lj.LlamaConfig.preset("llama3-8b").num_params() == 8_030_261_248
    assert lj.LlamaConfig.preset("tinyllama-1.1b").num_params() == 1_100_048_384
    assert lj.LlamaConfig.preset("codellama-7b").num_params() == 6_738_546_688
    assert lj.LlamaConfig.preset("llama3.2-1b").num_params() == 1_235_814_400
    assert lj.LlamaConfig.preset("llama3.2-3b").num_params() == 3_212_749_824
    assert lj.LlamaConfig.preset("llama3.1-70b").num_params() == 70_553_706_496


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_hf_configs_give_the_presets(name):
    cfg = lj.LlamaConfig.from_hf_config(PUBLISHED[name])
    assert cfg == lj.LlamaConfig.preset(name).replace(multiple_of=256)  # multiple_of: unused with hidden_dim given
    # Back through transformers (our config.json -> its LlamaConfig -> its dict) and through ours.
    hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    published = PUBLISHED[name].get("rope_scaling")
    if published is not None:
        assert {k: hf.rope_parameters[k] for k in published} == published
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings and hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert lj.LlamaConfig.from_hf_config(hf.to_dict()) == cfg


def test_rope_scaling_round_trips_through_checkpoint_config_json(tmp_path):
    from llama_jax.checkpoint.format import read_config, write_config

    for cfg in (lj.LlamaConfig.preset("llama3.2-1b"),
                lj.LlamaConfig.preset("tiny", rope_scaling={"rope_type": "linear", "factor": 4})):
        write_config(str(tmp_path), cfg)
        back = read_config(str(tmp_path))
        assert back == cfg and hash(back) == hash(cfg) and isinstance(back.rope_scaling, lj.RopeScaling)
    assert cfg.rope_scaling == lj.RopeScaling("linear", 4.0) and cfg != cfg.replace(rope_scaling=None)
    with pytest.raises(ValueError, match="rope_scaling"):
        lj.LlamaConfig.preset("tiny", rope_scaling={"rope_type": "linear", "factor": 2.0, "low": 1})
    with pytest.raises(ValueError, match="takes only a factor"):
        lj.LlamaConfig.preset("tiny", rope_scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match="must be below high_freq_factor"):
        lj.RopeScaling("llama3", 8.0, 4.0, 4.0, 8192)
