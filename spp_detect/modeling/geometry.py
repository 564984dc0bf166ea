"""Geometry of a conv network, computed by walking its conv and pooling layers in order
(SPP-net appendix A), never typed by hand:

- ``stride`` S: the product of the layer strides;
- ``center_offset`` c: the receptive-field centre of map cell ``j`` is at input pixel
  ``c + S * j`` (pixel ``i`` has its centre at ``i``). A layer with kernel k, dilation d and
  left padding p moves the centre by ``S_in * ((d * (k - 1)) / 2 - p)``, so with padding
  ``floor(k / 2)`` and odd kernels everywhere (ZF-5, EfficientNet-Lite0 in timm) c = 0; VGG-16's
  2x2 pools give 7.5 and AlexNet's unpadded pools and 11x11 conv1 give 15.
- ``receptive_field``: the side, in input pixels, of the window one cell sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

from torch import nn

__all__ = ["LayerGeometry", "spatial_layers", "walk_geometry", "output_size", "min_input_size"]


@dataclass(frozen=True)
class LayerGeometry:
    """One conv or pooling layer along one axis (left padding ``padding``, right the same)."""

    kernel: int
    stride: int
    padding: int
    dilation: int = 1
    ceil_mode: bool = False

    def output_size(self, n: int) -> int:
        """Output length for input length ``n`` (PyTorch's rule, ceil mode included)."""
        span = n + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        if span < 0:
            return 0
        out = (-(-span // self.stride) if self.ceil_mode else span // self.stride) + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.padding:
            out -= 1  # PyTorch: the last window must start inside the input or left padding
        return out


def _axis(value: Any, axis: int) -> int:
    return int(value[axis]) if isinstance(value, (tuple, list)) else int(value)


def spatial_layers(module: nn.Module, axis: int = 1) -> List[LayerGeometry]:
    """The conv and pooling layers of ``module`` in registration order, along ``axis`` (0: y, 1: x).

    Assumes registration order is forward order and that every branch (residuals, 1x1 squeeze
    convs) keeps the main path's geometry; the brute-force receptive-field test checks both.
    """
    layers = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k, d, s = _axis(m.kernel_size, axis), _axis(m.dilation, axis), _axis(m.stride, axis)
            if m.padding == "valid":
                p = 0
            elif m.padding == "same":  # stride 1 only; PyTorch puts the odd pixel on the right
                p = d * (k - 1) // 2
            else:
                p = _axis(m.padding, axis)
            layers.append(LayerGeometry(k, s, p, d))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = _axis(m.kernel_size, axis), _axis(m.stride, axis), _axis(m.padding, axis)
            d = _axis(getattr(m, "dilation", 1), axis)
            layers.append(LayerGeometry(k, s, p, d, bool(m.ceil_mode)))
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            raise ValueError(f"{type(m).__name__}: adaptive pooling has no fixed geometry")
    return layers


def walk_geometry(layers: Sequence[LayerGeometry]) -> Tuple[int, float, int]:
    """``(stride, center_offset, receptive_field)`` of the last layer's cells, in input pixels.

    Output cell ``j`` of a layer covers its input cells ``s * j - p ... s * j - p + d * (k - 1)``,
    centred at ``s * j - p + d * (k - 1) / 2``; mapping that input cell back to pixels
    (``c_in + S_in * i``) gives ``c_out = c_in + S_in * (d * (k - 1) / 2 - p)``,
    ``S_out = S_in * s`` and a field growing by ``S_in * d * (k - 1)``.
    """
    stride, offset, field = 1, 0.0, 1
    for g in layers:
        span = g.dilation * (g.kernel - 1)
        offset += stride * (span / 2.0 - g.padding)
        field += stride * span
        stride *= g.stride
    return stride, offset, field


def output_size(layers: Sequence[LayerGeometry], n: int) -> int:
    for g in layers:
        n = g.output_size(n)
        if n < 1:
            return 0
    return n


def min_input_size(layers: Sequence[LayerGeometry], limit: int = 4096) -> int:
    for n in range(1, limit + 1):
        if output_size(layers, n) >= 1:
            return n
    raise ValueError(f"no input up to {limit} pixels gives a non-empty map")
