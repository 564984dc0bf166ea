"""Several processes through torchrun (CPU, gloo, 2 processes): the same detections and metrics
as one process, shards without duplicates, and a failing rank ends every rank with its error;
training: SVMs and regressors equal to one process's given the same head, DDP fine-tuning equal
to the mean of the ranks' losses and within a stated tolerance of one process, resumable.

The runs are subprocesses with one thread each (``OMP_NUM_THREADS=1``, as torchrun sets it), so
that one process and two compute every image with the same kernels, bit for bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spp_detect import distributed
from spp_detect.config import DetectorConfig, apply_overrides, load_config
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


def _update(head_state, init):
    """The change that fine-tuning made to the head's parameters, flattened (float64)."""
    return torch.cat([(head_state[n].double() - p.double()).flatten() for n, p in init])


@pytest.mark.slow
def test_train_net_under_torchrun_divides_training_and_matches_one_process(toy, tmp_path):
    def args(name, cache):
        return [
            "tools/train_net.py", "--voc-root", str(toy["root"]), "--split", "test",
            "--output", str(tmp_path / name), "--cache-dir", str(tmp_path / f"cache_{cache}"),
            "--device", "cpu",
        ] + _TINY_TRAIN  # fmt: skip

    _ok(_run([sys.executable] + args("one", "one")))
    _ok(_run(TORCHRUN + ["2"] + args("two", "two")))
    log = json.loads((tmp_path / "two" / "train_log.json").read_text())
    # The ranks filled every entry (12 images and their mirrors) before training together.
    assert log["feature_cache"]["images"] == 24 and log["feature_cache"]["computed"] == 0
    assert log["processes"] == 2 and len(log["finetune"]) == 10
    one = load_file(tmp_path / "one" / "model.pt", what="model")
    two = load_file(tmp_path / "two" / "model.pt", what="model")
    assert one.keys() == two.keys() and one["class_names"] == two["class_names"]

    # (b) DDP fine-tuning: each rank draws its own windows (rank 0 one process's), so the
    # head differs from one process's, but its update (head - initial head) points the same
    # way. Measured: cosine 0.980, |update_2 - update_1| / |update_1| = 0.201; the bounds
    # are 0.9 and 0.4 (a doubled step, gradients summed instead of averaged, gives ~1).
    config = load_config(None, [o for o in _TINY_TRAIN if "=" in o])
    torch.manual_seed(config.finetune.seed)  # train_detector's initial head
    init = build_detector("spp", one["class_names"], config, pretrained=False)
    init = [(n, p.detach()) for n, p in init.head.named_parameters()]
    d1, d2 = _update(one["head"], init), _update(two["head"], init)
    cosine = float(d1 @ d2 / (d1.norm() * d2.norm()))
    distance = float((d2 - d1).norm() / d1.norm())
    assert not torch.equal(d1, d2)  # rank 1's mini-batches made a difference
    assert cosine >= 0.9 and distance <= 0.4, (cosine, distance)

    # (a) Given the same fine-tuned head (one process's finetune.pt, reused by rank 0 and
    # copied to rank 1), the SVMs and regressors trained by class on 2 ranks are exactly one
    # process's.
    (tmp_path / "three").mkdir()
    shutil.copy(tmp_path / "one" / "finetune.pt", tmp_path / "three" / "finetune.pt")
    _ok(_run(TORCHRUN + ["2"] + args("three", "two")))
    three = load_file(tmp_path / "three" / "model.pt", what="model")
    for key in ("head", "svms", "bbox_regressor"):
        for name, tensor in one[key].items():
            assert torch.equal(tensor, three[key][name]), (key, name)
    assert bool(one["svms"]["trained"].any()) and bool(one["bbox_regressor"]["trained"].any())
    assert not list((tmp_path / "three").glob("svm_bbox*.ckpt.pt"))  # removed when done


# -- fine-tuning with DistributedDataParallel: what it computes, and kill -9 ---------------------

_FT_SETUP = """
import os
import sys
import time
import torch
from spp_detect.config import FinetuneConfig
from spp_detect.datasets.records import ImageRecord
from spp_detect.modeling.head import FCHead


class Source:
    # Deterministic features: classes are separable, with noise fixed per window.
    def __init__(self, delay=0.0):
        self.delay = delay

    def rows(self, i, idx, rng=None):
        time.sleep(self.delay)
        g = torch.Generator().manual_seed(1000 * i + 7)
        noise = torch.randn(200, 32, generator=g)[idx]
        labels = IMAGES[i].labels[idx]
        return torch.nn.functional.one_hot(labels.clamp(min=0), 32).float() * 3 + noise


class Image:
    def __init__(self, i):
        g = torch.Generator().manual_seed(i)
        self.labels = torch.randint(-1, 4, (200,), generator=g)
        self.windows = torch.zeros(200, 4)
        self.record = ImageRecord(str(i), "x.jpg", 10, 10)


IMAGES = [Image(i) for i in range(12)]
CFG = FinetuneConfig(iterations=60, lr=0.01, batch_size=32, pool_batches=3, step_fraction=0.5)


class Det:
    def __init__(self):
        torch.manual_seed(0)
        self.head = FCHead(32, 3, hidden=16, dropout=0.5)
        self.device = torch.device("cpu")
"""

_FT_MAIN = """
from spp_detect import distributed
from spp_detect.serialization import save_file
from spp_detect.training.finetune import finetune_head
from spp_detect.training.finetune_checkpoint import FinetuneCheckpoint

out, ckpt_path, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
with distributed.process_group("cpu"):
    with open(f"{out}.pid{distributed.rank()}", "w") as f:
        f.write(str(os.getpid()))
    det = Det()
    log = finetune_head(
        det, Source(delay), IMAGES, CFG, checkpoint=FinetuneCheckpoint(ckpt_path, "k", 0.0)
    )
    heads = distributed.gather(det.head.state_dict())
    if distributed.rank() == 0:
        save_file({"heads": heads, "log": log}, out)
"""


def _simulated_ddp(world=2):
    """What DDP on ``world`` ranks must compute, in one process: each step, the mean of every
    rank's loss on its own mini-batch, rank r drawing windows and dropout masks from the seed
    ``rank_seed(seed, r)`` (rank 0: the one-process seed and RNG stream)."""
    from spp_detect.training.finetune import WindowPool, _set_input_scale
    from spp_detect.training.finetune_checkpoint import rank_seed

    ns = {}
    exec(_FT_SETUP, ns)  # noqa: S102 - the same code runs under torchrun
    cfg, images = ns["CFG"], ns["IMAGES"]
    head = ns["Det"]().head
    dropout_rng, batches = [torch.get_rng_state()], []
    for r in range(world):
        seed = rank_seed(cfg.seed, r)
        if r:
            torch.manual_seed(seed)
            dropout_rng.append(torch.get_rng_state())
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        batches.append(WindowPool(images, ns["Source"](), cfg, rng, gen).batches(cfg.pool_batches))
    _set_input_scale(head, ns["Source"](), images)
    opt = torch.optim.SGD(
        head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    step = int(cfg.iterations * cfg.step_fraction)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [step], gamma=cfg.lr_step_factor)
    head.train()
    for _ in range(cfg.iterations):
        loss = 0.0
        for r in range(world):
            x, y = next(batches[r])
            torch.set_rng_state(dropout_rng[r])
            loss = loss + torch.nn.functional.cross_entropy(head(x)[1], y) / world
            dropout_rng[r] = torch.get_rng_state()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.state_dict()


def _finetune_under_torchrun(tmp_path, name, ckpt, delay=0.0, background=False):
    script = tmp_path / "ft.py"
    script.write_text(_FT_SETUP + _FT_MAIN)
    cmd = TORCHRUN + ["2", str(script), str(tmp_path / name), str(ckpt), str(delay)]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True)
    _ok(_run(cmd, timeout=180))
    return load_file(tmp_path / name, what="result")


def test_ddp_finetuning_equals_mean_of_rank_losses_and_resumes_after_kill(tmp_path):
    from spp_detect.training.finetune_checkpoint import FinetuneCheckpoint

    ckpt = tmp_path / "ft.ckpt.pt"
    ref = _finetune_under_torchrun(tmp_path, "ref.pt", tmp_path / "unused.ckpt.pt")
    rank0, rank1 = ref["heads"]
    for name, value in _simulated_ddp().items():
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps the ranks equal
        assert torch.equal(value, rank0[name]), (name, float((value - rank0[name]).abs().max()))
    assert ref["log"][-1]["loss"] < 0.8 * ref["log"][0]["loss"]

    # kill -9 both ranks mid-run; the rerun resumes each rank's own RNG states.
    job = _finetune_under_torchrun(tmp_path, "killed.pt", ckpt, delay=0.03, background=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            try:
                done = torch.load(ckpt, weights_only=True)["iteration"] if ckpt.is_file() else 0
            except Exception:  # noqa: BLE001 - replaced while read
                done = 0
            if done >= 21:
                break
            time.sleep(0.02)
        assert job.poll() is None, "the run ended before it could be killed"
        for r in range(2):  # both ranks, as a machine that goes down
            os.kill(int((tmp_path / f"killed.pt.pid{r}").read_text()), signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    saved = torch.load(ckpt, weights_only=True)
    assert 21 <= saved["iteration"] < 60 and len(saved["ranks"]) == 2
    assert not (tmp_path / "killed.pt").exists()
    # The number of ranks is part of the key: one process starts over.
    assert FinetuneCheckpoint(ckpt, "k").load() is None
    resumed = _finetune_under_torchrun(tmp_path, "resumed.pt", ckpt)
    for name, value in rank0.items():
        assert torch.equal(value, resumed["heads"][0][name]), name
    fields = lambda log: [(e["iteration"], e["loss"], e["accuracy"]) for e in log]  # noqa: E731
    assert fields(resumed["log"]) == fields(ref["log"])
