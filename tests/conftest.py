"""Shared test fixtures and markers.

- ``device``: every test taking it runs once on the CPU and once on CUDA; the CUDA run carries
  the ``cuda`` marker.
- ``cuda`` marker: the one way to mark a test that needs a GPU; such tests are skipped here when
  no CUDA device is present (so they show as skipped, never silently pass).
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """``torch.device("cpu")``, then ``torch.device("cuda")`` (skipped without CUDA)."""
    return torch.device(request.param)


@pytest.fixture
def full_fp32_on_cuda(monkeypatch):
    """Full float32 matmuls and convolutions on CUDA (TF32 would differ from the CPU by ~1e-3
    relative), restored after the test."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture
def restore_threads():
    """Benchmarks set torch's thread count; put it back after the test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
