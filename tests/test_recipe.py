"""The paper's training and test recipe (issue 9, part 1), each item against a hand-worked case
from the paper or the released SPP_net / R-CNN code."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from spp_detect.config import DetectorConfig, FinetuneConfig
from spp_detect.datasets.records import ImageRecord, mirror_boxes
from spp_detect.modeling.base import rank_within_group
from spp_detect.modeling.build import build_detector
from spp_detect.modeling.pyramid import choose_scales
from spp_detect.modeling.window_pool import project_windows
from spp_detect.training.finetune import WindowPool, make_training_images

# -- per-class cap (R-CNN / SPP_net / Fast R-CNN: 100 per class per image) ---------------------


def test_rank_within_group_matches_a_loop():
    g = torch.tensor([3, 1, 3, 3, 0, 1, 3, 0])
    seen = {}
    ref = []
    for v in g.tolist():
        ref.append(seen.get(v, 0))
        seen[v] = seen.get(v, 0) + 1
    assert rank_within_group(g).tolist() == ref
    assert rank_within_group(torch.zeros(0, dtype=torch.long)).numel() == 0


def _config(**test):
    c = DetectorConfig()
    return c.replace(
        model=dataclasses.replace(c.model, backbone="zf5", scales=(64,), hidden=8),
        test=dataclasses.replace(c.test, **test),
    )


def test_postprocess_keeps_top_k_of_each_class():
    torch.manual_seed(0)
    det = build_detector("spp", ["a", "b", "c"], _config(score_thresh=-1e9), pretrained=False)
    # 40 far-apart boxes (no NMS suppression), class-specific scores.
    xy = torch.arange(40, dtype=torch.float32)[:, None] * 100
    boxes = torch.cat([xy, xy, xy + 10, xy + 10], 1)[:, None, :].expand(-1, 3, 4)
    scores = torch.rand(40, 3)
    full = det.postprocess(boxes, scores, (10000, 10000))
    capped = det.with_settings(max_per_class=5).postprocess(boxes, scores, (10000, 10000))
    assert len(full) == 120
    for c in range(3):
        top = torch.sort(scores[:, c], descending=True).values[:5]
        got = capped.scores[capped.labels == c]
        torch.testing.assert_close(torch.sort(got, descending=True).values, top)
    # The per-image cap (off by default) still applies on top.
    both = det.with_settings(max_per_class=5, max_per_image=7)
    assert len(both.postprocess(boxes, scores, (10000, 10000))) == 7


# -- projection: the released code's inward offset -------------------------------------------


def _matlab_projection(box, offset0, offset, step):
    """``spm_pool_caffe_mex.cpp`` in MATLAB's 1-based pixels and cells (box l, t, r, b)."""
    x0, y0, x1, y1 = box
    return [
        int(math.floor((x0 - offset0 + offset) / step + 0.5) + 1),
        int(math.floor((y0 - offset0 + offset) / step + 0.5) + 1),
        int(math.ceil((x1 - offset0 - offset) / step - 0.5) + 1),
        int(math.ceil((y1 - offset0 - offset) / step - 0.5) + 1),
    ]


def test_inward_offset_hand_case_and_released_formula():
    w = torch.tensor([[2.0, 2.0, 95.0, 95.0]])
    # Without the move: left edge 2 px -> cell 0 (centre 0), right edge (pixel 94) -> cell 6.
    assert project_windows(w, 16, 0.0, (20, 20)).tolist() == [[0, 0, 6, 6]]
    # With 6.5 px: left 8.5 -> cell 1 (centre 16 is nearer than 0), right 87.5 -> cell 5.
    assert project_windows(w, 16, 0.0, (20, 20), inward=6.5).tolist() == [[1, 1, 5, 5]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, y1 = rng.uniform(0, 300, 2).round(1)
        x2, y2 = x1 + rng.uniform(40, 300), y1 + rng.uniform(40, 300)
        c, d = float(rng.choice([0.0, 7.5, 21.0])), float(rng.choice([0.0, 6.5]))
        ours = project_windows(torch.tensor([[x1, y1, x2, y2]]), 16, c, (60, 60), inward=d)
        # 1-based: first pixel x1 + 1, last pixel x2 (= x2 - 1 + 1), cell 1 centred at c + 1.
        ref = _matlab_projection((x1 + 1, y1 + 1, x2, y2), c + 1, d, 16)
        ref = [min(max(v - 1, 0), 59) for v in ref]
        if ref[0] <= ref[2] and ref[1] <= ref[3]:
            assert ours[0].tolist() == ref
    with pytest.raises(ValueError, match="inward"):
        project_windows(w, 16, 0.0, (20, 20), inward=-1)


def test_detector_inward_offset_default_is_the_released_value():
    det = build_detector("spp", ["a"], _config(), pretrained=False)
    assert det.inward_offset == pytest.approx(6.5)  # ZF-5, stride 16
    m = dataclasses.replace(det.config.model, inward_offset=0.0)
    assert build_detector("spp", ["a"], det.config.replace(model=m), False).inward_offset == 0.0


# -- per-window scale: the paper's area rule vs spm_expected_scale.m -------------------------


def test_scale_rules_hand_case_where_they_differ():
    scales = (480, 576, 688, 864, 1200)
    factors = [s / 375 for s in scales]  # a 500 x 375 image
    w = torch.tensor([[10.0, 10.0, 114.0, 114.0]])  # 104 x 104
    # Paper: resized area closest to 224^2: at 688 the side is 190.8 (area 36,404; off by
    # 13,772), at 864 it is 239.6 (area 57,411; off by 7,235) -> 864.
    assert choose_scales(w, factors, 224, rule="area").item() == 3
    # spm_expected_scale.m: round(13 * 16 * 375 / 104) = 750 -> nearest of the scales is 688.
    expected = round(13 * 16 * 375 / 104)
    assert expected == 750
    nearest = int(np.argmin([abs(s - expected) for s in scales]))
    assert choose_scales(w, factors, rule="code", code_target=208).item() == nearest == 2


def test_scale_rules_agree_on_most_windows():
    rng = np.random.default_rng(0)
    wh = rng.uniform(20, 480, (2000, 2))
    w = torch.tensor(np.concatenate([np.zeros_like(wh), wh], 1), dtype=torch.float32)
    factors = [s / 375 for s in (480, 576, 688, 864, 1200)]
    a = choose_scales(w, factors, 224, rule="area")
    b = choose_scales(w, factors, rule="code", code_target=208)
    differ = float((a != b).float().mean())
    assert 0.02 < differ < 0.35  # the issue measured about 13% on real proposals


# -- difficult objects stay positives -------------------------------------------------------


def _record():
    return ImageRecord(
        "im",
        "im.jpg",
        100,
        80,
        boxes=np.array([[10, 10, 40, 40], [50, 20, 90, 70]], np.float32),
        labels=np.array([0, 1]),
        difficult=np.array([False, True]),
        truncated=np.array([False, False]),
    )


def test_difficult_objects_kept_by_default_and_excluded_on_request():
    rec = _record()
    window = np.array([[51, 21, 89, 69]], np.float32)  # IoU 0.9 with the difficult object
    cfg = FinetuneConfig()
    keep = make_training_images([rec], {"im": window}, cfg)[0]
    assert keep.gt_boxes.shape[0] == 2 and keep.labels[-1].item() == 2  # class 1 -> label 2
    drop = make_training_images([rec], {"im": window}, cfg, use_difficult=False)[0]
    assert drop.gt_boxes.shape[0] == 1 and drop.labels[-1].item() == -1  # IoU 0 with the rest


# -- horizontal flips ----------------------------------------------------------------------------


def test_mirrored_record_hand_case_and_round_trip():
    rec = _record()
    m = rec.mirrored()
    assert m.flipped and m.image_id == "im.flipped"
    # x1' = W - x2, x2' = W - x1 in the continuous frame (W = 100).
    assert m.boxes.tolist() == [[60, 10, 90, 40], [10, 20, 50, 70]]
    back = m.mirrored()
    assert not back.flipped and back.image_id == "im" and np.array_equal(back.boxes, rec.boxes)
    assert mirror_boxes(np.zeros((0, 4)), 10).shape == (0, 4)


# -- fine-tuning mini-batches from a pool spanning the training set ---------------------------


class _Source:
    """Features that encode (image, window): row = [image, window]."""

    def __init__(self):
        self.calls = 0

    def rows(self, i, idx, rng=None):
        self.calls += 1
        return torch.stack([torch.full((idx.numel(),), float(i)), idx.float()], 1)


def _images(n_images=60, fg_per_image=3, bg_per_image=20):
    images = []
    for i in range(n_images):
        rec = ImageRecord(f"{i}", f"{i}.jpg", 100, 100)
        labels = torch.tensor([1 + i % 2] * fg_per_image + [0] * bg_per_image + [-1] * 5)
        images.append(
            type(
                "TI", (), {"record": rec, "labels": labels, "windows": torch.zeros(len(labels), 4)}
            )
        )
    return images


def test_window_pool_batches_span_many_images_and_fetch_the_right_rows():
    images = _images()
    src = _Source()
    cfg = FinetuneConfig(pool_batches=4)
    pool = WindowPool(images, src, cfg, np.random.default_rng(0), torch.Generator().manual_seed(0))
    it = pool.batches(cfg.pool_batches)
    for _ in range(8):
        x, y = next(it)
        assert x.shape == (128, 2) and (y[:32] > 0).all() and (y[32:] == 0).all()
        # Each row is the window it claims to be: its label is that window's label.
        for (i, j), label in zip(x.long().tolist(), y.tolist()):
            assert images[i].labels[j].item() == label
        # 32 positives from 60 images x 3: far more than the old 8 images per batch.
        assert len({int(i) for i in x[:32, 0]}) > 12
    # Features are read once per image per refill of 4 batches, not once per batch.
    assert src.calls <= 2 * len(images)


def test_pool_size_changes_reads_not_batches():
    """The same draws whatever the pool size (a refill of 1 or of 25 mini-batches), and an
    on-demand source gets as many mini-batches per refill as its budget holds."""
    from spp_detect.training.finetune import pool_batches

    images = _images()
    runs = []
    for size in (1, 25):
        pool = WindowPool(
            images, _Source(), FinetuneConfig(), None, torch.Generator().manual_seed(3)
        )
        it = pool.batches(size)
        runs.append([next(it) for _ in range(30)])
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    cfg = FinetuneConfig(pool_batches=10, batch_size=128)
    assert pool_batches(cfg, _Source()) == 10  # features in memory: the configured pool
    on_demand = type("S", (), {"on_demand_pool_windows": 128 * 300 + 5})()
    assert pool_batches(cfg, on_demand) == 300


def test_window_pool_small_sets_give_smaller_batches_without_repeats():
    images = _images(n_images=2, fg_per_image=3, bg_per_image=10)
    pool = WindowPool(images, _Source(), FinetuneConfig(), None, torch.Generator().manual_seed(0))
    x, y = next(pool.batches(10))
    assert int((y > 0).sum()) == 6 and int((y == 0).sum()) == 20
    assert len({tuple(r) for r in x.long().tolist()}) == 26


# -- R-CNN baseline: the same pyramid as SPP-net (Table 10) ------------------------------------


def test_rcnn_pools_with_the_same_pyramid_as_spp():
    cfg = _config()
    spp = build_detector("spp", ["a"], cfg, pretrained=False)
    rcnn = build_detector("rcnn", ["a"], cfg, pretrained=False)
    assert rcnn.pooled_dim == spp.pooled_dim == 256 * 50
    assert rcnn.head.fc6.in_features == spp.head.fc6.in_features
