"""Timing of decoding (`ngpt bench --generate`): start-up, prefill, time to first token, decode tokens/s, and how
close decoding comes to the memory-bandwidth bound.

    ngpt bench --generate --out-dir out/gpt2-124m --max_new_tokens=256
    ngpt bench --generate --out-dir out/gpt2-124m --quantize=int8 --json

The model is loaded as `ngpt sample` loads it (`load_for_sampling`: same device, dtype, quantization) and
decodes a random prompt of prompt_tokens tokens for max_new_tokens steps with the sample command's sampling
keys, without stopping at <|endoftext|>. At batch 1 every decoding step reads all of the weights once, so
weight bytes per token times tokens/s is a read rate, compared here with a large memory copy's, measured once.
The step is also compared with its matrix products alone: the model's own Linear modules (same weights, precision,
layout and kernels) called one after another on inputs of num_samples rows, as a decoding step calls them. One such
pass runs right after each decoding step (after every k-th when more than 256 are decoded), in the same precision
context, so that both figures, means, see the machine in the same moment: on a shared machine whose memory
bandwidth drifts by 2x within minutes, a pass timed after the whole decode measured 0.99-1.45x the same step where
the interleaved passes measured 1.23-1.29x (a 2-core EPYC, GPT-2 124M, fp32). What a step takes on top of its
products is the rest of the model (norms, attention, the KV cache), sampling and Python.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nanogpt_cli.bench import MemoryWatch
from nanogpt_cli.config import SampleConfig
from nanogpt_cli.generate import Generation
from nanogpt_cli.precision import Int8Linear, weight_bytes_per_token
from nanogpt_cli.runtime import autocast, synchronize
from nanogpt_cli.sample import load_for_sampling

COPY_BYTES = 512 * 2**20  # far past any last-level cache


@dataclass
class GenerateBenchResult:
    device: str
    dtype: str
    quantize: str
    params_millions: float
    prompt_tokens: int
    new_tokens: int  # per sample
    num_samples: int
    threads: int
    load_seconds: float  # the model and tokenizer loaded, on the device
    time_to_first_token: float  # the prompt's prefill and the first sampled token, after loading
    prefill_tokens_per_second: float
    decode_tokens_per_second: float  # the tokens after the first, all samples together
    ms_per_token: float  # one decoding step
    matmul_ms_per_token: float  # the step's matrix products alone (see the module's docstring)
    step_over_matmuls: float  # ms_per_token / matmul_ms_per_token: 1.0 would be nothing but the products
    weight_bytes_per_token: int  # what one step at batch 1 reads (embedding tables: one row)
    weight_read_gb_per_s: float  # weight_bytes_per_token x decoding steps per second
    copy_gb_per_s: float  # a large memory copy, bytes read and written per second
    bandwidth_fraction: float  # weight_read_gb_per_s / copy_gb_per_s
    peak_memory_mb: float
    memory_kind: str

    def as_dict(self) -> dict:
        return asdict(self)


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = 3) -> float:
    """Bytes per second (read + written) of the best of `repeats` copies of an nbytes buffer on device."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # the pages of both exist before the timing
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


class MatmulPass:
    """The model's matrix products alone: calling it runs every Linear (and Int8Linear) of the model once, in the
    model's order, on an input of `rows` rows (a step's samples) in the model's activation dtype, and returns the
    seconds it took. The kernels are chosen and the pages touched when it is made."""

    def __init__(self, model: nn.Module, device: torch.device, rows: int = 1):
        self.device = device
        self.linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
        dtype = model.transformer.wte.weight.dtype  # the activations' (embeddings are never quantized)
        self.inputs = [torch.randn(rows, 1, m.in_features, device=device, dtype=dtype) for m in self.linears]
        self()

    @torch.inference_mode()
    def __call__(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for linear, x in zip(self.linears, self.inputs, strict=True):
            linear(x)
        synchronize(self.device)
        return time.perf_counter() - start


MAX_MATMUL_PASSES = 256  # a longer decode times the products after every k-th step


def bench_generate(cfg: SampleConfig, prompt_tokens: int = 16) -> GenerateBenchResult:
    """Load cfg's model as `ngpt sample` does and time its decoding (see the module's docstring)."""
    start = time.perf_counter()
    with MemoryWatch(torch.device("cpu")) as memory:
        model, tokenizer, device, dtype = load_for_sampling(cfg)
        load_seconds = time.perf_counter() - start
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        vocab = getattr(tokenizer, "vocab_size", None) or model.config.vocab_size
        prompt_tokens = min(prompt_tokens, model.config.block_size - 1)
        idx = torch.randint(vocab, (1, prompt_tokens), generator=generator, device=device).repeat(cfg.num_samples, 1)
        generation = Generation(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                                generator, cfg.use_cache, vocab_size=vocab)
        every = -(-max(1, cfg.max_new_tokens - 1) // MAX_MATMUL_PASSES)
        with torch.inference_mode(), autocast(device, dtype):
            steps = iter(generation)
            begin = time.perf_counter()
            next(steps)
            synchronize(device)
            first = time.perf_counter()
            matmul_pass = MatmulPass(model, device, rows=cfg.num_samples)  # after the first token: it is not warmed
            decoding, passes = 0.0, []
            for step in itertools.count():  # each decoding step, and after it (every k-th) the products alone
                start = time.perf_counter()
                if next(steps, None) is None:
                    break
                synchronize(device)
                decoding += time.perf_counter() - start
                if step % every == 0:
                    passes.append(matmul_pass())
    if device.type == "cuda":
        memory.peak = torch.cuda.max_memory_allocated(device)
    decode_steps = max(1, generation.steps - 1)
    step_seconds = decoding / decode_steps
    weight_bytes = weight_bytes_per_token(model)
    params = model.get_num_params()
    if model.lm_head.weight is not model.transformer.wte.weight:  # an int8 head, quantized from the tied table
        params -= model.lm_head.weight.numel()
    read_rate = weight_bytes / step_seconds
    copy_rate = copy_bandwidth(device)
    matmuls = sum(passes) / len(passes)  # a mean, as the step's is
    return GenerateBenchResult(
        device=str(device), dtype=dtype, quantize=cfg.quantize, params_millions=params / 1e6,
        prompt_tokens=prompt_tokens, new_tokens=generation.steps, num_samples=cfg.num_samples,
        threads=torch.get_num_threads(), load_seconds=load_seconds, time_to_first_token=first - begin,
        prefill_tokens_per_second=prompt_tokens * cfg.num_samples / (first - begin),
        decode_tokens_per_second=cfg.num_samples / step_seconds, ms_per_token=1000 * step_seconds,
        matmul_ms_per_token=1000 * matmuls, step_over_matmuls=step_seconds / matmuls,
        weight_bytes_per_token=weight_bytes, weight_read_gb_per_s=read_rate / 1e9, copy_gb_per_s=copy_rate / 1e9,
        bandwidth_fraction=read_rate / copy_rate, peak_memory_mb=memory.megabytes,
        memory_kind="CUDA allocator peak" if device.type == "cuda" else memory.kind)
