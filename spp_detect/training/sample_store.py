"""Per-class rows of features kept for a later fit, in memory or spilled to disk.

The box regressors' training windows (``bbox_training.BoxRegressionTrainer``) are thousands of
pooled conv5 rows per class: 5,000 per class x 20 VOC classes x 5,600 float16 values is 1.1 GB
(2.6 GB for ZF-5's 12,800). Held in RAM they made the SVM pass's peak grow with the dataset
until every class's cap filled (issue 10). ``RowStore(folder)`` keeps them in one file per
class instead: appends and reservoir replacements are positioned writes, and the fit reads a
class back in chunks (``chunks``), so its memory does not depend on how many rows there are.
``RowStore(None)`` keeps the same rows in memory (small runs and tests); both give the same
values.

Checkpoints (``state_dict``) of a spilled store are generations of hard-to-corrupt snapshots:
generation g copies every class file (``snap<g>.c<class>.bin``, written to a temporary name and
renamed) before the caller's checkpoint that refers to g is saved; g - 1 is deleted only when
g + 1 is made, so a ``kill -9`` at any point leaves the snapshot that the last saved checkpoint
names.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["RowStore", "spill_folder"]

# The raw bytes of a row in any 2-byte float dtype go to disk as int16 (numpy has no bfloat16).
_DISK_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class RowStore:
    """Rows of ``dim`` values in ``dtype`` per class, appended and overwritten by position.

    Args:
        dim: values per row.
        dtype: of the stored rows (float16 halves float32's memory or disk).
        folder: where to spill them (one file per class; created); None keeps them in memory.
    """

    def __init__(
        self, dim: int, dtype: torch.dtype = torch.float16, folder: Optional[Path] = None
    ) -> None:
        self.dim, self.dtype = int(dim), dtype
        self.folder = None if folder is None else Path(folder)
        self._rows: Dict[int, int] = {}
        self._mem: Dict[int, List[Tensor]] = {}
        self._generation = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._disk = _DISK_VIEW[torch.empty(0, dtype=dtype).element_size()]

    # -- rows ------------------------------------------------------------------------------
    def classes(self) -> List[int]:
        return sorted(c for c, n in self._rows.items() if n)

    def rows(self, c: int) -> int:
        return self._rows.get(c, 0)

    def append(self, c: int, x: Tensor) -> None:
        """Rows ``x`` (Tensor[n, dim], any float dtype) after the class's last row."""
        x = self._check(x)
        start = self.rows(c)
        self._rows[c] = start + x.shape[0]
        if self.folder is None:
            self._mem.setdefault(c, []).append(x)
            return
        with open(self._path(c), "r+b" if start else "wb") as f:
            f.seek(start * self._row_bytes)
            f.write(self._bytes(x))

    def assign(self, c: int, slots: Tensor, x: Tensor) -> None:
        """Row ``slots[i]`` of class ``c`` becomes ``x[i]`` (slots distinct, existing)."""
        x = self._check(x)
        if self.folder is None:
            parts = self._mem[c]
            if len(parts) > 1:
                parts[:] = [torch.cat(parts)]
            parts[0][slots] = x
            return
        order = torch.argsort(slots)
        with open(self._path(c), "r+b") as f:
            for j, i in zip(slots[order].tolist(), order.tolist()):
                f.seek(j * self._row_bytes)
                f.write(self._bytes(x[i : i + 1]))

    def read(self, c: int, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Rows ``start:stop`` of class ``c``: Tensor[n, dim] in ``dtype``, on the CPU."""
        n = self.rows(c)
        stop = n if stop is None else min(int(stop), n)
        start = min(int(start), stop)
        if self.folder is None:
            parts = self._mem.get(c, [])
            whole = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else self._empty()
            return whole[start:stop]
        if stop == start:
            return self._empty()
        raw = np.fromfile(
            self._path(c), dtype=self._np_disk, count=(stop - start) * self.dim,
            offset=start * self._row_bytes,
        )  # fmt: skip
        return torch.from_numpy(raw).view(self.dtype).view(stop - start, self.dim)

    def chunks(self, c: int, rows_per_chunk: int) -> Iterator[Tensor]:
        """Class ``c``'s rows in order, ``rows_per_chunk`` at a time."""
        for start in range(0, self.rows(c), rows_per_chunk):
            yield self.read(c, start, start + rows_per_chunk)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """In memory: the rows. Spilled: a new snapshot generation of every class file (see
        the module docstring), named by the state."""
        state: Dict[str, Any] = {"rows": dict(self._rows), "dim": self.dim}
        if self.folder is None:
            state["values"] = {c: self.read(c) for c in self.classes()}
            return state
        g = self._generation
        for c in self.classes():
            tmp = self.folder / f"snap{g}.c{c}.bin.tmp"
            shutil.copyfile(self._path(c), tmp)
            os.replace(tmp, self._snapshot(g, c))
        self._drop_snapshots(keep={g, g - 1})
        self._generation = g + 1
        state["generation"] = g
        return state

    def can_load(self, state: Dict[str, Any]) -> bool:
        """Whether ``state`` can be continued from (a spilled state needs its snapshot)."""
        if int(state.get("dim", -1)) != self.dim:
            return False
        if "values" in state or self.folder is None:
            return ("values" in state) == (self.folder is None)
        g = int(state["generation"])
        return all(self._snapshot(g, int(c)).is_file() for c, n in state["rows"].items() if n)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state_dict()`` (check ``can_load`` first)."""
        self._rows = {int(c): int(n) for c, n in state["rows"].items()}
        self._mem = {}
        if self.folder is None:
            self._mem = {int(c): [v.to(self.dtype)] for c, v in state["values"].items()}
            return
        g = int(state["generation"])
        for c in self.classes():
            tmp = self._path(c).with_suffix(".tmp")
            shutil.copyfile(self._snapshot(g, c), tmp)
            os.replace(tmp, self._path(c))
        self._generation = g + 1

    def remove(self) -> None:
        """Delete the spilled files (and the folder); nothing for a store in memory."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------
    @property
    def _row_bytes(self) -> int:
        return self.dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def _np_disk(self):
        return torch.empty(0, dtype=self._disk).numpy().dtype

    def _path(self, c: int) -> Path:
        return self.folder / f"c{c}.bin"

    def _snapshot(self, g: int, c: int) -> Path:
        return self.folder / f"snap{g}.c{c}.bin"

    def _drop_snapshots(self, keep: set) -> None:
        for p in self.folder.glob("snap*.bin"):
            m = re.match(r"snap(\d+)\.", p.name)
            if m and int(m.group(1)) not in keep:
                p.unlink(missing_ok=True)

    def _empty(self) -> Tensor:
        return torch.zeros(0, self.dim, dtype=self.dtype)

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RowStore: rows must be Tensor[n, {self.dim}], got {tuple(x.shape)}")
        return x.detach().to("cpu", self.dtype)

    def _bytes(self, x: Tensor) -> memoryview:
        return memoryview(x.contiguous().view(self._disk).numpy()).cast("B")


def spill_folder(checkpoint_path: Optional[Union[str, Path]]) -> Optional[Path]:
    """Where a pass checkpointed at ``checkpoint_path`` spills its rows (beside it)."""
    return None if checkpoint_path is None else Path(f"{checkpoint_path}.samples")
