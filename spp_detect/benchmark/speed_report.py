"""The speed comparison of SPP-net and R-CNN (SPP-net sec. 4.2, Table 10): one run, same images,
same proposals, same backbone weights, per-stage medians.

Every method sees the same N images and the same selective-search windows, computed once per
image (timed on its own as the ``proposals`` stage, and cached on disk for the other tools). The
methods share one backbone module, so their conv weights are identical. Each method is warmed
up on the first image, then the images are timed one by one, the methods interleaved per image
so that a load change on a shared machine hits all of them alike; ``StageTimer`` synchronises
the device before each clock read.

Timing needs no trained model (the weights do not change the work): without a model file the
detectors get fresh heads, with random SVMs and box regressors of the right shapes, so that the
classify and box-regression stages cost what they would. With model files the accuracy (VOC AP
on the same N images) is reported as well.

R-CNN runs the whole backbone on every window: minutes per image on a CPU. ``rcnn_max_windows=K``
runs R-CNN's per-window network (crop_warp, conv, pool, in chunks of ``crop_batch``) on the first
K distinct windows of each image and scales those stages linearly to the full count; fc,
classify, box regression and NMS still run on every window (the K features repeated), so they
are measured, not extrapolated. The report flags such a method ``extrapolated``, with K. Linear
scaling is fair when K is a multiple of ``crop_batch`` (64): every chunk then does the same work.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from spp_detect.config import DetectorConfig
from spp_detect.datasets.images import read_image
from spp_detect.datasets.voc import VOCDataset
from spp_detect.modeling.backbones import build_backbone
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.build import load_detector
from spp_detect.modeling.spp_net import SPPDetector
from spp_detect.modeling.rcnn import RCNNDetector
from spp_detect.modeling.svm import LinearSVMs
from spp_detect.structures import Detections, clip_boxes, unique_boxes
from spp_detect.utils import StageTimer, atomic_write_json, atomic_write_text, resolve_device

__all__ = [
    "METHODS",
    "SpeedSettings",
    "machine_info",
    "randomize_heads",
    "build_method_detectors",
    "time_proposals",
    "capped_windows",
    "benchmark_detectors",
    "summarize_method",
    "run_speed_report",
]

logger = logging.getLogger(__name__)

METHODS = ("spp-1scale", "spp-1scale-svd", "spp-5scale", "rcnn")
# Fast R-CNN's truncated SVD keeps 1024 of fc6's and 256 of fc7's 4096 values: 1/4 and 1/16.
SVD_FRACTIONS = (4, 16)

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class SpeedSettings:
    # Methods to time, from METHODS.
    methods: Tuple[str, ...] = METHODS
    # Images of the split to time (the first N of ImageSets/Main/<split>.txt).
    num_images: int = 10
    # Untimed passes over the first image per method (allocator, kernels, caches).
    warmup: int = 1
    # R-CNN: time only the first K windows of each image and extrapolate (0: all windows).
    rcnn_max_windows: int = 0
    # SPP-net sec. 4.1: one scale s = 688; five scales {480, 576, 688, 864, 1200}.
    single_scale: Tuple[int, ...] = (688,)
    five_scales: Tuple[int, ...] = (480, 576, 688, 864, 1200)
    # Seed of the random heads (no model file).
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """CPU model (from /proc/cpuinfo), cores, torch threads, GPU name, versions, load average."""
    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
    }
    try:
        import cv2

        info["opencv"] = cv2.__version__
        info["opencv_threads"] = cv2.getNumThreads()
    except ImportError:  # pragma: no cover - opencv is a dependency
        pass
    if torch.cuda.is_available():
        idx = device.index if device is not None and device.type == "cuda" else None
        info["gpu"] = torch.cuda.get_device_name(idx if idx is not None else 0)
        info["cuda"] = torch.version.cuda
    info["load_average"] = _load_average()
    return info


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# detectors


@torch.no_grad()
def randomize_heads(detector: WindowDetector, seed: int = 0) -> WindowDetector:
    """Give a detector random SVMs and a random box regressor of the right shapes.

    The SVMs score fc7 (``[K, hidden]``), the regressor reads the pooled features
    (``[K, pooled_dim + 1, 4]``), as trained ones would; small weights keep the regressed
    boxes near their windows. Timing only: the detections mean nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    k, hidden, dim = detector.num_classes, detector.head.hidden, detector.pooled_dim
    svms = LinearSVMs(k)
    svms.reset_weights(hidden)
    svms.weight = torch.randn(k, hidden, generator=gen) * 0.01
    svms.bias = torch.full((k,), -1.0)
    svms.trained = torch.ones(k, dtype=torch.bool)
    svms.set_feature_scale(1.0)
    reg = BoxRegressor(k)
    reg.weight = torch.randn(k, dim + 1, 4, generator=gen) * 1e-4
    reg.trained = torch.ones(k, dtype=torch.bool)
    detector.svms = svms.to(detector.device)
    detector.bbox_regressor = reg.to(detector.device)
    return detector


def _with_svd(detector: SPPDetector, scales: Sequence[int]) -> SPPDetector:
    """A configured copy whose fc6/fc7 are compressed by truncated SVD (Fast R-CNN sec. 3.1)."""
    h = detector.head.hidden
    return detector.with_settings(
        scales=scales,
        svd_fc6=max(1, h // SVD_FRACTIONS[0]),
        svd_fc7=max(1, h // SVD_FRACTIONS[1]),
    )


def _build_backbone(config: DetectorConfig, weights: Union[str, bool, Path]):
    """The backbone with ``weights`` ("auto": ImageNet if available, else random)."""
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


def build_method_detectors(
    methods: Sequence[str],
    class_names: Sequence[str],
    config: DetectorConfig,
    settings: SpeedSettings,
    device: torch.device,
    model: Optional[WindowDetector] = None,
    rcnn_model: Optional[WindowDetector] = None,
    weights: Union[str, bool, Path] = "auto",
) -> Tuple[Dict[str, WindowDetector], Dict[str, Any]]:
    """One detector per method, all on one backbone module (identical conv weights).

    Args:
        methods: names from ``METHODS``.
        class_names: K classes (a model's own list when a model is given).
        config: the configuration of fresh detectors (ignored where a model is given).
        model: a trained SPP-net detector for ``spp-*`` (its scales replaced per method).
        rcnn_model: a trained R-CNN detector; without it R-CNN gets fresh heads on the SPP
            model's backbone (or on a fresh backbone).
    Returns:
        ``{method: detector}`` and a description per method (``heads``: "model" or
        "random", ``backbone_weights``, ``pooled_dim``, ``hidden``, scales or warp size;
        R-CNN's ``backbone_shared``: False where the two model files' conv weights differ).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {list(methods)}")
    if model is not None and model.method != "spp":
        raise ValueError(f"--model: an SPP-net model is needed, got a {model.method!r} model")
    if rcnn_model is not None and rcnn_model.method != "rcnn":
        raise ValueError(f"--rcnn-model: an R-CNN model is needed, got {rcnn_model.method!r}")
    info: Dict[str, Any] = {}
    if model is not None:
        backbone, source = model.backbone, "model"
    elif rcnn_model is not None:
        backbone, source = rcnn_model.backbone, "rcnn-model"
    else:
        backbone, source = _build_backbone(config, weights)
    backbone = backbone.to(device).eval()
    out: Dict[str, WindowDetector] = {}
    spp_base: Optional[SPPDetector] = None
    for m in methods:
        if not m.startswith("spp"):
            continue
        if spp_base is None:
            if model is not None:
                spp_base = model
            else:
                spp_base = randomize_heads(
                    SPPDetector(backbone, class_names, config).to(device), settings.seed
                )
        scales = settings.five_scales if m == "spp-5scale" else settings.single_scale
        if m == "spp-1scale-svd":
            out[m] = _with_svd(spp_base, scales)
        else:
            out[m] = spp_base.with_settings(scales=scales)
        info[m] = {"heads": "model" if model is not None else "random"}
    if "rcnn" in methods:
        if rcnn_model is not None:
            det = rcnn_model
            info["rcnn"] = {"heads": "model", "backbone_shared": True}
            if model is not None:
                if _same_weights(model.backbone, rcnn_model.backbone):
                    det.backbone = backbone  # one module: one copy of the conv weights
                else:
                    # Keep each model's own weights so that its accuracy is its own; the times
                    # are still comparable (same architecture, same work).
                    logger.warning("the SPP-net and R-CNN models have different backbone weights")
                    info["rcnn"]["backbone_shared"] = False
        else:
            cfg = model.config if model is not None else config
            det = randomize_heads(
                RCNNDetector(backbone, class_names, cfg).to(device), settings.seed
            )
            info["rcnn"] = {"heads": "random", "backbone_shared": True}
        out["rcnn"] = det
    for m, det in out.items():
        det.to(device).eval()
        shared = info[m].get("backbone_shared", True)
        info[m]["backbone_weights"] = source if shared else "rcnn-model"
        info[m]["pooled_dim"] = det.pooled_dim
        info[m]["hidden"] = det.head.hidden
        if det.config.test.svd_fc6 or det.config.test.svd_fc7:
            info[m]["svd_ranks"] = [det.config.test.svd_fc6, det.config.test.svd_fc7]
        if m.startswith("spp"):
            info[m]["scales"] = list(det.config.model.scales)
            info[m]["levels"] = list(det.config.model.levels)
        else:
            info[m]["warp_size"] = det.warp_size
            info[m]["context_pad"] = det.config.model.context_pad
            info[m]["crop_batch"] = det.crop_batch
    return {m: out[m] for m in methods}, info


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )


# ---------------------------------------------------------------------------------------------
# proposals


def time_proposals(
    records: Sequence[Any],
    images: Sequence[np.ndarray],
    config: DetectorConfig,
    cache_dir: Optional[PathLike],
) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """Selective search once per image, timed; the windows are cached on disk.

    Each image is segmented once, in this process, and its wall time is the ``proposals``
    stage of every method. The windows go to the ``ProposalCache`` at ``cache_dir`` (the cache
    ``tools/test_net.py`` reads); where the cache already holds this image's windows for these
    settings, those are used (they are the same windows: selective search is seeded).

    Returns:
        ``{image_id: np.ndarray[R, 4] float32}`` (xyxy in image pixels) and
        ``{image_id: seconds}``.
    """
    from spp_detect.proposals.cache import ProposalCache
    from spp_detect.proposals.selective_search import selective_search

    pc = config.proposals
    cache = None
    if cache_dir is not None:
        cache = ProposalCache(
            cache_dir,
            mode=pc.mode,
            max_proposals=pc.max_proposals,
            min_size=pc.min_size,
            resize_to=pc.resize_to or None,
        )
    boxes: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    for rec, image in tqdm(
        list(zip(records, images)), desc="proposals (timed)", unit="img", leave=False
    ):
        t0 = time.perf_counter()
        fresh = selective_search(
            image,
            mode=pc.mode,
            max_proposals=pc.max_proposals,
            min_size=pc.min_size,
            resize_to=pc.resize_to or None,
        )
        seconds[rec.image_id] = time.perf_counter() - t0
        result = fresh
        if cache is not None:
            key = cache.key(rec.image_id, path=rec.path)
            cached = cache.load(rec.image_id, key)
            if cached is None:
                cache.save(rec.image_id, key, fresh)
            else:
                if cached.shape != fresh.shape or not np.array_equal(cached, fresh):
                    logger.warning(
                        "%s: cached proposals differ from a fresh run; using the "
                        "cached ones (shared with the other tools)",
                        rec.image_id,
                    )
                result = cached
        boxes[rec.image_id] = result
    return boxes, seconds


def _valid_windows(proposals: np.ndarray, image_hw: Tuple[int, int]) -> np.ndarray:
    """The windows ``detect`` keeps (clipped to the image, positive area), in their order."""
    w = torch.as_tensor(np.asarray(proposals), dtype=torch.float32).reshape(-1, 4)
    w = clip_boxes(w, image_hw)
    keep = (w[:, 2] > w[:, 0]) & (w[:, 3] > w[:, 1])
    return w[keep].numpy()


# ---------------------------------------------------------------------------------------------
# timing


@contextmanager
def capped_windows(detector: RCNNDetector, max_windows: int) -> Iterator[Dict[str, Any]]:
    """Within the block, ``detector.detect`` runs the per-window network (R-CNN's crop_warp,
    conv, pool) on the first ``max_windows`` distinct windows only and charges those stages
    ``U / K`` times their measured time (U distinct windows, K measured); their features are
    repeated to all U windows, so fc, classify, bbox_reg and NMS run, and are timed, on the
    full count. The detections are meaningless. Yields a dict that each ``detect`` fills with
    ``unique_windows``, ``measured_windows``, ``scale`` and ``measured`` (the raw K-window
    seconds of the scaled stages).
    """
    if not isinstance(detector, RCNNDetector):
        raise ValueError(
            f"a window cap only applies to R-CNN (per-window conv), not {detector.method!r}"
        )
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    original = detector.compute_pooled
    record: Dict[str, Any] = {}

    def compute_pooled(image: torch.Tensor, windows: torch.Tensor, timer: StageTimer):
        # R-CNN's own deduplication (identical pixels, identical features) gives U.
        keep, inverse = unique_boxes(windows)
        u = int(keep.numel())
        k = min(max_windows, u)
        sub = StageTimer(timer.device)
        pooled, _ = original(image, windows[keep[:k]], sub)
        raw = sub.reset()
        scale = u / k
        for stage, sec in raw.items():
            timer.times[stage] += sec * scale
        record.update(unique_windows=u, measured_windows=k, scale=scale, measured=raw)
        return pooled[torch.arange(u, device=pooled.device) % k], inverse

    # An instance attribute shadows the class method for this block only.
    detector.compute_pooled = compute_pooled
    try:
        yield record
    finally:
        del detector.compute_pooled


def benchmark_detectors(
    detectors: Dict[str, WindowDetector],
    image_ids: Sequence[str],
    images: Sequence[np.ndarray],
    proposals: Dict[str, np.ndarray],
    proposal_seconds: Dict[str, float],
    device: torch.device,
    warmup: int = 1,
    max_windows: Optional[Dict[str, int]] = None,
) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, Dict[str, Detections]]]:
    """Per-image, per-stage times of every detector on the same images and windows.

    Args:
        detectors: ``{method: detector}``.
        images: RGB uint8 ``[H, W, 3]``, one per id.
        proposals: ``{image_id: [R, 4]}`` xyxy in image pixels.
        proposal_seconds: the timed selective search of each image (the ``proposals`` stage).
        warmup: untimed ``detect`` calls on the first image, per method, before timing.
        max_windows: ``{method: K}`` for R-CNN detectors: see ``capped_windows`` (the
            per-window network measured on K distinct windows, scaled linearly to all).
    Returns:
        ``{method: [per-image record]}`` with ``image_id``, ``windows`` (R, after clipping),
        ``unique_windows``, ``measured_windows``, ``scale``, ``stages`` (seconds, extrapolated
        where scaled, plus ``proposals``), ``measured_stages`` (as measured) and ``total``
        (proposals excluded); and ``{method: {image_id: Detections}}`` from the timed runs.
    """
    max_windows = {m: int(k) for m, k in (max_windows or {}).items() if k}
    windows = {
        i: _valid_windows(proposals[i], tuple(im.shape[:2])) for i, im in zip(image_ids, images)
    }

    def run(method: str, image: np.ndarray, image_id: str, timer: StageTimer):
        det = detectors[method]
        if method not in max_windows:
            return det.detect(image, windows[image_id], timer), {}
        with capped_windows(det, max_windows[method]) as record:
            return det.detect(image, windows[image_id], timer), record

    if images and warmup > 0:
        for method in detectors:
            for _ in range(warmup):
                run(method, images[0], image_ids[0], StageTimer(device))
    per_image: Dict[str, List[Dict[str, Any]]] = {m: [] for m in detectors}
    dets: Dict[str, Dict[str, Detections]] = {m: {} for m in detectors}
    timer = StageTimer(device)
    for image_id, image in tqdm(
        list(zip(image_ids, images)), desc="timing", unit="img", leave=False
    ):
        for method in detectors:
            timer.reset()
            dets[method][image_id], record = run(method, image, image_id, timer)
            times = timer.reset()
            measured = {**times, **record.get("measured", {})}
            n = len(windows[image_id])
            stages = {"proposals": float(proposal_seconds[image_id]), **times}
            per_image[method].append(
                {
                    "image_id": image_id,
                    "windows": n,
                    "unique_windows": record.get("unique_windows"),
                    "measured_windows": record.get("measured_windows", n),
                    "scale": record.get("scale", 1.0),
                    "extrapolated_stages": sorted(record.get("measured", {})),
                    "stages": stages,
                    "measured_stages": measured,
                    "total": sum(times.values()),
                }
            )
    return per_image, dets


def summarize_method(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Medians over images: per stage, ``total`` (per-image sums without proposals) and
    ``total_with_proposals``."""
    if not records:
        raise ValueError("no timed images to summarise")
    names: Dict[str, None] = {}
    for r in records:
        for k in r["stages"]:
            names.setdefault(k, None)
    stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in records) for k in names}
    extrapolated = any(r["scale"] != 1.0 for r in records)
    out = {
        "stages": stages,
        "total": statistics.median(r["total"] for r in records),
        "total_with_proposals": statistics.median(
            r["total"] + r["stages"].get("proposals", 0.0) for r in records
        ),
        "windows_per_image": [r["windows"] for r in records],
        "extrapolated": extrapolated,
    }
    if extrapolated:
        out["measured_windows"] = max(r["measured_windows"] for r in records)
        out["extrapolated_stages"] = sorted({s for r in records for s in r["extrapolated_stages"]})
    out["per_image"] = list(records)
    return out


# ---------------------------------------------------------------------------------------------
# the report


def _subset(dataset: VOCDataset, records: Sequence[Any]) -> Any:
    """A dataset view over some records (what ``VOCEvaluator`` reads)."""
    return types.SimpleNamespace(
        records=list(records), class_names=list(dataset.class_names), year=dataset.year
    )


def run_speed_report(
    voc_root: PathLike,
    output_dir: PathLike,
    year: str = "2007",
    split: str = "test",
    config: Optional[DetectorConfig] = None,
    settings: Optional[SpeedSettings] = None,
    model: Optional[PathLike] = None,
    rcnn_model: Optional[PathLike] = None,
    device: Optional[str] = None,
    weights: Union[str, bool, Path] = "auto",
    cache_dir: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Time SPP-net (1 and 5 scales) and R-CNN on the first N images of a split; write
    ``speed.json``, ``speed.md`` and ``speed.png`` in ``output_dir``.

    Args:
        voc_root: VOCdevkit folder; ``year`` and ``split`` pick ``VOC<year>``'s image list.
        config: fresh detectors' configuration (backbone, proposals, fc width); paper defaults.
        settings: methods, N, warm-up, R-CNN window cap, scale sets.
        model / rcnn_model: trained ``model.pt`` files; with them the VOC AP of each method on
            the N images is reported too.
        weights: backbone weights of fresh detectors: "auto" (ImageNet if available, else
            random), "imagenet", "none" or a file.
        cache_dir: proposal cache (default ``output_dir/cache/proposals``).
    Returns:
        The report (the content of ``speed.json``).
    """
    from spp_detect.evaluation.voc import VOCEvaluator
    from spp_detect.benchmark.plots import format_speed_markdown, plot_speed

    settings = settings or SpeedSettings()
    config = config or DetectorConfig()
    if settings.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {settings.num_images}")
    if settings.warmup < 0 or settings.rcnn_max_windows < 0:
        raise ValueError("--warmup and --rcnn-max-windows must be >= 0")
    output_dir = Path(output_dir)
    dev = resolve_device(device)
    loaded = load_detector(model, dev) if model is not None else None
    loaded_rcnn = load_detector(rcnn_model, dev) if rcnn_model is not None else None
    ref = loaded or loaded_rcnn
    class_names = ref.class_names if ref is not None else None
    dataset = VOCDataset(voc_root, year=year, split=split, class_names=class_names)
    if ref is not None and loaded_rcnn is not None and loaded is not None:
        if list(loaded.class_names) != list(loaded_rcnn.class_names):
            raise ValueError(f"{model} and {rcnn_model} have different class lists")
    records = dataset.records[: settings.num_images]
    if not records:
        raise ValueError(f"{dataset.voc_dir}: split {split!r} has no images")
    if len(records) < settings.num_images:
        logger.warning("split %s has only %d images", split, len(records))
    # Proposal settings come from ``config`` (the command line), trained models or not.
    proposal_config = config
    detectors, heads = build_method_detectors(
        settings.methods, dataset.class_names, config, settings, dev, loaded, loaded_rcnn, weights
    )
    load_before = _load_average()
    images = [read_image(r.path) for r in records]
    image_ids = [r.image_id for r in records]
    cache = Path(cache_dir) if cache_dir is not None else output_dir / "cache" / "proposals"
    proposals, ss_seconds = time_proposals(records, images, proposal_config, cache)
    caps = {"rcnn": settings.rcnn_max_windows} if settings.rcnn_max_windows else {}
    logger.info(
        "timing %s on %d images (%s windows per image) on %s",
        ", ".join(detectors), len(records),
        "/".join(str(len(proposals[i])) for i in image_ids), dev,
    )  # fmt: skip
    per_image, dets = benchmark_detectors(
        detectors, image_ids, images, proposals, ss_seconds, dev, settings.warmup, caps
    )

    methods: Dict[str, Any] = {}
    for m, recs in per_image.items():
        summary = summarize_method(recs)
        summary.update(heads[m])
        trained = (m.startswith("spp") and loaded is not None) or (
            m == "rcnn" and loaded_rcnn is not None
        )
        if trained and not summary["extrapolated"]:
            evaluator = VOCEvaluator(_subset(dataset, records))
            for image_id in image_ids:
                evaluator.process(image_id, dets[m][image_id])
            metrics = evaluator.evaluate()
            summary["mAP"] = metrics["mAP"]
            summary["AP"] = metrics["AP"]
            summary["metric"] = metrics["metric"]
        elif trained:
            summary["mAP"] = None
            summary["mAP_note"] = (
                f"not measured: timed on the first {summary['measured_windows']} windows only"
            )
        methods[m] = summary

    speedup: Dict[str, float] = {}
    speedup_with_proposals: Dict[str, float] = {}
    if "rcnn" in methods:
        for m in methods:
            if m != "rcnn" and methods[m]["total"] > 0:
                speedup[m] = methods["rcnn"]["total"] / methods[m]["total"]
                speedup_with_proposals[m] = (
                    methods["rcnn"]["total_with_proposals"] / methods[m]["total_with_proposals"]
                )
    report: Dict[str, Any] = {
        "methods": methods,
        "speedup": speedup,
        "speedup_with_proposals": speedup_with_proposals,
        "machine": machine_info(dev),
        "settings": {
            "voc_root": str(dataset.root),
            "year": dataset.year,
            "split": dataset.split,
            "num_images": len(records),
            "image_ids": image_ids,
            "image_sizes": [list(im.shape[:2]) for im in images],
            "device": str(dev),
            "backbone": next(iter(detectors.values())).backbone.name,
            "backbone_weights": heads[next(iter(detectors))]["backbone_weights"],
            "proposals": {
                "mode": proposal_config.proposals.mode,
                "max_proposals": proposal_config.proposals.max_proposals,
                "min_size": proposal_config.proposals.min_size,
                "windows_per_image": [int(len(proposals[i])) for i in image_ids],
                "cache_dir": str(cache),
            },
            "warmup": settings.warmup,
            "rcnn_max_windows": settings.rcnn_max_windows,
            "model": None if model is None else str(model),
            "rcnn_model": None if rcnn_model is None else str(rcnn_model),
            "order": "methods interleaved per image, after a warm-up per method",
            "load_average_before": load_before,
            "load_average_after": _load_average(),
            "classifier": (ref.config if ref is not None else config).test.classifier,
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "speed.json", report)
    atomic_write_text(output_dir / "speed.md", format_speed_markdown(report))
    try:
        plot_speed(report, output_dir / "speed.png")
    except Exception as exc:  # noqa: BLE001 - a failed plot must not lose the figures
        logger.warning("could not draw speed.png: %s", exc)
    for m, s in methods.items():
        logger.info(
            "%s: %.3f s per image (%.3f s with proposals)%s", m, s["total"],
            s["total_with_proposals"], " [extrapolated]" if s["extrapolated"] else "",
        )  # fmt: skip
    for m, x in speedup.items():
        logger.info("speed-up of %s over R-CNN: %.1fx", m, x)
    return report
