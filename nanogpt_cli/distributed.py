"""How a built model is parallelised across processes: DDP (replicated) or FSDP (sharded)."""

from __future__ import annotations

import torch

from nanogpt_cli.config import TrainConfig
from nanogpt_cli.device import DistEnv


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, env: DistEnv) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)
