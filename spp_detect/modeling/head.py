"""The fully connected head on pooled window features: fc6, fc7 and the (K+1)-way cls_score."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lowrank import response_lowrank_linear

__all__ = ["FCHead", "truncated_svd_linear", "load_imagenet_fc"]


def truncated_svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Replace ``W`` (out x in) by ``U_t S_t V_t^T``: two layers, ``in -> rank -> out``.

    Fast R-CNN (Girshick 2015, sec. 3.1): fc6 and fc7 compressed to their top 1024 and 256
    singular values cut detection time by 30% for -0.3 mAP. Multiply-adds per window go from
    ``in * out`` to ``rank * (in + out)``.

    Args:
        layer: a trained ``nn.Linear``.
        rank: singular values to keep (``1 <= rank < min(in, out)``).
    Returns:
        ``nn.Sequential(Linear(in, rank, bias=False), Linear(rank, out))`` computing the
        rank-``rank`` approximation of ``layer``.
    """
    out_f, in_f = layer.weight.shape
    if not 1 <= rank < min(out_f, in_f):
        raise ValueError(f"SVD rank must lie in [1, {min(out_f, in_f) - 1}], got {rank}")
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    first = nn.Linear(in_f, rank, bias=False)
    second = nn.Linear(rank, out_f)
    with torch.no_grad():
        first.weight.copy_((s[:rank, None] * vh[:rank]).to(layer.weight.dtype))
        second.weight.copy_(u[:, :rank].to(layer.weight.dtype))
        second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(layer.weight.device)


class FCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> cls_score.

    SPP-net fine-tunes only these layers on pooled conv5 features (sec. 4.1); cls_score is the
    new (K+1)-way fc8 (index 0 = background) initialised from N(0, 0.01).

    Args:
        in_features: length of a pooled window (``C * sum(n * n)``, e.g. 256 * 50 for ZF-5).
        num_classes: K object classes (background excluded).
        hidden: width of fc6 and fc7 (4096 in the paper).
        dropout: dropout probability after fc6 and fc7 (training only).
        init_std: std of the Gaussian init of cls_score (sec. 4.1: 0.01).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 4096,
        dropout: float = 0.5,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.hidden = int(hidden)
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.cls_score = nn.Linear(hidden, num_classes + 1)
        self.dropout = nn.Dropout(dropout)
        self.svd_ranks = (0, 0)
        # Pooled conv features are multiplied by this before fc6. fc6/fc7 start from random init
        # here (there are no ImageNet-trained fc layers for a pooled pyramid of these backbones),
        # and pooled activations can be large (EfficientNet-Lite0's have norms of ~650), so
        # fine-tuning sets it once so that each input dimension has unit RMS
        # (``set_input_scale``): a fixed linear rescale that keeps SGD well conditioned.
        self.register_buffer("input_scale", torch.tensor(1.0))
        for layer in (self.fc6, self.fc7):
            # fc6/fc7 have no ImageNet weights for a pooled-pyramid input, so they start from
            # a He init (ReLU follows) and are learnt by fine-tuning.
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.cls_score.weight, std=init_std)
        nn.init.zeros_(self.cls_score.bias)

    def compress(
        self, fc6_rank: int, fc7_rank: int, stats: Optional[Dict[str, Any]] = None
    ) -> "FCHead":
        """fc6 and fc7 as two low-rank layers each, in place (``0`` leaves a layer as it is);
        for testing a trained head faster.

        Without ``stats``: truncated SVD of the weights (Fast R-CNN: ranks 1024 and 256 for
        4096-wide layers). With ``stats`` (``WindowDetector.head_stats``): the top principal
        directions of each layer's responses on training windows (``lowrank.py``).
        """
        for name, rank in (("fc6", fc6_rank), ("fc7", fc7_rank)):
            if not rank:
                continue
            layer = getattr(self, name)
            if stats is None:
                setattr(self, name, truncated_svd_linear(layer, rank))
            else:
                setattr(self, name, response_lowrank_linear(layer, stats[name], rank))
        self.svd_ranks = (int(fc6_rank), int(fc7_rank))
        return self

    @torch.no_grad()
    def set_input_scale(self, sample: Tensor) -> float:
        """Set ``input_scale`` so that a sample ``Tensor[N, in_features]`` of pooled features has
        unit RMS per dimension; returns the scale."""
        rms = float(sample.double().pow(2).mean().sqrt())
        self.input_scale.fill_(1.0 / rms if rms > 0 else 1.0)
        return float(self.input_scale)

    def fc7_features(self, pooled: Tensor, dropout: Optional[bool] = None) -> Tensor:
        """Tensor[R, in_features] -> Tensor[R, hidden] (fc7 after ReLU: the SVMs' features).

        ``dropout``: apply dropout after fc6 and fc7; ``None`` follows ``self.training``.
        """
        p = self.dropout.p if (self.training if dropout is None else dropout) else 0.0
        x = F.dropout(torch.relu(self.fc6(pooled * self.input_scale)), p, training=p > 0)
        return F.dropout(torch.relu(self.fc7(x)), p, training=p > 0)

    def forward(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns ``(fc7, cls_score logits Tensor[R, K + 1])``; dropout in training mode."""
        fc7 = self.fc7_features(pooled)
        return fc7, self.cls_score(fc7)

    def predict(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        """``forward`` without dropout whatever the module's mode (test time)."""
        fc7 = self.fc7_features(pooled, dropout=False)
        return fc7, self.cls_score(fc7)


@torch.no_grad()
def load_imagenet_fc(
    head: FCHead, fc6: nn.Linear, fc7: nn.Linear, levels: Tuple[int, ...], channels: int
) -> None:
    """Start fc6/fc7 from an ImageNet network's own fc6/fc7 (torchvision VGG-16 / AlexNet).

    The pretrained fc6 reads pool5: ``channels x n x n`` (n = 7 for VGG-16, 6 for AlexNet). With
    the pyramid's finest level equal to that grid (``levels[0] == n``), its block of the pooled
    vector has pool5's layout (C, n, n), so fc6's columns for that block are the pretrained ones
    and the other levels' columns start at zero: at initialisation the head computes exactly the
    pretrained fc6/fc7 on each window's n x n pooling (for a whole 224 x 224 image, VGG-16's
    conv5_3 is 14 x 14 and the 7 x 7 bins are its 2 x 2 max pool; AlexNet's 6 x 6 bins on 13 x 13
    are its 3 x 3 / stride-2 pool). ``input_scale`` is reset to 1.

    Raises:
        ValueError: the pyramid or width does not match the pretrained layers.
    """
    n = int(levels[0])
    if fc6.in_features != channels * n * n:
        raise ValueError(
            f"pretrained fc6 reads {fc6.in_features} values, the finest level gives "
            f"{channels} x {n} x {n}: set model.levels to start with the pretrained pool size"
        )
    if (fc6.out_features, fc7.in_features, fc7.out_features) != (head.hidden,) * 3:
        raise ValueError(f"pretrained fc6/fc7 are {fc6.out_features} wide; set model.hidden")
    head.fc6.weight.zero_()
    head.fc6.weight[:, : fc6.in_features].copy_(fc6.weight)
    head.fc6.bias.copy_(fc6.bias)
    head.fc7.weight.copy_(fc7.weight)
    head.fc7.bias.copy_(fc7.bias)
    head.input_scale.fill_(1.0)
