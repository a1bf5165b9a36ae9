"""The runtime of a command, decided once: device, dtype, compile, threads, attention and peak FLOP/s.

    runtime = plan(cfg.device, cfg.dtype, cfg.compile, training=True)

Every command (train, sample, eval, bench, serve) builds one `Runtime` and reads its choices, each
with the reason it was made; nothing else asks the device the same question again.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch

from nanogpt_cli import cpu_tuning
from nanogpt_cli.cpu_tuning import DTYPES
from nanogpt_cli.distributed import DistEnv, dist_env_from_environ, init_distributed, same_on_all_ranks
from nanogpt_cli.errors import UsageError
from nanogpt_cli.progress import is_verbose


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> cuda (this process's local GPU under torchrun) > mps > cpu; explicit names are checked."""
    if requested == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
            return device
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
        torch.cuda.set_device(device)  # what torch allocates without naming a GPU (pinned memory too) goes there
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device=mps was asked for, but MPS is not available here; use --device=cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def cuda_has_bf16(device: torch.device) -> bool:
    """bf16 in hardware on this GPU (Ampere and newer). torch's default check also says yes where bf16 is only
    emulated (T4, V100): slow there, and inductor will not compile it, so those take float16."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_dtype(device: torch.device, requested: str = "auto", training: bool = False) -> tuple[str, str]:
    """(dtype name, why): bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on mps; on cpu,
    for training, bf16 autocast where AMX/AVX512-BF16 make a measured bf16 matmul clearly faster, else fp32
    (sampling and `ngpt eval` on cpu stay fp32: exact figures, and autocast re-casts every weight per token)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UsageError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
        if requested == "bfloat16" and device.type == "cuda" and not cuda_has_bf16(device):
            raise UsageError("--dtype=bfloat16: this GPU has no bfloat16 tensor cores; use float16")
        if requested == "float16" and device.type == "mps" and training:
            raise UsageError("--dtype=float16 trains without loss scaling on mps (small gradients vanish); "
                             "use float32 or bfloat16")
        return requested, "asked for"
    if device.type == "cuda":
        if cuda_has_bf16(device):
            return "bfloat16", "the GPU supports bfloat16 (no loss scaling needed)"
        return "float16", "the GPU lacks bfloat16: float16 with a GradScaler"
    if device.type == "mps":
        return "float32", "mps: float32 (autocast gains little there; --dtype=bfloat16 to try, macOS 14+)"
    if not training:
        return "float32", "cpu: float32 (--dtype=bfloat16 to use bf16 autocast)"
    if not cpu_tuning.cpu_has_fast_bf16():
        return "float32", "cpu without AMX/AVX512-BF16: bf16 matmuls run no faster than float32 there"
    speedup = cpu_tuning.cpu_bf16_speedup()
    if speedup < cpu_tuning.CPU_BF16_MIN_SPEEDUP:
        return "float32", f"cpu: a bf16 matmul measured only {speedup:.1f}x float32 here, too little to pay"
    return "bfloat16", (f"cpu with AMX/AVX512-BF16: a bf16 matmul measured {speedup:.1f}x float32 (autocast: "
                        "weights, optimizer and loss stay float32)")


# torch.compile on cpu pays back its 30-70 s of compiling in runs of this length (docs/performance.md).
CPU_COMPILE_MIN_SECONDS = 15 * 60


def duration(seconds: float) -> str:
    """A run's estimated length in words: minutes, hours or days."""
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}s"
    return f"{seconds / 60:.0f} minutes"


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
        return False, (f"cpu: compiling takes about a minute and saves 0-20% per step (measured: 16% on a 0.8M-"
                       f"parameter model, 1% on GPT-2 124M), worth it for runs of {minutes}+ minutes (--compile=True)")
    if est_run_seconds >= CPU_COMPILE_MIN_SECONDS:
        return True, (f"cpu: a run of about {duration(est_run_seconds)} pays back compiling "
                      "(about a minute, then 0-20% faster steps)")
    length = f"about {duration(est_run_seconds)}" if est_run_seconds >= 90 else "a minute or two"
    return False, (f"cpu: a run of {length} is too short to pay back "
                   f"compiling (pays from about {minutes} minutes; --compile=True to force)")


def training_attention(device: torch.device, dtype: str) -> str:
    """The attention of a training run (GPT.set_attention): on cpu under bf16 autocast the explicit form
    (1.6x faster than SDPA's math kernel there, forward and backward); elsewhere SDPA."""
    return "explicit" if device.type == "cpu" and dtype != "float32" else "sdpa"


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


# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s (fp32 accumulate), from the vendors' data sheets.
# First match wins: more specific names come before the names they contain (H100 NVL before H100, A100 before A10).
GPU_PEAK_FLOPS = [
    ("H200 NVL", 835e12), ("H200", 989e12), ("GH200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("A10G", 70e12), ("A10", 125e12), ("A30", 165e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 5090", 209e12), ("RTX 4090", 165e12), ("RTX 4080", 97e12), ("RTX 3090", 71e12),
    ("RTX 6000 Ada", 364e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),
    ("MI300X", 1307e12), ("MI250X", 383e12),
]


def gpu_peak_flops(name: str) -> float | None:
    """The peak of a GPU by its name (first match, most specific first); None when unknown."""
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def peak_flops(device: torch.device, dtype: str, threads: int | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for MFU; on cpu for `threads` (default: torch's thread count)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        if flops is not None and dtype == "float32":
            flops = flops / 2  # TF32 tensor cores run at half the bf16 rate
        return flops, (f"{name} data sheet" if flops else f"{name}: unknown GPU")
    if device.type == "cpu":
        kind, cores = cpu_peak_kind(dtype), cpu_tuning.cores_in_use(threads)
        return cpu_tuning.measured_cpu_peak_flops(kind, threads), (f"measured {kind} matmul of one core x {cores} "
                                                                    f"core{'s' if cores > 1 else ''}")
    return None, "unknown for mps"


def cpu_peak_kind(dtype: str) -> str:
    """The matmul whose peak bounds a cpu run in dtype: bf16 autocast runs its matmuls in bf16."""
    return "bfloat16" if dtype == "bfloat16" else "float32"


RAISED = ", raised to a rate training reached"  # a peak that a step's FLOP/s proved too low


@dataclass
class Runtime:
    """Where and how a command computes, each choice with the reason it was made (see `plan`)."""

    device: torch.device
    dtype: str
    dtype_why: str
    env: DistEnv = field(default_factory=DistEnv)
    compile: bool = False
    compile_why: str = "not asked for"
    threads: int = field(default_factory=torch.get_num_threads)
    threads_why: str = "torch's default"
    host_memory: str = ""  # what was done to the allocator (cpu)
    attention: str = "sdpa"  # GPT.set_attention's kind for training

    @functools.cached_property
    def peak(self) -> tuple[float | None, str]:
        """(peak FLOP/s, where it came from) for MFU, for the planned thread count: measured once, when first
        asked for."""
        return peak_flops(self.device, self.dtype, self.threads)

    def mfu(self, flops_per_second: float) -> float | None:
        """Model FLOPs utilisation of a rate, at most 1: a rate above the peak proves the peak too low, and
        raises it to that rate (on cpu, remembered for this machine's later runs); None when the peak is unknown."""
        peak, why = self.peak
        if not peak:
            return None
        if flops_per_second > peak:
            if self.device.type == "cpu":
                cpu_tuning.raise_cpu_peak(cpu_peak_kind(self.dtype), flops_per_second, self.threads)
            self.peak = (flops_per_second, why if why.endswith(RAISED) else why + RAISED)
        return flops_per_second / self.peak[0]

    def autocast(self):
        return autocast(self.device, self.dtype)

    def synchronize(self) -> None:
        synchronize(self.device)

    def describe(self, reasons: bool | None = None) -> str:
        """The device line a run prints at its start: the choices, and with reasons (default: with --verbose)
        why each was made."""
        if reasons is None:
            reasons = is_verbose()

        def choice(name: str, value, why: str) -> str:
            return f"  [bold]{name}[/bold] {value}" + (f": {why}" if reasons else "")

        processes = f"{self.env.world_size} process{'es' if self.env.is_distributed else ''}"
        line = (f"[bold]device[/bold] {self.device} ({processes})" + choice("dtype", self.dtype, self.dtype_why)
                + choice("compile", self.compile, self.compile_why))
        if self.device.type == "cpu":
            line += choice("threads", self.threads, self.threads_why)
            if reasons:
                line += f"  [bold]host memory[/bold] {self.host_memory}"
        return line if reasons else line + "  [dim](--verbose: why)[/dim]"


def plan(device: str = "auto", dtype: str = "auto", compile: bool | None = False, *, training: bool = False,
         run_flops: float | None = None, backend: str = "auto") -> Runtime:
    """Decide the runtime once. Under torchrun this joins the process group, and choices that are measured
    (cpu dtype, compile) are rank 0's on every rank. `compile=None` lets the device decide; on cpu that needs
    `run_flops`, the run's training FLOPs, to estimate whether compiling pays back. Sampling and evaluation
    (training=False) keep torch's threads and fp32 on cpu."""
    env = dist_env_from_environ()
    torch_device = resolve_device(device, env.local_rank)
    env = init_distributed(torch_device, backend)
    on_cpu = torch_device.type == "cpu"
    host_memory = cpu_tuning.keep_freed_host_memory() if on_cpu else ""  # steps reuse freed memory
    threads, threads_why = torch.get_num_threads(), "torch's default"
    if training:
        threads, threads_why = cpu_tuning.choose_threads(torch_device)  # before the dtype choice measures matmuls
        cpu_tuning.apply_threads(threads)
        if torch_device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere and newer
            torch.backends.cudnn.allow_tf32 = True
    chosen_dtype, dtype_why = same_on_all_ranks(choose_dtype(torch_device, dtype, training=training), env)
    runtime = Runtime(torch_device, chosen_dtype, dtype_why, env=env, threads=threads, threads_why=threads_why,
                      host_memory=host_memory, attention=training_attention(torch_device, chosen_dtype))
    seconds = None
    if on_cpu and training and run_flops is not None and compile is None:
        seconds = run_flops / (runtime.peak[0] / 3)  # small GPTs reach about a third of the matmul peak eager
    runtime.compile, runtime.compile_why = same_on_all_ranks(choose_compile(torch_device, compile, seconds), env)
    return runtime
