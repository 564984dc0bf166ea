"""spp_detect.inference.folder (and its inputs, image_loader and folder_results modules) and
inference.visualize: input listing, every bad-input case, the parallel proposal path, the JSON
Lines stream and resuming, the caller's model left untouched, the COCO conversion and the
drawing, on a tiny random detector."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spp_detect.errors import UserInputError
from spp_detect.inference import folder as df
from spp_detect.inference import folder_results as fr
from spp_detect.inference import image_loader, inputs
from spp_detect.inference.visualize import annotated_name, class_color, draw_detections

from bad_inputs import CLASSES, make_bad_folder, save_tiny_model, scene, tiny_detector  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


MAX_PIXELS = 5000  # above every good image (<= 3,072 px), below huge.png


def _delete_after_listing(monkeypatch, victim):
    """The file disappears between listing and reading (issue 6: deleted mid-run)."""
    real = inputs.list_images

    def listing(path):
        found = real(path)
        victim.unlink()
        return found

    monkeypatch.setattr(inputs, "list_images", listing)


def _check_outputs(out, good, bad, save_images=True):
    doc = json.loads((out / fr.DETECTIONS_FILE).read_text())
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
    assert not (tmp_path / "o1" / fr.IMAGES_DIR).exists()


def test_resolve_inputs_folder_glob_file_and_output_inside(tmp_path):
    for rel in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.bmp", "x.txt", ".hidden.jpg"]:
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    out = tmp_path / "in" / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "b.jpg").write_bytes(b"x")  # an annotated copy from an earlier run
    names = [n for _, n in inputs.resolve_inputs(tmp_path / "in", exclude=out)]
    assert names == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.bmp"]
    names = [n for _, n in inputs.resolve_inputs(str(tmp_path / "in" / "sub" / "**" / "*.*"))]
    assert names == ["c.jpeg", "deeper/d.bmp"]
    assert inputs.resolve_inputs(tmp_path / "in" / "x.txt") == [
        (tmp_path / "in" / "x.txt", "x.txt")
    ]
    with pytest.raises(UserInputError, match="no images found"):
        inputs.resolve_inputs(str(tmp_path / "in" / "*.gif"))
    with pytest.raises(UserInputError, match="no such file"):
        inputs.resolve_inputs(tmp_path / "missing")


def test_existing_output_needs_exist_ok(tmp_path, model_path):
    Image.fromarray(scene(48, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(UserInputError, match="exist-ok"):
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
    results, ids = fr.to_coco_results(entries, CLASSES)
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
    doc = json.loads((tmp_path / "out" / fr.DETECTIONS_FILE).read_text())
    dets = {e["file"]: e["detections"] for e in doc["images"]}
    # One window, no box regressor: one box per class (2 softmax scores > 0), both the window.
    assert sorted(d["label"] for d in dets["sub/a.png"]) == CLASSES
    assert all(d["box"] == window[0].tolist() for d in dets["sub/a.png"])
    assert len(dets["b.png"]) > 2  # selective search ran for the image without windows


# --------------------------------------------------------------------------------------------
# JSON Lines stream and --resume


def _three_images(folder):
    folder.mkdir()
    for k, (h, w) in enumerate([(48, 64), (56, 40), (40, 72)]):
        Image.fromarray(scene(h, w, k)).save(folder / f"im{k}.png")
    return ["im0.png", "im1.png", "im2.png"]


def _jsonl(out):
    return [json.loads(line) for line in (out / fr.JSONL_FILE).read_text().splitlines()]


KW = dict(score_thresh=0.0, progress=False, save_images=False)


def test_jsonl_has_one_line_per_image_as_it_finishes(tmp_path, model_path, monkeypatch):
    names = _three_images(tmp_path / "in")
    out = tmp_path / "out"
    seen = []  # what the JSONL holds each time an image is about to be read

    real_read = image_loader.read_image

    def reading(path, **kw):
        jsonl = out / fr.JSONL_FILE
        seen.append(len(jsonl.read_text().splitlines()) if jsonl.exists() else None)
        # While the run goes on, detections.json holds the settings, no images yet.
        doc = json.loads((out / fr.DETECTIONS_FILE).read_text())
        assert doc["complete"] is False and doc["images"] == [] and doc["partial"] == fr.JSONL_FILE
        return real_read(path, **kw)

    monkeypatch.setattr(image_loader, "read_image", reading)
    summary = df.detect_folder(model_path, tmp_path / "in", out, **KW)
    assert seen == [0, 1, 2]  # each image's line was on disk before the next was read
    doc = json.loads((out / fr.DETECTIONS_FILE).read_text())
    assert doc["complete"] is True and [e["file"] for e in doc["images"]] == names
    assert _jsonl(out) == doc["images"]  # the final file is the stream, assembled
    assert summary["outputs"]["jsonl"] == str(out / fr.JSONL_FILE)
    results = json.loads((out / fr.COCO_RESULTS_FILE).read_text())
    assert results == fr.to_coco_results(doc["images"], CLASSES)[0]
    ids = json.loads((out / fr.COCO_IMAGES_FILE).read_text())
    assert ids == fr.to_coco_results(doc["images"], CLASSES)[1]


def test_resume_skips_finished_images_and_retries_failures(tmp_path, model_path, monkeypatch):
    names = _three_images(tmp_path / "in")
    full = tmp_path / "full"
    df.detect_folder(model_path, tmp_path / "in", full, **KW)
    reference = json.loads((full / fr.DETECTIONS_FILE).read_text())

    # A run killed while writing the third line: im0 done, im1's detector ran out of memory.
    out = tmp_path / "out"
    df.detect_folder(model_path, tmp_path / "in", out, **KW)
    first = _jsonl(out)[0]
    failure = {
        "file": "im1.png",
        "path": "x",
        "reason": "detection failed (oom)",
        "stage": "detect",
    }
    lines = [json.dumps(first), json.dumps(failure), '{"file": "im2.pn']
    (out / fr.JSONL_FILE).write_text("\n".join(lines))

    read = []
    real_read = image_loader.read_image
    monkeypatch.setattr(
        image_loader, "read_image", lambda path, **kw: read.append(path) or real_read(path, **kw)
    )
    summary = df.detect_folder(model_path, tmp_path / "in", out, resume=True, **KW)
    assert [p.rsplit("/", 1)[-1] for p in read] == ["im1.png", "im2.png"]
    assert summary["resumed"] == 1 and summary["processed"] == 3 and summary["failed"] == 0
    doc = json.loads((out / fr.DETECTIONS_FILE).read_text())
    assert doc["images"] == reference["images"] and doc["errors"] == []
    assert [r["file"] for r in _jsonl(out)] == ["im0.png", "im1.png", "im1.png", "im2.png"]

    # Nothing left to do: a second resume reads no image and gives the same files.
    read.clear()
    summary = df.detect_folder(model_path, tmp_path / "in", out, resume=True, **KW)
    assert read == [] and summary["resumed"] == 3
    assert json.loads((out / fr.DETECTIONS_FILE).read_text())["images"] == reference["images"]

    # Other settings: refused, and nothing is changed.
    before = (out / fr.JSONL_FILE).read_bytes()
    with pytest.raises(UserInputError, match="cannot resume"):
        df.detect_folder(
            model_path, tmp_path / "in", out, resume=True, **dict(KW, score_thresh=0.3)
        )
    assert (out / fr.JSONL_FILE).read_bytes() == before
    # --exist-ok without --resume starts afresh.
    df.detect_folder(model_path, tmp_path / "in", out, exist_ok=True, **KW)
    assert [r["file"] for r in _jsonl(out)] == names


def test_resume_refuses_a_corrupt_line(tmp_path, model_path):
    _three_images(tmp_path / "in")
    out = tmp_path / "out"
    df.detect_folder(model_path, tmp_path / "in", out, **KW)
    lines = (out / fr.JSONL_FILE).read_text().splitlines()
    (out / fr.JSONL_FILE).write_text("\n".join([lines[0], "not json", lines[2]]) + "\n")
    with pytest.raises(UserInputError, match=r"detections.jsonl:2: not a detections record"):
        df.detect_folder(model_path, tmp_path / "in", out, resume=True, **KW)


# --------------------------------------------------------------------------------------------
# the caller's model


def _snapshot(detector):
    return {
        "state": {k: v.detach().clone() for k, v in detector.state_dict(keep_vars=True).items()},
        "tensor_ids": {k: id(v) for k, v in detector.state_dict(keep_vars=True).items()},
        "devices": {k: v.device for k, v in detector.state_dict().items()},
        "training": {name: m.training for name, m in detector.named_modules()},
        "config": detector.config,
        "modules": dict(detector._modules),
        "head": detector.head,
        "svms": detector.svms,
        "bbox_regressor": detector.bbox_regressor,
        "svd_ranks": detector.head.svd_ranks,
    }


def test_a_library_callers_model_is_left_exactly_as_it_was(tmp_path, device):
    Image.fromarray(scene(48, 64)).save(tmp_path / "a.png")
    detector = tiny_detector().train()  # the caller is fine-tuning it: training mode
    before = _snapshot(detector)
    saved = copy.deepcopy(detector).eval().save(tmp_path / "model.pt")
    kw = dict(score_thresh=0.0, progress=False, save_images=False, device=str(device))
    s = df.detect_folder(
        detector, tmp_path / "a.png", tmp_path / "o1", scales=[48], max_proposals=4, **kw
    )
    assert s["processed"] == 1
    after = _snapshot(detector)
    for key in ("tensor_ids", "devices", "training", "modules", "svd_ranks"):
        assert after[key] == before[key], key
    assert after["config"] == before["config"]
    for key in ("head", "svms", "bbox_regressor"):
        assert after[key] is before[key], key
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert detector.training and next(detector.parameters()).device.type == "cpu"

    # The same detections as the saved copy of the model, loaded from its file.
    df.detect_folder(saved, tmp_path / "a.png", tmp_path / "o2", scales=[48], max_proposals=4, **kw)
    d1, d2 = (json.loads((tmp_path / o / fr.DETECTIONS_FILE).read_text()) for o in ("o1", "o2"))
    for a, b in zip(d1["images"][0]["detections"], d2["images"][0]["detections"]):
        assert a["label"] == b["label"] and a["box"] == pytest.approx(b["box"], abs=1e-3)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    assert len(d1["images"][0]["detections"]) == len(d2["images"][0]["detections"]) > 0
