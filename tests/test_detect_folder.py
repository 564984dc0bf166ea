"""spp_detect.inference.folder and engine.visualize: input listing, every bad-input case,
the parallel proposal path, the COCO conversion and the drawing, on a tiny random detector."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from spp_detect.inference import folder as df
from spp_detect.inference.visualize import annotated_name, class_color, draw_detections

from bad_inputs import CLASSES, make_bad_folder, save_tiny_model, scene  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


MAX_PIXELS = 5000  # above every good image (<= 3,072 px), below huge.png


def _delete_after_listing(monkeypatch, victim):
    """The file disappears between listing and reading (issue 6: deleted mid-run)."""
    real = df.list_images

    def listing(path):
        found = real(path)
        victim.unlink()
        return found

    monkeypatch.setattr(df, "list_images", listing)


def _check_outputs(out, good, bad, save_images=True):
    doc = json.loads((out / df.DETECTIONS_FILE).read_text())
    assert doc["complete"] is True
    entries = {e["file"]: e for e in doc["images"]}
    assert set(entries) == set(good)
    for name, (w, h) in good.items():
        e = entries[name]
        assert (e["width"], e["height"]) == (w, h), name
        for d in e["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert d["label"] in CLASSES
        if save_images:
            annotated = np.asarray(Image.open(out / e["annotated"]))
            assert annotated.shape[:2] == (h, w)
    errors = {e["file"]: e["reason"] for e in doc["errors"]}
    assert set(errors) == set(bad)
    for name, word in bad.items():
        assert errors[name] and "\n" not in errors[name]
        assert word in errors[name].lower(), (name, errors[name])
    return doc


def test_every_bad_case_is_reported_and_the_run_goes_on(tmp_path, model_path, monkeypatch):
    good, bad = make_bad_folder(tmp_path / "in")
    _delete_after_listing(monkeypatch, tmp_path / "in" / "gone.jpg")
    summary = df.detect_folder(
        model_path, tmp_path / "in", tmp_path / "out", score_thresh=0.0,
        max_pixels=MAX_PIXELS, progress=False,
    )  # fmt: skip
    doc = _check_outputs(tmp_path / "out", good, bad)
    assert summary["processed"] == len(good) and summary["skipped"] == len(bad)
    assert summary["failed"] == 0
    n = sum(len(e["detections"]) for e in doc["images"])
    assert summary["detections"] == n > 0  # softmax scores of 2 classes all exceed 0
    assert "conv" in summary["stage_seconds"] and "proposals" in summary["stage_seconds"]


def test_parallel_proposals_give_the_same_detections(tmp_path, model_path):
    good, bad = make_bad_folder(tmp_path / "in")
    (tmp_path / "in" / "gone.jpg").unlink()
    bad.pop("gone.jpg")
    kw = dict(score_thresh=0.0, max_pixels=MAX_PIXELS, progress=False, save_images=False)
    df.detect_folder(model_path, tmp_path / "in", tmp_path / "o1", jobs=1, **kw)
    df.detect_folder(model_path, tmp_path / "in", tmp_path / "o2", jobs=2, **kw)
    d1 = _check_outputs(tmp_path / "o1", good, bad, save_images=False)
    d2 = _check_outputs(tmp_path / "o2", good, bad, save_images=False)
    assert d1["images"] == d2["images"]
    assert [e["file"] for e in d1["errors"]] == [e["file"] for e in d2["errors"]]
    assert not (tmp_path / "o1" / df.IMAGES_DIR).exists()


def test_resolve_inputs_folder_glob_file_and_output_inside(tmp_path):
    for rel in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.bmp", "x.txt", ".hidden.jpg"]:
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    out = tmp_path / "in" / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "b.jpg").write_bytes(b"x")  # an annotated copy from an earlier run
    names = [n for _, n in df.resolve_inputs(tmp_path / "in", exclude=out)]
    assert names == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.bmp"]
    names = [n for _, n in df.resolve_inputs(str(tmp_path / "in" / "sub" / "**" / "*.*"))]
    assert names == ["c.jpeg", "deeper/d.bmp"]
    assert df.resolve_inputs(tmp_path / "in" / "x.txt") == [(tmp_path / "in" / "x.txt", "x.txt")]
    with pytest.raises(ValueError, match="no images found"):
        df.resolve_inputs(str(tmp_path / "in" / "*.gif"))
    with pytest.raises(ValueError, match="no such file"):
        df.resolve_inputs(tmp_path / "missing")


def test_existing_output_needs_exist_ok(tmp_path, model_path):
    Image.fromarray(scene(48, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="exist-ok"):
        df.detect_folder(model_path, tmp_path / "a.png", out, progress=False)
    s = df.detect_folder(model_path, tmp_path / "a.png", out, exist_ok=True, progress=False)
    assert s["processed"] == 1 and (out / "old.txt").exists()


def test_coco_results_by_hand():
    entries = [
        {"file": "x.jpg", "width": 10, "height": 8, "detections": []},
        {
            "file": "y.jpg",
            "width": 20,
            "height": 30,
            "detections": [
                {"label": "b", "score": 0.9, "box": [1.5, 2.0, 11.5, 22.0]},
                {"label": "a", "score": 0.1, "box": [0.0, 0.0, 20.0, 30.0]},
            ],
        },
    ]
    results, ids = df.to_coco_results(entries, CLASSES)
    assert results == [
        {"image_id": 2, "category_id": 2, "bbox": [1.5, 2.0, 10.0, 20.0], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 20.0, 30.0], "score": 0.1},
    ]
    assert ids["images"][1] == {"id": 2, "file_name": "y.jpg", "width": 20, "height": 30}
    assert ids["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


class _Dets:
    def __init__(self, boxes, scores, labels):
        self.boxes, self.scores, self.labels = (np.asarray(v) for v in (boxes, scores, labels))


def test_draw_box_on_the_outermost_pixels():
    image = np.zeros((80, 80, 3), np.uint8)
    dets = _Dets([[10.0, 40.0, 30.0, 60.0]], [0.75], [1])
    out = draw_detections(image, dets, CLASSES, thickness=1)
    color = np.array(class_color(1), np.uint8)
    assert not image.any()  # the input is not modified
    # Continuous [10, 30) x [40, 60): columns 10 and 29, rows 40 and 59 carry the outline.
    for y, x in [(50, 10), (50, 29), (40, 20), (59, 20)]:
        np.testing.assert_array_equal(out[y, x], color, err_msg=f"({y}, {x})")
    for y, x in [(50, 9), (50, 30), (60, 20), (50, 20)]:
        np.testing.assert_array_equal(out[y, x], 0, err_msg=f"({y}, {x})")
    assert (out[:40] != 0).any()  # the label sits above the box
    empty = draw_detections(image, _Dets(np.zeros((0, 4)), [], []), CLASSES)
    np.testing.assert_array_equal(empty, image)


def test_annotated_name_keeps_writable_formats():
    assert annotated_name("sub/a.JPG") == "sub/a.JPG"
    assert annotated_name("a.gif") == "a.gif.png"


def test_precomputed_proposals_replace_selective_search(tmp_path, model_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(scene(48, 64)).save(tmp_path / "in" / "sub" / "a.png")
    Image.fromarray(scene(80, 100, 1)).save(tmp_path / "in" / "b.png")
    window = np.array([[4.0, 6.0, 60.0, 40.0]], np.float32)
    s = df.detect_folder(
        model_path, tmp_path / "in", tmp_path / "out", score_thresh=0.0, progress=False,
        save_images=False, proposals={"sub/a": window},
    )  # fmt: skip
    assert s["precomputed_proposals"] == 1
    doc = json.loads((tmp_path / "out" / df.DETECTIONS_FILE).read_text())
    dets = {e["file"]: e["detections"] for e in doc["images"]}
    # One window, no box regressor: one box per class (2 softmax scores > 0), both the window.
    assert sorted(d["label"] for d in dets["sub/a.png"]) == CLASSES
    assert all(d["box"] == window[0].tolist() for d in dets["sub/a.png"])
    assert len(dets["b.png"]) > 2  # selective search ran for the image without windows
