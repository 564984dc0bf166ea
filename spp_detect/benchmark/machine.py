"""What the speed report ran on: CPU model, cores, threads, GPU, library versions, load."""

from __future__ import annotations

import os
import platform
from typing import Any, Dict, List, Optional

import torch

from ..modeling.window_pool_native import native_pool_available

__all__ = ["machine_info", "load_average"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none): a busy shared
    machine makes every time noisy, so the report records the load before and after."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """CPU model (from /proc/cpuinfo), cores, torch threads, GPU name, versions, load average.

    Args:
        device: the device timed; a ``cuda:N`` device names GPU N (default GPU 0).
    """
    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
        # pool_windows on the CPU: the compiled loop, or its tensor-op fallback (same results)
        "window_pooling": "compiled" if native_pool_available() else "tensor ops",
    }
    try:
        import cv2

        info["opencv"] = cv2.__version__
        info["opencv_threads"] = cv2.getNumThreads()
    except ImportError:  # pragma: no cover - opencv is a dependency
        pass
    if torch.cuda.is_available():
        idx = device.index if device is not None and device.type == "cuda" else None
        info["gpu"] = torch.cuda.get_device_name(idx if idx is not None else 0)
        info["cuda"] = torch.version.cuda
    info["load_average"] = load_average()
    return info
