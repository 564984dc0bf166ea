"""What a job uses, measured from outside its code: the peak RSS of a process tree sampled over
time (``RSSSampler``), and the bytes of files on disk (``folder_bytes``). For the scale report
(``benchmark/scale.py``)."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

__all__ = ["RSSSampler", "folder_bytes", "tree_rss"]

SAMPLE_SECONDS = 0.02


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_rss(pid: int) -> int:
    """Bytes of RSS of process ``pid`` and its descendants (Linux /proc; 0 if gone)."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


class RSSSampler:
    """Samples this process tree's RSS every ``SAMPLE_SECONDS`` in a thread."""

    def __init__(self) -> None:
        self.samples: List[Tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), tree_rss(pid)))
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> "RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def timeline(self, origin: float, step: float = 1.0) -> List[List[float]]:
        """``[seconds since origin, peak RSS]`` per ``step`` seconds (for the report's JSON)."""
        bins: Dict[int, int] = {}
        for t, r in self.samples:
            k = int((t - origin) // step)
            bins[k] = max(bins.get(k, 0), r)
        return [[k * step, r] for k, r in sorted(bins.items())]

    def peak(self, start: float = -math.inf, end: float = math.inf) -> int:
        """Largest sample in ``[start, end]``; a stage shorter than the sampling period gets
        the samples just around it (RSS at its start and end), never 0."""
        inside = [r for t, r in self.samples if start <= t <= end]
        if inside or not self.samples:
            return max(inside) if inside else 0
        before = [r for t, r in self.samples if t < start][-1:]
        after = [r for t, r in self.samples if t > end][:1]
        return max(before + after)
