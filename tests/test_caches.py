"""Caches that cannot go stale: the conv-map cache and R-CNN's window-feature cache are keyed
by all the weights, the image bytes and the settings; corrupt files are recomputed with a
warning; atomic writes fsync before the rename and respect the umask."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from spp_detect import utils
from spp_detect.config import DetectorConfig
from spp_detect.datasets.records import ImageRecord
from spp_detect.modeling.build import build_detector
from spp_detect.training.conv_cache import ConvFeatureCache, weights_digest
from spp_detect.training.rcnn_features import RCNNWindowFeatures

REPO = Path(__file__).resolve().parents[1]


def _config(scales=(64,)) -> DetectorConfig:
    c = DetectorConfig()
    return c.replace(model=dataclasses.replace(c.model, backbone="zf5", scales=scales, hidden=16))


def _image(seed: int, w: int = 80, h: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _record(path: Path, image_id: str = "im0") -> ImageRecord:
    with Image.open(path) as im:
        w, h = im.size
    return ImageRecord(image_id, path, w, h)


@pytest.fixture
def spp():
    torch.manual_seed(0)
    return build_detector("spp", ["a", "b"], _config(), pretrained=False).eval()


@pytest.fixture
def bmp(tmp_path):
    # BMP is uncompressed: other pixels give a file of exactly the same size.
    path = tmp_path / "im0.bmp"
    Image.fromarray(_image(0)).save(path)
    return path


def _reference_maps(det, image: np.ndarray):
    with torch.no_grad():
        return [m.to(torch.float16) for m in det.conv_maps(det.preprocess(image))]


# -- ConvFeatureCache ------------------------------------------------------------------------


def test_conv_cache_reused_for_same_inputs(tmp_path, spp, bmp):
    rec = _record(bmp)
    first = ConvFeatureCache(tmp_path / "c", spp).build([rec])
    assert (first["computed"], first["reused"]) == (1, 0)
    cache = ConvFeatureCache(tmp_path / "c", spp)  # a new run, same weights and image
    assert cache.build([rec])["reused"] == 1
    maps, factors = cache.get(rec)
    ref = _reference_maps(spp, _image(0))
    assert len(maps) == len(ref) == 1 and torch.equal(maps[0], ref[0])
    assert factors == spp.scale_factors((64, 80))


def test_conv_cache_sees_one_weight_deep_inside_a_tensor(tmp_path, spp, bmp):
    rec = _record(bmp)
    ConvFeatureCache(tmp_path / "c", spp).build([rec])
    before = _reference_maps(spp, _image(0))
    name, w = next((n, t) for n, t in spp.backbone.state_dict().items() if t.numel() > 10_000)
    digest = weights_digest(spp.backbone)
    with torch.no_grad():
        w.view(-1)[w.numel() - 1] += 1.0  # far beyond the first 4,096 values
    assert weights_digest(spp.backbone) != digest, name
    cache = ConvFeatureCache(tmp_path / "c", spp)
    assert cache.build([rec])["computed"] == 1
    after = _reference_maps(spp, _image(0))
    assert not torch.equal(before[0], after[0])  # the change matters to the maps
    assert torch.equal(cache.get(rec)[0][0], after[0])


def test_conv_cache_sees_new_content_with_same_size_and_mtime(tmp_path, spp, bmp):
    rec = _record(bmp)
    ConvFeatureCache(tmp_path / "c", spp).build([rec])
    st = os.stat(bmp)
    Image.fromarray(_image(1)).save(bmp)  # other pixels, same dimensions
    os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(bmp)
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    cache = ConvFeatureCache(tmp_path / "c", spp)
    assert cache.build([rec])["computed"] == 1
    assert torch.equal(cache.get(rec)[0][0], _reference_maps(spp, _image(1))[0])


def test_conv_cache_key_covers_scales_and_dtype(tmp_path, spp, bmp):
    rec = _record(bmp)
    ConvFeatureCache(tmp_path / "c", spp).build([rec])
    assert ConvFeatureCache(tmp_path / "c", spp, dtype="float32").build([rec])["computed"] == 1
    other = spp.with_settings(scales=(48,))
    assert ConvFeatureCache(tmp_path / "c", other, dtype="float32").build([rec])["computed"] == 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the garbage file
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_conv_cache_file_is_recomputed_with_a_warning(tmp_path, spp, bmp, caplog, damage):
    rec = _record(bmp)
    ConvFeatureCache(tmp_path / "c", spp).build([rec])
    f = tmp_path / "c" / "im0.pt"
    data = f.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x80junk" * 9}
    f.write_bytes(bad[damage])
    cache = ConvFeatureCache(tmp_path / "c", spp)
    with caplog.at_level(logging.WARNING, logger="spp_detect.training.conv_cache"):
        assert cache.build([rec])["computed"] == 1
    assert "im0.pt" in caplog.text and "recomputing" in caplog.text
    assert torch.equal(cache.get(rec)[0][0], _reference_maps(spp, _image(0))[0])
    assert ConvFeatureCache(tmp_path / "c", spp).build([rec])["reused"] == 1  # repaired


def test_conv_cache_entry_of_wrong_layout_is_recomputed(tmp_path, spp, bmp, caplog):
    from spp_detect.serialization import load_file, save_file

    rec = _record(bmp)
    cache = ConvFeatureCache(tmp_path / "c", spp)
    cache.build([rec])
    f = tmp_path / "c" / "im0.pt"
    entry = load_file(f)
    save_file({**entry, "maps": []}, f)  # right key, no maps: never used silently
    with caplog.at_level(logging.WARNING, logger="spp_detect.training.conv_cache"):
        assert ConvFeatureCache(tmp_path / "c", spp).build([rec])["computed"] == 1
    assert "recomputing" in caplog.text


def test_weights_are_hashed_once_per_cache(tmp_path, spp, bmp, monkeypatch):
    import spp_detect.training.conv_cache as conv_cache

    calls = []
    real = conv_cache.weights_digest
    monkeypatch.setattr(conv_cache, "weights_digest", lambda m: calls.append(1) or real(m))
    recs = []
    for i in range(3):
        p = tmp_path / f"im{i}.bmp"
        Image.fromarray(_image(i)).save(p)
        recs.append(_record(p, f"im{i}"))
    cache = ConvFeatureCache(tmp_path / "c", spp)
    cache.build(recs)
    for r in recs:
        cache.get(r)
    assert len(calls) == 1


# -- R-CNN window features -------------------------------------------------------------------


def test_rcnn_feature_cache_keyed_by_windows_and_weights(tmp_path, bmp, caplog):
    torch.manual_seed(0)
    det = build_detector("rcnn", ["a", "b"], _config(), pretrained=False).eval()
    calls = []
    real = det.pool_windows
    det.pool_windows = lambda *a: calls.append(1) or real(*a)
    rec = _record(bmp)
    windows = torch.tensor([[0.0, 0.0, 40.0, 30.0], [10.0, 5.0, 70.0, 60.0]])
    image = SimpleNamespace(record=rec, windows=windows)
    first = RCNNWindowFeatures(det, tmp_path / "r")
    first.prepare([image])
    RCNNWindowFeatures(det, tmp_path / "r").prepare([image])
    assert len(calls) == 1  # same inputs: reused
    moved = SimpleNamespace(record=rec, windows=windows + torch.tensor([0.0, 0.0, 0.5, 0.0]))
    RCNNWindowFeatures(det, tmp_path / "r").prepare([moved])
    assert len(calls) == 2  # a window moved by half a pixel
    with torch.no_grad():
        w = max(det.backbone.state_dict().values(), key=lambda t: t.numel())
        w.view(-1)[-1] += 1.0
    RCNNWindowFeatures(det, tmp_path / "r").prepare([moved])
    assert len(calls) == 3  # one weight deep inside a tensor
    f = tmp_path / "r" / "im0.pt"
    f.write_bytes(f.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="spp_detect.training.rcnn_features"):
        RCNNWindowFeatures(det, tmp_path / "r").prepare([moved])
    assert len(calls) == 4 and "recomputing" in caplog.text


# -- atomic writes ---------------------------------------------------------------------------


def test_atomic_path_fsyncs_the_data_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    utils.atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    tmp = next(p for kind, p in events if kind == "replace")
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))


def test_atomic_path_leaves_no_temporary_file_on_failure(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_path_never_touches_the_process_umask(tmp_path, monkeypatch):
    def forbidden(mask):
        raise AssertionError("os.umask changes the umask of every thread")

    monkeypatch.setattr(os, "umask", forbidden)
    utils.atomic_write_text(tmp_path / "a.txt", "x")


_MODES_SCRIPT = """
import os, sys
from pathlib import Path

import numpy as np
import torch

os.umask(int(sys.argv[2], 8))
from spp_detect.proposals.cache import ProposalCache
from spp_detect.proposals.files import save_proposals_file
from spp_detect.proposals.settings import ProposalSettings
from spp_detect.serialization import save_file
from spp_detect.utils import atomic_write_text

d = Path(sys.argv[1])
cache = ProposalCache(d / "cache", ProposalSettings())
cache.save("im0", "key", np.zeros((1, 4), np.float32))
save_proposals_file(d / "p.npz", {"im0": np.zeros((1, 4), np.float32)})
save_file({"t": torch.zeros(2)}, d / "f.pt")
atomic_write_text(d / "t.txt", "x")
mask = os.umask(0)
paths = [cache.path_for("im0"), d / "p.npz", d / "f.pt", d / "t.txt"]
print(oct(mask), *(oct(os.stat(p).st_mode & 0o777) for p in paths))
"""


@pytest.mark.parametrize("umask, mode", [("022", "0o644"), ("077", "0o600")])
def test_created_files_respect_the_umask(tmp_path, umask, mode):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = textwrap.dedent(_MODES_SCRIPT)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), umask],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    assert out == [oct(int(umask, 8))] + [mode] * 4  # the umask itself is left as it was
