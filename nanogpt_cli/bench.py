"""Timing of the training step: ms/iter, tokens/s, MFU against the device's peak, peak memory.

    ngpt bench --preset gpt2-124m --data synthetic --iters 20
    ngpt bench --preset gpt2-124m --batch_size=4 --block_size=256 --compare dtype=float32,bfloat16
    ngpt bench --preset shakespeare-char --data real --profile        # + a Chrome trace and the top operators

Each configuration runs the training loop's own step (Trainer.train_step: autocast, compile, fused AdamW,
gradient clipping, the finiteness check), so what it reports is what `ngpt train` would do with the same keys.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nanogpt_cli.atomic import open_regular, temp_folder
from nanogpt_cli.config import TrainConfig
from nanogpt_cli.distributed import cleanup_distributed, dist_env_from_environ
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.runtime import synchronize
from nanogpt_cli.train import build_trainer, lr_at


@dataclass
class BenchResult:
    device: str
    dtype: str
    compile: bool
    iters: int
    ms_per_iter: float
    tokens_per_second: float
    mfu: float | None
    peak_flops: float | None
    peak_memory_mb: float
    params_millions: float
    final_loss: float
    world_size: int = 1
    per_rank_tokens_per_second: list[float] | None = None  # under torchrun; tokens_per_second is their sum
    dtype_why: str = ""
    compile_why: str = ""
    threads: int | None = None  # cpu: intra-op threads used
    threads_why: str = ""
    peak_flops_source: str = ""
    memory_kind: str = ""  # what peak_memory_mb measures on this device
    warmup_seconds: float = 0.0  # the untimed first iterations, compilation included
    tokens_per_iter: int = 0
    trace: str | None = None  # --profile: the Chrome trace written
    top_ops: list[dict] = field(default_factory=list)  # --profile: the costliest operators, self time per iter

    def as_dict(self) -> dict:
        return asdict(self)


class MemoryWatch:
    """Peak memory of one benchmark: CUDA's allocator peak; on CPU the process's resident set, sampled
    every few milliseconds by a thread (so that several configurations in one process each get their own
    peak; ru_maxrss where /proc is missing); MPS: the driver's allocation, sampled after each step."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()
        self._statm = Path("/proc/self/statm")
        self._thread = None

    @property
    def kind(self) -> str:
        return {"cuda": "CUDA allocator peak", "mps": "MPS driver allocation"}.get(self.device.type,
                                                                                  "process peak RSS")

    def _rss(self) -> int:
        return int(self._statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> MemoryWatch:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu" and self._statm.is_file():
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def step(self) -> None:
        if self.device.type == "mps":
            self.peak = max(self.peak, torch.mps.driver_allocated_memory())

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        elif self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "cpu":  # no /proc (macOS): the process's peak so far
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            self.peak = rss if sys.platform == "darwin" else rss * 1024

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


def default_trace_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir or ".").expanduser() / "bench-trace.json"


def _is_trace(path: Path) -> bool:
    """Whether `path` holds a Chrome trace (what an earlier --profile wrote): JSON that opens with its keys."""
    import gzip

    try:
        with open_regular(path) as f:
            head = f.read(4096)
            if head.startswith(b"\x1f\x8b"):  # a .gz trace
                f.seek(0)
                head = gzip.GzipFile(fileobj=f).read(4096)
    except (NgptError, OSError, EOFError):
        return False
    return head.lstrip().startswith(b"{") and (b'"schemaVersion"' in head or b'"traceEvents"' in head)


def check_trace_path(path: Path, replace_any: bool) -> None:
    """Before the run: refuse a trace path whose file an earlier --profile did not write (a checkpoint,
    say), unless `replace_any` (--force). A previous trace is replaced."""
    if path.is_dir() and not path.is_symlink():
        raise UsageError(f"--trace {path} is a folder; give a file path")
    if os.path.lexists(path) and not replace_any and not _is_trace(path):
        raise UsageError(f"--trace {path} exists and is not a trace that --profile wrote; choose another path, "
                         "or add --force to replace it")


def trace_file(cfg: TrainConfig, trace_path: str | Path | None, rank: int | None) -> Path:
    """Where the trace goes: trace_path (default out_dir/bench-trace.json), one file per rank under torchrun."""
    path = Path(trace_path).expanduser() if trace_path else default_trace_path(cfg)
    return path if rank is None else path.with_name(f"{path.stem}-rank{rank}{path.suffix}")


def bench(cfg: TrainConfig, iters: int = 20, warmup: int = 5, profile: bool = False,
          trace_path: str | Path | None = None, profile_iters: int = 5, top: int = 15,
          replace_any_trace: bool = False) -> BenchResult:
    """Run warmup + iters training steps and time the last iters; under torchrun every rank does,
    and the result has each rank's tokens/s and their sum. With profile, profile_iters more steps
    run under torch.profiler (after the timing, which the profiler would slow down): their Chrome
    trace goes to trace_path (default out_dir/bench-trace.json) and the top operators into the result.
    An existing file at the trace path that is not a trace is refused before the run, unless
    replace_any_trace."""
    done = False
    env = dist_env_from_environ()
    trace = trace_file(cfg, trace_path, env.rank if env.is_distributed else None) if profile else None
    if trace is not None:
        check_trace_path(trace, replace_any_trace)
    try:
        result = _bench(replace(cfg, eval_only=False), iters, warmup, trace, profile_iters, top)
        done = True
        return result
    finally:
        cleanup_distributed(barrier=done)


def _bench(cfg: TrainConfig, iters: int, warmup: int, trace: Path | None, profile_iters: int,
           top: int) -> BenchResult:
    trainer = build_trainer(cfg)
    runtime, device, env = trainer.runtime, trainer.device, trainer.env
    trainer.thread_tuner.enabled = False  # bench times one configuration: the thread count chosen at the start
    step = 0

    def train_step() -> torch.Tensor:
        nonlocal step
        trainer.prefetch()
        loss = trainer.train_step(lr_at(step, cfg))
        step += 1
        return loss

    with MemoryWatch(device) as memory:
        t0 = time.perf_counter()
        for _ in range(warmup):
            train_step()
        runtime.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            loss = train_step()
            memory.step()
        final_loss = loss.item()  # also waits for the device to finish
        seconds = time.perf_counter() - start
    per_rank = [trainer.tokens_per_iter / env.world_size * iters / seconds]
    if env.is_distributed:
        import torch.distributed as dist

        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, per_rank[0])
        per_rank = gathered
    tokens_per_s = sum(per_rank)
    result = BenchResult(
        device=str(device), dtype=runtime.dtype, compile=runtime.compile, iters=iters,
        ms_per_iter=1000 * seconds / iters, tokens_per_second=tokens_per_s,
        mfu=runtime.mfu(trainer.model.flops_per_token() * tokens_per_s / env.world_size), peak_flops=runtime.peak[0],
        peak_memory_mb=memory.megabytes, params_millions=trainer.model.get_num_params() / 1e6,
        final_loss=final_loss, world_size=env.world_size,
        per_rank_tokens_per_second=per_rank if env.is_distributed else None,
        dtype_why=runtime.dtype_why, compile_why=runtime.compile_why,
        threads=runtime.threads if device.type == "cpu" else None,
        threads_why=runtime.threads_why if device.type == "cpu" else "",
        peak_flops_source=runtime.peak[1], memory_kind=memory.kind, warmup_seconds=start - t0,
        tokens_per_iter=trainer.tokens_per_iter,
    )
    if trace is not None:
        result.trace, result.top_ops = str(trace), profile_steps(train_step, device, trace, profile_iters, top)
    return result


def profile_steps(train_step, device: torch.device, path: Path, iters: int, top: int) -> list[dict]:
    """Run `iters` steps under torch.profiler; write the Chrome trace to path (built in a new temporary
    folder beside it and renamed over it, never through a symlink); return the top operators by self
    time (device time on cuda), per iteration."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    iters = max(1, iters)
    with profiler_output_dropped():
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(iters):
                train_step()
            synchronize(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = temp_folder(path)
        try:
            prof.export_chrome_trace(str(folder / path.name))
            os.replace(folder / path.name, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        events = prof.key_averages()
    on_gpu = device.type == "cuda"
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    total = sum(getattr(event, key) for event in events) or 1.0
    rows = []
    for event in sorted(events, key=lambda event: getattr(event, key), reverse=True)[:top]:
        self_us = getattr(event, key)
        rows.append({"name": event.key, "calls_per_iter": event.count / iters,
                     "self_ms_per_iter": self_us / 1000 / iters,
                     "percent": 100 * self_us / total, "time": "cuda" if on_gpu else "cpu"})
    return rows


# The profiler's own lines: kineto's logs (USDT:/STAGE: ... profiler_start, Completed Stage ...) and warnings.
PROFILER_LINE = re.compile(r"^(USDT|STAGE):|^\[W\S* \S*(kineto|[Pp]rofiler)|ActivityProfiler")


@contextlib.contextmanager
def profiler_output_dropped():
    """Run the block with stderr (the file descriptor: kineto writes from C++) sent to a temporary file and
    torch.profiler's Python warnings off; afterwards what the block wrote to stderr goes there, but for the
    profiler's own lines, so that an error or a note still shows."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"torch\.(autograd\.)?profiler")
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not PROFILER_LINE.search(line)))
            sys.stderr.flush()


# ---------------------------------------------------------------- --compare

def parse_compare(spec: str, field_names) -> tuple[str, list[str]]:
    """`key=v1,v2,...` -> (key, [v1, v2, ...]); the key must be a config key."""
    key, sep, values = spec.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    items = [value.strip() for value in values.split(",") if value.strip()]
    if not sep or not key or len(items) < 2:
        raise UsageError(f"--compare takes KEY=VALUE1,VALUE2[,...], e.g. dtype=float32,bfloat16; got {spec!r}")
    if key not in field_names:
        raise UsageError(f"--compare: unknown config key {key!r}")
    return key, items


def compare(configs: list[tuple[str, TrainConfig]], iters: int, warmup: int, profile: bool = False,
            trace_path: str | Path | None = None, on_result=None, replace_any_trace: bool = False) -> list[dict]:
    """Bench each (label, config) in turn in this process; each row is the result plus its label and its
    tokens/s ratio to the first configuration (> 1: faster). on_result(label, result) is called as each ends."""
    if dist_env_from_environ().is_distributed:
        raise UsageError("--compare runs in one process; run it without torchrun")
    paths = []
    for label, cfg in configs:
        base = trace_file(cfg, trace_path, None)
        paths.append(base.with_name(f"{base.stem}-{_file_name_safe(label)}{base.suffix or '.json'}"))
        if profile:  # all checked before the first run
            check_trace_path(paths[-1], replace_any_trace)
    rows = []
    for (label, cfg), path in zip(configs, paths, strict=True):
        result = bench(cfg, iters=iters, warmup=warmup, profile=profile, trace_path=path,
                       replace_any_trace=replace_any_trace)
        torch._dynamo.reset()  # compiled graphs of this configuration neither linger nor count against the next
        gc.collect()  # the previous configuration's model and optimizer go before the next one is built
        row = {"label": label, **result.as_dict()}
        first = rows[0] if rows else row
        row["ratio"] = result.tokens_per_second / first["tokens_per_second"]
        rows.append(row)
        if on_result is not None:
            on_result(label, result)
    return rows


def _file_name_safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
