"""``ProposalSettings``: the one description of how proposals are computed.

Training, testing, ``spp-detect detect``, the speed report and the demo all take the same frozen
object (``DetectorConfig.proposals``), so the windows a model is tested on are made exactly as
the windows it was trained on, and every proposal cache is keyed by these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = ["MODES", "ProposalSettings"]

MODES = ("fast", "quality")


@dataclass(frozen=True)
class ProposalSettings:
    # Selective search mode: "fast" as in R-CNN and SPP-net (sec. 4.1); "quality" on request.
    mode: str = "fast"
    # About 2,000 windows per image (sec. 4.1); 0 or less keeps every window.
    max_proposals: int = 2000
    # Windows with a side below this many pixels are dropped: R-CNN's selective_search_boxes.m
    # ("minBoxWidth (default = 20 pixels)").
    min_size: int = 20
    # Images whose longer side exceeds this are segmented at that size and the windows scaled
    # back (selective search time grows faster than the pixel count); 0: never resize. 2000 is
    # the SPP_net code's cap on the resized image's longer side, so no window is finer than the
    # conv pass can see.
    resize_to: int = 2000
    # Seed of OpenCV's pseudo-random region ranking (same image, same windows in any process).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"proposals.mode must be one of {MODES}, got {self.mode!r}")
        if self.min_size < 0 or self.resize_to < 0:
            raise ValueError("proposals.min_size and proposals.resize_to must be >= 0")

    def selective_search_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``selective_search`` for these settings."""
        return dict(
            mode=self.mode,
            max_proposals=self.max_proposals if self.max_proposals > 0 else None,
            min_size=self.min_size,
            resize_to=self.resize_to or None,
            seed=self.seed,
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kwargs: Optional[Any]) -> "ProposalSettings":
        return dataclasses.replace(self, **{k: v for k, v in kwargs.items() if v is not None})
