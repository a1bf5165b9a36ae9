"""One home for device, precision, compile and distributed setup.

Detects cuda > mps > cpu, picks the autocast dtype and whether to compile (with the reason),
knows each device's peak FLOP/s for MFU, and starts/stops torch.distributed under torchrun.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import statistics
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


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: CPU instructions that make bf16 matmuls faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# bf16 autocast on CPU pays when a bf16 matmul is at least this much faster than an fp32 one: the casts,
# layer norms, GELUs and the optimizer stay as slow as in fp32. Measured on a 2-core AVX512-BF16 EPYC (bf16
# matmul 2.2-2.3x fp32): a training step 1.41x faster on the 0.8M-parameter CPU recipe (with the explicit
# attention, see training_attention), GPT-2 124M 1.85x with torch.compile; the loss curve matches fp32 (best
# val loss 1.9205 vs 1.9199 on that recipe).
CPU_BF16_MIN_SPEEDUP = 1.5


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU with the current thread count (measured once per count):
    the best of several interleaved bursts each, so that a passing load spike favours neither."""
    return _cpu_bf16_speedup(torch.get_num_threads())


@functools.cache
def _cpu_bf16_speedup(threads: int) -> float:
    fp32, bf16 = _matmul_race([("float32", threads), ("bfloat16", threads)], 512)
    return max(bf16) / max(fp32)


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
    if not cpu_has_fast_bf16():
        return "float32", "cpu without AMX/AVX512-BF16: bf16 matmuls run no faster than float32 there"
    speedup = cpu_bf16_speedup()
    if speedup < CPU_BF16_MIN_SPEEDUP:
        return "float32", f"cpu: a bf16 matmul measured only {speedup:.1f}x float32 here, too little to pay"
    return "bfloat16", (f"cpu with AMX/AVX512-BF16: a bf16 matmul measured {speedup:.1f}x float32 (autocast: "
                        "weights, optimizer and loss stay float32)")


# torch.compile on CPU (inductor, C++ kernels), measured on a 2-core EPYC in bf16: steps 1.2-1.3x faster on the
# 0.8M recipe and 1.33x on GPT-2 124M, for 30-70 s of compiling (cold cache; more on a busy machine, and more
# again for the evaluation graph). A 2000-step CPU recipe (~1.5 min) loses; runs of hours win.
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_host_memory() -> str:
    """Make glibc's malloc keep freed memory for the next allocation instead of giving it back to the OS.

    By default glibc serves each large allocation (activations, gradients, logits) with a fresh mmap and
    unmaps it when freed, so every training step faults all those pages in again: measured here, two thirds
    of a GPT-2 124M CPU step's system time and 1.75x its wall time (4.40 s -> 2.52 s per step; the 0.8M
    recipe: 10x fewer page faults). Served from the heap and never trimmed, the memory is reused, as
    jemalloc or tcmalloc would; the price is a process that keeps its high-water mark (GPT-2 124M's peak
    RSS measured 6% higher). Returns what was done, for the run's summary; NGPT_MALLOPT=0 leaves malloc
    alone. Linux with glibc only (a no-op elsewhere)."""
    if os.environ.get("NGPT_MALLOPT", "").strip() == "0":
        return "glibc defaults (NGPT_MALLOPT=0)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the system's allocator"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the system's allocator"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "the system's allocator (mallopt refused)"
    return "freed blocks kept for reuse (glibc mallopt; NGPT_MALLOPT=0 to leave malloc alone)"


# Threads are only cut when fewer measured at least this much faster than torch's default (busy cores).
CPU_FEWER_THREADS_MIN_SPEEDUP = 1.3


def choose_threads(device: torch.device) -> tuple[int, str]:
    """(intra-op threads, why) for training on cpu.

    By default torch's own count, one thread per physical core: best on an idle machine, and fixed, which
    bit-exact reruns and resumes need (results change in the last bits with the thread count). On a shared
    machine, NGPT_THREADS=auto adapts instead: with cores kept busy by other processes torch's threads wait
    on each other at every op (measured: 2 threads 2-15x slower than 1 on a busy 2-core machine), so fewer
    threads are timed at the start, and again now and then during the run (ThreadTuner), and taken when
    clearly faster. NGPT_THREADS=N or OMP_NUM_THREADS=N fix the count."""
    current = torch.get_num_threads()
    if device.type != "cpu":
        return current, "not a cpu run"
    if os.environ.get("OMP_NUM_THREADS"):
        return current, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    wanted = os.environ.get("NGPT_THREADS", "").strip().lower()
    if wanted == "auto":
        return _measured_threads(default_threads())
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise UsageError(f"NGPT_THREADS must be auto or a positive number, got {wanted!r}")
        return int(wanted), "NGPT_THREADS"
    default = default_threads()
    return default, (f"{default}, one per core (fixed, for exact reruns; NGPT_THREADS=auto adapts to a busy "
                     "machine)")


def adaptive_threads() -> bool:
    return os.environ.get("NGPT_THREADS", "").strip().lower() == "auto" and not os.environ.get("OMP_NUM_THREADS")


def default_threads() -> int:
    """torch's thread count before ngpt changed it in this process (its default: one per physical core)."""
    before, after = _applied_threads
    current = torch.get_num_threads()
    return before if current == after else current


def thread_tuner(device: torch.device, threads: int, distributed: bool, log=None) -> ThreadTuner:
    """The tuner of a training run: active on cpu with NGPT_THREADS=auto, except under torchrun (whose
    processes share the cores by design)."""
    enabled = device.type == "cpu" and adaptive_threads() and not distributed
    return ThreadTuner(default_threads(), threads, enabled, log)


@functools.cache
def _measured_threads(default: int) -> tuple[int, str]:
    candidates = thread_candidates(default)
    if len(candidates) == 1:
        return default, "1 (one core)"
    samples = _matmul_race([("float32", n) for n in candidates], 384, rounds=5)
    speed = {n: statistics.median(s) for n, s in zip(candidates, samples, strict=True)}  # typical, not lucky
    best = max(speed, key=speed.get)
    if best != default and speed[best] >= CPU_FEWER_THREADS_MIN_SPEEDUP * speed[default]:
        return best, (f"{best} of {default}: a matmul measured {speed[best] / speed[default]:.1f}x faster on {best} "
                      f"than on {default} (other processes keep cores busy; NGPT_THREADS=auto)")
    return default, f"{default}, one per core (measured fastest; NGPT_THREADS=auto)"


_applied_threads = (0, 0)  # (torch's count before apply_threads changed it, the count it set)


def apply_threads(n: int, default: int | None = None) -> None:
    """Set torch's thread count to n, remembering the count it had before ngpt chose (or `default`), which
    the next choice in this process (bench --compare builds several runs) measures from again."""
    global _applied_threads
    current = torch.get_num_threads()
    if default is None:
        default = _applied_threads[0] if current == _applied_threads[1] else current
    _applied_threads = (default, n)
    if n != current:
        torch.set_num_threads(n)


def thread_candidates(default: int) -> list[int]:
    """default, default // 2, ..., 1: the thread counts worth trying."""
    out = [default]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


class ThreadTuner:
    """Keeps the intra-op thread count right while a cpu run goes on: the load of a shared machine changes,
    and with busy cores torch's threads wait on each other at every op (measured on a 2-core machine: the
    0.8M recipe's step took 1.7 s on 2 threads and 0.21 s on 1 while others' jobs kept both cores busy, and
    39 ms on 2 threads against 53 ms on 1 once the machine was idle).

    tick() is called at the start of every step and times the steps. Now and then (after 30 steps, then
    at doubling intervals up to every 1000 steps while nothing changes) a few steps run with a neighbouring
    count, more or fewer threads in turn; if they are clearly faster (median 15%) that count stays. A trial
    that is plainly slower ends after two steps, so that a busy machine pays little for asking.
    """

    WINDOW, TRIAL, FIRST, LONGEST, GAIN = 7, 5, 30, 1000, 0.85

    def __init__(self, default: int, current: int, enabled: bool = True, log=None):
        self.candidates = thread_candidates(default)
        self.current = current if current in self.candidates else default
        self.enabled = enabled and len(self.candidates) > 1
        self.log = log
        self.recent: list[float] = []  # step times at the current count
        self.trial: int | None = None
        self.trial_times: list[float] = []
        self.interval, self.next_trial, self.steps, self.last, self.upward = self.FIRST, self.FIRST, 0, None, False

    def tick(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.last is not None:
            (self.recent if self.trial is None else self.trial_times).append(now - self.last)
            self.recent = self.recent[-self.WINDOW:]
        self.last, self.steps = now, self.steps + 1
        if self.trial is not None:
            base = statistics.median(self.recent)
            if len(self.trial_times) >= self.TRIAL or (len(self.trial_times) >= 2
                                                       and min(self.trial_times) > 1.5 * base):
                self._conclude(base)
        elif self.steps >= self.next_trial and len(self.recent) >= self.WINDOW:
            i = self.candidates.index(self.current)
            up, down = self.candidates[i - 1] if i > 0 else None, self.candidates[i + 1] if i + 1 < len(
                self.candidates) else None
            self.upward = not self.upward if up and down else up is not None
            self.trial, self.trial_times = (up if self.upward else down), []
            apply_threads(self.trial, self.candidates[0])

    def _conclude(self, base: float) -> None:
        tried = statistics.median(self.trial_times)
        if tried <= self.GAIN * base:
            if self.log:
                self.log(f"threads: {self.trial} instead of {self.current}, measured {base / tried:.1f}x faster now")
            self.current, self.recent, self.interval = self.trial, self.trial_times[-self.WINDOW:], self.FIRST
        else:
            self.interval = min(2 * self.interval, self.LONGEST)
        apply_threads(self.current, self.candidates[0])
        self.trial, self.next_trial = None, self.steps + self.interval


def training_attention(device: torch.device, dtype: str) -> str:
    """The attention of a training run (GPT.set_attention): on cpu under bf16 autocast the explicit form,
    measured 1.6x faster than SDPA's math kernel and 4x faster than its flash kernel there (forward and
    backward); everywhere else SDPA with torch's own kernel choice (flash on GPUs, and on cpu in fp32)."""
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


def measured_cpu_peak_flops(dtype: str = "float32", size: int = 1024, seconds: float = 0.3) -> float:
    """CPU peak, measured: FLOP/s of a square matmul in `dtype` with the current thread count (once per count)."""
    return _measured_cpu_peak_flops(dtype, size, seconds, torch.get_num_threads())


@functools.cache
def _measured_cpu_peak_flops(dtype: str, size: int, seconds: float, threads: int) -> float:
    return _time_matmul(dtype, size, seconds)


def _square(dtype: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # its own generator: measuring must not shift the training RNG
    return (torch.randn(size, size, dtype=DTYPES[dtype], generator=g),
            torch.randn(size, size, dtype=DTYPES[dtype], generator=g))


def _time_matmul(dtype: str, size: int, seconds: float, pair=None) -> float:
    """FLOP/s of size x size matmuls in dtype, run for about `seconds` (at least 3)."""
    a, b = pair or _square(dtype, size)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        a @ b
        n += 1
    return 2 * size**3 * n / elapsed


def _matmul_race(entries: list[tuple[str, int]], size: int, rounds: int = 4,
                 seconds: float = 0.02) -> list[list[float]]:
    """FLOP/s samples of each (dtype, threads) entry, measured in interleaved short bursts (round-robin)."""
    before = torch.get_num_threads()
    pairs = {dtype: _square(dtype, size) for dtype, _ in entries}
    samples: list[list[float]] = [[] for _ in entries]
    try:
        for _ in range(rounds):
            for i, (dtype, threads) in enumerate(entries):
                torch.set_num_threads(threads)
                samples[i].append(_time_matmul(dtype, size, seconds, pairs[dtype]))
    finally:
        torch.set_num_threads(before)
    return samples


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
        return measured_cpu_peak_flops(kind), (f"measured {kind} matmul on {torch.get_num_threads()} "
                                                     f"thread{'s' if torch.get_num_threads() > 1 else ''}")
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


def cleanup_distributed(barrier: bool = False) -> None:
    """Leave the process group. With barrier (the success path), first wait until every rank is done, so no
    rank tears down while a peer is still in a collective; and collect garbage before, so that no DDP reducer
    or pending gloo work outlives the group and is freed during interpreter shutdown (which aborts)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()
