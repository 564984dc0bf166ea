"""COCO path: evaluate_coco against pycocotools run directly on hand-written COCO JSON of the
same data."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from spp_detect.datasets.records import ImageRecord
from spp_detect.evaluation.coco import COCO_METRICS, evaluate_coco
from spp_detect.structures import Detections

# Continuous xyxy. img1: a normal "a", a difficult "b". img2: a small "a", a "b".
GT = {
    "img1": [(0, [10, 10, 50, 60], False), (1, [60, 20, 180, 90], True)],
    "img2": [(0, [0, 0, 20, 20], False), (1, [30, 30, 130, 95], False)],
}
DETS = {
    "img1": [(0, 0.9, [12, 11, 49, 62]), (0, 0.8, [100, 50, 140, 90]), (1, 0.7, [62, 22, 170, 88])],
    "img2": [(0, 0.6, [1, 1, 19, 22]), (1, 0.95, [35, 28, 128, 96]), (1, 0.5, [30, 30, 130, 95])],
}
H, W = 100, 200


def make_dataset(gt):
    records = [
        ImageRecord(
            image_id=i, path=Path(f"{i}.jpg"), width=W, height=H,
            boxes=np.array([o[1] for o in objs], np.float32).reshape(-1, 4),
            labels=np.array([o[0] for o in objs], np.int64),
            difficult=np.array([o[2] for o in objs], bool),
            truncated=np.zeros(len(objs), bool),
        )
        for i, objs in gt.items()
    ]  # fmt: skip
    return SimpleNamespace(records=records, class_names=["a", "b"], year="2007", split="test")


def make_dets(rows):
    if not rows:
        return Detections.empty((H, W))
    return Detections(
        torch.tensor([r[2] for r in rows], dtype=torch.float32),
        torch.tensor([r[1] for r in rows], dtype=torch.float32),
        torch.tensor([r[0] for r in rows]),
        (H, W),
    )


def hand_json():
    """The same data written out by hand as COCO JSON: bbox [x, y, w, h], difficult -> crowd."""
    gt = {
        "images": [{"id": 1, "width": W, "height": H, "file_name": "img1.jpg"},
                   {"id": 2, "width": W, "height": H, "file_name": "img2.jpg"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 50], "area": 2000,
             "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 20, 120, 70], "area": 8400,
             "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400,
             "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [30, 30, 100, 65], "area": 6500,
             "iscrowd": 0},
        ],
    }  # fmt: skip
    dt = [
        {"image_id": 1, "category_id": 1, "bbox": [12, 11, 37, 51], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [100, 50, 40, 40], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [62, 22, 108, 66], "score": 0.7},
        {"image_id": 2, "category_id": 1, "bbox": [1, 1, 18, 21], "score": 0.6},
        {"image_id": 2, "category_id": 2, "bbox": [35, 28, 93, 68], "score": 0.95},
        {"image_id": 2, "category_id": 2, "bbox": [30, 30, 100, 65], "score": 0.5},
    ]
    return gt, dt


def pycocotools_direct(gt, dt):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        e = COCOeval(coco_gt, coco_gt.loadRes(dt), iouType="bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(v) for v in e.stats[:6]]


def test_matches_pycocotools_on_hand_written_json(tmp_path, capsys):
    ds = make_dataset(GT)
    got = evaluate_coco(ds, {i: make_dets(r) for i, r in DETS.items()}, output_dir=tmp_path)
    want = pycocotools_direct(*hand_json())
    assert list(got) == list(COCO_METRICS)
    for k, w in zip(COCO_METRICS, want):
        if w < 0:  # -1: undefined in pycocotools -> NaN here
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(w, abs=1e-12), k
    assert 0 < got["AP"] < 1 and got["AP50"] > got["AP"]  # a non-trivial case
    assert capsys.readouterr().out == ""  # pycocotools' printout went to the log
    gt_json = json.loads((tmp_path / "coco_gt.json").read_text())
    assert [a["iscrowd"] for a in gt_json["annotations"]] == [0, 1, 0, 0]
    assert gt_json["annotations"][0]["bbox"] == [10, 10, 40, 50]
    assert len(json.loads((tmp_path / "coco_results.json").read_text())) == 6


def test_perfect_detections_give_ap_one():
    ds = make_dataset(GT)
    perfect = {i: make_dets([(k, 0.9, b) for k, b, d in objs if not d]) for i, objs in GT.items()}
    got = evaluate_coco(ds, perfect)
    assert got["AP"] == pytest.approx(1.0) and got["AP50"] == pytest.approx(1.0)
    assert got["AP75"] == pytest.approx(1.0)


def test_no_detections_and_unknown_image():
    ds = make_dataset(GT)
    got = evaluate_coco(ds, {i: make_dets([]) for i in GT})
    assert got["AP"] == 0.0 and got["AP50"] == 0.0
    with pytest.raises(ValueError, match="unknown image id 'nope'"):
        evaluate_coco(ds, {"nope": make_dets([(0, 0.5, [0, 0, 5, 5])])})
