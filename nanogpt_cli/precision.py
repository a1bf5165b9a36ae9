"""Weight precision for inference: the model cast to bfloat16/float16, or its matrices as weight-only int8.

    ngpt sample --out-dir RUN --dtype bfloat16        # weights stored in bf16: half the bytes read per token
    ngpt sample --out-dir RUN --quantize int8         # cpu: a quarter of the bytes, per-output-channel scales

At batch 1 a decoding step reads every weight once, so its time follows the bytes of the weights. bf16 weights
halve them; int8 weights quarter the matrices' (the embedding tables stay as they are: a token reads one row). The
int8 matmul is torch's `_weight_int8pack_mm` (int8 weights, bf16 activations, a bf16 scale per output channel), a
CPU kernel; elsewhere `--quantize int8` is refused. On a CPU, a bf16 Linear's product of a single row (batch-1
decoding) runs as torch's matrix-vector product, which streams bf16 weights 1.45x faster than its one-row matrix
product (`VectorLinear`), and float32 weights that decode 4 rows or more at once are stored transposed, which MKL's
GEMM of a few rows streams 1.2-1.8x faster (`transposed_storage`), where the native kernel below does not take
those rows. On x86 CPUs that are not Intel's, MKL (torch's BLAS, which runs every float32 Linear) is far from the
bandwidth, so there the products go through oneDNN (`OneDNNLinear`). A batched step's few float32 rows go through
ngpt's native kernel where it was measured faster than the route's own product (`float_rows_native`: oneDNN's on an
AVX2 EPYC, MKL's on an AVX512 Xeon without bf16 instructions, `RowsLinear`); elsewhere, or where it cannot be
built, weights decoding several rows at a time are stored transposed instead. docs/performance.md has the
measurements.
"""

from __future__ import annotations

import platform

import torch
from torch import nn
from torch.nn import functional as F

from nanogpt_cli import native, ops
from nanogpt_cli.cpu_tuning import DTYPES, cpu_has_fast_bf16, cpu_vendor
from nanogpt_cli.errors import UsageError

QUANTIZE = ("none", "int8")


class Int8Linear(nn.Module):
    """A Linear whose weight (out, in) is int8 with one scale per output channel: w ~ weight * scales[:, None].
    The product is `int8_linear`'s: ngpt's native kernel in float32 for a few float32 rows on a CPU, torch's
    kernel in bfloat16 otherwise, its result cast back to the input's dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        # parameters that do not train: counted by get_num_params, moved and cast like the rest of the model
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in) int8
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scales", scales)  # (out,) bfloat16
        self.float_scales = FloatScales()  # the same in float32, for the native kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        quantized, scales = quantize_rows(linear.weight.detach())
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(quantized, scales, bias)

    def forward(self, x):
        return int8_linear(x, self.weight, self.scales, self.bias, self.float_scales)

    def bound_forward(self, activation: str | None = None, norm: nn.Module | None = None):  # see model.bound
        """f(x, residual=None) = int8_linear(x, ..., residual) on this layer's tensors; with an activation (a name
        of `native.ACTIVATIONS`), f(x) = ops.activation(int8_linear(x, ...), activation); with a norm (a module of
        model.py's LayerNorm or RMSNorm: `kind`, `weight`, `bias`, `eps`), f(x) = the product of norm(x).

        Between two weight streams a decoding step's Python runs cold, and int8_linear's checks of every tensor
        cost more than the kernel's call. So where the native kernel takes the layer's tensors as they are now,
        they are checked here, once, and each call checks only its rows and that the tensors are still the ones
        checked: the same storage (held here, so that its address cannot become another tensor's) and the same
        scales (their version). The norm and the activation then run in the kernel's call, bit for bit ops.norm's
        and ops.activation's there (native for as few values as theirs are). Anything else, and any call with
        autograd on, goes through ops.norm, int8_linear and ops.activation."""
        weight, scales, bias, float_scales = self.weight, self.scales, self.bias, self.float_scales
        normalise = None if norm is None else model_norm(norm)

        def unbound(x, residual=None):
            if normalise is not None:
                x = normalise(x)
            y = int8_linear(x, weight, scales, bias, float_scales, residual)
            return y if activation is None else ops.activation(y, activation)

        kernel = native.int8_kernel()
        if (kernel is None or scales.is_inference() or not native_weights(weight, scales, bias)
                or not (bias is None or bias.is_contiguous())):
            return unbound
        in_features, out_features, version = self.in_features, self.out_features, scales._version
        gain = shift = None
        kind = 0
        if norm is not None and all(t is None or ops._native_parameter(t, in_features)
                                    for t in (norm.weight, norm.bias)):
            gain, shift, kind = norm.weight, norm.bias, native.NORMS[norm.kind]
        watched = [t for t in (weight, scales, bias, gain, shift) if t is not None]
        held = [t.detach() for t in watched]  # the storage checked, alive as long as this function is
        addresses = [t.data_ptr() for t in held]
        scales32 = float_scales(scales)
        pointers = (weight.data_ptr(), scales32.data_ptr(), None if bias is None else bias.data_ptr())
        norm_pointers = (None if gain is None else gain.data_ptr(), None if shift is None else shift.data_ptr())
        eps = norm.eps if norm is not None else 0.0
        fn, act = kernel._fn, native.ACTIVATIONS[activation] if activation is not None else 0

        def forward(x, residual=None, _held=(held, scales32)):
            rows = native_rows(x, in_features)
            if (rows and not torch.is_grad_enabled() and scales._version == version
                    and [t.data_ptr() for t in watched] == addresses
                    and (residual is None or (not act and native_residual(residual, x, out_features)))):
                normed = kind if x.is_contiguous() and rows * in_features <= ops.NATIVE_VALUES else 0  # as ops.norm
                if normalise is not None and not normed:
                    x = normalise(x)
                x = x if x.is_contiguous() else x.contiguous()
                out = x.new_empty(*x.shape[:-1], out_features)
                fused = act if rows * out_features <= ops.NATIVE_VALUES else 0  # else ops.activation's torch kernel
                native.check(fn(x.data_ptr(), *pointers, None if residual is None else residual.data_ptr(),
                                out.data_ptr(), rows, out_features, in_features, torch.get_num_threads(), fused,
                                *norm_pointers, normed, eps))
                return out if fused == act else ops.activation(out, activation)
            return unbound(x, residual)
        return forward

    def bound_activated_forward(self, activation: str | None = None, norm: nn.Module | None = None):
        """norm(x) (a norm module, or None), this layer's product and the activation (a name, or None) as one
        function, the norm and the activation in the kernel's call (`bound_forward`), or None where the kernel has
        no such activation (see model.bound_fused)."""
        if activation is not None and activation not in native.ACTIVATIONS:
            return None
        return self.bound_forward(activation, norm)

    bound_residual_forward = bound_forward  # see model.bound_residual: residual + self(x), the sum in the kernel

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


QUANTIZE_CHUNK = 1 << 19  # elements of float32 work per chunk of rows (2 MB): it stays in the cache


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bfloat16 scales) of a matrix (out, in), symmetric per output channel: the largest |w| of a
    row maps to 127 (an all-zero row keeps scale 1), w / scale rounded to the nearest integer. A contiguous
    float32 matrix on a CPU goes through the native kernel (`native.Int8Kernel.quantize`: one pass, the same
    bytes). Otherwise computed in float32 a few rows at a time, in place in one buffer, so that its work stays in
    the cache and nothing the size of the matrix is allocated: GPT-2 124M's 49 matrices in 0.20-0.30 s against
    0.8 s for the same ops on whole matrices, whose five float32 temporaries (up to 154 MB each) ran from memory
    (a 2-core EPYC, AVX2)."""
    out_features, in_features = weight.shape
    quantized = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    kernel = native.int8_kernel() if weight.device.type == "cpu" and weight.dtype == torch.float32 else None
    if kernel is not None and weight.is_contiguous():  # the same formula in one pass (kernels/int8_linear.c)
        kernel.quantize(weight, quantized, scales, torch.get_num_threads())
        return quantized, scales.to(torch.bfloat16)
    rows = max(1, QUANTIZE_CHUNK // in_features)
    work = torch.empty(min(rows, out_features), in_features, dtype=torch.float32, device=weight.device)
    for first in range(0, out_features, rows):
        chunk = weight[first:first + rows].float()  # a view when the weight is float32 already
        buffer, chunk_scales = work[:chunk.size(0)], scales[first:first + rows]
        torch.amax(torch.abs(chunk, out=buffer), dim=1, out=chunk_scales)
        chunk_scales.div_(127).masked_fill_(chunk_scales == 0, 1.0)
        torch.div(chunk, chunk_scales[:, None], out=buffer).round_().clamp_(-127, 127)
        quantized[first:first + rows].copy_(buffer)
    return quantized, scales.to(torch.bfloat16)


class FloatScales:
    """An Int8Linear's bf16 scales as float32 (the same values), made again whenever the scales change: another
    tensor, or the same one written in place (its version counter; an inference tensor has none, so for one
    they are made at every call)."""

    def __init__(self):
        self._key, self._value = None, None

    def __call__(self, scales: torch.Tensor) -> torch.Tensor:
        key = (scales.data_ptr(), scales.shape, None if scales.is_inference() else scales._version)
        if key != self._key or key[2] is None:
            self._key, self._value = key, scales.float().contiguous()
        return self._value


NATIVE_MAX_ROWS = 16  # more rows (a prefill) go to torch's kernel, which computes a large product faster


def native_weights(weight, scales, bias) -> bool:
    """Whether an int8 layer's tensors are ones the native kernel takes: a contiguous int8 weight (out, in), one
    scale per output channel and a float32 bias (or none), all on the CPU, none recording autograd."""
    out_features = weight.size(0)
    return (weight.dtype is torch.int8 and weight.is_cpu and weight.dim() == 2 and weight.is_contiguous()
            and scales.is_cpu and scales.dim() == 1 and scales.numel() == out_features
            and (bias is None or (bias.dtype is torch.float32 and bias.is_cpu and bias.dim() == 1
                                  and bias.numel() == out_features
                                  and not (torch.is_grad_enabled() and bias.requires_grad))))


def model_norm(norm: nn.Module):
    """norm's forward as a function of x (model.py's LayerNorm and RMSNorm: ops.bound_norm of its tensors)."""
    return ops.bound_norm(norm.kind, norm.weight, norm.bias, norm.eps)


def native_rows(x, in_features: int) -> int:
    """The rows of x the native kernel computes (float32 on the CPU, 1 to NATIVE_MAX_ROWS of in_features values,
    not recording autograd), else 0."""
    rows = x.numel() // in_features if in_features else 0
    if (0 < rows <= NATIVE_MAX_ROWS and x.shape[-1] == in_features and x.dtype is torch.float32 and x.is_cpu
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return rows
    return 0


def native_residual(residual, x, out_features: int) -> bool:
    """Whether the kernel adds a residual to the product of x's rows: contiguous float32 on the CPU, of the
    product's shape (x's but for out_features last), not recording autograd."""
    return (residual.dtype is torch.float32 and residual.is_cpu and residual.is_contiguous()
            and residual.dim() == x.dim() and residual.shape[-1] == out_features
            and residual.shape[:-1] == x.shape[:-1] and not (torch.is_grad_enabled() and residual.requires_grad))


def int8_linear(x, weight, scales, bias, float_scales: FloatScales | None = None, residual=None):
    """x @ (weight * scales[:, None]).T + bias, added to residual where given. Float32 rows on a CPU, up to
    NATIVE_MAX_ROWS of them, go through ngpt's native kernel in float32 (`native.int8_kernel`) where it could be
    built, with the residual's sum where it takes the residual (rounded as residual + the product would be); the
    rest, and anything the kernel does not take (another dtype or device, autograd recording, shapes that do not
    fit), through torch's `_weight_int8pack_mm`, the product in bfloat16, cast back to x's dtype (torch's checks
    and errors), and then the residual's add."""
    shape = x.shape
    out_features, in_features = weight.shape
    rows = native_rows(x, in_features)
    if rows and native_weights(weight, scales, bias) and (residual is None or native_residual(residual, x,
                                                                                              out_features)):
        kernel = native.int8_kernel()
        if kernel is not None:
            out = x.new_empty(*shape[:-1], out_features)
            kernel(x if x.is_contiguous() else x.contiguous(), weight, (float_scales or FloatScales())(scales),
                   None if bias is None else bias.contiguous(), out, rows, torch.get_num_threads(), residual)
            return out
    if residual is not None:
        return residual + int8_linear(x, weight, scales, bias, float_scales)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), weight, scales)  # (rows, out)
    y = y.view(*shape[:-1], weight.size(0)).to(x.dtype)
    return y if bias is None else y + bias


class VectorLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose product of one row is `addmv`: on a CPU torch's bf16
    GEMV is 1.45x faster than its GEMM at one row (GPT-2 124M's matrices, 2 threads: 12.8 ms against 18.5 ms per
    decoding step, on a Xeon with AMX); in float32 both stream at the same rate, so only bf16 weights take it, on
    CPUs with AMX or AVX512-BF16 (`for_inference`; elsewhere unmeasured, so F.linear stays)."""

    def forward(self, x):
        return vector_linear(x, self.weight, self.bias)

    def bound_forward(self):  # see model.bound
        weight, bias = self.weight, self.bias
        return lambda x: vector_linear(x, weight, bias)


def vector_linear(x, weight, bias):
    """F.linear(x, weight, bias), a single row of x through addmv."""
    if x.numel() != weight.size(1) or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    row = x.reshape(-1)
    y = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return y.view(*x.shape[:-1], weight.size(0))


class OneDNNLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose float32 and bfloat16 products at inference run in
    oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor's CPU code calls) instead of MKL. torch's
    float32 Linear is MKL's GEMM, which on an AMD EPYC (Zen 5, 2 threads) streams GPT-2 124M's 49 matrices at 13-16
    GB/s where a read runs at 43: oneDNN takes 15.4 ms a step against 30-38 (12.9 against 24 with the weights
    stored transposed), 26 against 66 ms for 2 rows, and 2.3x less for a prefill of 32-512 tokens. With autograd
    recording (training), under autocast, or in another dtype (bfloat16 too where oneDNN has no bf16 kernels:
    `ONEDNN_DTYPES`), it is a plain nn.Linear (oneDNN's op has no backward and autocast does not cast for it)."""

    def forward(self, x):
        return onednn_linear(x, self.weight, self.bias)

    def bound_forward(self):  # see model.bound
        weight, bias = self.weight, self.bias
        return lambda x: onednn_linear(x, weight, bias)


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's Linear runs on this CPU: bfloat16 only where oneDNN has bf16 kernels for it (AVX512 or
    newer; on an AVX2 EPYC it cannot create the primitive at all), float32 everywhere."""
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the op
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


ONEDNN_DTYPES = _onednn_dtypes()


def onednn_linear(x, weight, bias):
    """F.linear(x, weight, bias) through oneDNN where it can run (see `OneDNNLinear`), else F.linear; a float32
    product of 2 to NATIVE_MAX_ROWS rows (a batched decoding step) through ngpt's native kernel where
    `float_rows_native` and the weight is stored (out, in)."""
    if (x.dtype not in ONEDNN_DTYPES or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    out = (native_rows_linear(x, weight, bias) if x.numel() > weight.size(1) and float_rows_native("onednn")
           else None)  # rows > 1, on the CPUs where the kernel takes them
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "") if out is None else out


class RowsLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose float32 products of a batched decoding step's 2 to
    NATIVE_MAX_ROWS rows run in ngpt's native kernel (`native_rows_linear`) and everything else in torch's F.linear
    (MKL): the Linears of a float32 model decoding several rows a step on the CPUs of MKL's route where
    `float_rows_native("mkl")`. On a 2-core Ice Lake Xeon (AVX512) GPT-2 124M's 49 matrices for 4 rows took 26.8 ms
    and for 8 rows 30.8 ms in the kernel, against MKL's 46-50 and 43-69 ms (either layout), where one row takes
    22-23 ms."""

    def forward(self, x):
        return rows_linear(x, self.weight, self.bias)

    def bound_forward(self):  # see model.bound
        weight, bias = self.weight, self.bias
        return lambda x: rows_linear(x, weight, bias)


def rows_linear(x, weight, bias):
    """F.linear(x, weight, bias), a batched decoding step's few float32 rows through `native_rows_linear`."""
    out = native_rows_linear(x, weight, bias) if x.numel() > weight.size(1) else None  # rows > 1
    return F.linear(x, weight, bias) if out is None else out


def native_rows_linear(x, weight, bias):
    """x @ weight.T + bias through ngpt's native float32 kernel (`native.Int8Kernel.float_linear`) for 2 to
    NATIVE_MAX_ROWS float32 rows on a CPU at inference, weight stored (out, in); None for anything else, and where
    the kernel cannot be had or the model is being compiled (the caller's kernel then computes it). Which CPUs
    call it is the caller's (`float_rows_native`)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if not (1 < rows <= NATIVE_MAX_ROWS and x.dtype is torch.float32 and weight.dtype is torch.float32
            and x.shape[-1] == in_features and x.is_cpu and weight.is_cpu and weight.is_contiguous()
            and (bias is None or (bias.dtype is torch.float32 and bias.is_cpu and bias.dim() == 1
                                  and bias.numel() == out_features))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return None
    kernel = native.int8_kernel()
    if kernel is None:
        return None
    out = x.new_empty(*x.shape[:-1], out_features)
    kernel.float_linear(x if x.is_contiguous() else x.contiguous(), weight, None if bias is None else bias.contiguous(),
                        out, rows, torch.get_num_threads())
    return out


# (route, the native kernel's instruction set) where a batch's few float32 rows take the native kernel, measured:
# oneDNN's on an AVX2 EPYC (Zen 3), MKL's on an AVX512 Xeon without bf16 instructions (Ice Lake). The AVX512 EPYC
# (Zen 5) keeps oneDNN on transposed weights (13.4 ms for 2 rows, 21.2 for 8: near the read), and a Xeon with AMX
# MKL on transposed weights (38.8 ms for 8 rows): the kernel is unmeasured on both.
NATIVE_ROWS_ROUTES = {("onednn", "avx2"), ("mkl", "avx512")}


def float_rows_native(kernel: str) -> bool:
    """Whether float32 products of a few rows go through ngpt's native kernel with this CPU's Linear `kernel`
    (`NATIVE_ROWS_ROUTES`; on MKL's route not on CPUs with AMX or AVX512-BF16, the AMX Xeon measured with MKL). On
    an AVX2 EPYC (Zen 3, 2 cores) it computes GPT-2 124M's matrices for 2-4 rows in 15-16 ms and for 8 rows in 23
    ms, against oneDNN's 29-35 and 41-46 ms (16.6 ms for one row); on an Ice Lake Xeon (AVX512, 2 cores) for 4 rows
    in 26.8 ms and 8 rows in 30.8, against MKL's 46-50 and 43-69 ms (22-23 ms for one row). Weights then keep the
    layout they were loaded in."""
    built = native.int8_kernel()
    return (built is not None and (kernel, built.path) in NATIVE_ROWS_ROUTES
            and not (kernel == "mkl" and cpu_has_fast_bf16()))


def retype_linears(model: nn.Module, cls: type[nn.Linear]) -> nn.Module:
    """Make every plain nn.Linear of the model (in place) a cls (VectorLinear, OneDNNLinear, RowsLinear): the same
    module and parameters, only its forward changes."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = cls
    return model


def vector_linears(model: nn.Module) -> nn.Module:
    """Every plain nn.Linear of the model a VectorLinear: its one-row products through addmv."""
    return retype_linears(model, VectorLinear)


def cpu_linear_kernel() -> str:
    """What runs a Linear's product on this CPU at inference: "onednn" (`OneDNNLinear`) on x86 CPUs other than
    Intel's, where MKL is slow; "mkl" (torch's own, measured at the bandwidth on a Xeon) elsewhere. Decided from
    the CPU alone, once: the same choice in every run, whatever the load."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and cpu_vendor() not in ("GenuineIntel", "") and torch.backends.mkldnn.is_available():
        return "onednn"
    return "mkl"


def cpu_linears(model: nn.Module, device: torch.device) -> nn.Module:
    """The model (in place) with its Linear products through oneDNN where `cpu_linear_kernel` says so: for
    evaluation, which reads many rows at a time (2.3x faster matmuls at 512 rows on an EPYC)."""
    return retype_linears(model, OneDNNLinear) if device.type == "cpu" and cpu_linear_kernel() == "onednn" else model


# From this many rows a step, float32 weights stored (in, out) stream faster than torch's (out, in) Linear weight.
# MKL on a Xeon (GPT-2 124M's matrices, 2 threads): 4 rows 1.19x, 8 rows 1.52x, 12 rows 1.82x, 16 rows 1.23x,
# but 2-3 rows 0.75x. oneDNN on an EPYC: 2 rows 1.9x, 4-16 rows 1.2x. One row keeps the layout it was loaded in
# (no copy at start-up: 0.3-0.5 s for 124M).
TRANSPOSED_FROM_ROWS = {"mkl": 4, "onednn": 2}


def transposed_storage(model: nn.Module) -> nn.Module:
    """Lay out every Linear weight of the model (in place) as the contiguous copy of its transpose: the same
    (out, in) values in the same Parameter (tied weights stay tied), so F.linear hands MKL an (in, out) matrix. A
    tied embedding table then reads its rows strided (70 us for 8 tokens at GPT-2's size, against a 40 ms step).
    The copies are made only while they take less than half the memory available: a model too large for that
    keeps its layout (slower batches, never an out-of-memory kill). Such weights are for inference only:
    safetensors refuses to save non-contiguous tensors (nothing saves a model loaded for inference)."""
    from nanogpt_cli.limits import available_memory_bytes

    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.is_contiguous()]
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
    stream them fastest for `rows` rows a decoding step (`cpu_linear_kernel`: oneDNN's, or MKL's with bf16's one
    row through `VectorLinear`; float32 batches: `transposed_storage`, or as loaded where `float_rows_native`).
    """
    check_precision(device, dtype, quantize)
    model = model.eval().to(device)
    if dtype != "float32":
        model = model.to(DTYPES[dtype])
    if quantize == "int8":
        model = quantize_int8(model)
    if device.type != "cpu":
        return model
    kernel = cpu_linear_kernel()
    if kernel == "onednn":
        model = retype_linears(model, OneDNNLinear)
    elif dtype == "bfloat16" and cpu_has_fast_bf16():  # measured with AMX (see above)
        model = vector_linears(model)
    elif dtype == "float32" and quantize == "none" and rows >= 2 and float_rows_native(kernel):
        model = retype_linears(model, RowsLinear)  # one row a step keeps F.linear: no call between it and MKL
    if (dtype == "float32" and quantize == "none" and rows >= TRANSPOSED_FROM_ROWS[kernel]
            and not float_rows_native(kernel)):
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
