"""Instance styles for the toy VOC generator's instance-split mode.

The plain toy set draws every object of a class from one shape generator, so test objects are
the same renderings as training objects and the toy mAP flatters a detector. Real test sets hold
*other instances* of the training classes. In the instance-split mode each class has four shape
styles; training images (train / val / trainval) draw objects only from two of them and test
images only from the other two (a fixed table, :data:`CLASS_STYLES`). Texture patterns, colour
palettes and the range of aspect ratios are split the same way, so a test object differs from
every training object in shape detail, fill and proportions, but not in class. Distractor shapes
that belong to no class (heart, crescent, arrow, hexagon, blob) appear unannotated in both splits,
so that "any shape" is not a class.

The shapes are in ``datasets/toy_style_shapes.py`` and the texture families in
``datasets/toy_textures.py``; this module pairs them into the two sides of the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from spp_detect.datasets.toy_style_shapes import CLASS_STYLES, DISTRACTOR_STYLES, ShapeStyle
from spp_detect.datasets.toy_textures import TEST_TEXTURES, TRAIN_TEXTURES

__all__ = ["StyleSide", "TRAIN_ASPECT", "TEST_ASPECT_STRETCH", "style_side", "split_record"]

# Aspect ratio (width / height before rotation) of each side, log-uniform. Training objects stay
# near square; test objects are stretched further, in either direction (disjoint ranges).
TRAIN_ASPECT = (1 / 1.25, 1.25)
TEST_ASPECT_STRETCH = (1.25, 1.6)  # |aspect| range of test objects, wide or tall at random


@dataclass(frozen=True)
class StyleSide:
    """What one side of the instance split draws from.

    Attributes:
        name: ``"train"`` (images of train / val / trainval) or ``"test"``.
        styles: class -> the styles of this side.
        textures: the texture families of this side.
        stretch: ``None``: aspect log-uniform in :data:`TRAIN_ASPECT`; ``(lo, hi)``: wide or
            tall at random by a factor log-uniform in ``[lo, hi]``.
    """

    name: str
    styles: Mapping[str, Tuple[ShapeStyle, ...]]
    textures: Tuple[str, ...]
    stretch: Optional[Tuple[float, float]]

    def pick_style(self, rng: np.random.Generator, cls: str) -> ShapeStyle:
        options = self.styles[cls]
        return options[int(rng.integers(len(options)))]

    def pick_distractor(self, rng: np.random.Generator) -> ShapeStyle:
        return DISTRACTOR_STYLES[int(rng.integers(len(DISTRACTOR_STYLES)))]

    def pick_texture(self, rng: np.random.Generator) -> str:
        return self.textures[int(rng.integers(len(self.textures)))]

    def draw_aspect(self, rng: np.random.Generator) -> float:
        if self.stretch is None:
            lo, hi = TRAIN_ASPECT
            return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        factor = float(np.exp(rng.uniform(np.log(self.stretch[0]), np.log(self.stretch[1]))))
        return factor if rng.random() < 0.5 else 1.0 / factor


def style_side(name: str, classes: Sequence[str]) -> StyleSide:
    """The ``"train"`` or ``"test"`` side of the instance split, for ``classes``."""
    if name not in ("train", "test"):
        raise ValueError(f"style side must be 'train' or 'test', got {name!r}")
    k = 0 if name == "train" else 1
    return StyleSide(
        name,
        {c: CLASS_STYLES[c][k] for c in classes},
        TRAIN_TEXTURES if k == 0 else TEST_TEXTURES,
        None if k == 0 else TEST_ASPECT_STRETCH,
    )


def split_record(classes: Sequence[str]) -> dict:
    """The split as plain JSON types (written into the dataset's ``toy_voc.json``)."""
    out: Dict[str, object] = {
        "image_sets": {"train": "train", "val": "train", "trainval": "train", "test": "test"}
    }
    for name in ("train", "test"):
        side = style_side(name, classes)
        out[name] = dict(
            styles={c: [s.name for s in side.styles[c]] for c in classes},
            textures=list(side.textures),
            aspect=(
                dict(log_uniform=list(TRAIN_ASPECT))
                if side.stretch is None
                else dict(stretch_log_uniform=list(side.stretch), wide_or_tall=True)
            ),
        )
    out["distractors"] = [s.name for s in DISTRACTOR_STYLES]
    return out
