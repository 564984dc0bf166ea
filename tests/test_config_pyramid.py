"""Config parsing and the per-window scale rule (SPP-net sec. 4.1)."""

import pytest
import torch

from spp_detect.config import DetectorConfig, apply_overrides, load_config
from spp_detect.modeling.pyramid import choose_scales, resize_image, scale_factor


def test_defaults_are_the_papers():
    c = DetectorConfig()
    assert c.model.levels == (6, 3, 2, 1) and c.model.scales == (688,)
    assert (c.finetune.fg_thresh, c.finetune.bg_thresh_lo, c.finetune.batch_size) == (0.5, 0.1, 128)
    assert c.finetune.fg_fraction == 0.25 and c.finetune.init_std == 0.01
    assert (c.svm.C, c.svm.pos_weight, c.svm.bias_multiplier, c.svm.feature_norm) == (
        0.001,
        2.0,
        10.0,
        20.0,
    )
    assert (c.svm.hard_thresh, c.svm.easy_thresh) == (-1.0001, -1.2)
    assert c.bbox_reg.lambda_ == 4000 and c.test.nms_thresh == 0.3


def test_overrides_and_yaml(tmp_path):
    c = apply_overrides(
        DetectorConfig(),
        [
            "finetune.lr=0.001",
            "model.scales=[480, 576]",
            "model.backbone=efficientnet_lite0",
            "svm.C=1",
        ],
    )
    assert c.finetune.lr == 0.001 and c.model.scales == (480, 576) and c.svm.C == 1.0
    assert c.model.backbone == "efficientnet_lite0"
    assert DetectorConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(c, ["finetune.nope=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(c, ["finetune.batch_size=abc"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(c, ["finetune.lr"])
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  scales: [688]\n  hidden: 512\ntest:\n  classifier: softmax\n")
    c = load_config(p, ["model.hidden=256"])
    assert c.model.hidden == 256 and c.test.classifier == "softmax"
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_demo_reads_the_packaged_toy_config():
    from spp_detect.demo import TOY_CONFIG

    c = load_config(TOY_CONFIG)  # the file ships inside the package (spp_detect/configs)
    assert c.model.backbone == "efficientnet_lite0" and c != DetectorConfig()


def test_scale_factor():
    assert scale_factor((375, 500), 688) == pytest.approx(688 / 375)
    # Longer side capped at 2000: 100x1000 at scale 688 would be 6880 wide.
    assert scale_factor((100, 1000), 688, max_size=2000) == pytest.approx(2.0)
    x = torch.zeros(3, 10, 20)
    assert resize_image(x, 1.5).shape == (3, 15, 30)


def test_choose_scales_area_closest_to_224():
    factors = [480 / 500, 688 / 500, 1200 / 500]
    # A 224x224 window at factor 0.96 becomes 215^2: scale 0 is closest.
    # A 100x100 window: 96^2, 137.6^2, 240^2 -> |240^2 - 224^2| = 7424 is the smallest -> scale 2.
    # A 400x300 window: areas 110592, 227205, 691200 vs 50176 -> scale 0.
    windows = torch.tensor([[0, 0, 224, 224], [0, 0, 100, 100], [0, 0, 400, 300.0]])
    assert choose_scales(windows, factors).tolist() == [0, 2, 0]
    # Reference: brute force on random windows.
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(100, 4, generator=gen) * 400
    w[:, 2:] += w[:, :2]
    got = choose_scales(w, factors)
    for i in range(100):
        area = float((w[i, 2] - w[i, 0]) * (w[i, 3] - w[i, 1]))
        best = min(range(3), key=lambda s: abs(area * factors[s] ** 2 - 224.0**2))
        assert got[i].item() == best


def test_test_overrides_take_test_fields_only_type_checked():
    from spp_detect.config import DetectorConfig, test_overrides
    from spp_detect.errors import UserInputError

    cfg = DetectorConfig()
    got = test_overrides(
        cfg, ["test.svd_fc6=256", "test.svd_method=responses", "test.nms_thresh=0.3"]
    )
    assert got == {"svd_fc6": 256, "svd_method": "responses"}  # nms_thresh is already 0.3
    with pytest.raises(UserInputError, match="only test.KEY=VALUE"):
        test_overrides(cfg, ["model.scales=[480]"])
    with pytest.raises(UserInputError, match="unknown config key"):
        test_overrides(cfg, ["test.no_such_field=1"])
    with pytest.raises(UserInputError):
        test_overrides(cfg, ["test.svd_fc6=many"])
