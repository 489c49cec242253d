"""Reading PyTorch weights safely and lightly: weights-only unpickling, memory maps, and
releasing pages once a tensor is converted (so a 70B file never sits in memory)."""

from __future__ import annotations

import ctypes
import os
import pickle
import sys
from typing import Any

import ml_dtypes
import numpy as np
import torch

TORCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def load_pth(file: str) -> dict:
    """A .pth/.bin state dict, memory-mapped, through the weights-only unpickler (never runs code)."""
    state = _load(file)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{file}: expected a state dict (tensor names -> tensors), got {type(state).__name__}")
    return state


def _load(file: str) -> Any:
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file}: refused to load: it is not a plain tensor checkpoint "
                         f"(its pickle asks for more than tensors; nothing from it was run): {_one_line(e)}") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as e:  # truncated or damaged
        raise ValueError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {_one_line(e)})") from None


def to_numpy(t: torch.Tensor, what: str = "tensor") -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16 via ml_dtypes), no copy; `what` names it in errors."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in TORCH_DTYPES:
        raise ValueError(f"{what}: dtype {t.dtype} is not a float type this converter reads "
                         f"({', '.join(TORCH_DTYPES.values())})")
    return t.numpy()


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if _LIBC is not None else 0


def release(*tensors: torch.Tensor) -> None:
    """Drop the memory-mapped pages of tensors we are done with from this process (Linux).

    A file mapping keeps every page it touched resident (and counted in RSS) until unmapped;
    MADV_DONTNEED on a read-only private file mapping just forgets them (they would re-read from
    the file), so reading the checkpoint tensor by tensor keeps the footprint at one tensor.
    """
    _madvise(tensors, 4)  # MADV_DONTNEED


def prefetch(*tensors: torch.Tensor) -> None:
    """Ask the kernel to start reading memory-mapped tensors from disk now (MADV_WILLNEED).

    Page faults alone read a cold file in small synchronous steps; asking ahead for the tensors
    queued next keeps the disk busy while workers transpose and write.
    """
    _madvise(tensors, 3)  # MADV_WILLNEED


def _madvise(tensors: tuple[torch.Tensor, ...], advice: int) -> None:
    if _LIBC is None:
        return
    for t in tensors:
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size < _PAGE:
            continue
        first = (start + _PAGE - 1) // _PAGE * _PAGE  # whole pages inside this storage only
        length = (start + size - first) // _PAGE * _PAGE
        if length > 0:
            _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), advice)
