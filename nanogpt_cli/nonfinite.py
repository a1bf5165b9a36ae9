"""The NaN/inf guard of a training run: detect a non-finite loss or gradient, then stop or skip the step.

A finite loss with an inf gradient would turn the weights into NaNs at the optimizer step, so the
guard owns that step. On cuda (fused AdamW, no GradScaler, no FSDP) it never waits for the GPU: the
fused kernel itself skips the update when told the step is bad (its `found_inf`, as under a
GradScaler), and the guard reads its count at the next log interval, evaluation or save (`check`).
Elsewhere a host sync costs nothing, so every step is checked at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanogpt_cli.distributed import DistEnv, local_grads, max_across_ranks
from nanogpt_cli.errors import NgptError
from nanogpt_cli.progress import console


def checks_on_device(device: torch.device, optimizer, scaler_enabled: bool, fsdp: bool) -> bool:
    """Whether bad steps are skipped on the device and reported later (cuda with fused AdamW, no GradScaler,
    no FSDP's sharded gradients) instead of checked at every step with a host sync. Muon has no found_inf to
    skip a step with: its runs (whose AdamW part may be fused) are checked at every step."""
    fused = isinstance(optimizer, torch.optim.AdamW) and all(group.get("fused") for group in optimizer.param_groups)
    return device.type == "cuda" and fused and not scaler_enabled and not fsdp


class NonfiniteGuard:
    """Takes the optimizer step unless the loss or a gradient is NaN/inf on any rank; then, by `policy`,
    stops the run (an NgptError saying the last checkpoint is intact) or skips the step with a warning."""

    def __init__(self, policy: str, model: torch.nn.Module, optimizer, scaler, device: torch.device, env: DistEnv,
                 fsdp: bool, checkpoint_path: Path):
        self.policy, self.model, self.optimizer, self.scaler = policy, model, optimizer, scaler
        self.env, self.fsdp, self.checkpoint_path = env, fsdp, checkpoint_path
        self.on_device = checks_on_device(device, optimizer, scaler.is_enabled(), fsdp)
        self.bad_steps = 0  # non-finite steps seen so far (reported)
        self.pending = torch.zeros((), device=device)  # on_device: bad steps not yet reported
        self.first_pending = torch.full((), -1.0, device=device)  # the iteration of the first of them

    def step(self, total: torch.Tensor, norm: torch.Tensor | None, iter_num: int) -> None:
        """The optimizer step for iteration `iter_num`, whose summed loss is `total` and clipped gradient norm
        `norm` (None without clipping); the gradients are cleared either way."""
        if self.on_device:
            self.step_on_device(total, norm, iter_num)
        elif self.is_bad(total, norm).item() == 0.0:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.bad_steps += 1
            what = f"the loss became {total.item()}" if not torch.isfinite(total) else "the gradients became non-finite"
            self.report(f"{what} at iteration {iter_num}; stopped before updating the weights",
                        f"{what} at iteration {iter_num}: step skipped")
            if self.scaler.is_enabled() and norm is None:
                self.scaler.unscale_(self.optimizer)  # update() needs the inf check that unscale_ records
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def is_bad(self, total: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """A 0-dim float32 tensor on the device (the shape fused AdamW's found_inf takes), 1.0 when the loss
        or a gradient is NaN/inf on any rank; no host sync. The clipping norm, when there is one, already
        covers every gradient (all of them, after DDP's all-reduce). Under a GradScaler (float16) overflowing
        gradients are the scaler's business (it skips the step and lowers the scale); a NaN loss is not."""
        bad = ~torch.isfinite(total.float()).reshape(())
        if self.scaler.is_enabled():
            pass
        elif norm is not None and not self.fsdp:
            bad |= ~torch.isfinite(norm.float()).reshape(())
        else:
            grads = local_grads(self.model)  # FSDP: this rank's shards (the maximum below covers the rest)
            if grads:
                bad |= ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        return max_across_ranks(bad.float(), self.env)

    def step_on_device(self, total: torch.Tensor, norm: torch.Tensor | None, iter_num: int) -> None:
        bad = self.is_bad(total, norm)
        self.optimizer.found_inf = bad
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.pending += bad
        self.first_pending = torch.where((self.first_pending < 0) & (bad > 0), torch.full_like(bad, iter_num),
                                         self.first_pending)

    def check(self, iter_num: int) -> None:
        """Report the steps skipped on the device since the last check (a host sync): stop or warn."""
        if not self.on_device:
            return
        count = int(self.pending.item())
        if not count:
            return
        first = int(self.first_pending.item())
        self.pending.zero_()
        self.first_pending.fill_(-1)
        self.bad_steps += count
        skipped = f"{count} step(s) skipped by iteration {iter_num}"
        self.report(f"the loss or gradients became non-finite at iteration {first} ({skipped}); stopped",
                    f"the loss or gradients became non-finite at iteration {first}: {skipped}")

    def report(self, stopped: str, skipped: str) -> None:
        if self.policy == "stop":
            kept = (f"the last checkpoint {self.checkpoint_path} is intact" if self.checkpoint_path.is_file()
                    else "no checkpoint had been saved yet")
            raise NgptError(f"{stopped} ({kept}). Lower --learning_rate, or use --on_nonfinite=skip to skip such steps")
        console.print(f"[yellow]{skipped}[/yellow]")
