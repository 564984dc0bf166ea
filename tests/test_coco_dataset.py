"""COCO-format datasets: the reader, VOC <-> COCO conversion, crowd regions, category-id mapping,
and the one-line error or warning + count for each kind of bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spp_detect.cli_common import run_user_command
from spp_detect.datasets.coco import SKIP_REASONS, COCODataset
from spp_detect.datasets.convert import coco_to_voc, write_coco
from spp_detect.datasets.records import ImageRecord
from spp_detect.datasets.toy_voc import make_toy_voc
from spp_detect.datasets.voc import VOCDataset
from spp_detect.errors import UserInputError
from spp_detect.evaluation.voc import VOCEvaluator
from spp_detect.structures import Detections


def _load_tool(name: str):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_dataset = _load_tool("convert_dataset")

# seed 1 gives difficult and truncated objects in both splits (checked in the first test).
SEED = 1


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "devkit"
    return make_toy_voc(root, num_train=3, num_val=1, num_test=2, image_size=(64, 96), seed=SEED)


def _voc2coco(voc_root: Path, out: Path, link: str = "symlink", splits=("trainval", "test")):
    parser = convert_dataset.get_args_parser()
    args = parser.parse_args(
        ["voc2coco", "--voc-root", str(voc_root), "--split", *splits, "--output", str(out)]
        + ["--link", link]
    )
    return convert_dataset.main(args)


def _coco2voc(json_path: Path, images: Path, out: Path, split=None):
    argv = ["coco2voc", "--coco-json", str(json_path), "--images", str(images)]
    argv += ["--output", str(out)] + (["--split", split] if split else [])
    return convert_dataset.main(convert_dataset.get_args_parser().parse_args(argv))


def assert_same_records(a, b, same_path: bool = True) -> None:
    assert [r.image_id for r in a] == [r.image_id for r in b]
    for ra, rb in zip(a, b):
        assert (ra.width, ra.height) == (rb.width, rb.height), ra.image_id
        assert ra.boxes.dtype == rb.boxes.dtype == np.float32
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        np.testing.assert_array_equal(ra.labels, rb.labels)
        np.testing.assert_array_equal(ra.difficult, rb.difficult)
        np.testing.assert_array_equal(ra.truncated, rb.truncated)
        np.testing.assert_array_equal(ra.crowd, rb.crowd)
        if same_path:  # a link or a copy of the same image
            assert ra.path.read_bytes() == rb.path.read_bytes()


def _xml_objects(path: Path):
    """(name, [xmin, ymin, xmax, ymax], difficult, truncated) per object, read by hand."""
    out = []
    for o in ET.parse(path).getroot().findall("object"):
        bb = o.find("bndbox")
        box = [float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
        out.append((o.find("name").text, box, int(o.find("difficult").text),
                    int(o.find("truncated").text)))  # fmt: skip
    return out


# -- VOC <-> COCO ------------------------------------------------------------------------------


def test_voc_to_coco_json_matches_xml(toy_root, tmp_path):
    summaries = _voc2coco(toy_root, tmp_path / "coco")
    assert [s["json"] for s in summaries] == [
        str(tmp_path / "coco" / "annotations" / f"instances_{s}.json") for s in ("trainval", "test")
    ]
    data = json.loads(Path(summaries[0]["json"]).read_text())
    voc = VOCDataset(toy_root, "2007", "trainval")
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert [names[i] for i in sorted(names)] == voc.class_names
    images = {im["id"]: im for im in data["images"]}
    n_difficult = n_truncated = 0
    for image_id in voc.image_ids:
        (im,) = [im for im in images.values() if im["file_name"] == f"{image_id}.jpg"]
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        expected = _xml_objects(toy_root / "VOC2007" / "Annotations" / f"{image_id}.xml")
        assert len(anns) == len(expected)
        for a, (name, (xmin, ymin, xmax, ymax), difficult, truncated) in zip(anns, expected):
            # VOC 1-based inclusive -> COCO xywh: x = xmin - 1, w = xmax - xmin + 1
            assert a["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            assert names[a["category_id"]] == name
            assert (a["iscrowd"], a["difficult"], a["truncated"]) == (0, difficult, truncated)
            n_difficult += difficult
            n_truncated += truncated
        assert (tmp_path / "coco" / "trainval" / im["file_name"]).is_symlink()
    assert n_difficult > 0 and n_truncated > 0  # the round trips below check the flags too


def test_coco_records_equal_voc_records_and_round_trip(toy_root, tmp_path):
    summaries = _voc2coco(toy_root, tmp_path / "coco", link="copy")
    for s, split in zip(summaries, ("trainval", "test")):
        voc = VOCDataset(toy_root, "2007", split)
        coco = COCODataset(s["json"], s["images_dir"])
        assert not (Path(s["images_dir"]) / f"{voc.image_ids[0]}.jpg").is_symlink()  # a copy
        assert coco.split == split and coco.year == "2007"
        assert coco.class_names == voc.class_names
        assert coco.image_ids == voc.image_ids and len(coco) == len(voc)
        assert coco.category_ids == list(range(1, len(voc.class_names) + 1))
        assert coco.skipped == {reason: 0 for reason in SKIP_REASONS}
        assert_same_records(coco.records, voc.records)
        assert coco.index(voc.image_ids[1]) == 1
        assert coco.coco_image_id(voc.image_ids[1]) == 2

        # ... and back to VOC: the same records, the same XML boxes (integers, as VOC writes).
        _coco2voc(Path(s["json"]), Path(s["images_dir"]), tmp_path / "voc")
        back = VOCDataset(tmp_path / "voc", "2007", split, class_names=voc.class_names)
        assert_same_records(back.records, voc.records)
        for image_id in voc.image_ids:
            assert _xml_objects(
                tmp_path / "voc" / "VOC2007" / "Annotations" / f"{image_id}.xml"
            ) == (_xml_objects(toy_root / "VOC2007" / "Annotations" / f"{image_id}.xml"))
            xml = (tmp_path / "voc" / "VOC2007" / "Annotations" / f"{image_id}.xml").read_text()
            assert ".0<" not in xml  # integral coordinates written as integers
    # both splits live side by side in the one converted VOC set
    assert sorted(p.name for p in (tmp_path / "voc/VOC2007/ImageSets/Main").iterdir()) == [
        "test.txt",
        "trainval.txt",
    ]


# -- hand-written COCO files -------------------------------------------------------------------


def _image(folder: Path, name: str, size=(40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(folder / name)


def _coco_files(tmp_path: Path, annotations, images=None, categories=None, write_images=True):
    images = images or [
        {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 3, "file_name": "b.png", "width": 40, "height": 30},
    ]
    categories = categories or [
        {"id": 90, "name": "toothbrush"},
        {"id": 1, "name": "person"},
        {"id": 5, "name": "airplane"},
    ]
    if write_images:
        for im in images:
            _image(tmp_path / "img", im["file_name"])
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "instances_mini.json"
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path, tmp_path / "img"


def _ann(i, image_id, category_id, bbox, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_non_contiguous_category_ids_round_trip(tmp_path):
    anns = [
        _ann(11, 7, 90, [1, 2, 10, 5]),
        _ann(12, 7, 1, [0.5, 0.25, 3.5, 4.75]),
        _ann(13, 3, 5, [0, 0, 40, 30]),
    ]
    path, images = _coco_files(tmp_path, anns)
    ds = COCODataset(path, images)
    # sorted ids 1, 5, 90 -> labels 0, 1, 2
    assert ds.category_ids == [1, 5, 90]
    assert ds.class_names == ["person", "airplane", "toothbrush"]
    assert ds.split == "mini" and ds.image_ids == ["a", "b"] and ds.coco_image_ids == [7, 3]
    np.testing.assert_array_equal(ds.records[0].labels, [2, 0])
    np.testing.assert_array_equal(ds.records[1].labels, [1])
    # xywh -> continuous xyxy, no +1
    np.testing.assert_array_equal(ds.records[0].boxes, [[1, 2, 11, 7], [0.5, 0.25, 4, 5]])
    np.testing.assert_array_equal(ds.records[1].boxes, [[0, 0, 40, 30]])
    # outputs map back: label -> category id
    assert [ds.category_ids[k] for k in ds.records[0].labels] == [90, 1]

    # written back to COCO: the same ids, and the same records when read again
    out = write_coco(ds, tmp_path / "out" / "instances_mini.json", tmp_path / "out" / "img")
    data = json.loads(Path(out["json"]).read_text())
    assert sorted(c["id"] for c in data["categories"]) == [1, 5, 90]
    assert [im["id"] for im in data["images"]] == [7, 3]
    assert sorted((a["image_id"], a["category_id"]) for a in data["annotations"]) == [
        (3, 5), (7, 1), (7, 90)
    ]  # fmt: skip
    again = COCODataset(out["json"], out["images_dir"])
    assert again.category_ids == [1, 5, 90] and again.class_names == ds.class_names
    assert_same_records(again.records, ds.records)

    # a model's class order (test time): labels follow it, and category_ids with them
    ordered = COCODataset(path, images, class_names=["toothbrush", "person", "airplane"])
    assert ordered.category_ids == [90, 1, 5]
    np.testing.assert_array_equal(ordered.records[0].labels, [0, 1])
    with pytest.raises(UserInputError, match="'toothbrush' is not one of"):
        COCODataset(path, images, class_names=["person", "airplane"])
    with pytest.raises(UserInputError, match="class 'dog' is not a category"):
        COCODataset(path, images, class_names=["person", "airplane", "toothbrush", "dog"])


def test_crowd_regions(tmp_path, caplog):
    anns = [_ann(1, 7, 1, [2, 2, 10, 10]), _ann(2, 7, 1, [15, 5, 20, 20], iscrowd=1)]
    path, images = _coco_files(tmp_path, anns)
    ds = COCODataset(path, images)
    r = ds.records[0]
    np.testing.assert_array_equal(r.crowd, [False, True])
    np.testing.assert_array_equal(r.difficult, [False, True])  # VOC AP ignores it
    assert ds.records[1].crowd.shape == (0,)
    flipped = r.mirrored()
    np.testing.assert_array_equal(flipped.crowd, [False, True])
    np.testing.assert_array_equal(flipped.mirrored().crowd, r.crowd)
    # records built without the field: no crowd
    plain = ImageRecord("x", "x.jpg", 10, 10, boxes=[[0, 0, 1, 1]], labels=[0], difficult=[0],
                        truncated=[0])  # fmt: skip
    np.testing.assert_array_equal(plain.crowd, [False])

    # VOC AP (year 2007: 11-point) ignores a detection on the crowd region; counted as a false
    # positive ranked above the true one, it would make the AP 0.5.
    evaluator = VOCEvaluator(ds)
    boxes = torch.tensor([[15.0, 5.0, 35.0, 25.0], [2.0, 2.0, 12.0, 12.0]])
    dets = Detections(boxes, torch.tensor([0.95, 0.9]), torch.tensor([0, 0]), (30, 40))
    evaluator.process("a", dets)
    evaluator.process("b", Detections.empty((30, 40)))
    with caplog.at_level(logging.ERROR):  # no ground truth for the other classes: AP NaN
        metrics = evaluator.evaluate()
    assert metrics["AP"]["person"] == pytest.approx(1.0) and metrics["num_gt"]["person"] == 1

    # COCO -> COCO keeps iscrowd; COCO -> VOC makes it difficult, and says how many
    out = write_coco(ds, tmp_path / "c" / "instances_x.json", tmp_path / "c" / "img")
    assert [a["iscrowd"] for a in json.loads(Path(out["json"]).read_text())["annotations"]] == [
        0,
        1,
    ]
    with caplog.at_level(logging.WARNING):
        summary = coco_to_voc(path, images, tmp_path / "voc")
    assert summary["crowd_as_difficult"] == 1 and "crowd regions" in caplog.text
    objects = _xml_objects(tmp_path / "voc" / "VOC2007" / "Annotations" / "a.xml")
    # continuous [15, 35) -> VOC 1-based inclusive 16..35
    assert objects == [("person", [3, 3, 12, 12], 0, 0), ("person", [16, 6, 35, 25], 1, 0)]


# -- bad input -----------------------------------------------------------------------------------


def _one_line_error(path, images, match):
    with pytest.raises(UserInputError) as info:
        COCODataset(path, images)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg
    return msg


def test_malformed_json_is_one_line_error(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    _one_line_error(bad, tmp_path / "img", "malformed JSON")
    bad.write_text('{"images": []}')
    _one_line_error(bad, tmp_path / "img", "no 'annotations' list")
    # through the tool: exit code 2, one line on stderr, no traceback
    args = convert_dataset.get_args_parser().parse_args(
        ["coco2voc", "--coco-json", str(bad), "--images", str(tmp_path / "img"),
         "--output", str(tmp_path / "voc")]
    )  # fmt: skip
    assert run_user_command(convert_dataset.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "no 'annotations' list" in err


@pytest.mark.parametrize(
    "ann, match",
    [
        (_ann(41, 99, 1, [0, 0, 5, 5]), "annotation id 41 refers to image_id 99"),
        (_ann(42, 7, 2, [0, 0, 5, 5]), "annotation id 42 refers to category_id 2"),
        (_ann(43, 7, 1, [0, 0, 5]), "annotation id 43 (image id 7): 'bbox' must be 4 numbers"),
        (_ann(44, 7, 1, "0 0 5 5"), "annotation id 44 (image id 7): 'bbox'"),
        ({"image_id": 7, "category_id": 1}, "annotation #1 (no id) (image id 7): 'bbox'"),
        (_ann(1, 7, 1, [0, 0, 5, 5]), "annotation id 1 is repeated"),
    ],
)
def test_structural_faults_are_one_line_errors(tmp_path, ann, match):
    path, images = _coco_files(tmp_path, [_ann(1, 7, 1, [1, 1, 4, 4]), ann])
    _one_line_error(path, images, match)


def test_repeated_ids_and_bad_categories(tmp_path):
    im = {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30}
    path, images = _coco_files(tmp_path, [], images=[im, dict(im, file_name="c.jpg")])
    _one_line_error(path, images, "image id 7 is repeated")
    path, images = _coco_files(tmp_path, [], images=[im, dict(im, id=8, file_name="a.png")])
    _one_line_error(path, images, "same file name stem 'a'")
    cats = [{"id": 1, "name": "person"}, {"id": 1, "name": "dog"}]
    path, images = _coco_files(tmp_path, [], categories=cats)
    _one_line_error(path, images, "category id 1 is repeated")
    cats = [{"id": "1", "name": "person"}]
    path, images = _coco_files(tmp_path, [], categories=cats)
    _one_line_error(path, images, "category #0 needs an integer 'id'")


def test_bad_boxes_are_skipped_warned_and_counted(tmp_path, caplog):
    anns = [
        _ann(1, 7, 1, [1, 1, 4, 4]),  # good
        _ann(2, 7, 1, [5, 5, 0, 4]),  # zero width
        _ann(3, 7, 5, [5, 5, 4, -1]),  # negative height
        _ann(4, 7, 90, [30, 10, 15, 5]),  # x2 = 45 > 40 + tolerance: outside
        _ann(5, 3, 1, [-0.5, 0, 40.75, 30]),  # within the 1-pixel tolerance: clipped
        _ann(6, 3, 1, [-20, -20, 5, 5]),  # outside
    ]
    path, images = _coco_files(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="spp_detect.datasets.coco"):
        ds = COCODataset(path, images)
    assert ds.skipped["bad_box"] == 4
    assert sum(len(r.labels) for r in ds.records) == 2
    np.testing.assert_array_equal(ds.records[0].boxes, [[1, 1, 5, 5]])
    np.testing.assert_array_equal(ds.records[1].boxes, [[0, 0, 40, 30]])
    for k in (2, 3, 4, 6):
        assert f"annotation id {k} " in caplog.text
    assert "annotation id 4 (image id 7): bbox [30, 10, 15, 5] is outside its 40x30 image" in (
        caplog.text
    )
    assert "skipped 4 (bad_box)" in caplog.text  # the summary line


def test_missing_image_is_skipped_warned_and_counted(tmp_path, caplog):
    anns = [_ann(1, 7, 1, [1, 1, 4, 4]), _ann(2, 3, 1, [1, 1, 4, 4]), _ann(3, 3, 5, [2, 2, 4, 4])]
    path, images = _coco_files(tmp_path, anns)
    (images / "b.png").unlink()
    with caplog.at_level(logging.WARNING, logger="spp_detect.datasets.coco"):
        ds = COCODataset(path, images)
    assert ds.image_ids == ["a"] and ds.coco_image_ids == [7]
    assert ds.skipped["missing_image"] == 1 and ds.skipped["annotations_of_skipped_images"] == 2
    assert f"image id 3: {images / 'b.png'} not found" in caplog.text
    assert "skipped 1 (missing_image), 2 (annotations_of_skipped_images)" in caplog.text


def test_unreadable_image_and_size_from_header(tmp_path, caplog):
    images = [
        {"id": 1, "file_name": "a.jpg"},  # no size in the JSON: read from the header
        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
    ]
    path, folder = _coco_files(tmp_path, [_ann(1, 1, 1, [1, 1, 4, 4])], images=images)
    (folder / "b.jpg").write_bytes(b"not an image")
    ds = COCODataset(path, folder)  # b.jpg exists and has a size: not opened by default
    assert ds.image_ids == ["a", "b"] and (ds.records[0].width, ds.records[0].height) == (40, 30)
    with caplog.at_level(logging.WARNING, logger="spp_detect.datasets.coco"):
        checked = COCODataset(path, folder, check_images=True)
    assert checked.image_ids == ["a"] and checked.skipped["unreadable_image"] == 1
    assert "image id 2" in caplog.text and "unreadable" in caplog.text
