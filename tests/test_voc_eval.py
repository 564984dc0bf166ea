"""VOC AP: hand-worked cases of the devkit's rules (VOCevaldet.m / VOCap.m), a literal scalar
transcription of the devkit as reference, results files and the voc_eval tool."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spp_detect.datasets.records import ImageRecord
from spp_detect.evaluation.plots import format_ap_table
from spp_detect.evaluation.voc import (
    METRIC_07,
    METRIC_AREA,
    VOC07_RECALL_THRESHOLDS,
    VOCEvaluator,
    evaluate_voc_results,
    read_voc_results,
    voc_ap,
    voc_iou,
    write_voc_results,
)
from spp_detect.structures import Detections
from spp_detect.structures.voc_pixels import boxes_to_voc_pixels

SIZE = (100, 200)  # (h, w) of every fake image


def make_dataset(gt, class_names=("a",), year="2007", split="test"):
    """gt: {image_id: [(label, [x1, y1, x2, y2] continuous, difficult), ...]}."""
    records = []
    for image_id, objs in gt.items():
        records.append(
            ImageRecord(
                image_id=image_id,
                path=Path(f"{image_id}.jpg"),
                width=SIZE[1],
                height=SIZE[0],
                boxes=np.array([o[1] for o in objs], np.float32).reshape(-1, 4),
                labels=np.array([o[0] for o in objs], np.int64),
                difficult=np.array([o[2] for o in objs], bool),
                truncated=np.zeros(len(objs), bool),
            )
        )
    return SimpleNamespace(
        records=records,
        class_names=list(class_names),
        year=year,
        split=split,
        image_ids=[r.image_id for r in records],
    )


def dets(rows):
    """rows: [(label, score, [x1, y1, x2, y2] continuous)]."""
    if not rows:
        return Detections.empty(SIZE)
    return Detections(
        torch.tensor([r[2] for r in rows], dtype=torch.float32),
        torch.tensor([r[1] for r in rows], dtype=torch.float32),
        torch.tensor([r[0] for r in rows], dtype=torch.long),
        SIZE,
    )


def run(dataset, dets_by_image, use_07_metric=None):
    ev = VOCEvaluator(dataset, use_07_metric=use_07_metric)
    for image_id in dataset.image_ids:
        ev.process(image_id, dets_by_image.get(image_id, dets([])))
    return ev.evaluate(), ev


BOX = [0.0, 0.0, 10.0, 10.0]
BOX2 = [20.0, 0.0, 30.0, 10.0]
FAR = [100.0, 50.0, 120.0, 70.0]


# --- AP formulas ------------------------------------------------------------------------------


def test_voc_ap_hand_values():
    # npos = 3, detections TP, FP, TP: rec = [1/3, 1/3, 2/3], prec = [1, 1/2, 2/3].
    rec, prec = np.array([1, 1, 2]) / 3, np.array([1, 1 / 2, 2 / 3])
    # 11-point: t = 0, .1, .2, .3 -> max prec = 1 (4 levels); t = .4, .5, .6 -> 2/3 (3 levels);
    # t >= .7 -> no recall reaches it, 0.  (4 * 1 + 3 * 2/3) / 11 = 6/11.
    assert voc_ap(rec, prec, True) == pytest.approx(6 / 11, abs=1e-12)
    # Area: envelope [1, 1, 2/3] -> 1/3 * 1 + 1/3 * 2/3 = 5/9.
    assert voc_ap(rec, prec, False) == pytest.approx(5 / 9, abs=1e-12)
    # No detections: 0 with both metrics.
    assert voc_ap([], [], True) == 0.0 and voc_ap([], [], False) == 0.0


def test_07_thresholds_are_matlab_colon_values():
    # MATLAB's 0:0.1:1 has 3*0.1 = 0.30000000000000004 as its 4th element; the rest equal k/10.
    assert VOC07_RECALL_THRESHOLDS[3] == 3 * 0.1 and VOC07_RECALL_THRESHOLDS[3] > 0.3
    assert all(t == k / 10 for k, t in enumerate(VOC07_RECALL_THRESHOLDS) if k != 3)
    # npos = 10: TP TP TP (rec .3, prec 1), FP FP FP (rec .3, prec .5), TP (rec .4, prec 4/7).
    tp = np.array([1, 1, 1, 0, 0, 0, 1])
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    rec, prec = ctp / 10, ctp / (ctp + cfp)
    assert rec[2] == 0.3  # exactly the double nearest 0.3: below MATLAB's threshold
    # t = 0, .1, .2 -> 1; t = 0.30000000000000004 and .4 -> only rec .4 qualifies -> 4/7;
    # t >= .5 -> 0.  (3 + 2 * 4/7) / 11 = 29/77 (with t = 3/10 exactly it would be 32/77).
    assert voc_ap(rec, prec, True) == pytest.approx(29 / 77, abs=1e-12)


# --- matching rules ---------------------------------------------------------------------------


def test_duplicates_are_false_positives():
    # Two images, one object each (npos = 2). img1: .9 on the object (TP), .8 the same box
    # again (duplicate -> FP); img2: .7 on its object (TP).
    ds = make_dataset({"i1": [(0, BOX, False)], "i2": [(0, BOX, False)]})
    d = {"i1": dets([(0, 0.9, BOX), (0, 0.8, BOX)]), "i2": dets([(0, 0.7, BOX)])}
    m, ev = run(ds, d, True)
    np.testing.assert_allclose(ev.pr_curves["a"]["recall"], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(ev.pr_curves["a"]["precision"], [1.0, 0.5, 2 / 3])
    # 11-point: t = 0..0.5 (6 levels) -> 1; t = .6..1 (5 levels) -> 2/3; (6 + 10/3)/11 = 28/33.
    assert m["AP"]["a"] == pytest.approx(28 / 33, abs=1e-12)
    assert m["metric"] == METRIC_07
    d = {"i1": dets([(0, 0.9, BOX), (0, 0.8, BOX)]), "i2": dets([(0, 0.7, BOX)])}
    m2, _ = run(ds, d, False)
    # Area: envelope [1, 1, 2/3] at recalls .5, .5, 1 -> .5 * 1 + .5 * 2/3 = 5/6.
    assert m2["AP"]["a"] == pytest.approx(5 / 6, abs=1e-12)
    assert m2["metric"] == METRIC_AREA


def test_detection_goes_to_best_object_even_if_already_matched():
    # Objects A = [0,0,10,10] and B = [0,0,10,11] (IoU(A, B) = 100/110). Two detections equal to
    # A: the second one's best object is A again (IoU 1 > 0.909), already detected -> FP, even
    # though B is unmatched and overlaps it by 0.909 (the devkit takes the argmax over all).
    ds = make_dataset({"i1": [(0, BOX, False), (0, [0, 0, 10, 11], False)]})
    m, ev = run(ds, {"i1": dets([(0, 0.9, BOX), (0, 0.8, BOX)])}, True)
    # TP, FP with npos = 2: rec [.5, .5], prec [1, .5]; 11-point: 6 levels at 1 -> 6/11.
    np.testing.assert_allclose(ev.pr_curves["a"]["precision"], [1.0, 0.5])
    assert m["AP"]["a"] == pytest.approx(6 / 11, abs=1e-12)


def test_ties_keep_input_order():
    # One object; two detections with the same score: one on the object, one far away.
    ds = make_dataset({"i1": [(0, BOX, False)]})
    # TP first: rec [1, 1], prec [1, .5] -> AP 1 (both metrics).
    m, _ = run(ds, {"i1": dets([(0, 0.5, BOX), (0, 0.5, FAR)])}, True)
    assert m["AP"]["a"] == pytest.approx(1.0)
    # FP first: rec [0, 1], prec [0, .5] -> 11-point: every level sees rec 1 at prec .5 -> .5;
    # area: envelope .5 over recall 0..1 -> .5.
    for use07 in (True, False):
        m, _ = run(ds, {"i1": dets([(0, 0.5, FAR), (0, 0.5, BOX)])}, use07)
        assert m["AP"]["a"] == pytest.approx(0.5, abs=1e-12)


def test_difficult_objects_are_ignored():
    # Object 0 normal, object 1 difficult (npos = 1). Detections: .9 and .8 on the difficult one
    # (ignored both times: a difficult object is never marked detected), .7 on the normal one
    # (TP), .6 far away (FP). Counted: TP, FP -> rec [1, 1], prec [1, .5] -> AP 1 (both).
    ds = make_dataset({"i1": [(0, BOX, False), (0, BOX2, True)]})
    d = dets([(0, 0.9, BOX2), (0, 0.8, BOX2), (0, 0.7, BOX), (0, 0.6, FAR)])
    for use07 in (True, False):
        m, _ = run(ds, {"i1": d}, use07)
        assert m["num_gt"]["a"] == 1
        assert m["AP"]["a"] == pytest.approx(1.0, abs=1e-12)
    # If the difficult detections counted as FP the AP would be 1/3: check it is not.
    # A detection whose best object is difficult is ignored even when a normal object also
    # overlaps it by >= 0.5: objects [0,0,10,10] (normal) and [0,0,10,9] (difficult); detection
    # [0,0,10,9]: IoU 1 with the difficult one, 0.9 with the normal one -> ignored; then nothing
    # detects the normal object: AP 0.
    ds = make_dataset({"i1": [(0, BOX, False), (0, [0, 0, 10, 9], True)]})
    m, _ = run(ds, {"i1": dets([(0, 0.9, [0, 0, 10, 9])])}, True)
    assert m["AP"]["a"] == 0.0 and m["num_detections"]["a"] == 1


def test_class_without_detections_and_class_without_ground_truth(caplog):
    # a: one object, detected -> AP 1. b: one object, no detection -> AP 0 (counts in mAP).
    # c: no object, one detection -> AP NaN (undefined), left out of the mAP.
    ds = make_dataset({"i1": [(0, BOX, False), (1, BOX2, False)]}, class_names=("a", "b", "c"))
    m, _ = run(ds, {"i1": dets([(0, 0.9, BOX), (2, 0.8, FAR)])}, True)
    assert m["AP"]["a"] == pytest.approx(1.0)
    assert m["AP"]["b"] == 0.0
    assert math.isnan(m["AP"]["c"]) and m["num_gt"]["c"] == 0 and m["num_detections"]["c"] == 1
    assert m["mAP"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert "no non-difficult ground truth" in caplog.text
    table = format_ap_table(m, style="markdown")
    assert "| c | n/a | 0 | 1 |" in table and "0.5000" in table


def test_iou_threshold_is_inclusive_and_uses_plus_one_pixels():
    # devkit overlap in VOC pixels: [1,1,10,5] vs [1,1,10,10]: iw = 10, ih = 5 (+1 each),
    # ua = 50 + 100 - 50 = 100 -> 0.5 exactly. A naive (no +1) formula gives 36/81 = 0.444.
    np.testing.assert_array_equal(voc_iou([[1, 1, 10, 5]], [[1, 1, 10, 10]]), [[0.5]])
    # [1,1,10,10] vs [10,1,19,10]: they share pixel column 10: iw = 1, ih = 10, ua = 190.
    assert voc_iou([[1, 1, 10, 10]], [[10, 1, 19, 10]])[0, 0] == pytest.approx(10 / 190)
    # Touching ([1..10] and [11..20]) share no pixel: not a candidate (-inf).
    assert voc_iou([[1, 1, 10, 10]], [[11, 1, 20, 10]])[0, 0] == -np.inf
    # In the continuous frame: [0,0,10,5] is VOC [1,1,10,5] -> IoU 0.5 >= 0.5 -> TP, AP 1.
    # ([0,0,10,4.9] -> IoU 0.49 -> FP, AP 0.) py-faster-rcnn's ``ovmax > 0.5`` would miss the
    # first; evaluating the continuous box with the +1 formula (forgetting the conversion)
    # would give 64.9/121 = 0.536 for the second and wrongly accept it.
    ds = make_dataset({"i1": [(0, BOX, False)]})
    m_at, _ = run(ds, {"i1": dets([(0, 0.9, [0, 0, 10, 5])])}, True)
    m_below, _ = run(ds, {"i1": dets([(0, 0.9, [0, 0, 10, 4.9])])}, True)
    assert m_at["AP"]["a"] == pytest.approx(1.0) and m_below["AP"]["a"] == 0.0


def test_results_file_boxes_are_voc_pixels(tmp_path):
    # The same rule from a results file: the box "1 1 10 5" (VOC pixels) on the object
    # [0,0,10,10] (VOC [1,1,10,10]) has devkit overlap 0.5 -> TP.
    ds = make_dataset({"i1": [(0, BOX, False)]})
    (tmp_path / "comp4_det_test_a.txt").write_text("i1 0.9 1 1 10 5\n")
    assert evaluate_voc_results(ds, tmp_path, use_07_metric=True)["AP"]["a"] == pytest.approx(1.0)
    (tmp_path / "comp4_det_test_a.txt").write_text("i1 0.9 1 1 10 4.9\n")
    assert evaluate_voc_results(ds, tmp_path, use_07_metric=True)["AP"]["a"] == 0.0


def test_metric_chosen_by_year():
    ds07 = make_dataset({"i1": []}, year="2007")
    ds12 = make_dataset({"i1": []}, year="2012")
    assert VOCEvaluator(ds07).use_07_metric and not VOCEvaluator(ds12).use_07_metric
    assert not VOCEvaluator(ds07, use_07_metric=False).use_07_metric


# --- the devkit, transcribed literally, as the reference --------------------------------------


def devkit_reference(gt, det_list, use_07_metric, minoverlap=0.5):
    """Scalar transcription of VOCevaldet.m for one class. gt: {image: [(VOC box, diff)]};
    det_list: [(image, score, VOC box)] in file order. Returns (tp, fp, ap)."""
    npos = sum(1 for objs in gt.values() for _, d in objs if not d)
    detected = {i: [False] * len(objs) for i, objs in gt.items()}
    order = sorted(range(len(det_list)), key=lambda d: -det_list[d][1])  # stable, like MATLAB
    tp, fp = [0] * len(order), [0] * len(order)
    for n, d in enumerate(order):
        i, _, bb = det_list[d]
        ovmax, jmax = -math.inf, -1
        for j, (bbgt, _) in enumerate(gt[i]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]),
                  min(bb[3], bbgt[3])]  # fmt: skip
            iw, ih = bi[2] - bi[0] + 1, bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih)  # fmt: skip
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= minoverlap:
            if not gt[i][jmax][1]:
                if not detected[i][jmax]:
                    tp[n], detected[i][jmax] = 1, True
                else:
                    fp[n] = 1
        else:
            fp[n] = 1
    ctp, cfp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
    rec = ctp / npos
    prec = np.where(ctp + cfp > 0, ctp / np.maximum(ctp + cfp, 1), 0.0)
    if use_07_metric:
        ap = 0.0
        for t in [0, 0.1, 0.2, 3 * 0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
            p = [pv for pv, rv in zip(prec, rec) if rv >= t]
            ap += (max(p) if p else 0.0) / 11
    else:
        mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
        for k in range(len(mpre) - 2, -1, -1):
            mpre[k] = max(mpre[k], mpre[k + 1])
        ap = sum((mrec[k] - mrec[k - 1]) * mpre[k] for k in range(1, len(mrec))
                 if mrec[k] != mrec[k - 1])  # fmt: skip
    return tp, fp, ap


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_matches_literal_devkit_on_random_cases(use_07_metric):
    rng = np.random.default_rng(0)
    for trial in range(6):
        gt, det_list = {}, []
        for i in range(8):
            objs = []
            for _ in range(rng.integers(0, 4)):
                x, y = rng.integers(1, 60, size=2)
                w, h = rng.integers(5, 30, size=2)
                objs.append(([float(x), float(y), float(x + w), float(y + h)], rng.random() < 0.2))
            gt[f"im{i}"] = objs
            for _ in range(rng.integers(0, 6)):
                if objs and rng.random() < 0.7:  # jitter an object: overlaps near 0.5
                    b = np.array(objs[rng.integers(len(objs))][0]) + rng.integers(-6, 7, size=4)
                else:
                    x, y = rng.integers(1, 60, size=2)
                    b = np.array([x, y, x + rng.integers(5, 30), y + rng.integers(5, 30)])
                score = float(rng.integers(0, 5)) / 4  # few values: many ties
                det_list.append((f"im{i}", score, [float(v) for v in b]))
        if not any(not d for objs in gt.values() for _, d in objs):
            continue
        # Same data through the evaluator, converted to the continuous frame by hand
        # (x1 = xmin - 1, y1 = ymin - 1). det_list is in image order, the order of process().
        ds = make_dataset(
            {i: [(0, [b[0] - 1, b[1] - 1, b[2], b[3]], d) for b, d in o] for i, o in gt.items()}
        )
        by_image = {i: [] for i in gt}
        for i, s, b in det_list:
            by_image[i].append((0, s, [b[0] - 1, b[1] - 1, b[2], b[3]]))
        tp, fp, ap = devkit_reference(gt, det_list, use_07_metric)
        m, ev = run(ds, {i: dets(r) for i, r in by_image.items()}, use_07_metric)
        np.testing.assert_allclose(
            ev.pr_curves["a"]["recall"], np.cumsum(tp) / m["num_gt"]["a"], err_msg=f"{trial}"
        )
        assert len(tp) == len(det_list) and sum(tp) + sum(fp) <= len(det_list)
        assert m["AP"]["a"] == pytest.approx(ap, abs=1e-12), f"trial {trial}"


# --- results files ----------------------------------------------------------------------------


def _random_case():
    ds = make_dataset(
        {"i1": [(0, BOX, False), (1, BOX2, True)], "i2": [(1, [5.5, 5, 40, 30], False)],
         "i3": []},
        class_names=("a", "b"),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    out = {}
    for image_id in ds.image_ids:
        n = 5
        xy = torch.rand(n, 2, generator=g) * 30
        wh = 5 + torch.rand(n, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + wh], 1)
        boxes[0] = torch.tensor([0.3, 0.1, 10.2, 9.7])  # near an object of class a
        scores = (torch.rand(n, generator=g) * 4).round() / 4  # ties
        labels = torch.randint(0, 2, (n,), generator=g)
        out[image_id] = Detections(boxes, scores, labels, SIZE)
    return ds, out


def test_results_round_trip(tmp_path):
    ds, d = _random_case()
    paths = write_voc_results(tmp_path, "test", ds.class_names, d)
    assert [p.name for p in paths] == ["comp4_det_test_a.txt", "comp4_det_test_b.txt"]
    res = read_voc_results(tmp_path, "test", ds.class_names, ds.image_ids)
    for k, name in enumerate(ds.class_names):
        want_boxes, want_scores, want_images = [], [], []
        for i, image_id in enumerate(ds.image_ids):
            m = d[image_id].labels == k
            want_boxes.append(boxes_to_voc_pixels(d[image_id].boxes[m]))
            want_scores.append(d[image_id].scores[m].numpy())
            want_images += [i] * int(m.sum())
        # Bit-exact: values are written as the shortest decimal of the float32.
        np.testing.assert_array_equal(res[name].boxes, np.concatenate(want_boxes))
        np.testing.assert_array_equal(res[name].scores, np.concatenate(want_scores))
        np.testing.assert_array_equal(res[name].image_index, want_images)
    # VOC pixels: x1 + 1, y1 + 1, x2, y2 (the box [0.3, 0.1, 10.2, 9.7] of each image).
    lines = (tmp_path / "comp4_det_test_a.txt").read_text().splitlines()
    boxes = [[float(v) for v in line.split()[2:]] for line in lines]
    assert any(np.allclose(b, [1.3, 1.1, 10.2, 9.7], atol=1e-5) for b in boxes)
    # Scoring the files == scoring in memory, for both metrics.
    for use07 in (True, False):
        m_mem, _ = run(ds, d, use07)
        m_file = evaluate_voc_results(ds, tmp_path, use_07_metric=use07)
        assert m_file["AP"] == m_mem["AP"] and m_file["mAP"] == m_mem["mAP"]


def test_empty_class_file_means_no_detections(tmp_path):
    ds = make_dataset({"i1": [(0, BOX, False)]}, class_names=("a", "b"))
    paths = write_voc_results(tmp_path, "test", ds.class_names, {"i1": dets([(0, 0.9, BOX)])})
    assert paths[1].read_text() == ""
    m = evaluate_voc_results(ds, tmp_path)
    assert m["AP"]["a"] == pytest.approx(1.0) and math.isnan(m["AP"]["b"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("i1 0.9 1 1 10 10\ni1 0.8 1 1 10\n", "comp4_det_test_a.txt:2: expected 6 fields"),
        ("\ni1 0.9 1 1 ten 10\n", "comp4_det_test_a.txt:2: not a number: 'ten'"),
        ("i1 nan 1 1 10 10\n", "comp4_det_test_a.txt:1: non-finite"),
        ("i1 0.9 1 1 10 10\nzz9 0.9 1 1 10 10\n", "comp4_det_test_a.txt:2: unknown image id 'zz9'"),
    ],
)
def test_malformed_results_lines(tmp_path, text, message):
    ds = make_dataset({"i1": [(0, BOX, False)]})
    (tmp_path / "comp4_det_test_a.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_voc_results(tmp_path, "test", ds.class_names, ds.image_ids)


def test_missing_class_file_and_folder(tmp_path):
    ds = make_dataset({"i1": [(0, BOX, False)]}, class_names=("a", "b"))
    (tmp_path / "comp4_det_test_a.txt").write_text("")
    msg = r"comp4_det_test_b\.txt: missing results file for class 'b'"
    with pytest.raises(ValueError, match=msg):
        evaluate_voc_results(ds, tmp_path)
    with pytest.raises(ValueError, match="results folder not found"):
        evaluate_voc_results(ds, tmp_path / "nope")


def test_evaluator_rejects_bad_input():
    ds = make_dataset({"i1": [(0, BOX, False)]})
    ev = VOCEvaluator(ds)
    with pytest.raises(ValueError, match="unknown image id 'x'"):
        ev.process("x", dets([]))
    ev.process("i1", dets([]))
    with pytest.raises(ValueError, match="processed twice"):
        ev.process("i1", dets([]))
    ev.reset()
    with pytest.raises(ValueError, match="out of range"):
        ev.process("i1", dets([(3, 0.5, BOX)]))


# --- the tool ---------------------------------------------------------------------------------

XML = """<annotation><filename>{id}.jpg</filename>
<size><width>200</width><height>100</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>
</object>"""


def _tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "voc_eval.py"
    spec = importlib.util.spec_from_file_location("voc_eval_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_voc_eval_tool(tmp_path, capsys):
    root = tmp_path / "VOCdevkit"
    voc = root / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    objs = {"000001": [("dog", [1, 1, 10, 10], 0)], "000002": [("cat", [21, 1, 30, 10], 0),
            ("cat", [41, 1, 50, 10], 1)]}  # fmt: skip
    for image_id, o in objs.items():
        text = "".join(OBJ.format(name=n, b=b, difficult=d) for n, b, d in o)
        (voc / "Annotations" / f"{image_id}.xml").write_text(XML.format(id=image_id, objects=text))
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    results = tmp_path / "results"
    results.mkdir()
    from spp_detect.datasets.voc import VOC_CLASSES

    for c in VOC_CLASSES:
        (results / f"comp4_det_test_{c}.txt").write_text("")
    # dog: one TP -> AP 1; cat: the difficult one is ignored, then a TP -> AP 1.
    (results / "comp4_det_test_dog.txt").write_text("000001 0.9 1 1 10 10\n")
    cat_lines = "000002 0.9 41 1 50 10\n000002 0.8 21 1 30 10\n"
    (results / "comp4_det_test_cat.txt").write_text(cat_lines)
    tool = _tool()
    out = tmp_path / "out"
    args = tool.get_args_parser().parse_args(
        ["--voc-root", str(root), "--year", "2007", "--split", "test", "--results", str(results),
         "--output", str(out), "--coco"]
    )  # fmt: skip
    metrics = tool.main(args)
    assert metrics["metric"] == METRIC_07
    # (11 * (1/11) sums to 1.0000000000000002, in the devkit too.)
    assert metrics["AP"]["dog"] == pytest.approx(1.0) and metrics["AP"]["cat"] == pytest.approx(1.0)
    assert math.isnan(metrics["AP"]["person"]) and metrics["mAP"] == pytest.approx(1.0)
    assert metrics["coco"]["AP50"] == pytest.approx(1.0)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["mAP"] == pytest.approx(1.0) and saved["AP"]["person"] is None  # NaN -> null
    assert (out / "pr_curves.png").stat().st_size > 1000
    assert (out / "coco_gt.json").is_file()
    assert "dog" in capsys.readouterr().out
    # A user error: one line on stderr, exit code 2.
    (results / "comp4_det_test_dog.txt").write_text("000001 0.9 1 1 10\n")
    from spp_detect.cli_common import run_user_command

    argv = ["--voc-root", str(root), "--results", str(results), "--output", str(out)]
    rc = run_user_command(tool.main, tool.get_args_parser().parse_args(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "comp4_det_test_dog.txt:1: expected 6 fields" in err and "Traceback" not in err


def test_pr_curve_plot_from_evaluator(tmp_path):
    from spp_detect.evaluation.plots import plot_pr_curves

    ds = make_dataset({"i1": [(0, BOX, False), (1, BOX2, False)]}, class_names=("a", "b", "c"))
    _, ev = run(ds, {"i1": dets([(0, 0.9, BOX), (0, 0.8, FAR), (2, 0.8, FAR)])}, True)
    path = plot_pr_curves(ev, tmp_path / "pr.png")  # curves, AP and title from the evaluator
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
