"""Test-time speed options (issue 11): the bfloat16 / int8 fc head against a float64 reference
with error bounds derived from each arithmetic's precision, and ``with_settings(fast_head=...,
fast_conv=...)`` as a configured copy that leaves the caller's detector and its saved file as
they were. No timing here (tools/bench_fc.py, docs/speed.md)."""

import numpy as np
import pytest
import torch

from spp_detect.config import DetectorConfig, ModelConfig, TestConfig
from spp_detect.modeling.build import build_detector, load_detector
from spp_detect.modeling.fast_head import FastFCHead, Int8Linear, Int8Rows, quantize_map
from spp_detect.modeling.head import FCHead
from spp_detect.modeling.window_pool import pool_windows
from spp_detect.utils import null_timer

from bench_helpers import random_heads  # noqa: E402

# bfloat16 keeps 8 significant bits: round-to-nearest has a relative error of at most 2**-8.
BF16_U = 2.0**-8


def _head(svd=False, seed=0):
    torch.manual_seed(seed)
    head = FCHead(300, 4, hidden=64).eval()
    head.input_scale.fill_(0.5)
    with torch.no_grad():
        for layer in (head.fc6, head.fc7):
            # Mostly positive weights: outputs of the size of sum |x| |w| (little cancellation),
            # so that the worst-case bounds below are tight enough to catch a wrong head.
            sign = torch.where(torch.rand(layer.weight.shape) < 0.2, -1.0, 1.0)
            layer.weight.copy_(layer.weight.abs() * sign / layer.in_features**0.5)
            layer.bias.normal_(std=0.1)
    return head.compress(16, 8) if svd else head


def _layers(module):
    return list(module) if isinstance(module, torch.nn.Sequential) else [module]


def _ref_fc7(head, pooled):
    """float64 fc7 of the float32 head and, per layer, its input and weight (float64)."""
    x = pooled.double() * float(head.input_scale)
    trace = []
    for name in ("fc6", "fc7"):
        for i, layer in enumerate(_layers(getattr(head, name))):
            w = layer.weight.double()
            b = layer.bias.double() if layer.bias is not None else torch.zeros(w.shape[0])
            trace.append((x, w, b))
            x = x @ w.T + b
            if i == len(_layers(getattr(head, name))) - 1:
                x = torch.relu(x)
    return x, trace


def _bf16_bound(trace):
    """First-order bound on |fc7 - ref| for bf16 layers: input, weight and bias rounded
    (each <= u relative), output stored in bf16 (<= u |y|), float32 accumulation (negligible,
    covered by the factor 2); the error of one layer's input goes through |W| to the next.
    ReLU is 1-Lipschitz."""
    err = torch.zeros_like(trace[0][0])
    for x, w, b in trace:
        y = x @ w.T + b
        err = err @ w.abs().T + BF16_U * (3 * (x.abs() @ w.abs().T) + b.abs() + y.abs())
    return 2 * err


def _int8_bound(trace):
    """First-order bound for int8 layers: weight row i quantised with step s_w[i] =
    max|W[i]| / 127 (error <= s_w / 2), each activation row with step s_x = max|x| / 127,
    products accumulated exactly in int32, the bias in float32."""
    err = torch.zeros_like(trace[0][0])
    for x, w, _ in trace:
        sw = w.abs().amax(dim=1) / 127  # [out]
        sx = (x.abs().amax(dim=1, keepdim=True) + err.amax(dim=1, keepdim=True)) / 127
        quant = (
            (x.abs() + err) @ (w.abs().T * 0 + sw / 2)
            + sx / 2 * w.abs().sum(1)
            + (sx / 2 * sw / 2 * w.shape[1])
        )
        err = err @ w.abs().T + quant
    return 1.5 * err


@pytest.mark.parametrize("svd", [False, True])
@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_fast_fc7_within_precision_bound(mode, svd):
    head = _head(svd)
    pooled = torch.relu(torch.randn(40, 300))  # pooled conv features are >= 0
    with torch.no_grad():
        ref, trace = _ref_fc7(head, pooled)
    fast = FastFCHead(head, mode)
    got, logits = fast.predict(pooled)
    assert got.dtype == torch.float32 and got.shape == (40, 64)
    bound = _bf16_bound(trace) if mode == "bf16" else _int8_bound(trace)
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    # Worst-case bounds are loose where the SVD factors cancel, so the typical error is checked
    # too: the RMS error within 2% of fc7's RMS (bf16 and int8 resolve ~0.4% / ~0.8% of a
    # value; a head that dropped input_scale or a bias would be off by tens of percent). And
    # the arithmetic really is lower precision (float32 would be ~1e-7 off).
    assert float(bound.max()) < 0.7 * float(ref.abs().max())
    assert float(err.pow(2).mean().sqrt()) < 0.02 * float(ref.pow(2).mean().sqrt())
    assert float(err.max()) > 1e-5 * float(ref.abs().max())
    torch.testing.assert_close(logits, fast.cls_score(got))
    assert fast.svd_ranks == head.svd_ranks


def test_int8_linear_matches_hand_quantised_product():
    layer = torch.nn.Linear(5, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0, 4.0], [0.1, 0.2, 0.3, 0.4, 0.5]]))
        layer.bias.copy_(torch.tensor([0.25, -1.0]))
    x = torch.tensor([[1.0, 0.5, -0.25, 2.0, 0.0]])
    q = Int8Linear(layer)
    # Reference: the same quantisation written out in float64.
    w = layer.weight.double()
    sw = w.abs().amax(1) / 127
    qw = torch.round(w / sw[:, None])
    sx = x.double().abs().max() / 127
    qx = torch.round(x.double() / sx)
    ref = (qx @ qw.T) * sx * sw + layer.bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-6, atol=1e-6)


def test_fast_head_rejects_unknown_mode_and_dropout():
    with pytest.raises(ValueError, match="fast_head"):
        FastFCHead(_head(), "fp8")
    with pytest.raises(ValueError, match="testing only"):
        FastFCHead(_head(), "bf16").fc7_features(torch.zeros(1, 300), dropout=True)


def _detector():
    cfg = DetectorConfig(
        model=ModelConfig(backbone="zf5", scales=(64,), hidden=16),
        test=TestConfig(score_thresh=-1e9),
    )
    torch.manual_seed(0)
    det = build_detector("spp", ["a", "b"], cfg, pretrained=False).eval()
    return random_heads(det, svm_bias=1.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"fast_head": "bf16"},
        {"fast_head": "int8", "svd_fc6": 8, "svd_fc7": 4},
        {"fast_conv": "channels_last"},
        {"fast_head": "int8", "fast_conv": "bf16"},
        {"fast_head": "int8map", "svd_fc6": 8, "svd_fc7": 4, "fast_conv": "bf16"},
    ],
)
def test_with_settings_fast_leaves_original_and_saved_model(tmp_path, fields):
    det = _detector()
    path = det.save(tmp_path / "before.pt")
    before = {k: v.clone() for k, v in det.state_dict().items()}
    head, backbone, test = det.head, det.backbone, det.config.test
    fast = det.with_settings(**fields)
    # The caller's detector: same modules, weights, layouts and config.
    assert det.head is head and det.backbone is backbone and det.config.test == test
    after = det.state_dict()
    assert before.keys() == after.keys()
    for k, v in after.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
        assert v.is_contiguous(), k
    assert isinstance(det.head, FCHead)
    # The copy has what was asked for, and detects.
    assert fast.config.test.fast_head == fields.get("fast_head", "off")
    assert fast.config.test.fast_conv == fields.get("fast_conv", "off")
    assert (fast.head is det.head) == ("fast_head" not in fields and "svd_fc6" not in fields)
    assert (fast.backbone is det.backbone) == ("fast_conv" not in fields)
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 40, 40], [10, 5, 70, 60], [30, 20, 79, 63]], dtype=np.float32)
    assert len(fast.detect(image, boxes)) > 0
    # The fast copy is never saved; the original saves to the same tensors as before.
    with pytest.raises(ValueError, match="save the model before"):
        fast.save(tmp_path / "fast.pt")
    again = load_detector(det.save(tmp_path / "after.pt"), "cpu").state_dict()
    first = load_detector(path, "cpu").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_channels_last_conv_close_and_detect_refuses_mismatched_head():
    det = _detector()
    fast = det.with_settings(fast_conv="channels_last")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref, got = det.backbone(x), fast.backbone(x)
    # Same arithmetic in another memory layout: float32 rounding differences only.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="float32 detector"):
        det.with_settings(fast_head="int8").with_settings(fast_head="bf16")
    stale = det.with_settings(fast_head="int8")
    stale.config = det.config  # a config that no longer matches the head
    image = np.zeros((64, 80, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="with_settings"):
        stale.detect(image, np.array([[0, 0, 40, 40]], dtype=np.float32))
    with pytest.raises(ValueError, match="fast_conv"):
        det.with_settings(fast_conv="int4")


@pytest.mark.parametrize("signed", [False, True])
def test_int8_map_pools_to_the_quantised_float_pooling(signed):
    g = torch.Generator().manual_seed(3)
    fmap = torch.rand(8, 13, 17, generator=g) * 5
    if signed:  # maps of backbones without a final ReLU (EfficientNet-Lite0's conv5)
        fmap = fmap - 2.5
    q, s = quantize_map(fmap)
    assert q.dtype == torch.int8 and s == pytest.approx(float(fmap.abs().max()) / 127)
    assert float((q.float() * s - fmap).abs().max()) <= s / 2 + 1e-6
    x0 = torch.randint(0, 16, (30,), generator=g)
    y0 = torch.randint(0, 12, (30,), generator=g)
    x1 = torch.minimum(x0 + torch.randint(0, 17, (30,), generator=g), torch.tensor(16))
    y1 = torch.minimum(y0 + torch.randint(0, 13, (30,), generator=g), torch.tensor(12))
    cells = torch.stack([x0, y0, x1, y1], 1)
    pooled = pool_windows(fmap, cells, (6, 3, 2, 1))
    # Rounding is monotone, so the max of the quantised values is the quantised max: exact.
    ref = torch.round(pooled / s).clamp(-127, 127).to(torch.int8)
    assert torch.equal(pool_windows(q, cells, (6, 3, 2, 1)), ref)
    zq, zs = quantize_map(torch.zeros(2, 3, 3))
    assert zs == 1.0 and not zq.any()


def test_int8_linear_takes_int8_rows_as_they_are():
    torch.manual_seed(1)
    layer = torch.nn.Linear(24, 16)
    rows = Int8Rows(torch.randint(-127, 128, (20, 24), dtype=torch.int8), torch.rand(20, 1) + 0.1)
    got = Int8Linear(layer, out_dtype=torch.float32)(rows)
    w = layer.weight.detach().double()
    sw = w.abs().amax(1) / 127
    qw = torch.round(w / sw[:, None])
    ref = (rows.values.double() @ qw.T) * rows.scale.double() * sw + layer.bias.detach().double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert Int8Linear(layer, torch.bfloat16)(rows).dtype == torch.bfloat16
    torch.testing.assert_close(rows[3:5].dequantize(), rows.values[3:5].float() * rows.scale[3:5])


def test_int8map_detector_pools_int8_rows_and_stays_close_to_float32():
    det = _detector()
    fast = det.with_settings(fast_head="int8map")
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    windows = torch.tensor([[0, 0, 40, 40], [10, 5, 70, 60], [30, 20, 79, 63], [5, 5, 30, 50]],
                           dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        pooled, inv = fast.compute_pooled(fast.preprocess(image), windows, null_timer())
        ref_pooled, ref_inv = det.compute_pooled(det.preprocess(image), windows, null_timer())
        assert isinstance(pooled, Int8Rows) and pooled.values.dtype == torch.int8
        assert torch.equal(inv, ref_inv)
        got = fast.head.fc7_features(pooled)
        ref = det.head.fc7_features(ref_pooled)
    # int8 resolves ~1/127 of the largest value of a map and of a weight row: fc7 within a few
    # percent (RMS) of float32's, and not float32 itself.
    err = (got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert 1e-5 < float(err) < 0.05
    d, d32 = fast.detect(image, windows.numpy()), det.detect(image, windows.numpy())
    assert len(d) == len(d32) > 0
    torch.testing.assert_close(d.scores, d32.scores, rtol=0.05, atol=0.05)
