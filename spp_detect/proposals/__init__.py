"""Object proposals: selective search (OpenCV), its on-disk cache, and precomputed files."""

from spp_detect.proposals.cache import (
    ProposalCache,
    compute_proposals,
    load_proposals_file,
    save_proposals_file,
)
from spp_detect.proposals.selective_search import DEFAULT_MIN_SIZE, selective_search

__all__ = [
    "DEFAULT_MIN_SIZE",
    "ProposalCache",
    "compute_proposals",
    "load_proposals_file",
    "save_proposals_file",
    "selective_search",
]
