"""Box helpers, the box coder and VOC's pixel convention against float64 loops and hand-worked
values. The torchvision.ops functions are checked too: that their convention is ours."""

import itertools
import math

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, box_area, box_iou, clip_boxes_to_image, remove_small_boxes

from spp_detect.structures import (
    BoxCoder,
    Detections,
    boxes_to_voc_pixels,
    matched_box_iou,
    unique_boxes,
    voc_pixels_to_boxes,
)
from spp_detect.structures.box_coder import DEFAULT_SCALE_CLAMP


def _iou_ref(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 50
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 30
    return torch.cat([xy, xy + wh], 1)


def test_box_iou_matches_loop():
    gen = torch.Generator().manual_seed(0)
    a, b = _random_boxes(17, gen), _random_boxes(11, gen)
    iou = box_iou(a, b)
    for i, j in itertools.product(range(17), range(11)):
        assert iou[i, j].item() == pytest.approx(_iou_ref(a[i].tolist(), b[j].tolist()), abs=1e-12)
    diag = matched_box_iou(a[:11], b)
    assert torch.allclose(diag, iou[:11].diagonal())
    for i in range(11):
        assert diag[i].item() == pytest.approx(_iou_ref(a[i].tolist(), b[i].tolist()), abs=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        matched_box_iou(a, b)


def test_box_iou_hand_values():
    # [0,10)x[0,10) and [5,15)x[0,10): intersection 50, union 150.
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 9]])
    assert box_iou(a, b).tolist() == [[pytest.approx(1 / 3), 0.0, 0.0]]
    assert box_area(b).tolist() == [100.0, 100.0, 0.0]


def test_clip_and_small():
    boxes = torch.tensor([[-5.0, -2, 50, 30], [10, 10, 12, 40]])
    # (height, width) = (20, 40): x clipped to [0, 40], y to [0, 20].
    assert clip_boxes_to_image(boxes, (20, 40)).tolist() == [[0, 0, 40, 20], [10, 10, 12, 20]]
    assert boxes.tolist() == [[-5.0, -2, 50, 30], [10, 10, 12, 40]]  # not modified in place
    # Sides >= min_size are kept: the second box is 2 wide.
    assert remove_small_boxes(boxes, 3).tolist() == [0]
    assert remove_small_boxes(boxes, 2).tolist() == [0, 1]


def test_unique_boxes_first_occurrence():
    boxes = torch.tensor([[1.0, 1, 5, 5], [0, 0, 2, 2], [1.2, 1, 5, 5], [0, 0, 2, 2]])
    keep, inverse = unique_boxes(boxes)
    assert keep.tolist() == [0, 1]
    assert inverse.tolist() == [0, 1, 0, 1]
    keep, inverse = unique_boxes(torch.zeros(0, 4))
    assert keep.shape == (0,) and inverse.shape == (0,)


def _nms_ref(boxes, scores, labels, thresh):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(labels[k] != labels[i] or _iou_ref(boxes[k], boxes[i]) <= thresh for k in keep):
            keep.append(i)
    return keep


def test_batched_nms_matches_greedy_loop():
    gen = torch.Generator().manual_seed(1)
    boxes = _random_boxes(200, gen).float()
    scores = torch.rand(200, generator=gen)
    labels = torch.randint(0, 3, (200,), generator=gen)
    keep = batched_nms(boxes, scores, labels, 0.3)
    ref = _nms_ref(boxes.tolist(), scores.tolist(), labels.tolist(), 0.3)
    assert sorted(keep.tolist()) == sorted(ref)
    assert batched_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.3
    ).shape == (0,)


def test_detections_shapes():
    d = Detections.empty((10, 20))
    assert len(d) == 0 and d.boxes.shape == (0, 4) and d.labels.dtype == torch.long
    with pytest.raises(ValueError, match="inconsistent"):
        Detections(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, dtype=torch.long), (1, 1))
    d = Detections(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([0.5]), torch.tensor([1]), (5, 5))
    assert d.to_list(["a", "b"]) == [{"label": "b", "score": 0.5, "box": [1.0, 2.0, 3.0, 4.0]}]


# -- BoxCoder (R-CNN's parameterisation) --------------------------------------------------------
def random_boxes(n, generator, dtype=torch.float64, min_size=1.0):
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * 200
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * 100 + min_size
    return torch.cat([xy, xy + wh], dim=1)


def test_round_trip_float64():
    g = torch.Generator().manual_seed(0)
    # Sides 5..105: size ratios stay below the 1000/16 clamp.
    a = random_boxes(500, g, min_size=5.0)
    b = random_boxes(500, g, min_size=5.0)
    coder = BoxCoder()
    out = coder.apply_deltas(coder.get_deltas(a, b), a)
    torch.testing.assert_close(out, b, rtol=0, atol=1e-9)
    # With weights too.
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    out = coder.apply_deltas(coder.get_deltas(a, b), a)
    torch.testing.assert_close(out, b, rtol=0, atol=1e-9)


def test_hand_worked_deltas():
    # src: w=10, h=20, centre (5, 10); dst: w=20, h=40, centre (15, 25).
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)
    dst = torch.tensor([[5.0, 5.0, 25.0, 45.0]], dtype=torch.float64)
    expected = torch.tensor([[1.0, 0.75, math.log(2.0), math.log(2.0)]], dtype=torch.float64)
    torch.testing.assert_close(BoxCoder().get_deltas(src, dst), expected)
    weighted = expected * torch.tensor([10.0, 10.0, 5.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(BoxCoder((10, 10, 5, 5)).get_deltas(src, dst), weighted)
    torch.testing.assert_close(BoxCoder().apply_deltas(expected, src), dst)


def test_class_specific_layout():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(7, g)
    deltas = torch.randn(7, 4 * 3, generator=g, dtype=torch.float64) * 0.3
    coder = BoxCoder()
    out = coder.apply_deltas(deltas, boxes)
    assert out.shape == (7, 12)
    for k in range(3):
        ref = coder.apply_deltas(deltas[:, 4 * k : 4 * k + 4], boxes)
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], ref)
    # Class k's columns are (dx, dy, dw, dh) of class k: only dx of class 1 moves class 1.
    d = torch.zeros(1, 12, dtype=torch.float64)
    d[0, 4] = 1.0
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    out = coder.apply_deltas(d, box).reshape(3, 4)
    torch.testing.assert_close(out[0], box[0])
    torch.testing.assert_close(out[1], torch.tensor([10.0, 0.0, 20.0, 10.0], dtype=torch.float64))


def test_scale_clamp_and_zero_boxes():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, 100.0], [1.0, -1.0, 2.0, 2.0]])
    out = BoxCoder().apply_deltas(deltas, box)
    assert torch.isfinite(out).all()
    side = 10.0 * math.exp(DEFAULT_SCALE_CLAMP)  # 625 = 10 * 1000 / 16
    torch.testing.assert_close(
        out[0], torch.tensor([5 - side / 2, 5 - side / 2, 5 + side / 2, 5 + side / 2])
    )
    torch.testing.assert_close(out[1], torch.tensor([5.0, 5.0, 5.0, 5.0]))
    # A smaller clamp of the coder's own.
    out = BoxCoder(scale_clamp=math.log(2.0)).apply_deltas(deltas[:1], box[:1])
    torch.testing.assert_close(out[0], torch.tensor([-5.0, -5.0, 15.0, 15.0]))


def test_box_coder_empty_and_errors():
    coder = BoxCoder()
    assert coder.apply_deltas(torch.zeros(0, 8), torch.zeros(0, 4)).shape == (0, 8)
    assert coder.get_deltas(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    with pytest.raises(ValueError):
        coder.get_deltas(torch.tensor([[0.0, 0, 0, 5]]), torch.tensor([[0.0, 0, 5, 5]]))
    with pytest.raises(ValueError):
        coder.apply_deltas(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        BoxCoder((1.0, 1.0, 1.0))


# -- VOC pixels --------------------------------------------------------------------------------
def test_voc_pixels_hand_values_and_round_trip():
    # VOC (xmin, ymin, xmax, ymax) = (48, 240, 195, 371): pixel columns 48..195 (1-based,
    # inclusive), 148 of them; continuous [47, 195): also 148 wide.
    voc = np.array([[48, 240, 195, 371], [1, 1, 100, 80]], dtype=np.float64)
    boxes = voc_pixels_to_boxes(voc)
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[47, 239, 195, 371], [0, 0, 100, 80]])
    assert boxes[0, 2] - boxes[0, 0] == voc[0, 2] - voc[0, 0] + 1
    back = boxes_to_voc_pixels(torch.from_numpy(boxes))
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, voc)
    assert boxes_to_voc_pixels(np.zeros((0, 4))).shape == (0, 4)
    # The input is not modified.
    np.testing.assert_array_equal(voc[0], [48, 240, 195, 371])
