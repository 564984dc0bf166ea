"""ImageFolder data for SPP classifier training and evaluation (SPP-net sec. 3).

Training crops (sec. 3.2): images resized so the short side is ``crop * 256 / 224``, randomly
cropped to ``crop x crop`` with horizontal flips; evaluation: the centre crop, or the full image
at its native size and aspect (``FullImage``), batched by equal size (``SizeGroupedBatches``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import Sampler

from spp_detect.errors import UserInputError

__all__ = [
    "RESIZE_RATIO",
    "FullImage",
    "SizeGroupedBatches",
    "image_folder",
    "image_sizes",
    "split_dir",
    "transforms",
]

# Paper sec. 3.2 (after Krizhevsky et al.): images resized to 256 on the short side, 224 crops.
RESIZE_RATIO = 256 / 224
_BILINEAR = 2  # PIL.Image.BILINEAR


def split_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise UserInputError(
        f"{root}: no {' or '.join(n + '/' for n in names)} folder (ImageFolder layout)"
    )


def image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # empty class folders, no images
        raise UserInputError(f"{root}: not a usable ImageFolder ({exc})") from exc


def transforms(crop: int, mean, std, train: bool):
    from torchvision import transforms as T

    resize = round(crop * RESIZE_RATIO)
    crop_t = [T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop)]
    return T.Compose([T.Resize(resize), *crop_t, T.ToTensor(), T.Normalize(mean, std)])


class FullImage:
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


class SizeGroupedBatches(Sampler):
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


def image_sizes(dataset) -> List[Tuple[int, int]]:
    from PIL import Image

    sizes = []
    for path, _ in dataset.samples:
        with Image.open(path) as im:  # reads the header only
            sizes.append(im.size)
    return sizes
