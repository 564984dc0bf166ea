"""Bounded memory at any dataset size (issue 10): training's in-memory window features stay
within a budget (beyond it they are pooled from the conv cache or read from disk, with the same
values), and the SVM negative caches and box-regression samples have per-class caps that hold,
with results unchanged below them."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from spp_detect.config import DetectorConfig, apply_overrides
from spp_detect.datasets.records import ImageRecord
from spp_detect.modeling.build import build_detector
from spp_detect.modeling.svm import LinearSVMs
from spp_detect.training.bbox_fit import fit_box_regressor
from spp_detect.training.bbox_training import BoxRegressionTrainer
from spp_detect.training.conv_cache import ConvFeatureCache
from spp_detect.training.rcnn_features import RCNNWindowFeatures
from spp_detect.training.hard_negatives import HardNegativeMiner
from spp_detect.training.svm_solver import SVMSolver
from spp_detect.training.window_features import SPPWindowFeatures, memory_budget


def _config() -> DetectorConfig:
    c = DetectorConfig()
    model = dataclasses.replace(c.model, backbone="zf5", scales=(64,), hidden=16)
    return c.replace(model=model)


def _images(tmp_path, n=3):
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
        xy = torch.from_numpy(rng.uniform(0, 40, (30, 2))).float()
        wh = torch.from_numpy(rng.uniform(8, 40, (30, 2))).float()
        windows = torch.cat([xy, (xy + wh).clamp(max=79)], dim=1)
        out.append(SimpleNamespace(record=ImageRecord(f"im{i}", path, 80, 64), windows=windows))
    return out


# -- the memory budget ------------------------------------------------------------------------


def test_memory_budget_from_config_or_available_ram():
    assert memory_budget(3) == 3 << 20
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    # A quarter of MemAvailable, read independently (it moves a little between the reads).
    assert memory_budget(0) == pytest.approx(avail / 4, rel=0.1)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        memory_budget(-1)
    cfg = apply_overrides(DetectorConfig(), ["memory_budget_mb=512"])
    assert cfg.memory_budget_mb == 512 and DetectorConfig().memory_budget_mb == 0


def test_spp_pooling_from_the_conv_cache_equals_the_in_memory_path(tmp_path):
    torch.manual_seed(0)
    det = build_detector("spp", ["a", "b"], _config(), pretrained=False).eval()
    images = _images(tmp_path)
    cache = ConvFeatureCache(tmp_path / "conv", det)
    big = SPPWindowFeatures(det, cache, random_scale=False, memory_bytes=1 << 30)
    tiny = SPPWindowFeatures(det, cache, random_scale=False, memory_bytes=1)
    stats_big, stats_tiny = big.prepare(images), tiny.prepare(images)
    assert stats_big["pooled_in_memory"] and not stats_tiny["pooled_in_memory"]
    assert len(big._pooled) == 3 and not tiny._pooled  # nothing pooled ahead under the budget
    expected_bytes = 3 * 30 * det.pooled_dim * 2
    assert stats_big["pooled_bytes"] == expected_bytes
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        idx = torch.randperm(30, generator=g)[:17]
        a, b = big.rows(i, idx), tiny.rows(i, idx)
        assert a.dtype == b.dtype == torch.float32 and a.shape == (17, det.pooled_dim)
        assert torch.equal(a, b)
        # And both equal pooling this image's windows directly from its float16 maps.
        maps, factors = cache.get(images[i].record)
        with torch.no_grad():
            pooled, inverse = det.pool_from_maps(
                [m.float() for m in maps], factors, images[i].windows[idx]
            )
        assert torch.equal(a, pooled[inverse].half().float())


def test_conv_map_lru_takes_its_share_of_the_training_budget(tmp_path):
    from spp_detect.training.train import CONV_LRU_SHARE, make_feature_source

    cfg = apply_overrides(_config(), ["memory_budget_mb=8"])
    det = build_detector("spp", ["a", "b"], cfg, pretrained=False).eval()
    source = make_feature_source(det, tmp_path)
    # The LRU of conv maps and the pooled windows share the budget (the LRU was a fixed 2 GiB).
    assert source.cache.memory_bytes == (8 << 20) // CONV_LRU_SHARE
    assert source.cache.memory_bytes + source.memory_bytes == 8 << 20
    images = _images(tmp_path, n=4)
    per_map = sum(m.numel() * m.element_size() for m in source.cache.get(images[0].record)[0])
    source.cache.memory_bytes = 2 * per_map  # room for two maps: the LRU keeps the last two
    for im in images:
        source.cache.get(im.record)
    assert source.cache._lru_bytes <= 2 * per_map and list(source.cache._lru) == ["im2", "im3"]


def test_rcnn_features_stay_on_disk_within_the_budget(tmp_path):
    torch.manual_seed(0)
    det = build_detector("rcnn", ["a", "b"], _config(), pretrained=False).eval()
    images = _images(tmp_path)
    per_image = 30 * det.pooled_dim * 2  # float16
    big = RCNNWindowFeatures(det, tmp_path / "r", memory_bytes=1 << 30)
    one = RCNNWindowFeatures(det, tmp_path / "r", memory_bytes=per_image)
    none = RCNNWindowFeatures(det, tmp_path / "r", memory_bytes=0)
    for source in (big, one, none):
        source.prepare(images)
        assert not source._lru  # prepare keeps nothing in memory
    reads = []
    real = none._load

    def counted(*args):
        reads.append(1)
        return real(*args)

    none._load = counted
    idx = torch.tensor([3, 0, 29, 7])
    for i in (0, 1, 2, 0):
        a, b, c = big.rows(i, idx), one.rows(i, idx), none.rows(i, idx)
        assert torch.equal(a, b) and torch.equal(a, c)
        assert one._lru_bytes <= per_image and len(one._lru) == 1
        assert not none._lru
    assert len(reads) == 4  # no budget: every request reads the image's file again
    assert len(big._lru) == 3
    # The values are those written to disk by prepare.
    stored = torch.load(tmp_path / "r" / "im2.pt", weights_only=True)["pooled"]
    assert torch.equal(none.rows(2, idx), stored[idx].float())


# -- SVM negative caches -------------------------------------------------------------------------


def _mining_images(n=8, r=120, d=12, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        feats = torch.randn(r, d, generator=g)
        is_gt = torch.zeros(r, dtype=torch.bool)
        is_gt[:2] = True
        labels = torch.tensor([0, 1])[:k]
        feats[0, 0] += 4
        feats[1, 1] += 4
        ious = torch.zeros(r, k)
        ious[0, 0] = ious[1, 1] = 1.0
        out.append(dict(features=feats, window_ious=ious, is_gt=is_gt, gt_labels=labels))
    return out


def _mine(images, cap, retrain_limit=150):
    svms = LinearSVMs(2)
    svms.set_feature_scale(1.0)
    miner = HardNegativeMiner(
        svms,
        SVMSolver(C=0.001),
        dedup_negatives=False,
        retrain_limit=retrain_limit,
        max_cached_negatives=cap,
    )
    sizes = []
    for item in images:
        miner.add_image(**item)
        sizes.append([miner.cache_size(c) for c in range(2)])
    return miner, sizes


def test_negative_cache_cap_holds_and_keeps_the_hardest():
    images = _mining_images()
    _, uncapped = _mine(images, cap=0)
    assert max(max(s) for s in uncapped) > 30  # the cap below binds
    miner, sizes = _mine(images, cap=30)
    assert max(max(s) for s in sizes) <= 30
    # The cut keeps the hardest: replay the last image by hand on the state before it (no
    # retrain after the first model, so the cut is all that changes the cache).
    before, _ = _mine(images[:-1], cap=30, retrain_limit=10**6)
    svms, last = before.svms, images[-1]
    scores = svms.scores(last["features"])
    expected = []
    for c in range(2):
        cand = torch.nonzero((last["window_ious"][:, c] < 0.3) & (scores[:, c] > -1.0001))
        cand = cand.flatten()
        feats = torch.cat([before._neg[c][0], last["features"][cand]])
        keys = torch.cat([before.cached_keys(c), torch.stack([torch.full_like(cand, 7), cand], 1)])
        assert feats.shape[0] > 30  # the cap binds on this image
        z = (svms.scale_features(feats.double()) @ svms.weight[c].double()).tolist()
        top = sorted(range(len(z)), key=lambda j: (-z[j], j))[:30]
        expected.append(keys[sorted(top)])
    before.add_image(**last)
    assert before._trained_at == [1, 1]  # trained once, after the first image only
    for c in range(2):
        assert torch.equal(before.cached_keys(c), expected[c]), c


def test_negative_cache_cap_above_the_peak_changes_nothing():
    images = _mining_images()
    free, sizes = _mine(images, cap=0)
    peak = max(max(s) for s in sizes)
    capped, _ = _mine(images, cap=peak)
    assert torch.equal(free.svms.weight, capped.svms.weight)
    assert torch.equal(free.svms.bias, capped.svms.bias)
    tighter, _ = _mine(images, cap=peak // 2)
    assert not torch.equal(free.svms.weight, tighter.svms.weight)  # the test can see a cap


# -- box-regression samples ------------------------------------------------------------------


def test_reservoir_keeps_a_uniform_sample_within_the_cap():
    gt = torch.tensor([[10.0, 10, 60, 60]])
    windows = gt.repeat(5, 1)
    counts = torch.zeros(20)
    trials = 400
    for seed in range(trials):
        trainer = BoxRegressionTrainer(max_per_image=0, max_samples=5, seed=seed)
        for image in range(4):  # 20 windows of class 0 over 4 images
            feats = (torch.arange(5.0) + 5 * image)[:, None]
            trainer.add_image(feats, windows, gt, torch.tensor([0]))
            assert trainer.class_samples(0) == min(5, 5 * (image + 1))
        kept = trainer.class_features(0).flatten().long()
        assert len(set(kept.tolist())) == 5
        counts[kept] += 1
    # Each window is kept with probability 5 / 20 (binomial sd 0.022 over 400 trials).
    assert (counts / trials - 0.25).abs().max() < 0.08


def test_box_regression_below_the_cap_equals_the_uncapped_reference():
    g = torch.Generator().manual_seed(4)
    trainer = BoxRegressionTrainer(max_per_image=0, max_samples=1000, seed=0)
    capped = BoxRegressionTrainer(max_per_image=0, max_samples=25, seed=0)
    all_f, all_b, all_gt, all_l = [], [], [], []
    for _ in range(6):
        gt = torch.tensor([[20.0, 20, 90, 80], [120, 40, 200, 150]])
        labels = torch.tensor([0, 1])
        windows = gt.repeat(10, 1) + torch.randn(20, 4, generator=g) * 5
        feats = torch.randn(20, 16, generator=g)
        for t in (trainer, capped):
            t.add_image(feats, windows, gt, labels)
        ious = torch.stack([fit_box_iou(windows, b) for b in gt], dim=1)
        best, match = ious.max(dim=1)
        keep = best > 0.5
        all_f.append(feats[keep].half())
        all_b.append(windows[keep])
        all_gt.append(gt[match[keep]])
        all_l.append(labels[match[keep]])
    n = sum(int(t.shape[0]) for t in all_l)
    assert trainer.num_samples == n and n > 50
    assert capped.class_samples(0) == capped.class_samples(1) == 25
    ref = fit_box_regressor(
        torch.cat(all_f).float(), torch.cat(all_b), torch.cat(all_gt), torch.cat(all_l), 2,
        feature_scale=0.5,
    )  # fmt: skip
    got = trainer.fit(2, feature_scale=0.5)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(capped.fit(2, feature_scale=0.5).weight, ref.weight)


def fit_box_iou(windows, box):
    """IoU of each window with one box, by hand (float64)."""
    w = windows.double()
    b = box.double()
    iw = (torch.minimum(w[:, 2], b[2]) - torch.maximum(w[:, 0], b[0])).clamp(min=0)
    ih = (torch.minimum(w[:, 3], b[3]) - torch.maximum(w[:, 1], b[1])).clamp(min=0)
    inter = iw * ih
    area = (w[:, 2] - w[:, 0]) * (w[:, 3] - w[:, 1]) + (b[2] - b[0]) * (b[3] - b[1])
    return (inter / (area - inter)).float()


def test_caps_come_from_the_config():
    cfg = apply_overrides(
        DetectorConfig(),
        ["svm.max_cached_negatives=7", "bbox_reg.max_samples=9", "bbox_reg.max_per_image=3"],
    )
    trainer = BoxRegressionTrainer.from_config(cfg.bbox_reg)
    assert (trainer.max_samples, trainer.max_per_image) == (9, 3)
    assert cfg.svm.max_cached_negatives == 7
    with pytest.raises(ValueError, match="max_cached_negatives"):
        HardNegativeMiner(LinearSVMs(2), max_cached_negatives=-1)
