"""tools/train_net.py and tools/test_net.py on a COCO-format dataset (--coco-json --images):
the toy set written in both formats trains and tests to the same model, detections and mAP;
COCO outputs carry the file's own image and category ids."""

import json
import sys
from pathlib import Path

import pytest
import torch

from spp_detect.datasets.convert import voc_to_coco
from spp_detect.datasets.toy_voc import make_toy_voc
from spp_detect.errors import UserInputError
from spp_detect.serialization import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import test_net  # noqa: E402
import train_net  # noqa: E402

# A tiny fast training run (as tests/test_training.py): random ZF-5, one small scale.
TINY = [
    "model.backbone=zf5",
    "model.scales=[96]",
    "model.hidden=32",
    "proposals.max_proposals=40",
    "proposals.min_size=8",
    "finetune.iterations=30",
    "finetune.lr=0.001",
    "finetune.batch_size=32",
    "workers=1",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy set as VOC and as COCO (its conversion, image files linked)."""
    base = tmp_path_factory.mktemp("coco_toy")
    voc = base / "VOCdevkit"
    make_toy_voc(
        voc, num_train=5, num_val=0, num_test=4, image_size=(96, 128),
        classes=("circle", "square"), seed=3,
    )  # fmt: skip
    coco = {split: voc_to_coco(voc, base / "coco", split=split) for split in ("train", "test")}
    return {"voc": voc, "coco": coco, "base": base}


def _data(toy, fmt, split):
    if fmt == "voc":
        return ["--voc-root", str(toy["voc"]), "--split", split]
    c = toy["coco"][split]
    return ["--coco-json", str(c["json"]), "--images", str(c["images_dir"])]


def _train(toy, fmt, tmp_path):
    out = tmp_path / f"train_{fmt}"
    args = _data(toy, fmt, "train") + [
        "--output", str(out), "--cache-dir", str(tmp_path / f"cache_{fmt}"), "--device", "cpu",
        "--weights", "none",
    ]  # fmt: skip
    train_net.main(train_net.get_args_parser().parse_args(args + TINY))
    return out / "model.pt"


def _test(toy, fmt, model, out, data=None):
    args = (data or _data(toy, fmt, "test")) + [
        "--model", str(model), "--output", str(out), "--device", "cpu",
        "--cache-dir", str(out.parent / "test_cache"),
    ]  # fmt: skip
    return test_net.main(test_net.get_args_parser().parse_args(args))


def _assert_same(a, b, where="model"):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_voc_and_coco_formats_train_and_test_alike(toy, tmp_path):
    models = {fmt: _train(toy, fmt, tmp_path) for fmt in ("voc", "coco")}
    # The same model, bit for bit: same images, labels, proposals and seeds.
    _assert_same(load_file(models["voc"], what="model"), load_file(models["coco"], what="model"))

    m_voc = _test(toy, "voc", models["voc"], tmp_path / "test_voc")
    m_coco = _test(toy, "coco", models["coco"], tmp_path / "test_coco")
    assert m_voc["metric"] == m_coco["metric"] == "VOC07 11-point"
    assert m_voc["mAP"] == m_coco["mAP"] and m_voc["AP"] == m_coco["AP"]
    d_voc = load_file(tmp_path / "test_voc" / "detections.pt", what="detections")
    d_coco = load_file(tmp_path / "test_coco" / "detections.pt", what="detections")
    _assert_same(d_voc, d_coco, "detections")
    assert sum(len(d["scores"]) for d in d_voc.values()) > 0
    # A COCO set also gets the COCO metrics (a VOC one only with --coco).
    assert set(m_coco["coco"]) >= {"AP", "AP50", "AP75"} and "coco" not in m_voc


def test_coco_outputs_use_the_files_own_ids(toy, tmp_path):
    """Non-contiguous category ids and large image ids come back in coco_results.json."""
    from spp_detect.config import DetectorConfig, apply_overrides
    from spp_detect.modeling.build import build_detector

    src = json.loads(Path(toy["coco"]["test"]["json"]).read_text())
    cat_map = {c["id"]: 10 * c["id"] + 7 for c in src["categories"]}  # 17, 27
    img_map = {im["id"]: 1000 + 3 * im["id"] for im in src["images"]}
    for c in src["categories"]:
        c["id"] = cat_map[c["id"]]
    for im in src["images"]:
        im["id"] = img_map[im["id"]]
    for a in src["annotations"]:
        a["category_id"], a["image_id"] = cat_map[a["category_id"]], img_map[a["image_id"]]
    remapped = tmp_path / "instances_test.json"
    remapped.write_text(json.dumps(src))

    config = apply_overrides(DetectorConfig(), TINY + ["test.classifier=softmax"])
    torch.manual_seed(0)
    model = build_detector("spp", ["circle", "square"], config, pretrained=False).eval()
    model_path = model.save(tmp_path / "model.pt")
    images = ["--images", str(toy["coco"]["test"]["images_dir"])]
    out = tmp_path / "out"
    metrics = _test(toy, "coco", model_path, out, ["--coco-json", str(remapped)] + images)
    results = json.loads((out / "coco_results.json").read_text())
    gt = json.loads((out / "coco_gt.json").read_text())
    assert results, "an untrained softmax head still scores every window"
    assert {r["category_id"] for r in results} <= set(cat_map.values())
    assert {r["image_id"] for r in results} <= set(img_map.values())
    assert sorted(c["id"] for c in gt["categories"]) == sorted(cat_map.values())
    assert sorted(im["id"] for im in gt["images"]) == sorted(img_map.values())
    assert "coco" in metrics and "mAP" in metrics


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one dataset"),
        (["--voc-root", "V", "--coco-json", "a.json", "--images", "I"], "exactly one dataset"),
        (["--coco-json", "a.json"], "--images DIR is missing"),
        (["--images", "I"], "--coco-json FILE is missing"),
        (["--coco-json", "a.json", "--images", ".", "--split", "x"], "VOC arguments"),
    ],
)
def test_dataset_arguments_one_format(args, message, tmp_path):
    base = ["--model", str(tmp_path / "m.pt"), "--output", str(tmp_path / "o")]
    with pytest.raises(UserInputError, match=message):
        test_net.main(test_net.get_args_parser().parse_args(args + base))
    with pytest.raises(UserInputError, match=message):
        train_net.main(train_net.get_args_parser().parse_args(args + ["--output", "o"]))
