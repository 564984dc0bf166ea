"""Test-time conv pass options (issue 11): a configured copy of a backbone, never the original.

- ``"channels_last"``: weights in NHWC memory layout; PyTorch's oneDNN convolutions then run in
  channels-last for any input and return channels-last maps (``pool_windows`` reads its
  channels-last table from them without a transpose).
- ``"bf16"``: the copy's weights and activations in bfloat16 (channels-last too), conv5
  returned in float32: its values change by about bfloat16's 2**-9 relative rounding.

Both SPP-net (one map per scale) and R-CNN (crops in chunks) call ``backbone(images)``, so a
configured copy applies to both alike (``WindowDetector.with_settings(fast_conv=...)``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["FAST_CONV_MODES", "fast_backbone"]

FAST_CONV_MODES = ("off", "channels_last", "bf16")


class _Cast(nn.Module):
    """``x.to(dtype, memory_format)``: the entry and exit of a bfloat16 body."""

    def __init__(self, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=fmt)


def fast_backbone(backbone: nn.Module, mode: str) -> nn.Module:
    """``backbone`` itself for ``"off"``, else a copy in ``mode`` (see the module docstring).

    Args:
        backbone: a ``Backbone`` (its ``body`` is the conv stack); not changed.
        mode: one of ``FAST_CONV_MODES``.
    Raises:
        ValueError: an unknown mode.
    """
    if mode not in FAST_CONV_MODES:
        raise ValueError(f"fast_conv must be one of {', '.join(FAST_CONV_MODES)}, got {mode!r}")
    if mode == "off":
        return backbone
    out = copy.deepcopy(backbone)
    out.fast_conv = mode
    if mode == "channels_last":
        return out.to(memory_format=torch.channels_last)
    body = out.body.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    # conv5 back to float32: pooling a bf16 map halves its bytes (tools/bench_pool.py --stages)
    # but SPP-net's caller then casts the pooled features to float32, which cost more than it
    # saved in the speed report (docs/speed.md).
    out.body = nn.Sequential(_Cast(torch.bfloat16, True), body, _Cast(torch.float32, False))
    return out
