"""tools/scale_report.py: generated sets of two tiny sizes, trained and tested in child
processes; per-stage time, peak RSS and disk, log-log fits and extrapolations, three outputs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from spp_detect.benchmark.resources import RSSSampler, folder_bytes
from spp_detect.benchmark.scale_report import (
    STAGES,
    TARGETS,
    analyse_sizes,
    cache_bytes,
    fit_power_law,
)
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
    # What the SVM/regression pass kept: counts of the run, caps and sizes of its model.
    caches = large["caches"]
    assert caches["classes"] == 6 and caches["objects"] > 0
    assert caches["negative_bytes"] == 16 * 4  # model.hidden=16, float32
    assert caches["bbox_sample_bytes"] % 50 == 0  # 50 bins x C channels, float16
    assert 0 < caches["bbox_samples"] <= caches["classes"] * caches["bbox_cap_per_class"]
    assert caches["bbox_in_memory"] is False  # spilled beside the pass's checkpoint
    assert caches["positives_cap_per_class"] == 10000 and caches["positives"] == caches["objects"]
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


def _size(n, peaks, caches=None):
    """A measured size as ``scale.collect_size`` returns it, with the given per-stage peaks."""
    return {
        "n_train": n, "n_test": n,
        "seconds": {s: float(n) for s in STAGES},
        "disk_bytes": {s: float(n) for s in STAGES},
        "peak_rss_bytes": {s: float(peaks[s]) for s in STAGES},
        "caches": caches,
    }  # fmt: skip


def test_peak_rss_at_a_dataset_adds_the_caps_that_are_not_yet_full():
    caches = {
        "classes": 6, "objects": 2500, "negatives": 3000, "negatives_cap_per_class": 10000,
        "negative_bytes": 4096, "bbox_samples": 30000, "bbox_cap_per_class": 5000,
        "bbox_sample_bytes": 11200,
    }  # fmt: skip
    held = (3000 + 2500) * 4096 + 30000 * 11200
    assert cache_bytes(caches) == held
    # VOC07: 20 classes with full caps, 12,608 objects (a hand count of the same formula).
    bound = (20 * 10000 + 12608) * 4096 + 20 * 5000 * 11200
    assert cache_bytes(caches, 20, 12608) == bound
    assert cache_bytes(dict(caches, bbox_cap_per_class=0), 20, 12608) is None  # no cap: no bound
    # Spilled regression samples (sample_store) are on disk: only the SVM caches count.
    spilled = dict(caches, bbox_in_memory=False, bbox_cap_per_class=0)
    assert cache_bytes(spilled) == (3000 + 2500) * 4096
    assert cache_bytes(spilled, 20, 12608) == (20 * 10000 + 12608) * 4096
    # Positives capped per class (svm.max_positives): COCO's 860,001 objects keep at most
    # 80 x 10,000; VOC07's 12,608 stay below 20 x 10,000.
    capped = dict(spilled, positives_cap_per_class=10000, positives=2400)
    assert cache_bytes(capped) == (3000 + 2400) * 4096
    assert cache_bytes(capped, 80, 860001) == (80 * 10000 + 80 * 10000) * 4096
    assert cache_bytes(capped, 20, 12608) == (20 * 10000 + 12608) * 4096
    small = {s: 1e9 for s in STAGES}
    grows = dict(small, proposals=2e9, svm=1.5e9)  # proposals doubles from N=300 to 1,000
    sizes = [_size(100, small), _size(300, small), _size(1000, grows, caches)]
    report = analyse_sizes(sizes)
    voc07 = report["extrapolated"]["VOC07"]
    assert voc07["peak_rss_bytes"]["svm"] == pytest.approx(1.5e9 + bound - held)
    assert voc07["peak_rss_basis"]["svm"] == "caches"
    assert voc07["peak_rss_bytes"]["test"] == 1e9 and voc07["peak_rss_basis"]["test"] == "flat"
    assert voc07["peak_rss_basis"]["proposals"] == "power law"
    assert voc07["peak_rss_bytes"]["proposals"] == pytest.approx(
        report["fits"]["peak_rss_bytes"]["proposals"]["a"]
        * 5011 ** report["fits"]["peak_rss_bytes"]["proposals"]["slope"]
    )
    # Flat is judged between the two largest sizes: svm's 1.5x between 300 and 1,000 is not.
    assert report["peak_rss_last_slopes"]["svm"] == pytest.approx(
        math.log(1.5) / math.log(1000 / 300)
    )
    assert not report["peak_rss_flat"]
    assert analyse_sizes(sizes[:2])["peak_rss_flat"]


def test_stage_peaks_follow_the_logged_stage_intervals():
    from spp_detect.benchmark.scale import _stage_peaks

    rss = RSSSampler()
    # One sample per second; RSS = 100 * second + a spike of 5,000 at t=7 (fine-tuning).
    rss.samples = [(float(t), 100 * t + (5000 if t == 7 else 0)) for t in range(0, 21)]
    log = {
        "seconds": {"proposals": 3.0, "features": 3.0, "finetune": 4.0, "svm_bbox": 6.0},
        "classifiers": {"bbox_reg_seconds": 1.0},
        "clock": {"proposals": [1, 4], "features": [4, 7.5], "finetune": [7.5, 11],
                  "svm_bbox": [12, 18]},
    }  # fmt: skip
    peaks = _stage_peaks(rss, log, 0.0, 20.0)
    assert peaks["proposals"] == 400  # from the process start to the end of proposals
    assert peaks["conv_cache"] == 5700  # the spike at 7 s lies in [4, 7.5]
    assert peaks["finetune"] == 1100
    # SVMs and regression share one pass: its peak, up to the end of training (20 s).
    assert peaks["svm"] == peaks["bbox_reg"] == 2000
    # Without intervals (older logs): stages laid end to end back from the end of training.
    del log["clock"]
    old = _stage_peaks(rss, log, 0.0, 20.0)
    assert old["bbox_reg"] == 2000 and old["svm"] == 1900  # [19, 20] and [14, 19]
    timeline = rss.timeline(0.0, step=5.0)
    assert timeline[1] == [5.0, 5700] and len(timeline) == 5
