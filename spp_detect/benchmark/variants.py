"""The detectors the speed report compares: SPP-net at one scale, at one scale with truncated-SVD
fc layers, at one scale with every test-time speed option (``spp-1scale-fast``), at five scales,
and the R-CNN baseline, all on the same backbone weights.

The test-time speed options (``FastOptions``: truncated SVD, ``test.fast_head``,
``test.fast_conv``) are offered to R-CNN too: when ``spp-1scale-fast`` is timed, R-CNN runs
with the same options (``rcnn_fast="auto"``), so that the speed-up compares like with like.

Each SPP-net variant is a configured copy of one detector (``with_settings``): the copies share
the backbone, fc and SVM weights, and the detector they come from is never changed. Without a
trained model the detectors get untrained heads (``attach_untrained_heads``): timing only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from spp_detect.config import DetectorConfig
from spp_detect.modeling.backbones import Backbone, build_backbone
from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.rcnn import RCNNDetector
from spp_detect.modeling.spp_net import SPPDetector
from spp_detect.modeling.svm import LinearSVMs

__all__ = [
    "METHODS",
    "SVD_FRACTIONS",
    "PAPER_SINGLE_SCALE",
    "PAPER_FIVE_SCALES",
    "attach_untrained_heads",
    "spp_variant",
    "FastOptions",
    "FAST_OPTIONS",
    "fast_settings",
    "build_method_detectors",
]

logger = logging.getLogger(__name__)

METHODS = ("spp-1scale", "spp-1scale-svd", "spp-1scale-fast", "spp-5scale", "rcnn")
# Fast R-CNN (sec. 3.1) keeps 1024 of fc6's and 256 of fc7's 4096 values: 1/4 and 1/16 of the
# width, so a narrower head gets ranks in the same proportion.
SVD_FRACTIONS = (4, 16)
# SPP-net sec. 4.1: one scale s = 688; five scales {480, 576, 688, 864, 1200}.
PAPER_SINGLE_SCALE = (688,)
PAPER_FIVE_SCALES = (480, 576, 688, 864, 1200)
# Untrained SVMs: weights small against fc7's scale and a negative bias, so that few windows
# pass the score threshold and NMS costs what it would after training.
_UNTRAINED_SVM_STD = 0.01
_UNTRAINED_SVM_BIAS = -1.0
# Untrained box regressor: tiny deltas keep the regressed boxes on their windows.
_UNTRAINED_BBOX_STD = 1e-4

WeightsArg = Union[str, bool, os.PathLike]


@dataclass(frozen=True)
class FastOptions:
    # Low-rank fc6/fc7 (test.svd_fc6/svd_fc7) at ranks hidden // svd_fractions.
    svd: bool = True
    # test.svd_method: "responses" (the principal directions of each layer's responses on
    # training windows, modeling/lowrank.py) keeps the toy mAP where the weight SVD ("weights",
    # Fast R-CNN) of our randomly initialised fc layers lost nearly all of it (72.2 -> 1.3).
    svd_method: str = "responses"
    # Ranks as fractions of the head's width: fc6 and fc7 to hidden // 8 (512 of 4096, 5.4x
    # fewer multiply-adds for ZF-5's head). Toy mAP, bf16 head (docs/speed.md): Lite0 (1024
    # wide) 0.858 float32, 0.867 at 128/128, 0.849 at 64/64; weight SVD at 128/128: 0.792.
    svd_fractions: Tuple[int, int] = (8, 8)
    # test.fast_head: fc6/fc7 arithmetic ("off", "bf16", "int8", "int8map";
    # modeling/fast_head.py). "int8map": toy mAP (docs/speed.md) ZF-5 at 512/512 0.2399
    # (bf16 0.2400, float32 0.2414), Lite0 at 128/128 0.866 (bf16 0.867), Lite0 full rank
    # 0.857 (bf16 0.858, float32 0.858).
    fast_head: str = "int8map"
    # test.fast_conv: conv pass ("off", "channels_last", "bf16"; modeling/fast_conv.py).
    fast_conv: str = "bf16"


# The fastest combination measured on a 2-core Zen 4 (docs/speed.md: tools/bench_fc.py,
# tools/bench_conv.py) whose toy mAP stays within 0.3 points of float32's.
FAST_OPTIONS = FastOptions()


def fast_settings(detector: WindowDetector, options: FastOptions = FAST_OPTIONS) -> Dict[str, Any]:
    """``with_settings`` keyword arguments for ``options`` on ``detector``'s head width."""
    h = detector.head.hidden
    out: Dict[str, Any] = {"fast_head": options.fast_head, "fast_conv": options.fast_conv}
    if options.svd and options.svd_method == "responses" and detector.head_stats is None:
        logger.warning(
            "%s model without fc response statistics (trained before they were saved): "
            "its fast head is not low-rank",
            detector.method,
        )
    elif options.svd:
        f6, f7 = options.svd_fractions
        out.update(svd_fc6=max(1, h // f6), svd_fc7=max(1, h // f7), svd_method=options.svd_method)
    return out


def untrained_head_stats(hidden: int, rank: int, seed: int = 0) -> Dict[str, Any]:
    """Response statistics for an untrained head (timing only): random orthonormal directions
    of the shapes training saves (``training/head_stats.py``)."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, hidden - 1)
    out: Dict[str, Any] = {"windows": 0}
    for name in ("fc6", "fc7"):
        basis, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=gen))
        out[name] = {
            "mean": torch.zeros(hidden),
            "basis": basis.contiguous(),
            "eigenvalues": torch.linspace(1.0, 0.0, rank),
            "total_variance": 1.0,
            "count": 0,
        }
    return out


@torch.no_grad()
def attach_untrained_heads(detector: WindowDetector, seed: int = 0) -> WindowDetector:
    """Untrained heads: timing only, no mAP. Sets random SVMs and a random box regressor of the
    trained shapes on ``detector`` (which must be freshly built for the report) and returns it.

    The SVMs score fc7 (weight ``[K, hidden]``), the regressor reads the pooled features
    (``[K, pooled_dim + 1, 4]``), so the classify and bbox_reg stages do the work trained ones
    would; the detections mean nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    k, hidden, dim = detector.num_classes, detector.head.hidden, detector.pooled_dim
    svms = LinearSVMs(k)
    svms.reset_weights(hidden)
    svms.weight = torch.randn(k, hidden, generator=gen) * _UNTRAINED_SVM_STD
    svms.bias = torch.full((k,), _UNTRAINED_SVM_BIAS)
    svms.trained = torch.ones(k, dtype=torch.bool)
    svms.set_feature_scale(1.0)
    reg = BoxRegressor(k)
    reg.weight = torch.randn(k, dim + 1, 4, generator=gen) * _UNTRAINED_BBOX_STD
    reg.trained = torch.ones(k, dtype=torch.bool)
    detector.svms = svms.to(detector.device)
    detector.bbox_regressor = reg.to(detector.device)
    detector.head_stats = untrained_head_stats(hidden, hidden // min(FAST_OPTIONS.svd_fractions))
    return detector


def spp_variant(
    detector: SPPDetector,
    method: str,
    single_scale: Sequence[int] = PAPER_SINGLE_SCALE,
    five_scales: Sequence[int] = PAPER_FIVE_SCALES,
    fast: FastOptions = FAST_OPTIONS,
) -> SPPDetector:
    """A configured copy of ``detector`` for one ``spp-*`` method (``detector`` is unchanged).

    ``spp-1scale``: ``single_scale``; ``spp-5scale``: ``five_scales``; ``spp-1scale-svd``:
    ``single_scale`` with fc6/fc7 compressed by truncated SVD at ranks ``hidden // 4`` and
    ``hidden // 16`` (Fast R-CNN's 1024 and 256 for a 4096-wide head); ``spp-1scale-fast``:
    ``single_scale`` with the ``fast`` options.
    """
    if method == "spp-1scale-fast":
        return detector.with_settings(scales=single_scale, **fast_settings(detector, fast))
    if method == "spp-1scale":
        return detector.with_settings(scales=single_scale)
    if method == "spp-5scale":
        return detector.with_settings(scales=five_scales)
    if method == "spp-1scale-svd":
        h = detector.head.hidden
        return detector.with_settings(
            scales=single_scale,
            svd_fc6=max(1, h // SVD_FRACTIONS[0]),
            svd_fc7=max(1, h // SVD_FRACTIONS[1]),
        )
    raise ValueError(f"not an SPP-net method: {method!r}")


def _fresh_backbone(config: DetectorConfig, weights: WeightsArg) -> Tuple[Backbone, str]:
    """The backbone with ``weights`` ("auto": ImageNet if available, else random) and a name
    of the weights used."""
    name, kwargs = config.model.backbone, dict(config.model.backbone_kwargs)
    if weights == "auto":
        try:
            return build_backbone(name, pretrained=True, **kwargs), "imagenet"
        except ValueError as exc:
            logger.warning("%s: no pretrained weights (%s); using random weights", name, exc)
            return build_backbone(name, pretrained=False, **kwargs), "random"
    if weights in (False, "none", "random"):
        return build_backbone(name, pretrained=False, **kwargs), "random"
    if weights in (True, "imagenet"):
        return build_backbone(name, pretrained=True, **kwargs), "imagenet"
    return build_backbone(name, pretrained=str(weights), **kwargs), str(weights)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )


def _check_models(model: Optional[WindowDetector], rcnn_model: Optional[WindowDetector]) -> None:
    if model is not None and model.method != "spp":
        raise ValueError(f"--model: an SPP-net model is needed, got a {model.method!r} model")
    if rcnn_model is not None and rcnn_model.method != "rcnn":
        raise ValueError(f"--rcnn-model: an R-CNN model is needed, got {rcnn_model.method!r}")
    for flag, m in (("--model", model), ("--rcnn-model", rcnn_model)):
        if m is not None and m.training:
            raise ValueError(f"{flag}: the detector is in training mode; time it in eval mode")
    if model is not None and rcnn_model is not None:
        if list(model.class_names) != list(rcnn_model.class_names):
            raise ValueError("the SPP-net and R-CNN models have different class lists")


def _origin(heads: str, backbone_weights: str, shared: bool) -> Dict[str, Any]:
    """Where a method's weights come from (``heads``: "model" or "untrained")."""
    return {"heads": heads, "backbone_weights": backbone_weights, "backbone_shared": shared}


def _rcnn_method(
    backbone: Backbone,
    source: str,
    class_names: Sequence[str],
    config: DetectorConfig,
    device: torch.device,
    model: Optional[WindowDetector],
    rcnn_model: Optional[WindowDetector],
    seed: int,
) -> Tuple[WindowDetector, Dict[str, Any]]:
    """The R-CNN detector (the model file's, else untrained heads on ``backbone``) and where
    its weights come from."""
    if rcnn_model is None:
        cfg = model.config if model is not None else config
        fresh = RCNNDetector(backbone, class_names, cfg).to(device).eval()
        return attach_untrained_heads(fresh, seed), _origin("untrained", source, True)
    # Each model keeps its own conv weights, so that its accuracy is its own; the times stay
    # comparable (same architecture, same work).
    shared = model is None or _same_weights(model.backbone, rcnn_model.backbone)
    if not shared:
        logger.warning("the SPP-net and R-CNN models have different backbone weights")
    return rcnn_model, _origin("model", source if shared else "rcnn-model", shared)


def describe_method(method: str, detector: WindowDetector) -> Dict[str, Any]:
    """What the report says about a method's network: widths, SVD ranks, scales or warp."""
    test, model = detector.config.test, detector.config.model
    info: Dict[str, Any] = {"pooled_dim": detector.pooled_dim, "hidden": detector.head.hidden}
    if test.svd_fc6 or test.svd_fc7:
        info["svd_ranks"] = [test.svd_fc6, test.svd_fc7]
    # The test-time speed options this method ran with (all "off"/0: float32 as trained).
    info["test_options"] = {
        "svd_ranks": [test.svd_fc6, test.svd_fc7],
        "svd_method": test.svd_method,
        "fast_head": test.fast_head,
        "fast_conv": test.fast_conv,
    }
    if method.startswith("spp"):
        info["scales"] = list(model.scales)
        info["levels"] = list(model.levels)
    else:
        info["warp_size"] = detector.warp_size
        info["context_pad"] = model.context_pad
        info["crop_batch"] = detector.crop_batch
    return info


def build_method_detectors(
    methods: Sequence[str],
    class_names: Sequence[str],
    config: DetectorConfig,
    device: torch.device,
    model: Optional[WindowDetector] = None,
    rcnn_model: Optional[WindowDetector] = None,
    weights: WeightsArg = "auto",
    single_scale: Sequence[int] = PAPER_SINGLE_SCALE,
    five_scales: Sequence[int] = PAPER_FIVE_SCALES,
    seed: int = 0,
    fast: FastOptions = FAST_OPTIONS,
    rcnn_fast: str = "auto",
) -> Tuple[Dict[str, WindowDetector], Dict[str, Dict[str, Any]]]:
    """One detector per method, in eval mode on ``device``, on one backbone's weights.

    Args:
        methods: names from ``METHODS``.
        class_names: K classes (a model's own list when a model is given).
        config: the configuration of fresh detectors (where no model is given).
        model: a trained SPP-net detector in eval mode on ``device`` (``load_detector``); the
            ``spp-*`` methods are configured copies of it, and it is left unchanged.
        rcnn_model: a trained R-CNN detector (eval mode, on ``device``); without it R-CNN gets
            untrained heads on the SPP model's backbone module (or on a fresh backbone).
        weights: backbone weights of fresh detectors ("auto", "imagenet", "none" or a file).
        seed: seed of the untrained heads.
        fast: the test-time speed options of ``spp-1scale-fast``.
        rcnn_fast: "auto" (R-CNN gets ``fast`` too when ``spp-1scale-fast`` is timed, so that
            its speed-up compares like with like), "on" or "off".
    Returns:
        ``{method: detector}`` in the order of ``methods`` and, per method, ``heads``
        ("model" or "untrained"), ``backbone_weights``, ``backbone_shared`` (False where the
        two model files' conv weights differ) and ``describe_method``'s fields.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {list(methods)}")
    _check_models(model, rcnn_model)
    if model is not None:
        backbone, source = model.backbone, "model"
    elif rcnn_model is not None:
        backbone, source = rcnn_model.backbone, "rcnn-model"
    else:
        backbone, source = _fresh_backbone(config, weights)
    spp_methods = [m for m in methods if m.startswith("spp")]
    out: Dict[str, WindowDetector] = {}
    info: Dict[str, Dict[str, Any]] = {}
    if spp_methods:
        base = model
        if base is None:
            fresh = SPPDetector(backbone, class_names, config).to(device).eval()
            base = attach_untrained_heads(fresh, seed)
        for m in spp_methods:
            out[m] = spp_variant(base, m, single_scale, five_scales, fast)
            info[m] = _origin("model" if model is not None else "untrained", source, True)
    if "rcnn" in methods:
        out["rcnn"], info["rcnn"] = _rcnn_method(
            backbone, source, class_names, config, device, model, rcnn_model, seed
        )
        if rcnn_fast not in ("auto", "on", "off"):
            raise ValueError(f"rcnn_fast must be auto, on or off, got {rcnn_fast!r}")
        if rcnn_fast == "on" or (rcnn_fast == "auto" and "spp-1scale-fast" in methods):
            rcnn_opts = fast_settings(out["rcnn"], fast)
            spp_fast = out.get("spp-1scale-fast")
            if spp_fast is not None and not spp_fast.config.test.svd_fc6:
                # Like with like: no low-rank fc for R-CNN when SPP-net's model had none.
                rcnn_opts = {k: v for k, v in rcnn_opts.items() if not k.startswith("svd")}
            out["rcnn"] = out["rcnn"].with_settings(**rcnn_opts)
    for m, det in out.items():
        info[m].update(describe_method(m, det))
    return {m: out[m] for m in methods}, {m: info[m] for m in methods}
