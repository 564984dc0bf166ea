"""The per-class ridge box regressor: training (training/bbox_fit.py, bbox_training.py,
ridge.py) against a float64 port of R-CNN's code, and prediction (modeling/box_regression.py)."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from spp_detect.config import DetectorConfig, apply_overrides
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.structures import BoxCoder, matched_box_iou
from spp_detect.training.bbox_fit import fit_box_regressor
from spp_detect.training.bbox_training import BoxRegressionTrainer
from spp_detect.training.ridge import ridge_solve

get_deltas = BoxCoder().get_deltas
apply_deltas = BoxCoder().apply_deltas


def random_boxes(n, generator, dtype=torch.float64, min_size=1.0):
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * 200
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * 100 + min_size
    return torch.cat([xy, xy + wh], dim=1)


# -- ridge ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", [(30, 50), (80, 20)])
def test_ridge_primal_dual_and_numpy(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, 3))
    lam = 7.5
    ref = np.linalg.solve(x.T @ x + lam * np.eye(d), x.T @ y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for method in ("primal", "dual", "auto"):
        out = ridge_solve(xt.float(), yt, lam, method).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,d", [(30, 50), (80, 20)])
def test_ridge_with_penalised_bias_equals_the_appended_ones_column(n, d):
    from spp_detect.training.ridge import ridge_solve_with_bias

    rng = np.random.default_rng(n + 1)
    x = rng.normal(size=(n, d)) + 0.5
    y = rng.normal(size=(n, 4))
    a = np.concatenate([x, np.ones((n, 1))], axis=1)  # R-CNN's constant-1 feature
    ref = np.linalg.solve(a.T @ a + 3.0 * np.eye(d + 1), a.T @ y)
    for method in ("primal", "dual", "auto"):
        out = ridge_solve_with_bias(torch.from_numpy(x), torch.from_numpy(y), 3.0, True, method)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="method"):
        ridge_solve_with_bias(torch.from_numpy(x), torch.from_numpy(y), 3.0, True, "qr")


def rcnn_reference(x, y, lam, scale):
    """Float64 numpy port of rcnn_train_bbox_regressor.m's per-class fit and prediction."""
    x = x * scale
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    mu = y.mean(axis=0)
    yc = y - mu
    s = yc.T @ yc / yc.shape[0]
    evals, evecs = np.linalg.eigh(s)
    t = evecs @ np.diag(1 / np.sqrt(evals + 0.001)) @ evecs.T
    t_inv = evecs @ np.diag(np.sqrt(evals + 0.001)) @ evecs.T
    beta = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (yc @ t))

    def predict(x_new):
        a_new = np.concatenate([x_new * scale, np.ones((x_new.shape[0], 1))], axis=1)
        return (a_new @ beta) @ t_inv + mu

    return predict


def make_regression_data(n, d, num_classes, seed, noise=0.0):
    """Windows around ground truths whose deltas are a known linear map of the features."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(n, d, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, num_classes, (n,), generator=g)
    maps = torch.randn(num_classes, d, 4, generator=g, dtype=torch.float64) * 0.02
    offsets = torch.randn(num_classes, 4, generator=g, dtype=torch.float64) * 0.02
    deltas = torch.einsum("nd,ndf->nf", feats, maps[labels]) + offsets[labels]
    deltas = deltas + noise * torch.randn(n, 4, generator=g, dtype=torch.float64)
    boxes = random_boxes(n, g, min_size=20.0)
    gt = apply_deltas(deltas, boxes)
    return feats, boxes, gt, labels, deltas


def test_regressor_matches_rcnn_reference():
    feats, boxes, gt, labels, _ = make_regression_data(300, 12, 2, seed=3, noise=0.05)
    reg = fit_box_regressor(feats.float(), boxes, gt, labels, 2, lambda_=1000.0, iou_thresh=0.5)
    scale = 20.0 / feats.norm(dim=1).mean().item()
    assert reg.feature_scale.item() == pytest.approx(scale, rel=1e-6)
    pred = reg.predict_deltas(feats).numpy()
    for c in range(2):
        sel = labels == c
        sel &= matched_box_iou(boxes, gt) > 0.5
        y = get_deltas(boxes[sel], gt[sel]).numpy()
        ref = rcnn_reference(feats[sel].numpy(), y, 1000.0, scale)(feats.numpy())
        np.testing.assert_allclose(pred[:, c], ref, rtol=1e-4, atol=1e-5)


def test_regressor_recovers_known_map():
    feats, boxes, gt, labels, deltas = make_regression_data(400, 8, 3, seed=4)
    reg = fit_box_regressor(feats, boxes, gt, labels, 3, lambda_=1e-6)
    assert reg.trained.all()
    # Output dtype follows the features (float64 here).
    torch.testing.assert_close(reg.predict(feats, boxes, labels), gt, atol=2e-3, rtol=0)
    all_boxes = reg.predict_all(feats, boxes)
    assert all_boxes.shape == (400, 3, 4)
    rows = torch.arange(400)
    torch.testing.assert_close(all_boxes[rows, labels], gt, atol=2e-3, rtol=0)


def test_unregularised_bias_matches_sklearn_ridge():
    from sklearn.linear_model import Ridge

    feats, boxes, gt, labels, _ = make_regression_data(200, 10, 1, seed=5, noise=0.05)
    reg = fit_box_regressor(
        feats,
        boxes,
        gt,
        labels,
        1,
        lambda_=50.0,
        regularize_bias=False,
        whiten_targets=False,
        feature_scale=1.0,
    )
    y = get_deltas(boxes, gt).numpy()
    ref = Ridge(alpha=50.0, fit_intercept=True).fit(feats.numpy(), y).predict(feats.numpy())
    np.testing.assert_allclose(reg.predict_deltas(feats)[:, 0].numpy(), ref, atol=1e-5)


def test_dual_and_primal_fits_agree():
    feats, boxes, gt, labels, _ = make_regression_data(60, 40, 2, seed=6, noise=0.05)
    a = fit_box_regressor(feats, boxes, gt, labels, 2, min_samples=1, method="dual")
    b = fit_box_regressor(feats, boxes, gt, labels, 2, min_samples=1, method="primal")
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-6)


def test_identity_for_classes_without_samples(caplog):
    feats, boxes, gt, labels, _ = make_regression_data(100, 6, 1, seed=7, noise=0.05)
    # Class 1 only has windows with IoU <= 0.5: shifted by half a width (IoU 1/3).
    far = boxes.clone()
    w = far[:, 2] - far[:, 0]
    far[:, 0] += w / 2
    far[:, 2] += w / 2
    x = torch.cat([feats, feats])
    bx = torch.cat([boxes, far])
    gts = torch.cat([gt, boxes])
    lab = torch.cat([labels, torch.ones_like(labels)])
    with caplog.at_level(logging.WARNING, logger="spp_detect.training.bbox_fit"):
        reg = fit_box_regressor(x, bx, gts, lab, 3)
    assert reg.trained.tolist() == [True, False, False]
    assert "class 1" in caplog.text and "class 2" in caplog.text
    deltas = reg.predict_deltas(x)
    assert deltas[:, 1:].abs().max() == 0
    torch.testing.assert_close(reg.predict_all(x, bx)[:, 2], bx)


def test_state_dict_round_trip():
    feats, boxes, gt, labels, _ = make_regression_data(80, 5, 2, seed=8, noise=0.05)
    reg = fit_box_regressor(feats, boxes, gt, labels, 2)
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    assert state["weight"].shape == (2, 6, 4)
    loaded = BoxRegressor.from_state_dict(state)
    torch.testing.assert_close(loaded.predict_all(feats, boxes), reg.predict_all(feats, boxes))
    # Nested in a parent module: load_state_dict adapts the stored feature size too.
    parent = nn.Module()
    parent.reg = BoxRegressor(2)
    parent.load_state_dict({f"reg.{k}": v for k, v in state.items()})
    torch.testing.assert_close(parent.reg.predict_deltas(feats), reg.predict_deltas(feats))
    assert reg.predict_deltas(feats[:0]).shape == (0, 2, 4)
    assert reg.predict_all(feats[:0], boxes[:0]).shape == (0, 2, 4)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    feats, boxes, gt, labels, _ = make_regression_data(80, 5, 2, seed=9, noise=0.05)
    reg = fit_box_regressor(feats.float(), boxes.float(), gt.float(), labels, 2)
    cpu = reg.predict_all(feats.float(), boxes.float())
    gpu_reg = fit_box_regressor(
        feats.float().cuda(), boxes.float().cuda(), gt.float().cuda(), labels.cuda(), 2
    )
    assert gpu_reg.weight.is_cuda
    out = gpu_reg.predict_all(feats.float().cuda(), boxes.float().cuda())
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-3)
    out2 = reg.cuda().predict_all(feats.float().cuda(), boxes.float().cuda())
    torch.testing.assert_close(out2.cpu(), cpu, rtol=1e-5, atol=1e-4)


def test_delta_weights_travel_with_the_regressor():
    feats, boxes, gt, labels, _ = make_regression_data(400, 8, 2, seed=10)
    w = (10.0, 10.0, 5.0, 5.0)
    reg = fit_box_regressor(feats, boxes, gt, labels, 2, lambda_=1e-6, weights=w)
    assert reg.box_coder.weights == w
    # The targets were weighted deltas: predictions decode with the same weights.
    torch.testing.assert_close(reg.predict(feats, boxes, labels), gt, atol=2e-3, rtol=0)
    loaded = BoxRegressor.from_state_dict(reg.state_dict())
    assert loaded.box_coder.weights == w


def _iou64(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_rcnn_bbox_settings_from_config_are_honoured():
    """bbox_reg.iou_thresh=0.6 bbox_reg.lambda_=1000 (R-CNN's rcnn_train_bbox_regressor.m):
    samples are the windows with IoU > 0.6 (strict), and the ridge uses lambda 1000."""
    cfg = apply_overrides(DetectorConfig(), ["bbox_reg.iou_thresh=0.6", "bbox_reg.lambda_=1000"])
    assert (cfg.bbox_reg.iou_thresh, cfg.bbox_reg.lambda_) == (0.6, 1000.0)
    gt = torch.tensor([[0.0, 0, 100, 100], [200, 50, 260, 170]])
    gt_labels = torch.tensor([0, 1])
    windows = []
    for box in gt.tolist():
        for sx in range(0, 40, 3):
            for sy in (0, 5, 10):
                windows.append([box[0] + sx, box[1] + sy, box[2] + sx, box[3] + sy])
    # Shifted by 25 px along x, gt 0 overlaps 75 / 125 = 0.6 exactly: not above 0.6.
    windows.append([25.0, 0, 125, 100])
    windows = torch.tensor(windows)
    best = [max(_iou64(w, g) for g in gt.tolist()) for w in windows.tolist()]
    assert best[-1] == 0.6
    expected = [i for i, v in enumerate(best) if v > 0.6]
    between = [i for i, v in enumerate(best) if 0.5 < v <= 0.6]
    assert len(between) >= 5 and len(expected) >= 30  # the two settings differ on this image

    g = torch.Generator().manual_seed(11)
    feats = torch.rand(len(windows), 12, generator=g, dtype=torch.float64) * 3
    trainer = BoxRegressionTrainer.from_config(cfg.bbox_reg)
    sel = trainer.add_image(feats, windows, gt, gt_labels)
    assert sorted(sel.tolist()) == expected
    default = BoxRegressionTrainer.from_config(DetectorConfig().bbox_reg)
    assert sorted(default.add_image(feats, windows, gt, gt_labels).tolist()) == sorted(
        expected + between
    )

    reg = trainer.fit(2)
    # Reference: R-CNN's fit with lambda 1000 on exactly those windows (features as stored,
    # float16), each matched to the ground truth it overlaps most.
    x = feats[expected].half().double()
    scale = 20.0 / x.norm(dim=1).mean().item()
    assert reg.feature_scale.item() == pytest.approx(scale, rel=1e-6)
    for c in range(2):
        rows = [i for i in expected if _iou64(windows[i].tolist(), gt[c].tolist()) > 0.6]
        y = get_deltas(windows[rows].double(), gt[c].expand(len(rows), 4).double()).numpy()
        x_c = feats[rows].half().double().numpy()
        ref = rcnn_reference(x_c, y, 1000.0, scale)(x_c)
        pred = reg.predict_deltas(feats[rows].half().double())[:, c].numpy()
        np.testing.assert_allclose(pred, ref, rtol=1e-4, atol=1e-5)
        ref_4000 = rcnn_reference(x_c, y, 4000.0, scale)(x_c)
        assert np.abs(pred - ref_4000).max() > 1e-3  # lambda matters on this data


def test_trainer_caps_samples_per_image_and_handles_no_ground_truth():
    gt = torch.tensor([[10.0, 10, 60, 60]])
    windows = gt + torch.arange(20.0)[:, None] * torch.tensor([1.0, 0, 1, 0])  # IoU 1 .. 0.45
    feats = torch.rand(20, 4, generator=torch.Generator().manual_seed(12))
    picks = []
    for _ in range(2):
        trainer = BoxRegressionTrainer(iou_thresh=0.5, max_per_image=7, seed=3)
        sel = trainer.add_image(feats, windows, gt, torch.tensor([0]))
        assert sel.numel() == 7 and trainer.num_samples == 7
        assert len(set(sel.tolist())) == 7 and max(sel.tolist()) <= 16  # IoU(17) = 33/67 < 0.5
        picks.append(sel.tolist())
    assert picks[0] == picks[1]  # seeded
    assert (
        trainer.add_image(feats, windows, gt[:0], torch.tensor([], dtype=torch.long)).numel() == 0
    )
    assert BoxRegressionTrainer().fit(3) is None


def test_trainer_of_a_class_subset_keeps_and_fits_each_class_as_the_full_trainer():
    """torchrun divides the classes among ranks: a class's samples (per-image cap, reservoir)
    and its fitted row must not depend on which other classes the trainer handles."""
    g = torch.Generator().manual_seed(13)
    images = []
    for _ in range(8):
        gt = random_boxes(3, g, dtype=torch.float32, min_size=30.0)
        labels = torch.tensor([0, 1, 2])
        windows = gt.repeat(12, 1) + torch.randn(36, 4, generator=g) * 3
        windows[:, 2:] = torch.maximum(windows[:, 2:], windows[:, :2] + 1)
        images.append((torch.randn(36, 6, generator=g), windows, gt, labels))

    def trainer(classes):
        t = BoxRegressionTrainer(max_per_image=20, max_samples=25, seed=5, classes=classes)
        for image in images:
            t.add_image(*image)
        return t

    full = trainer(None)
    ref = full.fit(3, feature_scale=0.5, min_samples=5)
    # Both caps bind: fewer than the offered windows are kept for every class.
    assert all(full.offered(c) > full.class_samples(c) == 25 for c in range(3))
    for classes in ([1], [0, 2]):
        part = trainer(classes)
        reg = part.fit(3, feature_scale=0.5, min_samples=5)
        for c in range(3):
            if c in classes:
                assert torch.equal(part.class_features(c), full.class_features(c)), (classes, c)
                for store in ("_boxes", "_gt"):
                    assert torch.equal(
                        torch.cat(getattr(part, store)[c]), torch.cat(getattr(full, store)[c])
                    ), (classes, c, store)
                assert bool(reg.trained[c])
                for name in ("weight", "target_mean", "target_transform"):
                    assert torch.equal(getattr(reg, name)[c], getattr(ref, name)[c]), (c, name)
            else:  # not gathered, not fitted: the identity
                assert part.offered(c) == 0 and not bool(reg.trained[c])
                assert float(reg.weight[c].abs().sum()) == 0
                assert torch.equal(reg.target_transform[c], torch.eye(4))
        assert reg.feature_scale == ref.feature_scale
