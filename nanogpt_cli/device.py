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


# bf16 autocast on CPU pays when a bf16 matmul is at least this much faster than an fp32 one: the casts,
# layer norms, GELUs and the optimizer stay as slow as in fp32 (measured: AVX512-BF16 2.2x -> ~1.3x per step
# on a 0.8M model, ~1.7x on GPT-2 124M).
CPU_BF16_MIN_SPEEDUP = 1.5


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU with the current thread count (measured once)."""
    return measured_cpu_peak_flops("bfloat16", 512, 0.1) / measured_cpu_peak_flops("float32", 512, 0.1)


def choose_dtype(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """(dtype name, why): bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on mps;
    on cpu bf16 autocast where AMX/AVX512-BF16 make a measured bf16 matmul clearly faster, else fp32."""
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
    if not cpu_has_fast_bf16():
        return "float32", "cpu without AMX/AVX512-BF16: bf16 would be emulated, slower than float32"
    speedup = cpu_bf16_speedup()
    if speedup < CPU_BF16_MIN_SPEEDUP:
        return "float32", f"cpu: a bf16 matmul measured only {speedup:.1f}x float32 here, too little to pay"
    return "bfloat16", (f"cpu with AMX/AVX512-BF16: a bf16 matmul measured {speedup:.1f}x float32 (autocast: "
                        "weights, optimizer and loss stay float32)")


# torch.compile on CPU (inductor, C++ kernels) measured ~1.1x per step in float32 and ~1.5x in bf16 on small
# GPTs, for a compile of ~30 s on an idle 2-core machine (over a minute on a busy one): it pays for long runs only.
CPU_COMPILE_MIN_SECONDS = 15 * 60


def choose_compile(device: torch.device, requested: bool | None,
                   est_run_seconds: float | None = None) -> tuple[bool, str]:
    """(compile?, why): on by default on cuda; on cpu when the run is estimated to take long enough
    (est_run_seconds, from the run's FLOPs and the measured peak) to pay back compiling."""
    if requested is not None:
        if requested and not hasattr(torch, "compile"):
            raise UsageError("--compile=True needs torch >= 2.0")
        return requested, "asked for"
    if device.type == "cuda":
        return True, "cuda: torch.compile fuses kernels and pays back its warm-up within a few hundred steps"
    if device.type == "mps":
        return False, "mps: torch.compile support there is immature"
    import shutil

    if not any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        return False, "cpu: no C++ compiler for torch.compile's CPU backend"
    minutes = CPU_COMPILE_MIN_SECONDS // 60
    if est_run_seconds is None:
        return False, (f"cpu: compiling takes about a minute and saves 10-30% per step, worth it for runs of "
                       f"{minutes}+ minutes (--compile=True)")
    if est_run_seconds >= CPU_COMPILE_MIN_SECONDS:
        return True, (f"cpu: a run of about {est_run_seconds / 60:.0f} minutes pays back compiling "
                      "(about a minute, then 10-30% faster steps)")
    return False, (f"cpu: a run of about {max(1.0, est_run_seconds / 60):.0f} minutes is too short to pay back "
                   f"compiling (pays from about {minutes} minutes; --compile=True to force)")


# Threads are only cut when fewer measured at least this much faster than torch's default (busy cores).
CPU_FEWER_THREADS_MIN_SPEEDUP = 1.3


def choose_threads(device: torch.device) -> tuple[int, str]:
    """(intra-op threads, why) for training on cpu. torch uses every physical core, which is best on an idle
    machine; when other processes keep cores busy, its threads wait on each other at every op (measured 2-10x
    slower matmuls with 2 threads than with 1 on a busy 2-core machine). So fewer threads are timed too and
    taken when clearly faster. OMP_NUM_THREADS, when set, is obeyed."""
    current = torch.get_num_threads()
    if device.type != "cpu":
        return current, "not a cpu run"
    if os.environ.get("OMP_NUM_THREADS"):
        return current, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    return _measured_threads(current)


@functools.cache
def _measured_threads(default: int) -> tuple[int, str]:
    candidates, n = [], default
    while n >= 1:
        candidates.append(n)
        n //= 2
    if len(candidates) == 1:
        return default, f"{default} thread (one core)"
    speed = {}
    try:
        for n in candidates:
            torch.set_num_threads(n)
            speed[n] = _time_matmul("float32", 384, 0.08)
    finally:
        torch.set_num_threads(default)
    best = max(speed, key=speed.get)
    if best != default and speed[best] >= CPU_FEWER_THREADS_MIN_SPEEDUP * speed[default]:
        return best, (f"{best} of {default} threads: a matmul measured {speed[best] / speed[default]:.1f}x faster "
                      "than on all cores (other processes keep them busy; OMP_NUM_THREADS overrides)")
    return default, f"{default} threads (one per core)"


def apply_threads(n: int) -> None:
    if n != torch.get_num_threads():
        torch.set_num_threads(n)


def training_attention(device: torch.device, dtype: str):
    """The attention kernel for a training step: on cpu under bf16 autocast the math path, whose backward
    measured 2x faster than the fused (flash) CPU kernel's in bf16; everywhere else SDPA's own choice."""
    if device.type != "cpu" or dtype == "float32":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


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


def measured_cpu_peak_flops(dtype: str = "float32", size: int = 1024, seconds: float = 0.3) -> float:
    """CPU peak, measured: FLOP/s of a square matmul in `dtype` with the current thread count (once per count)."""
    return _measured_cpu_peak_flops(dtype, size, seconds, torch.get_num_threads())


@functools.cache
def _measured_cpu_peak_flops(dtype: str, size: int, seconds: float, threads: int) -> float:
    return _time_matmul(dtype, size, seconds)


def _time_matmul(dtype: str, size: int, seconds: float) -> float:
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
