"""``spp-detect``: ``detect`` over a folder holding every bad case of issue 6 (exit codes, JSON
and COCO outputs, annotated images, no traceback), argument errors, and ``train`` / ``eval`` /
``bench`` taking exactly the tools' arguments."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spp_detect import cli, cli_common
from spp_detect.errors import UserInputError
from spp_detect.inference import inputs

from bad_inputs import CLASSES, make_bad_folder, save_tiny_model, scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def _detect_argv(model, inp, out, *extra):
    return [
        "detect", "--model", str(model), "--input", str(inp), "--output", str(out),
        "--score-thresh", "0", "--max-proposals", "8", "--max-pixels", "5000", "--no-progress",
        *extra,
    ]  # fmt: skip


def _assert_one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def test_detect_over_every_bad_case(tmp_path, model_path, monkeypatch, capsys):
    good, bad = make_bad_folder(tmp_path / "in")
    real = inputs.list_images

    def listing(path):  # gone.jpg is deleted after it was listed: it disappears mid-run
        found = real(path)
        (tmp_path / "in" / "gone.jpg").unlink()
        return found

    monkeypatch.setattr(inputs, "list_images", listing)
    out = tmp_path / "out"
    assert cli.main(_detect_argv(model_path, tmp_path / "in", out)) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert f"{len(good) + len(bad)} images: {len(good)} processed, {len(bad)} skipped" in (
        captured.out
    )

    doc = json.loads((out / "detections.json").read_text())
    entries = {e["file"]: e for e in doc["images"]}
    assert {k: (e["width"], e["height"]) for k, e in entries.items()} == good
    reasons = {e["file"]: e["reason"] for e in doc["errors"]}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert reasons[name] and "\n" not in reasons[name] and word in reasons[name].lower()
    for name, e in entries.items():
        img = Image.open(out / "images" / name)
        assert img.size == good[name] and e["annotated"] == f"images/{name}"
        for d in e["detections"]:
            assert set(d) == {"label", "score", "box"} and len(d["box"]) == 4

    # COCO results: a list pycocotools loads against the id file, boxes [x, y, w, h].
    from pycocotools.coco import COCO

    results = json.loads((out / "detections_coco.json").read_text())
    assert (
        isinstance(results, list)
        and len(results) == sum(len(e["detections"]) for e in doc["images"]) > 0
    )
    gt = COCO(str(out / "coco_images.json"))
    res = gt.loadRes(str(out / "detections_coco.json"))
    assert len(res.anns) == len(results)
    by_id = {im["id"]: im["file_name"] for im in gt.dataset["images"]}
    first = results[0]
    det = entries[by_id[first["image_id"]]]["detections"][0]
    x1, y1, x2, y2 = det["box"]
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert first["category_id"] == CLASSES.index(det["label"]) + 1


def test_detect_bad_arguments_exit_2(tmp_path, model_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(scene(48, 64)).save(folder / "a.jpg")
    out = tmp_path / "out"

    assert cli.main(_detect_argv(tmp_path / "missing.pt", folder, out)) == 2
    _assert_one_line_error(capsys, "missing.pt", "model file not found")
    assert not out.exists()

    notmodel = tmp_path / "bad.pt"
    notmodel.write_bytes(b"garbage")
    assert cli.main(_detect_argv(notmodel, folder, out)) == 2
    _assert_one_line_error(capsys, "bad.pt")

    (tmp_path / "empty").mkdir()
    assert cli.main(_detect_argv(model_path, tmp_path / "empty", out)) == 2
    _assert_one_line_error(capsys, "no images found")

    assert cli.main(_detect_argv(model_path, tmp_path / "nowhere", out)) == 2
    _assert_one_line_error(capsys, "no such file or folder")

    out.mkdir()
    (out / "detections.json").write_text("{}")
    assert cli.main(_detect_argv(model_path, folder, out)) == 2
    _assert_one_line_error(capsys, "--exist-ok")
    assert (out / "detections.json").read_text() == "{}"  # untouched
    assert cli.main(_detect_argv(model_path, folder, out, "--exist-ok", "--no-save-images")) == 0
    assert json.loads((out / "detections.json").read_text())["images"][0]["file"] == "a.jpg"
    assert not (out / "images").exists()

    assert cli.main(_detect_argv(model_path, folder, out, "--jobs", "0")) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_detect_with_a_proposals_file(tmp_path, model_path):
    from spp_detect.proposals.files import save_proposals_file

    Image.fromarray(scene(48, 64)).save(tmp_path / "x.png")
    save_proposals_file(tmp_path / "p.npz", {"x": np.array([[0, 0, 30, 20]], np.float32)})
    out = tmp_path / "out"
    argv = _detect_argv(model_path, tmp_path / "x.png", out, "--proposals-file")
    assert cli.main([*argv, str(tmp_path / "p.npz")]) == 0
    (entry,) = json.loads((out / "detections.json").read_text())["images"]
    assert {tuple(d["box"]) for d in entry["detections"]} == {(0.0, 0.0, 30.0, 20.0)}


def test_usage(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "detect" in capsys.readouterr().out
    assert cli.main(["detect"]) == 2  # required arguments missing (argparse's message)
    assert "--model" in capsys.readouterr().err


def _tool_parser(name):
    path = REPO / "tools" / f"{name}.py"
    assert path.is_file(), path
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_args_parser()


@pytest.mark.parametrize(
    "command,tool,argv",
    [
        ("train", "train_net", ["--voc-root", "r", "--output", "o", "finetune.lr=0.01"]),
        ("eval", "test_net", ["--voc-root", "r", "--model", "m.pt", "--output", "o", "--coco"]),
        ("bench", "speed_report", ["--voc-root", "r", "--output", "o", "--num-images", "3"]),
    ],
)
def test_subcommands_take_the_tools_arguments(command, tool, argv):
    """Same options, same defaults: the subcommand is the tool (no second implementation)."""
    ours = vars(cli.get_args_parser().parse_args([command, *argv]))
    ours.pop("command")
    theirs = vars(_tool_parser(tool).parse_args(argv))
    assert ours == theirs


def test_train_and_eval_report_user_errors(tmp_path, capsys):
    argv = ["--voc-root", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]
    assert cli.main(["train", *argv, "--weights", "none"]) == 2
    _assert_one_line_error(capsys, "VOC root folder not found")
    assert cli.main(["eval", *argv, "--model", str(tmp_path / "m.pt")]) == 2
    _assert_one_line_error(capsys, "m.pt")
    assert cli.main(["demo", "--num-train", "0"]) == 2


def test_detect_resume_from_the_command_line(tmp_path, model_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(scene(48, 64, k)).save(folder / f"{k}.png")
    out = tmp_path / "out"
    assert cli.main(_detect_argv(model_path, folder, out, "--no-save-images")) == 0
    lines = (out / "detections.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == ["0.png", "1.png"]
    (out / "detections.jsonl").write_text(lines[0] + "\n")  # killed after the first image
    capsys.readouterr()
    assert cli.main(_detect_argv(model_path, folder, out, "--no-save-images", "--resume")) == 0
    assert "resumed: 1 images were done by an earlier run" in capsys.readouterr().out
    doc = json.loads((out / "detections.json").read_text())
    assert [e["file"] for e in doc["images"]] == ["0.png", "1.png"] and doc["complete"]
    argv = _detect_argv(model_path, folder, out, "--resume", "--score-thresh", "0.9")
    assert cli.main(argv) == 2
    _assert_one_line_error(capsys, "cannot resume")


def _run(main_fn):
    import argparse

    return cli_common.run_user_command(main_fn, argparse.Namespace(verbose=False))


def _raise(exc):
    def main(args):
        raise exc

    return main


@pytest.mark.parametrize(
    "exc,words",
    [
        (UserInputError("x.yaml: config file not found"), ["x.yaml: config file not found"]),
        (FileNotFoundError(2, "No such file or directory", "in/a.jpg"), ["in/a.jpg", "No such"]),
        (FileExistsError(17, "File exists", "out"), ["out", "File exists"]),
        (NotADirectoryError(20, "Not a directory", "f/x"), ["f/x"]),
        (PermissionError(13, "Permission denied", "/root/x"), ["/root/x", "Permission denied"]),
    ],
)
def test_user_errors_are_one_line_exit_2(exc, words, capsys):
    assert _run(_raise(exc)) == 2
    _assert_one_line_error(capsys, *words)


@pytest.mark.parametrize(
    "exc", [ValueError("shape mismatch"), KeyError("fc6"), RuntimeError("boom"), OSError("disk")]
)
def test_bugs_print_a_traceback_and_exit_1(exc, capsys):
    assert _run(_raise(exc)) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(exc).__name__ in err
    assert "internal error" in err


def test_config_errors_are_user_errors(tmp_path, capsys):
    argv = ["train", "--voc-root", str(tmp_path), "--output", str(tmp_path / "o")]
    assert cli.main([*argv, "finetune.nope=1"]) == 2
    _assert_one_line_error(capsys, "unknown config key", "finetune.nope")
    assert cli.main([*argv, "finetune.lr=abc"]) == 2
    _assert_one_line_error(capsys, "finetune.lr", "expected a number")
    assert cli.main([*argv, "--config", str(tmp_path / "none.yaml")]) == 2
    _assert_one_line_error(capsys, "none.yaml", "config file not found")
    assert cli.main([*argv, "proposals.mode=slow"]) == 2
    _assert_one_line_error(capsys, "proposals.mode")
