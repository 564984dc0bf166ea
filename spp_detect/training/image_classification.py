"""Training and evaluating an ``SPPClassifier`` on an ImageFolder dataset (SPP-net sec. 3).

Training (sec. 3.2): images resized so the short side is ``crop * 256 / 224`` and randomly
cropped to ``crop x crop`` (``crop`` = the first size) with horizontal flips. Single-size
training uses these crops; multi-size training uses one size per epoch, alternating through
``sizes`` with the same weights, the other sizes being the crops resized (224 -> 180 in the
paper) rather than new crops.

Evaluation, both reported: the full test image at its native size and aspect (no crop, no warp:
what SPP makes possible; batches group images of equal size) and the usual centre crop.

The data pipeline is in ``training/classifier_data.py`` and the evaluation in
``training/classifier_eval.py``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from spp_detect.errors import UserInputError
from spp_detect.modeling.backbones import BACKBONE_SPECS, build_backbone
from spp_detect.modeling.spp_classifier import SPPClassifier, save_classifier
from spp_detect.training.classifier_data import image_folder, split_dir, transforms
from spp_detect.training.classifier_eval import evaluate_folder
from spp_detect.utils import atomic_write_json, resolve_device

__all__ = ["ClassifierTrainConfig", "train_classifier"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Settings of one classification run; the paper's value is noted where it has one."""

    data: str  # ImageFolder root holding train/ and test/ (or val/)
    output: str  # folder for metrics.json and model.pth
    backbone: str = "zf5"  # the paper's fast model; "efficientnet_lite0", "vgg16", "alexnet"
    pretrained: Union[None, bool, str] = None  # None: ImageNet weights where they exist
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {"out_stride": 16}
    freeze_backbone: bool = False  # train only fc6, fc7 and cls_score
    sizes: Tuple[int, ...] = (224,)  # (224,) single-size; (224, 180) multi-size (sec. 3.2)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01  # SGD; cosine decay to 0 over the run
    momentum: float = 0.9
    weight_decay: float = 5e-4
    levels: Tuple[int, ...] = (6, 3, 2, 1)  # a classification pyramid of sec. 3.1
    hidden: int = 4096  # fc6 / fc7 width (paper: 4096)
    dropout: float = 0.5  # after fc6 and fc7 (paper: 0.5)
    seed: int = 0
    device: Optional[str] = None  # None: CUDA when present
    workers: int = 0  # DataLoader worker processes
    eval_batch_size: int = 32
    full_min_side: Optional[int] = None  # None: native size; paper (sec. 3.1): 256


# ---------------------------------------------------------------------------------------------
# Training


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _train_epoch(model, loader, optimizer, scheduler, size, crop, device, freeze, desc):
    from tqdm import tqdm

    model.train()
    if freeze:
        model.backbone.eval()  # frozen: batch-norm statistics stay as loaded
    total_loss, correct, n = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels = images.to(device), labels.to(device)
        if size != crop:
            # Multi-size training (sec. 3.2): the same crop content, resized (224 -> 180).
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        n += len(labels)
    return total_loss / max(n, 1), 100.0 * correct / max(n, 1)


def _check_settings(cfg: ClassifierTrainConfig) -> Tuple[int, ...]:
    sizes = tuple(int(s) for s in cfg.sizes)
    if not sizes or min(sizes) < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserInputError(f"need sizes >= 1, epochs >= 1, batch_size >= 1; got {cfg}")
    if not Path(cfg.data).is_dir():
        raise UserInputError(f"{cfg.data}: dataset folder not found")
    return sizes


def _build_model(
    cfg: ClassifierTrainConfig, sizes: Tuple[int, ...], num_classes: int, backbone
) -> SPPClassifier:
    if min(sizes) < backbone.min_input_size:
        raise UserInputError(f"--sizes {sizes}: {cfg.backbone} needs >= {backbone.min_input_size}")
    model = SPPClassifier(backbone, num_classes, cfg.levels, cfg.hidden, cfg.dropout)
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def _fit(
    model: SPPClassifier,
    loader: DataLoader,
    cfg: ClassifierTrainConfig,
    sizes: Tuple[int, ...],
    device: torch.device,
) -> List[Dict[str, Any]]:
    """SGD with cosine decay, one size per epoch; returns the per-epoch history."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * len(loader))
    history = []
    for epoch in range(cfg.epochs):
        size = sizes[epoch % len(sizes)]  # one size per epoch, alternating (sec. 3.2)
        t = time.perf_counter()
        desc = f"epoch {epoch + 1}/{cfg.epochs} @{size}"
        loss, acc = _train_epoch(
            model, loader, optimizer, scheduler, size, sizes[0], device, cfg.freeze_backbone, desc
        )
        seconds = time.perf_counter() - t
        history.append(
            {"epoch": epoch + 1, "size": size, "loss": loss, "train_top1": acc, "seconds": seconds}
        )
        logger.info(
            "epoch %d/%d size %d: loss %.4f, train top-1 %.1f%% (%.1fs)",
            epoch + 1, cfg.epochs, size, loss, acc, seconds,
        )  # fmt: skip
    return history


def _backbone(cfg: ClassifierTrainConfig):
    """``(backbone, pretrained)``: ImageNet weights wherever they exist when
    ``cfg.pretrained`` is None (none for ZF-5)."""
    pretrained = cfg.pretrained
    if pretrained is None:
        spec = BACKBONE_SPECS.get(cfg.backbone)  # an unknown name: build_backbone says so
        pretrained = spec is not None and spec.weights is not None
    return build_backbone(cfg.backbone, pretrained=pretrained, **cfg.backbone_kwargs), pretrained


def _datasets(root: Path, crop: int, backbone) -> Tuple[Any, Path]:
    """``(train ImageFolder with training crops, test folder)``, their classes checked equal."""
    train_set = image_folder(
        split_dir(root, ["train"]), transforms(crop, backbone.mean, backbone.std, True)
    )
    test_dir = split_dir(root, ["test", "val"])
    class_names = train_set.classes
    if image_folder(test_dir, None).classes != class_names:  # fail before training, not after
        raise UserInputError(f"{test_dir}: classes differ from the train/ classes {class_names}")
    return train_set, test_dir


def train_classifier(cfg: ClassifierTrainConfig) -> Dict[str, Any]:
    """Train and evaluate; writes ``output/metrics.json`` and ``output/model.pth``.

    Returns:
        The metrics dict: ``full_image`` and ``center_crop`` (``top1``, ``top5`` in percent,
        ``k`` = min(5, classes)), the per-epoch ``history``, timings and the run settings.
    """
    sizes = _check_settings(cfg)
    root, out = Path(cfg.data), Path(cfg.output)
    generator = _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    backbone, pretrained = _backbone(cfg)
    crop = sizes[0]
    train_set, test_dir = _datasets(root, crop, backbone)
    class_names = train_set.classes
    model = _build_model(cfg, sizes, len(class_names), backbone).to(device)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        generator=generator,
        drop_last=len(train_set) > cfg.batch_size,
    )
    logger.info(
        "%s SPP classifier: %d classes, %d train images, test %s, sizes %s, %d epochs on %s",
        cfg.backbone, len(class_names), len(train_set), test_dir, sizes, cfg.epochs, device,
    )  # fmt: skip

    t0 = time.perf_counter()
    history = _fit(model, loader, cfg, sizes, device)
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluation = evaluate_folder(
        model, test_dir, crop, cfg.full_min_side, cfg.eval_batch_size, device, cfg.workers,
        class_names,
    )  # fmt: skip
    metrics: Dict[str, Any] = {
        **evaluation,
        "history": history,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - t0,
        "class_names": class_names,
        "num_train": len(train_set),
        "num_test": evaluation["full_image"]["num_images"],
        "config": {
            **asdict(cfg),
            "sizes": list(sizes),
            "levels": list(cfg.levels),
            "pretrained": str(pretrained),
            "device": str(device),
        },
    }
    _write_outputs(model, out, class_names, metrics)
    return metrics


def _write_outputs(
    model: SPPClassifier, out: Path, class_names: Sequence[str], metrics: Dict[str, Any]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out / "model.pth", class_names, {"metrics": _plain(metrics)})
    atomic_write_json(out / "metrics.json", metrics)
    logger.info(
        "full image top-1 %.2f%%, centre crop top-1 %.2f%% -> %s",
        metrics["full_image"]["top1"],
        metrics["center_crop"]["top1"],
        out / "metrics.json",
    )


def _plain(obj: Any) -> Any:
    """JSON-like copy (only plain types inside a checkpoint read with weights_only=True)."""
    import json

    return json.loads(json.dumps(obj, default=str))
