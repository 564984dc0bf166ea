"""The SPP-net detector (sec. 4): one conv pass per image and scale, each window projected onto
the conv5 map (appendix A) and pyramid-pooled (6x6, 3x3, 2x2, 1x1), then the shared head of
``base.WindowDetector``."""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..utils import StageTimer, null_timer
from .base import WindowDetector
from .box_regression import BoxRegressor
from .fast_head import Int8Rows, quantize_map
from .workspace import Workspace
from .pyramid import choose_scales, resize_image, scale_factors
from .window_pool import bin_major_order, pool_windows, project_windows

__all__ = ["SPPDetector", "ZF5_INWARD_OFFSET", "permute_fc6_inputs"]

# The SPP_net code's inward move of each window edge for ZF-5 (stride 16), in pixels.
ZF5_INWARD_OFFSET = 6.5


class SPPDetector(WindowDetector):
    """SPP-net: conv5 once per image and scale, windows pooled from the feature map.

    Args:
        backbone: conv layers with ``stride``, ``center_offset`` and ``out_channels``.
        class_names: the K object classes.
        config: ``model.scales`` (shorter sides of the pyramid), ``model.levels`` (6, 3, 2, 1).
    """

    method = "spp"
    # Layout of the pooled features this detector's head and box regressor read
    # (``window_pool.POOLED_LAYOUTS``): "channel" as trained (and for training); "bin" in the
    # test-time copies ``with_settings`` makes with a compressed or fast head
    # (``configure_test_head``).
    pooled_layout = "channel"

    @property
    def pooled_dim(self) -> int:
        return int(self.backbone.out_channels) * sum(n * n for n in self.config.model.levels)

    @property
    def inward_offset(self) -> float:
        """Pixels each window edge moves inward before projection (``model.inward_offset``;
        None: the SPP_net code's 6.5 px for ZF-5's stride 16, as a fraction of the stride)."""
        d = self.config.model.inward_offset
        return ZF5_INWARD_OFFSET * self.backbone.stride / 16.0 if d is None else float(d)

    @property
    def code_target(self) -> float:
        """``sz_conv_standard * step_standard`` of the SPP_net code's scale rule: the conv5 size
        of a ``target_size`` input times the stride (ZF-5: 13 * 16 = 208)."""
        t = self.config.model.target_size
        cells = self.backbone.feature_size(t, t)[0]
        return float(cells * self.backbone.stride)

    @property
    def pooled_dtype(self) -> torch.dtype:
        """dtype of ``compute_pooled``'s features: what fc6 consumes. bfloat16 in the test-time
        copies with ``test.fast_head="bf16"`` (pooled straight into it: max pooling commutes
        with rounding, so the values equal the float32 ones rounded, with no float32 round
        trip; their box regressor takes it too), int8 with ``"int8map"`` (``pool_from_maps``
        then returns ``Int8Rows``), else float32."""
        mode = getattr(self.head, "fast_mode", "off") if self.pooled_layout == "bin" else "off"
        return {"bf16": torch.bfloat16, "int8map": torch.int8}.get(mode, torch.float32)

    def configure_test_head(self, head: nn.Module) -> nn.Module:
        """``with_settings`` hook (called on the new configured copy): this copy reads its
        pooled features in the ``"bin"`` layout, which ``pool_windows`` writes as it gathers
        them, without the transpose to the SPP layer's layout. fc6's input columns and the box
        regressor's feature rows are permuted to match: the same products summed in another
        order, so the detections equal the trained layout's up to float rounding.

        Args:
            head: the float32 head (possibly compressed) the copy is about to convert; not
                changed (the permuted head shares all its other tensors).
        Returns:
            The head to convert.
        """
        order = bin_major_order(self.backbone.out_channels, self.config.model.levels)
        self.pooled_layout = "bin"
        reg = self.bbox_regressor
        if reg is not None and reg.feature_dim == order.numel():
            self.bbox_regressor = _permute_regressor_features(reg, order)
        return permute_fc6_inputs(head, order)

    def scale_factors(self, image_hw: Tuple[int, int]) -> List[float]:
        return scale_factors(image_hw, self.config.model.scales, self.config.model.max_size)

    def conv_maps(self, image: Tensor, timer: Optional[StageTimer] = None) -> List[Tensor]:
        """conv5 of the image at every scale of the pyramid.

        Args:
            image (Tensor[3, H, W]): preprocessed, on the model's device.
        Returns:
            One ``Tensor[C, h_s, w_s]`` per scale, in ``config.model.scales`` order.
        """
        timer = timer or null_timer()
        maps = []
        with timer("conv"):
            for f in self.scale_factors(tuple(image.shape[-2:])):
                maps.append(self.backbone(resize_image(image, f)[None])[0])
        return maps

    def pool_from_maps(
        self,
        maps: Sequence[Tensor],
        factors: Sequence[float],
        windows: Tensor,
        scale_idx: Optional[Tensor] = None,
        dtype: Optional[torch.dtype] = None,
        workspace: Optional[Workspace] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Project each window onto its scale's map (appendix A) and pyramid-pool it.

        Args:
            maps: ``Tensor[C, h_s, w_s]`` per scale.
            factors: resize factor per scale (original pixels -> resized pixels).
            windows (Tensor[R, 4]): xyxy in pixels of the original image.
            scale_idx (LongTensor[R]): the scale of each window; ``None`` applies
                ``config.model.scale_rule`` (sec. 4.1: resized area closest to 224^2).
            dtype: of the features (default: the maps'). ``torch.int8``: each map is
                quantised with its own scale (``fast_head.quantize_map``) and pooled in int8.
            workspace: pool into its buffer (test time: the features do not outlive the
                image; ``modeling/workspace.py``); None: a new tensor.
        Returns:
            pooled (Tensor[U, C * 50], or ``Int8Rows`` for int8) for the U distinct (scale,
            cells) pairs, in this detector's ``pooled_layout``, inverse (LongTensor[R]).
            Windows that fall on the same cells share features, so fc6/fc7 run once for them.
        """
        if scale_idx is None:
            m = self.config.model
            scale_idx = choose_scales(
                windows, factors, m.target_size, rule=m.scale_rule, code_target=self.code_target
            )
        scale_idx = scale_idx.to(windows.device)
        keys = torch.zeros(windows.shape[0], 5, dtype=torch.long, device=windows.device)
        keys[:, 0] = scale_idx
        for s, (fmap, f) in enumerate(zip(maps, factors)):
            idx = torch.nonzero(scale_idx == s).flatten()
            if idx.numel():
                keys[idx, 1:] = project_windows(
                    windows[idx] * f,
                    self.backbone.stride,
                    self.backbone.center_offset,
                    tuple(fmap.shape[-2:]),
                    inward=self.inward_offset,
                )
        uniq, inverse = _unique_rows(keys)
        shape, dtype = (uniq.shape[0], self.pooled_dim), dtype or maps[0].dtype
        if workspace is None:
            pooled = maps[0].new_empty(shape, dtype=dtype)
        else:
            pooled = workspace.get("pooled", shape, dtype, maps[0].device)
        quantised = dtype == torch.int8
        row_scale = maps[0].new_ones(uniq.shape[0], 1, dtype=torch.float32) if quantised else None
        stops = torch.bincount(uniq[:, 0], minlength=len(maps)).cumsum(0).tolist()
        for s, fmap in enumerate(maps):
            start, stop = (stops[s - 1] if s else 0), stops[s]
            if stop > start:
                if quantised:
                    fmap, scale = quantize_map(fmap)
                    row_scale[start:stop] = scale
                pool_windows(
                    fmap,
                    uniq[start:stop, 1:],
                    self.config.model.levels,
                    layout=self.pooled_layout,
                    dtype=dtype,
                    out=pooled[start:stop],
                )
        if quantised:
            return Int8Rows(pooled, row_scale), inverse
        return pooled, inverse

    def compute_pooled(
        self, image: Tensor, windows: Tensor, timer: StageTimer
    ) -> Tuple[Tensor, Tensor]:
        maps = self.conv_maps(image, timer)
        with timer("pool"):
            factors = self.scale_factors(tuple(image.shape[-2:]))
            pooled, inverse = self.pool_from_maps(
                maps, factors, windows, dtype=self.pooled_dtype, workspace=self._workspace()
            )
        return pooled, inverse

    def _workspace(self) -> Workspace:
        """This detector's test-time buffers, made on first use. A ``with_settings`` copy made
        afterwards shares them (its calls on a thread come one after another, and each thread
        has its own); a deep copy starts with none."""
        if getattr(self, "_test_workspace", None) is None:
            self._test_workspace = Workspace()
        return self._test_workspace


def _unique_rows(keys: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.unique(keys, dim=0, return_inverse=True)`` for small non-negative ints, sorted
    by the first column (so each scale's windows are one block of rows, pooled in place): one
    integer per row, 30x faster than ``unique(dim=0)``'s row sort for 2,000 windows."""
    if keys.shape[0] == 0:
        return keys, keys.new_zeros(0)
    radix = keys.max(dim=0).values + 1
    flat = keys[:, 0]
    for j in range(1, keys.shape[1]):
        flat = flat * radix[j] + keys[:, j]  # < prod(radix): ~1e13 for 5 scales of 60 x 60
    _, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    positions = torch.arange(keys.shape[0], device=keys.device)
    first = torch.empty_like(positions[: int(inverse.max()) + 1]).scatter_(0, inverse, positions)
    return keys[first], inverse


class _TestRegressor(BoxRegressor):
    """A test-time box regressor whose deltas are float32 whatever its features' dtype.

    With ``test.fast_head="bf16"`` it reads the bfloat16 pooled features as they are: the
    product runs in bfloat16 (weights rounded to bfloat16, float32 sums: measured |error|
    1.2e-3 on products of magnitude 0.4 for 12,800 features, a tenth of a percent of a box
    side), 2.5x faster than float32 and without a float32 copy of the features; boxes and NMS
    stay float32.
    """

    def predict_deltas(self, features) -> Tensor:
        if isinstance(features, Int8Rows):  # test.fast_head="int8map": a few rows, in bf16
            features = features.dequantize(torch.bfloat16)
        return super().predict_deltas(features).float()

    def _folded(self, dtype: torch.dtype, dev: torch.device) -> Tuple[Tensor, ...]:
        # A test-time copy's weights do not change: fold them once per dtype and device (the
        # 12,800 x 4K permute, scale and cast took ~1 ms of every image), and again only if a
        # weight was written to.
        inputs = (self.weight, self.feature_scale, self.target_transform, self.target_mean)
        key = (dtype, dev, *((t.data_ptr(), t._version) for t in inputs))
        memo = self.__dict__.setdefault("_folded_memo", {})
        if key not in memo:
            memo.clear()
            memo[key] = super()._folded(dtype, dev)
        return memo[key]


def _permute_regressor_features(reg: BoxRegressor, order: Tensor) -> BoxRegressor:
    """A test-time copy of ``reg`` reading features permuted by ``order``
    (``x_new = x[:, order]``)."""
    state = dict(reg.state_dict())
    weight = state["weight"]  # [K, D + 1, 4], last row: bias
    order = order.to(weight.device)
    state["weight"] = weight[:, torch.cat([order, order.new_tensor([weight.shape[1] - 1])])]
    return _TestRegressor.from_state_dict(state).to(weight.device)


def permute_fc6_inputs(head: nn.Module, order: Tensor) -> nn.Module:
    """A copy of ``head`` whose fc6 reads its input permuted: ``copy(x[:, order]) == head(x)``.

    The weight columns of fc6's first linear map (``fc6`` itself, or the first layer of the
    low-rank ``nn.Sequential`` of ``FCHead.compress``) are permuted; every other tensor is
    shared with ``head``, which is not changed.

    Args:
        head: an ``FCHead`` (float32, possibly compressed).
        order (LongTensor[in_features]): a permutation of fc6's inputs.
    """
    seq = isinstance(head.fc6, nn.Sequential)
    first = head.fc6[0] if seq else head.fc6
    if not isinstance(first, nn.Linear) or first.in_features != order.numel():
        raise ValueError(f"fc6 must start with a Linear of {order.numel()} inputs, got {first}")
    new_first = copy.copy(first)
    new_first._parameters = dict(first._parameters)  # its own weight, the same bias
    weight = first.weight.detach()[:, order.to(first.weight.device)]
    new_first.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
    out = copy.copy(head)
    out._modules = dict(head._modules)  # nn.Module keeps its children in a dict
    out.fc6 = nn.Sequential(new_first, *list(head.fc6)[1:]) if seq else new_first
    return out
