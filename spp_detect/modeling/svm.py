"""One linear SVM per class on fc7 features: scoring at test time.

SPP-net sec. 4.1 follows R-CNN: one linear SVM per class on fc7 features scaled to a mean L2 norm
of 20 (R-CNN ``rcnn_scale_features``), ``score = w . (s x) + b``. The training lives in
``training/``: liblinear in ``svm_solver.py``, hard negative mining in ``hard_negatives.py``, the
loop in ``svm_training.py``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from .state import resize_buffers_to

__all__ = ["LinearSVMs", "mean_norm_scale", "UNTRAINED_BIAS"]

# A class that never saw both positives and negatives scores this everywhere, far below any
# SVM margin, so it never produces a detection.
UNTRAINED_BIAS = -1.0e4


def mean_norm_scale(features: Tensor, target_norm: float = 20.0) -> float:
    """The factor that gives ``features`` a mean L2 norm of ``target_norm``.

    R-CNN ``rcnn_scale_features``: features are multiplied by ``20 / mean norm`` so that one
    range of C works for pool5, fc6 and fc7 features; the mean is taken once, on a random sample
    of training windows (R-CNN: up to 200 windows of up to 200 images).

    Args:
        features (Tensor[N, D]): a sample of training features.
    Returns:
        float; 1.0 when the sample is empty or all zero.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be Tensor[N, D], got {tuple(features.shape)}")
    if features.shape[0] == 0:
        return 1.0
    mean = float(features.double().norm(dim=1).mean())
    return target_norm / mean if mean > 0 else 1.0


class LinearSVMs(nn.Module):
    """K one-vs-rest linear SVMs on (scaled) fc7 features.

    Args:
        num_classes: K object classes (0-based labels, no background).
        feature_norm: target mean L2 norm of the scaled features (R-CNN: 20).
        feature_scale: the scale factor if already known; else set by ``set_feature_scale``.

    Buffers (``state_dict``): ``weight`` [K, D], ``bias`` [K], ``feature_scale`` () (0 until set),
    ``trained`` [K] bool. A loaded state may have any D.
    """

    def __init__(
        self,
        num_classes: int,
        feature_norm: float = 20.0,
        feature_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LinearSVMs: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.feature_norm = float(feature_norm)
        k = self.num_classes
        self.register_buffer("weight", torch.zeros(k, 0))
        self.register_buffer("bias", torch.zeros(k))
        self.register_buffer("feature_scale", torch.tensor(float(feature_scale or 0.0)))
        self.register_buffer("trained", torch.zeros(k, dtype=torch.bool))

    # -- state ------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def has_feature_scale(self) -> bool:
        return float(self.feature_scale) > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # D is only known after training: take the stored shapes as they come.
        resize_buffers_to(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_state_dict(cls, state: Dict[str, Tensor], **kwargs: Any) -> "LinearSVMs":
        """SVMs rebuilt from ``state_dict()`` (K and D read from the tensors)."""
        if "weight" not in state:
            raise ValueError("LinearSVMs state has no 'weight' tensor")
        model = cls(int(state["weight"].shape[0]), **kwargs)
        model.load_state_dict(state)
        return model

    def set_feature_scale(self, value: Union[float, Tensor]) -> float:
        """Fix the feature scale: a float, or a sample ``Tensor[N, D]`` to compute it from."""
        if isinstance(value, Tensor):
            value = mean_norm_scale(value, self.feature_norm)
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"feature scale must be a positive finite number, got {value}")
        self.feature_scale = torch.tensor(float(value), device=self.feature_scale.device)
        return float(value)

    def reset_weights(self, feature_dim: int) -> None:
        """Zero weights of dimension D (R-CNN's starting model: every window scores 0)."""
        dev = self.weight.device
        self.weight = torch.zeros(self.num_classes, int(feature_dim), device=dev)
        self.bias = torch.zeros(self.num_classes, device=dev)
        self.trained = torch.zeros(self.num_classes, dtype=torch.bool, device=dev)

    def set_class(self, c: int, weight: Tensor, bias: float) -> None:
        """Class ``c``'s trained hyperplane: ``weight`` (Tensor[D]) on scaled features, ``bias``."""
        if weight.shape != (self.feature_dim,):
            raise ValueError(
                f"class {c}: weight must be Tensor[{self.feature_dim}], got {tuple(weight.shape)}"
            )
        self.weight[c] = weight.to(self.weight)
        self.bias[c] = float(bias)
        self.trained[c] = True

    def mark_untrained(self, c: int) -> None:
        """Class ``c`` keeps zero weights and a bias far below any margin (never detected)."""
        if self.feature_dim:
            self.weight[c] = 0
        self.bias[c] = UNTRAINED_BIAS
        self.trained[c] = False

    # -- scoring ----------------------------------------------------------------------------
    def scale_features(self, features: Tensor) -> Tensor:
        """``features * feature_scale`` (Tensor[N, D], float)."""
        if not self.has_feature_scale:
            raise ValueError("LinearSVMs: feature scale not set (set_feature_scale or train)")
        dtype = features.dtype if features.is_floating_point() else torch.float32
        return features.to(dtype) * self.feature_scale.to(device=features.device, dtype=dtype)

    def scores(self, features: Tensor) -> Tensor:
        """SVM margins of every window for every class.

        Args:
            features (Tensor[R, D]): fc7 features as the head outputs them (unscaled), any device.
        Returns:
            Tensor[R, K] on the device of ``features``: ``w_k . (s * x) + b_k``.
        """
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be Tensor[R, {self.feature_dim}], got {tuple(features.shape)}"
            )
        if not self.has_feature_scale:
            raise ValueError("LinearSVMs: feature scale not set (set_feature_scale or train)")
        dtype = features.dtype if features.is_floating_point() else torch.float32
        dev = features.device
        # w . (s x) = (s w) . x: scale the [K, D] weights, not a copy of the [R, D] features.
        w = self.weight.to(device=dev, dtype=dtype) * self.feature_scale.to(device=dev, dtype=dtype)
        return torch.addmm(self.bias.to(device=dev, dtype=dtype), features.to(dtype), w.T)

    def forward(self, features: Tensor) -> Tensor:
        """Same as ``scores``: Tensor[R, K]."""
        return self.scores(features)
