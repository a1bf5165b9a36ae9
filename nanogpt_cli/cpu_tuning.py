"""CPU process tuning: the allocator, the intra-op thread count, and the matmul measurements behind them.

Why each choice is what it is, with the measurements, is in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import statistics
import time

import torch

from nanogpt_cli.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: CPU instructions that make bf16 matmuls faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# bf16 autocast on cpu pays from this bf16/fp32 matmul ratio on (1.41x faster steps at 2.2x; docs/performance.md).
CPU_BF16_MIN_SPEEDUP = 1.5


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU with the current thread count (measured once per count):
    the best of several interleaved bursts each, so that a passing load spike favours neither."""
    return _cpu_bf16_speedup(torch.get_num_threads())


@functools.cache
def _cpu_bf16_speedup(threads: int) -> float:
    fp32, bf16 = _matmul_race([("float32", threads), ("bfloat16", threads)], 512)
    return max(bf16) / max(fp32)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_host_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS, so that a step's
    large tensors do not fault their pages in again (GPT-2 124M's CPU step 1.75x faster; docs/performance.md).
    Returns what was done; NGPT_MALLOPT=0 leaves malloc alone. Linux with glibc only (a no-op elsewhere)."""
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
    """(intra-op threads, why) for training on cpu: torch's default, one per physical core, fixed for exact
    reruns; NGPT_THREADS=auto measures fewer threads against it for busy machines (docs/performance.md);
    NGPT_THREADS=N or OMP_NUM_THREADS=N fix the count."""
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
    """Keeps the intra-op thread count right while a cpu run goes on (NGPT_THREADS=auto): with busy cores
    torch's threads wait on each other at every op (docs/performance.md).

    tick() is called at the start of every step and times the steps. Now and then (after FIRST steps, then
    at doubling intervals up to LONGEST) a few steps run with a neighbouring count, more or fewer threads in
    turn; a count clearly faster (median below GAIN x the current) stays. A plainly slower trial ends after
    two steps.
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


