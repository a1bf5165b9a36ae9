"""Kernels the model calls but a reader of model.py need not: the CPU loss, a few rows at a time, RMSNorm, and a
decoding step's norms, activation and attention of one query per row, and the draw of its next token.

This module imports only torch (and ngpt's native kernels, `native`, when a decoding step first needs them).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cross_entropy(logits, targets, ignore_index: int = -1):
    """Mean cross-entropy of (N, V) logits over the targets that are not ignore_index, in float32.

    On cpu (uncompiled) it runs as `ChunkedCrossEntropy`; elsewhere as F.cross_entropy on float32 logits."""
    if logits.device.type == "cpu" and len(logits) and not torch.compiler.is_compiling():
        return ChunkedCrossEntropy.apply(logits, targets, ignore_index)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets), forward and backward, a few rows at a time.

    The float32 copy of the logits, the log-softmax and its gradient are never whole tensors: each block
    of rows (4 MB in float32) is upcast, reduced and differentiated while it is in cache, and the gradient
    is written once, in the logits' dtype (softmax - one_hot, scaled). For GPT-2's 50304-word vocabulary
    on cpu this replaces several passes over (B*T, 50304) float32 tensors, one of them (log-softmax's
    backward) slow there: the loss and its gradient measured 1.3-2.5x faster. Saved for backward: the
    logits themselves (bf16 under autocast) and one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        rows = max(1, 2**20 // logits.size(-1))
        lse = torch.cat([torch.logsumexp(logits[i:i + rows].float(), dim=-1) for i in range(0, len(logits), rows)])
        keep = targets != ignore_index
        safe = targets.masked_fill(~keep, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        count = keep.sum()
        ctx.save_for_backward(logits, lse, safe, keep, count)
        ctx.rows = rows
        return torch.where(keep, lse - picked, 0.0).sum() / count  # 0 / 0 = nan when every target is ignored

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, safe, keep, count = ctx.saved_tensors
        scale = grad_loss / count  # d loss / d logit = (softmax - one_hot) * scale, row by row; 0 where ignored
        grad = torch.empty_like(logits)
        minus_one = torch.full((1, 1), -1.0, device=logits.device).expand(ctx.rows, 1)
        for i in range(0, len(logits), ctx.rows):
            j = min(i + ctx.rows, len(logits))
            p = torch.exp(logits[i:j].float() - lse[i:j, None])
            p.scatter_add_(1, safe[i:j, None], minus_one[:j - i])
            grad[i:j] = torch.where(keep[i:j, None], p.mul_(scale), 0.0)
        return grad, None, None


def rms_norm(x, weight, eps: float):
    """x / sqrt(mean(x^2) + eps) over the last dimension, times weight (None: no gain): F.rms_norm's result, in
    float32 inside and x's dtype out, with a backward of a few whole-tensor ops (see `RMSNorm`)."""
    return RMSNorm.apply(x, weight, eps)


class RMSNorm(torch.autograd.Function):
    """F.rms_norm's forward is one kernel on the CPU, its backward (autograd through the formula) a dozen small
    ops, and it falls back to the formula under autocast (a bfloat16 input, a float32 weight). Here the forward
    saves the normalised x and the reciprocal RMS, and the backward is dx = rstd * (g - x_hat * mean(g * x_hat)),
    g the gradient times the gain: measured 1.3x faster forward and backward on the CPU recipe's shapes."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        normed = x32 * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return (normed if weight is None else normed * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        normed, rstd, weight = ctx.saved_tensors
        grad = grad_out.float()
        grad_weight = None if weight is None else (grad * normed).flatten(0, -2).sum(0)
        if weight is not None:
            grad = grad * weight
        grad_x = (grad - normed * (grad * normed).mean(-1, keepdim=True)) * rstd
        return grad_x.to(grad_out.dtype), grad_weight, None


def _native():
    """The native kernels (`native.int8_kernel`: built on first use), or None where they cannot be had."""
    from nanogpt_cli import native  # here, not at the top: a model that never decodes on a CPU never needs it

    return native.int8_kernel()


def one_query_attention(q, k, v, mask=None, counts=None):
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for one query per row, q (B, nh, 1, hs) and k, v
    (B, nh, L, hs): row b sees its first counts[b] keys (what the mask says; None and None: all L).

    A decoding step's product is tiny (GPT-2 124M: 12 heads of 64 against a few hundred keys), and torch's CPU
    attention spends 60-80 us a call choosing and setting up its kernel: 0.9 ms of a 10 ms int8 step on a 2-core
    EPYC. So float32 on the CPU with autograd and autocast off runs in ngpt's native kernel
    (`native.Int8Kernel.attention`, the softmax in float32, within 2e-6 of torch's in float64); anything else, or
    without the kernel, runs in torch's."""
    if (q.dtype is torch.float32 and q.is_cpu and q.dim() == 4 and q.size(2) == 1 and k.shape == v.shape
            and k.dim() == 4 and k.shape[:2] == q.shape[:2] and k.size(3) == q.size(3) and k.stride() == v.stride()
            and k.dtype is v.dtype is torch.float32 and k.is_cpu and v.is_cpu
            and q.stride(3) == 1 and k.stride(3) == 1 and (mask is None or counts is not None)
            and (counts is None or (counts.dtype is torch.long and counts.is_cpu and counts.is_contiguous()
                                    and counts.shape == (q.size(0),)))
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        kernel = _native()
        if kernel is not None:
            out = torch.empty(q.shape, dtype=torch.float32, device="cpu")
            kernel.attention(q, k, v, out, counts, torch.get_num_threads())
            return out
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def bound_attention(caches):
    """attend(q, cache, end) = one_query_attention(q[:, :, None], cache[0, :, :, :end], cache[1, :, :, :end]) for
    the decoding step (`model.DecodingStep`): q (B, nh, hs), cache one layer of caches (n_layer, 2, B, nh,
    positions, hs). Or q is c_attn's whole output (B, 3, nh, hs), the queries and the step's keys and values, which
    are first written at position end - 1 of the cache (by the kernel, one torch copy fewer a layer). The caches
    are checked once, here (a step's twelve calls would each spend longer checking than attending), and each call
    checks only q; the kernel's call is one_query_attention's, bit for bit."""
    kernel = None
    if (caches.dtype is torch.float32 and caches.is_cpu and caches.stride(-1) == 1 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        kernel = _native()

    def unbound(q, cache, end):
        if q.dim() == 4:  # the step's keys and values into the cache, in one copy
            cache[:, :, :, end - 1] = q[:, 1:].transpose(0, 1)
            q = q[:, 0]
        return one_query_attention(q[:, :, None], cache[0, :, :, :end], cache[1, :, :, :end])

    if kernel is None:
        return unbound
    fn, threads = kernel._attention, torch.get_num_threads()
    rows, heads, positions, hs = caches.shape[2:]
    values, kv_row, kv_head, kv_step = caches.stride(1) * caches.element_size(), *caches.stride()[2:5]
    shapes = {3: (rows, heads, hs), 4: (rows, 3, heads, hs)}

    def attend(q, cache, end):
        if not (q.dtype is torch.float32 and q.is_cpu and q.shape == shapes.get(q.dim()) and q.stride(-1) == 1
                and 0 < end <= positions):
            return unbound(q, cache, end)
        out = torch.empty(rows, heads, 1, hs, dtype=torch.float32, device="cpu")
        keys, queries = cache.data_ptr(), q.data_ptr()
        new_k = new_v = None
        if q.dim() == 4:
            new_k = queries + q.stride(1) * 4
            new_v = new_k + q.stride(1) * 4
        fn(queries, keys, keys + values, out.data_ptr(), None, new_k, new_v, end - 1, rows, heads, end, hs,
           q.stride(0), q.stride(-2), kv_row, kv_head, kv_step, threads)
        return out

    return attend


NATIVE_VALUES = 65536  # a decoding step's few rows (GPT-2 124M: 768 or 3072 a row); a prefill's go to torch's


def _native_input(x) -> bool:
    """Whether x is a decoding step's few rows: contiguous float32 on the CPU, not being compiled."""
    return (not torch.compiler.is_compiling() and x.dtype is torch.float32 and x.is_cpu
            and 0 < x.numel() <= NATIVE_VALUES and x.is_contiguous())


def norm(x, kind: str, weight, bias, eps: float):
    """A block's norm of x over its last dimension: kind "layer_norm" (F.layer_norm, weight and bias or None) or
    "rms_norm" (`rms_norm`, weight or None; no bias).

    Torch's LayerNorm took 40-45 us a call between two weight streams of a decoding step (1.1 ms of 25 norms in a
    14 ms int8 step, GPT-2 124M on a 2-core EPYC). So a few rows (`_native_input`) with autograd off run in ngpt's
    native kernel (`native.Int8Kernel.norm`, float32, within float32's rounding of torch's), the same code as the
    norm an int8 product computes in its own call before its product (`precision.Int8Linear.bound_forward`), so
    the two agree bit for bit; the rest, and anything recording autograd, in torch's."""
    if (not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
            and _native_input(x) and all(t is None or _native_parameter(t, x.size(-1)) for t in (weight, bias))):
        kernel = _native()
        if kernel is not None:
            out = torch.empty_like(x)  # x is contiguous float32 on the CPU (`_native_input`)
            kernel.norm(kind, x, weight, bias, out, eps)
            return out
    if kind == "rms_norm":
        return rms_norm(x, weight, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def bound_norm(kind: str, weight, bias, eps: float):
    """norm(x, kind, weight, bias, eps) as a function of x (a norm module's `bound_forward`, see model.bound):
    weight and bias are checked once, here, and each call checks x and that they are still the tensors checked.
    Torch's LayerNorm of a decoding step's row took 5 us in a warm loop and norm's checks and allocation 12 us;
    this call 4 us. Bit for bit norm's."""
    kernel = _native() if all(t is None or _native_parameter(t, t.numel()) for t in (weight, bias)) else None
    if kernel is None or (weight is not None and bias is not None and weight.numel() != bias.numel()):
        return lambda x: norm(x, kind, weight, bias, eps)
    fn, number = kernel._norm, kernel.NORMS[kind]
    size = next((t.numel() for t in (weight, bias) if t is not None), None)
    watched = [t for t in (weight, bias) if t is not None]
    addresses = [t.data_ptr() for t in watched]
    gain, shift = (None if t is None else t.data_ptr() for t in (weight, bias))

    def forward(x):
        if (_native_input(x) and (size is None or x.size(-1) == size) and [t.data_ptr() for t in watched] == addresses
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *watched)))):
            out = torch.empty_like(x)
            fn(x.data_ptr(), gain, shift, out.data_ptr(), x.numel() // x.size(-1), x.size(-1), number, eps)
            return out
        return norm(x, kind, weight, bias, eps)
    return forward


def _native_parameter(t, size: int) -> bool:
    """Whether t is a norm's gain or bias the native kernel takes for rows of size values."""
    return t.dtype is torch.float32 and t.is_cpu and t.dim() == 1 and t.numel() == size and t.is_contiguous()


def activation(x, name: str):
    """The MLP's activation of x by its Hugging Face name: "gelu_new" (GELU's tanh form, OpenAI's GPT-2), "gelu"
    (exact, nanoGPT's nn.GELU()) or "relu2" (ReLU squared).

    Between two weight streams torch's kernel for a decoding step's 3072 values took 40-45 us a call (0.5 ms of
    a 10 ms int8 step, GPT-2 124M on a 2-core EPYC), so a few rows (`_native_input`) with autograd off run in
    ngpt's native kernel (`native.Int8Kernel.activation`: GELU within float32's rounding of torch's, ReLU squared
    bit for bit); the rest, the exact GELU and anything recording autograd, in torch's."""
    if name != "gelu" and _native_input(x) and not (torch.is_grad_enabled() and x.requires_grad):
        kernel = _native()
        if kernel is not None:
            out = torch.empty(x.shape, dtype=torch.float32, device="cpu")
            kernel.activation(name, x, out)
            return out
    if name == "relu2":
        return F.relu(x).square()
    return F.gelu(x, approximate="tanh" if name == "gelu_new" else "none")


def sample(logits, temperature: float, top_k: int | None, generator=None):
    """The next token (B, 1) of logits (B, vocab): `generate.sample_next` without top_p (greedy at temperature 0,
    else a draw from the softmax at temperature of the top_k largest and those tied with the k-th), or None where
    it is left to torch's ops.

    torch's top-k, division, softmax and multinomial took 0.7-0.8 ms of a 12 ms int8 step of GPT-2 124M on a 2-core
    EPYC: each op runs cold after the head's weight stream. So float32 logits on the CPU go through ngpt's native
    kernel (`native.Int8Kernel.sample`, one call, 0.05 ms), which draws at one uniform per row from the generator
    (the same distribution, not the same tokens for a seed as torch's draw). None for anything else: another
    dtype or device, autograd, no kernel, or a row with a NaN, a +inf or nothing finite (torch's ops then say what
    they say of it)."""
    if not (logits.dtype is torch.float32 and logits.is_cpu and logits.dim() == 2 and logits.stride(-1) == 1
            and logits.size(0) > 0 and not logits.requires_grad and not torch.compiler.is_compiling()):
        return None
    kernel = _native()
    if kernel is None:
        return None
    rows, vocab = logits.shape
    k = top_k if top_k is not None and 0 < top_k < vocab else 0
    uniforms = None if temperature == 0 else torch.rand(rows, dtype=torch.float64, generator=generator)
    out = torch.empty(rows, 1, dtype=torch.long)
    return out if kernel.sample(logits, k, temperature, uniforms, out) else None
