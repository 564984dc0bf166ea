"""Drawing detections on images (boxes, class names and scores) and writing them to disk.

Boxes are in the continuous pixel frame of ``spp_detect.structures.boxes`` (a box ``[x1, x2)``
covers pixel columns ``x1 .. x2 - 1``), so the outline is drawn on the pixels
``round(x1) .. round(x2) - 1``: the rectangle lies on the object's outermost pixels, not one
pixel outside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from spp_detect.utils import atomic_write_bytes

__all__ = [
    "PALETTE",
    "WRITABLE_SUFFIXES",
    "class_color",
    "draw_detections",
    "encode_image",
    "save_image",
    "annotated_name",
]

# Twenty well-separated RGB colours (one per VOC class), reused cyclically for more classes.
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip

# Formats that OpenCV writes losslessly enough for an annotated copy; other inputs (GIF, PNM,
# JFIF...) are written as PNG next to their own name (``a.gif`` -> ``a.gif.png``).
WRITABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_JPEG_QUALITY = 92
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(label: int) -> Tuple[int, int, int]:
    """RGB colour of a 0-based class index."""
    return PALETTE[int(label) % len(PALETTE)]


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _text_color(rgb: Tuple[int, int, int]) -> Tuple[int, int, int]:
    # ITU-R BT.601 luma: dark text on light label backgrounds, white on dark ones.
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_detections(
    image: np.ndarray,
    detections: Any,
    class_names: Sequence[str],
    thickness: Optional[int] = None,
    font_scale: Optional[float] = None,
) -> np.ndarray:
    """Draw boxes with ``"<class> <score>"`` labels on a copy of the image.

    Args:
        image: np.ndarray[H, W, 3] uint8 RGB.
        detections: anything with ``boxes`` ([N, 4] xyxy, continuous pixels of ``image``),
            ``scores`` ([N]) and ``labels`` ([N], 0-based into ``class_names``): a
            ``Detections`` or numpy arrays.
        class_names: the detector's class names.
        thickness: line width in pixels (default: grows with the image, 1 px up to ~500 px).
        font_scale: OpenCV font scale (default: grows with the image).
    Returns:
        np.ndarray[H, W, 3] uint8 RGB, a new array; the input is not modified. The highest
        scoring boxes are drawn last, so they stay on top.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}")
    boxes = _as_numpy(detections.boxes).reshape(-1, 4).astype(np.float64)
    scores = _as_numpy(detections.scores).reshape(-1).astype(np.float64)
    labels = _as_numpy(detections.labels).reshape(-1).astype(np.int64)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"boxes {boxes.shape}, scores {scores.shape} and labels {labels.shape} differ in N"
        )
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    side = max(h, w)
    thickness = thickness or max(1, round(side / 500))
    font_scale = font_scale or max(0.35, side / 1200)
    font_thick = max(1, thickness // 2)
    for i in np.argsort(scores, kind="stable"):
        color = class_color(labels[i])
        # Continuous [x1, x2) -> the outermost covered pixel columns round(x1) .. round(x2) - 1.
        x1, y1 = int(round(boxes[i, 0])), int(round(boxes[i, 1]))
        x2, y2 = int(round(boxes[i, 2])) - 1, int(round(boxes[i, 3])) - 1
        x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)
        y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        label = int(labels[i])
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, _FONT, font_scale, font_thick)
        # Label above the box when it fits, else inside its top edge.
        ty = y1 - base - 1 if y1 - th - base - 2 >= 0 else y1 + th + 1
        tx = min(x1, max(0, w - tw - 1))
        cv2.rectangle(out, (tx, ty - th - 1), (tx + tw + 1, ty + base), color, cv2.FILLED)
        cv2.putText(
            out, text, (tx + 1, ty), _FONT, font_scale, _text_color(color), font_thick,
            cv2.LINE_AA,
        )  # fmt: skip
    return out


def annotated_name(relative_name: str) -> str:
    """The file name of an annotated copy: the same name when OpenCV can write its format,
    else ``<name>.png``."""
    return (
        relative_name
        if Path(relative_name).suffix.lower() in WRITABLE_SUFFIXES
        else relative_name + ".png"
    )


def encode_image(image: np.ndarray, suffix: str = ".png") -> bytes:
    """Encode an RGB uint8 ``[H, W, 3]`` image in the format named by ``suffix``."""
    suffix = suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(f"cannot encode images as {suffix!r}; use one of {WRITABLE_SUFFIXES}")
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if suffix in (".jpg", ".jpeg") else []
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    ok, buf = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as {suffix}")
    return buf.tobytes()


def save_image(path: Union[str, Path], image: np.ndarray) -> Path:
    """Write an RGB uint8 image atomically (format from the suffix); parents are created."""
    path = Path(path)
    atomic_write_bytes(path, encode_image(image, path.suffix))
    return path
