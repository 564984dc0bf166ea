"""Fine-tuning window labels (IoU ranges) and 25%-positive mini-batches."""

import pytest
import torch

from spp_detect.datasets.sampling import (
    add_gt_windows,
    label_windows,
    sample_minibatch,
)


def test_iou_ranges_at_the_boundaries():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt_labels = torch.tensor([2])
    # Windows sharing the ground truth's left edge: IoU = width / 10 (area 10 * width).
    windows = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1.0  -> class 2 (label 3)
            [0.0, 0.0, 5.0, 10.0],  # IoU 0.5  -> positive (0.5 included)
            [0.0, 0.0, 4.9, 10.0],  # IoU 0.49 -> background
            [0.0, 0.0, 4.0, 10.0],  # IoU 0.4  -> background
            [0.0, 0.0, 1.0, 10.0],  # IoU 0.1  -> background (0.1 included)
            [0.0, 0.0, 0.9, 10.0],  # IoU 0.09 -> ignored
            [20.0, 20.0, 30.0, 30.0],  # IoU 0  -> ignored
        ]
    )
    labels, max_iou, matched = label_windows(windows, gt, gt_labels)
    assert labels.tolist() == [3, 3, 0, 0, 0, -1, -1]
    torch.testing.assert_close(max_iou, torch.tensor([1.0, 0.5, 0.49, 0.4, 0.1, 0.09, 0.0]))
    assert matched.tolist() == [0] * 7


def test_matches_slow_reference_with_several_gts():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 50
    windows = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 40], dim=1)
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [30.0, 5.0, 70.0, 30.0], [0, 50, 20, 80]])
    gt_labels = torch.tensor([0, 4, 1])
    labels, max_iou, matched = label_windows(windows, gt, gt_labels)
    for i, w in enumerate(windows.double().tolist()):
        ious = []
        for b in gt.double().tolist():
            iw = max(0.0, min(w[2], b[2]) - max(w[0], b[0]))
            ih = max(0.0, min(w[3], b[3]) - max(w[1], b[1]))
            inter = iw * ih
            union = (w[2] - w[0]) * (w[3] - w[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            ious.append(inter / union)
        best = max(range(3), key=lambda j: ious[j])
        iou = ious[best]
        expected = gt_labels[best].item() + 1 if iou >= 0.5 else (0 if iou >= 0.1 else -1)
        assert labels[i].item() == expected
        assert max_iou[i].item() == pytest.approx(iou, abs=1e-6)
        assert matched[i].item() == best
    assert (labels > 0).any() and (labels == 0).any() and (labels == -1).any()


def test_no_gt_and_gt_windows():
    windows = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 9.0]])
    labels, max_iou, matched = label_windows(
        windows, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    )
    assert labels.tolist() == [-1, -1] and matched.tolist() == [-1, -1]
    assert max_iou.tolist() == [0.0, 0.0]
    gt = torch.tensor([[20.0, 20.0, 40.0, 30.0]])
    with_gt = add_gt_windows(windows, gt)
    assert with_gt.shape == (3, 4) and torch.equal(with_gt[0], gt[0])
    labels, _, _ = label_windows(with_gt, gt, torch.tensor([0]))
    assert labels.tolist() == [1, -1, -1]
    empty = label_windows(torch.zeros(0, 4), gt, torch.tensor([0]))
    assert empty.labels.shape == (0,) and empty.max_iou.shape == (0,)
    with pytest.raises(ValueError):
        label_windows(windows, gt, torch.tensor([0, 1]))


def pool(num_fg, num_bg, num_ignore, generator):
    labels = torch.cat(
        [
            torch.randint(1, 6, (num_fg,), generator=generator),
            torch.zeros(num_bg, dtype=torch.long),
            torch.full((num_ignore,), -1, dtype=torch.long),
        ]
    )
    return labels[torch.randperm(labels.numel(), generator=generator)]


def test_minibatch_has_25_percent_positives():
    g = torch.Generator().manual_seed(1)
    labels = pool(100, 1000, 50, g)
    idx = sample_minibatch(labels, 128, 0.25, generator=g)
    assert idx.numel() == 128 and idx.unique().numel() == 128
    assert (labels[idx] > 0).sum() == 32 and (labels[idx] == 0).sum() == 96
    assert (labels[idx[:32]] > 0).all()  # positives first


def test_minibatch_with_few_positives_or_negatives():
    g = torch.Generator().manual_seed(2)
    labels = pool(10, 1000, 50, g)
    idx = sample_minibatch(labels, generator=g)
    assert (labels[idx] > 0).sum() == 10 and (labels[idx] == 0).sum() == 118
    labels = pool(100, 20, 50, g)
    idx = sample_minibatch(labels, generator=g)
    # Short of background: all 20, the positives stay at 32, the batch is smaller.
    assert (labels[idx] > 0).sum() == 32 and (labels[idx] == 0).sum() == 20
    assert idx.unique().numel() == idx.numel() == 52


def test_ignored_windows_never_sampled_and_reproducible():
    g = torch.Generator().manual_seed(3)
    labels = pool(40, 150, 300, g)
    for _ in range(50):
        idx = sample_minibatch(labels, generator=g)
        assert (labels[idx] >= 0).all()
    a = sample_minibatch(labels, generator=torch.Generator().manual_seed(9))
    b = sample_minibatch(labels, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert sample_minibatch(torch.full((5,), -1)).numel() == 0
