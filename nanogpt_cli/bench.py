"""Timing of the training step: ms/iter, tokens/s, MFU against the device's peak, peak memory.

    ngpt bench --preset gpt2-124m --data synthetic --iters 20
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from nanogpt_cli.config import TrainConfig
from nanogpt_cli.device import (
    choose_compile,
    cleanup_distributed,
    dist_env_from_environ,
    init_distributed,
    resolve_device,
    synchronize,
)
from nanogpt_cli.train import Trainer, lr_at


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

    def as_dict(self) -> dict:
        return asdict(self)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def bench(cfg: TrainConfig, iters: int = 20, warmup: int = 5) -> BenchResult:
    """Run warmup + iters training steps and time the last iters; under torchrun every rank does,
    and the result has each rank's tokens/s and their sum."""
    device = resolve_device(cfg.device, dist_env_from_environ().local_rank)
    env = init_distributed(device, cfg.backend)
    try:
        return _bench(cfg, device, env, iters, warmup)
    finally:
        cleanup_distributed()


def _bench(cfg: TrainConfig, device: torch.device, env, iters: int, warmup: int) -> BenchResult:
    use_compile, _ = choose_compile(device, cfg.compile)
    cfg.eval_only = False
    trainer = Trainer(cfg, device, env)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.nonfinite_steps = 0
    loss = torch.zeros(())
    for i in range(warmup + iters):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        trainer.fetch_first_batch()
        loss = trainer.train_step(lr_at(i, cfg))
    final_loss = loss.item()  # also waits for the device to finish
    seconds = time.perf_counter() - start
    per_rank = [trainer.tokens_per_iter / env.world_size * iters / seconds]
    if env.is_distributed:
        import torch.distributed as dist

        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, per_rank[0])
        per_rank = gathered
    tokens_per_s = sum(per_rank)
    return BenchResult(
        device=str(device), dtype=trainer.dtype, compile=use_compile, iters=iters,
        ms_per_iter=1000 * seconds / iters, tokens_per_second=tokens_per_s,
        mfu=trainer.raw_model.estimate_mfu(tokens_per_s / env.world_size, trainer.peak), peak_flops=trainer.peak,
        peak_memory_mb=peak_memory_mb(device), params_millions=trainer.raw_model.get_num_params() / 1e6,
        final_loss=final_loss, world_size=env.world_size,
        per_rank_tokens_per_second=per_rank if env.is_distributed else None,
    )
