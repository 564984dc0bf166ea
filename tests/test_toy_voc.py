"""The toy VOC generator: determinism, VOC layout and XML, tight 1-based boxes, splits, flags."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spp_detect.cli_common import run_user_command
from spp_detect.datasets import toy_paint, toy_scene, toy_shapes, toy_voc
from spp_detect.datasets.toy_scene import ToyObject, render_toy_image
from spp_detect.datasets.toy_shapes import TOY_CLASSES
from spp_detect.datasets.toy_voc import DatasetExistsError, make_toy_voc

# Saturated colours far from each other and from the grey test background (128).
PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]], dtype=np.float32
)


@pytest.fixture
def flat_colours(monkeypatch):
    """Grey background, object k of each image painted in PALETTE[k], no noise, no blending:
    the painted pixels of every object can then be found in the image by colour."""
    counter = {"k": 0}

    def background(rng, h, w):
        counter["k"] = 0
        return np.full((h, w, 3), 128, dtype=np.float32)

    def texture(rng, h, w):
        colour = PALETTE[counter["k"]]
        counter["k"] += 1
        return np.broadcast_to(colour, (h, w, 3)).copy()

    monkeypatch.setattr(toy_paint, "background", background)
    monkeypatch.setattr(toy_paint, "texture", texture)
    monkeypatch.setattr(toy_scene, "_LOW_CONTRAST_P", 0.0)
    monkeypatch.setattr(toy_scene, "_SENSOR_NOISE", 0.0)


def _parse(xml_path: Path):
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    w, h = int(size.find("width").text), int(size.find("height").text)
    objs = []
    for o in root.findall("object"):
        bb = o.find("bndbox")
        objs.append(
            dict(
                name=o.find("name").text,
                pose=o.find("pose").text,
                truncated=int(o.find("truncated").text),
                difficult=int(o.find("difficult").text),
                box=tuple(int(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")),
            )
        )
    return root.find("filename").text, w, h, objs


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_render_boxes_are_tight_around_painted_pixels(flat_colours):
    seen = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        img, objects, masks = render_toy_image(rng, 260, 210)
        assert img.shape == (210, 260, 3) and img.dtype == np.uint8
        assert 1 <= len(objects) <= 4 and len(masks) == len(objects)
        for k, (obj, mask) in enumerate(zip(objects, masks)):
            painted = (img == PALETTE[k].astype(np.uint8)).all(axis=2)
            np.testing.assert_array_equal(painted, mask)  # the mask is what was drawn
            assert obj.box == _bbox(painted)  # continuous [x1, x2): last pixel is x2 - 1
            assert obj.name in TOY_CLASSES
            seen += 1
    assert seen > 20


def test_truncated_objects_touch_the_border_and_flags_occur(flat_colours):
    objects = []
    for seed in range(40):
        _, objs, _ = render_toy_image(np.random.default_rng(seed), 240, 200)
        objects += objs
    truncated = [o for o in objects if o.truncated]
    assert truncated and any(o.difficult for o in objects)
    for o in truncated:
        x1, y1, x2, y2 = o.box
        assert x1 == 0 or y1 == 0 or x2 == 240 or y2 == 200


def test_annotation_xml_uses_voc_one_based_inclusive_pixels():
    # A box covering pixel columns 0..9 and rows 5..24 (continuous [0, 10) x [5, 25)) is
    # written xmin=1, ymin=6, xmax=10, ymax=25 in VOC's 1-based inclusive pixels.
    objs = [ToyObject("star", (0, 5, 10, 25), difficult=True, truncated=False)]
    xml = toy_voc._annotation_xml("000007", "2007", 30, 40, objs)
    root = ET.fromstring(xml)
    bb = root.find("object/bndbox")
    assert [int(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")] == [1, 6, 10, 25]
    assert root.find("object/difficult").text == "1"
    assert root.find("object/truncated").text == "0"
    assert root.find("filename").text == "000007.jpg"
    assert (root.find("size/width").text, root.find("size/height").text) == ("30", "40")


def test_written_boxes_match_image_pixels(tmp_path, flat_colours, monkeypatch):
    def lossless(image, quality):  # PNG bytes in the .jpg files: pixels survive exactly
        import io

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()

    monkeypatch.setattr(toy_voc, "_encode_jpeg", lossless)
    root = make_toy_voc(tmp_path / "devkit", num_train=4, num_val=2, num_test=4, seed=3)
    voc = root / "VOC2007"
    n = 0
    for xml_path in sorted((voc / "Annotations").glob("*.xml")):
        filename, w, h, objs = _parse(xml_path)
        img = np.asarray(Image.open(voc / "JPEGImages" / filename)).astype(int)
        assert img.shape == (h, w, 3)
        for k, o in enumerate(objs):
            xmin, ymin, xmax, ymax = o["box"]
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h
            painted = (img == PALETTE[k]).all(axis=2)
            # VOC 1-based inclusive -> continuous: (xmin - 1, ymin - 1, xmax, ymax).
            assert _bbox(painted) == (xmin - 1, ymin - 1, xmax, ymax), (xml_path.name, k)
            n += 1
    assert n >= 10


def test_same_seed_same_bytes_and_layout(tmp_path):
    a = make_toy_voc(tmp_path / "a", num_train=6, num_val=3, num_test=6, seed=5)
    b = make_toy_voc(tmp_path / "b", num_train=6, num_val=3, num_test=6, seed=5)
    c = make_toy_voc(tmp_path / "c", num_train=6, num_val=3, num_test=6, seed=6)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "VOC2007/JPEGImages/000001.jpg").read_bytes() != (
        c / "VOC2007/JPEGImages/000001.jpg"
    ).read_bytes()
    voc = a / "VOC2007"
    ids = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    assert ids == [f"{i:06d}" for i in range(1, 16)]
    assert sorted(p.stem for p in (voc / "Annotations").glob("*.xml")) == ids
    assert not [p for p in a.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_splits_disjoint_complete_and_every_class_present(tmp_path):
    root = make_toy_voc(tmp_path / "d", num_train=14, num_val=7, num_test=12, seed=1)
    main = root / "VOC2007" / "ImageSets" / "Main"
    split = {s: (main / f"{s}.txt").read_text().split() for s in toy_voc.SPLITS}
    for s, ids in split.items():
        assert ids == sorted(ids) and len(set(ids)) == len(ids), s
    assert len(split["train"]) == 14 and len(split["val"]) == 7 and len(split["test"]) == 12
    assert not set(split["train"]) & set(split["val"])
    assert not set(split["trainval"]) & set(split["test"])
    assert set(split["trainval"]) == set(split["train"]) | set(split["val"])
    all_ids = {p.stem for p in (root / "VOC2007" / "JPEGImages").glob("*.jpg")}
    assert set(split["trainval"]) | set(split["test"]) == all_ids
    n_difficult = n_truncated = 0
    for s in ("train", "val", "test"):
        names = set()
        for i in split[s]:
            _, w, h, objs = _parse(root / "VOC2007" / "Annotations" / f"{i}.xml")
            names |= {o["name"] for o in objs}
            n_difficult += sum(o["difficult"] for o in objs)
            n_truncated += sum(o["truncated"] for o in objs)
            assert all(o["pose"] == "Unspecified" for o in objs)
        assert names == set(TOY_CLASSES), s  # >= 6 images in the split: all classes
    assert n_difficult > 0 and n_truncated > 0
    # Per-class lists as in the devkit: "<id>  1" present, "0" only difficult, "-1" absent.
    lines = (main / "circle_test.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == split["test"]
    assert {ln.split()[1] for ln in lines} <= {"1", "0", "-1"}


def test_refuses_to_overwrite_and_atomic_failure(tmp_path, monkeypatch):
    root = make_toy_voc(tmp_path / "e", num_train=2, num_val=1, num_test=2)
    with pytest.raises(DatasetExistsError, match="overwrite"):
        make_toy_voc(root, num_train=2, num_val=1, num_test=2)
    assert isinstance(DatasetExistsError("x"), ValueError)
    make_toy_voc(root, num_train=3, num_val=1, num_test=1, overwrite=True)
    assert len(list((root / "VOC2007" / "JPEGImages").iterdir())) == 5
    assert [p.name for p in root.iterdir()] == ["VOC2007"]

    calls = {"n": 0}
    real = toy_voc._encode_jpeg

    def failing(image, quality):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(image, quality)

    monkeypatch.setattr(toy_voc, "_encode_jpeg", failing)
    with pytest.raises(RuntimeError):
        make_toy_voc(tmp_path / "f", num_train=3, num_val=1, num_test=1)
    assert list((tmp_path / "f").iterdir()) == []  # nothing half-written


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        make_toy_voc(tmp_path, classes=["circle", "dog"])
    with pytest.raises(ValueError, match="image_size"):
        make_toy_voc(tmp_path, image_size=(300, 200))
    with pytest.raises(ValueError, match="counts"):
        make_toy_voc(tmp_path, num_train=0, num_val=0, num_test=0)


def test_tool_main(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "tools" / "make_toy_voc.py"
    spec = importlib.util.spec_from_file_location("make_toy_voc_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.get_args_parser().parse_args(
        [
            "--output",
            str(tmp_path / "t"),
            "--num-train",
            "2",
            "--num-val",
            "1",
            "--num-test",
            "1",
            "--classes",
            "circle",
            "ring",
            "--min-size",
            "120",
            "--max-size",
            "160",
        ]
    )
    root = tool.main(args)
    assert root == tmp_path / "t"
    names = set()
    for xml_path in (root / "VOC2007" / "Annotations").glob("*.xml"):
        _, w, h, objs = _parse(xml_path)
        assert 120 <= w <= 160 and 120 <= h <= 160
        names |= {o["name"] for o in objs}
    assert names <= {"circle", "ring"}
    capsys.readouterr()
    again = tool.get_args_parser().parse_args(["--output", str(tmp_path / "t")])
    assert run_user_command(tool.main, again) == 2  # the dataset exists: a user error, exit 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(tmp_path / "t") in err


# --------------------------------------------------------------------------------------------
# instance-split mode: test objects are other instances of the classes than training objects

import json  # noqa: E402

from spp_detect.datasets import toy_style_shapes, toy_styles, toy_textures  # noqa: E402
from spp_detect.datasets.toy_scene import render_instance_image  # noqa: E402

# Up to 4 objects + 2 distractors per image: 8 distinct colours, none of them the grey 128.
PALETTE8 = np.array(
    [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [255, 0, 255],
        [0, 255, 255],
        [255, 128, 0],
        [128, 0, 255],
    ],
    dtype=np.float32,
)


def _load_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "make_toy_voc.py"
    spec = importlib.util.spec_from_file_location("make_toy_voc_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_instance_styles_split_disjoint_and_recorded():
    rec = toy_styles.split_record(TOY_CLASSES)
    assert rec["image_sets"] == {
        "train": "train",
        "val": "train",
        "trainval": "train",
        "test": "test",
    }
    for c in TOY_CLASSES:
        train, test = set(rec["train"]["styles"][c]), set(rec["test"]["styles"][c])
        assert len(train) >= 2 and len(test) >= 2 and not train & test, c
        assert all(s.startswith(f"{c}/") for s in train | test)
    assert not set(rec["train"]["textures"]) & set(rec["test"]["textures"])
    # The palettes of the two sides are disjoint too, not only the pattern names.
    palettes = {s: {t.split("/")[1] for t in rec[s]["textures"]} for s in ("train", "test")}
    assert not palettes["train"] & palettes["test"]
    lo, hi = rec["train"]["aspect"]["log_uniform"]
    assert rec["test"]["aspect"]["stretch_log_uniform"][0] >= hi and lo == pytest.approx(1 / hi)
    assert rec["distractors"] and all(d.startswith("distractor/") for d in rec["distractors"])
    rng = np.random.default_rng(0)
    stretch = toy_styles.style_side("test", TOY_CLASSES)
    aspects = [stretch.draw_aspect(rng) for _ in range(200)]
    assert all(a <= lo or a >= hi for a in aspects)  # test proportions never seen in training
    assert min(aspects) < 1 < max(aspects)  # wide and tall
    with pytest.raises(ValueError, match="side"):
        toy_styles.style_side("val", TOY_CLASSES)


@pytest.fixture
def flat_instance_colours(monkeypatch):
    """Grey background; the k-th painted shape of each image (object or distractor) a flat
    PALETTE8[k]; no soft edges, low contrast or noise."""
    counter = {"k": 0}

    def background(rng, h, w):
        counter["k"] = 0
        return np.full((h, w, 3), 128, dtype=np.float32)

    def fill(rng, family, labels):
        colour = PALETTE8[counter["k"]]
        counter["k"] += 1
        return np.broadcast_to(colour, labels.shape + (3,)).copy()

    monkeypatch.setattr(toy_paint, "background", background)
    monkeypatch.setattr(toy_textures, "paint_fill", fill)
    monkeypatch.setattr(toy_textures, "edge_fade", lambda m: m.astype(np.float32))
    monkeypatch.setattr(toy_scene, "_LOW_CONTRAST_P", 0.0)
    monkeypatch.setattr(toy_scene, "_SENSOR_NOISE", 0.0)


def test_instance_render_boxes_tight_and_distractors_separate(flat_instance_colours):
    n_objects = n_distractors = 0
    for side_name in ("train", "test"):
        side = toy_styles.style_side(side_name, TOY_CLASSES)
        for seed in range(10):
            scene = render_instance_image(np.random.default_rng(seed), 260, 210, side)
            img = scene.image
            masks = scene.masks + scene.distractor_masks
            shapes = scene.objects + scene.distractors
            assert 1 <= len(scene.objects) <= 4 and len(scene.distractors) <= 2
            union = np.zeros(img.shape[:2], dtype=bool)
            for obj, mask in zip(shapes, masks):
                assert not (union & mask).any()  # visible pixels belong to one shape
                union |= mask
                colours = np.unique(img[mask], axis=0)
                assert len(colours) == 1  # one flat colour per shape ...
                painted = (img == colours[0]).all(axis=2)
                np.testing.assert_array_equal(painted, mask)  # ... and only there
                assert obj.box == _bbox(mask)
            np.testing.assert_array_equal((img != 128).any(axis=2), union)
            for o in scene.objects:
                assert o.name in TOY_CLASSES and o.style in {s.name for s in side.styles[o.name]}
            for d in scene.distractors:
                assert d.name not in TOY_CLASSES and d.style == f"distractor/{d.name}"
            n_objects += len(scene.objects)
            n_distractors += len(scene.distractors)
    assert n_objects > 30 and n_distractors > 5


def test_instance_styles_paint_details_and_holes():
    # Real fills: a framed square has detail pixels in a third colour; a double ring has holes.
    rng = np.random.default_rng(3)
    framed = dict((s.name, s) for s in toy_style_shapes.CLASS_STYLES["square"][0])["square/framed"]
    labels, _, _ = toy_shapes.rasterize(
        [(c * 40 + 50, v) for c, v in framed.layers(np.random.default_rng(0))]
    )
    assert set(np.unique(labels)) == {0, 1, 2}
    fill = toy_textures.paint_fill(rng, "solid/vivid", labels)
    assert not np.allclose(fill[labels == 2][0], fill[labels == 1][0])
    double = dict((s.name, s) for s in toy_style_shapes.CLASS_STYLES["ring"][1])["ring/double"]
    labels, x0, y0 = toy_shapes.rasterize(
        [(c * 40 + 50, v) for c, v in double.layers(np.random.default_rng(0))]
    )
    # Along a radius of 40 px: hole r < 0.3-0.42, band to 0.55-0.62, hole to 0.74-0.82, band.
    radial = [labels[50 - y0, 50 - x0 + d] for d in (0, 19, 27, 36)]
    assert radial == [0, 1, 0, 1]


def test_instance_split_dataset_records_styles_and_annotates_only_classes(tmp_path):
    tool = _load_tool()
    args = tool.get_args_parser().parse_args(
        ["--output", str(tmp_path / "i"), "--num-train", "10", "--num-val", "4"]
        + ["--num-test", "12", "--seed", "2", "--min-size", "140", "--max-size", "200"]
        + ["--instance-split"]
    )
    root = tool.main(args)
    voc = root / "VOC2007"
    meta = json.loads((voc / "toy_voc.json").read_text())
    rec = meta["instance_split"]
    assert {k: rec[k] for k in ("train", "test", "distractors")} == {
        k: v for k, v in toy_styles.split_record(TOY_CLASSES).items() if k != "image_sets"
    }
    main = voc / "ImageSets" / "Main"
    split = {s: (main / f"{s}.txt").read_text().split() for s in toy_voc.SPLITS}
    assert set(rec["images"]) == set(split["trainval"]) | set(split["test"])
    seen = {"train": set(), "test": set()}
    n_distractors = 0
    for image_id, info in rec["images"].items():
        side = "test" if image_id in split["test"] else "train"
        assert info["side"] == side
        _, w, h, objs = _parse(voc / "Annotations" / f"{image_id}.xml")
        # The record lists the annotated objects in annotation order, boxes continuous xyxy.
        assert [o["name"] for o in objs] == [o["name"] for o in info["objects"]]
        xml_boxes = [(b[0] - 1, b[1] - 1, b[2], b[3]) for b in (o["box"] for o in objs)]
        assert xml_boxes == [tuple(o["box"]) for o in info["objects"]]
        for o in info["objects"]:
            assert o["style"] in rec[side]["styles"][o["name"]], (image_id, o)
            assert o["texture"] in rec[side]["textures"], (image_id, o)
            seen[side].add(o["style"])
        for d in info["distractors"]:  # painted, never annotated
            assert d["name"] not in TOY_CLASSES and d["style"] in rec["distractors"]
            assert d["texture"] in rec[side]["textures"]
            assert tuple(d["box"]) not in xml_boxes
            n_distractors += 1
    assert not seen["train"] & seen["test"]
    assert len(seen["test"]) >= 8 and len(seen["train"]) >= 8
    assert n_distractors >= 5
    for s in ("train", "test"):  # every class in every split of >= 6 images
        names = {o["name"] for i in split[s] for o in rec["images"][i]["objects"]}
        assert names == set(TOY_CLASSES), s


def test_instance_split_same_seed_same_bytes(tmp_path):
    kw = dict(num_train=4, num_val=2, num_test=4, image_size=(120, 160), instance_split=True)
    a = make_toy_voc(tmp_path / "a", seed=4, **kw)
    b = make_toy_voc(tmp_path / "b", seed=4, **kw)
    c = make_toy_voc(tmp_path / "c", seed=5, **kw)
    plain = make_toy_voc(tmp_path / "p", seed=4, **dict(kw, instance_split=False))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    first = Path("VOC2007/JPEGImages/000001.jpg")
    assert (a / first).read_bytes() != (c / first).read_bytes()
    assert (a / first).read_bytes() != (plain / first).read_bytes()
    assert "instance_split" not in json.loads((plain / "VOC2007/toy_voc.json").read_text())
