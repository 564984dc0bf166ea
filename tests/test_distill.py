"""fc6/fc7 starting points (issue 9, part 2): torchvision's own fc layers under the pyramid, and
distillation from a per-window teacher (ViLD)."""

import dataclasses

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from spp_detect.config import DetectorConfig, DistillConfig
from spp_detect.datasets.records import ImageRecord
from spp_detect.modeling.backbones import ImageNetModel, build_imagenet_model
from spp_detect.modeling.build import build_detector
from spp_detect.modeling.head import load_imagenet_fc
from spp_detect.modeling.rcnn import context_windows, warp_windows
from spp_detect.training.distill import TeacherCache, choose_windows, distill_head


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None)
    path = tmp_path_factory.mktemp("w") / "alexnet.pth"
    torch.save(net.state_dict(), path)
    return path


def test_imagenet_fc_init_equals_pretrained_head_on_a_whole_image(alexnet_file):
    cfg = DetectorConfig()
    cfg = cfg.replace(
        model=dataclasses.replace(
            cfg.model, backbone="alexnet", levels=(6, 3, 2, 1), scales=(224,), inward_offset=0.0
        )
    )
    det = build_detector("spp", ["a", "b"], cfg, pretrained=str(alexnet_file)).eval()
    teacher = build_imagenet_model("alexnet", pretrained=str(alexnet_file))
    fc6, fc7 = [m for m in teacher.model.classifier if isinstance(m, nn.Linear)][:2]
    load_imagenet_fc(det.head, fc6, fc7, cfg.model.levels, det.backbone.out_channels)
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    x = det.preprocess(image)
    maps = det.conv_maps(x)
    assert maps[0].shape[-2:] == (13, 13)
    pooled, inv = det.pool_from_maps(
        maps, det.scale_factors((224, 224)), torch.tensor([[0.0, 0, 224, 224]])
    )
    ours, _ = det.head.predict(pooled[inv])
    with torch.no_grad():
        m = teacher.model.eval()
        feats = torch.flatten(m.avgpool(m.features(x[None])), 1)  # pool5: 3x3/2 max pool
        ref = m.classifier[:6](feats)  # dropout, fc6, relu, dropout, fc7, relu
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # The coarser levels' columns start at zero.
    assert det.head.fc6.weight[:, 256 * 36 :].abs().sum() == 0


def test_imagenet_fc_init_rejects_a_mismatched_pyramid():
    head = build_detector("spp", ["a"], DetectorConfig(), pretrained=False).head
    with pytest.raises(ValueError, match="model.levels"):
        load_imagenet_fc(head, nn.Linear(256 * 49, 4096), nn.Linear(4096, 4096), (6, 3), 256)


# -- distillation ------------------------------------------------------------------------------


class _TinyNet(nn.Module):
    """A timm-like classifier: forward_features + forward_head(pre_logits=True)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)


def _teacher():
    torch.manual_seed(0)
    return ImageNetModel("tiny", _TinyNet(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32).eval()


def test_teacher_embedding_is_the_crop_through_the_network_and_is_cached(tmp_path):
    from PIL import Image

    image = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    rec = ImageRecord("a", tmp_path / "a.png", 60, 40)
    windows = torch.tensor([[5.0, 5.0, 30.0, 35.0], [20.0, 0.0, 60.0, 20.0]])
    teacher = _teacher()
    cache = TeacherCache(teacher, tmp_path / "cache", context_pad=4)
    emb = cache.get(rec, windows)
    x = teacher.preprocess(image)
    crops = warp_windows(x, context_windows(windows, 4, 32), 32)
    ref = teacher.model.forward_head(teacher.model.forward_features(crops), pre_logits=True)
    torch.testing.assert_close(emb.float(), ref, rtol=2e-3, atol=2e-3)  # float16 storage
    calls = []
    cache.compute = lambda *a: calls.append(1) or torch.zeros(2, 8)
    assert torch.equal(cache.get(rec, windows), emb) and not calls  # reused
    cache.get(rec, windows + 1)  # other windows: recomputed
    assert calls == [1]
    with torch.no_grad():
        teacher.model.conv.weight[0, 0, 0, 0] += 1
    cache2 = TeacherCache(teacher, tmp_path / "cache", context_pad=4)
    cache2.compute = lambda *a: calls.append(2) or torch.zeros(2, 8)
    cache2.get(rec, windows)  # other teacher weights: recomputed
    assert calls == [1, 2]


def test_choose_windows_skips_ground_truth_and_caps():
    ims = [
        type("T", (), {"gt_boxes": torch.zeros(2, 4), "windows": torch.zeros(10, 4)}),
        type("T", (), {"gt_boxes": torch.zeros(1, 4), "windows": torch.zeros(1, 4)}),
    ]
    a, b = choose_windows(ims, 5, seed=0)
    assert a.numel() == 5 and a.min() >= 2 and len(set(a.tolist())) == 5 and b.numel() == 0


class _Source:
    def __init__(self, feats):
        self.feats = feats

    def rows(self, i, idx, rng=None):
        return self.feats[i][idx]


class _FixedTeacher(TeacherCache):
    """Teacher targets given per image (no network), to test the student's training."""

    def __init__(self, targets):
        self.targets = targets

    def get(self, record, windows):
        return self.targets[int(record.image_id)][: windows.shape[0]]


def test_distillation_makes_the_head_reproduce_the_teacher(monkeypatch):
    torch.manual_seed(0)
    cfg = DetectorConfig()
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, hidden=64))
    det = build_detector("spp", ["a"], cfg, pretrained=False)
    d = det.pooled_dim
    mix = torch.randn(d, 16) / d**0.5
    images, feats, targets = [], [], []
    for i in range(6):
        x = torch.relu(torch.randn(40, d))
        feats.append(x)
        targets.append(torch.tanh(x @ mix))  # a smooth function of the pooled features
        rec = ImageRecord(str(i), f"{i}.jpg", 10, 10)
        images.append(
            type(
                "T",
                (),
                {"record": rec, "gt_boxes": torch.zeros(0, 4), "windows": torch.zeros(40, 4)},
            )
        )
    import spp_detect.training.distill as distill

    monkeypatch.setattr(distill, "TeacherCache", lambda *a, **k: _FixedTeacher(targets))
    dcfg = DistillConfig(windows_per_image=40, iterations=300, batch_size=64, lr=3e-3)
    log = distill_head(det, _Source(feats), images, dcfg, teacher=None, cache_dir=None)
    assert log[0]["cosine"] < log[-1]["cosine"] and log[-1]["cosine"] > 0.9
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert not det.head.training
