"""Selective search wrapper, the on-disk proposal cache, and proposal files (.npz, R-CNN .mat)."""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from spp_detect.datasets.images import read_image
from spp_detect.datasets.records import ImageRecord
from spp_detect.datasets.toy_scene import render_toy_image
from spp_detect.proposals import cache as cache_mod
from spp_detect.proposals.cache import ProposalCache
from spp_detect.proposals.compute import compute_proposals
from spp_detect.proposals.files import load_proposals_file, save_proposals_file
from spp_detect.proposals.selective_search import selective_search
from spp_detect.proposals.settings import ProposalSettings as S


def _toy(seed=0, w=150, h=110):
    img, _, _ = render_toy_image(np.random.default_rng(seed), w, h)
    return img


def _write(path, img):
    Image.fromarray(img).save(path)
    return path


def _check_valid(boxes, w, h, max_proposals, min_size):
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) <= max_proposals
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] - boxes[:, 0] >= min_size).all()
    assert (boxes[:, 3] - boxes[:, 1] >= min_size).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)  # no duplicates


# -- selective search ----------------------------------------------------------------------


def test_selective_search_on_toy_image():
    img = _toy()
    boxes = selective_search(img, S(mode="fast", max_proposals=2000, min_size=12))
    assert len(boxes) > 10
    _check_valid(boxes, 150, 110, 2000, 12)
    # Deterministic (seeded ranking), and the cap keeps the first windows in order.
    np.testing.assert_array_equal(boxes, selective_search(img, S(min_size=12)))
    capped = selective_search(img, S(max_proposals=7, min_size=12))
    np.testing.assert_array_equal(capped, boxes[:7])
    # A larger min_size only removes windows.
    big = selective_search(img, S(min_size=40))
    _check_valid(big, 150, 110, 2000, 40)
    assert {tuple(b) for b in big} <= {tuple(b) for b in boxes}


def test_xywh_converted_to_continuous_xyxy_by_hand():
    # A flat rectangle over pixel columns 20..39 and rows 10..29 on a flat background is one
    # segment: OpenCV's Rect(20, 10, 20, 20), i.e. continuous [20, 10, 40, 30].
    img = np.full((60, 80, 3), 90, np.uint8)
    img[10:30, 20:40] = (200, 30, 30)
    boxes = selective_search(img, S(min_size=0))
    assert [20, 10, 40, 30] in boxes.tolist()
    assert [0, 0, 80, 60] in boxes.tolist()  # the whole image, at the top of the hierarchy


def test_resize_to_scales_boxes_back():
    small = _toy(seed=1, w=100, h=70)
    big = cv2.resize(small, (200, 140), interpolation=cv2.INTER_NEAREST)
    # INTER_AREA halving of a 2x nearest upscale gives back `small` exactly, so the windows
    # found on the downscaled copy are the windows of `small`, doubled.
    ref = selective_search(small, S(min_size=0, max_proposals=0))
    got = selective_search(big, S(min_size=0, max_proposals=0, resize_to=100))
    np.testing.assert_array_equal(got, ref * 2)
    assert len(selective_search(big, S(resize_to=500, min_size=0))) > 0  # no upscaling


def test_grayscale_rgba_and_tiny_images():
    img = _toy(seed=2, w=90, h=80)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(
        selective_search(gray, S(min_size=10)),
        selective_search(np.repeat(gray[:, :, None], 3, axis=2), S(min_size=10)),
    )
    rgba = np.concatenate([img, np.full((80, 90, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(
        selective_search(rgba, S(min_size=10)), selective_search(img, S(min_size=10))
    )
    tiny = np.zeros((5, 7, 3), np.uint8)
    np.testing.assert_array_equal(selective_search(tiny, S(min_size=0)), [[0, 0, 7, 5]])
    empty = selective_search(tiny, S())  # 7x5 is below the default min_size of 20
    assert empty.shape == (0, 4) and empty.dtype == np.float32
    # max_proposals 0 keeps every window: the same as a cap no image reaches.
    every = selective_search(img, S(max_proposals=0, min_size=0))
    np.testing.assert_array_equal(every, selective_search(img, S(max_proposals=10**6, min_size=0)))
    assert len(every) > len(selective_search(img, S(max_proposals=5, min_size=0))) == 5


def test_selective_search_bad_input():
    with pytest.raises(ValueError, match="mode"):
        S(mode="slow")
    with pytest.raises(ValueError, match="uint8"):
        selective_search(np.zeros((20, 20, 3), np.float32), S())
    with pytest.raises(ValueError, match="shape|pixels"):
        selective_search(np.zeros((0, 20, 3), np.uint8), S())
    with pytest.raises(ValueError, match="inc_k"):
        S(inc_k=0)


# -- cache ---------------------------------------------------------------------------------


@pytest.fixture
def fake_ss(monkeypatch):
    """Count selective search calls; boxes depend on the image and the settings."""
    calls = []

    def fake(image, settings):
        calls.append(image.shape)
        h, w = image.shape[:2]
        v = float(image.astype(np.int64).sum() % 97)
        boxes = np.array([[0, 0, w, h], [1, 1, w - 1, h - 1], [v / 10, 0, w, h]], np.float32)
        return boxes[: settings.limit]

    monkeypatch.setattr(cache_mod, "selective_search", fake)
    return calls


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return [(f"im{i}", _write(d / f"im{i}.png", _toy(seed=10 + i, w=64, h=48))) for i in range(3)]


def _tmp_leftovers(d):
    return [p for p in d.iterdir() if p.name.startswith(".")] if d.exists() else []


def test_cache_reuses_on_second_call(tmp_path, images, fake_ss):
    image_id, path = images[0]
    c = ProposalCache(tmp_path / "cache", S())
    a = c.get(image_id, path)
    assert len(fake_ss) == 1 and c.computed == 1 and c.path_for(image_id).is_file()
    b = ProposalCache(tmp_path / "cache", S()).get(image_id, path)  # a new run
    assert len(fake_ss) == 1
    np.testing.assert_array_equal(a, b)
    assert b.dtype == np.float32 and b.shape == (3, 4)
    # Given the decoded image, the cache still fingerprints the file and does not decode.
    assert len(c.get(image_id, path, image=read_image(path))) == 3 and len(fake_ss) == 1
    assert _tmp_leftovers(tmp_path / "cache") == []


def test_cache_invalidated_by_settings(tmp_path, images, fake_ss):
    image_id, path = images[0]
    ProposalCache(tmp_path / "c", S(max_proposals=3)).get(image_id, path)
    ProposalCache(tmp_path / "c", S(max_proposals=3)).get(image_id, path)
    assert len(fake_ss) == 1
    assert len(ProposalCache(tmp_path / "c", S(max_proposals=2)).get(image_id, path)) == 2
    assert len(fake_ss) == 2
    changes = [
        dict(mode="quality"),
        dict(min_size=5),
        dict(resize_to=500),
        dict(seed=1),
        dict(base_k=100),
        dict(inc_k=100),
    ]
    for kw in changes:
        ProposalCache(tmp_path / "c", S(max_proposals=2, **kw)).get(image_id, path)
    assert len(fake_ss) == 2 + len(changes)


def test_cache_invalidated_by_image_change(tmp_path, images, fake_ss):
    image_id, path = images[0]
    c = ProposalCache(tmp_path / "c", S())
    first = c.get(image_id, path)
    os.utime(path, ns=(1, 1))  # touched, same bytes: content fingerprint still matches
    c.get(image_id, path)
    assert len(fake_ss) == 1
    _write(path, _toy(seed=99, w=64, h=48))  # new content
    second = c.get(image_id, path)
    assert len(fake_ss) == 2
    assert not np.array_equal(first, second)

    # Same size and modification time, other bytes: still recomputed (the key is the content).
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the PNG's IEND/IDAT trailer: the file stays the same length
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert c.load(image_id, c.key(image_id, path=path)) is None


def test_cache_key_has_a_format_version(tmp_path, images, fake_ss, monkeypatch):
    image_id, path = images[0]
    ProposalCache(tmp_path / "c", S()).get(image_id, path)
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", cache_mod.CACHE_VERSION + 1)
    ProposalCache(tmp_path / "c", S()).get(image_id, path)
    assert len(fake_ss) == 2


def test_corrupt_cache_file_is_recomputed(tmp_path, images, fake_ss, caplog):
    image_id, path = images[0]
    c = ProposalCache(tmp_path / "c", S())
    good = c.get(image_id, path)
    f = c.path_for(image_id)
    data = f.read_bytes()
    for bad in (b"", b"garbage" * 10, data[: len(data) // 2]):
        f.write_bytes(bad)
        with caplog.at_level(logging.WARNING):
            np.testing.assert_array_equal(c.get(image_id, path), good)
        assert "unreadable" in caplog.text
        caplog.clear()
    assert len(fake_ss) == 4
    assert c.load(image_id, c.key(image_id, path=path)) is not None  # repaired on disk


def test_interrupted_write_keeps_old_file_and_no_tmp(tmp_path, images, fake_ss, monkeypatch):
    image_id, path = images[0]
    c = ProposalCache(tmp_path / "c", S(max_proposals=3))
    c.get(image_id, path)
    before = c.path_for(image_id).read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        ProposalCache(tmp_path / "c", S(max_proposals=2)).get(image_id, path)
    assert c.path_for(image_id).read_bytes() == before
    assert _tmp_leftovers(tmp_path / "c") == []


def test_path_for_odd_ids(tmp_path):
    c = ProposalCache(tmp_path, S())
    assert c.path_for("000005") == tmp_path / "000005.npz"
    odd = c.path_for("../a/b c")
    assert odd.parent == tmp_path and odd.name != c.path_for("../a/b_c").name


def test_compute_proposals_reuse_and_summary(tmp_path, images, fake_ss, caplog):
    records = [ImageRecord(i, p, 64, 48) for i, p in images]
    with caplog.at_level(logging.INFO, logger="spp_detect.proposals.compute"):
        out = compute_proposals(records, tmp_path / "c", S(), jobs=1, progress=False)
    assert list(out) == [i for i, _ in images] and len(fake_ss) == 3
    assert "0 reused" in caplog.text and "3 computed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spp_detect.proposals.compute"):
        again = compute_proposals(images, tmp_path / "c", S(), jobs=1, progress=False)
    assert len(fake_ss) == 3 and "3 reused" in caplog.text and "0 computed" in caplog.text
    for k in out:
        np.testing.assert_array_equal(out[k], again[k])


def test_compute_proposals_errors(tmp_path, images, fake_ss):
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_text("not an image")
    items = images + [("broken", bad), ("gone", tmp_path / "missing.png")]
    with pytest.raises(ValueError, match="broken.jpg: not an image"):
        compute_proposals(images + [("broken", bad)], tmp_path / "c", S(), progress=False)
    with pytest.raises(ValueError, match="missing.png: file not found"):
        compute_proposals(items, tmp_path / "c", S(), progress=False)
    errors = {}
    out = compute_proposals(
        items, tmp_path / "c", S(), progress=False, on_error="skip", errors=errors
    )
    assert list(out) == [i for i, _ in images]
    assert set(errors) == {"broken", "gone"}
    assert "missing.png: file not found" in errors["gone"]
    with pytest.raises(ValueError, match="two files"):
        compute_proposals([("a", images[0][1]), ("a", images[1][1])], tmp_path / "c", S())


def test_parallel_equals_inline(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    items = [(f"p{i}", _write(d / f"p{i}.png", _toy(seed=20 + i, w=96, h=72))) for i in range(4)]
    one = compute_proposals(items, tmp_path / "c1", S(min_size=8), jobs=1, progress=False)
    two = compute_proposals(items, tmp_path / "c2", S(min_size=8), jobs=2, progress=False)
    assert list(one) == list(two) == [i for i, _ in items]
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])
        assert len(one[k]) > 0
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == [f"p{i}.npz" for i in range(4)]


# -- proposal files ------------------------------------------------------------------------


def test_npz_roundtrip_and_errors(tmp_path):
    props = {"000005": np.array([[1, 2, 30, 40]], np.float32), "000007": np.zeros((0, 4))}
    f = save_proposals_file(tmp_path / "p.npz", props)
    got = load_proposals_file(f)
    assert list(got) == ["000005", "000007"]
    np.testing.assert_array_equal(got["000005"], props["000005"])
    assert got["000007"].shape == (0, 4) and got["000007"].dtype == np.float32
    np.savez(tmp_path / "bad.npz", a=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"bad.npz: boxes of 'a'"):
        load_proposals_file(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        load_proposals_file(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="not found"):
        load_proposals_file(tmp_path / "none.npz")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown proposals file type"):
        load_proposals_file(tmp_path / "p.txt")


def test_rcnn_mat_file_one_based_yx_converted(tmp_path):
    from scipy.io import savemat

    images = np.empty((1, 3), dtype=object)
    images[0, :] = ["000005", "000007", "000009"]
    boxes = np.empty((1, 3), dtype=object)
    # R-CNN: 1-based inclusive [y1 x1 y2 x2]. Rows 11..50, columns 21..80 (1-based) are
    # 0-based rows 10..49, columns 20..79: continuous [x1 y1 x2 y2] = [20, 10, 80, 50].
    boxes[0, 0] = np.array([[11, 21, 50, 80], [1, 1, 375, 500]], dtype=np.float64)
    boxes[0, 1] = np.zeros((0, 0))  # an image without windows
    boxes[0, 2] = np.array([[5, 6, 5, 6]], dtype=np.uint16)  # one pixel: row 5, column 6
    savemat(tmp_path / "voc_2007_test.mat", {"images": images, "boxes": boxes})
    got = load_proposals_file(tmp_path / "voc_2007_test.mat")
    assert list(got) == ["000005", "000007", "000009"]
    np.testing.assert_array_equal(got["000005"], [[20, 10, 80, 50], [0, 0, 500, 375]])
    assert got["000007"].shape == (0, 4)
    np.testing.assert_array_equal(got["000009"], [[5, 4, 6, 5]])
    assert all(v.dtype == np.float32 for v in got.values())


def test_malformed_mat_files(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "a.mat", {"boxes": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="a.mat: expected variables 'images' and 'boxes'"):
        load_proposals_file(tmp_path / "a.mat")
    images = np.empty((1, 2), dtype=object)
    images[0, :] = ["1", "2"]
    boxes = np.empty((1, 1), dtype=object)
    boxes[0, 0] = np.ones((1, 4))
    savemat(tmp_path / "b.mat", {"images": images, "boxes": boxes})
    with pytest.raises(ValueError, match="2 images but 1 box matrices"):
        load_proposals_file(tmp_path / "b.mat")
    boxes = np.empty((1, 2), dtype=object)
    boxes[0, 0], boxes[0, 1] = np.ones((1, 4)), np.ones((2, 3))
    savemat(tmp_path / "c.mat", {"images": images, "boxes": boxes})
    with pytest.raises(ValueError, match=r"c.mat: boxes of '2' must be a numeric \[R, 4\]"):
        load_proposals_file(tmp_path / "c.mat")
    (tmp_path / "d.mat").write_bytes(b"not matlab")
    with pytest.raises(ValueError, match="d.mat"):
        load_proposals_file(tmp_path / "d.mat")
