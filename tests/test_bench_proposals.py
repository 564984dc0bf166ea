"""tools/bench_proposals.py: ground-truth recall on hand-worked overlaps, and the per-resize_to
table on a tiny generated set against selective search and a float64 IoU loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_detect.datasets.images import read_image
from spp_detect.datasets.toy_voc import make_toy_voc
from spp_detect.proposals.selective_search import selective_search
from spp_detect.proposals.settings import ProposalSettings

from bench_helpers import load_tool  # noqa: E402

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_proposals.py"


@pytest.fixture(scope="module")
def tool():
    return load_tool(TOOL, "_tool_bench_proposals")


pytestmark = pytest.mark.usefixtures("restore_threads")


def test_recall_hand_worked(tool):
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
    proposals = torch.tensor(
        [
            [0.0, 0.0, 10.0, 5.0],  # gt 0: 50 / 100 = IoU 0.5 exactly
            [0.0, 0.0, 10.0, 4.0],  # gt 0: 0.4
            [20.0, 20.0, 40.0, 36.0],  # gt 1: 320 / 400 = 0.8
            [60.0, 60.0, 70.0, 70.0],  # overlaps nothing
        ]
    )
    hits = tool.recalled(proposals, gt, [0.5, 0.7, 0.85])
    expected = torch.tensor([[True, True], [False, True], [False, False]])
    assert torch.equal(hits, expected)
    # Without the 0.5 window, gt 0's best is 0.4: missed at 0.5 too.
    hits = tool.recalled(proposals[1:], gt, [0.5, 0.7])
    assert torch.equal(hits, torch.tensor([[False, True], [False, True]]))


def test_recall_empties(tool):
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert torch.equal(tool.recalled(torch.zeros(0, 4), gt, [0.5]), torch.tensor([[False]]))
    no_gt = tool.recalled(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.zeros(0, 4), [0.5, 0.7])
    assert no_gt.shape == (2, 0)


def _iou_loop(a, b):
    """Float64 reference IoU of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_table_on_a_tiny_set(tool, tmp_path):
    root = tmp_path / "VOCdevkit"
    make_toy_voc(root, num_train=1, num_val=1, num_test=3, image_size=(64, 96), seed=3)
    out = tmp_path / "b.json"
    argv = [
        "--voc-root", str(root), "--split", "test", "--num-images", "2",
        "--resize-to", "0", "48", "1000", "--max-proposals", "300", "--include-difficult",
        "--output", str(out),
    ]  # fmt: skip
    result = tool.main(tool.get_args_parser().parse_args(argv))
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {row["resize_to"]: row for row in result["rows"]}
    # 1000 exceeds every image side: the same windows as no resizing at all.
    assert rows[1000]["resized"] == 0 and rows[0]["resized"] == 0 and rows[48]["resized"] == 2
    for key in ("windows_mean", "recall@0.5", "recall@0.7", "seconds_mean"):
        assert rows[1000][key] == rows[0][key]

    from spp_detect.datasets.voc import VOCDataset

    records = VOCDataset(root, "2007", "test").records[:2]
    for r in (0, 48):
        settings = ProposalSettings(max_proposals=300, resize_to=r)
        hits = {0.5: 0, 0.7: 0}
        windows = []
        num_gt = 0
        for rec in records:
            boxes = selective_search(read_image(rec.path), settings).astype(np.float64)
            windows.append(len(boxes))
            for g in rec.boxes.astype(np.float64):
                num_gt += 1
                best = max((_iou_loop(g, b) for b in boxes), default=0.0)
                for t in hits:
                    hits[t] += best >= t
        assert rows[r]["gt"] == num_gt > 0
        assert rows[r]["windows_mean"] == pytest.approx(np.mean(windows))
        for t, h in hits.items():
            assert rows[r][f"recall@{t:g}"] == pytest.approx(h / num_gt)
    table = tool.markdown_table(result["rows"], [0.5, 0.7])
    assert table.count("\n") == 1 + len(rows) and "0 (off)" in table
