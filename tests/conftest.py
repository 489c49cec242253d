"""Test setup: 8 forced CPU devices (so sharding tests run in-process), cheaper compiles, and repo-root imports."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling, not running, is most of this suite's time (tiny models, thousands of programs). Both knobs
# reach the processes the tests start (they inherit the environment):
# - XLA's cheaper compile (JAX_DISABLE_MOST_OPTIMIZATIONS: jax's own "optimizing costs more than running
#   a less optimized program"): about half the compile time, float32 results equal to ~1e-7;
# - one persistent compilation cache for the session: a program compiled again (the same train step in
#   every `python -m train` run, each fresh Generator's decode loop) is read back, not compiled. Entries
#   are keyed on the program's HLO, the compile options, the XLA flags and the jax version, so a changed
#   program never hits; the folder is new each session and removed at its end.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JIT_CACHE = tempfile.mkdtemp(prefix="llama_jax_tests_jit_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JIT_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")  # not the many tiny op programs
    atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
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


# The suite runs on 2 workers (`-n 2 --dist loadfile`: a file's tests stay in one process, so module and
# session fixtures are built once per worker). The notebook's smoke run is the longest file (~2 min of
# subprocesses); started first, it runs beside the rest instead of after it.
LONGEST_FIRST = ("test_notebook.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: every other test keeps its order
