"""Test-time buffers reused across images (``modeling/workspace.py``): the same memory for the
same sizes, per thread, and results equal to the path that allocates every tensor."""

import copy
import threading

import numpy as np
import torch

from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.fast_head import FastFCHead, Int8Rows
from spp_detect.modeling.head import FCHead
from spp_detect.modeling.workspace import Workspace
from spp_detect.utils import null_timer

from test_fast_head import _detector  # noqa: E402


def test_buffers_are_reused_grown_and_kept_per_thread():
    ws = Workspace()
    a = ws.get("x", (100, 8), torch.float32, "cpu")
    b = ws.get("x", (90, 8), torch.float32, "cpu")  # smaller: the same memory
    assert a.data_ptr() == b.data_ptr() and b.shape == (90, 8) and b.is_contiguous()
    assert ws.get("y", (100, 8), torch.float32, "cpu").data_ptr() != a.data_ptr()  # by name
    assert ws.get("x", (100, 8), torch.int32, "cpu").data_ptr() != a.data_ptr()  # by dtype
    c = ws.get("x", (400, 8), torch.float32, "cpu")  # larger: a new, bigger buffer
    assert (
        c.data_ptr() != a.data_ptr()
        and ws.get("x", (450, 8), torch.float32, "cpu").data_ptr() == c.data_ptr()
    )
    other = []
    t = threading.Thread(target=lambda: other.append(ws.get("x", (10, 8), torch.float32, "cpu")))
    t.start()
    t.join()
    assert other[0].data_ptr() != c.data_ptr()  # another thread: its own buffers
    assert copy.deepcopy(ws).nbytes() == 0 < ws.nbytes()
    ws.clear()
    assert ws.nbytes() == 0


def _head():
    torch.manual_seed(0)
    head = FCHead(300, 4, hidden=64).eval()
    with torch.no_grad():
        for layer in (head.fc6, head.fc7):
            layer.bias.normal_(std=0.1)
    return head.compress(16, 8)


def _plain_fc7(fast, x):
    """The same head run by its modules, every tensor new (no workspace)."""
    for name in ("fc6", "fc7"):
        for layer in getattr(fast, name):
            x = layer(x)  # Int8Linear without a workspace allocates its outputs
        x = torch.relu(x)
        if name == "fc6":
            x = x.to(fast.dtype)
    return x.float()


def test_fast_head_with_workspace_equals_fresh_tensors_and_results_survive_the_next_call():
    for mode in ("bf16", "int8", "int8map"):
        fast = FastFCHead(_head(), mode)
        g = torch.Generator().manual_seed(1)
        inputs = [torch.rand(n, 300, generator=g) for n in (40, 25, 60)]
        if mode == "int8map":
            inputs = [
                Int8Rows((x * 127).round().to(torch.int8), torch.full((len(x), 1), 0.01))
                for x in inputs
            ]
        elif mode == "bf16":
            inputs = [x.bfloat16() for x in inputs]
        outs = [fast.predict(x) for x in inputs]  # the workspace is reused from call to call
        for x, (fc7, logits) in zip(inputs, outs):
            ref = _plain_fc7(fast, x)
            assert torch.equal(fc7, ref), mode
            assert torch.equal(logits, fast.cls_score(ref)), mode
        if mode != "bf16":  # int8 maps write into the workspace
            assert fast.workspace.nbytes() > 0, mode
        if mode != "int8":  # bf16 maps run on packed oneDNN weights, with their ReLU fused
            assert any(fn is not None for fn in fast.packed._fns.values()), mode
        copied = copy.deepcopy(fast)  # packed weights are not copied; made again on use
        assert torch.equal(copied.predict(inputs[0])[0], outs[0][0])


def test_fast_head_without_packed_weights_gives_the_same_values(monkeypatch):
    from spp_detect.modeling import fast_head

    x = torch.rand(30, 300, generator=torch.Generator().manual_seed(2)).bfloat16()
    packed = FastFCHead(_head(), "bf16").predict(x)
    monkeypatch.setattr(fast_head, "_pack", lambda layer, x: None)  # no oneDNN ops here
    plain = FastFCHead(_head(), "bf16")
    got = plain.predict(x)
    assert all(fn is None for fn in plain.packed._fns.values()) and plain.workspace.nbytes() > 0
    assert torch.equal(got[0], packed[0]) and torch.equal(got[1], packed[1])


def test_detect_with_reused_buffers_equals_a_fresh_copy_on_every_image():
    det = _detector().with_settings(fast_head="int8map", svd_fc6=8, svd_fc7=4)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64 + 8 * i, 80, 3), dtype=np.uint8) for i in range(3)]
    windows = [
        torch.tensor(
            [[0, 0, 40, 40], [10, 5, 70, 60], [30, 20, 79, 63], [5, 5, 30, 50 + i]],
            dtype=torch.float32,
        )  # fmt: skip
        for i in range(3)
    ]
    with torch.no_grad():
        first = [det.detect(im, w.numpy()) for im, w in zip(images, windows)]
        pooled, _ = det.compute_pooled(det.preprocess(images[0]), windows[0], null_timer())
        again = det.compute_pooled(det.preprocess(images[1]), windows[1], null_timer())[0]
        assert again.values.data_ptr() == pooled.values.data_ptr()  # one buffer for both
        for im, w, d in zip(images, windows, first):
            fresh = copy.deepcopy(det)  # its own, empty workspace
            ref = fresh.detect(im, w.numpy())
            assert torch.equal(d.boxes, ref.boxes) and torch.equal(d.scores, ref.scores)
            assert torch.equal(d.labels, ref.labels)


def test_test_regressor_refolds_after_its_weight_changes():
    det = _detector().with_settings(fast_head="bf16")
    reg = det.bbox_regressor
    assert type(reg).__name__ == "_TestRegressor"
    x = torch.rand(5, reg.feature_dim).bfloat16()
    a = reg.predict_deltas(x)
    assert torch.equal(reg.predict_deltas(x), a)
    with torch.no_grad():
        reg.weight.mul_(2.0)
    b = reg.predict_deltas(x)
    ref = BoxRegressor.from_state_dict(reg.state_dict()).predict_deltas(x).float()
    assert torch.equal(b, ref) and not torch.equal(a, b)
