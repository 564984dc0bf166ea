"""Accuracy of an ``SPPClassifier``: top-1 and top-k over a loader or an ImageFolder, on the
full image (what SPP makes possible, sec. 3) and on the usual centre crop."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from spp_detect.errors import UserInputError
from spp_detect.modeling.spp_classifier import SPPClassifier
from spp_detect.training.classifier_data import (
    FullImage,
    SizeGroupedBatches,
    image_folder,
    image_sizes,
    transforms,
)

__all__ = ["evaluate_classifier", "evaluate_folder", "format_metrics_table"]


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
    full_set = image_folder(
        Path(folder), FullImage(bb.mean, bb.std, bb.min_input_size, full_min_side)
    )
    if class_names is not None and list(full_set.classes) != list(class_names):
        raise UserInputError(
            f"{folder}: classes {full_set.classes} differ from {list(class_names)}"
        )
    crop_set = image_folder(Path(folder), transforms(crop, bb.mean, bb.std, False))
    # Images of one original size have one processed size: group by the header's size.
    sizes = image_sizes(full_set)
    full_loader = DataLoader(
        full_set, batch_sampler=SizeGroupedBatches(sizes, batch_size), num_workers=workers
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
