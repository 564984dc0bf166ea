"""Several processes through torchrun (CPU, gloo, 2 processes): the same detections and metrics
as one process, shards without duplicates, and a failing rank ends every rank with its error.

The runs are subprocesses with one thread each (``OMP_NUM_THREADS=1``, as torchrun sets it), so
that one process and two compute every image with the same kernels, bit for bit.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spp_detect import distributed
from spp_detect.config import DetectorConfig, apply_overrides
from spp_detect.datasets.voc import VOCDataset
from spp_detect.modeling.build import build_detector
from spp_detect.proposals.files import save_proposals_file
from spp_detect.serialization import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_toy_voc  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    env[distributed.TIMEOUT_ENV] = "120"
    return env


def _run(cmd, timeout=240):
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    return proc


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# -- shards --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 10, 11, 12])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_shards_are_contiguous_balanced_and_cover_once(n, k):
    shards = [list(distributed.shard_range(n, k, i)) for i in range(k)]
    # Concatenated in rank order: every index once, in order (no padding duplicates).
    assert sum(shards, []) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the longer shards first, as InferenceSampler


def test_one_process_has_no_group():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.shard(list("abc")) == list("abc")
    assert distributed.gather({"x": 1}) == [{"x": 1}]
    distributed.barrier()
    with distributed.process_group():  # no WORLD_SIZE: nothing happens
        assert not distributed.is_distributed()
    with pytest.raises(ValueError, match="boom"), distributed.all_ranks_ok("step"):
        raise ValueError("boom")


# -- a failing rank -------------------------------------------------------------------------------

_FAILING = """
import os, sys, time
from spp_detect import distributed
from spp_detect.cli_common import run_user_command
import argparse

def main(args):
    with distributed.all_ranks_ok("step one"):
        if distributed.rank() == 1:
            raise ValueError("boom on purpose")
    print("not reached", flush=True)

sys.exit(run_user_command(main, argparse.Namespace(device="cpu")))
"""


def test_a_failing_rank_fails_every_rank_with_its_error(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(_FAILING))
    proc = _run(TORCHRUN + ["2", str(script)], timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "not reached" not in out
    assert "ValueError: boom on purpose" in out  # rank 1: its own traceback
    # rank 0: one line naming the rank and the error
    assert "error: step one: rank 1 of 2 failed: ValueError: boom on purpose" in out


# -- test_net and detect: 2 processes == 1 --------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """12 small toy test images, a tiny untrained SPP-net on their classes (softmax) and a
    proposals file of random windows."""
    base = tmp_path_factory.mktemp("dist")
    root = base / "VOCdevkit"
    args = ["--output", str(root), "--num-train", "1", "--num-val", "1", "--num-test", "12"]
    args += ["--min-size", "80", "--max-size", "112"]
    make_toy_voc.main(make_toy_voc.get_args_parser().parse_args(args))
    dataset = VOCDataset(root, "2007", "test")
    config = apply_overrides(
        DetectorConfig(),
        [
            "model.backbone=zf5",
            "model.hidden=32",
            "model.scales=[64]",
            "test.classifier=softmax",
            "proposals.max_proposals=12",
        ],
    )
    torch.manual_seed(0)
    model = build_detector("spp", dataset.class_names, config, pretrained=False).eval()
    model_path = model.save(base / "model.pt")
    rng = np.random.default_rng(0)
    boxes = {}
    for path in sorted((root / "VOC2007" / "JPEGImages").iterdir()):
        width, height = Image.open(path).size
        xy = rng.uniform(0, [width - 16, height - 16], size=(20, 2))
        wh = rng.uniform(8, 48, size=(20, 2))
        b = np.concatenate([xy, xy + wh], 1)
        boxes[path.stem] = np.minimum(b, [width, height] * 2).astype(np.float32)
    props = save_proposals_file(base / "proposals.npz", boxes)
    return {"root": root, "model": model_path, "proposals": props, "base": base}


def _test_net_args(toy, out, cache):
    return [
        "tools/test_net.py", "--voc-root", str(toy["root"]), "--split", "test",
        "--model", str(toy["model"]), "--output", str(out), "--cache-dir", str(cache),
        "--device", "cpu",
    ]  # fmt: skip


def test_test_net_under_torchrun_equals_one_process(toy, tmp_path):
    # Selective search in both: under torchrun each rank fills its shard of the cache.
    _ok(_run([sys.executable] + _test_net_args(toy, tmp_path / "one", tmp_path / "c1")))
    _ok(_run(TORCHRUN + ["2"] + _test_net_args(toy, tmp_path / "two", tmp_path / "c2")))

    one = load_file(tmp_path / "one" / "detections.pt", what="detections")
    two = load_file(tmp_path / "two" / "detections.pt", what="detections")
    assert list(one) == list(two) and len(one) == 12
    assert sum(len(d["scores"]) for d in one.values()) > 0
    for image_id in one:
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(one[image_id][key], two[image_id][key]), (image_id, key)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m1["mAP"], m1["AP"]) == (m2["mAP"], m2["AP"])
    assert (m1["processes"], m2["processes"]) == (1, 2)
    # Every image's proposals were computed once, by one of the ranks, into the shared cache.
    files = lambda c: sorted(p.name for p in (c / "proposals").rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "c1") == files(tmp_path / "c2")
    assert not (tmp_path / "two" / "partial").exists()  # per-rank parts removed at the end


def _detect_args(toy, out):
    images = toy["root"] / "VOC2007" / "JPEGImages"
    return [
        "-m", "spp_detect.cli", "detect", "--model", str(toy["model"]), "--input", str(images),
        "--output", str(out), "--proposals-file", str(toy["proposals"]), "--score-thresh", "0",
        "--no-progress", "--no-save-images",
    ]  # fmt: skip


def test_detect_under_torchrun_equals_one_process(toy, tmp_path):
    _ok(_run([sys.executable] + _detect_args(toy, tmp_path / "one")))
    _ok(_run(TORCHRUN + ["2"] + _detect_args(toy, tmp_path / "two")))
    one = json.loads((tmp_path / "one" / "detections.json").read_text())
    two = json.loads((tmp_path / "two" / "detections.json").read_text())
    assert len(one["images"]) == 14  # train, val and test images: every file of the folder
    assert one["images"] == two["images"]
    assert sum(len(e["detections"]) for e in one["images"]) > 0
    s1, s2 = one["summary"], two["summary"]
    assert (s1["processed"], s1["detections"]) == (s2["processed"], s2["detections"])
    assert (s1["processes"], s2["processes"]) == (1, 2)
    for name in ("detections_coco.json", "coco_images.json", "detections.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not list((tmp_path / "two").glob("detections.rank*.jsonl"))


_TINY_TRAIN = [
    "--weights", "none", "model.backbone=zf5", "model.scales=[64]", "model.hidden=32",
    "proposals.max_proposals=12", "proposals.min_size=8", "finetune.iterations=10",
    "finetune.batch_size=16",
]  # fmt: skip


@pytest.mark.slow
def test_train_net_under_torchrun_fills_caches_by_rank_and_equals_one_process(toy, tmp_path):
    def args(name):
        return [
            "tools/train_net.py", "--voc-root", str(toy["root"]), "--split", "test",
            "--output", str(tmp_path / name), "--cache-dir", str(tmp_path / f"cache_{name}"),
            "--device", "cpu",
        ] + _TINY_TRAIN  # fmt: skip

    _ok(_run([sys.executable] + args("one")))
    _ok(_run(TORCHRUN + ["2"] + args("two")))
    log = json.loads((tmp_path / "two" / "train_log.json").read_text())
    # The ranks filled every entry (12 images and their mirrors); rank 0 computed none.
    assert log["feature_cache"]["images"] == 24 and log["feature_cache"]["computed"] == 0
    one = load_file(tmp_path / "one" / "model.pt", what="model")
    two = load_file(tmp_path / "two" / "model.pt", what="model")
    assert one.keys() == two.keys() and one["class_names"] == two["class_names"]
    for key in ("head", "svms", "bbox_regressor"):
        for name, tensor in one[key].items():
            assert torch.equal(tensor, two[key][name]), (key, name)
