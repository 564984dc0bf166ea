"""Fine-tuning survives ``kill -9``: a run killed mid-stage and started again ends with exactly
the head of an uninterrupted run (same seed), and fine-tuning lowers the loss and steps the
learning rate."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

SETUP = textwrap.dedent(
    """
    import time
    import torch
    from spp_detect.config import FinetuneConfig
    from spp_detect.datasets.records import ImageRecord
    from spp_detect.modeling.head import FCHead
    from spp_detect.training.finetune import finetune_head
    from spp_detect.training.finetune_checkpoint import FinetuneCheckpoint

    class Source:
        # Deterministic features: classes are separable, with noise fixed per window.
        def __init__(self, delay=0.0):
            self.delay = delay

        def rows(self, i, idx, rng=None):
            time.sleep(self.delay)
            g = torch.Generator().manual_seed(1000 * i + 7)
            noise = torch.randn(200, 32, generator=g)[idx]
            labels = IMAGES[i].labels[idx]
            centre = torch.nn.functional.one_hot(labels.clamp(min=0), 32).float() * 3
            return centre + noise

    class Image:
        def __init__(self, i):
            g = torch.Generator().manual_seed(i)
            self.labels = torch.randint(-1, 4, (200,), generator=g)
            self.windows = torch.zeros(200, 4)
            self.record = ImageRecord(str(i), "x.jpg", 10, 10)

    IMAGES = [Image(i) for i in range(12)]
    CFG = FinetuneConfig(iterations=120, lr=0.01, batch_size=32, pool_batches=3, step_fraction=0.5)

    class Det:
        def __init__(self):
            torch.manual_seed(0)
            self.head = FCHead(32, 3, hidden=16, dropout=0.5)
            self.device = torch.device("cpu")

    def run(ckpt_path, delay=0.0):
        det = Det()
        ckpt = None if ckpt_path is None else FinetuneCheckpoint(ckpt_path, "k", 0.0)
        log = finetune_head(det, Source(delay), IMAGES, CFG, checkpoint=ckpt)
        return det, log
    """
)


def _namespace():
    ns = {}
    exec(SETUP, ns)  # noqa: S102 - the same code runs in the child process
    return ns


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    ns = _namespace()
    reference, log = ns["run"](None)
    ckpt = tmp_path / "ft.ckpt.pt"
    script = tmp_path / "child.py"
    script.write_text(SETUP + f"\nrun({str(ckpt)!r}, delay=0.01)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if ckpt.is_file():
                it = torch.load(ckpt, weights_only=True)["iteration"]
                if it >= 30:
                    break
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 30 <= killed_at < 120
    resumed, resumed_log = ns["run"](Path(ckpt))
    for k, v in reference.head.state_dict().items():
        assert torch.equal(v, resumed.head.state_dict()[k]), k
    assert [e["loss"] for e in resumed_log] == [e["loss"] for e in log]


def test_finetuning_lowers_the_loss_and_steps_the_learning_rate():
    ns = _namespace()
    _, log = ns["run"](None)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    lrs = [e["lr"] for e in log]
    # lr 0.01 for the first 60 of 120 iterations (step_fraction 0.5), then 0.001.
    assert all(abs(e["lr"] - (0.01 if e["iteration"] <= 60 else 0.001)) < 1e-12 for e in log)
    assert lrs[0] == 0.01 and lrs[-1] == 0.001
