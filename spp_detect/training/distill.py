"""ImageNet knowledge for fc6/fc7 before fine-tuning, by distillation from a per-window teacher.

SPP-net fine-tunes fc6/fc7 that were trained on ImageNet with the same pyramid (sec. 4.1); for
the backbones here no such layers exist, and fc6/fc7 learnt from random init on a few hundred
images keep little of what the conv features hold. So, before fine-tuning, fc6, fc7 and a small
projection are trained to reproduce, from a window's pooled conv5 features, the embedding that
the backbone's whole ImageNet network gives the same window cropped and warped (the R-CNN path:
16 px context, warp to the network's input size). This is ViLD's recipe (Gu et al., "Open-
vocabulary Object Detection via Vision and Language Knowledge Distillation", 2021): an L1 loss
between the L2-normalised region embedding and the L2-normalised embedding of the crop. No
labels are used: the windows are proposals of the training images.

Teacher embeddings are cached per image (float16, keyed by the teacher's full weights, the
windows and the crop settings), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..config import DistillConfig
from ..datasets.images import read_image
from ..modeling.backbones import ImageNetModel
from ..modeling.rcnn import context_windows, warp_windows
from ..serialization import load_keyed, save_file
from .conv_cache import weights_digest

__all__ = ["teacher_embedding", "TeacherCache", "distill_head", "choose_windows"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "spp_detect-teacher/1"
# Crops per teacher forward pass (bounds memory).
_CROP_BATCH = 64


def teacher_embedding(net: ImageNetModel, crops: Tensor) -> Tensor:
    """The ImageNet network's embedding before its last (1000-way) layer.

    Args:
        crops (Tensor[N, 3, S, S]): normalised, ``S = net.input_size``.
    Returns:
        Tensor[N, E]: EfficientNet-Lite0: the 1280-d pooled features; VGG-16 / AlexNet: fc7.
    """
    m = net.model
    if hasattr(m, "forward_head"):  # timm
        return m.forward_head(m.forward_features(crops), pre_logits=True)
    x = torch.flatten(m.avgpool(m.features(crops)), 1)
    return m.classifier[:-1](x)


class TeacherCache:
    """Teacher embeddings of chosen windows, one file per image under ``cache_dir``.

    Args:
        teacher: the whole ImageNet network (eval mode, on its device).
        cache_dir: folder of the files.
        context_pad: R-CNN's context around each window before warping (16 px).
    """

    def __init__(self, teacher: ImageNetModel, cache_dir: Path, context_pad: int = 16) -> None:
        self.teacher = teacher
        self.cache_dir = Path(cache_dir)
        self.context_pad = int(context_pad)
        self.device = next(teacher.parameters()).device
        # Hashed once: every file's key covers the full teacher weights.
        self._weights = weights_digest(teacher)

    def _key(self, windows: Tensor) -> str:
        h = hashlib.sha256()
        h.update(f"{CACHE_FORMAT}|{self.teacher.name}|{self._weights}|".encode())
        h.update(f"{self.teacher.input_size}|{self.context_pad}|".encode())
        h.update(windows.to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def _path(self, image_id: str, flipped: bool) -> Path:
        name = hashlib.sha1(f"{image_id}|{flipped}".encode()).hexdigest()[:20]
        return self.cache_dir / f"{name}.pt"

    @torch.no_grad()
    def compute(self, image: np.ndarray, windows: Tensor) -> Tensor:
        """Tensor[R, E] float32 embeddings of ``windows`` (xyxy, pixels of ``image``)."""
        x = self.teacher.preprocess(image).to(self.device)
        boxes = context_windows(windows.to(self.device), self.context_pad, self.teacher.input_size)
        out = []
        for start in range(0, boxes.shape[0], _CROP_BATCH):
            crops = warp_windows(x, boxes[start : start + _CROP_BATCH], self.teacher.input_size)
            out.append(teacher_embedding(self.teacher, crops).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def get(self, record, windows: Tensor) -> Tensor:
        """Cached or freshly computed embeddings, ``Tensor[R, E]`` float16 on the CPU."""
        key = self._key(windows)
        path = self._path(record.image_id, bool(getattr(record, "flipped", False)))
        data = load_keyed(path, key, what="teacher cache")
        if data is not None:
            return data["embeddings"]
        image = read_image(record.path)
        if getattr(record, "flipped", False):
            image = np.ascontiguousarray(image[:, ::-1])
        emb = self.compute(image, windows).to(torch.float16)
        save_file({"key": key, "embeddings": emb}, path)
        return emb


def choose_windows(images: Sequence, per_image: int, seed: int) -> List[Tensor]:
    """Indices of up to ``per_image`` random proposal windows per training image (the ground
    truths, listed first in ``TrainingImage.windows``, are left out: no labels are used)."""
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        g = int(im.gt_boxes.shape[0])
        n = int(im.windows.shape[0]) - g
        pick = rng.choice(n, size=min(per_image, n), replace=False) if n > 0 else np.zeros(0)
        out.append(torch.as_tensor(np.sort(pick), dtype=torch.long) + g)
    return out


def _collect(source, images, teacher_cache: TeacherCache, chosen) -> Tuple[Tensor, Tensor]:
    """Pooled student inputs ``[N, D]`` (float16, CPU) and teacher targets ``[N, E]``."""
    xs, ts = [], []
    for i, idx in enumerate(tqdm(chosen, desc="distill: teacher crops", unit="img", leave=False)):
        if idx.numel() == 0:
            continue
        ts.append(teacher_cache.get(images[i].record, images[i].windows[idx]))
        xs.append(source.rows(i, idx).to("cpu", torch.float16))
    if not xs:
        raise ValueError("distillation: the training images have no proposal windows")
    return torch.cat(xs), torch.cat(ts)


def distill_head(
    detector,
    source,
    images: Sequence,
    cfg: DistillConfig,
    teacher: ImageNetModel,
    cache_dir: Path,
) -> List[Dict[str, float]]:
    """Train ``detector.head``'s fc6 and fc7 (and a discarded projection) to reproduce the
    teacher's window embeddings (ViLD's L1 on normalised embeddings); sets the head's fc6 input
    scale from the same windows, so fine-tuning must keep it.

    Args:
        detector: a ``WindowDetector`` (its head is trained in place; the backbone is unused).
        source: prepared training window features (``rows(i, idx) -> Tensor[len(idx), D]``).
        images: ``TrainingImage`` list the source was prepared on.
        teacher: the backbone's whole ImageNet network.
        cache_dir: teacher embedding cache folder.
    Returns:
        The log: one dict per logged interval (iteration, loss, cosine, seconds).
    """
    cache = TeacherCache(teacher, cache_dir, detector.config.model.context_pad)
    chosen = choose_windows(images, cfg.windows_per_image, cfg.seed)
    inputs, targets = _collect(source, images, cache, chosen)
    head = detector.head
    head.set_input_scale(inputs[: 20 * cfg.windows_per_image].float())
    proj = nn.Linear(head.hidden, targets.shape[1]).to(detector.device)
    params = list(head.fc6.parameters()) + list(head.fc7.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.iterations))
    gen = torch.Generator().manual_seed(cfg.seed)
    targets = F.normalize(targets.float(), dim=1)
    head.train()
    log, t0, run = [], time.perf_counter(), np.zeros(3)
    log_every = max(1, cfg.iterations // 10)
    for it in tqdm(range(cfg.iterations), desc="distill fc6/fc7", unit="it", leave=False):
        idx = torch.randint(0, inputs.shape[0], (cfg.batch_size,), generator=gen)
        x = inputs[idx].to(detector.device, torch.float32)
        # No dropout: the student should reproduce the teacher, not be regularised against it.
        student = F.normalize(proj(head.fc7_features(x, dropout=False)), dim=1)
        target = targets[idx].to(detector.device)
        loss = F.l1_loss(student, target, reduction="sum") / x.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run += (loss.item(), float((student.detach() * target).sum(1).mean()), 1)
        if (it + 1) % log_every == 0 or it + 1 == cfg.iterations:
            entry = {"iteration": it + 1, "loss": run[0] / run[2], "cosine": run[1] / run[2]}
            entry["seconds"] = time.perf_counter() - t0
            log.append(entry)
            logger.info("distill it %d: L1 %.4f cos %.3f", it + 1, entry["loss"], entry["cosine"])
            run[:] = 0
    head.eval()
    return log
