"""Shared helpers of the bench/ scripts: timing, the JSON result file, and the table row format.

Every script writes {"bench": NAME, "device": ..., "rows": [ROW, ...], ...} where a ROW has
"config", "metric", "ours", "peer" (the HF/PyTorch number from the same run, or None), "ratio"
(ours/peer, higher is better) and "unit"; bench/table.py prints the rows of all of them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax


def device_name() -> str:
    """The accelerator the numbers came from, e.g. 'NVIDIA H200' or 'cpu (2 cores, x86_64)'."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.machine()})"
    return dev.device_kind


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    """Median wall time of fn() after warm-up; fn must block until its device work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sig(x: float | None, digits: int = 4) -> float | None:
    """x rounded to `digits` significant figures (CPU and GPU numbers differ by 1000x)."""
    return None if x is None else float(f"{x:.{digits}g}")


def row(config: str, metric: str, ours: float | None, peer: float | None, unit: str, **extra: Any) -> dict:
    """One result row; ours and peer in the same unit, higher is better, ratio = ours / peer."""
    ours, peer = sig(ours), sig(peer)
    ratio = None if ours is None or not peer else round(ours / peer, 3)
    return {"config": config, "metric": metric, "ours": ours, "peer": peer, "ratio": ratio, "unit": unit, **extra}


def write_result(path: str | None, result: dict) -> None:
    """Print the result as one JSON line and, with a path, write it (temporary sibling, then rename)."""
    text = json.dumps(result, indent=1, default=str)
    print(json.dumps(result, default=str))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_peer_model(cfg: Any, dtype: str = "bfloat16", attn: str = "sdpa") -> Any:
    """A random HF transformers LlamaForCausalLM of the same shape, built directly on the GPU (or
    CPU) in `dtype`: the PyTorch peer. Returns None when torch/transformers are missing."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return None
    from llama_jax.convert import hf_llama

    return hf_llama(cfg, dtype, attn, "cuda" if torch.cuda.is_available() else "cpu")


def free_torch() -> None:
    """Hand PyTorch's cached GPU memory back so that JAX can use it next."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_ceilings(path: str | None) -> dict:
    """{"matmul_tflops": .., "bandwidth_gbs": ..} from bench/ceilings.py's JSON, or {} without one."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        result = json.load(f)
    return {k: result[k] for k in ("matmul_tflops", "bandwidth_gbs") if k in result}
