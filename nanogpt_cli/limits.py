"""Sizes checked before memory is spent: a model, a training step or a batch of samples that cannot fit is a
usage error with the estimate in its message, instead of minutes of allocation and an out-of-memory kill.

The estimates are deliberately simple (parameters, optimizer state, activations without recomputation, the
KV cache) and err high only by small factors; they refuse what is out of reach by orders of magnitude, and
let through what might fit.
"""

from __future__ import annotations

import os

from nanogpt_cli.errors import UsageError


def size_text(n_bytes: float) -> str:
    """A size in decimal units: 512 B, 1.5 KB, 3.2 GB (and GB above that: 2000.0 GB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1000
    return str(n_bytes)


def host_memory_bytes() -> int:
    """The machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a large machine rather than refuse
        return 2**50


def _read_number(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read(64).split()[0])
    except (OSError, ValueError, IndexError):  # absent, or "max" (no limit)
        return None


def available_memory_bytes() -> int:
    """The memory this process can get now without swapping or its container's out-of-memory killer: Linux's
    MemAvailable, at most what the cgroup's limit leaves (v2 memory.max - memory.current, or v1's files); the
    physical memory where neither can be read."""
    available = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    available = host_memory_bytes() if available is None else available
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_number(limit_file), _read_number(usage_file)
        if limit is not None and usage is not None:  # v1's "no limit" is a huge number: min() leaves it out
            available = min(available, max(0, limit - usage))
    return available


def device_memory_bytes(device) -> int:
    """What a device can hold: a GPU's own memory; the machine's memory for cpu and mps (unified)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    return host_memory_bytes()


def parameter_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> int:
    """A GPT's parameters: per block 12 d^2 (attention 4 d^2, MLP 8 d^2) plus biases and norms, the token and
    position tables (the head is tied to the token table)."""
    return n_layer * (12 * n_embd * n_embd + 13 * n_embd) + (vocab_size + block_size) * n_embd + 2 * n_embd


def check_model_fits(n_layer: int, n_embd: int, vocab_size: int, block_size: int, source: str) -> None:
    """Refuse a model whose float32 weights alone exceed this machine's memory (models are built on the host)."""
    weights = 4 * parameter_count(n_layer, n_embd, vocab_size, block_size)
    memory = host_memory_bytes()
    if weights > memory:
        raise UsageError(f"{source}: a model of n_layer={n_layer}, n_embd={n_embd}, vocab_size={vocab_size}, "
                         f"block_size={block_size} needs about {size_text(weights)} for its weights alone, more than "
                         f"this machine's {size_text(memory)}")


def training_bytes(n_layer: int, n_embd: int, vocab_size: int, block_size: int, batch_size: int) -> int:
    """Memory of a training step in float32: weights, gradients and AdamW's two moments (16 bytes a parameter),
    the activations autograd keeps (34 d bytes a token and layer in 16-bit, Korthikanti et al. 2022, so 68 d in
    float32; SDPA keeps no attention scores) and the logits with their gradient."""
    params = parameter_count(n_layer, n_embd, vocab_size, block_size)
    tokens = batch_size * block_size
    activations = tokens * n_layer * 68 * n_embd
    logits = tokens * vocab_size * 4 * 2
    return 16 * params + activations + logits


def check_training_fits(cfg, vocab_size: int, device) -> None:
    """Refuse a model and micro-batch whose training step exceeds the device's memory by its estimate."""
    need = training_bytes(cfg.n_layer, cfg.n_embd, vocab_size, cfg.block_size, cfg.batch_size)
    memory = device_memory_bytes(device)
    if need > memory:
        raise UsageError(f"a training step of this model with --batch_size={cfg.batch_size} and "
                         f"--block_size={cfg.block_size} needs about {size_text(need)}, more than the "
                         f"{size_text(memory)} of {device}; lower --batch_size (raise --gradient_accumulation_steps "
                         "to keep the batch), --block_size or the model's size")


def check_sampling_fits(model_config, num_samples: int, tokens: int, device) -> None:
    """Refuse a batch of samples whose KV cache, logits and token buffers exceed the device's memory."""
    cache = 2 * model_config.n_layer * num_samples * model_config.block_size * model_config.n_embd * 4
    logits = num_samples * model_config.vocab_size * 4 * 3  # logits, probabilities, the filters' copies
    buffers = num_samples * tokens * 8 * 3  # the ids on the device and the host, and their text
    need = cache + logits + buffers
    memory = device_memory_bytes(device)
    if need > memory:
        raise UsageError(f"--num_samples={num_samples} of {tokens} tokens each need about {size_text(need)}, more "
                         f"than the {size_text(memory)} of {device}; ask for fewer samples or tokens")
