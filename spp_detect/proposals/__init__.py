"""Object proposals: selective search (OpenCV), its settings, its on-disk cache, the parallel
computation over many images, and precomputed proposal files."""

from spp_detect.proposals.cache import ProposalCache
from spp_detect.proposals.compute import compute_proposals
from spp_detect.proposals.files import load_proposals_file, save_proposals_file
from spp_detect.proposals.selective_search import selective_search
from spp_detect.proposals.settings import ProposalSettings

__all__ = [
    "ProposalCache",
    "ProposalSettings",
    "compute_proposals",
    "load_proposals_file",
    "save_proposals_file",
    "selective_search",
]
