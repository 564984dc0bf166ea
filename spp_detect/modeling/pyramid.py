"""The image pyramid of SPP-net detection and the choice of one scale per window (sec. 4.1)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SCALE_RULES",
    "scale_factor",
    "scale_factors",
    "resize_image",
    "choose_scales",
    "random_scales",
]


def scale_factor(image_hw: Tuple[int, int], scale: int, max_size: int = 2000) -> float:
    """Resize factor that makes ``min(h, w) == scale``, capped so ``max(h, w) <= max_size``.

    Args:
        image_hw: ``(height, width)`` of the original image in pixels.
        scale: target shorter side in pixels (sec. 4.1: 688, or one of 480..1200).
        max_size: cap on the longer side (the SPP_net code: 2000).
    Returns:
        The factor f; a box in original pixels maps to ``box * f`` in the resized image.
    """
    h, w = image_hw
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    f = scale / min(h, w)
    if max_size and max(h, w) * f > max_size:
        f = max_size / max(h, w)
    return float(f)


def scale_factors(
    image_hw: Tuple[int, int], scales: Sequence[int], max_size: int = 2000
) -> List[float]:
    """``scale_factor`` for each scale of the pyramid."""
    return [scale_factor(image_hw, s, max_size) for s in scales]


def resize_image(image: Tensor, factor: float) -> Tensor:
    """Resize a normalised image by ``factor`` (bilinear, as OpenCV's resize in the SPP_net code).

    Args:
        image (Tensor[3, H, W]): float, normalised.
    Returns:
        Tensor[3, round(H * f), round(W * f)], at least 1 x 1.
    """
    h, w = image.shape[-2:]
    size = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    if size == (h, w):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


SCALE_RULES = ("area", "code")


def choose_scales(
    windows: Tensor,
    factors: Sequence[float],
    target_size: int = 224,
    rule: str = "area",
    code_target: float = 208.0,
) -> Tensor:
    """One pyramid level per window (sec. 4.1).

    ``rule="area"`` (the paper's text): "We use the scale where the scaled candidate window has
    a number of pixels closest to 224 x 224", i.e. ``argmin_k |area * f_k^2 - target_size^2|``.

    ``rule="code"`` (the SPP_net code, ``spm_expected_scale.m``): the expected shorter side is
    ``round(sz_conv_standard * step_standard * min(H, W) / sqrt(area))`` (ZF-5: 13 * 16 = 208)
    and the level whose shorter side is nearest to it wins. With ``s_k = f_k * min(H, W)`` this is
    ``argmin_k |f_k - code_target / sqrt(area)|``: the window's resized side ``sqrt(area) * f_k``
    closest to ``code_target`` on a linear scale of the factor (the paper's rule compares
    areas, so the two differ when a window falls between two levels).

    Args:
        windows (Tensor[R, 4]): xyxy in pixels of the original image.
        factors: resize factor of each pyramid level, in pyramid order.
        target_size: side of the target area (224), for ``rule="area"``.
        rule: "area" or "code".
        code_target: ``sz_conv_standard * step_standard`` in pixels, for ``rule="code"``.
    Returns:
        LongTensor[R]: index into ``factors`` for each window (ties go to the first).
    """
    if windows.ndim != 2 or windows.shape[1] != 4:
        raise ValueError(f"windows must be Tensor[R, 4], got {tuple(windows.shape)}")
    if len(factors) == 0:
        raise ValueError("at least one scale is needed")
    if rule not in SCALE_RULES:
        raise ValueError(f"scale rule must be one of {SCALE_RULES}, got {rule!r}")
    wh = (windows[:, 2:] - windows[:, :2]).double().clamp(min=0)
    area = wh[:, 0] * wh[:, 1]
    f = torch.as_tensor(list(factors), dtype=torch.float64, device=windows.device)
    if rule == "area":
        dist = (area[:, None] * f[None, :] ** 2 - float(target_size) ** 2).abs()
    else:
        expected = float(code_target) / area.clamp(min=1e-12).sqrt()
        dist = (f[None, :] - expected[:, None]).abs()
    return dist.argmin(dim=1)


def random_scales(num_windows: int, num_scales: int, generator: np.random.Generator) -> Tensor:
    """A uniformly random pyramid level per window (the SPP_net code's training rule)."""
    return torch.from_numpy(generator.integers(0, num_scales, size=num_windows)).long()
