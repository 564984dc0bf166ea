"""Spilled regression samples (``training/sample_store.py``) and the streamed ridge fit
(``ridge.NormalEquations``): the same values as the in-memory path, snapshots that a killed run
can resume from, and the fit's solver choice by memory."""

import pytest
import torch

from spp_detect.training.bbox_fit import fit_box_regressor
from spp_detect.training.bbox_training import BoxRegressionTrainer
from spp_detect.training.ridge import NormalEquations, ridge_memory, ridge_solve_with_bias
from spp_detect.training.sample_store import RowStore


def _apply(store, ops):
    for op in ops:
        if op[0] == "append":
            store.append(op[1], op[2])
        else:
            store.assign(op[1], op[2], op[3])


def _random_ops(seed, dim=7):
    g = torch.Generator().manual_seed(seed)
    ops, rows = [], {0: 0, 3: 0}
    for step in range(30):
        c = [0, 3][step % 2]
        if rows[c] > 4 and step % 3 == 0:
            slots = torch.randperm(rows[c], generator=g)[:3]
            ops.append(("assign", c, slots, torch.randn(3, dim, generator=g)))
        else:
            n = int(torch.randint(1, 5, (1,), generator=g))
            ops.append(("append", c, torch.randn(n, dim, generator=g)))
            rows[c] += n
    return ops, rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_spilled_rows_equal_the_rows_in_memory(tmp_path, dtype):
    ops, rows = _random_ops(0)
    mem, disk = RowStore(7, dtype), RowStore(7, dtype, tmp_path / "s")
    _apply(mem, ops)
    _apply(disk, ops)
    # The reference: the same operations on plain tensors.
    ref = {0: torch.zeros(0, 7, dtype=dtype), 3: torch.zeros(0, 7, dtype=dtype)}
    for op in ops:
        if op[0] == "append":
            ref[op[1]] = torch.cat([ref[op[1]], op[2].to(dtype)])
        else:
            ref[op[1]][op[2]] = op[3].to(dtype)
    for c in (0, 3):
        assert disk.rows(c) == mem.rows(c) == rows[c] == ref[c].shape[0]
        assert torch.equal(disk.read(c), ref[c]) and torch.equal(mem.read(c), ref[c])
        assert torch.equal(torch.cat(list(disk.chunks(c, 4))), ref[c])
        assert torch.equal(disk.read(c, 2, 5), ref[c][2:5])
    assert disk.classes() == [0, 3] and (tmp_path / "s" / "c3.bin").is_file()
    assert (tmp_path / "s" / "c3.bin").stat().st_size == rows[3] * 7 * ref[3].element_size()


def test_snapshot_restores_the_rows_of_its_time_and_old_generations_go(tmp_path):
    ops, _ = _random_ops(1)
    store = RowStore(7, torch.float16, tmp_path / "s")
    _apply(store, ops[:10])
    first = store.state_dict()
    at_first = {c: store.read(c).clone() for c in store.classes()}
    _apply(store, ops[10:])  # changes after the checkpoint: appends and replacements
    assert any(not torch.equal(store.read(c)[: len(v)], v) for c, v in at_first.items())

    resumed = RowStore(7, torch.float16, tmp_path / "s")  # a new process, same folder
    assert resumed.can_load(first)
    resumed.load_state_dict(first)
    for c, v in at_first.items():
        assert torch.equal(resumed.read(c), v)
    # Generations: the one a saved checkpoint may still name (g - 1) survives one more.
    second = resumed.state_dict()
    assert second["generation"] == first["generation"] + 1 and resumed.can_load(first)
    resumed.state_dict()
    assert not resumed.can_load(first) and resumed.can_load(second)
    assert not RowStore(8, torch.float16, tmp_path / "s").can_load(second)  # other width
    resumed.remove()
    assert not (tmp_path / "s").exists()


def test_in_memory_state_round_trips():
    ops, _ = _random_ops(2)
    store = RowStore(7)
    _apply(store, ops)
    state = store.state_dict()
    other = RowStore(7)
    assert other.can_load(state) and not RowStore(7, folder=None).can_load({"dim": 7})
    other.load_state_dict(state)
    for c in store.classes():
        assert torch.equal(other.read(c), store.read(c))


def _regression_images(n_images=8, d=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        gt = torch.tensor([[20.0, 20, 90, 80], [120, 40, 200, 150]])
        windows = gt.repeat(15, 1) + torch.randn(30, 4, generator=g) * 5
        out.append((torch.randn(30, d, generator=g), windows, gt, torch.tensor([0, 1])))
    return out


def test_spilling_trainer_keeps_and_fits_exactly_as_in_memory(tmp_path):
    """Both caps bind (per image and per class, so the reservoir overwrites spilled rows)."""
    trainers = [
        BoxRegressionTrainer(max_per_image=12, max_samples=20, seed=1),
        BoxRegressionTrainer(max_per_image=12, max_samples=20, seed=1, spill_dir=tmp_path / "s"),
    ]
    for image in _regression_images():
        for t in trainers:
            t.add_image(*image)
    mem, disk = trainers
    assert all(disk.offered(c) > disk.class_samples(c) == 20 for c in (0, 1))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["c0.bin", "c1.bin"]
    for c in (0, 1):
        assert torch.equal(disk.class_features(c), mem.class_features(c))
    a, b = mem.fit(2, min_samples=5), disk.fit(2, min_samples=5)
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name
    disk.remove_spilled()
    assert not (tmp_path / "s").exists()


def test_streamed_normal_equations_equal_the_whole_solve():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) * 2 + 0.5
    y = torch.randn(300, 4, generator=g, dtype=torch.float64)
    for regularize_bias in (True, False):
        normal = NormalEquations(40, 4)
        for start in range(0, 300, 64):  # uneven chunks
            normal.add(x[start : start + 64], y[start : start + 64])
        got = normal.solve(7.0, regularize_bias)
        ref = ridge_solve_with_bias(x, y, 7.0, regularize_bias, "dual")
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    # By hand for the penalised bias: [x, 1] with lambda on every weight.
    xa = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], dim=1)
    hand = torch.linalg.solve(xa.T @ xa + 7.0 * torch.eye(41, dtype=torch.float64), xa.T @ y)
    normal = NormalEquations(40, 4)
    normal.add(x, y)
    torch.testing.assert_close(normal.solve(7.0), hand, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="lambda_"):
        NormalEquations(40).solve(0.0)


def test_auto_fit_takes_the_solver_that_holds_less_memory(monkeypatch):
    # Dual: n^2 + n d float64 values; primal: (d + 1)^2, whatever n.
    assert ridge_memory(100, 24, "primal") < ridge_memory(100, 24, "dual")
    assert ridge_memory(10, 5600, "dual") < ridge_memory(10, 5600, "primal")
    assert ridge_memory(10**6, 5600, "primal") == ridge_memory(10, 5600, "primal")
    feats, boxes, gt, labels = [], [], [], []
    for f, w, b, lab in _regression_images(d=24):
        feats.append(f)
        boxes.append(w)
        gt.append(b.repeat(15, 1))
        labels.append(lab.repeat(15))
    args = (torch.cat(feats), torch.cat(boxes), torch.cat(gt), torch.cat(labels), 2)
    from spp_detect.training import bbox_fit

    solved = []
    real = bbox_fit.NormalEquations.solve
    monkeypatch.setattr(
        bbox_fit.NormalEquations, "solve", lambda self, *a: solved.append(self.n) or real(self, *a)
    )
    auto = fit_box_regressor(*args, min_samples=5)  # ~100 rows of 24: the streamed primal
    assert len(solved) == 2 and min(solved) > 24  # both classes, every kept row
    dual = fit_box_regressor(*args, min_samples=5, method="dual")
    assert len(solved) == 2 and bool(auto.trained.all())
    torch.testing.assert_close(auto.weight, dual.weight, rtol=1e-5, atol=1e-6)
