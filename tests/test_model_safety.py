"""Model files are data, never code (issue 12): a ``model.pt`` whose pickle would run a command
is refused by ``spp-detect detect``, ``spp-detect eval`` and ``load_detector`` before anything in
it is built; truncated or garbage files give a one-line error too."""

from __future__ import annotations

import os
import shlex

import pytest
import torch
from PIL import Image

from spp_detect import cli
from spp_detect.errors import UnsafeFileError, UserInputError
from spp_detect.modeling.base import MODEL_FORMAT
from spp_detect.modeling.build import load_detector

from bad_inputs import CLASSES, save_tiny_model, scene  # noqa: E402


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _evil_model(folder, marker):
    """A file that looks like a model (format, method, classes, config) and carries the
    payload among its tensors."""
    path = folder / "evil.pt"
    state = {
        "format": MODEL_FORMAT,
        "method": "spp",
        "class_names": list(CLASSES),
        "config": {},
        "head": {"fc6.weight": torch.zeros(2, 2), "extra": _Payload(marker)},
    }
    torch.save(state, path)
    return path


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "pwned"
    return _evil_model(tmp_path, marker), marker


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def test_the_payload_is_real(tmp_path):
    """Control: a plain unpickler does run it (so the checks below can fail)."""
    marker = tmp_path / "control"
    path = _evil_model(tmp_path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_detector_refuses_it(evil):
    path, marker = evil
    with pytest.raises(UnsafeFileError, match="refused"):
        load_detector(path)
    assert not marker.exists()


def test_detect_refuses_it(evil, tmp_path, capsys):
    path, marker = evil
    (tmp_path / "in").mkdir()
    Image.fromarray(scene(48, 64)).save(tmp_path / "in" / "a.png")
    argv = ["detect", "--model", str(path), "--input", str(tmp_path / "in")]
    assert cli.main([*argv, "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "evil.pt", "refused")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_eval_refuses_it(evil, tmp_path, capsys):
    path, marker = evil
    argv = ["eval", "--model", str(path), "--voc-root", str(tmp_path), "--output"]
    assert cli.main([*argv, str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "evil.pt", "refused")
    assert not marker.exists()


def _truncated(model_path, folder):
    data = model_path.read_bytes()
    path = folder / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(model_path, folder):
    path = folder / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _not_a_model(model_path, folder):
    path = folder / "weights.pt"
    torch.save({"fc6.weight": torch.zeros(2, 2)}, path)
    return path


@pytest.mark.parametrize("make", [_truncated, _garbage, _not_a_model])
def test_broken_model_files_give_one_line(make, model_path, tmp_path, capsys):
    path = make(model_path, tmp_path)
    with pytest.raises(UserInputError, match=path.name):
        load_detector(path)
    (tmp_path / "in").mkdir()
    Image.fromarray(scene(48, 64)).save(tmp_path / "in" / "a.png")
    argv = ["detect", "--model", str(path), "--input", str(tmp_path / "in"), "--no-progress"]
    assert cli.main([*argv, "--output", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, path.name)
    argv = ["eval", "--model", str(path), "--voc-root", str(tmp_path), "--output"]
    assert cli.main([*argv, str(tmp_path / "o")]) == 2
    _one_line_error(capsys, path.name)
