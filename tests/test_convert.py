"""python -m llama_jax.convert: Meta and HF PyTorch weights -> llama_jax, and back to HF.

The reference is a tiny random HF transformers model. Meta checkpoints are synthesised from its
state dict the way Meta's files are laid out: HF's RoPE row permutation undone per head, then
split across model-parallel ranks the way fairscale's Column/RowParallelLinear and
ParallelEmbedding split them (dim 0 / dim 1 per DESIGN.md), one consolidated.NN.pth per rank.
"""

import json
import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from jax.sharding import Mesh
from safetensors.torch import load_file, save_file

import llama_jax as lj
from llama_jax import convert, layout
from llama_jax.convert import __main__ as convert_cli
from reference import hf_logits, hf_model
from sharding.rules import param_shardings

TOKENS = np.array([[1, 17, 300, 4, 99, 511, 42, 7, 250, 3]], np.int32)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def ours_logits(out):
    cfg, params = lj.load_checkpoint(out, dtype="float32")
    return np.asarray(lj.forward(params, TOKENS, cfg.replace(max_seq_len=256)))


_MODELS = {}


def reference_model(preset, bf16=False, **overrides):
    """A tiny random HF model (float32; weights rounded to bfloat16 values when bf16)."""
    key = (preset, bf16, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        cfg = lj.LlamaConfig.preset(preset, **overrides)
        model = hf_model(cfg, seed=len(_MODELS))
        if bf16:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        _MODELS[key] = (cfg, model, hf_logits(model, TOKENS))
    return _MODELS[key]


# Meta's llama/model.py builds its layers from fairscale's model-parallel modules, written out here by
# hand (not read from llama_jax.layout): ColumnParallelLinear splits its output features (torch weight
# dim 0), RowParallelLinear its input features (dim 1), ParallelEmbedding the embedding dim (dim 1);
# the RMSNorm weights are whole on every rank. HF name -> (Meta name, split dim or None).
META_LAYOUT = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),  # ParallelEmbedding
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight", None),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.attention.wq.weight", 0),  # ColumnParallelLinear
    "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.attention.wk.weight", 0),  # ColumnParallelLinear
    "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.attention.wv.weight", 0),  # ColumnParallelLinear
    "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.attention.wo.weight", 1),  # RowParallelLinear
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight", None),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.feed_forward.w1.weight", 0),  # ColumnParallelLinear
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.feed_forward.w3.weight", 0),  # ColumnParallelLinear
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.feed_forward.w2.weight", 1),  # RowParallelLinear
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),  # ColumnParallelLinear
}
ROPE_HEADS = {"q_proj": "n_heads", "k_proj": "n_kv_heads"}  # the projections HF's converter permutes


def hf_rows_to_meta(w, heads):
    """Undo HF's RoPE row permutation, one row at a time: in head h (hd rows), HF row j < hd/2 is Meta's
    row 2j and HF row hd/2 + j is Meta's row 2j + 1 (Meta rotates pairs (2j, 2j+1), HF (j, j + hd/2))."""
    hd = w.shape[0] // heads
    meta = np.empty_like(w)
    for h in range(heads):
        for j in range(hd // 2):
            meta[h * hd + 2 * j] = w[h * hd + j]
            meta[h * hd + 2 * j + 1] = w[h * hd + hd // 2 + j]
    return meta


def write_meta(folder, cfg, model, shards, dtype=torch.float32, params_extra=None, rope_freqs=True):
    """Meta's layout: params.json + consolidated.NN.pth, rows permuted back to interleaved RoPE."""
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ranks = [{} for _ in range(shards)]
    for hf_template, (meta_template, split) in META_LAYOUT.items():
        for i in range(cfg.n_layers) if "{i}" in hf_template else [None]:
            w = sd.pop(hf_template.format(i=i))
            rope = [heads for proj, heads in ROPE_HEADS.items() if proj in hf_template]
            if rope:
                w = hf_rows_to_meta(w, getattr(cfg, rope[0]))
            w = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
            pieces = [w] * shards if split is None else torch.chunk(w, shards, split)
            for rank, piece in zip(ranks, pieces):
                rank[meta_template.format(i=i)] = piece.clone()
    assert not sd, f"HF tensors without a Meta name: {sorted(sd)}"
    for r, rank in enumerate(ranks):
        if rope_freqs:
            rank["rope.freqs"] = torch.zeros(cfg.head_dim // 2, dtype=dtype)
        torch.save(rank, os.path.join(folder, f"consolidated.{r:02d}.pth"))
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": cfg.multiple_of,
              "norm_eps": cfg.norm_eps, "vocab_size": -1}
    if cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    params.update(params_extra or {})
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    return folder


# --- fast transposes: the same bits as numpy's element-by-element copy -------------------------


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.uint8])
@pytest.mark.parametrize("shape", [(64, 48), (37, 52), (33, 7), (1, 8), (8, 1)])
def test_transpose_2d_matches_numpy(dtype, shape):
    m = (np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    got = layout.transpose_2d(m)
    assert got.dtype == m.dtype and got.flags.c_contiguous
    assert got.tobytes() == np.ascontiguousarray(m.T).tobytes()


def test_contiguous_of_every_layout_view_matches_numpy():
    cfg = lj.LlamaConfig.preset("tiny-gqa")
    rng = np.random.default_rng(0)
    for fmt in ("meta", "hf"):
        for entry, _, _ in layout.names(cfg, fmt):
            w = rng.standard_normal(layout.torch_shape(entry, cfg)).astype(ml_dtypes.bfloat16)
            view = layout.to_ours(entry, w, cfg, fmt)
            got = layout.contiguous(view)
            assert got.shape == view.shape and got.flags.c_contiguous
            assert got.tobytes() == np.ascontiguousarray(view).tobytes()


# --- Meta -> ours -----------------------------------------------------------------------------


@pytest.mark.parametrize("shards,preset,dtype", [
    (1, "tiny", torch.float32),
    (2, "tiny-gqa", torch.float32),  # one kv head per rank, like 70B on 8 ranks
    (4, "tiny", torch.bfloat16),
    (4, "tiny-gqa", torch.bfloat16),
])
def test_meta_shards_match_hf(tmp_path, shards, preset, dtype):
    cfg, model, expected = reference_model(preset, bf16=dtype == torch.bfloat16)
    src = write_meta(str(tmp_path / "meta"), cfg, model, shards, dtype)
    out = str(tmp_path / "out")
    got_cfg = convert_cli.main(["meta", src, out, "--dtype", "float32", "--no-progress"])
    assert got_cfg.vocab_size == cfg.vocab_size and got_cfg.hidden_dim == cfg.hidden_dim  # -1 -> from weights
    assert got_cfg.n_kv_heads == cfg.n_kv_heads
    assert rel_err(ours_logits(out), expected) <= 1e-5


def test_meta_bf16_keeps_bits_reads_rope_theta_copies_tokenizer_and_verifies(tmp_path, capsys):
    cfg, model, expected = reference_model("tiny-gqa", bf16=True, rope_theta=30000.0)
    llama2 = tmp_path / "download"  # Llama-2's layout: tokenizer.model next to the model folder
    src = write_meta(str(llama2 / "llama-2-tiny"), cfg, model, 2, torch.bfloat16, {"rope_theta": 30000.0})
    tokenizer = open(os.path.join(os.path.dirname(__file__), "..", "data", "tokenizer.model"), "rb").read()
    (llama2 / "tokenizer.model").write_bytes(tokenizer)  # a real one: the converter checks it loads
    out = str(tmp_path / "out")
    convert_cli.main(["meta", src, out, "--verify", "--max-seq-len", "128"])
    stdout = capsys.readouterr().out
    assert "max |logit diff|" in stdout
    diff = float(stdout.split("max |logit diff| = ")[1].split()[0])
    assert diff <= 1e-5 * np.max(np.abs(expected))
    cfg_out, params = lj.load_checkpoint(out)
    assert cfg_out.param_dtype == "bfloat16" and cfg_out.rope_theta == 30000.0 and cfg_out.max_seq_len == 128
    wq = np.asarray(params["layers"]["attention"]["wq"][1])
    hf_wq = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(wq.reshape(cfg.dim, -1).T, hf_wq.astype(ml_dtypes.bfloat16))
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tokenizer
    assert rel_err(ours_logits(out), expected) <= 1e-5

    # the streamed files are a plain Orbax PyTree checkpoint: Orbax alone reads the same values,
    plain = ocp.PyTreeCheckpointer().restore(os.path.join(out, "params"))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(params)):
        assert a.dtype == ml_dtypes.bfloat16 and np.array_equal(a, np.asarray(b))
    # and a mesh restore places each leaf by the logical-axis rules
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    _, sharded = lj.load_checkpoint(out, mesh=mesh)
    for leaf, sharding, ref in zip(jax.tree.leaves(sharded), jax.tree.leaves(param_shardings(cfg_out, mesh)),
                                   jax.tree.leaves(params)):
        assert leaf.sharding == sharding and np.array_equal(np.asarray(leaf), np.asarray(ref))


def test_meta_reference_forward_agrees_with_hf(tmp_path):
    """The --verify reference (Meta's formulas, interleaved RoPE) on the synthesised Meta weights."""
    cfg, model, expected = reference_model("tiny-gqa")
    src = write_meta(str(tmp_path / "meta"), cfg, model, 2)
    source = convert.MetaSource(src)
    entries = {name: entry for entry, _, name in layout.names(source.cfg, "meta")}
    logits = convert.meta_reference_logits(
        lambda name: convert.to_numpy(source.get(entries[name], name)).astype(np.float32), source.cfg, TOKENS)
    assert rel_err(logits, expected) <= 1e-5


def test_one_tensor_in_flight_writes_the_same_checkpoint(tmp_path):
    """The in-flight byte budget only paces the pool: a budget of one tensor gives the same files."""
    cfg, model, _ = reference_model("tiny-gqa", bf16=True)
    src = write_meta(str(tmp_path / "meta"), cfg, model, 2, torch.bfloat16)
    outs = [str(tmp_path / "one"), str(tmp_path / "many")]
    convert.convert(convert.MetaSource(src), outs[0], progress=False, workers=3, inflight_bytes=1)
    convert.convert(convert.MetaSource(src), outs[1], progress=False, workers=4)
    files = sorted(os.path.relpath(os.path.join(d, f), outs[0]) for d, _, fs in os.walk(outs[0]) for f in fs)
    assert len(files) > 20
    for f in files:
        if not f.endswith("_CHECKPOINT_METADATA"):  # holds timestamps
            with open(os.path.join(outs[0], f), "rb") as a, open(os.path.join(outs[1], f), "rb") as b:
                assert a.read() == b.read(), f


# --- HF -> ours -> HF -------------------------------------------------------------------------


def save_bin(model, folder, shards):
    """transformers 4.x's .bin layout (v5 only writes safetensors): pytorch_model*.bin (+ index)."""
    model.config.save_pretrained(folder)
    sd = model.state_dict()
    names = list(sd)
    if shards == 1:
        torch.save({k: v.clone() for k, v in sd.items()}, os.path.join(folder, "pytorch_model.bin"))
        return
    weight_map = {}
    for k in range(shards):
        chunk = names[k::shards]
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({name: sd[name].clone() for name in chunk}, os.path.join(folder, file))
        weight_map.update({name: file for name in chunk})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("safe,shard,dtype,old_config", [
    (True, "60KB", torch.float32, False),
    (False, 3, torch.float32, True),
    (False, 1, torch.float16, False),
    (True, None, torch.bfloat16, True),
])
def test_hf_round_trip(tmp_path, safe, shard, dtype, old_config):
    cfg, model, expected = reference_model("tiny-gqa" if safe else "tiny", bf16=dtype == torch.bfloat16)
    src = str(tmp_path / "hf")
    source_model = model.to(dtype) if dtype != torch.float32 else model
    if safe:
        source_model.save_pretrained(src, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    else:
        save_bin(source_model, src, shard)
    original = {k: v.clone() for k, v in source_model.state_dict().items()}
    model.float()  # .to() changed the cached reference model in place
    files = os.listdir(src)
    assert any(f.endswith(".index.json") for f in files) == (shard not in (None, 1))
    assert any(f.endswith(".bin") for f in files) == (not safe)
    if old_config:  # transformers 4.x style: top-level rope_theta, no rope_parameters
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
        theta = (config.pop("rope_parameters", None) or {}).get("rope_theta", 10000.0)
        config["rope_theta"] = theta
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(config, f)
    out, back = str(tmp_path / "out"), str(tmp_path / "back")
    got = convert_cli.main(["hf", src, out, "--no-progress"])
    assert got.param_dtype == {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    if dtype != torch.float16:  # fp16-rounded weights are not the float32 reference's
        assert rel_err(ours_logits(out), expected) <= 1e-5
    convert_cli.main(["export-hf", out, back, "--no-progress"])
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(back, output_loading_info=True,
                                                                   dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    exported = reloaded.state_dict()
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name], tensor), name


def test_export_float32_of_a_trained_checkpoint_is_bitwise(tmp_path):
    """A checkpoint written by save_checkpoint (as the trainer does), exported to HF in float32."""
    cfg = lj.LlamaConfig.preset("tiny-gqa")
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), lj.param_shapes(cfg))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    lj.save_checkpoint(ckpt, cfg, params)
    convert.export_hf(ckpt, out, max_shard_bytes=100_000, progress=False)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors.update(load_file(os.path.join(out, file)))
    assert tensors["model.layers.1.mlp.down_proj.weight"].numpy().tobytes() == \
        params["layers"]["feed_forward"]["w2"][1].T.copy().tobytes()
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ours = np.asarray(lj.forward(params, TOKENS, cfg))
    assert rel_err(hf_logits(model, TOKENS), ours) <= 1e-5


# --- safety and errors ------------------------------------------------------------------------


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    src = tmp_path / "meta"
    src.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "evil": RunsCommand(marker)},
               src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(ValueError, match="consolidated.00.pth: refused to load"):
        convert_cli.main(["meta", str(src), str(tmp_path / "out"), "--no-progress"])
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["meta"]


@pytest.fixture()
def meta_src(tmp_path):
    cfg, model, _ = reference_model("tiny-gqa")
    return cfg, write_meta(str(tmp_path / "meta"), cfg, model, 2)


def edit_shard(src, rank, change):
    path = os.path.join(src, f"consolidated.{rank:02d}.pth")
    sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


def assert_fails_cleanly(tmp_path, argv, error, match):
    with pytest.raises(error, match=match):
        convert_cli.main(argv + ["--no-progress"])
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_meta_errors_name_the_file_and_tensor(tmp_path, meta_src):
    cfg, src = meta_src
    argv = ["meta", src, str(tmp_path / "out")]
    os.rename(os.path.join(src, "consolidated.01.pth"), os.path.join(src, "consolidated.02.pth"))
    assert_fails_cleanly(tmp_path, argv, FileNotFoundError, "missing shard consolidated.01.pth")
    os.rename(os.path.join(src, "consolidated.02.pth"), os.path.join(src, "consolidated.01.pth"))

    edit_shard(src, 1, lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    assert_fails_cleanly(tmp_path, argv, ValueError,
                         r"consolidated.01.pth: its tensors disagree .*layers.1.feed_forward.w3.weight")
    edit_shard(src, 0, lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    assert_fails_cleanly(tmp_path, argv, KeyError, r"missing tensor\(s\) \['layers.1.feed_forward.w3.weight'\]")

    for rank in (0, 1):
        edit_shard(src, rank, lambda sd: sd.update({"layers.1.feed_forward.w3.weight": torch.zeros(96, 64),
                                                    "layers.1.attention.bias": torch.zeros(64)}))
    assert_fails_cleanly(tmp_path, argv, KeyError, r"unknown tensor\(s\) \['layers.1.attention.bias'\]")
    for rank in (0, 1):
        edit_shard(src, rank, lambda sd: sd.pop("layers.1.attention.bias"))

    # a shape that disagrees with params.json, late in the stream (after other tensors were written)
    edit_shard(src, 1, lambda sd: sd.update({"layers.1.feed_forward.w2.weight": torch.zeros(64, 90)}))
    assert_fails_cleanly(tmp_path, argv, ValueError,
                         r"consolidated.01.pth: tensor layers.1.feed_forward.w2.weight has shape \(64, 90\), "
                         r"expected \(64, 96\)")
    edit_shard(src, 1, lambda sd: sd.update({"layers.1.feed_forward.w2.weight": torch.zeros(64, 96)}))
    edit_shard(src, 1, lambda sd: sd.update({"norm.weight": torch.zeros(64)}))
    assert_fails_cleanly(tmp_path, argv, ValueError, "consolidated.01.pth: replicated tensor norm.weight differs")

    with open(os.path.join(src, "params.json")) as f:
        params = json.load(f)
    with open(os.path.join(src, "params.json"), "w") as f:
        json.dump({**params, "vocab_size": 1000}, f)
    assert_fails_cleanly(tmp_path, argv, ValueError, "vocab_size 1000 disagrees with tok_embeddings.weight's 512")


def test_existing_output_is_kept_without_overwrite_and_after_a_failure(tmp_path, meta_src):
    cfg, src = meta_src
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        convert_cli.main(["meta", src, str(out), "--no-progress"])
    edit_shard(src, 0, lambda sd: sd.update({"output.weight": torch.zeros(3, 64)}))
    with pytest.raises(ValueError, match="output.weight"):
        convert_cli.main(["meta", src, str(out), "--overwrite", "--no-progress"])
    assert os.listdir(out) == ["mine.txt"]  # a failed --overwrite leaves the old output alone
    assert sorted(os.listdir(tmp_path)) == ["meta", "out"]


def test_hf_errors(tmp_path):
    cfg, model, _ = reference_model("tiny")
    src = str(tmp_path / "hf")
    model.save_pretrained(src, safe_serialization=True, max_shard_size="60KB")
    argv = ["hf", src, str(tmp_path / "out")]
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    second = os.path.join(src, files[1])
    tensors = load_file(second)
    name = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != name}, second, metadata={"format": "pt"})
    assert_fails_cleanly(tmp_path, argv, KeyError, f"{files[1]}: the index lists tensor {name}")
    os.remove(second)
    assert_fails_cleanly(tmp_path, argv, FileNotFoundError, f"{files[1]}: listed in the index but missing")
    os.remove(os.path.join(src, "config.json"))
    assert_fails_cleanly(tmp_path, argv, FileNotFoundError, "no config.json")


# --- --verify, --verify-layers and --dtype casts -----------------------------------------------


def verified(stdout):
    """(layers used, relative max logit diff) from the line --verify prints."""
    line = next(l for l in stdout.splitlines() if l.startswith("verify ("))
    return line.split("verify (")[1].split(" of")[0], float(line.split("(relative ")[1].rstrip(")"))


def test_verify_and_verify_layers_for_hf_and_export_hf(tmp_path, capsys):
    """--verify runs the source and the result on the same tokens (float32 conversions agree to 1e-5
    relative); it must also see a damaged result (w2 of the second layer tripled: > 1e-2), and
    --verify-layers 1 must cut both models to the first layer (then that damage is out of sight)."""
    from llama_jax.convert.reference import verify

    cfg, model, _ = reference_model("tiny-gqa")
    src, out, back = str(tmp_path / "hf"), str(tmp_path / "out"), str(tmp_path / "back")
    model.save_pretrained(src, safe_serialization=True)
    convert_cli.main(["hf", src, out, "--verify", "--no-progress"])
    layers, rel = verified(capsys.readouterr().out)
    assert layers == "2" and rel <= 1e-5
    convert_cli.main(["export-hf", out, back, "--verify", "--verify-layers", "1", "--no-progress"])
    layers, rel = verified(capsys.readouterr().out)
    assert layers == "1" and rel <= 1e-5

    got_cfg, params = lj.load_checkpoint(out)
    params["layers"]["feed_forward"]["w2"] = params["layers"]["feed_forward"]["w2"].at[1].multiply(3.0)
    damaged, damaged_hf = str(tmp_path / "damaged"), str(tmp_path / "damaged_hf")
    lj.save_checkpoint(damaged, got_cfg, params)
    convert.export_hf(damaged, damaged_hf, progress=False)
    capsys.readouterr()
    for kind, a, b in (("hf", src, damaged), ("export-hf", out, damaged_hf)):
        verify(kind, a, b, got_cfg)
        assert verified(capsys.readouterr().out)[1] > 1e-2, kind
        verify(kind, a, b, got_cfg, layers=1)
        layers, rel = verified(capsys.readouterr().out)
        assert layers == "1" and rel <= 1e-5, kind


def test_dtype_bfloat16_casts_like_torch(tmp_path):
    """--dtype bfloat16 on a float32 source stores each weight rounded as torch's .to(bfloat16) rounds
    it (round to nearest even), both ways: hf -> ours, and ours (float32) -> export-hf."""
    cfg, model, _ = reference_model("tiny")
    src, out, back = str(tmp_path / "hf"), str(tmp_path / "out16"), str(tmp_path / "back16")
    model.save_pretrained(src, safe_serialization=True)
    got = convert_cli.main(["hf", src, out, "--dtype", "bfloat16", "--no-progress"])
    assert got.param_dtype == "bfloat16"
    _, params = lj.load_checkpoint(out)
    rounded = {k: v.to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
    want = layout.params_from_state_dict(rounded, cfg, "hf")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert a.dtype == ml_dtypes.bfloat16 and np.array_equal(np.asarray(a, np.float32), b)

    full = str(tmp_path / "out32")
    convert_cli.main(["hf", src, full, "--no-progress"])
    convert_cli.main(["export-hf", full, back, "--dtype", "bfloat16", "--no-progress"])
    exported = transformers.LlamaForCausalLM.from_pretrained(back, dtype=torch.bfloat16).state_dict()
    for name, tensor in model.state_dict().items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.to(torch.bfloat16)), name
