"""Where and how a command runs: device, precision, CPU threads, compilation, seeds and MFU, all
decided at run time (never at import time) by :func:`setup`, which every command calls."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import Section, setting
from .errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RuntimeConfig(Section):
    """The device and how PyTorch runs on it."""

    device: str = setting("auto", "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: str = setting("auto", "'auto' (bfloat16 on CUDA when supported, else float16; float32 on CPU/MPS), 'float32', 'bfloat16', 'float16'.",
                         choices=DTYPES)
    compile: bool = setting(True, "torch.compile the model; falls back with a message where it cannot work.")
    compile_mode: str = setting("default", "torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune' or 'max-autotune-no-cudagraphs'.",
                                choices=COMPILE_MODES)
    threads: int = setting(0, "CPU threads for PyTorch on a CPU device: 0 uses the cores that are idle when the work starts (other busy processes leave fewer, and a CPU quota caps them; OMP_NUM_THREADS, when set, is kept); N uses N.",
                           ge=0)
    seed: int = setting(1337, "Seed for initialisation, dropout and sampling (each rank adds its rank).")


@dataclass
class SpeedConfig(Section):
    """Memory and speed trade-offs of a training step; none changes the model's function."""

    activation_checkpointing: bool = setting(False, "Recompute each block's activations in backward instead of storing them: less memory, about a third more compute.")
    loss_chunk: int = setting(0, "Compute the output layer and cross-entropy this many positions at a time, never holding the (batch x block x vocab) logits; 0 computes them at once.",
                              ge=0)
    fp8: bool = setting(False, "Multiply in float8 in the blocks' Linear layers (e4m3 inputs and weights, e5m2 gradients, one scale per tensor, torch._scaled_mm); weights and checkpoints are unchanged. Needs a GPU of compute capability 8.9+ (H100, L4, RTX 40xx); on the CPU the same numbers come from float32 products (for checking, not speed).")
    peak_flops: float = setting(0.0, "Peak FLOP/s of one device for MFU; 0 looks the GPU up in a table (no MFU on CPU unless set).", ge=0)


# --------------------------------------------------------------------------------------------
# device and dtype


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


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
        index = device.split(":")[1] if ":" in device else "0"
        if not index.isdigit():
            raise ConfigError("device=%r: the part after 'cuda:' must be a device number" % device)
        if int(index) >= torch.cuda.device_count():
            raise ConfigError("device=%r but only %d CUDA device(s) are visible" % (device, torch.cuda.device_count()))
    elif kind == "mps":
        if not _mps_available():
            raise ConfigError("device='mps' but MPS is not available here; use --device=cpu")
    elif device != "cpu":
        raise ConfigError("device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got %r" % device)
    return device


def bf16_supported(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "mps":
        try:
            torch.ones(1, device="mps", dtype=torch.bfloat16)
            return True
        except Exception:
            return False
    return True  # CPU autocast supports bfloat16


def resolve_dtype(dtype: str, device_type: str) -> str:
    """'auto' -> bfloat16 on CUDA when supported, else float16; float32 on CPU and MPS."""
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16" if bf16_supported("cuda") else "float16"
        return "float32"
    if dtype == "bfloat16" and not bf16_supported(device_type):
        raise ConfigError("dtype='bfloat16' is not supported on this %s device; use --dtype=float16 (or float32)" % device_type)
    return dtype


def autocast(device_type: str, dtype: str, cache: bool = True):
    """Mixed precision context: a no-op for float32. ``cache=False`` re-casts weights at each
    use instead of holding a low-precision copy of every weight until the forward pass ends
    (worth it with activation checkpointing, where nothing else holds those copies)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=PTDTYPE[dtype], cache_enabled=cache)


def autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast runs matrix products in on this device, or ``default`` outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


# --------------------------------------------------------------------------------------------
# CPU threads


def _allowed_cpus() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cpu_quota() -> float | None:
    """CPUs a cgroup v2 quota grants this process (``cpu.max``), or None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cpu_ticks(cpus: list[int]) -> tuple[int, int, int] | None:
    """(busy ticks of ``cpus``, all ticks of ``cpus``, this process's ticks) from /proc."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3:4].isdigit()]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = total = 0
    wanted = set(cpus)
    for parts in lines:
        if int(parts[0][3:]) in wanted:
            ticks = [int(x) for x in parts[1:9]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy, total, int(own[11]) + int(own[12])  # utime + stime of every thread of this process


class CpuThreads:
    """How many threads PyTorch uses on a CPU device. With ``threads=0``, the cores left idle by
    other processes, measured over the window from :meth:`start` to :meth:`settle` (the command's
    own setup), capped by a CPU quota: a thread that waits for a core another process holds stalls
    every parallel region (with one of two cores busy elsewhere, a step took 3x as long on two
    threads as on one). The count is fixed for the whole run, so its results do not depend on load
    changing midway."""

    def __init__(self, requested: int, device_type: str):
        self.requested = requested
        self.active = device_type == "cpu"
        self.cpus = _allowed_cpus()
        self.first = None
        self.chosen = None
        self.reason = ""

    def start(self) -> None:
        if self.active and not self.requested and os.environ.get("OMP_NUM_THREADS"):
            self.active = False  # the user chose already, for every OpenMP program
        if self.active and self.requested:
            self._set(self.requested, "--threads=%d" % self.requested)
        elif self.active and self.cpus:
            self.first = (time.monotonic(), _cpu_ticks(self.cpus))

    def settle(self, log=None) -> int | None:
        """Choose the count (once) and set it; ``log`` gets one line when fewer than all cores are used."""
        if not self.active or self.chosen is not None:
            return self.chosen
        n = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        quota = _cpu_quota()
        limit = max(1, min(n, math.floor(quota))) if quota else n
        busy_elsewhere = 0.0
        if self.first and self.first[1]:
            wait = 0.05 - (time.monotonic() - self.first[0])
            if wait > 0:
                time.sleep(wait)
            now = _cpu_ticks(self.cpus)
            if now:
                b0, t0, o0 = self.first[1]
                b1, t1, o1 = now
                per_cpu = (t1 - t0) / len(self.cpus)
                if per_cpu > 0:
                    busy_elsewhere = max(0.0, ((b1 - b0) - (o1 - o0)) / per_cpu)
        count = max(1, min(limit, round(n - busy_elsewhere)))
        why = []
        if busy_elsewhere >= 0.5:
            why.append("%.1f of %d cores busy with other processes" % (busy_elsewhere, n))
        if limit < n:
            why.append("a CPU quota of %.2f cores" % quota)
        self._set(count, "; ".join(why))
        if log and why:
            log("cpu threads: %d (%s); --threads=N chooses" % (count, self.reason))
        return count

    def _set(self, count: int, reason: str) -> None:
        self.chosen, self.reason = count, reason
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)


# --------------------------------------------------------------------------------------------
# the runtime of a command


def synchronize(device_type: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


@dataclass
class Runtime:
    """The resolved device of one process and what goes with it."""

    device: str
    device_type: str
    dtype: str
    threads: CpuThreads

    def autocast(self, cache: bool = True):
        return autocast(self.device_type, self.dtype, cache)

    def synchronize(self) -> None:
        synchronize(self.device_type)

    def max_memory(self) -> int:
        """Peak bytes allocated on the device (0 where it is not known: the CPU)."""
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.device_type == "mps":
            return torch.mps.driver_allocated_memory()
        return 0

    def reset_peak_memory(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()


def setup(cfg: RuntimeConfig, device: str | None = None, rank: int = 0, log=print) -> Runtime:
    """The common start of every command: resolve the device (``device`` when the process group
    already chose this rank's) and dtype, set the backends, seed Python, NumPy and torch with
    ``seed + rank``, and start choosing the CPU threads (see :class:`CpuThreads`)."""
    device = device or resolve_device(cfg.device)
    device_type = device.split(":")[0]
    if cfg.device == "auto" and device_type == "cpu" and log:
        log("device: cpu (no CUDA or MPS device found; --device chooses)")
    dtype = resolve_dtype(cfg.dtype, device_type)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed = cfg.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    threads = CpuThreads(cfg.threads, device_type)
    threads.start()
    return Runtime(device, device_type, dtype, threads)


# --------------------------------------------------------------------------------------------
# compilation


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


def compile_model(model, enabled: bool, device_type: str, log=print, mode: str = "default"):
    """torch.compile where it can work; otherwise say why and return the model unchanged."""
    if not enabled:
        return model
    why = compile_blocker(device_type)
    if why:
        log("compile: disabled (%s); running eagerly. Pass --compile=False to silence this." % why)
        return model
    log("compile: the first steps compile the model (a minute or more); --compile=False skips it")
    return torch.compile(model, mode=None if mode == "default" else mode)


# --------------------------------------------------------------------------------------------
# MFU

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
