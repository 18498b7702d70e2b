"""Which device to compute on: "auto" takes the GPU where one is present, else the CPU.

Noise is always drawn by a CPU generator and then moved (see diffusion.py), so a seed means the
same starting noise on every device; the images agree to float rounding, not to the bit.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; 'cuda' / 'cuda:N' without a GPU is an error that says so."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA GPU; "
                             "use 'cpu' or 'auto'")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
        return dev
    raise ValueError(f"unknown device {name!r}; choose one of {', '.join(CHOICES)} (or cuda:N)")


def strict_fp32(device: str | torch.device) -> bool:
    """On a CUDA device, turn off TF32 for convolutions and matrix products (PyTorch enables it for cuDNN
    convolutions by default). TF32 rounds inputs to 10 mantissa bits, an error of the same order as FP16
    weights, so with it an "FP32" reference would hide the very differences an evaluation measures.
    Returns whether anything was changed (False on the CPU, where there is no TF32)."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return True


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def machine_info() -> dict:
    """The machine a number was measured on: CPU model, cores, torch threads and release, Python, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": gpu}
