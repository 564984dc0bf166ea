"""read_image on every kind of bad or unusual input (all generated in tmp_path), list_images."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from spp_detect.datasets.images import (
    ImageReadError,
    check_min_size,
    decode_image,
    list_images,
    read_image,
)


def _save(path, pil, **kw):
    pil.save(path, **kw)
    return path


def _assert_one_line_error(excinfo, path, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert excinfo.value.path == str(path)
    for w in words:
        assert w in msg.lower(), msg


# -- plain and converted modes ---------------------------------------------------------------


def test_rgb_png_roundtrip_exact(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    p = _save(tmp_path / "a.png", Image.fromarray(a))
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (7, 11, 3) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, a)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    p = _save(tmp_path / "g.png", Image.fromarray(g, mode="L"))
    out = read_image(p)
    assert out.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_one_bit_image(tmp_path):
    b = np.zeros((4, 8), dtype=bool)
    b[:, :4] = True
    p = _save(tmp_path / "b.png", Image.fromarray(b))
    out = read_image(p)
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()


def test_rgba_composited_on_white_by_hand(tmp_path):
    a = np.zeros((1, 4, 4), dtype=np.uint8)
    a[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    a[0, 1] = (0, 0, 255, 255)  # opaque blue stays blue
    a[0, 2] = (0, 0, 0, 128)  # half black: (0*128 + 255*127 + 127) // 255 = 127
    a[0, 3] = (200, 100, 50, 51)  # c*51/255 + 255*204/255: 40+204=244, 20+204=224, 10+204=214
    p = _save(tmp_path / "rgba.png", Image.fromarray(a, mode="RGBA"))
    out = read_image(p)
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(
        out[0], [[255, 255, 255], [0, 0, 255], [127, 127, 127], [244, 224, 214]]
    )


def test_la_mode(tmp_path):
    la = np.array([[[0, 255], [0, 0]]], dtype=np.uint8)  # opaque black, transparent black
    p = _save(tmp_path / "la.png", Image.fromarray(la, mode="LA"))
    out = read_image(p)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [255, 255, 255]])


def test_palette_and_palette_transparency(tmp_path):
    idx = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    pil = Image.fromarray(idx, mode="P")
    pil.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0] + [0] * (256 * 3 - 9))
    p = _save(tmp_path / "p.png", pil)
    assert Image.open(p).mode == "P"
    np.testing.assert_array_equal(
        read_image(p)[0], [[10, 20, 30], [200, 100, 0], [0, 0, 0], [200, 100, 0]]
    )
    p2 = _save(tmp_path / "pt.png", pil, transparency=2)  # index 2 transparent -> white
    np.testing.assert_array_equal(
        read_image(p2)[0], [[10, 20, 30], [200, 100, 0], [255, 255, 255], [200, 100, 0]]
    )


def test_gif_palette(tmp_path):
    a = np.zeros((5, 6, 3), dtype=np.uint8)
    a[:, 3:] = (255, 0, 0)
    p = _save(tmp_path / "x.gif", Image.fromarray(a))
    out = read_image(p)
    assert out.shape == (5, 6, 3)
    np.testing.assert_array_equal(out[:, 3:], np.broadcast_to([255, 0, 0], (5, 3, 3)))


# -- 16 bit ---------------------------------------------------------------------------------

# round(v * 255 / 65535) by hand: 257 k -> k, 1000/257 = 3.89 -> 4, 32767/257 = 127.5 -> 127
# (127.498...), 65535 -> 255.
_V16 = np.array([[0, 257, 1000, 32767, 32896, 65535]], dtype=np.uint16)
_V8 = np.array([[0, 1, 4, 127, 128, 255]], dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16bit_gray_scaled_not_clipped(tmp_path, ext):
    p = tmp_path / f"g16{ext}"
    assert cv2.imwrite(str(p), _V16)
    assert Image.open(p).mode.startswith("I;16")
    out = read_image(p)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], _V8)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16bit_colour_rounded(tmp_path, ext):
    rgb16 = np.stack([_V16, _V16[:, ::-1], np.full_like(_V16, 2000)], axis=2)
    p = tmp_path / f"c16{ext}"
    assert cv2.imwrite(str(p), rgb16[..., ::-1])  # OpenCV writes BGR
    out = read_image(p)
    # 2000 / 257 = 7.78: rounding gives 8 (Pillow's high byte alone would give 7).
    expect = np.stack([_V8, _V8[:, ::-1], np.full_like(_V8, 8)], axis=2)
    np.testing.assert_array_equal(out, expect)


def test_32bit_float_tiff(tmp_path):
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    p = _save(tmp_path / "f.tiff", Image.fromarray(f, mode="F"))
    np.testing.assert_array_equal(read_image(p)[0, :, 0], [0, 128, 255])


# -- CMYK, EXIF ----------------------------------------------------------------------------


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    p = _save(tmp_path / "cmyk.jpg", cmyk, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = read_image(p)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.reshape(-1, 3).mean(0) - [255, 0, 0]).max() < 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(tmp_path, orientation):
    # Left third red, rest blue, top rows green: each orientation moves them distinctly.
    a = np.zeros((24, 40, 3), dtype=np.uint8)
    a[:, :] = (0, 0, 255)
    a[:, :13] = (255, 0, 0)
    a[:6] = (0, 255, 0)
    pil = Image.fromarray(a)
    exif = pil.getexif()
    exif[0x0112] = orientation
    p = _save(tmp_path / f"o{orientation}.jpg", pil, quality=95, exif=exif.tobytes())
    out = read_image(p)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    np.testing.assert_array_equal(out, reference)
    if orientation == 6:
        # Rotated 90 degrees clockwise: out[i, j] = a[23 - j, i]. The left (red) third is now
        # on top, the top (green) rows on the right, the rest blue.
        def near(px, rgb):
            return bool((np.abs(px.astype(int) - rgb) < 40).all())

        assert out.shape == (40, 24, 3)
        assert near(out[2, :16], [255, 0, 0]) and near(out[2, 19:], [0, 255, 0])
        assert near(out[35, :16], [0, 0, 255]) and near(out[35, 19:], [0, 255, 0])


# -- bad files -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    _assert_one_line_error(e, p, "not found")


def test_directory(tmp_path):
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path)
    _assert_one_line_error(e, tmp_path, "directory")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    _assert_one_line_error(e, p, "empty")


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not\nan image\n")
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    _assert_one_line_error(e, p, "not an image")


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.png"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    _assert_one_line_error(e, p)


def _jpeg_bytes(h=64, w=80):
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    _assert_one_line_error(e, p, "truncated")


def test_corrupt_png_data(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 30, 3), np.uint8) + 77).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start : start + 20] = b"\xff" * 20  # destroy the compressed stream
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    _assert_one_line_error(e, p)


def test_too_many_pixels(tmp_path):
    p = _save(tmp_path / "big.png", Image.new("RGB", (100, 80)))
    assert read_image(p, max_pixels=8000).shape == (80, 100, 3)  # at the limit: fine
    with pytest.raises(ImageReadError) as e:
        read_image(p, max_pixels=7999)
    _assert_one_line_error(e, p, "100x80", "max_pixels")


def test_pillow_decompression_bomb_is_clean(tmp_path, monkeypatch):
    p = _save(tmp_path / "bomb.png", Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 > 2 * 1000: Pillow refuses
    with pytest.raises(ImageReadError) as e:
        read_image(p, max_pixels=None)
    _assert_one_line_error(e, p, "too large")


def test_check_min_size():
    img = np.zeros((5, 3, 3), dtype=np.uint8)  # 3 wide, 5 high
    with pytest.raises(ImageReadError) as e:
        check_min_size(img, 16, "tiny.png")
    assert str(e.value) == "tiny.png: image is 3x5 pixels, smaller than one feature cell (16 px)"
    check_min_size(np.zeros((16, 16, 3), np.uint8), 16, "ok.png")  # exactly one cell: fine


def test_tiny_image_reads_then_fails_min_size(tmp_path):
    p = _save(tmp_path / "tiny.png", Image.new("RGB", (3, 5), (1, 2, 3)))
    img = read_image(p)
    assert img.shape == (5, 3, 3)
    with pytest.raises(ValueError, match="3x5 pixels"):
        check_min_size(img, 16, p)


def test_decode_image_matches_read_image(tmp_path):
    data = _jpeg_bytes()
    p = tmp_path / "x.jpg"
    p.write_bytes(data)
    np.testing.assert_array_equal(decode_image(data, p), read_image(p))


def test_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(ImageReadError("a.jpg", "empty file")))
    assert isinstance(e, ValueError) and str(e) == "a.jpg: empty file" and e.reason == "empty file"


# -- list_images ---------------------------------------------------------------------------


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_list_images_folder_glob_file(tmp_path):
    a = _touch(tmp_path / "b.jpg")
    b = _touch(tmp_path / "a.PNG")
    c = _touch(tmp_path / "sub" / "deeper" / "c.jpeg")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.jpg")
    _touch(tmp_path / ".cache" / "d.jpg")
    assert list_images(tmp_path) == sorted([a, b, c], key=str)
    assert list_images(str(tmp_path / "*.jpg")) == [a]
    assert list_images(str(tmp_path / "**" / "*.jp*g")) == sorted([a, c], key=str)
    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]  # named: kept
    assert list_images(str(tmp_path / "*.bmp")) == []
    assert list_images(tmp_path / "sub" / "deeper") == [c]
    with pytest.raises(ValueError, match="no such file or folder"):
        list_images(tmp_path / "missing")
