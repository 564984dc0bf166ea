"""VOC reader: the 1-based pixel conversion, flags, class lists and its error messages, on tiny
hand-written VOCdevkit folders."""

from __future__ import annotations

import numpy as np
import pytest

from spp_detect.datasets.voc import (
    VOC_CLASSES,
    VOCDataset,
    available_splits,
    parse_voc_xml,
)

DOG = """<annotation>
  <folder>VOC2007</folder><filename>000001.jpg</filename>
  <size><width>353</width><height>500</height><depth>3</depth></size>
  <object><name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
    <bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>8</xmin><ymin>12</ymin><xmax>352</xmax><ymax>498</ymax></bndbox>
    <part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>
    </bndbox></part></object>
</annotation>"""

CAT = """<annotation><filename>000002.jpg</filename>
  <size><width>100</width><height>80</height><depth>3</depth></size>
  <object><name>cat</name>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>80</ymax></bndbox></object>
</annotation>"""


def make_voc(tmp_path, annotations, splits=None, year="2007", images=True):
    root = tmp_path / "VOCdevkit"
    voc = root / f"VOC{year}"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for image_id, text in annotations.items():
        (voc / "Annotations" / f"{image_id}.xml").write_text(text)
        if images:
            (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"")
    for split, ids in (splits or {"test": list(annotations)}).items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return root


def test_one_based_pixels_converted_to_continuous(tmp_path):
    root = make_voc(tmp_path, {"000001": DOG, "000002": CAT})
    ds = VOCDataset(root, "2007", "test")
    assert len(ds) == 2 and ds.image_ids == ["000001", "000002"]
    r = ds[0]
    # xmin 48 (1-based, inclusive) -> x1 = 47; xmax 195 (inclusive) -> x2 = 195.
    # Width 195 - 47 = 148 = xmax - xmin + 1, the devkit's width.
    np.testing.assert_array_equal(r.boxes, [[47, 239, 195, 371], [7, 11, 352, 498]])
    assert r.boxes.dtype == np.float32
    assert r.boxes[0, 2] - r.boxes[0, 0] == 195 - 48 + 1
    # A box covering the whole 100 x 80 image is [0, 0, 100, 80] in the continuous frame.
    np.testing.assert_array_equal(ds[1].boxes, [[0, 0, 100, 80]])
    assert (r.width, r.height) == (353, 500)
    # The <part> box (1,1,2,2) inside the person object is not read as an object.
    assert r.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert r.difficult.tolist() == [False, True]
    assert r.truncated.tolist() == [True, False]  # missing <truncated> -> False
    assert ds[1].difficult.tolist() == [False]  # missing <difficult> -> False
    assert ds.class_names == list(VOC_CLASSES)
    assert r.path == root / "VOC2007" / "JPEGImages" / "000001.jpg"


def test_class_list_from_annotations_and_explicit(tmp_path):
    other = CAT.replace("<name>cat</name>", "<name>zebra</name>")
    root = make_voc(tmp_path, {"a": DOG, "b": other})
    ds = VOCDataset(root, 2007, "test")  # a name outside VOC: the sorted set of names
    assert ds.class_names == ["dog", "person", "zebra"]
    assert ds[1].labels.tolist() == [2]
    ds = VOCDataset(root, "2007", "test", class_names=["zebra", "person", "dog"])
    assert ds[0].labels.tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"b\.xml: object class 'zebra' is not one of the 2"):
        VOCDataset(root, "2007", "test", class_names=["dog", "person"])
    ds = VOCDataset(root, "2007", "test", class_names=["dog", "person"], skip_unknown=True)
    assert ds[1].boxes.shape == (0, 4) and ds[1].labels.shape == (0,)


def test_image_extension_and_year_folder_as_root(tmp_path):
    root = make_voc(tmp_path, {"000002": CAT}, images=False)
    (root / "VOC2007" / "JPEGImages" / "000002.png").write_bytes(b"")
    ds = VOCDataset(root / "VOC2007", "2007", "test")  # the VOC2007 folder itself
    assert ds.root == root and ds[0].path.name == "000002.png"


def test_missing_size_read_from_image(tmp_path):
    from PIL import Image

    no_size = CAT.replace("<size><width>100</width><height>80</height><depth>3</depth></size>", "")
    root = make_voc(tmp_path, {"000002": no_size}, images=False)
    Image.new("RGB", (31, 17)).save(root / "VOC2007" / "JPEGImages" / "000002.jpg")
    r = VOCDataset(root, "2007", "test")[0]
    assert (r.width, r.height) == (31, 17)
    (root / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(ValueError, match=r"000002\.xml: no <size> and image .* is unreadable"):
        VOCDataset(root, "2007", "test")


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="VOC root folder not found.*VOCdevkit"):
        VOCDataset(tmp_path / "nowhere", "2007", "test")
    root = make_voc(tmp_path, {"000001": DOG}, splits={"train": ["000001"], "val": ["000001"]})
    (root / "VOC2007" / "ImageSets" / "Main" / "dog_train.txt").write_text("000001  1\n")
    with pytest.raises(ValueError, match=r"VOC2012: folder not found \(found years: 2007\)"):
        VOCDataset(root, "2012", "test")
    with pytest.raises(ValueError, match=r"test\.txt: split file not found \(available splits: "
                       r"train, val\)"):  # fmt: skip
        VOCDataset(root, "2007", "test")
    assert available_splits(root, "2007") == ["train", "val"]
    # A per-class split file is read by its first column.
    assert VOCDataset(root, "2007", "dog_train").image_ids == ["000001"]


def test_file_errors(tmp_path):
    root = make_voc(tmp_path, {"000001": DOG}, splits={"test": ["000001", "000009"]})
    with pytest.raises(ValueError, match=r"000009\.xml: annotation file not found"):
        VOCDataset(root, "2007", "test")
    main = root / "VOC2007" / "ImageSets" / "Main"
    (main / "dup.txt").write_text("000001\n\n000001\n")
    with pytest.raises(ValueError, match=r"dup\.txt:3: image id '000001' repeated"):
        VOCDataset(root, "2007", "dup")
    (main / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.txt: split file lists no image ids"):
        VOCDataset(root, "2007", "empty")
    xml = root / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(DOG[:-20])
    with pytest.raises(ValueError, match=r"000001\.xml: malformed XML"):
        parse_voc_xml(xml)
    xml.write_text(DOG.replace("<xmax>195</xmax>", "<xmax>20</xmax>"))
    with pytest.raises(ValueError, match=r"000001\.xml: object 0 \(dog\): invalid box"):
        parse_voc_xml(xml)
    xml.write_text(DOG.replace("<ymin>240</ymin>", "<ymin>x</ymin>"))
    with pytest.raises(ValueError, match=r"000001\.xml: object 0 \(dog\): <bndbox> needs numeric"):
        parse_voc_xml(xml)
    xml.write_text(DOG.replace("<name>dog</name>", ""))
    with pytest.raises(ValueError, match=r"000001\.xml: object 0 has no <name>"):
        parse_voc_xml(xml)
