"""Proposals computed once per image and kept on disk; proposals read from published files.

Cache layout: ``cache_dir/<image_id>.npz`` holding ``boxes`` (float32 [R, 4], continuous xyxy in
pixels of the image as ``datasets.images.read_image`` returns it, i.e. EXIF orientation applied)
and ``key`` (a JSON string). The key records the settings (mode, max_proposals, min_size,
resize_to, seed, base_k, inc_k, the OpenCV version, a format version) and the image's
fingerprint (a hash of the file's bytes by default, or its size and modification time); a file
whose key differs from the current one is recomputed and replaced. Files are written to a
temporary name in the same folder and renamed into place (``os.replace``), so an interrupted
run never leaves a partial ``.npz``; a file that cannot be read anyway (disk full, manual
edits) is logged and recomputed.

Errors: ``compute_proposals`` raises on the first image that cannot be read or segmented, with
the file's name in the message (``on_error="raise"``, the default), or logs it and leaves that
image out of the result (``on_error="skip"``).
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import hashlib
import json
import logging
import multiprocessing
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from spp_detect.datasets.images import ImageReadError, decode_image
from spp_detect.proposals.selective_search import (
    DEFAULT_BASE_K,
    DEFAULT_INC_K,
    DEFAULT_MIN_SIZE,
    MODES,
    selective_search,
)

__all__ = [
    "CACHE_VERSION",
    "ProposalCache",
    "compute_proposals",
    "load_proposals_file",
    "save_proposals_file",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CACHE_VERSION = 1  # bump when the meaning of cached boxes changes
FINGERPRINTS = ("content", "stat")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600  # leftovers of killed runs older than this are removed
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class ProposalCache:
    """Selective-search windows of images, one ``.npz`` per image in ``cache_dir``.

    Args:
        cache_dir: folder for the files (created when first written).
        mode, max_proposals, min_size, resize_to, seed, base_k, inc_k: passed to
            :func:`~spp_detect.proposals.selective_search.selective_search`; any change
            invalidates the cached files.
        fingerprint: how an image file is recognised as unchanged: ``"content"`` (BLAKE2 hash
            of its bytes: survives copies and touches, costs one read) or ``"stat"`` (size and
            modification time in ns: no hashing).
    """

    def __init__(
        self,
        cache_dir: PathLike,
        mode: str = "fast",
        max_proposals: Optional[int] = 2000,
        min_size: float = DEFAULT_MIN_SIZE,
        resize_to: Optional[int] = None,
        seed: int = 0,
        fingerprint: str = "content",
        base_k: int = DEFAULT_BASE_K,
        inc_k: int = DEFAULT_INC_K,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if fingerprint not in FINGERPRINTS:
            raise ValueError(f"fingerprint must be one of {FINGERPRINTS}, got {fingerprint!r}")
        import cv2

        self.cache_dir = Path(cache_dir)
        self.fingerprint = fingerprint
        self.settings: Dict[str, Any] = dict(
            version=CACHE_VERSION,
            opencv=cv2.__version__,
            mode=mode,
            max_proposals=None if max_proposals is None else int(max_proposals),
            min_size=float(min_size),
            resize_to=None if resize_to is None else int(resize_to),
            seed=int(seed),
            base_k=int(base_k),
            inc_k=int(inc_k),
        )
        self.computed = 0  # selective search runs by this object (statistics)
        self.reused = 0  # cache hits served by this object

    # -- paths and keys --------------------------------------------------------------------

    def path_for(self, image_id: str) -> Path:
        """The cache file of ``image_id`` (ids that are not plain file names get a hash)."""
        image_id = str(image_id)
        if _SAFE_ID.fullmatch(image_id) and len(image_id) <= 200:
            name = image_id
        else:
            digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).hexdigest()
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:].lstrip(".") + "-" + digest
        return self.cache_dir / f"{name}.npz"

    def key(
        self,
        image_id: str,
        path: Optional[PathLike] = None,
        data: Optional[bytes] = None,
        image: Optional[np.ndarray] = None,
    ) -> str:
        """The JSON key a valid cache file of this image must hold.

        The image is identified by ``data`` (the file's bytes) or ``path`` (per
        ``fingerprint``), or, for an in-memory image without a file, by a hash of its pixels.
        """
        if data is not None and self.fingerprint == "content":
            ident: Dict[str, Any] = dict(blake2b=_hash(data))
        elif path is not None:
            ident = self._file_ident(path)
        elif image is not None:
            arr = np.ascontiguousarray(image)
            ident = dict(pixels=_hash(arr.tobytes()), shape=list(arr.shape))
        else:
            raise ValueError(f"{image_id}: need an image path or the image itself")
        return json.dumps(
            dict(image_id=str(image_id), image=ident, **self.settings), sort_keys=True
        )

    def _file_ident(self, path: PathLike) -> Dict[str, Any]:
        try:
            if self.fingerprint == "content":
                return dict(blake2b=_hash(Path(path).read_bytes()))
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageReadError(
                path, "file not found (missing, or deleted after it was listed)"
            ) from None
        except OSError as e:
            raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from e
        return dict(size=st.st_size, mtime_ns=st.st_mtime_ns)

    # -- reading and writing ---------------------------------------------------------------

    def load(self, image_id: str, key: str) -> Optional[np.ndarray]:
        """Cached boxes of ``image_id`` if its file exists, is readable and holds ``key``."""
        f = self.path_for(image_id)
        if not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                stored = str(z["key"][()])
                boxes = np.asarray(z["boxes"])
        except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
            logger.warning(
                "%s: unreadable proposal cache file, recomputing (%s: %s)", f, type(e).__name__, e
            )
            return None
        if stored != key:
            logger.debug("%s: stale (image or settings changed), recomputing", f)
            return None
        if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype != np.float32:
            logger.warning("%s: malformed boxes %s %s, recomputing", f, boxes.shape, boxes.dtype)
            return None
        return boxes

    def save(self, image_id: str, key: str, boxes: np.ndarray) -> Path:
        """Write the cache file atomically (temporary file in the same folder, then rename)."""
        f = self.path_for(image_id)
        boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
        _atomic_savez(f, boxes=boxes, key=np.array(key))
        return f

    def get(
        self, image_id: str, path: Optional[PathLike] = None, image: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Proposals of one image, from the cache or computed (and then cached).

        Args:
            image_id: names the cache file.
            path: the image file (fingerprinted, and read when ``image`` is not given).
            image: the decoded image (np.ndarray[H, W, 3] uint8 RGB, as ``read_image`` gives
                for ``path``) to skip decoding; without ``path`` its pixels are the fingerprint.
        Returns:
            np.ndarray[R, 4] float32, continuous xyxy in pixels of the image.
        Raises:
            ImageReadError: the image cannot be read.
        """
        data = None
        if path is not None and self.fingerprint == "content":
            data = _read_bytes(path)
        k = self.key(image_id, path=path, data=data, image=image)
        boxes = self.load(image_id, k)
        if boxes is not None:
            self.reused += 1
            return boxes
        if image is None:
            if path is None:
                raise ValueError(f"{image_id}: need an image path or the image itself")
            image = decode_image(data if data is not None else _read_bytes(path), path)
        boxes = selective_search(image, **self._ss_kwargs())
        self.save(image_id, k, boxes)
        self.computed += 1
        return boxes

    def _ss_kwargs(self) -> Dict[str, Any]:
        s = self.settings
        names = ("mode", "max_proposals", "min_size", "resize_to", "seed", "base_k", "inc_k")
        return {k: s[k] for k in names}

    def clean_tmp(self, older_than: float = _STALE_TMP_SECONDS) -> int:
        """Remove temporary files left by killed runs; returns how many were removed."""
        if not self.cache_dir.is_dir():
            return 0
        now, n = time.time(), 0
        for f in self.cache_dir.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - f.stat().st_mtime > older_than:
                    f.unlink()
                    n += 1
            except OSError:
                pass
        return n


# --------------------------------------------------------------------------------------------
# many images


def _items(records: Iterable[Any]) -> Sequence[Tuple[str, Path]]:
    out = []
    seen: Dict[str, Path] = {}
    for r in records:
        if isinstance(r, (tuple, list)) and len(r) == 2:
            image_id, path = str(r[0]), Path(r[1])
        elif hasattr(r, "image_id") and hasattr(r, "path"):
            image_id, path = str(r.image_id), Path(r.path)
        else:
            raise ValueError(f"expected ImageRecord or (image_id, path), got {type(r).__name__}")
        if image_id in seen:
            if seen[image_id] != path:
                raise ValueError(
                    f"image_id {image_id!r} names two files: {seen[image_id]} and {path}"
                )
            continue
        seen[image_id] = path
        out.append((image_id, path))
    return out


def _init_worker() -> None:
    import cv2

    # One process per core does the parallel work; OpenCV's own threads would oversubscribe.
    cv2.setNumThreads(1)


def _compute_one(cache_kwargs: Dict[str, Any], image_id: str, path: str) -> np.ndarray:
    return ProposalCache(**cache_kwargs).get(image_id, path)


def compute_proposals(
    records: Iterable[Any],
    cache_dir: PathLike,
    jobs: int = 1,
    mode: str = "fast",
    max_proposals: Optional[int] = 2000,
    min_size: float = DEFAULT_MIN_SIZE,
    resize_to: Optional[int] = None,
    seed: int = 0,
    fingerprint: str = "content",
    base_k: int = DEFAULT_BASE_K,
    inc_k: int = DEFAULT_INC_K,
    progress: bool = True,
    on_error: str = "raise",
    errors: Optional[Dict[str, str]] = None,
) -> Dict[str, np.ndarray]:
    """Proposals of many images: cached ones are loaded, the rest computed in parallel.

    Args:
        records: ``ImageRecord``s (anything with ``image_id`` and ``path``) or
            ``(image_id, path)`` pairs.
        cache_dir, mode, max_proposals, min_size, resize_to, seed, fingerprint, base_k,
            inc_k: see
            :class:`ProposalCache`.
        jobs: worker processes for the images to compute (``1``: in this process). Workers
            are spawned, not forked, so they are safe to start from a process that already
            runs threads (PyTorch, OpenCV); as with any spawned pool, a calling script needs
            an ``if __name__ == "__main__":`` guard.
        progress: show a tqdm bar.
        on_error: ``"raise"``: the first image that fails stops the run with its file name in
            the message; ``"skip"``: log it and leave it out of the result.
        errors: with ``on_error="skip"``, filled with ``{image_id: "<path>: <reason>"}`` for
            the images left out.
    Returns:
        ``{image_id: np.ndarray[R, 4] float32}`` (continuous xyxy in image pixels), in the
        order of ``records``.
    """
    from tqdm import tqdm

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    items = _items(records)
    kwargs = dict(
        cache_dir=str(cache_dir),
        mode=mode,
        max_proposals=max_proposals,
        min_size=min_size,
        resize_to=resize_to,
        seed=seed,
        fingerprint=fingerprint,
        base_k=base_k,
        inc_k=inc_k,
    )
    cache = ProposalCache(**kwargs)
    cache.clean_tmp()
    t0 = time.perf_counter()
    result: Dict[str, np.ndarray] = {}
    failed: Dict[str, str] = {} if errors is None else errors
    n_failed_before = len(failed)
    todo = []
    bar = tqdm(total=len(items), desc="proposals", unit="img", disable=not progress)

    def fail(image_id: str, path: Path, e: BaseException) -> None:
        named = isinstance(e, ValueError) and str(path) in str(e)  # e.g. ImageReadError
        if on_error == "raise":
            if named:
                raise e
            raise ValueError(f"{path}: selective search failed ({type(e).__name__}: {e})") from e
        err = e if named else f"{path}: selective search failed ({type(e).__name__}: {e})"
        logger.warning("skipping image %s: %s", image_id, err)
        failed[image_id] = str(err)

    try:
        for image_id, path in items:  # cache hits first, in this process (cheap)
            try:
                data = _read_bytes(path) if fingerprint == "content" else None
                boxes = cache.load(image_id, cache.key(image_id, path=path, data=data))
            except ImageReadError as e:
                fail(image_id, path, e)
                bar.update(1)
                continue
            if boxes is None:
                todo.append((image_id, path))
            else:
                result[image_id] = boxes
                bar.update(1)
        reused = len(result)
        if jobs == 1 or len(todo) <= 1:
            for image_id, path in todo:
                try:
                    result[image_id] = cache.get(image_id, path)
                except Exception as e:  # noqa: BLE001 - reported per image
                    fail(image_id, path, e)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(
                min(jobs, len(todo)), mp_context=ctx, initializer=_init_worker
            ) as pool:
                futures = {pool.submit(_compute_one, kwargs, i, str(p)): (i, p) for i, p in todo}
                try:
                    for fut in cf.as_completed(futures):
                        image_id, path = futures[fut]
                        try:
                            result[image_id] = fut.result()
                        except BrokenProcessPool as e:  # not this image's fault
                            raise RuntimeError(
                                "proposal worker processes died (out of memory? or the calling "
                                "script lacks an `if __name__ == '__main__':` guard, which "
                                "spawned workers need)"
                            ) from e
                        except Exception as e:  # noqa: BLE001 - reported per image
                            fail(image_id, path, e)
                        bar.update(1)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    computed = len(result) - reused
    n_boxes = [len(b) for b in result.values()]
    logger.info(
        "proposals (%s): %d images, %d reused from %s, %d computed, %d failed, "
        "%.1f windows per image, %.1f s",
        mode,
        len(items),
        reused,
        cache_dir,
        computed,
        len(failed) - n_failed_before,
        float(np.mean(n_boxes)) if n_boxes else 0.0,
        time.perf_counter() - t0,
    )
    return {i: result[i] for i, _ in items if i in result}


# --------------------------------------------------------------------------------------------
# proposal files


def load_proposals_file(path: PathLike) -> Dict[str, np.ndarray]:
    """Read precomputed proposals.

    Formats:
        ``.npz``: one array per image, ``{image_id: float32 [R, 4]}``, continuous xyxy (what
            :func:`save_proposals_file` writes).
        ``.mat``: R-CNN's published selective-search files (``selective_search_data/
            voc_2007_<split>.mat``) with cell arrays ``images`` (ids) and ``boxes`` (one
            [R, 4] matrix per image, MATLAB's 1-based inclusive pixels in the order
            ``[y1 x1 y2 x2]``: R-CNN keeps the row/column order of the selective search
            code; Fast R-CNN's ``pascal_voc.py`` reads them with ``boxes[:, (1, 0, 3, 2)] - 1``).
            Converted here to continuous xyxy: ``x1 = c1 - 1, y1 = r1 - 1, x2 = c2, y2 = r2``
            (the pixel with 1-based column ``c2`` ends at continuous ``x = c2``).
    Returns:
        ``{image_id: np.ndarray[R, 4] float32}``, continuous xyxy in pixels of each image.
    Raises:
        ValueError: ``"<path>: <reason>"`` for a missing, unreadable or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: proposals file not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".mat":
        return _load_mat(path)
    raise ValueError(f"{path}: unknown proposals file type {suffix!r} (expected .npz or .mat)")


def save_proposals_file(path: PathLike, proposals: Dict[str, np.ndarray]) -> Path:
    """Write ``{image_id: [R, 4] continuous xyxy}`` as an ``.npz`` (atomically)."""
    path = Path(path)
    arrays = {
        str(k): np.ascontiguousarray(v, dtype=np.float32).reshape(-1, 4)
        for k, v in proposals.items()
    }
    _atomic_savez(path, **arrays)
    return path


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    out = {}
    for image_id, boxes in raw.items():
        out[image_id] = _check_boxes(path, image_id, boxes)
    return out


def _load_mat(path: Path) -> Dict[str, np.ndarray]:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # scipy comes with scikit-learn, a dependency
        raise ValueError(f"{path}: reading .mat files needs scipy") from e
    try:
        mat = loadmat(str(path))
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
        raise ValueError(
            f"{path}: MATLAB v7.3 (HDF5) files are not supported; save it with -v7 ({{e}})"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as a MATLAB file ({type(e).__name__}: {e})") from e
    missing = [k for k in ("images", "boxes") if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(
            f"{path}: expected variables 'images' and 'boxes' (R-CNN format), "
            f"missing {missing}, found {found}"
        )
    ids = _mat_strings(path, mat["images"])
    cells = np.asarray(mat["boxes"])
    cells = cells.ravel() if cells.dtype == object else [cells] if len(ids) == 1 else None
    if cells is None:
        raise ValueError(f"{path}: 'boxes' must be a cell array with one matrix per image")
    if len(cells) != len(ids):
        raise ValueError(f"{path}: {len(ids)} images but {len(cells)} box matrices")
    out = {}
    for image_id, b in zip(ids, cells):
        b = np.asarray(b, dtype=np.float64)
        if b.size == 0:
            out[image_id] = np.zeros((0, 4), dtype=np.float32)
            continue
        b = _check_boxes(path, image_id, b, cast=False)
        # R-CNN: 1-based inclusive [y1 x1 y2 x2] -> continuous [x1, y1, x2, y2].
        xyxy = np.stack([b[:, 1] - 1, b[:, 0] - 1, b[:, 3], b[:, 2]], axis=1)
        out[image_id] = xyxy.astype(np.float32)
    return out


def _mat_strings(path: Path, arr: np.ndarray) -> List[str]:
    """Image ids from a MATLAB cell array of strings (or a char matrix, one id per row)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":
        return [str(s).strip() for s in arr.ravel()]
    if arr.dtype != object:
        raise ValueError(f"{path}: 'images' must be a cell array of image ids, got {arr.dtype}")
    out = []
    for cell in arr.ravel():
        cell = np.asarray(cell)
        if cell.dtype.kind != "U" or cell.size != 1:
            raise ValueError(
                f"{path}: 'images' must hold one string per image, got {cell.dtype} {cell.shape}"
            )
        out.append(str(cell.ravel()[0]).strip())
    return out


def _check_boxes(path: Path, image_id: str, boxes: np.ndarray, cast: bool = True) -> np.ndarray:
    boxes = np.asarray(boxes)
    if boxes.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype.kind not in "fiu":
        raise ValueError(
            f"{path}: boxes of {image_id!r} must be a numeric [R, 4] array, got "
            f"{boxes.dtype} {boxes.shape}"
        )
    if not np.isfinite(boxes).all():
        raise ValueError(f"{path}: boxes of {image_id!r} hold non-finite values")
    return boxes.astype(np.float32) if cast else boxes


# --------------------------------------------------------------------------------------------
# small helpers


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _read_bytes(path: PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(
            path, "file not found (missing, or deleted after it was listed)"
        ) from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from e


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
