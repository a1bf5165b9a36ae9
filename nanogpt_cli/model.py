"""The GPT-2 language model, top to bottom: config, norm, attention, MLP, block, GPT.

Parameter names and shapes follow nanoGPT (and so, after transposing Conv1D weights,
OpenAI's GPT-2 in Hugging Face `transformers`). This module depends only on torch and on
`nanogpt_cli.ops` (the CPU loss kernel, itself torch only). Decoding with a KV cache and
sampling live in `nanogpt_cli.generate`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt_cli import ops

if TYPE_CHECKING:
    from nanogpt_cli.generate import KVCache


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the position table covers
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    # The MLP's GELU, by its Hugging Face name: "gelu_new" (the tanh approximation, OpenAI's GPT-2) or "gelu"
    # (exact, erf: nanoGPT's, which models trained from scratch use; 2x faster forward and backward on CPU).
    activation: str = "gelu_new"


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's LayerNorm cannot turn the bias off alone)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attention = "sdpa"  # or "explicit" (see GPT.set_attention)

    def explicit_attention(self, q, k, v, dropout_p: float):
        """Causal attention spelled out (nanoGPT's slow path): scores, mask, softmax, weighted sum."""
        T = q.size(-2)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # built inline: no state to recompile on
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(mask, float("-inf")), dim=-1)
        return F.dropout(att, dropout_p, self.training) @ v

    def forward(self, x, kv_cache: KVCache | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None and self.attention == "explicit":
            y = self.explicit_attention(q, k, v, dropout_p)
        elif kv_cache is None or kv_cache.empty:
            if kv_cache is not None:
                kv_cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # mask: None when one new token attends to everything before it; for a chunk after a filled
            # cache, query i sees keys up to past + i; for rows at different lengths, each row its own keys
            k, v, mask = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu": "none"}


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=GELU_APPROXIMATION[config.activation])
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.activation in GELU_APPROXIMATION, f"activation must be one of {', '.join(GELU_APPROXIMATION)}"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the token embedding is the output projection (GPT-2 does this).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections: std 0.02 / sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out by default, as GPT-2 reports do
        (token embeddings count, being tied to the output layer)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, all_logits: bool = False):
        """idx (B, T) token ids -> (logits, loss).

        With targets: logits (B, T, vocab) and the mean cross-entropy (ignore_index -1).
        Without: logits for the last position only (B, 1, vocab), unless all_logits.
        With a kv_cache, positions continue from each row's filled length and the cache advances by T.
        """
        device = idx.device
        b, t = idx.size()
        # (t,), or (b, 1) when the cache's rows are at different lengths
        pos = torch.arange(t, dtype=torch.long, device=device) if kv_cache is None else kv_cache.positions(t)
        end = t if kv_cache is None else kv_cache.longest + t
        if end > self.config.block_size:
            raise ValueError(f"sequence of length {end} is longer than block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (b, t, n_embd)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(t)
        if targets is not None:
            logits = self.lm_head(x)
            loss = ops.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
            return logits, loss
        if all_logits:
            return self.lm_head(x), None
        return self.lm_head(x[:, [-1], :]), None  # only the last position is needed to generate

    def set_attention(self, kind: str) -> None:
        """"sdpa" (F.scaled_dot_product_attention, its kernel chosen by torch) or "explicit" (matmul, mask,
        softmax, matmul): on CPU under bf16 autocast the explicit form's forward+backward measured 1.6x
        faster than SDPA's math kernel and 4x faster than its flash kernel (a 2-core AVX512-BF16 EPYC;
        T=64 and T=256), whose bf16 backward is slow there. Sampling with a KV cache always uses SDPA."""
        assert kind in ("sdpa", "explicit"), kind
        for block in self.transformer.h:
            block.attn.attention = kind

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. load GPT-2's 1024 and train at 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not biases, norms or position vectors)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel is one launch per step instead of one per tensor: on cuda and cpu.
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        extra = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward and backward), PaLM appendix B: 6N + 12 L H Q T; a frozen weight (LoRA's
        base) has no gradient of its own to compute: 4 FLOPs per token, not 6."""
        cfg = self.config
        N = self.get_num_params()
        wpe = self.transformer.wpe.weight  # not counted in N either
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad and p is not wpe)
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N - 2 * frozen + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float | None) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_second / peak_flops

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True, stop_token=None):
        """Extend idx (B, T) by up to max_new_tokens tokens, yielding each new column (B, 1); stops early
        once every row has produced stop_token.

        The decoding (KV cache, sampling filters, stopping) is `nanogpt_cli.generate.Generation`, the loop
        `ngpt sample` runs too; this is nanoGPT's entry point to it."""
        from nanogpt_cli.generate import Generation  # generate.py builds on this module: imported on use

        yield from Generation(self, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, stop_token)
