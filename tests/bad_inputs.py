"""Test helpers shared by test_cli.py and test_detect_folder.py: a tiny saved detector and a
folder holding every bad input of issue 6."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from spp_detect.config import DetectorConfig, apply_overrides
from spp_detect.modeling.build import build_detector

CLASSES = ["a", "b"]


def tiny_detector():
    """A tiny untrained SPP-net (ZF-5, random weights, fc 32, softmax), in eval mode."""
    config = apply_overrides(
        DetectorConfig(),
        [
            "model.backbone=zf5",
            "model.hidden=32",
            "model.scales=[64]",
            "test.classifier=softmax",
            "proposals.max_proposals=8",
        ],
    )
    return build_detector("spp", CLASSES, config, pretrained=False).eval()


def save_tiny_model(folder: Path) -> Path:
    """``tiny_detector()`` saved as ``folder/model.pt``."""
    return tiny_detector().save(Path(folder) / "model.pt")


def scene(h, w, seed=0):
    """RGB uint8 [h, w, 3]: flat background with two solid rectangles (segmentable)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 200, np.uint8)
    img[h // 8 : h // 2, w // 8 : w // 2] = rng.integers(0, 255, 3)
    img[h // 2 : h - 4, w // 2 : w - 4] = rng.integers(0, 255, 3)
    return img


def make_bad_folder(root):
    """Every case of issue 6. Returns ({relative name: (w, h)} of usable images,
    {relative name: word expected in its error reason})."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()
    good = {}
    Image.fromarray(scene(48, 64)).save(root / "sub" / "good.jpg", quality=95)
    good["sub/good.jpg"] = (64, 48)
    Image.fromarray(scene(40, 50)[..., 0], mode="L").save(root / "gray.png")
    good["gray.png"] = (50, 40)
    rgba = np.dstack([scene(36, 44, 1), np.full((36, 44), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    good["rgba.png"] = (44, 36)
    Image.fromarray(scene(30, 60, 2)).convert("P", palette=Image.ADAPTIVE).save(
        root / "palette.png"
    )
    good["palette.png"] = (60, 30)
    g16 = (scene(32, 40, 3)[..., 1].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(root / "gray16.png")  # mode I;16
    assert Image.open(root / "gray16.png").mode.startswith("I;16")
    good["gray16.png"] = (40, 32)
    Image.fromarray(scene(48, 64, 4)).save(root / "gone.jpg")

    bad = {"gone.jpg": "not found", "empty.jpg": "empty", "tiny.png": "feature cell"}
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(root / "tiny.png")
    (root / "notes.jpg").write_text("not an image, just text renamed to .jpg\n")
    bad["notes.jpg"] = "not an image"
    jpeg = (root / "sub" / "good.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(jpeg[:20] + bytes(range(256)) * 4)
    bad["corrupt.jpg"] = ""  # the decoder's own words: only require some reason
    Image.fromarray(scene(100, 120, 5)).save(root / "huge.png")  # 12,000 px > the test limit
    bad["huge.png"] = "megapixels"
    (root / "readme.txt").write_text("ignored: not an image extension")
    return good, bad
