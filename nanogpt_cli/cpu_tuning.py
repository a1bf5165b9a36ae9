"""CPU process tuning: the allocator, the intra-op thread count, and the matmul measurements behind them.

Why each choice is what it is, with the measurements, is in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nanogpt_cli.atomic import atomic_file
from nanogpt_cli.config import cache_dir
from nanogpt_cli.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: CPU instructions that make bf16 matmuls faster than fp32. Read once a process (a model's
    load asks up to three times: `precision.for_inference`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# bf16 autocast on cpu pays from this bf16/fp32 matmul ratio on (1.41x faster steps at 2.2x; docs/performance.md).
CPU_BF16_MIN_SPEEDUP = 1.5


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput of one core, measured once per machine and remembered (see
    `machine_measurements`): the dtype it decides is the same in every run, whatever the load."""
    speedup = _positive(machine_measurements().get("bf16_speedup"))
    if speedup is None:
        flops = one_core_matmul_flops(["float32", "bfloat16"])
        speedup = flops["bfloat16"] / flops["float32"]

        def keep(entry: dict) -> None:
            entry["bf16_speedup"] = speedup
            _raise_core_flops(entry, flops)

        _remember(keep)
    return speedup


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
    return default_threads(), "one per core (fixed, for exact reruns; NGPT_THREADS=auto adapts to a busy machine)"


def adaptive_threads() -> bool:
    return os.environ.get("NGPT_THREADS", "").strip().lower() == "auto" and not os.environ.get("OMP_NUM_THREADS")


def default_threads() -> int:
    """torch's thread count before ngpt changed it in this process (its default: one per physical core)."""
    before, after = _applied_threads
    current = torch.get_num_threads()
    return before if current == after else current


def thread_tuner(device: torch.device, threads: int, distributed: bool, log=None) -> ThreadTuner:
    """The tuner of a training run: active on cpu with NGPT_THREADS=auto, except under torchrun (whose
    processes share the cores by design). With a fixed thread count on cpu it watches for busy cores instead,
    and says once (through log) what NGPT_THREADS can do about them."""
    on_own_cpu = device.type == "cpu" and not distributed
    enabled = on_own_cpu and adaptive_threads()
    busy = BusyCores(log) if on_own_cpu and not enabled and log is not None else None
    return ThreadTuner(default_threads(), threads, enabled, log, busy)


@functools.cache
def _measured_threads(default: int) -> tuple[int, str]:
    candidates = thread_candidates(default)
    if len(candidates) == 1:
        return default, "one core"
    samples = _matmul_race([("float32", n) for n in candidates], 384, rounds=5)
    speed = {n: statistics.median(s) for n, s in zip(candidates, samples, strict=True)}  # typical, not lucky
    best = max(speed, key=speed.get)
    if best != default and speed[best] >= CPU_FEWER_THREADS_MIN_SPEEDUP * speed[default]:
        return best, (f"fewer than the {default} cores: a matmul measured {speed[best] / speed[default]:.1f}x faster "
                      f"on {best} than on {default} (other processes keep cores busy; NGPT_THREADS=auto)")
    return default, "one per core (measured fastest; NGPT_THREADS=auto)"


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

    def __init__(self, default: int, current: int, enabled: bool = True, log=None, busy: BusyCores | None = None):
        self.candidates = thread_candidates(default)
        self.current = current if current in self.candidates else default
        self.enabled = enabled and len(self.candidates) > 1
        self.log, self.busy = log, busy
        self.recent: list[float] = []  # step times at the current count
        self.trial: int | None = None
        self.trial_times: list[float] = []
        self.interval, self.next_trial, self.steps, self.last, self.upward = self.FIRST, self.FIRST, 0, None, False

    def tick(self) -> None:
        if self.busy is not None:
            self.busy.tick()
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


def scheduler_times() -> tuple[int, int] | None:
    """(ns on a core, ns waiting for one while ready to run), summed over this process's threads, from the
    kernel's scheduler statistics (Linux /proc/self/task/*/schedstat); None where there are none."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    on_core = waiting = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat", encoding="ascii") as f:
                ran, waited, _ = f.read().split()
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile, or no schedstat in this kernel
        on_core, waiting = on_core + int(ran), waiting + int(waited)
    return (on_core, waiting) if on_core else None


class BusyCores:
    """Says once per run when the cores are busy: this process's threads waited for a core for at least SHARE
    of the time they were ready to run, over WINDOW seconds of steps (after the first FIRST steps).

    The kernel's own count of the waits is what contention is; a step time can not tell a slow machine from
    a busy one, nor see a load that was there from the start, and the load average counts this run's threads
    too (and the whole host's, in a container). Why it matters, with numbers: docs/performance.md.
    """

    FIRST, WINDOW, SHARE = 5, 2.0, 0.25

    def __init__(self, log):
        self.log, self.done, self.steps, self.start = log, False, 0, None

    def tick(self) -> None:
        if self.done:
            return
        self.steps += 1
        if self.steps < self.FIRST:
            return
        now, times = time.perf_counter(), scheduler_times()
        if times is None:
            self.done = True  # nothing to watch on this system
            return
        if self.start is None or now - self.start[0] < self.WINDOW:
            self.start = self.start or (now, times)
            return
        (_, (ran, waited)), self.start = self.start, (now, times)
        on_core, waiting = times[0] - ran, times[1] - waited
        if waiting > 0 and waiting >= self.SHARE * (on_core + waiting):
            self.done = True
            threads = torch.get_num_threads()
            advice = ("NGPT_THREADS=auto adapts the thread count to the load, NGPT_THREADS=1 runs one thread"
                      if threads > 1 else "fewer processes on the machine would speed it up")
            self.log(f"note: the cores are busy: this run's threads waited for a core "
                     f"{waiting / (on_core + waiting):.0%} of the time they were ready to run (other processes "
                     f"share the cores), which slows every step; {advice}")


def measured_cpu_peak_flops(dtype: str = "float32", threads: int | None = None) -> float:
    """The cpu's peak FLOP/s in dtype for `threads` (default: torch's count), for MFU: one core's best matmul
    (measured once per machine, remembered, and raised by any faster rate seen later: it is a maximum) times
    the cores those threads can use."""
    per_core = _positive(_core_flops(machine_measurements()).get(dtype))
    if per_core is None:
        flops = one_core_matmul_flops([dtype])
        per_core = _core_flops(_remember(lambda entry: _raise_core_flops(entry, flops)))[dtype]
    return per_core * cores_in_use(threads)


def raise_cpu_peak(dtype: str, flops_per_second: float, threads: int) -> float:
    """Record a rate this cpu reached in dtype on `threads` (a training step's): its peak is at least that.
    Returns the peak from now on, which a rate above the remembered one raises to that rate."""
    per_core = flops_per_second / cores_in_use(threads)
    entry = _remember(lambda entry: _raise_core_flops(entry, {dtype: per_core}))
    return _core_flops(entry)[dtype] * cores_in_use(threads)


def cores_in_use(threads: int | None = None) -> int:
    """The cores `threads` (default: torch's thread count) can keep busy: no more than the physical cores."""
    return max(1, min(threads or torch.get_num_threads(), physical_cores()))


MATMUL_SIZE, MATMUL_REPEATS = 512, 24  # one core: 0.2-2 ms a matmul


def one_core_matmul_flops(dtypes: list[str]) -> dict[str, float]:
    """FLOP/s of one core for each dtype: the fastest of MATMUL_REPEATS single square matmuls, the dtypes in
    turn. Each matmul is shorter than a scheduler time slice, so the fastest ran while no other process held
    the core: a load that comes and goes slows the typical matmul, not the fastest (docs/performance.md)."""
    before = torch.get_num_threads()
    pairs = {dtype: _square(dtype, MATMUL_SIZE) for dtype in dtypes}
    fastest = dict.fromkeys(dtypes, math.inf)
    try:
        torch.set_num_threads(1)
        for a, b in pairs.values():
            a @ b  # warm-up
        for _ in range(MATMUL_REPEATS):
            for dtype, (a, b) in pairs.items():
                start = time.perf_counter()
                a @ b
                fastest[dtype] = min(fastest[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {dtype: 2 * MATMUL_SIZE**3 / seconds for dtype, seconds in fastest.items()}


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




# ---------------------------------------------------------------- measurements remembered per machine

MEASUREMENTS_FILE = "cpu-measurements.json"  # in config.cache_dir(): {machine_key(): {...}}


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (Linux), None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo or the platform's processor
    string; "" where neither names one."""
    processor = platform.processor()
    return _cpuinfo_field("vendor_id") or next(
        (vendor for vendor in ("GenuineIntel", "AuthenticAMD") if vendor in processor), "")


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def physical_cores() -> int:
    """Cores, not hardware threads: distinct (physical id, core id) pairs of /proc/cpuinfo, else os.cpu_count()."""
    cores, physical = set(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "physical id":
                    physical = value.strip()
                elif name.strip() == "core id":
                    cores.add((physical, value.strip()))
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def machine_key() -> str:
    """What the measurements depend on: the CPU, its cores and hardware threads, and torch's kernels."""
    return f"{cpu_model()} | {physical_cores()} cores | {os.cpu_count()} threads | torch {torch.__version__}"


def measurements_path() -> Path:
    return cache_dir() / MEASUREMENTS_FILE


_this_process: dict = {}  # what this process measured: all it has where the cache cannot be written


def machine_measurements() -> dict:
    """This machine's remembered measurements: "bf16_speedup" and "core_flops" ({dtype: one core's FLOP/s})."""
    entry = _read_measurements(measurements_path()).get(machine_key())
    return {**_this_process, **(entry if isinstance(entry, dict) else {})}


def _read_measurements(path: Path) -> dict:
    """The whole file; empty when it is missing, unreadable, not JSON, or a symbolic link (never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return {}
    with os.fdopen(fd, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (ValueError, UnicodeDecodeError):
            return {}
    return data if isinstance(data, dict) else {}


def _remember(change) -> dict:
    """Apply change(entry) to this machine's entry and write the file again (atomically); returns the entry."""
    path = measurements_path()
    everything = _read_measurements(path)
    entry = machine_measurements()
    change(entry)
    _this_process.clear()
    _this_process.update(entry)
    everything[machine_key()] = entry
    with contextlib.suppress(OSError):  # a read-only cache: this process still remembers
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:  # readers see the old file or the new one; a link at path is replaced
            f.write((json.dumps(everything, indent=1, sort_keys=True) + "\n").encode())
    return entry


def _positive(value) -> float | None:
    """A remembered number, or None where the file holds something else (a hand edit, another version)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def _core_flops(entry: dict) -> dict:
    flops = entry.get("core_flops")
    return flops if isinstance(flops, dict) else {}


def _raise_core_flops(entry: dict, flops: dict[str, float]) -> None:
    """The per-core peaks are maxima: a measurement only ever raises them."""
    peaks = dict(_core_flops(entry))
    for dtype, value in flops.items():
        peaks[dtype] = max(value, _positive(peaks.get(dtype)) or 0.0)
    entry["core_flops"] = peaks
