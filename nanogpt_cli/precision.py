"""Weight precision for inference: the model cast to bfloat16/float16, or its matrices as weight-only int8.

    ngpt sample --out-dir RUN --dtype bfloat16        # weights stored in bf16: half the bytes read per token
    ngpt sample --out-dir RUN --quantize int8         # cpu: a quarter of the bytes, per-output-channel scales

At batch 1 a decoding step reads every weight once, so its time follows the bytes of the weights. bf16 weights
halve them; int8 weights quarter the matrices' (the embedding tables stay as they are: a token reads one row).
The int8 matmul is torch's `_weight_int8pack_mm` (int8 weights, bf16 activations, a bf16 scale per output
channel), a CPU kernel; elsewhere `--quantize int8` is refused. On a CPU, a bf16 Linear's product of a single row
(batch-1 decoding) runs as torch's matrix-vector product, which streams bf16 weights 1.45x faster than its
one-row matrix product (`VectorLinear`), and float32 weights that decode 4 rows or more at once are stored
transposed, which MKL's GEMM of a few rows streams 1.2-1.8x faster (`transposed_storage`; docs/performance.md
has the measurements).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from nanogpt_cli.cpu_tuning import DTYPES, cpu_has_fast_bf16
from nanogpt_cli.errors import UsageError

QUANTIZE = ("none", "int8")


class Int8Linear(nn.Module):
    """A Linear whose weight (out, in) is int8 with one scale per output channel: w ~ weight * scales[:, None].
    The product runs in bfloat16 (what the int8 kernel takes), its result is cast back to the input's dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        # parameters that do not train: counted by get_num_params, moved and cast like the rest of the model
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in) int8
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scales", scales)  # (out,) bfloat16

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        # symmetric, per output channel: the largest |w| of a row maps to 127 (an all-zero row keeps scale 1)
        scales = weight.abs().amax(dim=1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(quantized.contiguous(), scales.to(torch.bfloat16), bias)

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight,
                                               self.scales)  # (rows, out)
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class VectorLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose product of one row is `addmv`: on a CPU torch's bf16
    GEMV is 1.45x faster than its GEMM at one row (GPT-2 124M's matrices, 2 threads: 12.8 ms against 18.5 ms per
    decoding step, on a Xeon with AMX); in float32 both stream at the same rate, so only bf16 weights take it, on
    CPUs with AMX or AVX512-BF16 (`for_inference`; elsewhere unmeasured, so F.linear stays)."""

    def forward(self, x):
        if x.numel() != self.in_features or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        row = x.reshape(-1)
        y = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
        return y.view(*x.shape[:-1], self.out_features)


def vector_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of the model (in place) a VectorLinear: the same module, its one-row products
    through addmv."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = VectorLinear
    return model


# From this many rows a step, MKL's float32 GEMM streams an (in, out) matrix faster than torch's (out, in) Linear
# weight (GPT-2 124M's matrices, 2 threads: 4 rows 1.19x, 8 rows 1.52x, 12 rows 1.82x, 16 rows 1.23x); at 2-3
# rows 0.75x, at one row the same, so those keep the layout they were loaded in (no copy at start-up).
TRANSPOSED_FROM_ROWS = 4


def transposed_storage(model: nn.Module) -> nn.Module:
    """Lay out every plain Linear weight of the model (in place) as the contiguous copy of its transpose: the same
    (out, in) values in the same Parameter (tied weights stay tied), so F.linear hands MKL an (in, out) matrix. A
    tied embedding table then reads its rows strided (70 us for 8 tokens at GPT-2's size, against a 40 ms step).
    The copies are made only while they take less than half the memory available: a model too large for that
    keeps its layout (slower batches, never an out-of-memory kill). Such weights are for inference only:
    safetensors refuses to save non-contiguous tensors (nothing saves a model loaded for inference)."""
    from nanogpt_cli.limits import available_memory_bytes

    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.is_contiguous()]
    weights = {id(m.weight): m.weight for m in linears}.values()  # a tied weight once
    if 2 * sum(w.numel() * w.element_size() for w in weights) >= available_memory_bytes():
        return model
    for module in linears:
        if module.weight.is_contiguous():  # a tied weight met a second time is transposed already
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of the model (in place) by an Int8Linear; embeddings and norms stay."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_linear(child))
    return model


def check_precision(device: torch.device, dtype: str, quantize: str) -> None:
    """Refuse, in one line, the combinations that cannot run: int8 off the CPU, int8 with float16."""
    if quantize == "int8" and device.type != "cpu":
        raise UsageError(f"--quantize int8 runs on cpu only (torch's int8 weight-only matmul is a CPU kernel); "
                         f"use --device=cpu, or --dtype=bfloat16 on {device.type}")
    if quantize == "int8" and dtype == "float16":
        raise UsageError("--quantize int8 computes in bfloat16; use --dtype=bfloat16 or float32 with it")


def for_inference(model: nn.Module, device: torch.device, dtype: str, quantize: str = "none",
                  rows: int = 1) -> nn.Module:
    """The model (eval mode, on device) with its weights in the precision asked for: cast to dtype unless it is
    float32, then its matrices quantized to int8 if quantize is "int8"; on a CPU, laid out for the kernels that
    stream them fastest for `rows` rows a decoding step (bf16: `VectorLinear`; float32: `transposed_storage`)."""
    check_precision(device, dtype, quantize)
    model = model.eval().to(device)
    if dtype != "float32":
        model = model.to(DTYPES[dtype])
    if quantize == "int8":
        model = quantize_int8(model)
    if device.type == "cpu" and dtype == "bfloat16" and cpu_has_fast_bf16():  # measured with AMX (see above)
        model = vector_linears(model)
    if device.type == "cpu" and dtype == "float32" and quantize == "none" and rows >= TRANSPOSED_FROM_ROWS:
        model = transposed_storage(model)
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """The bytes of the weights one decoding step at batch 1 reads: every tensor of the model once, but for the
    embedding tables, of which a token reads one row (a table tied to a Linear, GPT-2's lm_head, is read whole)."""
    looked_up = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    read_whole = {id(t) for m in model.modules() if not isinstance(m, nn.Embedding)
                  for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in looked_up and id(tensor) not in read_whole:
            total += tensor[0].numel() * tensor.element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total
