"""What ran a benchmark: the CPU model (or GPU name), cores and torch threads."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return model or platform.processor() or "cpu"


def describe(device) -> str:
    """A short description of the device of a benchmark (a torch.device)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
