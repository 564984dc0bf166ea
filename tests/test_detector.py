"""SPPDetector pieces against independent references, and save/load."""

import dataclasses

import numpy as np
import pytest
import torch

from spp_detect.config import DetectorConfig
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.build import build_detector, load_detector
from spp_detect.modeling.pyramid import choose_scales
from spp_detect.modeling.spp import SpatialPyramidPooling
from spp_detect.modeling.svm import LinearSVMs


def _config(scales=(64,), hidden=16, **test):
    c = DetectorConfig()
    return c.replace(
        model=dataclasses.replace(c.model, backbone="zf5", scales=scales, hidden=hidden),
        test=dataclasses.replace(c.test, **test),
    )


def _detector(scales=(64,), **test):
    torch.manual_seed(0)
    det = build_detector("spp", ["a", "b", "c"], _config(scales, **test), pretrained=False)
    d = det.pooled_dim
    det.svms = LinearSVMs(3)
    det.svms.reset_weights(16)
    det.svms.weight.normal_()
    det.svms.trained.fill_(True)
    det.svms.set_feature_scale(1.0)
    det.bbox_regressor = BoxRegressor.from_state_dict(
        {
            "weight": torch.randn(3, d + 1, 4) * 1e-3,
            "target_mean": torch.zeros(3, 4),
            "target_transform": torch.eye(4).repeat(3, 1, 1),
            "feature_scale": torch.tensor(1.0),
            "trained": torch.ones(3, dtype=torch.bool),
            "delta_weights": torch.ones(4),
        }
    )
    return det.eval()


def _windows(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 8.0, h - 8.0])
    wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2.0, h / 2.0])
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1)


def test_pool_from_maps_matches_cropping_each_window():
    det = _detector(scales=(48, 96))
    image = torch.randn(3, 60, 80)
    maps = det.conv_maps(image)
    factors = det.scale_factors((60, 80))
    windows = _windows(40, 60, 80)
    pooled, inverse = det.pool_from_maps(maps, factors, windows)
    chosen = choose_scales(windows, factors)
    spp = SpatialPyramidPooling((6, 3, 2, 1))
    stride, c0 = det.backbone.stride, det.backbone.center_offset
    for i in range(40):
        s = int(chosen[i])
        f = factors[s]
        fmap = maps[s]
        h, w = fmap.shape[-2:]
        x1, y1, x2, y2 = (windows[i] * f).double().tolist()
        # Appendix A, written out independently: nearest cell centre, rounded inward.
        left, top = np.floor((x1 - c0) / stride + 0.5), np.floor((y1 - c0) / stride + 0.5)
        right = np.ceil((x2 - 1 - c0) / stride - 0.5)
        bottom = np.ceil((y2 - 1 - c0) / stride - 0.5)
        if left > right:
            left = right = (left + right) // 2
        if top > bottom:
            top = bottom = (top + bottom) // 2
        left, right = int(np.clip(left, 0, w - 1)), int(np.clip(right, 0, w - 1))
        top, bottom = int(np.clip(top, 0, h - 1)), int(np.clip(bottom, 0, h - 1))
        ref = spp(fmap[None, :, top : bottom + 1, left : right + 1])[0]
        assert torch.allclose(pooled[inverse[i]], ref)


def test_windows_on_the_same_cells_share_one_row():
    det = _detector()
    image = torch.randn(3, 64, 64)
    maps = det.conv_maps(image)
    w = torch.tensor([[0.0, 0, 32, 32], [0.5, 0.5, 32.2, 32.2], [16, 16, 60, 60]])
    pooled, inverse = det.pool_from_maps(maps, det.scale_factors((64, 64)), w)
    assert pooled.shape[0] == 2 and inverse[0] == inverse[1] != inverse[2]


def test_detect_shapes_and_empty_cases():
    det = _detector(score_thresh=-1e9, max_per_image=7)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    d = det.detect(image, _windows(30, 50, 70).numpy())
    assert d.boxes.shape == (7, 4) and d.scores.shape == (7,) and d.labels.shape == (7,)
    assert d.image_size == (50, 70)
    assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 2] <= 70).all()
    assert torch.all(d.scores[:-1] >= d.scores[1:])
    e = det.detect(image, np.zeros((0, 4), np.float32))
    assert e.boxes.shape == (0, 4) and e.labels.dtype == torch.long
    high = _detector(score_thresh=1e9)
    assert len(high.detect(image, _windows(5, 50, 70).numpy())) == 0


def test_detect_keeps_per_class_nms():
    det = _detector(score_thresh=-1e9, max_per_image=1000)
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    d = det.detect(image, _windows(60, 64, 64, seed=3).numpy())
    from torchvision.ops import box_iou

    for c in range(3):
        b = d.boxes[d.labels == c]
        if len(b) > 1:
            iou = box_iou(b, b) - torch.eye(len(b))
            assert float(iou.max()) <= 0.3 + 1e-6


def test_save_load_round_trip(tmp_path):
    det = _detector(score_thresh=-1e9)
    path = det.save(tmp_path / "model.pt")
    loaded = load_detector(path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.config == det.config
    image = np.random.default_rng(2).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    props = _windows(20, 40, 52).numpy()
    a, b = det.detect(image, props), loaded.detect(image, props)
    assert torch.equal(a.labels, b.labels) and torch.allclose(a.scores, b.scores)
    assert torch.allclose(a.boxes, b.boxes)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.pt"):
        load_detector(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not found"):
        load_detector(tmp_path / "missing.pt")


def test_softmax_classifier_needs_no_svms():
    det = _detector(classifier="softmax", score_thresh=0.0)
    det.svms = None
    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    d = det.detect(image, _windows(10, 48, 48).numpy())
    assert ((d.scores >= 0) & (d.scores <= 1)).all()


def test_truncated_svd_matches_low_rank_reference():
    from spp_detect.modeling.head import truncated_svd_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 30)
    x = torch.randn(7, 40)
    # Reference: the best rank-r approximation via numpy's SVD (Eckart-Young).
    w = layer.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    for r in (1, 5, 29):
        approx = (u[:, :r] * s[:r]) @ vt[:r]
        ref = x.double().numpy() @ approx.T + layer.bias.detach().double().numpy()
        got = truncated_svd_linear(layer, r)(x).detach().double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd_linear(layer, 30)


def test_with_settings_svd_head_matches_truncated_svd_and_leaves_original():
    det = _detector(score_thresh=-1e9)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    fast = det.with_settings(svd_fc6=8, svd_fc7=4)
    # The original is untouched: same head object, no compression, same weights and config.
    assert det.head.svd_ranks == (0, 0) and det.config.test.svd_fc6 == 0
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items())
    assert fast.head is not det.head and fast.backbone is det.backbone
    # Reference: rank-k approximation of each layer's weight from a float64 SVD.
    pooled = torch.randn(7, det.pooled_dim)

    def low_rank(w, k):
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return (u[:, :k] * s[:k]) @ vh[:k]

    h = det.head
    x = pooled.double() * float(h.input_scale)
    x = torch.relu(x @ low_rank(h.fc6.weight, 8).T + h.fc6.bias.double())
    ref = torch.relu(x @ low_rank(h.fc7.weight, 4).T + h.fc7.bias.double())
    got, _ = fast.head.predict(pooled)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    assert len(fast.detect(image, _windows(10, 48, 48).numpy())) > 0
    with pytest.raises(ValueError, match="before compressing"):
        fast.save("unused.pt")
    with pytest.raises(ValueError, match="with_settings"):
        bad = det.with_settings()
        bad.config = bad.config.replace(test=dataclasses.replace(bad.config.test, svd_fc6=8))
        bad.detect(image, _windows(3, 48, 48).numpy())
