"""The GPT language model, top to bottom: config, norms, rotary, attention, MLP, block, GPT.

The defaults are GPT-2 exactly. Parameter names and shapes follow nanoGPT (and so, after transposing
Conv1D weights, OpenAI's GPT-2 in Hugging Face `transformers`). The config's other options are the
modern recipe of modded-nanogpt and nanochat: rotary positions, RMSNorm, QK-norm, a norm after the
embedding, ReLU², an untied output head, logit soft-capping and zero-initialised output projections.
This module depends only on torch and on `nanogpt_cli.ops` (the CPU loss kernel, itself torch only).
`DecodingStep`, at the end, is GPT.forward's single-token step spelled as one loop for the decoder's speed.
Decoding with a KV cache and sampling live in `nanogpt_cli.generate`; the optimizers in `nanogpt_cli.optim`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

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
    # The MLP's activation, by its Hugging Face name: "gelu_new" (GELU's tanh approximation, OpenAI's GPT-2),
    # "gelu" (exact, erf: nanoGPT's, which models trained from scratch use; 2x faster forward and backward on
    # CPU than gelu_new) or "relu2" (ReLU squared, max(x, 0)^2: modded-nanogpt's and nanochat's; cheaper still).
    activation: str = "gelu_new"
    position: str = "learned"  # "learned" (GPT-2's table, wpe) or "rope" (rotary: RoFormer, Llama; no table)
    rope_base: float = 10000.0  # rotary's base: the slowest pair of channels turns once in 2*pi*base positions
    norm: str = "layernorm"  # "layernorm" (GPT-2's, with a bias when bias=True) or "rmsnorm" (no centring, no bias)
    qk_norm: bool = False  # queries and keys RMS-normalised per head before attention (bounded attention logits)
    embedding_norm: bool = False  # a norm right after the embedding (modded-nanogpt, nanochat)
    tie_embeddings: bool = True  # the token embedding is the output head (GPT-2); False: two separate matrices
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); None: off
    zero_init_proj: bool = False  # attention's and the MLP's output projections start at zero: each block the identity


ACTIVATIONS = ("gelu_new", "gelu", "relu2")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's LayerNorm cannot turn the bias off alone); a decoding step's few
    rows in ngpt's native kernel where it can (`ops.norm`)."""

    kind, eps = "layer_norm", 1e-5

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return ops.norm(x, self.kind, self.weight, self.bias, self.eps)

    def bound_forward(self):
        return ops.bound_norm(self.kind, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019, as in Llama): no mean subtracted, no bias."""

    kind, eps, bias = "rms_norm", 1e-6, None

    def __init__(self, ndim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return ops.norm(x, self.kind, self.weight, None, self.eps)

    def bound_forward(self):
        return ops.bound_norm(self.kind, self.weight, None, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else LayerNorm(config.n_embd, bias=config.bias)


def rotary_tables(head_size: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of channel pair (i, i + hs/2) at each position by the angle position * base^(-2i / hs), as two
    (length, head_size) tables: cos of the angle for both channels, and -sin, +sin (see `apply_rotary`)."""
    inverse_frequency = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inverse_frequency)  # (length, hs/2)
    return torch.cat((angles.cos(), angles.cos()), 1).float(), torch.cat((-angles.sin(), angles.sin()), 1).float()


def apply_rotary(x, cos, sin):
    """Rotate each pair of channels (i, i + hs/2) of x (B, nh, T, hs) by its position's angle (`rotary_tables`' rows
    for x's positions): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Then q . k depends on the two positions
    only through their difference."""
    swapped = x.roll(x.size(-1) // 2, dims=-1)  # (x2, x1)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


def norm_and_rotate(qk, qk_norm: bool, rotary: tuple[torch.Tensor, torch.Tensor] | None):
    """Queries and keys side by side (any layout with head_size last): QK-norm, then rotary positions."""
    if qk_norm:
        qk = ops.rms_norm(qk, None, 1e-6)
    if rotary is not None:
        qk = apply_rotary(qk, *rotary)
    return qk


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
        self.qk_norm = config.qk_norm
        self.attention = "sdpa"  # or "explicit" (see GPT.set_attention)

    def explicit_attention(self, q, k, v, dropout_p: float):
        """Causal attention spelled out (nanoGPT's slow path): scores, mask, softmax, weighted sum."""
        T = q.size(-2)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # built inline: no state to recompile on
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(mask, float("-inf")), dim=-1)
        return F.dropout(att, dropout_p, self.training) @ v

    def queries_keys_values(self, x, rotary: tuple[torch.Tensor, torch.Tensor] | None = None):
        """q, k, v (B, nh, T, hs) of x (B, T, C): QK-norm and rotary positions (`rotary_tables`' rows for x's
        positions) applied."""
        B, T, C = x.size()
        if not self.qk_norm and rotary is None:
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            return q, k, v
        # queries and keys side by side, normalised and rotated in one go (half the small ops on the CPU)
        qkv = self.c_attn(x).view(B, T, 3 * self.n_head, C // self.n_head).transpose(1, 2)  # (B, 3 nh, T, hs)
        qk = norm_and_rotate(qkv[:, :2 * self.n_head], self.qk_norm, rotary)
        return qk[:, :self.n_head], qk[:, self.n_head:], qkv[:, 2 * self.n_head:]

    def forward(self, x, kv_cache: KVCache | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.size()
        q, k, v = self.queries_keys_values(x, rotary)
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
            if T == 1 and not dropout_p:  # a decoding step: each row's query against its first key_counts keys
                y = ops.one_query_attention(q, k, v, mask, kv_cache.key_counts)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class Activation(nn.Module):
    """The MLP's activation by its Hugging Face name: "gelu_new" (GELU's tanh approximation), "gelu" (exact) or
    "relu2" (ReLU squared); a decoding step's few rows in ngpt's native kernel where it can (`ops.activation`)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        return ops.activation(x, self.name)

    def bound_forward(self):  # see `bound`
        name = self.name
        return lambda x: ops.activation(x, name)

    def extra_repr(self) -> str:
        return self.name


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = Activation(config.activation)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache: KVCache | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None):
        x = x + self.attn(self.ln_1(x), kv_cache, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


def check_config(config: GPTConfig) -> None:
    """AssertionError naming the first option the model cannot be built with (TrainConfig.validate says it first,
    as a usage error; this covers configs read from checkpoints and code)."""
    assert config.vocab_size is not None and config.block_size is not None
    assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
    assert config.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}"
    assert config.position in POSITIONS, f"position must be one of {', '.join(POSITIONS)}"
    assert config.norm in NORMS, f"norm must be one of {', '.join(NORMS)}"
    if config.position == "rope":
        assert (config.n_embd // config.n_head) % 2 == 0, "rotary positions need an even head size"
        assert config.rope_base > 0, "rope_base must be positive"
    assert config.logit_softcap is None or config.logit_softcap > 0, "logit_softcap must be positive"


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        check_config(config)
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.embedding_norm:
            modules["ln_e"] = make_norm(config)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # the token embedding is the output projection (GPT-2 does this)
            self.transformer.wte.weight = self.lm_head.weight
        if config.position == "rope":  # derived from the config: not weights, not in the state dict
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections: std 0.02 / sqrt(2 * n_layer); or zero (each block starts
        # as the identity, as in modded-nanogpt and nanochat).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    torch.nn.init.zeros_(p)
                else:
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the tables that are looked up rather than multiplied, as GPT-2
        reports do: the position table, and an untied token embedding (a tied one counts, being the output layer)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n_params -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n_params -= self.transformer.wte.weight.numel()
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
        x = self.transformer.wte(idx)  # (b, t, n_embd)
        rotary = None
        if self.config.position == "rope":  # rotated keys are cached: each position's angle is applied once
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (t, hs/2), or (b, 1, hs/2)
            rotary = (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])  # (b, 1, 1, hs/2): per row
        else:
            x = x + self.transformer.wpe(pos)
        if self.config.embedding_norm:
            x = self.transformer.ln_e(x)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache, rotary)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(t)
        if targets is not None:
            logits = self.head(x)
            loss = ops.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
            return logits, loss
        if all_logits:
            return self.head(x), None
        return self.head(x[:, [-1], :]), None  # only the last position is needed to generate

    def head(self, x):
        """Logits of the final hidden states x (b, t, n_embd), soft-capped to (-cap, cap) when logit_softcap is set."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

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
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not biases, norms or position vectors): nanoGPT's entry
        point to `nanogpt_cli.optim.adamw`, which `ngpt train` builds through `optim.build_optimizer`."""
        from nanogpt_cli import optim  # optim.py holds the optimizers (and Muon); imported on use

        return optim.adamw(self, weight_decay, learning_rate, betas, device_type)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward and backward), PaLM appendix B: 6N + 12 L H Q T, N the matrices'
        parameters (get_num_params: the output head counts, tied or not; tables that are only looked up do not).
        The options add only elementwise work (norms, rotary, activations, soft-cap), which the count leaves out.
        A frozen weight (LoRA's base) has no gradient of its own to compute: 4 FLOPs per token, not 6."""
        cfg = self.config
        N = self.get_num_params()
        looked_up = {id(table.weight) for name, table in self.transformer.items()  # not counted in N either
                     if name == "wpe" or (name == "wte" and not cfg.tie_embeddings)}
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad and id(p) not in looked_up)
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


def bound(module: nn.Module):
    """module's forward as a function of its input alone, with its tensors looked up once, now, instead of through
    nn.Module's attribute and call machinery at every call (see `DecodingStep`). A module says how with a
    `bound_forward` method (the norms here, precision's Linears); a plain nn.Linear is F.linear on its weight and
    bias; any other module (a LoRA layer) is called as it is."""
    if getattr(type(module), "bound_forward", None) is not None:  # the class's: a wrapper's __getattr__ may forward
        return module.bound_forward()
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def bound_residual(module: nn.Module):
    """residual + module(x) as a function of (x, residual), bound as `bound` binds the module: a module says how
    with a `bound_residual_forward` method (precision's Int8Linear, whose kernel adds the residual in the pass
    that writes its product: the same sum, one op fewer between two weight streams)."""
    if getattr(type(module), "bound_residual_forward", None) is not None:
        return module.bound_residual_forward()
    forward = bound(module)
    return lambda x, residual: residual + forward(x)


def bound_fused(linear: nn.Module, norm: nn.Module | None = None, act: nn.Module | None = None):
    """act(linear(norm(x))) as one function (norm, act or both None: left out), each bound as `bound` binds it: a
    Linear says how to compute a LayerNorm or RMSNorm before its product and an Activation after it in its own
    call with a `bound_activated_forward` method (precision's Int8Linear: ln_2, the MLP's c_fc and its GELU in one
    call of the native kernel, bit for bit the three calls)."""
    if (isinstance(norm, LayerNorm | RMSNorm | None) and isinstance(act, Activation | None)
            and getattr(type(linear), "bound_activated_forward", None) is not None):
        fused = linear.bound_activated_forward(None if act is None else act.name, norm)
        if fused is not None:
            return fused
    normalise, product = None if norm is None else bound(norm), bound(linear)
    activation = None if act is None else bound(act)
    if normalise is None:
        return product if activation is None else lambda x: activation(product(x))
    return (lambda x: product(normalise(x))) if activation is None else lambda x: activation(product(normalise(x)))


class DecodingStep:
    """`GPT.forward` at inference for one new token per row, every row filled to the same length of a KV cache
    (batch-1 decoding, and batches that started together): the same operations on the same tensors, spelled
    as one loop over the layers' functions, bound once (`bound`), and the cache's tensors.

    Why a second spelling: between two weight streams a decoding step's small ops run with their code and data
    evicted, so each Python attribute lookup and module call costs microseconds. On a 2-core Xeon (GPT-2 124M,
    fp32) the modules' forward took 1.19-1.24x the time of its matrix products alone, this loop 1.06-1.08x.
    Any other call (a prefill, rows at different lengths, a step past block_size) is `GPT.forward`'s, and the
    tests hold the two to the same logits for every option of the config. So is every step of a model with
    forward hooks (on any module, or global ones: the loop would skip them) or compiled in place
    (`model.compile()`). Build one per decoding run: it keeps the functions of the modules the model has now.
    """

    def __init__(self, model: GPT):
        self.model = model
        self.hooked = getattr(model, "_compiled_call_impl", None) is not None or any(
            m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        config = model.config
        self.n_head, self.head_size = config.n_head, config.n_embd // config.n_head
        tr = model.transformer
        self.wte = tr.wte.weight
        self.wpe = tr.wpe.weight if config.position == "learned" else None
        self.rotary = (model.rope_cos, model.rope_sin) if config.position == "rope" else None
        self.ln_e = bound(tr.ln_e) if config.embedding_norm else None
        self.qk_norm = config.qk_norm
        self.layers = [(bound_fused(b.attn.c_attn, b.ln_1), bound_residual(b.attn.c_proj),
                        bound_fused(b.mlp.c_fc, b.ln_2, b.mlp.act), bound_residual(b.mlp.c_proj)) for b in tr.h]
        self.head = bound_fused(model.lm_head, tr.ln_f)
        self.softcap = config.logit_softcap

    def __call__(self, idx, kv_cache: KVCache):
        """Logits (B, 1, vocab) of the tokens idx (B, 1) after the rows of kv_cache, which takes them in."""
        pos = kv_cache.positions(1)  # (1,) when the rows are aligned
        if (self.hooked or _global_forward_hooks or _global_forward_pre_hooks or self.model.training
                or not kv_cache.aligned or kv_cache.empty or kv_cache.longest >= kv_cache.block_size):
            return self.model(idx, kv_cache=kv_cache)[0]
        B, nh, hs = idx.size(0), self.n_head, self.head_size
        start, end = kv_cache.longest, kv_cache.longest + 1
        x = F.embedding(idx, self.wte)  # (B, 1, C)
        if self.wpe is not None:
            x = x + self.wpe[pos]
        rotary = None if self.rotary is None else (self.rotary[0][pos], self.rotary[1][pos])  # (1, hs) each
        if self.ln_e is not None:
            x = self.ln_e(x)
        caches = kv_cache.root.buffer[:, :, kv_cache.row_range]  # (n_layer, 2, B, nh, positions, hs)
        attend = ops.bound_attention(caches)
        for cache, (c_attn, attn_proj, c_fc, mlp_proj) in zip(caches, self.layers, strict=True):
            qkv = c_attn(x).view(B, 3, nh, hs)  # c_attn(ln_1(x))
            if self.qk_norm or rotary is not None:
                qk = norm_and_rotate(qkv[:, :2], self.qk_norm, rotary)
                q = qk[:, 0]
                cache[0, :, :, start] = qk[:, 1]
                cache[1, :, :, start] = qkv[:, 2]
                y = attend(q, cache, end)  # attention over the first end positions: (B, nh, 1, hs)
            else:  # the new keys and values go into the cache in the attention's own call
                y = attend(qkv, cache, end)
            x = attn_proj(y.view(B, 1, nh * hs), x)  # x + c_proj(y); (B, nh, 1, hs): the heads side by side
            x = mlp_proj(c_fc(x), x)  # x + c_proj(act(c_fc(ln_2(x))))
        kv_cache.advance(1)
        logits = self.head(x)  # lm_head(ln_f(x))
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)
