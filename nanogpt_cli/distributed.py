"""How a built model is parallelised across processes: DDP (replicated) or FSDP (sharded).

    torchrun --standalone --nproc_per_node=8 -m nanogpt_cli train --preset gpt2-124m
    ngpt train --nproc-per-node 8 --preset gpt2-124m --strategy=fsdp

DDP keeps a whole model per rank and all-reduces gradients. FSDP (FSDP2's `fully_shard`, per
transformer Block and then the root) shards parameters, gradients and optimizer state across
the ranks. Checkpoints are the same file either way: full, unsharded state dicts gathered to
rank 0, with the optimizer state in torch's usual index-keyed form. So a checkpoint written by
one process, by DDP or by FSDP resumes under any of the three.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from nanogpt_cli.errors import NgptError

# ---------------------------------------------------------------- process group

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
        # Imported after the group exists (DDP and FSDP import it through torch._dynamo), this module's functions
        # would bind the group as their `group=group.WORLD` default: destroy_process_group could not free it, and
        # gloo's threads would live on into interpreter shutdown, whose teardown they race: now and then, on a busy
        # machine, a rank aborted there ("terminate called without an active exception").
        from torch.distributed.nn import functional  # noqa: F401

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


def same_on_all_ranks(value, env: DistEnv):
    """Rank 0's value on every rank (a collective): choices measured on each rank must agree."""
    if not env.is_distributed:
        return value
    import torch.distributed as dist

    rank0_value = [value]
    dist.broadcast_object_list(rank0_value, src=0)
    return rank0_value[0]


# ---------------------------------------------------------------- wrapping

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile's and DDP's wrappers (FSDP2 wraps in place: nothing to strip)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(unwrap(model), FSDPModule)


def wrap_model(model: torch.nn.Module, strategy: str, device: torch.device, env: DistEnv) -> torch.nn.Module:
    """DDP around the (possibly compiled) model, or FSDP2 sharding of the model itself (in place)."""
    if strategy == "fsdp":
        return shard_model(model, device, env)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Make every rank's copy equal to rank 0's (DDP does this itself; FSDP shards what each rank has)."""
    import torch.distributed as dist

    seen = set()
    for tensor in model.state_dict().values():
        if id(tensor) not in seen:  # tied weights appear twice
            seen.add(id(tensor))
            dist.broadcast(tensor, src=0)


def shard_model(model: torch.nn.Module, device: torch.device, env: DistEnv) -> torch.nn.Module:
    """FSDP2: shard each transformer Block, then the root (embeddings, tied lm_head, final norm).

    The tied wte/lm_head weight belongs to the root's group only, so it stays one parameter.
    Call before torch.compile and before building the optimizer (its parameters become DTensors).
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        from nanogpt_cli.errors import UsageError

        raise UsageError(f"--strategy=fsdp needs torch >= 2.6 (FSDP2); this is {torch.__version__}") from None
    broadcast_from_rank0(model)
    mesh = init_device_mesh(device.type, (env.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Backward passes inside reduce gradients across ranks only when `enabled` (the last micro-step):
    DDP's no_sync(), FSDP2's set_requires_gradient_sync()."""
    inner = unwrap(model)
    if is_fsdp(inner):
        inner.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    elif not enabled and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def local_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients as plain tensors: under FSDP this rank's shards (DTensor.to_local())."""
    return [g.to_local() if hasattr(g, "to_local") else g
            for g in (p.grad for p in model.parameters()) if g is not None]


def mean_across_ranks(value: torch.Tensor, env: DistEnv) -> float:
    """The mean of a scalar over all ranks (a collective: every rank must call it); the value itself alone."""
    if not env.is_distributed:
        return value.item()
    import torch.distributed as dist

    t = value.detach().reshape(1).float().clone()
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t.item() / env.world_size


def max_across_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The largest of a tensor's values across ranks, in place (a collective); the tensor itself alone."""
    if env.is_distributed:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (a collective: every rank must ask)."""
    if not env.is_distributed:
        return flag
    return bool(max_across_ranks(torch.tensor([float(flag)], device=device), env).item())


# ---------------------------------------------------------------- checkpoints

def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _param_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> all its names (a tied parameter has several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def full_model_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict. Under FSDP it is gathered to rank 0 on the CPU ({} on the other
    ranks) and this is a collective: call it on every rank."""
    model = unwrap(model)
    if not is_fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    for names in _param_names(model).values():  # tied weights: one tensor under both names, as state_dict() has
        if len(names) > 1 and all(n in state for n in names):
            for name in names[1:]:
                state[name] = state[names[0]]
    return state


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict in torch's usual form (parameters numbered in param_groups order).
    Under FSDP the shards are gathered to rank 0 ({} elsewhere); a collective: call it on every rank."""
    model = unwrap(model)
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not osd:
        return {}
    names = _param_names(model)
    state, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, osd["param_groups"], strict=True):
        ids = []
        for p in group["params"]:
            fqn = next((n for n in names[id(p)] if n in osd["state"]), None)
            if fqn is not None:
                state[index] = osd["state"][fqn]
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (from a single-process, DDP or FSDP checkpoint); under FSDP
    each rank keeps its shard of it."""
    model = unwrap(model)
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from nanogpt_cli.errors import NgptError

    names = _param_names(model)
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups) or [len(g["params"]) for g in saved_groups] != [
            len(g["params"]) for g in optimizer.param_groups]:
        raise NgptError("the checkpoint's optimizer state does not fit this model's parameter groups")
    fqn_of = {}
    for saved, group in zip(saved_groups, optimizer.param_groups, strict=True):
        for i, p in zip(saved["params"], group["params"], strict=True):
            fqn_of[i] = names[id(p)][0]
    osd = {
        "state": {fqn_of[i]: s for i, s in state["state"].items()},
        "param_groups": [{**{k: v for k, v in saved.items() if k != "params"},
                          "params": [fqn_of[i] for i in saved["params"]]} for saved in saved_groups],
    }
    set_optimizer_state_dict(model, optimizer, osd, options=_full_options())


# ---------------------------------------------------------------- the launcher

def launcher_args(nproc_per_node: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
                  master_port: int | None = None) -> list[str]:
    """torchrun's options for `ngpt train --nproc-per-node N [--nnodes ...]`."""
    from nanogpt_cli.errors import UsageError

    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UsageError(f"--nproc-per-node ({nproc_per_node}) and --nnodes ({nnodes}) must be >= 1, and "
                         f"--node-rank ({node_rank}) in 0..nnodes-1")
    args = [f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1 and master_addr is None and master_port is None:
        return [*args, "--standalone"]  # a free port on localhost, chosen by torchrun
    if nnodes > 1 and master_addr is None:
        raise UsageError("--nnodes > 1 needs --master-addr (the address of node 0, reachable from every node)")
    return [*args, f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--master-addr={master_addr or '127.0.0.1'}", f"--master-port={master_port or 29500}"]


def threads_per_process(nproc_per_node: int) -> int:
    """The CPU cores this process may use, split between the node's processes (at least 1 each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(1, cores // nproc_per_node)


def launch(torchrun_args: list[str], command: list[str], nproc_per_node: int) -> int:
    """Run `torchrun <torchrun_args> -m nanogpt_cli <command>` through PyTorch's own launcher, in this
    process (torch.distributed.run), and return the job's exit code: 0, or the first failed
    worker's (128 + N for a worker killed by signal N). The workers leave their error lines to this
    process, which prints each different one once (see errors.emit_error) instead of torchrun's report."""
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from nanogpt_cli.errors import LAUNCHED
    from nanogpt_cli.progress import is_verbose

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc_per_node)))
    os.environ[LAUNCHED] = "1"
    quieted = {}
    if not is_verbose():  # torchrun logs each failed worker at ERROR level; the error lines below say it
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
                quieted[logger] = logger.level
                logger.setLevel(logging.CRITICAL)
    try:
        torchrun_main([*torchrun_args, "-m", "nanogpt_cli", *command])
    except ChildFailedError as e:
        os.environ.pop(LAUNCHED, None)  # this process prints its lines itself
        report_failures(e.failures)
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else (code or 1)
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        os.environ.pop(LAUNCHED, None)
        for logger, level in quieted.items():
            logger.setLevel(level)
    return 0


def report_failures(failures: dict) -> None:
    """The failed workers' error lines, each different line once (with its ranks when they differ). Workers ended
    by SIGTERM while another failed of its own are left out: torchrun stops the others so once one has failed,
    and a worker only a moment slower to reach the same error would otherwise add a line of its own."""
    import signal

    from nanogpt_cli.errors import emit_error

    def stopped(failure) -> bool:
        """Ended by a SIGTERM: killed by it (-15), or caught it and exited 143 (start-up holds the signal until
        the imports are done; a write in flight is cleaned up; a training run saves first)."""
        return failure.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM)

    if not all(stopped(failure) for failure in failures.values()):
        failures = {rank: failure for rank, failure in failures.items() if not stopped(failure)}
    lines: dict[str, list[int]] = {}
    for rank, failure in sorted(failures.items()):
        message = failure.message if isinstance(failure.message, str) else ""
        if not message.startswith("error: "):  # no line of ours: a signal, or a crash before ngpt started
            cause = message if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            message = f"error: process {rank} failed ({cause}); rerun with --verbose for torchrun's report"
        lines.setdefault(message, []).append(rank)
    for line, ranks in lines.items():
        where = "" if len(lines) == 1 else f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
        emit_error(line + where)
