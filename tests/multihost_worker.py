"""One process of the 2-process test (tests/test_multihost.py starts two of these).

Usage: python tests/multihost_worker.py PROCESS_ID PORT OUT_DIR. Each process owns 4 CPU devices;
together they form one (data=2, fsdp=2, tensor=2) mesh, exactly as the hosts of a TPU pod do.
Process 0 writes what it saw to OUT_DIR/result.npz for the test to compare.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import orbax.checkpoint as ocp  # noqa: E402

import llama_jax as lj  # noqa: E402
import sharding  # noqa: E402
from llama_jax.checkpoint import write_config  # noqa: E402
from model_loss import loss_logits_grads  # noqa: E402

CFG = lj.LlamaConfig.preset("tiny-gqa", vocab_size=301)
BATCH, SEQ = 8, 17


def global_tokens() -> np.ndarray:
    """The whole batch (the test rebuilds it the same way); each host feeds only its rows."""
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (BATCH, SEQ), dtype=np.int32)


def main() -> None:
    process_id, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sharding.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, cfg=CFG, batch=BATCH)
    with jax.set_mesh(mesh):
        params = lj.init_params(CFG, 0)  # born sharded over both processes' devices
    rows = BATCH // jax.process_count()
    local = global_tokens()[process_id * rows:(process_id + 1) * rows]
    tokens = sharding.global_batch(local, mesh)
    with jax.set_mesh(mesh):
        loss, logits, grads = loss_logits_grads(params, tokens, CFG)

    # Saved as a training run does on a pod: an Orbax CheckpointManager step with a "params" item
    # (every process writes its own shards) + config.json written by process 0 only.
    checkpoint = os.path.join(out_dir, "checkpoint")
    with ocp.CheckpointManager(checkpoint, item_names=("params",)) as manager:
        manager.save(0, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params)))
        manager.wait_until_finished()
    if sharding.is_main_process():
        write_config(checkpoint, CFG)
    multihost_utils.sync_global_devices("saved")
    cfg, restored = lj.load_checkpoint(checkpoint, mesh=mesh)  # every process reads its own shards
    assert cfg == CFG
    saved = os.path.join(out_dir, "saved")
    lj.save_checkpoint(saved, CFG, params)  # the public API, called by both processes at once
    _, resaved = lj.load_checkpoint(saved, mesh=mesh)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(sharding.param_shardings(CFG, mesh))):
        assert leaf.sharding == want and len(leaf.addressable_shards) == 4

    # One jitted copy to fully replicated arrays (one compile for everything), then read locally.
    everything = {"loss": loss, "tokens": tokens, "logits": logits, "grads": grads, "params": params,
                  "restored": restored,
                  "resaved": resaved}
    replicated = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))(everything)
    result = {jax.tree_util.keystr(k): np.asarray(leaf.addressable_data(0))
              for k, leaf in jax.tree_util.tree_flatten_with_path(replicated)[0]}
    if sharding.is_main_process():
        np.savez(os.path.join(out_dir, "result.tmp.npz"), **result)
        os.replace(os.path.join(out_dir, "result.tmp.npz"), os.path.join(out_dir, "result.npz"))
    multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
    main()
