"""Test-time fc6/fc7 at lower precision: a read-only copy of a trained ``FCHead``.

On a CPU, fc6 (12800 x 4096 for ZF-5) and fc7 (4096 x 4096) applied to ~2,000 windows dominate
SPP-net's test time (issue 11: 79% of it in float32). Two cheaper arithmetics, measured with
``tools/bench_fc.py`` (figures in ``docs/speed.md``):

- ``"bf16"``: weights and activations in bfloat16, float32 accumulation (oneDNN's AVX-512 BF16
  kernels where the CPU has them; CUDA tensor cores on a GPU). Each product carries a relative
  error of at most ``2 * 2**-9`` (two roundings to an 8-bit significand).
- ``"int8"``: dynamic quantisation: int8 weights with one scale per output row, activations
  quantised per window (per row) at run time, int32 accumulation (AVX-512 VNNI). Error per
  product: half a quantisation step of the weight and of the activation.
- ``"int8map"``: SPP-net's pooled features arrive already in int8 (``Int8Rows``): the conv5
  map is quantised once per image and scale (``quantize_map``, 0.6M values instead of the
  ~25M pooled ones) and pooled in int8, which is exact since max commutes with the monotone
  rounding. fc6's first linear map (the big one: 12,800 inputs) runs int8 x int8 -> int32
  with no activation pass at all; the rest of fc6/fc7 runs in bfloat16. Given float features
  (R-CNN's), the first map quantises each row itself, as ``"int8"`` does.

Either combines with the truncated SVD of ``FCHead.compress`` (Fast R-CNN's ranks 1024/256),
which cuts the multiply-adds by 4-10x before the arithmetic gets cheaper. The head built here
is never saved: ``WindowDetector.with_settings(fast_head=...)`` makes it from the trained head,
which stays as it was (and is what ``save`` writes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .head import FCHead
from .workspace import Transient, Workspace

__all__ = [
    "FAST_HEAD_MODES", "FastFCHead", "Int8Linear", "Int8Rows", "build_fast_head", "quantize_map"
]  # fmt: skip

# "off": the float32 head as trained.
FAST_HEAD_MODES = ("off", "bf16", "int8", "int8map")

# Symmetric int8 range: weights and activations quantised to [-127, 127] (no -128), so that
# a product of two never overflows the int16 pairs VNNI adds before its int32 accumulation.
_INT8_MAX = 127.0


@dataclass(frozen=True)
class Int8Rows:
    """Feature rows in int8 with one float32 scale per row: the features are
    ``values * scale``. What an SPP-net copy with ``test.fast_head="int8map"`` pools.

    Attributes:
        values (Tensor[N, D] int8), scale (Tensor[N, 1] float32).
    """

    values: Tensor
    scale: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __getitem__(self, index) -> "Int8Rows":
        return Int8Rows(self.values[index], self.scale[index])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.values.to(dtype) * self.scale.to(dtype)


def quantize_map(feature_map: Tensor) -> Tuple[Tensor, float]:
    """``(q, s)``: ``feature_map`` as int8 ``q = round(x / s)`` in [-127, 127] with one scale
    ``s = max |x| / 127`` (1 for an all-zero map), so that ``q * s`` is within ``s / 2`` of
    ``x``. Max pooling commutes with it: the max of ``q`` over a bin is the quantised max."""
    peak = 0.0
    if feature_map.numel():
        lo, hi = torch.aminmax(feature_map)
        peak = max(-float(lo), float(hi))
    scale = peak / _INT8_MAX if peak > 0 else 1.0
    # One float temporary, rounded and clamped in place: each large temporary costs a fresh
    # (huge-page) allocation, which took longer than the arithmetic.
    q = feature_map.float() / scale
    return q.round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8), scale


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output row) and per-row dynamic int8
    activations; ``y = (q(x) @ q(W)^T) * s_x * s_w + b``, computed with ``torch._int_mm``
    (int8 x int8 -> int32, oneDNN / VNNI on the CPU, cuBLASLt on CUDA). Rows already in int8
    (``Int8Rows``) go straight in.

    Args:
        layer: a trained float ``nn.Linear`` (not changed).
        out_dtype: dtype of the output (float32; bfloat16 when a bfloat16 layer follows).
    """

    def __init__(self, layer: nn.Linear, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        w = layer.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / _INT8_MAX  # [out]
        # Stored transposed ([in, out], column-major view of [out, in]) as _int_mm wants it.
        q = torch.round(w / scale[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = layer.bias.detach().float() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features = layer.in_features
        self.out_features = layer.out_features

    def forward(
        self, x: Union[Tensor, Int8Rows], workspace: Optional[Workspace] = None, name: str = ""
    ) -> Tensor:
        """Tensor[N, in] float or ``Int8Rows`` -> Tensor[N, out] in ``out_dtype``; with a
        ``workspace``, the result is its buffer ``name`` (valid until that is reused)."""
        if isinstance(x, Int8Rows):
            qx, sx = x.values, x.scale.float()
        else:
            x = x.float()
            sx = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / _INT8_MAX  # [N, 1]
            qx = torch.round(x / sx).to(torch.int8)
        shape = (qx.shape[0], self.out_features)

        def buffer(suffix: str, dtype: torch.dtype) -> Tensor:
            if workspace is None:
                return torch.empty(shape, dtype=dtype, device=qx.device)
            return workspace.get(name + suffix, shape, dtype, qx.device)

        acc = _int8_matmul(qx, self.weight_t, buffer(".acc", torch.int32))
        # Scales and bias in place on one float32 copy of the int32 sums.
        y = buffer("" if self.out_dtype == torch.float32 else ".f32", torch.float32).copy_(acc)
        y.mul_(self.weight_scale).mul_(sx)
        if self.bias is not None:
            y.add_(self.bias)
        return y if self.out_dtype == torch.float32 else buffer("", self.out_dtype).copy_(y)


def _int8_matmul(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """int8 ``[N, K] @ [K, M] -> int32`` into ``out`` ``[N, M]``; ``torch._int_mm`` needs
    ``N > 16`` on some backends, so a few rows are padded."""
    n = a.shape[0]
    if n > 16:
        return torch._int_mm(a, b, out=out)
    pad = a.new_zeros(17, a.shape[1])
    pad[:n] = a
    return out.copy_(torch._int_mm(pad, b)[:n])


def _convert(layer: nn.Module, mode: str) -> nn.Module:
    """A copy of ``layer`` (``nn.Linear`` or the ``nn.Sequential`` of a truncated SVD) in
    ``mode``'s arithmetic; ``"int8map"``: the first linear map in int8, the rest bfloat16."""
    if isinstance(layer, nn.Sequential):
        rest = "bf16" if mode == "int8map" else mode
        return nn.Sequential(
            *(_convert(sub, mode if i == 0 else rest) for i, sub in enumerate(layer))
        )
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"cannot convert {type(layer).__name__} to a fast layer")
    if mode == "bf16":
        return copy.deepcopy(layer).to(torch.bfloat16)
    return Int8Linear(layer, torch.bfloat16 if mode == "int8map" else torch.float32)


def _scale_inputs(layer: nn.Module, scale: float) -> nn.Module:
    """A copy of ``layer`` (``nn.Linear`` or a low-rank ``nn.Sequential``) computing
    ``layer(scale * x)``: its first linear map's weight times ``scale``."""
    layer = copy.deepcopy(layer)
    first = layer[0] if isinstance(layer, nn.Sequential) else layer
    with torch.no_grad():
        first.weight.mul_(scale)
    return layer


class FastFCHead(nn.Module):
    """fc6 -> ReLU -> fc7 -> ReLU in bfloat16 or int8, then the float32 cls_score; test only.

    Same interface as ``FCHead`` at test time (``predict``, ``fc7_features``, ``cls_score``,
    ``svd_ranks``, ``hidden``); fc7 comes back as float32 for the SVMs.

    Args:
        head: a trained ``FCHead``, possibly compressed by truncated SVD (not changed: the
            layers here are copies).
        mode: ``"bf16"`` or ``"int8"`` (see the module docstring).
    """

    def __init__(self, head: FCHead, mode: str) -> None:
        super().__init__()
        if mode not in FAST_HEAD_MODES or mode == "off":
            raise ValueError(f"fast_head must be one of {', '.join(FAST_HEAD_MODES)}, got {mode!r}")
        self.fast_mode = mode
        self.in_features, self.num_classes = head.in_features, head.num_classes
        self.hidden = head.hidden
        self.svd_ranks = tuple(head.svd_ranks)
        self.dtype = torch.float32 if mode == "int8" else torch.bfloat16
        self.register_buffer("input_scale", head.input_scale.detach().clone())
        # fc6(s * x) = (s W) x + b: the input scale goes into fc6's first weight here, which
        # saves a pass over the ~2,000 x 12,800 pooled values of every image.
        self.fc6 = _convert(_scale_inputs(head.fc6, float(head.input_scale)), mode)
        self.fc7 = _convert(head.fc7, "bf16" if mode == "int8map" else mode)
        # cls_score is (K + 1) x 4096: too small to matter; kept in float32.
        self.cls_score = copy.deepcopy(head.cls_score)
        self.requires_grad_(False)
        self.eval()
        # fc6/fc7's intermediates have the same sizes on every image: reused buffers, not
        # fresh pages (modeling/workspace.py). Only fc7's float32 result is a new tensor.
        self.workspace = Workspace()
        self.packed = _PackedWeights()

    def compress(self, fc6_rank: int, fc7_rank: int) -> "FastFCHead":
        raise ValueError("compress the float32 head (FCHead.compress), then make it fast")

    def fc7_features(
        self, pooled: Union[Tensor, Int8Rows], dropout: Optional[bool] = None
    ) -> Tensor:
        """Tensor[R, in_features] (any float dtype) or ``Int8Rows`` (``"int8map"``) ->
        Tensor[R, hidden] float32 (fc7 after ReLU). No dropout: for testing only."""
        if dropout:
            raise ValueError("a fast head is for testing only (no dropout)")
        if self.fast_mode != "int8map":  # int8map's first map quantises float rows itself
            pooled = pooled.to(self.dtype)
        # input_scale is in fc6's weight. The ReLUs go with each layer's last linear map.
        x = self._run(self.fc6, pooled, "fc6", relu=True)
        x = self._run(self.fc7, x.to(self.dtype), "fc7", relu=True)
        return x.float() if x.dtype != torch.float32 else x.clone()

    def _run(self, layer: nn.Module, x, name: str, relu: bool = False) -> Tensor:
        """``layer(x)``, then ReLU if ``relu``, for a Linear, an ``Int8Linear`` or a low-rank
        ``nn.Sequential`` of them (ReLU after its last map). bfloat16 Linears on the CPU run
        on weights packed once for oneDNN with the ReLU fused (``_PackedWeights``); the other
        outputs go into workspace buffers named after their layer."""
        if isinstance(layer, nn.Sequential):
            for i, sub in enumerate(layer):
                x = self._run(sub, x, f"{name}.{i}", relu and i == len(layer) - 1)
            return x
        if isinstance(layer, Int8Linear):
            y = layer(x, self.workspace, name)
            return torch.relu_(y) if relu else y
        packed = self.packed.get(name, layer, x)
        if packed is not None:
            return packed(x, relu)
        out = self.workspace.get(name, (x.shape[0], layer.out_features), x.dtype, x.device)
        if layer.bias is None:
            y = torch.mm(x, layer.weight.t(), out=out)
        else:
            y = torch.addmm(layer.bias, x, layer.weight.t(), out=out)
        return torch.relu_(y) if relu else y

    def predict(self, pooled: Union[Tensor, Int8Rows]) -> Tuple[Tensor, Tensor]:
        """``(fc7 Tensor[R, hidden] float32, cls_score logits Tensor[R, K + 1])``."""
        fc7 = self.fc7_features(pooled)
        return fc7, self.cls_score(fc7)

    def forward(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        return self.predict(pooled)


class _PackedWeights(Transient):
    """bfloat16 fc weights reordered once into oneDNN's blocked layout, with bias and ReLU
    fused into the product (``torch.ops.mkldnn._linear_pointwise``, the kernels that
    Inductor's CPU freezing uses). Unpacked, oneDNN reorders a plain weight on every call:
    measured on fc6/fc7 at 512/512 for ~1,450 windows, 84.5 -> 81.3 ms (workspace path ->
    packed). Made on first use per layer; where the ops are missing or fail (not a CPU, a
    build without oneDNN), the caller's plain product is used. Not copied with its module
    (packed tensors have no storage to copy)."""

    def __init__(self) -> None:
        self._fns: Dict[str, Optional[Callable[[Tensor, bool], Tensor]]] = {}

    def get(self, name: str, layer: nn.Linear, x: Tensor) -> Optional[Callable]:
        if name not in self._fns:
            self._fns[name] = _pack(layer, x)
        return self._fns[name]


# Rows per call that packed weights are laid out for (~1,500 distinct windows per image).
_PACK_BATCH = 1024


def _pack(layer: nn.Linear, x: Tensor) -> Optional[Callable[[Tensor, bool], Tensor]]:
    """A packed ``(x, relu) -> relu?(layer(x))`` for a bfloat16 CPU layer, or None."""
    ops = getattr(torch.ops, "mkldnn", None)
    if x.device.type != "cpu" or layer.weight.dtype != torch.bfloat16 or ops is None:
        return None
    try:
        # oneDNN picks the packed layout for a batch size: a detection-sized one (the first
        # call may be a handful of windows), not whatever came first.
        weight = ops._reorder_linear_weight(layer.weight.detach(), max(_PACK_BATCH, x.shape[0]))
        bias = None if layer.bias is None else layer.bias.detach()

        def run(v: Tensor, relu: bool) -> Tensor:
            return ops._linear_pointwise(v, weight, bias, "relu" if relu else "none", [], "")

        probe = x[:17].contiguous()  # the same product as the plain layer, or not used
        if not torch.equal(run(probe, False), nn.functional.linear(probe, layer.weight, bias)):
            return None
        return run
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def build_fast_head(head: FCHead, mode: str) -> nn.Module:
    """``head`` itself for ``mode == "off"``, else a ``FastFCHead`` copy of it."""
    if mode == "off":
        return head
    return FastFCHead(head, mode)
