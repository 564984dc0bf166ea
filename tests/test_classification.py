"""SPPClassifier, the toy classification set and the classification training tool."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import spp_detect.training.image_classification as image_classification
from spp_detect.datasets.toy_cls import make_toy_cls
from spp_detect.datasets.toy_shapes import TOY_CLASSES
from spp_detect.modeling.backbones import build_backbone
from spp_detect.modeling.spp_classifier import SPPClassifier, load_classifier, save_classifier
from spp_detect.training.classifier_data import SizeGroupedBatches
from spp_detect.training.classifier_eval import evaluate_classifier, evaluate_folder

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_classifier(levels=(6, 3, 2, 1), num_classes=4):
    torch.manual_seed(0)
    return SPPClassifier(build_backbone("zf5", pretrained=False), num_classes, levels, hidden=16)


def test_spp_classifier_takes_any_size():
    model = _small_classifier().eval()
    assert model.fc6.in_features == 256 * (36 + 9 + 4 + 1)
    with torch.no_grad():
        for n, h, w in [(1, 1, 1), (2, 40, 40), (3, 64, 100), (1, 17, 230)]:
            x = torch.randn(n, 3, h, w)
            logits = model(x)
            assert logits.shape == (n, 4)
            # Independent composition of the layers (eval: dropout off).
            conv = model.backbone(x)
            assert conv.shape[-2:] == (-(-h // 16), -(-w // 16))  # ceil(H / 16) with ZF-5 padding
            ref = model.cls_score(torch.relu(model.fc7(torch.relu(model.fc6(model.spp(conv))))))
            torch.testing.assert_close(logits, ref)
    four = _small_classifier(levels=(4, 3, 2, 1))
    assert four.fc6.in_features == 256 * 30
    with pytest.raises(ValueError, match="num_classes"):
        SPPClassifier(build_backbone("zf5", pretrained=False), 0)


def test_save_load_and_backbone_from_classifier_file(tmp_path):
    model = _small_classifier().eval()
    path = save_classifier(model, tmp_path / "model.pth", ["a", "b", "c", "d"])
    loaded = load_classifier(path)
    backbone = build_backbone("zf5", pretrained=path).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(backbone(x), model.backbone(x), rtol=0, atol=0)
    assert loaded.class_names == ["a", "b", "c", "d"]
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an spp_detect classifier"):
        load_classifier(tmp_path / "other.pth")


def test_evaluate_classifier_hand_worked():
    class Fixed(torch.nn.Module):
        num_classes = 6

        def forward(self, x):
            return x  # the "images" are the logits

    logits = torch.tensor(
        [
            [9, 8, 7, 6, 5, 4],  # label 0: top-1 hit
            [9, 8, 7, 6, 5, 4],  # label 4: top-5 hit only
            [9, 8, 7, 6, 5, 4],  # label 5: miss
            [0, 0, 0, 0, 0, 1],  # label 5: top-1 hit
        ],
        dtype=torch.float32,
    )
    loader = DataLoader(TensorDataset(logits, torch.tensor([0, 4, 5, 5])), batch_size=3)
    m = evaluate_classifier(Fixed(), loader, "cpu", "t")
    assert (m["top1"], m["top5"], m["k"], m["num_images"]) == (50.0, 75.0, 5, 4)


def test_size_grouped_batches():
    sizes = [(3, 4), (5, 6), (3, 4), (3, 4), (5, 6)]
    batches = list(SizeGroupedBatches(sizes, batch_size=2))
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 4], [3]]


def test_toy_set_layout_and_determinism(tmp_path):
    _tool("make_toy_cls").main(
        _tool("make_toy_cls")
        .get_args_parser()
        .parse_args(
            [
                "--output",
                str(tmp_path / "a"),
                "--num-train",
                "2",
                "--num-test",
                "6",
                "--scale",
                "0.3",
            ]
        )
    )
    make_toy_cls(tmp_path / "b", num_train=2, num_test=6, seed=0, scale=0.3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == len(TOY_CLASSES) * 8
    assert {p.parts[0] for p in files} == {"train", "test"}
    assert {p.parts[1] for p in files} == set(TOY_CLASSES)
    digest = lambda p: hashlib.sha1(p.read_bytes()).hexdigest()  # noqa: E731
    assert all(digest(tmp_path / "a" / f) == digest(tmp_path / "b" / f) for f in files)
    aspects = []
    for f in files:
        if f.parts[0] == "test":
            with Image.open(tmp_path / "a" / f) as im:
                aspects.append(im.width / im.height)
    assert min(aspects) < 0.8 and max(aspects) > 1.25  # varied native aspect at test time


def test_train_classifier_tool_multi_size(tmp_path, monkeypatch):
    data = make_toy_cls(
        tmp_path / "toy",
        num_train=4,
        num_test=3,
        seed=1,
        classes=("circle", "square", "star"),
        scale=0.3,
    )
    seen = []

    class Recording(SPPClassifier):
        def forward(self, images):
            seen.append((self.training, tuple(images.shape[-2:])))
            return super().forward(images)

    monkeypatch.setattr(image_classification, "SPPClassifier", Recording)
    tool = _tool("train_classifier")
    out = tmp_path / "run"
    args = tool.get_args_parser().parse_args(
        [
            "--data",
            str(data),
            "--output",
            str(out),
            "--backbone",
            "zf5",
            "--sizes",
            "48",
            "36",
            "--epochs",
            "2",
            "--hidden",
            "16",
            "--batch-size",
            "6",
            "--lr",
            "0.01",
            "--device",
            "cpu",
        ]
    )
    metrics = tool.main(args)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["full_image"] == metrics["full_image"]
    assert [h["size"] for h in metrics["history"]] == [48, 36]
    # Training batches: epoch 1 at 48, epoch 2 the same crops resized to 36 (2 batches each).
    assert [s for train, s in seen if train] == [(48, 48)] * 2 + [(36, 36)] * 2
    assert metrics["full_image"]["k"] == 3 and metrics["full_image"]["top5"] == 100.0
    assert metrics["num_test"] == 9

    # Recompute the full-image top-1 independently: each test file at its native size.
    model = load_classifier(out / "model.pth")
    backbone = model.backbone
    correct, sizes = 0, set()
    for label, name in enumerate(model.class_names):
        for f in sorted((data / "test" / name).glob("*.png")):
            image = np.asarray(Image.open(f).convert("RGB"))
            sizes.add(image.shape[:2])
            with torch.no_grad():
                correct += int(model(backbone.preprocess(image)[None]).argmax(1)) == label
    assert len(sizes) > 1  # native sizes, not one crop size
    assert metrics["full_image"]["top1"] == pytest.approx(100.0 * correct / 9)

    # The paper's full-image view (short side resized, aspect kept), recomputed the same way.
    res = evaluate_folder(model, data / "test", crop=48, full_min_side=40, batch_size=4)
    correct = 0
    for label, name in enumerate(model.class_names):
        for f in sorted((data / "test" / name).glob("*.png")):
            im = Image.open(f).convert("RGB")
            g = 40 / min(im.size)
            w, h = max(round(im.width * g), 40), max(round(im.height * g), 40)
            image = np.asarray(im.resize((w, h), Image.BILINEAR))
            assert min(image.shape[:2]) == 40
            with torch.no_grad():
                correct += int(model(backbone.preprocess(image)[None]).argmax(1)) == label
    assert res["full_image"]["top1"] == pytest.approx(100.0 * correct / 9)
    assert res["center_crop"]["num_images"] == 9


@pytest.mark.cuda
def test_spp_classifier_cuda_matches_cpu(full_fp32_on_cuda):
    model = _small_classifier().eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
