"""Low-rank fc layers from their responses (modeling/lowrank.py; Zhang et al. 2015)."""

import pytest
import torch
from torch import nn

from spp_detect.modeling.head import FCHead, truncated_svd_linear
from spp_detect.modeling.lowrank import ResponseMoments, response_lowrank_linear


def _moments(y, max_rank, batch=37):
    m = ResponseMoments(y.shape[1])
    for start in range(0, y.shape[0], batch):
        m.update(y[start : start + batch])
    return m.finalize(max_rank)


def test_moments_equal_torch_cov_despite_a_large_mean():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, 12, generator=g) * torch.linspace(0.1, 3, 12) + 1000.0
    stats = _moments(y, 12)
    ref = torch.cov(y.double().t(), correction=0)
    evals = torch.linalg.eigvalsh(ref).flip(0)
    torch.testing.assert_close(stats["mean"].double(), y.double().mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(stats["eigenvalues"].double(), evals, rtol=1e-3, atol=1e-4)
    assert stats["total_variance"] == pytest.approx(float(torch.trace(ref)), rel=1e-4)
    # The basis is orthonormal and diagonalises the reference covariance.
    p = stats["basis"].double()
    torch.testing.assert_close(p.t() @ p, torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.t() @ ref @ p, torch.diag(evals), atol=2e-3, rtol=1e-3)


def _layer(in_f, out_f, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f)
    nn.init.kaiming_normal_(layer.weight)  # a flat spectrum, as our fc layers start
    nn.init.normal_(layer.bias)
    return layer


def test_inputs_on_a_k_dim_subspace_are_reproduced_exactly_at_rank_k():
    """x = c + A z (z k-dimensional): y = W x + b spans a k-dim affine subspace, which rank k
    keeps whole, on windows not used for the statistics too; the weight SVD at rank k cannot
    (W is random and full-rank)."""
    in_f, out_f, k = 200, 64, 8
    layer = _layer(in_f, out_f, 1)
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(in_f, k, generator=g)
    offset = torch.randn(in_f, generator=g) * 5

    def sample(n):
        return offset + torch.randn(n, k, generator=g) @ basis.t()

    with torch.no_grad():
        stats = _moments(layer(sample(300)), max_rank=32)
        x = sample(50)
        exact = layer(x)
        low = response_lowrank_linear(layer, stats, k)(x)
        svd = truncated_svd_linear(layer, k)(x)
    scale = exact.abs().max()
    assert (low - exact).abs().max() < 1e-4 * scale
    assert (svd - exact).abs().max() > 0.1 * scale


def test_rank_r_error_is_the_sum_of_the_dropped_eigenvalues():
    """On the statistics' own windows the mean squared error of the rank-r layer equals the
    variance it drops (the optimality of the principal subspace), and decreases with r."""
    layer = _layer(40, 30, 3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 40, generator=g) @ torch.diag(torch.logspace(0, -2, 40))
    with torch.no_grad():
        y = layer(x)
        stats = _moments(y, 30)
        errors = []
        for r in (2, 5, 10, 20):
            approx = response_lowrank_linear(layer, stats, r)(x)
            mse = float((approx - y).double().pow(2).sum(1).mean())
            dropped = float(stats["eigenvalues"][r:].double().sum())
            assert mse == pytest.approx(dropped, rel=2e-3, abs=1e-6)
            errors.append(mse)
    assert errors == sorted(errors, reverse=True)


def test_head_compress_with_stats_and_bad_ranks():
    head = FCHead(60, 3, hidden=16).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 60, generator=g)
    with torch.no_grad():
        y6 = head.fc6(x)
        y7 = head.fc7(torch.relu(y6))
    stats = {"fc6": _moments(y6, 16), "fc7": _moments(y7, 16)}
    import copy

    low = copy.deepcopy(head).compress(15, 15, stats=stats)
    assert low.svd_ranks == (15, 15)
    assert [m.out_features for m in low.fc6] == [15, 16]
    with pytest.raises(ValueError, match="rank must lie"):
        copy.deepcopy(head).compress(16, 0, stats=stats)


def test_detector_responses_option_needs_stats_survives_saving_and_detects(tmp_path):
    """svd_method="responses": refused without statistics; the statistics travel in model.pt;
    at full rank minus one on a head whose responses span fewer directions, detections equal
    the float32 head's."""
    import numpy as np

    from spp_detect.config import DetectorConfig, ModelConfig, TestConfig
    from spp_detect.modeling.build import build_detector, load_detector
    from spp_detect.training.head_stats import head_response_stats
    from bench_helpers import random_heads
    from spp_detect.utils import null_timer

    cfg = DetectorConfig(
        model=ModelConfig(backbone="zf5", scales=(64,), hidden=16),
        test=TestConfig(score_thresh=-1e9),
    )
    torch.manual_seed(0)
    det = random_heads(build_detector("spp", ["a", "b"], cfg, pretrained=False).eval())
    with pytest.raises(ValueError, match="response statistics"):
        det.with_settings(svd_fc6=8, svd_fc7=8, svd_method="responses")
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 40, 40], [10, 5, 70, 60], [30, 20, 79, 63]], dtype=np.float32)
    pooled, _ = det.compute_pooled(det.preprocess(image), torch.from_numpy(boxes), null_timer())

    class _Source:  # three windows of one image: responses span at most 2 directions
        def rows(self, i, idx):
            return pooled[idx]

    class _Image:
        windows = torch.from_numpy(boxes)

    det.head_stats = head_response_stats(det.head, _Source(), [_Image()], windows_per_image=3)
    loaded = load_detector(det.save(tmp_path / "m.pt"), "cpu")
    for k in ("mean", "basis", "eigenvalues"):
        assert torch.equal(loaded.head_stats["fc6"][k], det.head_stats["fc6"][k])
    low = loaded.with_settings(svd_fc6=2, svd_fc7=2, svd_method="responses")
    ref, got = det.detect(image, boxes), low.detect(image, boxes)
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.boxes, ref.boxes, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="svd_method"):
        det.with_settings(svd_fc6=2, svd_method="pca")


def test_speed_report_fast_method_is_low_rank_for_both_methods_or_for_neither():
    """spp-1scale-fast and R-CNN get the same options: low-rank fc from responses where the
    SPP-net model has statistics (untrained heads get random ones, timing only), for neither
    where it has none."""
    from spp_detect.benchmark.variants import build_method_detectors
    from spp_detect.config import DetectorConfig, ModelConfig

    cfg = DetectorConfig(model=ModelConfig(backbone="zf5", scales=(64,), hidden=64))
    methods = ["spp-1scale", "spp-1scale-fast", "rcnn"]
    dets, info = build_method_detectors(
        methods, ["a", "b"], cfg, torch.device("cpu"), weights="none"
    )
    for m in ("spp-1scale-fast", "rcnn"):
        opts = info[m]["test_options"]
        assert opts["svd_ranks"] == [8, 8] and opts["svd_method"] == "responses", m
        assert [lin.out_features for lin in dets[m].head.fc6] == [8, 64]
    assert info["spp-1scale"]["test_options"]["svd_ranks"] == [0, 0]

    model = dets["spp-1scale"]
    model.head_stats = None
    dets, info = build_method_detectors(methods, ["a", "b"], cfg, torch.device("cpu"), model=model)
    assert info["spp-1scale-fast"]["test_options"]["svd_ranks"] == [0, 0]
    assert info["rcnn"]["test_options"]["svd_ranks"] == [0, 0]
    assert info["rcnn"]["test_options"]["fast_head"] == "int8map"  # FAST_OPTIONS
