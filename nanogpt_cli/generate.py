"""Decoding: the KV cache, next-token logits over a growing batch, sampling filters, and the one loop.

`Generation` is the decoding loop that `ngpt sample` and `GPT.generate` both run: each step takes
the next-token logits from a `Decoder` (which prefills a `KVCache` once and then feeds one column,
rebuilding the cache past block_size), picks a token per row with `sample_next`, and ends rows one
by one. The rows of a batch share one cache position (`KVCache.pos`): they are prompts of the same
length decoded in step, and a row that has ended is left in the batch, its tokens ignored.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from nanogpt_cli.model import GPT, GPTConfig


class KVCache:
    """Keys and values of every layer for a batch, preallocated to `block_size` positions.

    `pos` is how many positions are filled, the same for every row of the batch; the model's forward
    starts its positions there and advances it. `Decoder` prefills the prompt once, then feeds one
    token at a time, and rebuilds the cache when it is full. The buffer is allocated on the first
    update, in the dtype of the keys (so autocast's bf16 keys are stored as bf16), unless `dtype` is given.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype=None):
        head_size = config.n_embd // config.n_head
        self.shape = (config.n_layer, 2, batch_size, config.n_head, config.block_size, head_size)
        self.device, self.dtype = device, dtype
        self.cache = None if dtype is None else torch.zeros(self.shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k, v):
        """Store k, v (B, nh, T, hs) after the filled positions; return all keys and values so far."""
        if self.cache is None:
            self.cache = torch.zeros(self.shape, device=self.device, dtype=k.dtype)
        T = k.size(2)
        end = self.pos + T
        self.cache[layer, 0, :, :, self.pos:end] = k
        self.cache[layer, 1, :, :, self.pos:end] = v
        return self.cache[layer, 0, :, :, :end], self.cache[layer, 1, :, :, :end]


class Decoder:
    """Next-token logits for a batch of growing sequences: `logits()`, then `append(tokens)`.

    With use_cache, the first call prefills the last min(T, block_size) tokens into a
    `KVCache`; later calls feed only the appended column. When the cache is full it is
    rebuilt: the last block_size // 2 tokens are prefilled again (positions restart at 0),
    so a rebuild costs one half-block forward every block_size // 2 tokens. `start` is the
    index in `idx` of the first token the model sees, so the logits always equal those of a
    full forward over `idx[:, start:]`. Without the cache, `start` keeps the last
    block_size tokens and every call is that full forward.
    """

    def __init__(self, model: GPT, idx, use_cache: bool = True):
        self.model, self.idx, self.use_cache = model, idx, use_cache
        self.block_size = model.config.block_size
        self.cache: KVCache | None = None
        self.start = 0
        self.rebuilds = 0
        self._pending = idx  # tokens not yet fed to the cache

    @torch.inference_mode()
    def logits(self):
        """(B, vocab) logits for the token after idx."""
        T = self.idx.size(1)
        if not self.use_cache:
            self.start = max(0, T - self.block_size)
            logits, _ = self.model(self.idx[:, self.start:])
            return logits[:, -1, :]
        if self.cache is None or self.cache.pos + self._pending.size(1) > self.block_size:
            keep = min(T, self.block_size) if self.cache is None else max(1, self.block_size // 2)
            self.rebuilds += self.cache is not None
            self.cache = KVCache(self.model.config, self.idx.size(0), self.idx.device)
            self.start = T - keep
            self._pending = self.idx[:, self.start:]
        logits, _ = self.model(self._pending, kv_cache=self.cache)
        self._pending = self.idx[:, :0]
        return logits[:, -1, :]

    def append(self, tokens) -> None:
        """Add a column (B, n) of tokens to every sequence."""
        self.idx = torch.cat((self.idx, tokens), dim=1)
        self._pending = torch.cat((self._pending, tokens), dim=1)


MIN_TEMPERATURE = 1e-6


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token (B, 1) from logits (B, vocab): greedy at temperature 0,
    otherwise sampled after temperature, top-k and nucleus (top-p) filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # below MIN_TEMPERATURE float32 division overflows (1e-300 is 0 in float32); sampling there is greedy anyway
    logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and 0 < top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p
        remove = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class Generation:
    """Extend a batch idx (B, T) by up to max_new_tokens tokens: iterating yields each new column (B, 1).

    Every row runs until it samples stop_token (its finish reason is then "eot") or the caller ends it
    with `finish(row, reason)`, e.g. when a stop string appears in its text. Decoding stops once no row
    runs, or after max_new_tokens steps, when the rows still running end with "length". A row that has
    ended still receives a token each step while others run (the batch is one forward); those tokens
    are not its output. `finish_reasons[row]` is None while the row runs.

    With use_cache the prompt is prefilled once and each step feeds one token against cached keys and
    values (see `Decoder`); without, every step recomputes the last block_size tokens, as nanoGPT does.
    vocab_size, when smaller than the model's (padded) table, keeps the padding ids from being sampled.
    """

    def __init__(self, model: GPT, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                 generator: torch.Generator | None = None, use_cache: bool = True, stop_token: int | None = None,
                 vocab_size: int | None = None):
        self.decoder = Decoder(model, idx, use_cache=use_cache)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.stop_token = stop_token
        self.vocab_size = vocab_size
        self.finish_reasons: list[str | None] = [None] * idx.size(0)
        self.steps = 0

    def finish(self, row: int, reason: str) -> None:
        """End a row that is still running (a row that has ended keeps its first reason)."""
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    @torch.inference_mode()
    def __iter__(self):
        while self.steps < self.max_new_tokens and None in self.finish_reasons:
            logits = self.decoder.logits()
            if self.vocab_size and self.vocab_size < logits.size(-1):
                logits = logits[:, :self.vocab_size]
            column = sample_next(logits, self.temperature, self.top_k, self.top_p, self.generator)
            self.decoder.append(column)
            self.steps += 1
            if self.stop_token is not None:  # the rows are only read back when a token can end them
                for row, token in enumerate(column[:, 0].tolist()):
                    if token == self.stop_token:
                        self.finish(row, "eot")
            yield column
        for row in range(len(self.finish_reasons)):
            self.finish(row, "length")
