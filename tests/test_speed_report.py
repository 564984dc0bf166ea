"""tools/speed_report.py end to end on a tiny generated toy set: the JSON schema, the speed-ups
and the markdown table recomputed from the per-image stage times, the extrapolation flag, the
files, the mAP equal to ``test_detector``'s on the same images, and one-line user errors. No
timing assertions (speed targets live in benchmarks)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spp_detect.config import DetectorConfig, ModelConfig
from spp_detect.datasets.toy_shapes import TOY_CLASSES
from spp_detect.datasets.toy_voc import make_toy_voc
from spp_detect.datasets.voc import VOCDataset
from spp_detect.inference import dataset as inference  # not `test_detector`: pytest collects it
from spp_detect.modeling import window_pool_native
from spp_detect.modeling.build import build_detector
from spp_detect.proposals.settings import ProposalSettings

from bench_helpers import load_tool as load_bench_tool, random_heads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "speed_report.py"

# Small everything: 64-96 px images, few windows, narrow fc layers, small scales.
FAST = [
    "--num-images", "2", "--backbone", "zf5", "--proposals", "50", "--rcnn-max-windows", "8",
    "--single-scale", "96", "--five-scales", "64", "80", "96", "112", "128", "--warmup", "1",
    "--weights", "none", "--threads", "1", "model.hidden=32",
]  # fmt: skip


def load_tool():
    return load_bench_tool(TOOL, "speed_report")


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "VOCdevkit"
    make_toy_voc(root, num_train=1, num_val=1, num_test=3, image_size=(64, 96), seed=3)
    return root


def run(tool, argv):
    return tool.main(tool.get_args_parser().parse_args(argv))


def _median_total(per_image, with_proposals=False):
    """A method's median seconds per image, recomputed from its per-image stage times."""
    return statistics.median(
        sum(v for k, v in r["stages"].items() if with_proposals or k != "proposals")
        for r in per_image
    )


def _measured_rows(md):
    """The markdown's measured table as ``{method: {column: cell}}`` (extrapolation mark cut)."""
    lines = md.split("## Measured: median seconds per image", 1)[1].splitlines()
    table = [ln for ln in lines[: next(i for i, ln in enumerate(lines) if "Where" in ln)]
             if ln.startswith("|")]  # fmt: skip
    head = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {}
    for ln in table[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0].removesuffix(" *")] = dict(zip(head, cells))
    return rows


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
    # which pooling ran: the compiled loop where it is built and on, else the tensor method
    pooling = "compiled" if window_pool_native.native_pool_available() else "tensor ops"
    assert data["machine"]["window_pooling"] == pooling
    assert f"CPU window pooling: {pooling}." in (out / "speed.md").read_text()

    methods = data["methods"]
    assert list(methods) == ["spp-1scale", "spp-1scale-svd", "spp-5scale", "rcnn"]
    # Fast R-CNN's ranks scaled to the width: 32 // 4 and 32 // 16.
    assert methods["spp-1scale-svd"]["svd_ranks"] == [8, 2]
    assert "svd_ranks" not in methods["spp-1scale"]  # the variants are copies, not the base
    # --proposals 50: the command line's ProposalSettings, recorded in full.
    props = data["settings"]["proposals"]
    assert {k: props[k] for k in ProposalSettings().to_dict()} == ProposalSettings(
        max_proposals=50
    ).to_dict()
    windows = props["windows_per_image"]
    assert len(windows) == 2 and all(0 < n <= 50 for n in windows)
    for name, m in methods.items():
        expected = {"proposals", "preprocess", "conv", "pool", "fc", "classify", "bbox_reg", "nms"}
        if name == "rcnn":
            expected.add("crop_warp")
        assert set(m["stages"]) == expected
        assert all(v >= 0 for v in m["stages"].values())
        assert [r["image_id"] for r in m["per_image"]] == data["settings"]["image_ids"]
        assert m["windows_per_image"] == windows
        # every summary figure is the median over images of the per-image stage times
        for r in m["per_image"]:
            assert r["total"] == pytest.approx(
                sum(v for k, v in r["stages"].items() if k != "proposals")
            )
        assert m["total"] == pytest.approx(_median_total(m["per_image"]))
        assert m["total_with_proposals"] == pytest.approx(_median_total(m["per_image"], True))
        for stage in expected:
            assert m["stages"][stage] == pytest.approx(
                statistics.median(r["stages"][stage] for r in m["per_image"])
            )
        assert m["heads"] == "untrained" and "mAP" not in m  # no model: timing only
    # The proposals stage is one measurement per image, shared by every method.
    ss = [[r["stages"]["proposals"] for r in m["per_image"]] for m in methods.values()]
    assert ss[0] == ss[1] == ss[2] == ss[3]

    # Speed-ups: R-CNN's median total over each method's, from the per-image stage times.
    rcnn_total = _median_total(methods["rcnn"]["per_image"])
    rcnn_with = _median_total(methods["rcnn"]["per_image"], True)
    assert set(data["speedup"]) == set(data["speedup_with_proposals"]) == set(methods) - {"rcnn"}
    for name in data["speedup"]:
        per_image = methods[name]["per_image"]
        assert data["speedup"][name] == pytest.approx(rcnn_total / _median_total(per_image))
        assert data["speedup_with_proposals"][name] == pytest.approx(
            rcnn_with / _median_total(per_image, True)
        )

    # The markdown table shows those numbers.
    rows = _measured_rows((out / "speed.md").read_text())
    assert set(rows) == set(methods)
    for name, m in methods.items():
        row = rows[name]
        for column, value in (("total (no proposals)", m["total"]), ("conv", m["stages"]["conv"]),
                              ("total + proposals", m["total_with_proposals"])):  # fmt: skip
            assert float(row[column]) == pytest.approx(value, rel=0.01, abs=1e-3), (name, column)
        ratio = float(row["R-CNN / method"].removesuffix("x"))
        expected = 1.0 if name == "rcnn" else data["speedup"][name]
        assert ratio == pytest.approx(expected, abs=0.051), name
        assert row["mAP (%)"] == "-"

    rcnn = methods["rcnn"]
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
        assert "first 8 distinct windows" in (out / "speed.md").read_text()
    for name in ("spp-1scale", "spp-1scale-svd", "spp-5scale"):
        assert not methods[name]["extrapolated"]
    assert methods["spp-1scale"]["scales"] == [96]
    assert methods["spp-1scale-svd"]["scales"] == [96]
    assert methods["spp-5scale"]["scales"] == [64, 80, 96, 112, 128]
    # R-CNN pools each warped window's conv5 with SPP-net's pyramid: one head shape for both.
    assert methods["rcnn"]["pooled_dim"] == methods["spp-1scale"]["pooled_dim"] == 256 * 50

    machine = data["machine"]
    assert set(machine) >= {"cpu", "cpu_count", "torch_threads", "torch", "gpu"}
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1
    assert data["settings"]["backbone"] == "zf5"
    assert data["settings"]["rcnn_max_windows"] == 8
    assert data["settings"]["warmup"] == 0
    # the proposals were cached for the other tools
    assert len(list((out / "cache" / "proposals").glob("*.npz"))) == 2


def test_report_with_models_gives_map(toy_root, tmp_path):
    """The reported mAP is the model's VOC AP on the timed images: equal to ``test_detector``'s
    on the same split, with the proposals the model was trained with (no --proposals)."""
    proposals = ProposalSettings(max_proposals=40)
    config = DetectorConfig(model=ModelConfig(backbone="zf5", hidden=32), proposals=proposals)
    torch.manual_seed(0)
    spp = build_detector("spp", TOY_CLASSES, config, pretrained=False)
    # A positive SVM bias keeps the windows, so the AP is not trivially 0.
    spp_path = random_heads(spp, seed=1, svm_bias=1.0, svm_std=0.1).save(tmp_path / "spp.pt")
    tool = load_tool()
    out = tmp_path / "out"
    argv = ["--voc-root", str(toy_root), "--output", str(out), "--model", str(spp_path), *FAST]
    i = argv.index("--proposals")
    del argv[i : i + 2]
    argv[argv.index("--num-images") + 1] = "3"  # the whole test split
    argv[argv.index("--warmup") + 1] = "0"
    methods = ["spp-1scale", "spp-1scale-svd", "spp-1scale-fast", "rcnn"]
    report = run(tool, argv + ["--methods", *methods])
    settings = report["settings"]
    assert {k: settings["proposals"][k] for k in proposals.to_dict()} == proposals.to_dict()

    dataset = VOCDataset(toy_root, year="2007", split="test", class_names=TOY_CLASSES)
    assert settings["image_ids"] == [r.image_id for r in dataset.records]
    svd = {"svd_fc6": 8, "svd_fc7": 2}
    fast = {"fast_head": "int8map", "fast_conv": "bf16"}  # variants.FAST_OPTIONS
    for name, options in (("spp-1scale", {}), ("spp-1scale-svd", svd), ("spp-1scale-fast", fast)):
        m = report["methods"][name]
        reference = inference.test_detector(
            spp_path, dataset, tmp_path / f"ref-{name}", device="cpu", scales=[96],
            overrides=options,
        )  # fmt: skip
        assert reference["mAP"] > 0
        assert m["heads"] == "model"
        assert m["mAP"] == pytest.approx(reference["mAP"], abs=1e-9), name
        assert m["AP"] == pytest.approx(reference["AP"], abs=1e-9, nan_ok=True)
        assert m["metric"] == reference["metric"]
    # Each method's test-time options are reported; R-CNN gets spp-1scale-fast's (fair ratio).
    options = {m: report["methods"][m]["test_options"] for m in methods}
    # (This model has no fc response statistics, so its fast head is not low-rank, and
    # R-CNN's is not either.)
    off = {"svd_ranks": [0, 0], "svd_method": "weights", "fast_head": "off", "fast_conv": "off"}
    assert options["spp-1scale"] == off
    want = {"svd_ranks": [0, 0], "svd_method": "weights", "fast_head": "int8map",
            "fast_conv": "bf16"}  # fmt: skip
    assert options["spp-1scale-fast"] == want and options["rcnn"] == want
    md = (out / "speed.md").read_text()
    assert "- spp-1scale: float32 as trained" not in md  # options are footnotes, not a list
    assert "spp-1scale: float32 as trained." in md
    assert (
        "rcnn: fc6's first map in int8 on int8 pooled features, the rest of fc6/fc7 in bf16, "
        "conv in bf16." in md
    )
    assert "spp-1scale-svd: fc6/fc7 truncated SVD ranks 8/2." in md
    # R-CNN without a model file: untrained heads on the model's backbone, so no accuracy.
    assert report["methods"]["rcnn"]["heads"] == "untrained"
    assert "mAP" not in report["methods"]["rcnn"]
    assert settings["model"] == str(spp_path)


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
