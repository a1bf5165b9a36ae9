"""One home for device, precision, compile and distributed setup.

Detects cuda > mps > cpu, picks the autocast dtype and whether to compile (with the reason),
knows each device's peak FLOP/s for MFU, and starts/stops torch.distributed under torchrun.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from nanogpt_cli.errors import NgptError, UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> cuda (this process's local GPU under torchrun) > mps > cpu; explicit names are checked."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device=cuda was asked for, but this torch sees no CUDA GPU; use --device=cpu or auto")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif device.index >= count:
            raise UsageError(f"--device={requested}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device=mps was asked for, but MPS is not available here; use --device=cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: CPU instructions that make bf16 matmuls faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_dtype(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """(dtype name, why): bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on mps and cpu."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UsageError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
        if requested == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("--dtype=bfloat16: this GPU does not support bfloat16; use float16")
        return requested, "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU supports bfloat16 (no loss scaling needed)"
        return "float16", "the GPU lacks bfloat16: float16 with a GradScaler"
    if device.type == "mps":
        return "float32", "mps: float32 (autocast gains little there; --dtype=float16 to try)"
    return "float32", "cpu: float32 (--dtype=bfloat16 to use bf16 autocast)"


def choose_compile(device: torch.device, requested: bool | None) -> tuple[bool, str]:
    """(compile?, why): on by default only where it pays, which is cuda."""
    if requested is not None:
        if requested and not hasattr(torch, "compile"):
            raise UsageError("--compile=True needs torch >= 2.0")
        return requested, "asked for"
    if device.type == "cuda":
        return True, "cuda: torch.compile fuses kernels and pays back its warm-up within a few hundred steps"
    if device.type == "mps":
        return False, "mps: torch.compile support there is immature"
    return False, "cpu: compile warm-up costs more than it saves on typical CPU runs"


def autocast(device: torch.device, dtype: str):
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets.
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("GH200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 4080", 97e12), ("RTX 3090", 71e12), ("A6000", 155e12),
    ("V100", 125e12), ("T4", 65e12),
]


def gpu_peak_flops(name: str) -> float | None:
    """The peak of a GPU by its name (first match, most specific first); None when unknown."""
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


@functools.cache
def measured_cpu_peak_flops(dtype: str = "float32", size: int = 1024, seconds: float = 0.3) -> float:
    """CPU peak, measured: FLOP/s of a square matmul in `dtype` with the current thread count."""
    g = torch.Generator().manual_seed(0)  # its own generator: measuring must not shift the training RNG
    a = torch.randn(size, size, dtype=DTYPES[dtype], generator=g)
    b = torch.randn(size, size, dtype=DTYPES[dtype], generator=g)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        a @ b
        n += 1
    return 2 * size**3 * n / elapsed


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        if flops is not None and dtype == "float32":
            flops = flops / 2  # TF32 tensor cores run at half the bf16 rate
        return flops, (f"{name} data sheet" if flops else f"{name}: unknown GPU")
    if device.type == "cpu":
        kind = "bfloat16" if dtype == "bfloat16" else "float32"
        return measured_cpu_peak_flops(kind), f"measured {kind} matmul on {torch.get_num_threads()} threads"
    return None, "unknown for mps"


# ---------------------------------------------------------------- distributed

@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env_from_environ() -> DistEnv:
    """What torchrun set: RANK, LOCAL_RANK, WORLD_SIZE (absent for a plain single process)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def init_distributed(device: torch.device, backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun prepared (nccl on cuda, gloo on cpu); no-op for one process.

    The timeout makes collectives fail instead of hanging when another rank died.
    """
    env = dist_env_from_environ()
    if not env.is_distributed:
        return env
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        except Exception as e:
            raise NgptError(f"could not join the process group ({backend}): {e}") from None
    return env


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
