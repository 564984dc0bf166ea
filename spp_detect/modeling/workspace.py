"""Buffers that test-time code reuses from one image to the next (CPU).

On the CPU every tensor above glibc's mmap threshold (fixed at 1 MiB by
``utils.limit_heap_growth``) is a fresh ``mmap``: first touching its pages costs page faults
and the kernel's zeroing, ~15,000 faults per ``detect`` call of SPP-net at 2,000 windows
(issue 11), for the pooled features and the fc6/fc7 intermediates that have the same sizes on
every image. A ``Workspace`` keeps one buffer per name and hands out views of it; CUDA's
caching allocator already does this, so there it allocates normally.

A view from ``get`` is valid until the next ``get`` of the same name on the same thread: use it
only for values that do not outlive the call that made them (each thread has its own buffers).
"""

from __future__ import annotations

import math
import threading
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Workspace", "Transient"]

# A buffer grows to this many times the size asked for, so that images with a few more
# windows than the last do not reallocate every time.
_GROWTH = 1.25


class Transient:
    """State that a copied or pickled module does not carry (caches that cannot be copied:
    thread-local buffers, packed oneDNN tensors): a copy starts empty, as ``type(self)()``."""

    def __deepcopy__(self, memo) -> "Transient":
        return type(self)()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class Workspace(Transient):
    """Named, reusable CPU buffers (one set per thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device) -> Tensor:
        """An uninitialised contiguous ``Tensor[shape]`` (a view of the buffer ``name``)."""
        device = torch.device(device)
        numel = math.prod(int(s) for s in shape)
        if device.type != "cpu":
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        buffers: Dict[Tuple[str, torch.dtype], Tensor] = self._local.__dict__.setdefault(
            "buffers", {}
        )
        buf = buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(int(numel * _GROWTH) + 1, dtype=dtype)
            buffers[(name, dtype)] = buf
        return buf[:numel].view(tuple(shape))

    def nbytes(self) -> int:
        """Bytes held by this thread's buffers."""
        buffers = self._local.__dict__.get("buffers", {})
        return sum(b.numel() * b.element_size() for b in buffers.values())

    def clear(self) -> None:
        """Release this thread's buffers."""
        self._local.__dict__.pop("buffers", None)
