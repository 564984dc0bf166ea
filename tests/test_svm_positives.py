"""The per-class cap on SVM positives (``svm.max_positives``): a uniform, seeded sample per
class that does not depend on the other classes, and the same SVMs below the cap."""

import dataclasses

import torch

from spp_detect.training.svm_bbox import positive_subset
from test_svm import _resume_namespace  # noqa: E402


class _Image:
    def __init__(self, labels):
        self.gt_labels = torch.tensor(labels, dtype=torch.long)


IMAGES = [_Image([0, 1, 1]), _Image([1]), _Image([]), _Image([1, 2, 0]), _Image([1, 1])]


def _by_class(images, chosen):
    out = {}
    for im, idx in zip(images, chosen):
        for j in idx.tolist():
            out.setdefault(int(im.gt_labels[j]), []).append(j)
    return {c: len(v) for c, v in out.items()}


def test_no_cap_or_a_cap_above_every_class_keeps_every_ground_truth():
    for cap in (0, 6, 100):
        chosen = positive_subset(IMAGES, cap, seed=0)
        assert [c.tolist() for c in chosen] == [[0, 1, 2], [0], [], [0, 1, 2], [0, 1]]


def test_a_class_above_the_cap_keeps_a_uniform_seeded_sample_of_cap():
    assert _by_class(IMAGES, positive_subset(IMAGES, 2, seed=0)) == {0: 2, 1: 2, 2: 1}
    # Uniform: each of class 1's six objects is kept with probability 2/6.
    counts = torch.zeros(6)
    objs = [(i, j) for i, im in enumerate(IMAGES) for j, c in enumerate(im.gt_labels) if c == 1]
    for seed in range(600):
        chosen = positive_subset(IMAGES, 2, seed)
        for k, (i, j) in enumerate(objs):
            counts[k] += int(j in chosen[i].tolist())
    assert (counts / 600 - 1 / 3).abs().max() < 0.07
    # Seeded per class: the same sample whatever other classes are asked for.
    full = positive_subset(IMAGES, 2, seed=3)
    only1 = positive_subset(IMAGES, 2, seed=3, classes=[1])
    for im, a, b in zip(IMAGES, full, only1):
        assert [j for j in a.tolist() if im.gt_labels[j] == 1] == b.tolist()


def test_svm_pass_with_a_binding_cap_trains_on_cap_positives_and_changes_the_svms(monkeypatch):
    from spp_detect.training import svm_bbox

    ns = _resume_namespace()
    counts = torch.bincount(torch.cat([im.gt_labels for im in ns["IMAGES"]]), minlength=ns["K"])
    cap = int(counts.min()) - 1
    seen = []
    real = svm_bbox.HardNegativeMiner.add_positives

    def spy(self, feats, labels):
        seen.append(torch.bincount(labels, minlength=ns["K"]).tolist())
        return real(self, feats, labels)

    monkeypatch.setattr(svm_bbox.HardNegativeMiner, "add_positives", spy)
    full, _, _ = ns["run"](None)
    svm = dataclasses.replace(ns["CFG"].svm, max_positives=cap)
    cfg = dataclasses.replace(ns["CFG"], svm=svm)
    det, source = ns["Det"](), ns["Source"]()
    capped, _, _ = svm_bbox.train_svms_and_regressors(det, source, ns["IMAGES"], cfg)
    assert seen == [counts.tolist(), counts.clamp(max=cap).tolist()]
    assert bool(capped.trained.all()) and not torch.equal(capped.weight, full.weight)
