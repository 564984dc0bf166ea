"""SPPDetector pieces and the whole ``detect`` against independent references, the Predictor,
and save/load."""

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from spp_detect.config import DetectorConfig
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.build import build_detector, load_detector
from spp_detect.modeling.pyramid import choose_scales
from spp_detect.modeling.spp import SpatialPyramidPooling
from spp_detect.utils import null_timer
from spp_detect.modeling.svm import LinearSVMs
from spp_detect.modeling.window_pool import bin_major_order, pool_windows, project_windows


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
    d = 6.5  # the SPP_net code's inward move for ZF-5 (stride 16), in resized pixels
    assert det.inward_offset == d
    for i in range(40):
        s = int(chosen[i])
        f = factors[s]
        fmap = maps[s]
        h, w = fmap.shape[-2:]
        x1, y1, x2, y2 = (windows[i] * f).double().tolist()
        # Appendix A, written out independently: each edge moved d pixels inward, then to the
        # nearest cell centre, rounded inward.
        left, top = np.floor((x1 + d - c0) / stride + 0.5), np.floor((y1 + d - c0) / stride + 0.5)
        right = np.ceil((x2 - 1 - d - c0) / stride - 0.5)
        bottom = np.ceil((y2 - 1 - d - c0) / stride - 0.5)
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


def _hand_detect(det, image, windows):
    """``detect`` composed by hand in float64 from the detector's weights, for one scale whose
    resize factor is 1: conv5 -> appendix A projection -> window pyramid pooling -> fc6, fc7 ->
    SVM margins (or softmax without background) -> R-CNN box deltas -> per-class NMS
    (torchvision) -> per-class and per-image caps."""
    cfg, model = det.config.test, det.config.model
    h, w = image.shape[:2]
    assert det.scale_factors((h, w)) == [1.0]
    with torch.no_grad():
        fmap = det.backbone(det.backbone.preprocess(image)[None])[0]
    bb = det.backbone
    cells = project_windows(windows, bb.stride, bb.center_offset, fmap.shape[-2:], 6.5)
    pooled = pool_windows(fmap, cells, model.levels).double()
    head = {k: v.double() for k, v in det.head.state_dict().items()}
    fc6 = torch.relu(pooled * head["input_scale"] @ head["fc6.weight"].T + head["fc6.bias"])
    fc7 = torch.relu(fc6 @ head["fc7.weight"].T + head["fc7.bias"])
    if cfg.classifier == "svm":
        svm = det.svms
        scores = fc7 @ (svm.weight.double() * float(svm.feature_scale)).T + svm.bias.double()
    else:
        logits = fc7 @ head["cls_score.weight"].T + head["cls_score.bias"]
        scores = torch.softmax(logits, dim=1)[:, 1:]  # column 0 is background
    # Box regression: the regressor's linear map (identity whitening here), then R-CNN's
    # transform: the centre moves by (dx * w, dy * h), the sides scale by exp(dw), exp(dh).
    reg = det.bbox_regressor
    weight = reg.weight.double()  # [K, D + 1, 4], the last row is the bias
    deltas = torch.einsum("rd,kdf->rkf", pooled * float(reg.feature_scale), weight[:, :-1])
    deltas = deltas + weight[:, -1]
    win = windows.double()
    size = win[:, 2:] - win[:, :2]
    centre = win[:, :2] + 0.5 * size
    new_centre = centre[:, None] + deltas[..., :2] * size[:, None]
    new_size = size[:, None] * deltas[..., 2:].exp()
    boxes = torch.cat([new_centre - 0.5 * new_size, new_centre + 0.5 * new_size], dim=2)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float64))
    labels = torch.arange(det.num_classes).expand_as(scores)
    keep = scores > cfg.score_thresh
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = batched_nms(boxes, scores, labels, cfg.nms_thresh)  # by decreasing score
    per_class = torch.tensor([int((labels[order[:i]] == labels[j]).sum()) for i, j in
                              enumerate(order.tolist())], dtype=torch.long)  # fmt: skip
    order = order[per_class < cfg.max_per_class][: cfg.max_per_image]
    return boxes[order], scores[order], labels[order]


def _assert_same_detections(d, ref):
    boxes, scores, labels = ref
    assert len(d) == len(labels) > 0
    assert torch.equal(d.labels, labels)
    torch.testing.assert_close(d.scores.double(), scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.boxes.double(), boxes, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("max_per_class, max_per_image", [(100, 1000), (2, 5)])
def test_detect_equals_the_hand_composition(max_per_class, max_per_image):
    det = _detector(
        score_thresh=0.0, nms_thresh=0.3, max_per_class=max_per_class, max_per_image=max_per_image
    )
    with torch.no_grad():  # bigger deltas than _detector's, so that regression visibly moves
        det.bbox_regressor.weight.mul_(30)
    image = np.random.default_rng(5).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    windows = _windows(50, 64, 80, seed=4)
    ref = _hand_detect(det, image, windows)
    d = det.detect(image, windows.numpy())
    _assert_same_detections(d, ref)
    assert d.image_size == (64, 80)
    assert len(set(d.labels.tolist())) >= 2  # several NMS groups exercised
    moved = box_iou(d.boxes, windows).max(dim=1).values
    assert float(moved.min()) < 0.99  # box regression moved the windows


def test_softmax_classifier_needs_no_svms():
    det = _detector(classifier="softmax", score_thresh=0.3, max_per_image=1000)
    det.svms = None
    with torch.no_grad():  # a confident head, so that some windows clear the threshold
        det.head.cls_score.weight.normal_(std=1.0)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    windows = _windows(40, 64, 64, seed=6)
    d = det.detect(image, windows.numpy())
    _assert_same_detections(d, _hand_detect(det, image, windows))
    assert bool(((d.scores > 0.3) & (d.scores < 1)).all())


def test_predictor_without_proposals_runs_selective_search():
    from spp_detect.datasets.toy_scene import render_toy_image
    from spp_detect.inference.predictor import Predictor
    from spp_detect.proposals.selective_search import selective_search

    det = _detector(scales=(96,), score_thresh=-1e9, max_per_image=1000)
    config_before = det.config
    image, _, _ = render_toy_image(np.random.default_rng(1), 128, 96)
    settings = det.config.proposals
    windows = selective_search(image, settings)
    assert len(windows) > 10
    d = Predictor(det)(image)
    ref = det.detect(image, windows)
    assert len(d) > 0
    assert torch.equal(d.labels, ref.labels) and torch.equal(d.scores, ref.scores)
    assert torch.equal(d.boxes, ref.boxes)
    assert det.config is config_before  # the predictor configured a copy


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
    # the test-time copy reads its pooled features bin-major (SPPDetector.configure_test_head)
    order = bin_major_order(det.backbone.out_channels, det.config.model.levels)
    got, _ = fast.head.predict(pooled[:, order])
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    assert len(fast.detect(image, _windows(10, 48, 48).numpy())) > 0
    with pytest.raises(ValueError, match="before compressing"):
        fast.save("unused.pt")
    with pytest.raises(ValueError, match="with_settings"):
        bad = det.with_settings()
        bad.config = bad.config.replace(test=dataclasses.replace(bad.config.test, svd_fc6=8))
        bad.detect(image, _windows(3, 48, 48).numpy())


def test_box_regression_runs_only_on_windows_that_can_be_kept():
    det = _detector(score_thresh=0.0, nms_thresh=0.3, max_per_class=100, max_per_image=1000)
    with torch.no_grad():
        det.bbox_regressor.weight.mul_(30)
    image = np.random.default_rng(5).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    windows = _windows(50, 64, 80, seed=4)
    rows = []
    predict = det.bbox_regressor.predict_deltas

    def counting(features):
        rows.append(features.shape[0])
        return predict(features)

    det.bbox_regressor.predict_deltas = counting
    d = det.detect(image, windows.numpy())
    # The same detections as regressing every window (the hand composition) ...
    _assert_same_detections(d, _hand_detect(det, image, windows))
    # ... from fewer rows: the windows below the threshold in every class are not regressed.
    with torch.no_grad():
        pooled, _ = det.compute_pooled(det.preprocess(image), windows, null_timer())
    assert len(rows) == 1 and 0 < rows[0] < pooled.shape[0]
