"""Loading trained parts whose buffer shapes are only known after training."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = ["resize_buffers_to"]


def resize_buffers_to(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str) -> None:
    """Give each buffer of ``module`` the shape it has in ``state_dict`` before loading.

    The SVMs and box regressors learn their feature dimension D from the data, so a freshly
    built module cannot know it; call this from ``_load_from_state_dict``.
    """
    for name, buf in module._buffers.items():
        src = state_dict.get(prefix + name)
        if buf is not None and isinstance(src, Tensor) and src.shape != buf.shape:
            module._buffers[name] = torch.empty(src.shape, dtype=buf.dtype, device=buf.device)
