"""Per-class linear SVMs (modeling/svm.py: scoring) and their training with liblinear and
R-CNN's hard negative mining (training/svm_solver.py, hard_negatives.py, svm_training.py)."""

import ast
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spp_detect.modeling
from spp_detect.modeling.svm import UNTRAINED_BIAS, LinearSVMs, mean_norm_scale
from spp_detect.training.hard_negatives import HardNegativeMiner, MiningImage
from spp_detect.training.svm_solver import SVMSolver
from spp_detect.training.svm_training import train_svms


def far_boxes(n):
    """n windows 100 px apart: no two overlap, so the 0.7 dedup keeps all of them."""
    x = torch.arange(n, dtype=torch.float32)[:, None] * 100
    return torch.cat([x, x * 0, x + 50, x * 0 + 50], dim=1)


def blobs(n, d, centre, generator, spread=0.3):
    return centre + spread * torch.randn(n, d, generator=generator)


# -- feature scale and the solver -------------------------------------------------------------
def test_feature_scale_gives_mean_norm_20():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(300, 40, generator=g) * 7
    svms = LinearSVMs(2)
    scale = svms.set_feature_scale(feats)
    assert scale == pytest.approx(mean_norm_scale(feats))
    norms = np.linalg.norm(feats.double().numpy() * scale, axis=1)
    assert norms.mean() == pytest.approx(20.0, rel=1e-9)
    assert svms.scale_features(feats).norm(dim=1).mean().item() == pytest.approx(20.0, rel=1e-5)


def test_bias_multiplier_equals_liblinear_constant_feature():
    """intercept_scaling=10 is liblinear's -B 10: a constant feature 10, bias = 10 * its weight."""
    from sklearn.svm import LinearSVC

    g = torch.Generator().manual_seed(1)
    pos = blobs(40, 5, 1.0, g)
    neg = blobs(200, 5, -0.5, g)
    svms = LinearSVMs(1, feature_scale=1.0)
    SVMSolver(tol=1e-8, max_iter=100000).fit(svms, 0, pos, neg)
    x = torch.cat([pos, neg]).double().numpy()
    x_aug = np.concatenate([x, np.full((x.shape[0], 1), 10.0)], axis=1)
    y = np.r_[np.ones(40), -np.ones(200)]
    ref = LinearSVC(
        C=0.001,
        loss="hinge",
        dual=True,
        class_weight={1: 2.0},
        fit_intercept=False,
        tol=1e-8,
        max_iter=100000,
    ).fit(x_aug, y)
    np.testing.assert_allclose(svms.weight[0].numpy(), ref.coef_[0, :5], rtol=1e-3, atol=1e-5)
    assert svms.bias[0].item() == pytest.approx(10.0 * ref.coef_[0, 5], rel=1e-3, abs=1e-5)


def test_separable_toy_data_is_separated():
    g = torch.Generator().manual_seed(2)
    d = 16
    centre = torch.zeros(d)
    centre[0] = 3.0
    pos = blobs(30, d, centre, g).abs()
    neg = blobs(300, d, torch.zeros(d), g).abs()
    svms = LinearSVMs(2)
    svms.set_feature_scale(torch.cat([pos, neg]))
    SVMSolver().fit(svms, 1, pos, neg)
    test_pos = blobs(100, d, centre, g).abs()
    test_neg = blobs(100, d, torch.zeros(d), g).abs()
    assert (svms.scores(test_pos)[:, 1] > 0).float().mean() >= 0.98
    assert (svms.scores(test_neg)[:, 1] < 0).float().mean() >= 0.98
    # scores() against a float64 loop.
    x = test_pos[:5].double() * svms.feature_scale.double()
    ref = [
        [float(x[i] @ svms.weight[k].double() + svms.bias[k]) for k in range(2)] for i in range(5)
    ]
    torch.testing.assert_close(
        svms.scores(test_pos[:5]).double(), torch.tensor(ref).double(), rtol=1e-5, atol=1e-5
    )


# -- hard negative mining -----------------------------------------------------------------------
def trained_by_hand(d, w0, b0):
    """One-class SVMs with score = w0 * x[0] + b0 and feature scale 1, marked trained."""
    svms = LinearSVMs(1, feature_scale=1.0)
    svms.reset_weights(d)
    svms.weight[0, 0] = w0
    svms.bias[0] = b0
    svms.trained[0] = True
    return svms


def test_negative_above_minus_one_enters_cache():
    svms = trained_by_hand(3, 1.0, 0.0)
    miner = HardNegativeMiner(svms, dedup_negatives=False)
    miner.add_positives(torch.tensor([[5.0, 0, 0]]), torch.tensor([0]))
    # Scores: -0.5, -1.0, -1.00005 (above -1.0001), -1.0002, -3.
    x0 = torch.tensor([-0.5, -1.0, -1.00005, -1.0002, -3.0], dtype=torch.float64)
    feats = torch.zeros(5, 3)
    feats[:, 0] = x0.float()
    ious = torch.zeros(5, 1)
    added = miner.add_image(
        feats, ious, torch.zeros(5, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    )
    assert added == [3]
    assert miner.cached_keys(0).tolist() == [[0, 0], [0, 1], [0, 2]]


def test_overlap_with_gt_rules_out_negatives():
    svms = LinearSVMs(2, feature_scale=1.0)
    miner = HardNegativeMiner(svms, dedup_negatives=False)
    miner.add_positives(torch.ones(2, 4), torch.tensor([0, 1]))
    # Window 0 is a class-1 ground truth; IoU with class 0's ground truths: 0, 0.29, 0.3,
    # 0.31, 0.9 for windows 0..4; window 5 is a class-0 ground truth.
    ious = torch.tensor([[0.0, 1.0], [0.29, 0.0], [0.3, 0.0], [0.31, 0.0], [0.9, 0.0], [1.0, 0.0]])
    is_gt = torch.tensor([True, False, False, False, False, True])
    feats = torch.rand(6, 4, generator=torch.Generator().manual_seed(3))
    svms.reset_weights(4)  # zero model: every window scores 0 > -1, so only IoU decides
    miner.retrain = lambda c: None  # keep the zero model (no retrain) for this check
    miner.add_image(feats, ious, is_gt, torch.tensor([1, 0]), boxes=None)
    assert miner.cached_keys(0)[:, 1].tolist() == [0, 1]  # IoU < 0.3 (strict): 0 and 0.29
    assert miner.cached_keys(1)[:, 1].tolist() == [1, 2, 3, 4, 5]


def test_easy_negatives_leave_at_retrain():
    g = torch.Generator().manual_seed(4)
    d = 6
    svms = LinearSVMs(1, feature_scale=1.0)
    miner = HardNegativeMiner(svms, dedup_negatives=False)
    centre = torch.zeros(d)
    centre[0] = 4.0
    miner.add_positives(blobs(20, d, centre, g), torch.zeros(20, dtype=torch.long))
    # Negatives spread from far (easy) to close to the positives (hard).
    neg = blobs(200, d, torch.zeros(d), g, spread=1.0)
    neg[:, 0] = torch.linspace(-6.0, 3.0, 200)
    miner.add_image(
        neg,
        torch.zeros(200, 1),
        torch.zeros(200, dtype=torch.bool),
        torch.zeros(0, dtype=torch.long),
    )
    # First image: the zero model let all 200 in, then the first model was trained.
    assert len(miner.history) == 1 and miner.history[0]["num_neg"] == 200
    z = svms.scores(neg)[:, 0]
    expected = torch.nonzero(z >= -1.2).flatten().tolist()
    kept = miner.cached_keys(0)[:, 1].tolist()
    assert kept == expected
    assert 0 < len(kept) < 200
    assert miner.history[0]["evicted"] == 200 - len(kept)


def test_dedup_drops_the_right_negative():
    # A and B: IoU 90 / 100 = 0.9 > 0.7. A and C: 70 / 100 = 0.7 (not > 0.7).
    # B and C: 70 / 90 = 0.78 > 0.7. D overlaps nothing.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 7], [50, 50, 60, 60]])
    ious = torch.zeros(4, 1)
    no_gt = torch.zeros(4, dtype=torch.bool)
    empty = torch.zeros(0, dtype=torch.long)

    # Zero model: all score 0, ties go by window order. Greedy: A kept, B dropped (0.9 to A),
    # C kept (0.7 to A is not above 0.7; B, which it overlaps by 0.78, was dropped), D kept.
    svms = LinearSVMs(1, feature_scale=1.0)
    miner = HardNegativeMiner(svms)
    miner.retrain = lambda c: None
    miner.add_positives(torch.ones(1, 2), torch.tensor([0]))
    miner.add_image(torch.zeros(4, 2), ious, no_gt, empty, boxes)
    assert miner.cached_keys(0)[:, 1].tolist() == [0, 2, 3]

    # A model under which B is the hardest: B kept, A (0.9) and C (0.78) dropped, D kept.
    svms = trained_by_hand(2, 1.0, 0.0)
    miner = HardNegativeMiner(svms)
    miner.retrain = lambda c: None
    miner.add_positives(torch.ones(1, 2), torch.tensor([0]))
    feats = torch.tensor([[-0.5, 0], [-0.1, 0], [-0.3, 0], [-0.9, 0]])
    miner.add_image(feats, ious, no_gt, empty, boxes)
    assert miner.cached_keys(0)[:, 1].tolist() == [1, 3]


def toy_image(g, k, d, centres, r=60, num_gt=2):
    labels = torch.randint(0, k, (num_gt,), generator=g)
    feats = blobs(r, d, torch.zeros(d), g, spread=1.0).abs()
    feats[:num_gt] = blobs(num_gt, d, centres[labels], g).abs()
    is_gt = torch.zeros(r, dtype=torch.bool)
    is_gt[:num_gt] = True
    ious = torch.rand(r, k, generator=g) * 0.25
    ious[:num_gt] = 0
    ious[torch.arange(num_gt), labels] = 1.0
    return MiningImage(feats, ious, is_gt, labels, far_boxes(r))


class FixedSolver:
    """Stands in for liblinear: every fit gives score = 5 * x[0], so a window with x[0] = 0 is a
    hard negative (score 0 > -1.0001) and one with x[0] = -1 an easy one (-5 < -1.2)."""

    def fit(self, svms, c, positives, negatives):
        w = torch.zeros(svms.feature_dim)
        w[0] = 5.0
        svms.set_class(c, w, 0.0)
        return {"pos_loss": 0.0, "neg_loss": 0.0, "reg_loss": 0.0, "total": 0.0}


def counted_image(hard, easy=0, hard_c1=None):
    """An image with ``hard`` hard negatives of class 0, and, when ``hard_c1`` is given,
    ``hard_c1`` of class 1 (each overlaps an object of the other class by 0.5, so it is a
    negative of one class only), then ``easy`` easy negatives of every class."""
    k = 1 if hard_c1 is None else 2
    n1 = hard_c1 or 0
    r = hard + n1 + easy
    feats = torch.zeros(r, 3)
    feats[hard + n1 :, 0] = -1.0
    ious = torch.zeros(r, k)
    if k == 2:
        ious[:hard, 1] = 0.5
        ious[hard : hard + n1, 0] = 0.5
    return MiningImage(
        feats, ious, torch.zeros(r, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    )


def fixed_miner(k, retrain_limit):
    svms = LinearSVMs(k, feature_scale=1.0)
    miner = HardNegativeMiner(
        svms, solver=FixedSolver(), dedup_negatives=False, retrain_limit=retrain_limit
    )
    miner.add_positives(torch.ones(k, 3), torch.arange(k))
    return miner


def test_retrain_schedule_by_hand():
    """R-CNN's rule with retrain_limit 5: a class is retrained once MORE than 5 new negatives
    joined its cache since its last training (rcnn_train.m: num_added > retrain_limit), after
    its first model and once at the end."""
    miner = fixed_miner(2, retrain_limit=5)
    # (hard negatives of class 0, of class 1) per image; image 1 also has 2 easy windows.
    counts = [(3, 3), (2, 2), (3, 2), (1, 0), (6, 1), (0, 3), (5, 0)]
    added = []
    for i, (n0, n1) in enumerate(counts):
        added.append(miner.add_image(*counted_image(n0, 2 if i == 0 else 0, hard_c1=n1)))
    # Image 1: the zero model scores every window 0, so the easy ones enter too.
    assert added == [[5, 5], [2, 2], [3, 2], [1, 0], [6, 1], [0, 3], [5, 0]]
    # Class 0: first model after image 1 (cache 3 after evicting the 2 easy ones); new
    # negatives since then 2, 5, 6 > 5 -> image 4; 6 > 5 -> image 5; 0, 5 -> the end.
    # Class 1: first model after image 1; then 2, 4, 4, 5, 8 > 5 -> image 6; 0 -> the end.
    assert miner.num_added(0) == 5 and miner.num_added(1) == 0
    miner.finish()
    events = [(h["image"], h["cls"]) for h in miner.history]
    assert events == [(1, 0), (1, 1), (4, 0), (5, 0), (6, 1), (7, 0), (7, 1)]
    assert miner.history[0]["evicted"] == 2 and miner.history[0]["cache"] == 3
    assert miner.cache_size(0) == 3 + 2 + 3 + 1 + 6 + 0 + 5
    assert miner.cache_size(1) == 3 + 2 + 2 + 0 + 1 + 3 + 0


def test_retrain_at_the_last_image_is_not_repeated():
    # 6 > 5 new negatives at the last image: retrained there, and finish adds nothing (R-CNN
    # updates a class once at its last image, for either reason).
    miner = fixed_miner(1, retrain_limit=5)
    for n in (3, 6):
        miner.add_image(*counted_image(n))
    assert [h["image"] for h in miner.history] == [1, 2]
    miner.finish()
    assert [h["image"] for h in miner.history] == [1, 2]
    # 5 is not more than 5: no retrain at image 2, the final one comes from finish.
    miner = fixed_miner(1, retrain_limit=5)
    for n in (3, 5):
        miner.add_image(*counted_image(n))
    assert [h["image"] for h in miner.history] == [1]
    miner.finish()
    assert [h["image"] for h in miner.history] == [1, 2]


def test_retrain_limit_in_config_reaches_the_miner():
    from spp_detect.config import DetectorConfig, apply_overrides

    assert DetectorConfig().svm.retrain_limit == 2000
    cfg = apply_overrides(DetectorConfig(), ["svm.retrain_limit=7"])
    assert cfg.svm.retrain_limit == 7
    with pytest.raises(ValueError, match="retrain_limit"):
        HardNegativeMiner(LinearSVMs(1), retrain_limit=-1)


def test_modeling_never_imports_scikit_learn():
    """Scoring needs no scikit-learn: no module of modeling/ imports it, even lazily."""
    for path in Path(spp_detect.modeling.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "sklearn" for n in names), path


def test_retrain_limit_counts_added_negatives():
    g = torch.Generator().manual_seed(6)
    d = 8
    centres = torch.zeros(1, d)
    centres[0, 0] = 4.0
    svms = LinearSVMs(1)
    miner = HardNegativeMiner(svms, retrain_limit=3)
    added = [miner.add_image(*toy_image(g, 1, d, centres))[0] for _ in range(6)]
    # R-CNN's rule: retrain once more than retrain_limit negatives joined since the last one.
    expected, since = [1], 0
    for i, n in enumerate(added[1:], start=2):
        since += n
        if since > 3:
            expected.append(i)
            since = 0
    assert [h["image"] for h in miner.history] == expected
    assert len(expected) >= 2


def test_train_svms_end_to_end_and_untrained_class(caplog):
    g = torch.Generator().manual_seed(7)
    k, d = 3, 12
    centres = torch.zeros(k, d)
    for c in range(k):
        centres[c, c] = 4.0
    images = []
    for _ in range(12):
        im = toy_image(g, 2, d, centres[:2])  # class 2 never appears
        ious = torch.cat([im.window_ious, torch.zeros(im.window_ious.shape[0], 1)], dim=1)
        images.append(im._replace(window_ious=ious))
    with caplog.at_level(logging.WARNING, logger="spp_detect.training.hard_negatives"):
        svms = train_svms(images, k, retrain_limit=50)
    assert svms.trained.tolist() == [True, True, False]
    assert "class 2" in caplog.text
    assert svms.bias[2].item() == UNTRAINED_BIAS
    for c in range(2):
        pos = blobs(50, d, centres[c], g).abs()
        neg = blobs(200, d, torch.zeros(d), g, spread=1.0).abs()
        assert (svms.scores(pos)[:, c] > 0).float().mean() >= 0.95
        assert (svms.scores(neg)[:, c] < 0).float().mean() >= 0.95
        other = blobs(50, d, centres[1 - c], g).abs()
        assert (svms.scores(other)[:, c] < 0).float().mean() >= 0.95
    assert (svms.scores(neg)[:, 2] < -1000).all()


def test_state_dict_round_trip_and_errors():
    svms = trained_by_hand(5, 0.5, -0.25)
    state = {k: v.clone() for k, v in svms.state_dict().items()}
    assert set(state) == {"weight", "bias", "feature_scale", "trained"}
    loaded = LinearSVMs.from_state_dict(state)
    x = torch.rand(7, 5)
    torch.testing.assert_close(loaded.scores(x), svms.scores(x))
    parent = nn.Module()
    parent.svms = LinearSVMs(1)
    parent.load_state_dict({f"svms.{k}": v for k, v in state.items()})
    torch.testing.assert_close(parent.svms(x), svms.scores(x))
    assert svms.scores(x[:0]).shape == (0, 1)
    with pytest.raises(ValueError):
        svms.scores(torch.rand(3, 4))
    miner = HardNegativeMiner(LinearSVMs(1))
    with pytest.raises(ValueError, match="boxes"):
        miner.add_image(
            x, torch.zeros(7, 1), torch.zeros(7, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        )


@pytest.mark.cuda
def test_cuda_scores_match_cpu():
    svms = trained_by_hand(5, 0.5, -0.25)
    x = torch.rand(9, 5)
    cpu = svms.scores(x)
    torch.testing.assert_close(svms.scores(x.cuda()).cpu(), cpu)
    torch.testing.assert_close(svms.cuda().scores(x.cuda()).cpu(), cpu)


# -- resumable SVM + box-regression stage (issue 10) -----------------------------------------

RESUME_SETUP = """
import time
import torch
from torch import nn
from spp_detect.config import BBoxRegConfig, DetectorConfig, SVMConfig
from spp_detect.datasets.records import ImageRecord
from spp_detect.modeling.head import FCHead
from spp_detect.training.svm_bbox import train_svms_and_regressors

K, D, R = 3, 32, 80


def make_image(i):
    g = torch.Generator().manual_seed(i)
    xy = torch.rand(2, 2, generator=g) * 200
    gt = torch.cat([xy, xy + 40 + torch.rand(2, 2, generator=g) * 60], dim=1)
    labels = torch.randint(0, K, (2,), generator=g)
    near = gt.repeat(20, 1) + torch.randn(40, 4, generator=g) * 6
    xy = torch.rand(R - 42, 2, generator=g) * 250
    far = torch.cat([xy, xy + 10 + torch.rand(R - 42, 2, generator=g) * 80], dim=1)
    windows = torch.cat([gt, near, far])
    windows[:, 2:] = torch.maximum(windows[:, 2:], windows[:, :2] + 1)
    return type("Image", (), dict(
        record=ImageRecord(str(i), "x.jpg", 300, 300), windows=windows, gt_boxes=gt,
        gt_labels=labels, labels=torch.zeros(R, dtype=torch.long)))


IMAGES = [make_image(i) for i in range(12)]


class Source:
    # Features: a class's one-hot centre for windows near its ground truth, noise elsewhere.
    def __init__(self, delay=0.0):
        self.delay = delay
        self.images = IMAGES

    def rows(self, i, idx, rng=None):
        time.sleep(self.delay)
        im = IMAGES[i]
        g = torch.Generator().manual_seed(1000 + i)
        feats = torch.randn(R, D, generator=g)
        cls = torch.cat([im.gt_labels, im.gt_labels.repeat(20), torch.full((R - 42,), -1)])
        feats[cls >= 0] += 3 * nn.functional.one_hot(cls[cls >= 0], D).float()
        return feats[idx]


class Det(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = FCHead(D, K, hidden=16, dropout=0.5)
        self.backbone = nn.Linear(2, 2)
        self.num_classes = K
        self.device = torch.device("cpu")


# Small retrain limit and caps, so that retrains, cache caps and reservoir draws all happen
# while the run goes on.
CFG = DetectorConfig(
    svm=SVMConfig(retrain_limit=25, max_cached_negatives=40, checkpoint_seconds=0.0),
    bbox_reg=BBoxRegConfig(max_samples=30, max_per_image=12),
)


def run(ckpt_path, delay=0.0):
    det = Det()
    return train_svms_and_regressors(det, Source(delay), IMAGES, CFG, checkpoint_path=ckpt_path)
"""


def _resume_namespace():
    ns = {}
    exec(RESUME_SETUP, ns)  # noqa: S102 - the same code runs in the child process
    return ns


def test_killed_svm_stage_resumes_to_the_uninterrupted_result(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    ns = _resume_namespace()
    ref_svms, ref_reg, ref_stats = ns["run"](None)
    assert ref_reg is not None and bool(ref_svms.trained.all())
    # The caps were reached (the resumed state includes capped caches and reservoirs).
    assert max(ref_stats["svm_cache_sizes"]) <= 40 and ref_stats["bbox_samples"] == 3 * 30

    ckpt = tmp_path / "svm.ckpt.pt"
    script = tmp_path / "child.py"
    script.write_text(RESUME_SETUP + f"\nrun({str(ckpt)!r}, delay=0.05)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if ckpt.is_file():
                try:
                    done = torch.load(ckpt, weights_only=True)["next_image"]
                except Exception:  # noqa: BLE001 - replaced while read
                    done = 0
                if done >= 5:
                    break
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=True)["next_image"]
    assert 5 <= killed_at < 12

    svms, reg, stats = ns["run"](ckpt)
    assert stats["resumed_at_image"] == killed_at
    assert not ckpt.exists()  # removed once the pass is over
    for name, value in ref_svms.state_dict().items():
        assert torch.equal(value, svms.state_dict()[name]), name
    for name, value in ref_reg.state_dict().items():
        assert torch.equal(value, reg.state_dict()[name]), name
    assert stats["svm_cache_sizes"] == ref_stats["svm_cache_sizes"]


def test_svm_checkpoint_of_other_inputs_is_ignored(tmp_path):
    ns = _resume_namespace()
    ckpt = tmp_path / "svm.ckpt.pt"
    from spp_detect.serialization import save_file

    save_file({"key": "another head", "next_image": 11}, ckpt)
    svms, _, stats = ns["run"](ckpt)
    assert stats["resumed_at_image"] == 0 and bool(svms.trained.all())


# -- a subset of the classes (torchrun divides them among ranks) ----------------------------------


def _mining_images(ns):
    """RESUME_SETUP's images as miner input: its features stand in for fc7; windows near each
    ground truth overlap one another, so the 0.7 dedup has work to do."""
    from spp_detect.training.svm_bbox import class_ious

    out = []
    for i, im in enumerate(ns["IMAGES"]):
        feats = ns["Source"]().rows(i, torch.arange(ns["R"]))
        is_gt = torch.zeros(ns["R"], dtype=torch.bool)
        is_gt[:2] = True
        ious = class_ious(im.windows, im.gt_boxes, im.gt_labels, ns["K"])
        out.append(MiningImage(feats, ious, is_gt, im.gt_labels, im.windows))
    return out


def _run_miner(images, k, classes):
    svms = LinearSVMs(k)
    svms.set_feature_scale(torch.cat([im.features for im in images[:4]]))
    miner = HardNegativeMiner(svms, retrain_limit=25, max_cached_negatives=40, classes=classes)
    capped, keep_hardest = [], miner._keep_hardest
    miner._keep_hardest = lambda c: (capped.append(c), keep_hardest(c))
    for im in images:
        miner.add_image(*im)
    return miner, miner.finish(), capped


def test_miner_of_a_class_subset_gives_those_classes_exactly_the_full_models():
    ns = _resume_namespace()
    images = _mining_images(ns)
    k = ns["K"]
    full_miner, full, capped = _run_miner(images, k, None)
    # The schedule is not trivial: every class retrained more than its first and final time,
    # and caches reached their cap.
    retrains = [sum(h["cls"] == c for h in full_miner.history) for c in range(k)]
    assert min(retrains) >= 3 and bool(full.trained.all()) and len(set(capped)) >= 2
    for classes in ([1], [0, 2], [2]):
        miner, part, part_capped = _run_miner(images, k, classes)
        assert part_capped == [c for c in capped if c in classes]
        assert [h["cls"] for h in miner.history] == [
            h["cls"] for h in full_miner.history if h["cls"] in classes
        ]
        for c in range(k):
            if c in classes:
                assert torch.equal(part.weight[c], full.weight[c]), (classes, c)
                assert part.bias[c] == full.bias[c] and bool(part.trained[c])
                assert torch.equal(miner.cached_keys(c), full_miner.cached_keys(c))
            else:  # skipped entirely
                assert not bool(part.trained[c]) and miner.cache_size(c) == 0
                assert miner.num_positives(c) == 0 and float(part.weight[c].abs().sum()) == 0
    with pytest.raises(ValueError, match="classes"):
        HardNegativeMiner(LinearSVMs(2), classes=[2])


def test_class_parts_merge_to_the_one_process_svms_and_regressors():
    from spp_detect.training.svm_bbox import merge_class_parts, train_class_subset

    ns = _resume_namespace()
    ref_svms, ref_reg, ref_stats = ns["run"](None)
    cfg, k = ns["CFG"], ns["K"]
    for shards in ([[0, 1], [2]], [[0], [1], [2]]):
        parts = [
            train_class_subset(ns["Det"](), ns["Source"](), ns["IMAGES"], cfg, classes)[0]
            for classes in shards
        ]
        svms, reg, stats = merge_class_parts(parts, k, cfg.svm.feature_norm)
        for name, value in ref_svms.state_dict().items():
            assert torch.equal(value, svms.state_dict()[name]), (shards, name)
        for name, value in ref_reg.state_dict().items():
            assert torch.equal(value, reg.state_dict()[name]), (shards, name)
        for key in ("svm_cache_sizes", "svm_trained", "bbox_samples"):
            assert stats[key] == ref_stats[key], key
