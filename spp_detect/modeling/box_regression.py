"""Bounding-box regression at test time: per-class linear maps from window features to deltas.

SPP-net (sec. 4.1, "we also use the bounding box regression of R-CNN") regresses, per class, from
the pooled conv5 features of a window to the R-CNN deltas (``structures.box_coder.BoxCoder``)
that move it onto its ground truth. The model follows the R-CNN / SPP_net code
(``rcnn_predict_bbox_regressor.m``): features scaled by one factor, a bias, and targets that were
centred and whitened per class in training, mapped back here. The ridge fit that produces the
buffers lives in ``training/bbox_fit.py`` (``ridge.py``; samples gathered by
``bbox_training.py``).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from ..structures.box_coder import BoxCoder
from .state import resize_buffers_to

__all__ = ["BoxRegressor"]


class BoxRegressor(nn.Module):
    """K per-class linear regressors from window features to R-CNN deltas.

    Args:
        num_classes: K object classes (0-based labels, no background).
        weights: ``(wx, wy, ww, wh)`` of the ``BoxCoder`` (1 in R-CNN).

    Buffers (``state_dict``): ``weight`` [K, D + 1, 4] (last row: bias), ``target_mean`` [K, 4],
    ``target_transform`` [K, 4, 4] (un-whitening: deltas = y @ T + mean), ``feature_scale`` (),
    ``trained`` [K] bool, ``delta_weights`` [4]. A fresh regressor has D = 0 and predicts zero
    deltas (the identity); a loaded state may have any D.
    """

    def __init__(self, num_classes: int, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"BoxRegressor: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        k = self.num_classes
        self.register_buffer("weight", torch.zeros(k, 1, 4))
        self.register_buffer("target_mean", torch.zeros(k, 4))
        self.register_buffer("target_transform", torch.eye(4).repeat(k, 1, 1))
        self.register_buffer("feature_scale", torch.tensor(1.0))
        self.register_buffer("trained", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("delta_weights", torch.tensor([float(v) for v in weights]))

    # -- state ------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1]) - 1

    @property
    def box_coder(self) -> BoxCoder:
        """The coder whose deltas this regressor predicts."""
        return BoxCoder(self.delta_weights.tolist())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # D is only known after training: take the stored shapes as they come.
        resize_buffers_to(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_state_dict(cls, state: dict) -> "BoxRegressor":
        """A regressor rebuilt from ``state_dict()`` (K and D read from the tensors)."""
        if "weight" not in state:
            raise ValueError("BoxRegressor state has no 'weight' tensor")
        model = cls(int(state["weight"].shape[0]))
        model.load_state_dict(state)
        return model

    # -- inference --------------------------------------------------------------------------
    def _check_features(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be Tensor[N, {self.feature_dim}], got {tuple(features.shape)}"
            )

    def predict_deltas(self, features: Tensor) -> Tensor:
        """Deltas of every class.

        Args:
            features (Tensor[N, D]): window features (the kind the regressor was fitted on,
                unscaled).
        Returns:
            Tensor[N, K, 4] in the dtype of ``features`` (float32 for non-float input); zero for
            classes that were not trained.
        """
        self._check_features(features)
        dtype = features.dtype if features.is_floating_point() else torch.float32
        w, bias, transform, mean = self._folded(dtype, features.device)
        y = features.to(dtype) @ w
        y = y.reshape(-1, self.num_classes, 4) + bias
        y = torch.einsum("nkf,kfg->nkg", y, transform)
        return y + mean

    def _folded(self, dtype: torch.dtype, dev: torch.device) -> Tuple[Tensor, ...]:
        """``(w [D, 4K], bias [K, 4], transform [K, 4, 4], mean [K, 4])`` in ``dtype`` on
        ``dev``: one [N, D] x [D, 4K] product serves all classes, and the feature scale is
        folded into the (small) weight matrix instead of a copy of the (large) features."""
        k, d = self.num_classes, self.feature_dim
        weight = self.weight.to(device=dev, dtype=dtype)
        w = weight[:, :d, :].permute(1, 0, 2).reshape(d, k * 4)
        w = w * self.feature_scale.to(device=dev, dtype=dtype)
        transform = self.target_transform.to(device=dev, dtype=dtype)
        return w, weight[:, d, :], transform, self.target_mean.to(device=dev, dtype=dtype)

    def predict_all(self, features: Tensor, boxes: Tensor) -> Tensor:
        """Refined boxes for every class.

        Args:
            features (Tensor[N, D]), boxes (Tensor[N, 4]): windows, xyxy in image pixels.
        Returns:
            Tensor[N, K, 4]: xyxy in the frame of ``boxes`` (not clipped).
        """
        deltas = self.predict_deltas(features)
        n = deltas.shape[0]
        out = self.box_coder.apply_deltas(
            deltas.reshape(n, 4 * self.num_classes), boxes.to(deltas.device)
        )
        return out.reshape(n, self.num_classes, 4)

    def predict(self, features: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """Each window refined by the regressor of its own class.

        Args:
            features (Tensor[N, D]), boxes (Tensor[N, 4]): xyxy in image pixels.
            labels (LongTensor[N]): 0-based class of each window.
        Returns:
            Tensor[N, 4]: xyxy in the frame of ``boxes`` (not clipped).
        """
        if labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"labels must be LongTensor[{boxes.shape[0]}], got {tuple(labels.shape)}"
            )
        deltas = self.predict_deltas(features)
        rows = torch.arange(deltas.shape[0], device=deltas.device)
        chosen = deltas[rows, labels.to(deltas.device)]
        return self.box_coder.apply_deltas(chosen, boxes.to(deltas.device))

    def forward(self, features: Tensor) -> Tensor:
        """Same as ``predict_deltas``: Tensor[N, K, 4]."""
        return self.predict_deltas(features)
