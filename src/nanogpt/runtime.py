"""Device, precision, compilation and MFU: decided at run time, never at import time."""

from __future__ import annotations

import contextlib
import platform
import shutil
import sys

import torch

from .config import ConfigError


def resolve_device(device: str) -> str:
    """'auto' -> cuda, else mps, else cpu; an explicit device that is not there is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=%r but CUDA is not available here; use --device=cpu (or --device=mps on Apple Silicon)" % device)
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError("device=%r but only %d CUDA device(s) are visible" % (device, torch.cuda.device_count()))
    elif kind == "mps":
        if not _mps_available():
            raise ConfigError("device='mps' but MPS is not available here; use --device=cpu")
    elif kind != "cpu":
        raise ConfigError("device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got %r" % device)
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def bf16_supported(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "mps":
        return _mps_bf16()
    return True  # CPU autocast supports bfloat16


def _mps_bf16() -> bool:
    try:
        torch.ones(1, device="mps", dtype=torch.bfloat16)
        return True
    except Exception:
        return False


def resolve_dtype(dtype: str, device_type: str) -> str:
    """'auto' -> bfloat16 on CUDA when supported, else float16; float32 on CPU and MPS."""
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16" if bf16_supported("cuda") else "float16"
        return "float32"
    if dtype == "bfloat16" and not bf16_supported(device_type):
        raise ConfigError("dtype='bfloat16' is not supported on this %s device; use --dtype=float16 (or float32)" % device_type)
    return dtype


PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device_type: str, dtype: str, cache: bool = True):
    """Mixed precision context: a no-op for float32. ``cache=False`` re-casts weights at each
    use instead of holding a low-precision copy of every weight until the forward pass ends
    (worth it with activation checkpointing, where nothing else holds those copies)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=PTDTYPE[dtype], cache_enabled=cache)


def setup(device: str, dtype: str, seed: int) -> tuple[str, str, str]:
    """The common start of a command: resolve device and dtype, set backends, seed every device.
    Returns (device, device_type, dtype)."""
    device = resolve_device(device)
    device_type = device.split(":")[0]
    dtype = resolve_dtype(dtype, device_type)
    setup_backends(device_type)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return device, device_type, dtype


def setup_backends(device_type: str) -> None:
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_model(model, enabled: bool, device_type: str, log=print, mode: str = "default"):
    """torch.compile where it can work; otherwise say why and return the model unchanged."""
    if not enabled:
        return model
    why = compile_blocker(device_type)
    if why:
        log("compile: disabled (%s); running eagerly. Pass --compile=False to silence this." % why)
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def compile_blocker(device_type: str) -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if sys.version_info >= (3, 14) and torch.__version__ < "2.10":
        return "torch.compile does not support this Python version"
    if device_type == "mps":
        return "torch.compile is not reliable on MPS yet"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (on Windows: pip install triton-windows)"
    if device_type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("cl")):
        return "no C/C++ compiler found for CPU code generation"
    if platform.system() == "Windows" and device_type == "cpu" and not shutil.which("cl"):
        return "CPU compilation on Windows needs MSVC (cl.exe) on PATH"
    return None


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def max_memory_allocated(device_type: str) -> int:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    if device_type == "mps":
        return torch.mps.driver_allocated_memory()
    return 0


# Dense (no sparsity) peak FLOP/s per device from the vendors' data sheets:
# (bf16/fp16 tensor, tf32 tensor, fp32 vector). Matched against the CUDA device name.
PEAK_FLOPS = [
    ("H200", (989e12, 494e12, 67e12)),
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100 NVL", (835e12, 418e12, 60e12)),
    ("H100", (989e12, 494e12, 67e12)),  # SXM
    ("GH200", (989e12, 494e12, 67e12)),
    ("B200", (2250e12, 1100e12, 80e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
    ("A800", (312e12, 156e12, 19.5e12)),
    ("A6000", (155e12, 77e12, 38.7e12)),  # RTX A6000 / RTX 6000 Ada use the row below
    ("RTX 6000 Ada", (364e12, 182e12, 91e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("L40", (181e12, 90.5e12, 90.5e12)),
    ("L4", (121e12, 60e12, 30e12)),
    ("A10G", (70e12, 35e12, 31.2e12)),
    ("A10", (125e12, 62.5e12, 31.2e12)),
    ("RTX 4090", (165e12, 82.6e12, 82.6e12)),
    ("RTX 3090", (71e12, 35.6e12, 35.6e12)),
    ("V100", (125e12, 15.7e12, 15.7e12)),  # fp16 tensor cores; no bf16
    ("T4", (65e12, 8.1e12, 8.1e12)),
]


def peak_flops(device: str, dtype: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for this precision; None when unknown (CPU, MPS, unlisted GPU)."""
    if override > 0:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, (half, tf32, fp32) in PEAK_FLOPS:
        if key in name:
            if dtype in ("bfloat16", "float16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None
