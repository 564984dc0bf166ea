"""Box helpers against float64 loops and hand-worked values."""

import itertools

import pytest
import torch

from spp_detect.structures import (
    Detections,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    pairwise_iou,
    remove_small_boxes,
    unique_boxes,
)


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
    diag = pairwise_iou(a[:11], b)
    assert torch.allclose(diag, iou[:11].diagonal())


def test_box_iou_hand_values():
    # [0,10)x[0,10) and [5,15)x[0,10): intersection 50, union 150.
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 9]])
    assert box_iou(a, b).tolist() == [[pytest.approx(1 / 3), 0.0, 0.0]]
    assert box_area(b).tolist() == [100.0, 100.0, 0.0]


def test_clip_and_small():
    boxes = torch.tensor([[-5.0, -2, 50, 30], [10, 10, 12, 40]])
    assert clip_boxes(boxes, (20, 40)).tolist() == [[0, 0, 40, 20], [10, 10, 12, 20]]
    assert remove_small_boxes(boxes, 3).tolist() == [0]


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
