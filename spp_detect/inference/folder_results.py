"""The files ``detect_folder`` writes, streamed as it goes so that memory stays flat in the
number of images and a killed run can be resumed.

- ``detections.jsonl``: one JSON object per line and per image, appended and flushed as each
  image finishes: ``{file, path, width, height, detections: [{label, score, box: [x1, y1, x2,
  y2]}], annotated}`` for a processed image, ``{file, path, reason, stage}`` for one that was
  skipped (unreadable, too small, ...) or failed (stage "detect"). Boxes are in the continuous
  pixel frame of the upright image (``w = x2 - x1``). When a file appears twice (a failure
  retried by a resumed run), its last line counts.
- ``detections.json``: the run's settings (``model``, ``method``, ``class_names``, ``test``,
  ``scales``, ``proposals``, ...) with ``"complete": false`` while the run goes on; at the end,
  the same plus ``images`` (the processed images, in the order they were processed), ``errors``,
  ``summary`` and ``"complete": true``.
- ``detections_coco.json``: the COCO results format (a list of ``{image_id, category_id, bbox:
  [x, y, w, h], score}``, what ``pycocotools.coco.COCO.loadRes`` reads), and
  ``coco_images.json``: the ids it uses (``images``: ``{id, file_name, width, height}``;
  ``categories``: ``{id, name}`` with ``id = label + 1``; empty ``annotations``).

Every file but the JSON Lines one is written atomically (a reader never sees half of it).

Under torchrun each rank appends to its own part, ``detections.rank<R>.jsonl``; at the end
rank 0 appends the parts in rank order to ``detections.jsonl`` (``merge_parts``) and writes the
other files from it. A resumed run first merges the parts an interrupted run left.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from spp_detect.errors import UserInputError
from spp_detect.utils import atomic_path, atomic_write_json, json_safe

__all__ = [
    "FolderResults",
    "merge_parts",
    "part_name",
    "read_records",
    "to_coco_results",
    "DETECTIONS_FILE",
    "JSONL_FILE",
    "COCO_RESULTS_FILE",
    "COCO_IMAGES_FILE",
    "IMAGES_DIR",
    "RESUME_KEYS",
]

DETECTIONS_FILE = "detections.json"
JSONL_FILE = "detections.jsonl"
COCO_RESULTS_FILE = "detections_coco.json"
COCO_IMAGES_FILE = "coco_images.json"
IMAGES_DIR = "images"
# A resumed run may only add to results made with the same model and settings.
RESUME_KEYS = ("model_sha256", "method", "class_names", "test", "scales", "proposals")
# Failures a resumed run tries again: the detector's (out of memory, ...) and dead workers.
_RETRY_STAGES = ("detect", "worker")


def _dumps(obj: Any) -> str:
    """Strict one-line JSON (NaN as null)."""
    return json.dumps(json_safe(obj), allow_nan=False)


def read_records(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line number, record)`` of every complete line of a JSON Lines file; a last line
    without its newline (the run was killed while writing it) is left out.

    Raises:
        UserInputError: a complete line that is not a JSON object.
    """
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "file" not in record:
                raise UserInputError(f"{path}:{lineno}: not a detections record")
            yield lineno, record


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that has no newline (a run killed mid-write) so appends stay valid."""
    with open(path, "rb+") as f:
        end = good = 0
        for line in f:
            end += len(line)
            if line.endswith(b"\n"):
                good = end
        if good != end:
            f.truncate(good)


def _coco_entries(k: int, entry: Mapping[str, Any], cat_id: Mapping[str, int]):
    """COCO results of one image entry (``image_id = k``). COCO boxes are continuous too, so
    ``w = x2 - x1`` with no ``+1``."""
    for d in entry["detections"]:
        x1, y1, x2, y2 = d["box"]
        yield {
            "image_id": k,
            "category_id": cat_id[d["label"]],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": d["score"],
        }


def _coco_image(k: int, entry: Mapping[str, Any]) -> Dict[str, Any]:
    return {"id": k, "file_name": entry["file"], "width": entry["width"], "height": entry["height"]}


def to_coco_results(entries: Sequence[Mapping[str, Any]], class_names: Sequence[str]):
    """COCO results and the id mapping they use.

    Args:
        entries: ``detections.json`` image entries (``file``, ``width``, ``height``,
            ``detections`` with ``box`` = continuous xyxy pixels).
    Returns:
        ``(results, mapping)``: ``results`` a list of ``{image_id, category_id, bbox: [x, y,
        w, h], score}`` (``image_id`` = 1-based position in ``entries``, ``category_id`` =
        label + 1), and ``mapping`` = ``{images, categories, annotations: []}``.
    """
    cat_id = {name: i + 1 for i, name in enumerate(class_names)}
    results = [r for k, e in enumerate(entries, 1) for r in _coco_entries(k, e, cat_id)]
    images = [_coco_image(k, e) for k, e in enumerate(entries, 1)]
    categories = [{"id": cat_id[n], "name": n} for n in class_names]
    return results, {"images": images, "categories": categories, "annotations": []}


def part_name(rank: int) -> str:
    """The JSON Lines part that rank ``rank`` of a torchrun job writes."""
    return f"detections.rank{rank}.jsonl"


def _part_files(output_dir: Path) -> List[Path]:
    """The rank parts in ``output_dir``, in rank order."""
    found = []
    for path in Path(output_dir).glob("detections.rank*.jsonl"):
        number = path.name[len("detections.rank") : -len(".jsonl")]
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def merge_parts(output_dir: Path) -> None:
    """Append the complete lines of every rank part, in rank order, to ``detections.jsonl``
    (atomically: a new file replaces it) and delete the parts. Contiguous shards (see
    ``spp_detect.distributed.shard``) keep the images in input order."""
    parts = _part_files(output_dir)
    if not parts:
        return
    jsonl = Path(output_dir) / JSONL_FILE
    with atomic_path(jsonl) as tmp, open(tmp, "wb") as out:
        for path in ([jsonl] if jsonl.is_file() else []) + parts:
            with open(path, "rb") as f:
                for line in f:
                    if line.endswith(b"\n"):  # a cut last line: that image is redone
                        out.write(line)
    for path in parts:
        path.unlink()


class _JsonArray:
    """Writes a JSON array one element per line to an open text file."""

    def __init__(self, f: IO[str], indent: str = "") -> None:
        self.f, self.indent, self.count = f, indent, 0
        f.write("[")

    def add(self, obj: Any) -> None:
        self.f.write(("\n" if self.count == 0 else ",\n") + self.indent + "  " + _dumps(obj))
        self.count += 1

    def close(self) -> None:
        self.f.write(("\n" + self.indent + "]") if self.count else "]")


@contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    """A text file that replaces ``path`` only when the block ends without an exception."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f


def _write_array(f: IO[str], items: Sequence[Any], indent: str = "") -> None:
    array = _JsonArray(f, indent)
    for item in items:
        array.add(item)
    array.close()


class FolderResults:
    """The output files of one ``detect_folder`` run (see the module docstring).

    Args:
        output_dir: the output folder (created).
        header: the run's settings; ``RESUME_KEYS`` must match an earlier run to resume it.
        resume: keep the records of an earlier run in ``output_dir`` and append to them.
    """

    def __init__(
        self, output_dir: Path, header: Dict[str, Any], resume: bool, part: Optional[int] = None
    ) -> None:
        self.output_dir = Path(output_dir)
        self.header = json.loads(_dumps(header))  # the values as JSON gives them back
        self.resume = resume
        self.part = part
        self.jsonl = self.output_dir / JSONL_FILE
        # Where this process appends: the JSON Lines file itself, or its rank's part.
        self.writes_to = self.jsonl if part is None else self.output_dir / part_name(part)
        self.detections = self.output_dir / DETECTIONS_FILE
        self._file: Optional[IO[str]] = None

    # -- during the run -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Before any process starts (one process, or rank 0 of a torchrun job): fold the
        rank parts of an interrupted run into ``detections.jsonl`` when resuming, else delete
        them, so that every rank then reads one file."""
        if not self.resume:
            for path in _part_files(self.output_dir):
                path.unlink()
            return
        if self.jsonl.is_file():
            self._check_header()
        merge_parts(self.output_dir)

    def start(self) -> Set[str]:
        """Open the file this process appends to; returns the files an earlier run has
        finished (empty unless resuming). Raises ``UserInputError`` when that run used other
        settings. ``prepare()`` must have run first."""
        done: Set[str] = set()
        keep = self.resume and self.jsonl.is_file()
        if keep:
            self._check_header()
            if self.part is None:
                _drop_partial_line(self.jsonl)
            for _, rec in read_records(self.jsonl):
                if "detections" not in rec and rec.get("stage") in _RETRY_STAGES:
                    done.discard(rec["file"])  # its last record is a failure worth retrying
                else:
                    done.add(rec["file"])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        append = keep and self.part is None
        self._file = open(self.writes_to, "a" if append else "w", encoding="utf-8")
        if self.part in (None, 0):
            doc = dict(self.header, complete=False, images=[], errors=[], partial=JSONL_FILE)
            atomic_write_json(self.detections, doc)
        return done

    def _check_header(self) -> None:
        try:
            old = json.loads(self.detections.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserInputError(
                f"{self.detections}: missing or unreadable, cannot check that --resume uses "
                "the same model and settings; choose another --output"
            ) from None
        for key in RESUME_KEYS:
            if old.get(key) != self.header.get(key):
                raise UserInputError(
                    f"{self.detections}: cannot resume: written with {key} = {old.get(key)!r}, "
                    f"this run has {self.header.get(key)!r}; choose another --output"
                )

    def add(self, record: Dict[str, Any]) -> None:
        """Append one image's record and flush it to the operating system."""
        assert self._file is not None, "start() first"
        self._file.write(_dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    # -- at the end ---------------------------------------------------------------------------
    def finish(self, run_summary: Dict[str, Any]) -> Dict[str, Any]:
        """Close the JSON Lines file and write ``detections.json`` and the COCO files from it,
        one record at a time.

        Returns:
            ``run_summary`` plus the totals over every file's last record (``processed``,
            ``skipped``, ``failed``, ``detections``), ``errors`` and ``outputs``.
        """
        self.close()
        merge_parts(self.output_dir)
        last: Dict[str, int] = {}
        for lineno, rec in read_records(self.jsonl):
            last[rec["file"]] = lineno
        with ExitStack() as files:
            det = files.enter_context(_atomic_text(self.detections))
            coco = files.enter_context(_atomic_text(self.output_dir / COCO_RESULTS_FILE))
            ids = files.enter_context(_atomic_text(self.output_dir / COCO_IMAGES_FILE))
            det.write(
                "{\n" + "".join(f"  {_dumps(k)}: {_dumps(v)},\n" for k, v in self.header.items())
            )
            det.write('  "images": ')
            processed, n_dets, errors = self._stream_records(last, det, coco, ids)
            summary = dict(
                run_summary,
                processed=processed,
                skipped=len(errors),
                failed=sum(e["stage"] == "detect" for e in errors),
                detections=n_dets,
                errors=errors,
                outputs=self._outputs(processed),
            )
            det.write(',\n  "errors": ')
            _write_array(det, errors, "  ")
            brief = {k: v for k, v in summary.items() if k != "errors"}
            det.write(f',\n  "summary": {_dumps(brief)},\n  "complete": true\n}}\n')
        return summary

    def _stream_records(
        self, last: Mapping[str, int], det: IO[str], coco: IO[str], ids: IO[str]
    ) -> Tuple[int, int, List[Dict[str, Any]]]:
        """Each file's last record: a processed image goes to the ``images`` array of ``det``
        and to the COCO files (``image_id`` = its 1-based position there), an error to the
        returned list. Returns ``(processed, detections, errors)``."""
        class_names = self.header["class_names"]
        cat_id = {name: i + 1 for i, name in enumerate(class_names)}
        images, results = _JsonArray(det, "  "), _JsonArray(coco)
        ids.write('{\n  "images": ')
        id_images = _JsonArray(ids, "  ")
        errors: List[Dict[str, Any]] = []
        n_dets = 0
        for lineno, rec in read_records(self.jsonl):
            if last[rec["file"]] != lineno:
                continue
            if "detections" not in rec:
                errors.append({k: rec.get(k) for k in ("file", "reason", "stage")})
                continue
            images.add(rec)
            id_images.add(_coco_image(images.count, rec))
            for r in _coco_entries(images.count, rec, cat_id):
                results.add(r)
            n_dets += len(rec["detections"])
        images.close()
        results.close()
        coco.write("\n")
        id_images.close()
        categories = [{"id": cat_id[n], "name": n} for n in class_names]
        ids.write(f',\n  "categories": {_dumps(categories)},\n  "annotations": []\n}}\n')
        return images.count, n_dets, errors

    def _outputs(self, processed: int) -> Dict[str, Optional[str]]:
        images = self.output_dir / IMAGES_DIR
        return {
            "detections": str(self.detections),
            "jsonl": str(self.jsonl),
            "coco": str(self.output_dir / COCO_RESULTS_FILE),
            "coco_images": str(self.output_dir / COCO_IMAGES_FILE),
            "images": str(images) if processed and self.header.get("save_images") else None,
        }
