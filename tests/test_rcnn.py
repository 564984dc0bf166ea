"""The R-CNN baseline (Girshick et al. 2014): context padding worked by hand, crop-and-warp
against a slow float64 bilinear loop, window deduplication, and detection on a tiny random
ZF-5-shaped network."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spp_detect.config import DetectorConfig, ModelConfig
from spp_detect.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from spp_detect.modeling.rcnn import RCNNDetector, context_windows, warp_windows
from spp_detect.structures import Detections

from bench_helpers import random_heads  # noqa: E402


def tiny_zf5(channels: int = 8) -> Backbone:
    """ZF-5's layer geometry (stride 16, padding floor(k/2)) with a few channels per layer."""
    c = channels

    def conv(cin, cout, k, s):
        return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)

    body = nn.Sequential(
        OrderedDict(
            [
                ("conv1", conv(3, c, 7, 2)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
                ("conv2", conv(c, c, 5, 2)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(3, stride=2, padding=1)),
                ("conv3", conv(c, c, 3, 1)),
                ("relu3", nn.ReLU()),
                ("conv5", conv(c, c, 3, 1)),
                ("relu5", nn.ReLU()),
            ]
        )
    )
    return Backbone("zf5", body, IMAGENET_MEAN, IMAGENET_STD, 224, {})


def tiny_rcnn(num_classes: int = 3, channels: int = 8, seed: int = 0) -> RCNNDetector:
    torch.manual_seed(seed)
    config = DetectorConfig(model=ModelConfig(hidden=16))
    det = RCNNDetector(tiny_zf5(channels), [f"c{k}" for k in range(num_classes)], config)
    return random_heads(det, seed).eval()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# context padding


def test_context_windows_by_hand():
    # 100 x 100 window, p = 16 at warp size 224: the window must fill 224 - 2 * 16 = 192 warped
    # pixels, so the padded window is 100 * 224 / 192 = 116.67 pixels wide, same centre.
    w = torch.tensor([[50.0, 50.0, 150.0, 150.0], [10.0, 20.0, 40.0, 100.0]])
    out = context_windows(w, 16, 224)
    s = 224 / 192
    half = 50 * s
    expected = torch.tensor(
        [
            [100 - half, 100 - half, 100 + half, 100 + half],
            # 30 x 80 window centred at (25, 60)
            [25 - 15 * s, 60 - 40 * s, 25 + 15 * s, 60 + 40 * s],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert out[0, 2] - out[0, 0] == pytest.approx(116.6667, abs=1e-3)
    # After warping the padded window to 224, the original window spans [16, 208].
    for i in range(2):
        for a in (0, 1):
            lo, hi = float(out[i, a]), float(out[i, a + 2])
            to_warp = 224 / (hi - lo)
            assert (float(w[i, a]) - lo) * to_warp == pytest.approx(16, abs=1e-3)
            assert (float(w[i, a + 2]) - lo) * to_warp == pytest.approx(208, abs=1e-3)


def test_context_windows_no_padding_and_empty():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(context_windows(w, 0, 224), w)
    assert context_windows(torch.zeros(0, 4), 16, 224).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# crop and warp


def ref_warp(image: np.ndarray, box, size: int):
    """Slow float64 crop + bilinear resize.

    Output pixel (i, j) samples the window at its own pixel centre, continuous
    ``x = x1 + (j + 0.5) * (x2 - x1) / size`` (likewise y); image pixel ``u`` has its centre at
    continuous ``u + 0.5``. Samples outside the image ``[0, W] x [0, H]`` are 0 (the mean colour
    after normalisation); inside, bilinear between the nearest pixel centres, edge pixels
    repeated within half a pixel of the border.

    Returns the warped crop [C, size, size] and the distance (pixels) by which each sample
    lies outside the image (0 inside).
    """
    c, h, w = image.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    out = np.zeros((c, size, size))
    outside = np.zeros((size, size))
    for i in range(size):
        y = y1 + (i + 0.5) * (y2 - y1) / size
        for j in range(size):
            x = x1 + (j + 0.5) * (x2 - x1) / size
            dist = max(0.0, -x, x - w, -y, y - h)
            outside[i, j] = dist
            if dist > 0:
                continue
            u = min(max(x - 0.5, 0.0), w - 1.0)
            v = min(max(y - 0.5, 0.0), h - 1.0)
            u0, v0 = int(np.floor(u)), int(np.floor(v))
            u1, v1 = min(u0 + 1, w - 1), min(v0 + 1, h - 1)
            fu, fv = u - u0, v - v0
            out[:, i, j] = (
                image[:, v0, u0] * (1 - fu) * (1 - fv)
                + image[:, v0, u1] * fu * (1 - fv)
                + image[:, v1, u0] * (1 - fu) * fv
                + image[:, v1, u1] * fu * fv
            )
    return out, outside


def test_warp_windows_matches_reference_inside():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, 7, 9))
    boxes = [
        [0.0, 0.0, 9.0, 7.0],  # the whole image
        [1.3, 0.7, 6.2, 5.9],  # upsampled
        [2.0, 3.0, 3.0, 4.0],  # one pixel
        [0.25, 1.5, 8.75, 2.5],  # thin
    ]
    size = 5
    got = warp_windows(torch.from_numpy(image), torch.tensor(boxes, dtype=torch.float64), size)
    assert got.shape == (len(boxes), 3, size, size) and got.dtype == torch.float64
    for k, box in enumerate(boxes):
        ref, outside = ref_warp(image, box, size)
        assert outside.max() == 0
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=0, atol=1e-10)


def test_warp_windows_outside_is_zero():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(3, 7, 9)) + 5.0  # no zeros inside the image
    # Partly outside on every side, and once entirely outside.
    boxes = [[-4.3, -3.1, 6.4, 5.2], [3.6, 2.2, 14.9, 12.7], [-6.0, 1.0, -2.0, 5.0]]
    size = 8
    got = warp_windows(torch.from_numpy(image), torch.tensor(boxes, dtype=torch.float64), size)
    for k, box in enumerate(boxes):
        ref, outside = ref_warp(image, box, size)
        # roi_align repeats the edge pixel up to half a pixel outside the image: that band is
        # left out; everywhere else the crop is the reference (zero outside).
        checked = (outside == 0) | (outside > 0.5)
        assert checked.mean() > 0.8
        np.testing.assert_allclose(got[k].numpy()[:, checked], ref[:, checked], atol=1e-10)
        far = outside > 0.5
        assert far.any()
        assert np.all(got[k].numpy()[:, far] == 0)
    assert torch.all(got[2] == 0)


# ---------------------------------------------------------------------------------------------
# pooled features


def test_pooled_dim_is_channels_times_the_spp_pyramid():
    # SPP-net Table 10: R-CNN's warped windows are pooled with SPP-net's own pyramid, so the two
    # share one head shape: (6x6 + 3x3 + 2x2 + 1x1) x C.
    det = tiny_rcnn(channels=8)
    assert det.pooled_dim == 8 * (36 + 9 + 4 + 1)
    assert det.head.in_features == 8 * 50
    assert det.warp_size == 224


def test_compute_pooled_dedups_identical_windows():
    det = tiny_rcnn()
    image = det.preprocess(random_image(60, 80))
    a, b, c = [5.0, 6.0, 40.0, 50.0], [0.0, 0.0, 80.0, 60.0], [20.5, 10.0, 70.0, 33.0]
    windows = torch.tensor([a, b, a, c, b, a])
    rows = []
    hook = det.backbone.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        from spp_detect.utils import StageTimer

        pooled, inverse = det.compute_pooled(image, windows, StageTimer())
    finally:
        hook.remove()
    # Only the 3 distinct windows went through the network.
    assert sum(rows) == 3
    assert pooled.shape == (3, det.pooled_dim)
    assert inverse.tolist() == [0, 1, 0, 2, 1, 0]
    # Independent reference per window: pad, warp, conv, then adaptive max pools of 6, 3, 2, 1
    # (bins floor(i*a/n) .. ceil((i+1)*a/n) - 1, as SPP), each (C, n, n), concatenated.
    for k, win in enumerate([a, b, c]):
        padded = context_windows(torch.tensor([win]), 16, 224)
        conv = det.backbone(warp_windows(image, padded, 224))
        ref = torch.cat([F.adaptive_max_pool2d(conv, n).flatten(1)[0] for n in (6, 3, 2, 1)])
        torch.testing.assert_close(pooled[k], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# detection


def test_detect_shapes():
    det = tiny_rcnn(num_classes=3)
    h, w = 50, 70
    image = random_image(h, w, seed=3)
    proposals = np.array(
        [[0, 0, 30, 30], [10, 5, 60, 45], [10, 5, 60, 45], [-5, -5, 20, 80], [40, 10, 70, 50]],
        dtype=np.float32,
    )
    dets = det.detect(image, proposals)
    assert isinstance(dets, Detections)
    n = len(dets)
    assert dets.boxes.shape == (n, 4) and dets.boxes.dtype == torch.float32
    assert dets.scores.shape == (n,) and dets.labels.shape == (n,)
    assert dets.labels.dtype == torch.long
    assert dets.image_size == (h, w)
    assert n > 0  # random SVMs (bias -1, small weights) put some windows above -1
    assert dets.labels.min() >= 0 and dets.labels.max() < 3
    assert torch.all(dets.scores > det.config.test.score_thresh)
    # Box regression output is clipped to the image.
    assert torch.all(dets.boxes[:, 0::2] >= 0) and torch.all(dets.boxes[:, 0::2] <= w)
    assert torch.all(dets.boxes[:, 1::2] >= 0) and torch.all(dets.boxes[:, 1::2] <= h)


@pytest.mark.parametrize(
    "proposals",
    [np.zeros((0, 4), np.float32), np.array([[5, 5, 5, 9], [90, 90, 99, 99]], np.float32)],
    ids=["none", "all-degenerate"],
)
def test_detect_without_windows_is_empty(proposals):
    det = tiny_rcnn()
    dets = det.detect(random_image(40, 50), proposals)
    assert len(dets) == 0
    assert dets.boxes.shape == (0, 4) and dets.scores.shape == (0,) and dets.labels.shape == (0,)
    assert dets.image_size == (40, 50)


@pytest.mark.cuda
def test_detect_cuda_matches_cpu():
    det = tiny_rcnn()
    image = random_image(50, 70, seed=4)
    proposals = np.array([[0, 0, 30, 30], [10, 5, 60, 45], [40, 10, 70, 50]], np.float32)
    cpu = det.detect(image, proposals)
    gpu = det.to("cuda").detect(image, proposals)
    assert gpu.boxes.device.type == "cpu"
    torch.testing.assert_close(gpu.scores, cpu.scores, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu.boxes, cpu.boxes, rtol=1e-3, atol=1e-2)
