"""Detector training on a tiny generated set: fine-tuning lowers the loss and steps the learning
rate, a resumed run reuses exactly the stages whose inputs did not change, and the R-CNN
baseline trains through the same pipeline.

Tiny everything (ZF-5 with random weights, 96-pixel scale, 32-wide fc layers, a few dozen
windows per image) so that a training run takes seconds on two CPU cores.
"""

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import spp_detect.training.train as train_module
from spp_detect.config import DetectorConfig, apply_overrides
from spp_detect.datasets.images import read_image
from spp_detect.datasets.toy_voc import make_toy_voc
from spp_detect.datasets.voc import VOCDataset
from spp_detect.inference.dataset import dataset_proposals
from spp_detect.modeling.build import load_detector
from spp_detect.training.train import train_detector

ITERATIONS = 60
LR = 1e-3

TINY = [
    "model.backbone=zf5",
    "model.scales=[96]",
    "model.hidden=32",
    "proposals.max_proposals=60",
    "proposals.min_size=8",
    f"finetune.iterations={ITERATIONS}",
    f"finetune.lr={LR}",
    "finetune.batch_size=32",
    "workers=1",
]


def _config(*overrides):
    return apply_overrides(DetectorConfig(), TINY + list(overrides))


@pytest.fixture(scope="module")
def toy_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "VOCdevkit"
    classes = ("circle", "square")
    make_toy_voc(
        root, num_train=4, num_val=0, num_test=2, image_size=(96, 128), classes=classes, seed=2
    )
    return VOCDataset(root, year="2007", split="train")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Proposals and feature caches shared by the runs of this module (as a user's would be)."""
    return tmp_path_factory.mktemp("cache")


def test_finetuning_lowers_the_loss_and_steps_the_learning_rate(toy_train, cache_dir, tmp_path):
    config = _config("model.dropout=0.0")
    log = train_detector(
        toy_train, tmp_path, config, method="spp", device="cpu", pretrained=False,
        cache_dir=cache_dir,
    )  # fmt: skip
    ft = log["finetune"]
    assert [e["iteration"] for e in ft][-1] == ITERATIONS
    # Sec. 4.1: lr for step_fraction of the iterations, then lr * lr_step_factor.
    step_at = int(ITERATIONS * config.finetune.step_fraction)
    for e in ft:
        expected = LR if e["iteration"] <= step_at else LR * config.finetune.lr_step_factor
        assert e["lr"] == pytest.approx(expected), e
    assert ft[0]["iteration"] <= step_at < ft[-1]["iteration"]  # both phases were logged
    # The training loss falls well below its start (cross-entropy over K + 1 = 3 classes starts
    # near log 3 = 1.1 with cls_score ~ N(0, 0.01)). No dropout here, so that a 32-wide head
    # can fit the few windows in 60 iterations.
    first, last = ft[0]["loss"], np.mean([e["loss"] for e in ft[-3:]])
    assert first == pytest.approx(np.log(3), abs=0.3)
    assert last < 0.6 * first, [round(e["loss"], 3) for e in ft]


def test_a_config_change_reruns_exactly_the_stages_it_affects(
    toy_train, cache_dir, tmp_path, monkeypatch
):
    calls = []
    real = train_module.finetune_head

    def counting(*args, **kwargs):
        calls.append(args[3].lr)  # finetune_head(detector, source, images, cfg, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "finetune_head", counting)
    out = tmp_path / "run"

    def run(*overrides):
        train_detector(
            toy_train, out, _config(*overrides), method="spp", device="cpu", pretrained=False,
            cache_dir=cache_dir,
        )  # fmt: skip
        return load_detector(out / "model.pt")

    first = run()
    assert calls == [LR]
    # Test settings do not determine the fine-tuned head: it is reused, bit for bit.
    second = run("test.score_thresh=-0.5", "test.nms_thresh=0.4")
    assert calls == [LR]
    assert second.config.test.nms_thresh == 0.4
    for k, v in first.head.state_dict().items():
        assert torch.equal(v, second.head.state_dict()[k]), k
    # A fine-tuning setting does: fine-tuning runs again, and gives another head.
    third = run("finetune.lr=0.002")
    assert calls == [LR, 0.002]
    assert not torch.equal(third.head.fc6.weight, first.head.fc6.weight)
    # And with resume=False every stage reruns even with unchanged settings.
    train_detector(
        toy_train, out, _config("finetune.lr=0.002"), method="spp", device="cpu",
        pretrained=False, cache_dir=cache_dir, resume=False,
    )  # fmt: skip
    assert calls == [LR, 0.002, 0.002]


@pytest.mark.slow  # R-CNN runs the backbone on every warped 224 x 224 window: ~30 s here
def test_rcnn_training_gives_svms_regressors_and_detections(toy_train, cache_dir, tmp_path):
    # svm.C: R-CNN's 0.001 is tuned for thousands of images; on four it leaves the SVMs at
    # their bias (every window scores alike), so a larger C lets them fit the training objects.
    config = _config(
        "model.context_pad=4", "data.flip=false", "proposals.max_proposals=30", "svm.C=1.0"
    )
    log = train_detector(
        toy_train, tmp_path, config, method="rcnn", device="cpu", pretrained=False,
        cache_dir=cache_dir,
    )  # fmt: skip
    assert log["method"] == "rcnn" and all(log["classifiers"]["svm_trained"])
    det = load_detector(tmp_path / "model.pt")
    assert det.method == "rcnn" and det.class_names == ["circle", "square"]
    assert bool(det.svms.trained.all()) and det.bbox_regressor is not None
    assert bool(det.bbox_regressor.trained.any())
    # On its own training images the SVMs rank the objects first: the best-scoring detection
    # of most images overlaps a ground truth of its class (IoU >= 0.5, VOC's rule).
    proposals = dataset_proposals(toy_train, config, cache_dir)
    every = det.with_settings(score_thresh=-1e9)
    hits = []
    for rec in toy_train.records:
        d = every.detect(read_image(rec.path), proposals[rec.image_id])
        assert len(d) > 0
        gt = torch.as_tensor(rec.boxes[rec.labels == int(d.labels[0])], dtype=torch.float32)
        hits.append(len(gt) > 0 and float(box_iou(d.boxes[:1], gt).max()) >= 0.5)
    assert sum(hits) >= len(hits) - 1, hits
