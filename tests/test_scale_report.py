"""tools/scale_report.py: generated sets of two tiny sizes, trained and tested in child
processes; per-stage time, peak RSS and disk, log-log fits and extrapolations, three outputs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from spp_detect.benchmark.scale import folder_bytes
from spp_detect.benchmark.scale_report import STAGES, TARGETS, fit_power_law
from spp_detect.errors import UserInputError

_spec = importlib.util.spec_from_file_location(
    "scale_report", Path(__file__).resolve().parents[1] / "tools" / "scale_report.py"
)
scale_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_report)

TINY = [
    "model.backbone=zf5",
    "model.scales=[64]",
    "model.hidden=16",
    "proposals.max_proposals=30",
    "finetune.iterations=4",
    "finetune.batch_size=16",
    "workers=1",
]


def test_power_law_fit_recovers_exponent_and_constant():
    fit = fit_power_law([10, 100, 1000], [3 * 10**0.5, 3 * 100**0.5, 3 * 1000**0.5])
    assert fit["slope"] == pytest.approx(0.5) and fit["a"] == pytest.approx(3.0)
    assert fit_power_law([10, 10], [1.0, 2.0]) is None  # one N only
    assert fit_power_law([10, 20], [0.0, 2.0]) is None  # log of 0 left out


def test_folder_bytes_counts_nested_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x").write_bytes(b"123")
    (tmp_path / "a" / "b" / "y").write_bytes(b"12345")
    assert folder_bytes(tmp_path / "a") == 8
    assert folder_bytes(tmp_path / "a" / "x") == 3 and folder_bytes(tmp_path / "none") == 0


def test_sizes_must_differ(tmp_path):
    args = scale_report.get_args_parser().parse_args(["--sizes", "4", "4", "--output", "o"])
    with pytest.raises(UserInputError, match="--sizes"):
        scale_report.main(args)


@pytest.mark.slow
def test_scale_report_on_two_tiny_sizes(tmp_path):
    out = tmp_path / "report"
    argv = ["--sizes", "4", "2", "--output", str(out), "--min-size", "64", "--max-size", "96"]
    args = scale_report.get_args_parser().parse_args(argv + ["--weights", "none", *TINY])
    report = scale_report.main(args)
    assert (out / "scale.md").is_file() and (out / "scale.png").stat().st_size > 1000
    saved = json.loads((out / "scale.json").read_text())
    assert saved["sizes"] == json.loads(json.dumps(report["sizes"]))
    small, large = report["sizes"]  # sorted by N
    assert (small["n_train"], large["n_train"]) == (2, 4)
    for size in report["sizes"]:
        assert set(size["seconds"]) == set(STAGES)
        assert all(size["seconds"][s] >= 0 for s in STAGES) and size["seconds"]["test"] > 0
        # A process of torch holds well over 100 MB; per-stage peaks within the exact peak
        # of the training process (plus sampler and proposal-worker slack).
        assert size["train_max_rss_bytes"] > 100e6
        for s in STAGES[:-1]:
            assert 50e6 < size["peak_rss_bytes"][s] < 1.5 * size["train_max_rss_bytes"]
    # Conv maps of each image and its mirror are on disk: twice the images, twice the bytes
    # (image sizes vary between 64 and 96 px, hence the tolerance).
    ratio = large["disk_bytes"]["conv_cache"] / small["disk_bytes"]["conv_cache"]
    assert 1.3 < ratio < 3.0
    slope = report["fits"]["disk_bytes"]["conv_cache"]["slope"]
    assert slope == pytest.approx(math.log(ratio) / math.log(2))
    # Extrapolation: the largest run's per-image rate times VOC07's images.
    voc07 = report["extrapolated"]["VOC07"]
    n_train, n_test = TARGETS["VOC07"]
    assert voc07["disk_bytes"]["conv_cache"] == pytest.approx(
        large["disk_bytes"]["conv_cache"] * n_train / 4
    )
    assert voc07["seconds"]["test"] == pytest.approx(large["seconds"]["test"] * n_test / 4)
    assert isinstance(report["peak_rss_flat"], bool)
    md = (out / "scale.md").read_text()
    assert "VOC07" in md and "COCO train2017" in md and "tools/scale_report.py" in md
    assert ("**flat**" in md) == report["peak_rss_flat"]
    assert report["sizes_missing"] == []
    # A rerun with the same settings reuses both sizes (n<N>/measured.json): same figures, and
    # nothing trained again.
    models = {n: (out / f"n{n}" / "train" / "model.pt").stat().st_mtime_ns for n in (2, 4)}
    again = scale_report.main(args)
    assert json.loads(json.dumps(again["sizes"])) == saved["sizes"]
    assert {n: (out / f"n{n}" / "train" / "model.pt").stat().st_mtime_ns for n in (2, 4)} == models
