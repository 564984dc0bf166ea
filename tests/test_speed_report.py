"""tools/speed_report.py end to end on a tiny generated toy set: the JSON schema, the speed-up
computed from the JSON's own totals, the extrapolation flag, the files, the mAP path with model
files, and one-line user errors. No timing assertions (speed targets live in benchmarks)."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spp_detect.config import DetectorConfig, ModelConfig
from spp_detect.datasets.toy_voc import TOY_CLASSES, make_toy_voc
from spp_detect.benchmark.speed_report import randomize_heads
from spp_detect.modeling.build import build_detector

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "speed_report.py"

# Small everything: 64-96 px images, few windows, narrow fc layers, small scales.
FAST = [
    "--num-images", "2", "--backbone", "zf5", "--proposals", "50", "--rcnn-max-windows", "8",
    "--single-scale", "96", "--five-scales", "64", "80", "96", "112", "128", "--warmup", "1",
    "--weights", "none", "--threads", "1", "model.hidden=32",
]  # fmt: skip


def load_tool():
    spec = importlib.util.spec_from_file_location("speed_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "VOCdevkit"
    make_toy_voc(root, num_train=1, num_val=1, num_test=3, image_size=(64, 96), seed=3)
    return root


def run(tool, argv):
    return tool.main(tool.get_args_parser().parse_args(argv))


def test_report_schema_and_speedup(toy_root, tmp_path):
    tool = load_tool()
    out = tmp_path / "out"
    argv = ["--voc-root", str(toy_root), "--output", str(out), *FAST]
    argv[argv.index("--warmup") + 1] = "0"  # the warm-up path runs in the next test
    report = run(tool, argv)

    for name in ("speed.json", "speed.md", "speed.png"):
        assert (out / name).is_file(), name
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "speed.json").read_text())
    assert data == json.loads(json.dumps(report))  # the file is the returned report

    assert list(data["methods"]) == ["spp-1scale", "spp-1scale-svd", "spp-5scale", "rcnn"]
    # Fast R-CNN's ranks scaled to the width: 32 // 4 and 32 // 16.
    assert data["methods"]["spp-1scale-svd"]["svd_ranks"] == [8, 2]
    windows = data["settings"]["proposals"]["windows_per_image"]
    assert len(windows) == 2 and all(0 < n <= 50 for n in windows)
    for name, m in data["methods"].items():
        assert set(m) >= {"stages", "total", "total_with_proposals", "per_image",
                          "windows_per_image", "extrapolated"}  # fmt: skip
        expected = {"proposals", "preprocess", "conv", "pool", "fc", "classify", "bbox_reg", "nms"}
        if name == "rcnn":
            expected.add("crop_warp")
        assert set(m["stages"]) == expected
        assert all(v >= 0 for v in m["stages"].values())
        assert len(m["per_image"]) == 2
        # medians over images, recomputed from the per-image records
        totals = [r["total"] for r in m["per_image"]]
        for r in m["per_image"]:
            assert r["total"] == pytest.approx(
                sum(v for k, v in r["stages"].items() if k != "proposals")
            )
        assert m["total"] == pytest.approx(statistics.median(totals))
        assert m["total_with_proposals"] == pytest.approx(
            statistics.median(r["total"] + r["stages"]["proposals"] for r in m["per_image"])
        )
        assert m["stages"]["conv"] == pytest.approx(
            statistics.median(r["stages"]["conv"] for r in m["per_image"])
        )
        assert m["windows_per_image"] == windows
        assert "mAP" not in m  # no model: timing only
    # The proposals stage is one measurement per image, shared by every method.
    props = [[r["stages"]["proposals"] for r in m["per_image"]] for m in data["methods"].values()]
    assert props[0] == props[1] == props[2]

    rcnn = data["methods"]["rcnn"]
    assert rcnn["extrapolated"] == any(n > 8 for n in windows)
    for r, n in zip(rcnn["per_image"], windows):
        u = r["unique_windows"]
        assert u <= n and r["measured_windows"] == min(8, u)
        assert r["scale"] == pytest.approx(u / min(8, u))
        assert r["extrapolated_stages"] == ["conv", "crop_warp", "pool"]
        for stage in ("crop_warp", "conv", "pool"):  # the per-window network: scaled
            assert r["stages"][stage] == pytest.approx(r["measured_stages"][stage] * r["scale"])
        for stage in ("preprocess", "fc", "classify", "bbox_reg", "nms"):  # ran on all windows
            assert r["stages"][stage] == r["measured_stages"][stage]
    if rcnn["extrapolated"]:
        assert rcnn["measured_windows"] == 8
    for name in ("spp-1scale", "spp-5scale"):
        assert not data["methods"][name]["extrapolated"]
        assert data["speedup"][name] == pytest.approx(
            rcnn["total"] / data["methods"][name]["total"]
        )
    assert data["methods"]["spp-1scale"]["scales"] == [96]
    assert data["methods"]["spp-5scale"]["scales"] == [64, 80, 96, 112, 128]
    assert data["methods"]["rcnn"]["pooled_dim"] == 256 * 36
    assert data["methods"]["spp-1scale"]["pooled_dim"] == 256 * 50

    machine = data["machine"]
    assert set(machine) >= {"cpu", "cpu_count", "torch_threads", "torch", "gpu"}
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1
    assert data["settings"]["backbone"] == "zf5"
    assert data["settings"]["rcnn_max_windows"] == 8
    assert data["settings"]["warmup"] == 0

    md = (out / "speed.md").read_text()
    assert "102x" in md and "14.37" in md and "0.053" in md  # the paper's figures
    assert "47.0" in md and "0.32" in md  # Fast R-CNN's table
    if rcnn["extrapolated"]:
        assert "first 8 distinct windows" in md
    # the proposals were cached for the other tools
    assert len(list((out / "cache" / "proposals").glob("*.npz"))) == 2


def test_report_with_models_gives_map(toy_root, tmp_path):
    config = DetectorConfig(model=ModelConfig(backbone="zf5", hidden=32))
    torch.manual_seed(0)
    spp = randomize_heads(build_detector("spp", TOY_CLASSES, config, pretrained=False))
    spp_path = spp.save(tmp_path / "spp.pt")
    tool = load_tool()
    out = tmp_path / "out"
    argv = ["--voc-root", str(toy_root), "--output", str(out), "--model", str(spp_path), *FAST]
    argv[argv.index("--num-images") + 1] = "1"
    report = run(tool, argv + ["--methods", "spp-1scale", "rcnn"])
    m = report["methods"]["spp-1scale"]
    assert 0.0 <= m["mAP"] <= 1.0 and set(m["AP"]) == set(TOY_CLASSES)
    assert m["heads"] == "model"
    # R-CNN without a model file: fresh heads on the model's backbone, so no accuracy.
    assert report["methods"]["rcnn"]["heads"] == "random" and "mAP" not in report["methods"]["rcnn"]
    assert report["settings"]["model"] == str(spp_path)


def test_user_errors_one_line(tmp_path):
    tool = load_tool()
    with pytest.raises(ValueError, match="VOC root folder not found"):
        run(tool, ["--voc-root", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), *FAST])
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--voc-root", str(tmp_path / "nope"), "--output",
         str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "nope" in lines[-1]
    assert "Traceback" not in proc.stderr
