"""The periodic checkpoint of fine-tuning (detectron2 / fvcore ``PeriodicCheckpointer``), for one
process or every rank of a ``torchrun`` job.

One file, written atomically by rank 0 at a pool boundary, holds what the ranks share (the head,
optimizer, scheduler, iteration and log: identical on every rank under DDP) and, per rank, what
is its own: the numpy RNG of its window scales, the torch generator of its mini-batch draws, its
torch global RNG (dropout; CUDA's too on a GPU) and its loss totals since the last log entry. A
rerun with the same inputs and the same number of ranks gives each rank its own states back. The
key holds the number of ranks, so a run with another number starts over.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch

from spp_detect import distributed as dist
from spp_detect.errors import UserInputError
from spp_detect.serialization import load_keyed, save_file

__all__ = ["FinetuneCheckpoint", "rank_seed", "rank_state", "restore_rank_state"]

logger = logging.getLogger(__name__)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s draws: ``seed`` itself on rank 0 (so rank 0 draws what one
    process draws), an independent seed derived from ``(seed, rank)`` on the others."""
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # below 2**63: any torch or numpy seed


def rank_state(rng: np.random.Generator, gen: torch.Generator, totals, device) -> Dict[str, Any]:
    """This rank's own part of a checkpoint (plain types and tensors)."""
    state = {
        "rng": rng.bit_generator.state,
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "totals": [float(v) for v in totals],
    }
    if torch.device(device).type == "cuda":  # dropout on the GPU draws from CUDA's RNG
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rank_state(state: Dict[str, Any], rng, gen, device) -> np.ndarray:
    """Put ``rank_state``'s RNG states back; returns the loss totals."""
    rng.bit_generator.state = state["rng"]
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return np.array(state["totals"], dtype=np.float64)


class FinetuneCheckpoint:
    """Everything fine-tuning needs to continue after a kill: head, optimizer, scheduler,
    iteration, the log so far, and every rank's RNG states. Written at a pool boundary (so no
    drawn mini-batch is lost) once ``every_seconds`` have passed since the last write.

    Under torchrun rank 0's clock decides, and the decision reaches every rank by a one-byte
    broadcast at each pool boundary (every ``pool_batches`` iterations), so all ranks save at
    the same iteration; the ranks' own states are gathered to rank 0, which writes the file.

    Args:
        path: the checkpoint file (``None``: no checkpoints).
        key: what the run depends on (``train.py``'s fine-tuning key); the number of ranks is
            added to it. A file with another key is ignored.
        every_seconds: minimum time between writes (0: at every pool boundary).
    """

    def __init__(
        self, path: Optional[Union[str, Path]], key: str, every_seconds: float = 300.0
    ) -> None:
        self.path = None if path is None else Path(path)
        self.key = f"{key}|ranks={dist.world_size()}"
        self.every = float(every_seconds)
        self._last = time.monotonic()

    def load(self) -> Optional[Dict[str, Any]]:
        """The saved state (``None``: start from scratch); ``state["ranks"][r]`` is rank r's.

        Under torchrun every rank reads the file (the output folder is shared by the ranks) and
        they compare what they saw: ranks that see different checkpoints raise the same
        ``UserInputError`` on every rank instead of training out of step.
        """
        state = None
        if self.path is not None:
            state = load_keyed(self.path, self.key, what="fine-tuning checkpoint")
        seen = dist.all_gather(None if state is None else int(state["iteration"]))
        if len(set(seen)) > 1:
            raise UserInputError(
                f"{self.path}: the ranks see different fine-tuning checkpoints (iterations "
                f"{seen}); --output must be one folder that every rank reads"
            )
        return state

    def maybe_save(
        self,
        shared_fn: Callable[[], Dict[str, Any]],
        own_fn: Callable[[], Dict[str, Any]],
        at_boundary: bool,
    ) -> None:
        """Write the checkpoint when it is due (see the class). ``shared_fn()``: the state the
        ranks share (called on rank 0 only); ``own_fn()``: this rank's ``rank_state``."""
        if self.path is None or not at_boundary:
            return
        if not dist.broadcast(time.monotonic() - self._last >= self.every):
            return
        ranks = dist.gather(own_fn())
        if ranks is not None:
            save_file(dict(shared_fn(), ranks=ranks, key=self.key), self.path)
        self._last = time.monotonic()
