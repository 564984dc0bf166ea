"""Several processes and machines through ``torch.distributed``, launched by ``torchrun``.

    torchrun --standalone --nproc-per-node K tools/test_net.py ...      (one machine)
    torchrun --nnodes N --node-rank I --rdzv-endpoint HOST:PORT --nproc-per-node K ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables;
``process_group()`` joins the group from them (gloo on CPU, NCCL with CUDA, as torchvision's
detection references and detectron2's ``launch`` do) only when ``WORLD_SIZE > 1``. Without
torchrun nothing changes: one process, no process group, and every helper here is a no-op
(``rank() == 0``, ``world_size() == 1``, ``gather`` returns ``[obj]``).

Work is split as detectron2's ``InferenceSampler`` splits a test set: contiguous shards whose
sizes differ by at most one and no padding duplicates, so the shards concatenated in rank order
are the whole list, each item once. Python objects travel through a gloo group (also under
NCCL: pickled results belong in host memory). Every collective has the group's timeout
(``SPP_DETECT_DIST_TIMEOUT`` seconds, default 30 minutes), so a rank that dies cannot hang the
others for ever; ``all_ranks_ok`` turns one rank's exception into an error on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from typing import Any, Iterator, List, NoReturn, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import UserInputError

__all__ = [
    "RankFailedError",
    "TIMEOUT_ENV",
    "all_ranks_ok",
    "all_gather",
    "barrier",
    "broadcast",
    "broadcast_module",
    "end_process_group",
    "exit_rank",
    "gather",
    "is_distributed",
    "is_main_process",
    "launched_ranks",
    "local_device",
    "local_world_size",
    "process_group",
    "rank",
    "shard",
    "shard_range",
    "world_size",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a collective waits for the slowest rank before failing (torch's own default is also
# 30 minutes). Shards are balanced, so a longer wait means a rank is dead or stuck.
TIMEOUT_ENV = "SPP_DETECT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

_object_group: Optional[Any] = None  # a gloo group for pickled objects (NCCL moves tensors only)


class RankFailedError(RuntimeError):
    """Another rank failed; raised on the ranks that did not (the failing one re-raises its own
    exception, with its traceback)."""


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def local_world_size() -> int:
    """Ranks on this machine (torchrun's ``LOCAL_WORLD_SIZE``); 1 without a process group."""
    if not is_distributed():
        return 1
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserInputError(f"{TIMEOUT_ENV}={text!r}: expected seconds") from None
    if seconds <= 0:
        raise UserInputError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group(device: Optional[str] = None) -> Iterator[None]:
    """Join the process group that ``torchrun`` describes for the block, when there is one.

    With ``WORLD_SIZE`` unset or 1 (a plain ``python`` run), nothing happens. Otherwise the
    backend is NCCL when CUDA is used (``device`` not ``"cpu"`` and a GPU present; each rank
    takes ``cuda:LOCAL_RANK``), gloo otherwise. Nested use and an already initialised group
    are left alone. The group is destroyed when the block ends.
    """
    global _object_group
    if not launched_ranks() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise UserInputError("WORLD_SIZE > 1 but this PyTorch has no torch.distributed")
    use_cuda = torch.cuda.is_available() and (device is None or not str(device).startswith("cpu"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = _timeout()
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    _object_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    logger.info(
        "rank %d of %d (%s, collectives time out after %.0f s)",
        dist.get_rank(), dist.get_world_size(), backend, timeout.total_seconds(),
    )  # fmt: skip
    try:
        yield
    finally:
        end_process_group()


def end_process_group() -> None:
    """Leave the process group early (no collective; the others need not wait): from here on
    this process works alone, as without torchrun. Nothing happens when there is none."""
    global _object_group
    if dist.is_available() and dist.is_initialized():
        _object_group = None
        dist.destroy_process_group()


def launched_ranks() -> bool:
    """Whether this process is one of several that ``torchrun`` launched (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def exit_rank(code: int) -> NoReturn:
    """End this torchrun rank at once with ``code``, after flushing the logs and stdio.

    A rank that left through the interpreter's normal teardown, its work done and its group
    destroyed, was now and then killed by SIGABRT ("terminate called without an active
    exception", no Python frame; 1 run in 12 of a 2-rank gloo detect on 2 cores, torch 2.14):
    a C++ thread of the runtime destroyed while still joinable. torchrun then reported the
    whole job as failed. Every output is closed by then, so skipping the teardown loses nothing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def local_device(device: Optional[str]) -> Optional[str]:
    """The device of this rank: ``cuda`` (or none given, with a GPU) becomes
    ``cuda:LOCAL_RANK`` under torchrun, so K ranks on one machine use K GPUs. Anything else,
    and every device without torchrun, is returned unchanged."""
    if not is_distributed() or not torch.cuda.is_available():
        return device
    if device in (None, "", "auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shard_range(n: int, num_shards: Optional[int] = None, index: Optional[int] = None) -> range:
    """Indices of shard ``index`` of ``num_shards`` over ``range(n)`` (default: this rank's).

    Contiguous shards, the first ``n % num_shards`` one longer, no duplicates (detectron2's
    ``InferenceSampler``): ``shard_range(10, 3, i)`` is 0-3, 4-6, 7-9.
    """
    num_shards = world_size() if num_shards is None else num_shards
    index = rank() if index is None else index
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"shard {index} of {num_shards}")
    size, extra = divmod(n, num_shards)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def shard(items: Sequence[T], num_shards: Optional[int] = None, index: Optional[int] = None):
    """This rank's contiguous part of ``items`` (``shard_range``); all of it in one process."""
    return [items[i] for i in shard_range(len(items), num_shards, index)]


def barrier() -> None:
    """Wait for every rank (with the group's timeout); nothing in one process."""
    if is_distributed():
        dist.barrier(group=_object_group)


def gather(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Gather a picklable ``obj`` from every rank on rank ``dst``.

    Returns:
        On ``dst``: the objects in rank order; elsewhere ``None``. One process: ``[obj]``.
    """
    if not is_distributed():
        return [obj]
    out: Optional[List[Any]] = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_object_group)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (what the others pass is ignored); ``obj``
    itself in one process."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_object_group)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place.

    Tensors go through the default group (NCCL moves them GPU to GPU), so a large head needs no
    pickling and no shared file system. Nothing happens in one process.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)


def all_gather(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_object_group)
    return out


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, UserInputError) else f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def all_ranks_ok(step: str) -> Iterator[None]:
    """A block that every rank runs and that fails on every rank when it fails on one.

    On leaving the block the ranks exchange their outcome. The rank whose block raised
    re-raises its own exception; the others raise ``RankFailedError`` naming that rank and its
    error (a ``UserInputError`` when the failure was the user's input, so each rank reports one
    line). In one process this is an empty wrapper.
    """
    if not is_distributed():
        yield
        return
    error: Optional[BaseException] = None
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - told to the other ranks, then re-raised
        error = exc
    mine = None if error is None else (isinstance(error, UserInputError), _describe(error))
    outcomes = all_gather(mine)
    if error is not None:
        raise error
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        r, (user, text) = failed[0]
        message = f"{step}: rank {r} of {world_size()} failed: {text}"
        raise UserInputError(message) if user else RankFailedError(message)
