"""Kernels the model calls but a reader of model.py need not: the CPU loss, a few rows at a time, and RMSNorm.

This module imports only torch.
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
