"""Test setup: 8 forced CPU devices (so sharding tests run in-process) and repo-root imports."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny random model (tiny-gqa, output sharpened: greedy has no near-ties) saved as a llama_jax
    checkpoint with data/tokenizer.model beside it, and exported with export-hf (weights + tokenizer)
    for transformers / lm-eval. Returns (cfg, params, checkpoint dir, HF dir).

    The output rows of the byte pieces <0x80>..<0xFF> (ids 131..258) are zeroed, so greedy text is
    valid UTF-8: SentencePiece and HF's byte-fallback decoder render invalid bytes differently."""
    import shutil

    import llama_jax as lj
    from llama_jax.convert import export_hf
    from reference import hf_model, hf_params

    cfg = lj.LlamaConfig.preset("tiny-gqa")
    params = hf_params(hf_model(cfg, seed=1, sharpen=4.0), cfg)
    params["output"][:, 131:259] = 0.0
    root = tmp_path_factory.mktemp("tiny_export")
    ckpt, hf_dir = root / "ckpt", root / "hf"
    lj.save_checkpoint(ckpt, cfg, params)
    shutil.copyfile(os.path.join(ROOT, "data", "tokenizer.model"), ckpt / "tokenizer.model")
    export_hf(str(ckpt), str(hf_dir), progress=False)
    return cfg, params, str(ckpt), str(hf_dir)
