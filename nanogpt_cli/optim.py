"""The optimizers of a training run: GPT-2's AdamW, or Muon for the hidden matrices with AdamW for the rest.

    optimizer = build_optimizer(model, cfg, runtime.device.type)

AdamW (`--optimizer=adamw`, the default) is nanoGPT's: two groups, weight decay on matrices only.
Muon (`--optimizer=muon`; Keller Jordan 2024, the optimizer of modded-nanogpt's and nanochat's speedruns)
takes the momentum of each 2-D matrix in the transformer blocks, orthogonalises it with a few Newton-Schulz
iterations (its singular values pushed to about 1) and steps along that: torch.optim.Muon, Nesterov momentum
by default. Embeddings, the output head and the vectors (norm gains, biases) are no hidden matrices: AdamW
updates them, each group at its own learning rate. Every group follows the run's schedule (`lr_at`), scaled
by its `lr_scale`, its peak rate over --learning_rate.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanogpt_cli.config import TrainConfig


def adamw_kernel(device_type: str) -> dict:
    """The fused kernel is one launch per step instead of one per tensor: on cuda and cpu."""
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
    return {"fused": True} if fused else {"foreach": True}


def adamw(model: torch.nn.Module, weight_decay: float, learning_rate: float, betas: tuple[float, float],
          device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms or position vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **adamw_kernel(device_type))


def muon_roles(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters by role: "muon" (the blocks' 2-D matrices), "embedding" (token and position
    tables), "head" (the output layer; the token table too when tied: its gradient is mostly the head's) and
    "scalar" (every vector: norm gains, biases)."""
    head = model.lm_head.weight
    roles: dict[str, list[torch.nn.Parameter]] = {"muon": [], "embedding": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():  # a tied parameter comes once
        if not p.requires_grad:
            continue
        if p is head:
            roles["head"].append(p)
        elif p.dim() < 2:
            roles["scalar"].append(p)
        elif name.startswith("transformer.h."):
            roles["muon"].append(p)
        else:
            roles["embedding"].append(p)
    return roles


class MuonWithAdamW:
    """torch.optim.Muon for the hidden matrices and torch.optim.AdamW for the other parameters, stepped as one
    optimizer: what the trainer, the GradScaler and checkpoints see (param_groups of both; one state dict)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def muon_with_adamw(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> MuonWithAdamW:
    """Muon at --muon_lr for the blocks' matrices; AdamW at --embedding_lr, --head_lr and --scalar_lr (each
    --learning_rate when auto) for the rest. Decoupled weight decay on matrices only, as with AdamW alone."""
    roles = muon_roles(model)
    muon = torch.optim.Muon([{"params": roles["muon"], "lr_scale": cfg.muon_lr / cfg.learning_rate}],
                            lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                            nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps)
    rates = {"embedding": cfg.embedding_lr, "head": cfg.head_lr, "scalar": cfg.scalar_lr}
    groups = []
    for role, rate in rates.items():
        if not roles[role]:  # no embedding table of its own: rotary positions and a tied token table
            continue
        rate = cfg.learning_rate if rate is None else rate
        groups.append({"params": roles[role], "lr": rate, "lr_scale": rate / cfg.learning_rate,
                       "weight_decay": 0.0 if role == "scalar" else cfg.weight_decay})
    adamw_part = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                   **adamw_kernel(device_type))
    return MuonWithAdamW(muon, adamw_part)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str):
    """The optimizer cfg.optimizer names, over the (unwrapped) model's parameters."""
    if cfg.optimizer == "muon":
        return muon_with_adamw(model, cfg, device_type)
    return adamw(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
