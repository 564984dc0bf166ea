"""liblinear's solve of one class's linear SVM (R-CNN ``update_model``).

The constants are those of R-CNN's ``rcnn_train.m`` (and SPP_net's ``spp_train.m``): liblinear
``-s 3`` (L2-regularised L1-loss SVM, solved in the dual) with ``-c 0.001 -w1 2 -B 10``, on
features scaled to a mean L2 norm of 20.

scikit-learn's ``LinearSVC`` wraps the same liblinear: ``loss="hinge", dual=True`` is ``-s 3``;
``class_weight={1: 2}`` is ``-w1 2``; ``intercept_scaling=10`` is ``-B 10`` (the bias is a
constant feature of value 10 whose weight is regularised like the others, and
``intercept_ = 10 * w_bias`` as R-CNN's ``b = w(end) * bias_mult``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
from torch import Tensor

from ..modeling.svm import LinearSVMs

__all__ = ["SVMSolver"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SVMSolver:
    """liblinear's settings for one class's SVM (R-CNN ``update_model``).

    Attributes:
        C: liblinear's C (R-CNN / SPP_net: 0.001, for features of mean norm 20).
        pos_weight: C multiplier of the positives (``-w1 2``).
        bias_multiplier: value of the constant bias feature (``-B 10``).
        loss: "hinge" (R-CNN's ``-s 3``) or "squared_hinge" (``-s 1``).
        tol, max_iter: liblinear's stopping rule; 0.1 is liblinear's default ``-e`` for ``-s 3``,
            which R-CNN kept (scikit-learn's own default, 1e-4, is several times slower).
        random_state: seed of liblinear's coordinate order (for reproducible fits).
    """

    C: float = 0.001
    pos_weight: float = 2.0
    bias_multiplier: float = 10.0
    loss: str = "hinge"
    tol: float = 0.1
    max_iter: int = 1000
    random_state: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("hinge", "squared_hinge"):
            raise ValueError(f"SVMSolver: loss must be hinge or squared_hinge, got {self.loss!r}")

    def fit(
        self, svms: LinearSVMs, c: int, positives: Tensor, negatives: Tensor
    ) -> Dict[str, float]:
        """Train class ``c`` of ``svms`` with liblinear on unscaled features.

        Args:
            svms: the SVMs; their feature scale must be set.
            c: 0-based class index.
            positives (Tensor[P, D]), negatives (Tensor[M, D]): fc7 features (P, M >= 1).
        Returns:
            R-CNN's objective terms: ``pos_loss``, ``neg_loss``, ``reg_loss``, ``total``.
        """
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        if positives.shape[0] == 0 or negatives.shape[0] == 0:
            raise ValueError(
                f"class {c}: an SVM needs positives and negatives, got "
                f"{positives.shape[0]} and {negatives.shape[0]}"
            )
        d = positives.shape[1]
        if negatives.shape[1] != d:
            raise ValueError(f"class {c}: feature sizes differ: {d} vs {negatives.shape[1]}")
        if svms.feature_dim != d:
            if bool(svms.trained.any()):
                raise ValueError(f"class {c}: features have D={d}, SVMs have {svms.feature_dim}")
            svms.reset_weights(d)
        x = torch.cat([positives.detach().cpu(), negatives.detach().cpu()]).double().numpy()
        x *= float(svms.feature_scale)
        y = np.concatenate([np.ones(positives.shape[0]), -np.ones(negatives.shape[0])])
        svc = LinearSVC(
            C=self.C,
            loss=self.loss,
            dual=True,
            class_weight={1: self.pos_weight},
            fit_intercept=True,
            intercept_scaling=self.bias_multiplier,
            tol=self.tol,
            max_iter=self.max_iter,
            random_state=self.random_state,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            svc.fit(x, y)
        for item in caught:
            if issubclass(item.category, ConvergenceWarning):
                logger.warning(
                    "SVM class %d: liblinear did not converge in %d iterations", c, self.max_iter
                )
            else:  # only the convergence warning is ours to turn into a log line
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
        w = torch.from_numpy(svc.coef_[0].copy())
        b = float(svc.intercept_[0])
        svms.set_class(c, w, b)
        # The objective R-CNN logs after each update (hinge or squared hinge).
        z = torch.from_numpy(x) @ w + b
        p = positives.shape[0]
        hinge_pos = (1 - z[:p]).clamp(min=0)
        hinge_neg = (1 + z[p:]).clamp(min=0)
        if self.loss == "squared_hinge":
            hinge_pos, hinge_neg = hinge_pos**2, hinge_neg**2
        stats = {
            "pos_loss": self.C * self.pos_weight * float(hinge_pos.sum()),
            "neg_loss": self.C * float(hinge_neg.sum()),
            "reg_loss": 0.5 * float(w @ w) + 0.5 * (b / self.bias_multiplier) ** 2,
        }
        stats["total"] = stats["pos_loss"] + stats["neg_loss"] + stats["reg_loss"]
        return stats
