"""save_checkpoint / load_checkpoint: exact round trips, dtype casts, mesh restore, training runs, errors."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh

import llama_jax as lj
from sharding.rules import param_shardings

CFG = lj.LlamaConfig.preset("tiny-gqa")


@pytest.fixture(scope="module")
def params():
    """Random float32 params of the right shapes (numpy: no compile needed)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), lj.param_shapes(CFG))


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_config_json_has_format(tmp_path, params):
    path = str(tmp_path / "ckpt")
    lj.save_checkpoint(path, CFG, params)
    with open(os.path.join(path, "config.json")) as f:
        stored = json.load(f)
    assert stored["format"] == "llama_jax" and stored["version"] == 1 and stored["dim"] == 64
    assert not [n for n in os.listdir(tmp_path) if n != "ckpt"]  # the temporary sibling is gone
    cfg, loaded = lj.load_checkpoint(path)
    assert cfg == CFG
    assert isinstance(jax.tree.leaves(loaded)[0], jax.Array)
    assert_tree_equal(params, loaded)

    cfg16, half = lj.load_checkpoint(path, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert_tree_equal(jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params), half)


def test_existing_output_needs_overwrite(tmp_path, params):
    path = str(tmp_path / "ckpt")
    lj.save_checkpoint(path, CFG, params)
    with pytest.raises(FileExistsError, match="already exists"):
        lj.save_checkpoint(path, CFG, params)
    doubled = jax.tree.map(lambda x: x * 2, params)
    lj.save_checkpoint(path, CFG, doubled, overwrite=True)
    assert_tree_equal(doubled, lj.load_checkpoint(path)[1])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_mesh_restore_places_every_leaf_by_the_rules(tmp_path, params):
    path = str(tmp_path / "ckpt")
    lj.save_checkpoint(path, CFG, params)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    cfg, sharded = lj.load_checkpoint(path, mesh=mesh)
    expected = param_shardings(cfg, mesh)
    for leaf, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
        assert leaf.sharding == sharding
    wq = sharded["layers"]["attention"]["wq"]
    assert wq.sharding.spec[1:3] == ("fsdp", "tensor")  # really split, not replicated
    assert len({s.data.shape for s in wq.addressable_shards}) == 1
    assert wq.addressable_shards[0].data.shape == (2, 32, 1, 16)
    assert_tree_equal(params, sharded)


def test_training_run_folder_loads_newest_complete_step(tmp_path, params):
    run = tmp_path / "run"
    with ocp.CheckpointManager(str(run), item_names=("params",)) as manager:
        for step, scale in ((1, 1.0), (3, 3.0)):
            tree = jax.tree.map(lambda x: x * scale, params)
            manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(tree)))
        manager.wait_until_finished()
    os.makedirs(run / "7.orbax-checkpoint-tmp-99" / "params")  # an interrupted save: not a step
    os.makedirs(run / "9")  # a step folder without params: incomplete
    with open(run / "config.json", "w") as f:
        json.dump({**CFG.to_dict(), "format": "llama_jax", "version": 1}, f)
    cfg, loaded = lj.load_checkpoint(str(run))
    assert cfg == CFG
    assert_tree_equal(jax.tree.map(lambda x: x * 3.0, params), loaded)


def test_errors_name_the_path_and_what_was_expected(tmp_path, params):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        lj.load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*training run folder"):
        lj.load_checkpoint(str(tmp_path / "empty"))

    path = str(tmp_path / "ckpt")
    lj.save_checkpoint(path, CFG, params)
    with open(os.path.join(path, "config.json"), "w") as f:  # an HF config in the wrong place
        json.dump(CFG.to_hf_config(), f)
    with pytest.raises(ValueError, match="config.json: format is None, expected 'llama_jax'"):
        lj.load_checkpoint(path)
    with open(os.path.join(path, "config.json"), "w") as f:  # a config that disagrees with the params
        json.dump({**CFG.replace(n_layers=3).to_dict(), "format": "llama_jax", "version": 1}, f)
    with pytest.raises(ValueError, match="stored params do not match config.json"):
        lj.load_checkpoint(path)
    with pytest.raises(ValueError, match="do not match the config"):
        lj.save_checkpoint(str(tmp_path / "bad"), CFG.replace(dim=32, n_heads=2), params)
    assert not (tmp_path / "bad").exists()


def test_relative_paths_load(tmp_path, monkeypatch):
    cfg = lj.LlamaConfig.preset("tiny")
    params = lj.init_params(cfg, 0)
    monkeypatch.chdir(tmp_path)
    lj.save_checkpoint("new/folder/ckpt", cfg, params)  # parents are created
    loaded_cfg, loaded = lj.load_checkpoint("new/folder/ckpt")
    assert loaded_cfg == cfg
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
