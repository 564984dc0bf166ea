"""Reading user images robustly: one function that turns any common image file into
``np.ndarray[H, W, 3] uint8 RGB`` or raises :class:`ImageReadError` with a one-line reason.

Decoding policy (what each kind of input becomes):

- Grayscale (``L``, 1-bit) -> the gray value copied to three channels.
- Alpha (``RGBA``, ``LA``, ``PA``, palette with a transparent index) -> composited on a **white**
  background. Dropping alpha instead would expose whatever colour the encoder left under
  transparent pixels (often black), which draws spurious edges for selective search and the CNN.
- Palette (``P``) -> the palette colours.
- 16-bit (``I;16`` PNG/TIFF, 48/64-bit RGB(A) PNG/TIFF) -> ``round(v * 255 / 65535)``: the full
  16-bit range maps linearly onto 8 bits (no clipping, no per-image contrast stretch). Pillow
  decodes 16-bit colour by keeping the high byte (a floor), so those files are decoded by OpenCV
  with ``IMREAD_UNCHANGED`` instead and rounded here.
- 32-bit integer (``I``) and float (``F``) images: values within 0..255 (int) or 0..1 (float) are
  scaled as such, anything else is min-max stretched to 0..255.
- CMYK, YCbCr, HSV -> Pillow's conversion to RGB.
- EXIF orientation -> applied, so the array is upright as a viewer shows it (and boxes drawn on
  it line up with what the user sees).
- Animated / multi-page files -> the first frame.
- Larger than ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) -> an error naming the size,
  raised from the header before any pixel is decoded. Pillow's own decompression-bomb guard
  (``PIL.Image.MAX_IMAGE_PIXELS``) is turned into the same kind of error.
- Missing (or deleted since it was listed), empty, unreadable, non-image, corrupt or truncated
  files -> :class:`ImageReadError`.

Pillow does the decoding; OpenCV is the fallback for files Pillow cannot identify.
"""

from __future__ import annotations

import glob
import io
import os
import warnings
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from ..errors import UserInputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_EXTENSIONS",
    "ImageReadError",
    "read_image",
    "decode_image",
    "check_min_size",
    "list_images",
]

PathLike = Union[str, os.PathLike]

# 100 megapixels (a 300 MB RGB array): far above any detection input (SPP-net resizes the
# shorter side to at most 1200 px) and below what exhausts a small machine's memory.
DEFAULT_MAX_PIXELS = 100_000_000

# Lower-case suffixes that list_images picks up in folders and globs.
SUPPORTED_EXTENSIONS = (
    ".bmp",
    ".gif",
    ".jfif",
    ".jpe",
    ".jpeg",
    ".jpg",
    ".pbm",
    ".pgm",
    ".png",
    ".pnm",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)

_EXIF_ORIENTATION = 0x0112
_GLOB_CHARS = set("*?[")


class ImageReadError(ValueError):
    """An image file that cannot be used; ``str(err)`` is the one line ``"<path>: <reason>"``.

    Attributes:
        path: the file as given.
        reason: the reason alone (what a report's ``errors`` list shows next to the file).
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # keep (path, reason) through pickling (worker processes)
        return (type(self), (self.path, self.reason))


def read_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as upright RGB.

    Args:
        path: the image file.
        max_pixels: refuse images with more than this many pixels (``None``: no limit of ours;
            Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` guard still applies).
    Returns:
        np.ndarray[H, W, 3] uint8, RGB, EXIF orientation applied (see the module docstring for
        how grayscale, alpha, palette, 16-bit and CMYK inputs are converted).
    Raises:
        ImageReadError: ``"<path>: <reason>"`` for a missing, empty, unreadable, non-image,
            corrupt, truncated or too large file.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        reason = "file not found (missing, or deleted after it was listed)"
        raise ImageReadError(path, reason) from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from e
    return decode_image(data, path, max_pixels=max_pixels)


def decode_image(
    data: bytes, path: PathLike = "<bytes>", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode the bytes of an image file; same result and errors as :func:`read_image`.

    ``path`` only names the source in error messages (callers that already hold the bytes,
    e.g. to hash them, decode without reading the file twice).
    """
    if len(data) == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from e
    except Exception as e:  # Pillow cannot identify it: let OpenCV try
        return _decode_cv2(data, path, max_pixels, pil_error=e)

    w, h = pil.size
    _check_pixels(path, w, h, max_pixels)
    # Read the raw mode before anything loads the pixels (loading clears ``tile``; for PNG,
    # even getexif() loads them).
    if pil.mode in ("RGB", "RGBA", "RGBX") and ";16" in _rawmode(pil):
        # 48/64-bit colour: Pillow keeps only the high byte, OpenCV gives all 16 bits.
        try:
            rgb = _decode_cv2(data, path, max_pixels)
        except ImageReadError:
            pass  # OpenCV could not read it either: Pillow's high byte is close enough
        else:
            return _apply_orientation(rgb, _orientation(pil))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil.load()
        rgb = _pil_to_rgb(pil, path)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from e
    except MemoryError as e:
        raise ImageReadError(path, f"not enough memory to decode a {w}x{h} image") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, reported
        raise ImageReadError(path, f"corrupt or truncated image data ({_describe(e)})") from e
    return _apply_orientation(rgb, _orientation(pil))


def check_min_size(image: np.ndarray, min_side: int, path: PathLike = "<image>") -> None:
    """Raise when an image is smaller than ``min_side`` pixels in height or width.

    A detector with feature stride 16 (SPP-net's conv5) needs at least one feature cell, so
    callers pass ``min_side = backbone.stride``.

    Args:
        image: np.ndarray[H, W, ...].
        min_side: smallest allowed height and width, in pixels.
        path: names the image in the message.
    Raises:
        ImageReadError: e.g. ``"a.png: image is 3x5 pixels, smaller than one feature cell
            (16 px)"`` (width x height).
    """
    h, w = int(image.shape[0]), int(image.shape[1])
    if h < min_side or w < min_side:
        raise ImageReadError(
            path, f"image is {w}x{h} pixels, smaller than one feature cell ({min_side} px)"
        )


def list_images(path_or_glob: PathLike) -> List[Path]:
    """The image files a command-line ``--input`` names.

    Args:
        path_or_glob: a folder (searched recursively; hidden files and folders skipped), a
            single file (returned as is, whatever its suffix, so that a bad file is reported
            rather than ignored), or a glob pattern (``**`` recursive).
    Returns:
        Paths sorted by their string form; folders and globs keep only files whose suffix is in
        :data:`SUPPORTED_EXTENSIONS` (case-insensitive). May be empty.
    Raises:
        UserInputError: a path that is neither a file, a folder nor a glob pattern.
    """
    text = os.fspath(path_or_glob)
    p = Path(text)
    if p.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
        return sorted((f for f in found if _is_image_name(f)), key=str)
    if p.is_file():
        return [p]
    if _GLOB_CHARS & set(text):
        matches = (Path(m) for m in glob.glob(text, recursive=True))
        return sorted((m for m in matches if m.is_file() and _is_image_name(m)), key=str)
    raise UserInputError(f"{text}: no such file or folder")


# --------------------------------------------------------------------------------------------
# helpers


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in SUPPORTED_EXTENSIONS


def _describe(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _check_pixels(path: PathLike, w: int, h: int, max_pixels: Optional[int]) -> None:
    if w <= 0 or h <= 0:
        raise ImageReadError(path, f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageReadError(
            path,
            f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} megapixels (max_pixels)",
        )


def _rawmode(pil) -> str:
    tile = getattr(pil, "tile", None) or []
    if not tile:
        return ""
    args = tile[0][3] if len(tile[0]) > 3 else None
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else ""


def _orientation(pil) -> int:
    try:
        value = int(pil.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels upright by the EXIF Orientation tag (TIFF 6.0 / EXIF 2.3 values)."""
    ops = {
        2: lambda a: a[:, ::-1],  # mirrored horizontally
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored vertically
        5: lambda a: a.transpose(1, 0, 2),  # transposed
        6: lambda a: np.rot90(a, -1),  # needs 90 degrees clockwise
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # transversed
        8: lambda a: np.rot90(a, 1),  # needs 90 degrees counter-clockwise
    }
    op = ops.get(orientation)
    return rgb if op is None else np.ascontiguousarray(op(rgb))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale one integer or float plane (or stack) to uint8; see the module docstring."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        # round(v * 255 / 65535) in integer arithmetic: 0 -> 0, 257 k -> k, 65535 -> 255.
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    x = a.astype(np.float64)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if a.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        x = x * 255.0
    elif a.dtype.kind in "iu" and lo >= 0 and hi <= 255:
        pass
    elif a.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        x = x * (255.0 / 65535.0)
    elif hi > lo:
        x = (x - lo) * (255.0 / (hi - lo))
    else:
        x = np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3]: ``round(c * a / 255 + 255 * (1 - a / 255))``."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _pil_to_rgb(pil, path: PathLike) -> np.ndarray:
    mode = pil.mode
    if mode == "RGB":
        return np.asarray(pil, dtype=np.uint8).copy()
    if mode in ("L", "1"):
        return _gray_to_rgb(np.asarray(pil.convert("L"), dtype=np.uint8))
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in pil.info):
        return _composite_on_white(np.asarray(pil.convert("RGBA"), dtype=np.uint8))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _gray_to_rgb(_to_uint8(np.asarray(pil)))
    try:
        return np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()  # P, CMYK, YCbCr, HSV...
    except ValueError as e:
        raise ImageReadError(path, f"unsupported colour mode {mode} ({e})") from e


def _decode_cv2(
    data: bytes,
    path: PathLike,
    max_pixels: Optional[int],
    pil_error: Optional[BaseException] = None,
) -> np.ndarray:
    """Decode with OpenCV (``IMREAD_UNCHANGED``: keeps 16 bits and alpha; no EXIF rotation)."""
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # we report it ourselves
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        img, pil_error = None, pil_error or e
    finally:
        cv2.utils.logging.setLogLevel(level)
    if img is None:
        reason = "not an image file, or an unsupported or corrupt format"
        if pil_error is not None and type(pil_error).__name__ != "UnidentifiedImageError":
            reason += f" ({_describe(pil_error)})"  # Pillow's "cannot identify" adds nothing
        raise ImageReadError(path, reason)
    _check_pixels(path, img.shape[1], img.shape[0], max_pixels)
    if img.ndim == 2:
        return _gray_to_rgb(_to_uint8(img))
    img = _to_uint8(img)
    c = img.shape[2]
    if c == 1:
        return _gray_to_rgb(img[..., 0])
    if c == 3:
        return np.ascontiguousarray(img[..., ::-1])  # BGR -> RGB
    if c == 4:
        return _composite_on_white(np.ascontiguousarray(img[..., [2, 1, 0, 3]]))
    raise ImageReadError(path, f"unsupported number of channels ({c})")
