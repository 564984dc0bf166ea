"""Training and evaluating an ``SPPClassifier`` on an ImageFolder dataset (SPP-net sec. 3).

Training (sec. 3.2): images resized so the short side is ``crop * 256 / 224`` and randomly
cropped to ``crop x crop`` (``crop`` = the first size) with horizontal flips. Single-size
training uses these crops; multi-size training uses one size per epoch, alternating through
``sizes`` with the same weights, the other sizes being the crops resized (224 -> 180 in the
paper) rather than new crops.

Evaluation, both reported: the full test image at its native size and aspect (no crop, no warp:
what SPP makes possible; batches group images of equal size) and the usual centre crop.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from spp_detect.errors import UserInputError
from spp_detect.modeling.backbones import BACKBONE_SPECS, build_backbone
from spp_detect.modeling.spp_classifier import SPPClassifier, save_classifier
from spp_detect.utils import atomic_write_json, resolve_device

__all__ = [
    "ClassifierTrainConfig",
    "train_classifier",
    "evaluate_classifier",
    "format_metrics_table",
]

logger = logging.getLogger(__name__)

# Paper sec. 3.2 (after Krizhevsky et al.): images resized to 256 on the short side, 224 crops.
RESIZE_RATIO = 256 / 224
_BILINEAR = 2  # PIL.Image.BILINEAR


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
# Data


def _split_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise UserInputError(
        f"{root}: no {' or '.join(n + '/' for n in names)} folder (ImageFolder layout)"
    )


def _image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # empty class folders, no images
        raise UserInputError(f"{root}: not a usable ImageFolder ({exc})") from exc


def _transforms(crop: int, mean, std, train: bool):
    from torchvision import transforms as T

    resize = round(crop * RESIZE_RATIO)
    crop_t = [T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop)]
    return T.Compose([T.Resize(resize), *crop_t, T.ToTensor(), T.Normalize(mean, std)])


class _FullImage:
    """PIL image -> normalised ``Tensor[3, H, W]``, the whole image with its aspect kept: at its
    native size, or with the short side resized to ``min_side`` (the paper's full-image view,
    sec. 3.1: min(w, h) = 256); always at least the backbone's minimum input size."""

    def __init__(self, mean, std, min_input: int, min_side: Optional[int] = None):
        from torchvision import transforms as T

        self.min_input, self.min_side = min_input, min_side
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image):
        short = min(image.size)
        target = self.min_side if self.min_side else max(short, self.min_input)
        target = max(target, self.min_input)
        if target != short:
            f = target / short
            w, h = max(round(image.width * f), target), max(round(image.height * f), target)
            image = image.resize((w, h), resample=_BILINEAR)
        return self.to_tensor(image)


class _SizeGroupedBatches(Sampler):
    """Batches of dataset indices whose images share one size (so they stack without a crop)."""

    def __init__(self, sizes: Sequence[Tuple[int, int]], batch_size: int):
        groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        for i, size in enumerate(sizes):
            groups[size].append(i)
        self.batches = [
            idx[s : s + batch_size]
            for idx in groups.values()
            for s in range(0, len(idx), batch_size)
        ]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _image_sizes(dataset) -> List[Tuple[int, int]]:
    from PIL import Image

    sizes = []
    for path, _ in dataset.samples:
        with Image.open(path) as im:  # reads the header only
            sizes.append(im.size)
    return sizes


# ---------------------------------------------------------------------------------------------
# Evaluation


def _topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tuple[int, int]:
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(1).sum())


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device, desc: str) -> Dict[str, Any]:
    """Top-1 and top-k accuracy (percent) over ``loader``; k = min(5, num_classes)."""
    from tqdm import tqdm

    model.eval()
    k = min(5, model.num_classes)
    n = top1 = topk = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        logits = model(images.to(device))
        c1, ck = _topk_correct(logits.cpu(), labels, k)
        n, top1, topk = n + len(labels), top1 + c1, topk + ck
    if n == 0:
        raise UserInputError("evaluation set is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * topk / n, "k": k, "num_images": n}


def evaluate_folder(
    model: SPPClassifier,
    folder: Union[str, Path],
    crop: int = 224,
    full_min_side: Optional[int] = None,
    batch_size: int = 32,
    device: Union[str, torch.device] = "cpu",
    workers: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Accuracy of ``model`` on an ImageFolder ``folder``: ``{"full_image", "center_crop"}``.

    Full image: the whole image, aspect kept, at native size (or short side ``full_min_side``),
    batched by equal size. Centre crop: short side resized to ``crop * 256 / 224``, ``crop``
    square from the middle. ``class_names`` (the training classes) must match the folder's.
    """
    bb = model.backbone
    full_set = _image_folder(
        Path(folder), _FullImage(bb.mean, bb.std, bb.min_input_size, full_min_side)
    )
    if class_names is not None and list(full_set.classes) != list(class_names):
        raise UserInputError(
            f"{folder}: classes {full_set.classes} differ from {list(class_names)}"
        )
    crop_set = _image_folder(Path(folder), _transforms(crop, bb.mean, bb.std, False))
    # Images of one original size have one processed size: group by the header's size.
    sizes = _image_sizes(full_set)
    full_loader = DataLoader(
        full_set, batch_sampler=_SizeGroupedBatches(sizes, batch_size), num_workers=workers
    )
    crop_loader = DataLoader(crop_set, batch_size=batch_size, num_workers=workers)
    return {
        "full_image": {
            **evaluate_classifier(model, full_loader, device, "test (full image)"),
            "min_side": full_min_side,
        },
        "center_crop": {
            **evaluate_classifier(model, crop_loader, device, "test (centre crop)"),
            "crop": crop,
        },
    }


def format_metrics_table(metrics: Dict[str, Any]) -> str:
    """A small text table of the full-image and centre-crop accuracies."""
    k = metrics["full_image"]["k"]
    rows = [f"{'evaluation':<14}{'top-1 %':>9}{f'top-{k} %':>9}"]
    for key, label in (("full_image", "full image"), ("center_crop", "centre crop")):
        m = metrics[key]
        rows.append(f"{label:<14}{m['top1']:>9.2f}{m['top5']:>9.2f}")
    return "\n".join(rows)


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
    pretrained = cfg.pretrained
    if pretrained is None:  # ImageNet weights wherever they exist (none for ZF-5)
        spec = BACKBONE_SPECS.get(cfg.backbone)  # an unknown name: build_backbone says so
        pretrained = spec is not None and spec.weights is not None
    backbone = build_backbone(cfg.backbone, pretrained=pretrained, **cfg.backbone_kwargs)

    crop = sizes[0]
    train_set = _image_folder(
        _split_dir(root, ["train"]), _transforms(crop, backbone.mean, backbone.std, True)
    )
    test_dir = _split_dir(root, ["test", "val"])
    class_names = train_set.classes
    if _image_folder(test_dir, None).classes != class_names:  # fail before training, not after
        raise UserInputError(f"{test_dir}: classes differ from the train/ classes {class_names}")
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
