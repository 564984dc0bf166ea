"""``ProposalSettings``: the one description of how proposals are computed.

Training, testing, ``spp-detect detect``, the speed report and the demo all take the same frozen
object (``DetectorConfig.proposals``), so the windows a model is tested on are made exactly as
the windows it was trained on, and every proposal cache is keyed by all of these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

from spp_detect.errors import UserInputError

__all__ = ["MODES", "ProposalSettings"]

MODES = ("fast", "quality")


@dataclass(frozen=True)
class ProposalSettings:
    # Selective search mode: "fast" as in R-CNN and SPP-net (sec. 4.1); "quality" on request
    # (five colour spaces, five k values, four strategies: about 3x slower, more windows).
    mode: str = "fast"
    # About 2,000 windows per image (sec. 4.1); 0 or less keeps every window.
    max_proposals: int = 2000
    # Windows with a side below this many pixels are dropped: R-CNN's selective_search_boxes.m
    # ("minBoxWidth (default = 20 pixels)").
    min_size: int = 20
    # Images whose longer side exceeds this are segmented at that size and the windows scaled
    # back (selective search time grows faster than the pixel count); 0: never resize. Measured
    # (docs/proposals.md, tools/bench_proposals.py) on 1,000-2,000 px images: 1000 is 6.3x
    # faster than 2000 (9.7 vs 61.4 s per image) at the same recall (1.00 at IoU 0.5 and 0.7,
    # ~1,800 windows), and still finer than the conv pass at the paper's scale 688 (917 px on
    # the longer side of a 4:3 image); VOC-sized images (500 px) are never resized.
    resize_to: int = 1000
    # Seed of OpenCV's pseudo-random region ranking (same image, same windows in any process).
    seed: int = 0
    # Felzenszwalb-Huttenlocher thresholds k = base_k + i * inc_k (i < 3 in fast mode, i < 5 in
    # quality mode). R-CNN's fast mode (selective_search_boxes.m) uses k = 50, 100; OpenCV's
    # defaults (150, 150) give 350 to 1,400 windows per 500x375 photo, starting at R-CNN's
    # k = 50 gives 1,300 to 2,400, near the papers' ~2,000, for about 15% more time.
    base_k: int = 50
    inc_k: int = 50

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserInputError(f"proposals.mode must be one of {MODES}, got {self.mode!r}")
        if self.min_size < 0 or self.resize_to < 0:
            raise UserInputError("proposals.min_size and proposals.resize_to must be >= 0")
        if self.base_k < 1 or self.inc_k < 1:  # inc_k = 0 would loop forever inside OpenCV
            raise UserInputError(
                f"proposals.base_k and proposals.inc_k must be >= 1, got {self.base_k}, "
                f"{self.inc_k}"
            )

    @property
    def limit(self) -> Optional[int]:
        """``max_proposals`` as a slice bound: ``None`` keeps every window."""
        return self.max_proposals if self.max_proposals > 0 else None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kwargs: Optional[Any]) -> "ProposalSettings":
        return dataclasses.replace(self, **{k: v for k, v in kwargs.items() if v is not None})
