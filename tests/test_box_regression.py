"""Box deltas (R-CNN parameterisation) and the per-class ridge regressor."""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from spp_detect.modeling.box_regression import (
    DEFAULT_SCALE_CLAMP,
    BoxRegressor,
    apply_deltas,
    get_deltas,
    ridge_solve,
)


def random_boxes(n, generator, dtype=torch.float64, min_size=1.0):
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * 200
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * 100 + min_size
    return torch.cat([xy, xy + wh], dim=1)


# -- deltas ---------------------------------------------------------------------------------
def test_round_trip_float64():
    g = torch.Generator().manual_seed(0)
    # Sides 5..105: size ratios stay below the 1000/16 clamp.
    a = random_boxes(500, g, min_size=5.0)
    b = random_boxes(500, g, min_size=5.0)
    out = apply_deltas(get_deltas(a, b), a)
    torch.testing.assert_close(out, b, rtol=0, atol=1e-9)
    # With weights too.
    w = (10.0, 10.0, 5.0, 5.0)
    out = apply_deltas(get_deltas(a, b, w), a, w)
    torch.testing.assert_close(out, b, rtol=0, atol=1e-9)


def test_hand_worked_deltas():
    # src: w=10, h=20, centre (5, 10); dst: w=20, h=40, centre (15, 25).
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)
    dst = torch.tensor([[5.0, 5.0, 25.0, 45.0]], dtype=torch.float64)
    expected = torch.tensor([[1.0, 0.75, math.log(2.0), math.log(2.0)]], dtype=torch.float64)
    torch.testing.assert_close(get_deltas(src, dst), expected)
    weighted = expected * torch.tensor([10.0, 10.0, 5.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(get_deltas(src, dst, (10, 10, 5, 5)), weighted)
    torch.testing.assert_close(apply_deltas(expected, src), dst)


def test_class_specific_layout():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(7, g)
    deltas = torch.randn(7, 4 * 3, generator=g, dtype=torch.float64) * 0.3
    out = apply_deltas(deltas, boxes)
    assert out.shape == (7, 12)
    for k in range(3):
        ref = apply_deltas(deltas[:, 4 * k : 4 * k + 4], boxes)
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], ref)
    # Class k's columns are (dx, dy, dw, dh) of class k: only dx of class 1 moves class 1.
    d = torch.zeros(1, 12, dtype=torch.float64)
    d[0, 4] = 1.0
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    out = apply_deltas(d, box).reshape(3, 4)
    torch.testing.assert_close(out[0], box[0])
    torch.testing.assert_close(out[1], torch.tensor([10.0, 0.0, 20.0, 10.0], dtype=torch.float64))


def test_scale_clamp_and_zero_boxes():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, 100.0], [1.0, -1.0, 2.0, 2.0]])
    out = apply_deltas(deltas, box)
    assert torch.isfinite(out).all()
    side = 10.0 * math.exp(DEFAULT_SCALE_CLAMP)  # 625 = 10 * 1000 / 16
    torch.testing.assert_close(
        out[0], torch.tensor([5 - side / 2, 5 - side / 2, 5 + side / 2, 5 + side / 2])
    )
    torch.testing.assert_close(out[1], torch.tensor([5.0, 5.0, 5.0, 5.0]))


def test_empty_and_errors():
    assert apply_deltas(torch.zeros(0, 8), torch.zeros(0, 4)).shape == (0, 8)
    assert get_deltas(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    with pytest.raises(ValueError):
        get_deltas(torch.tensor([[0.0, 0, 0, 5]]), torch.tensor([[0.0, 0, 5, 5]]))
    with pytest.raises(ValueError):
        apply_deltas(torch.zeros(3, 5), torch.zeros(3, 4))


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
    reg = BoxRegressor(2, lambda_=1000.0, iou_thresh=0.5).fit(feats.float(), boxes, gt, labels)
    scale = 20.0 / feats.norm(dim=1).mean().item()
    assert reg.feature_scale.item() == pytest.approx(scale, rel=1e-6)
    pred = reg.predict_deltas(feats).numpy()
    for c in range(2):
        sel = labels == c
        from spp_detect.structures.boxes import pairwise_iou

        sel &= pairwise_iou(boxes, gt) > 0.5
        y = get_deltas(boxes[sel], gt[sel]).numpy()
        ref = rcnn_reference(feats[sel].numpy(), y, 1000.0, scale)(feats.numpy())
        np.testing.assert_allclose(pred[:, c], ref, rtol=1e-4, atol=1e-5)


def test_regressor_recovers_known_map():
    feats, boxes, gt, labels, deltas = make_regression_data(400, 8, 3, seed=4)
    reg = BoxRegressor(3, lambda_=1e-6).fit(feats, boxes, gt, labels)
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
    reg = BoxRegressor(1, lambda_=50.0, regularize_bias=False, whiten_targets=False)
    reg.fit(feats, boxes, gt, labels, feature_scale=1.0)
    y = get_deltas(boxes, gt).numpy()
    ref = Ridge(alpha=50.0, fit_intercept=True).fit(feats.numpy(), y).predict(feats.numpy())
    np.testing.assert_allclose(reg.predict_deltas(feats)[:, 0].numpy(), ref, atol=1e-5)


def test_dual_and_primal_fits_agree():
    feats, boxes, gt, labels, _ = make_regression_data(60, 40, 2, seed=6, noise=0.05)
    a = BoxRegressor(2, min_samples=1).fit(feats, boxes, gt, labels, method="dual")
    b = BoxRegressor(2, min_samples=1).fit(feats, boxes, gt, labels, method="primal")
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
    with caplog.at_level(logging.WARNING, logger="spp_detect.modeling.box_regression"):
        reg = BoxRegressor(3).fit(x, bx, gts, lab)
    assert reg.trained.tolist() == [True, False, False]
    assert "class 1" in caplog.text and "class 2" in caplog.text
    deltas = reg.predict_deltas(x)
    assert deltas[:, 1:].abs().max() == 0
    torch.testing.assert_close(reg.predict_all(x, bx)[:, 2], bx)


def test_state_dict_round_trip():
    feats, boxes, gt, labels, _ = make_regression_data(80, 5, 2, seed=8, noise=0.05)
    reg = BoxRegressor(2).fit(feats, boxes, gt, labels)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    feats, boxes, gt, labels, _ = make_regression_data(80, 5, 2, seed=9, noise=0.05)
    reg = BoxRegressor(2).fit(feats.float(), boxes.float(), gt.float(), labels)
    cpu = reg.predict_all(feats.float(), boxes.float())
    gpu_reg = BoxRegressor(2).fit(
        feats.float().cuda(), boxes.float().cuda(), gt.float().cuda(), labels.cuda()
    )
    out = gpu_reg.predict_all(feats.float().cuda(), boxes.float().cuda())
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-3)
    out2 = reg.cuda().predict_all(feats.float().cuda(), boxes.float().cuda())
    torch.testing.assert_close(out2.cpu(), cpu, rtol=1e-5, atol=1e-4)
