"""Decoding: the KV cache, a batch of requests decoded together, sampling filters, and the one loop.

`BatchDecoder` is the decoding engine of `ngpt sample`, `GPT.generate` and `ngpt serve`: it holds a
`KVCache` with one row per slot and decodes every `Request` in it with one forward per step. A
request is n continuations of one prompt with their own sampling parameters, generator and stop
token; it takes n rows next to each other, joins the batch at the next step (its prompt is
prefilled into its rows alone) and leaves it when it is done (continuous batching). Each row of
the cache has its own length, so requests of different lengths share the decoding forward.
`Generation` is the loop over one request that `ngpt sample` and `GPT.generate` run.
"""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from nanogpt_cli import ops
from nanogpt_cli.model import GPT, DecodingStep, GPTConfig


class KVCache:
    """Keys and values of every layer for a batch of rows, each row with its own length (`lengths`).

    The model's forward calls `positions(t)` once at its start (the positions of the t new tokens of
    every row), `update(layer, k, v)` in every layer and `advance(t)` at its end. When every row is at
    the same length the new keys are written as one slice and attention needs no mask (a prefill from
    length 0 is plain causal attention, see `empty`); rows at different lengths take one token each
    and attend through a mask to their own keys only. `rows(r)` is the cache of some rows, the same
    memory; `frozen` rows of it sit a forward out: they write into a spare position past block_size,
    keep their length, and their outputs are to be ignored. The buffer is allocated on the first
    update, in the dtype of the keys (so autocast's bf16 keys are stored as bf16), unless `dtype` is given.
    It is zeroed as the rows reach it, ZERO_CHUNK positions at a time ahead of every write (`positions`):
    a row shorter than the longest attends to positions it never wrote through a mask, which keeps their
    keys out but would let a NaN of uninitialised memory through in a value. Zeroing the whole block up front
    cost GPT-2 124M's `ngpt sample` (10 rows) 0.2 s and 756 MB for a 1024-token block it rarely fills.
    """

    ZERO_CHUNK = 64

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype=None):
        head_size = config.n_embd // config.n_head
        self.block_size = config.block_size
        # one position more than a row can hold: where frozen rows write
        self.shape = (config.n_layer, 2, batch_size, config.n_head, config.block_size + 1, head_size)
        self.device, self.dtype = torch.device(device), dtype
        self.buffer, self.zeroed = None, 0  # positions [0, zeroed) of every row are zeroed or written
        if dtype is not None:
            self._allocate(dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # on the CPU: read without waiting for the device
        self.root, self.row_range, self.frozen, self.key_counts = self, slice(0, batch_size), None, None
        self._begin()

    def _allocate(self, dtype) -> None:
        self.buffer = torch.empty(self.shape, device=self.device, dtype=dtype)
        self.buffer[:, :, :, :, self.block_size].zero_()  # frozen rows' spare position

    def _zero_until(self, end: int) -> None:
        """Zero every row's positions up to end (and a chunk beyond) that nothing has written yet."""
        root = self.root
        if root.buffer is not None and end > root.zeroed:
            stop = min(self.block_size, max(end, root.zeroed + self.ZERO_CHUNK))
            root.buffer[:, :, :, :, root.zeroed:stop].zero_()
            root.zeroed = stop

    def rows(self, row_range: slice, frozen: torch.Tensor | None = None) -> KVCache:
        """The cache of rows row_range (a view: writes go to this cache); frozen (bool, one per row) marks the
        rows that sit the next forward out."""
        view = copy.copy(self)
        view.row_range, view.lengths, view.frozen = row_range, self.lengths[row_range], frozen
        return view

    def _begin(self) -> None:
        lengths = self.lengths if self.frozen is None else self.lengths.masked_fill(self.frozen, 0)
        self.longest = int(lengths.max())  # positions filled in the longest row
        self.aligned = self.frozen is None and bool((lengths == self.longest).all())
        self.empty = self.aligned and self.longest == 0
        self._starts = lengths  # where each row's new tokens go (frozen rows read position 0)

    def positions(self, t: int):
        """Begin a forward of t new tokens per row: their positions, (t,) when every row is at the same length,
        else (B, 1) (rows at different lengths take one token at a time)."""
        self._begin()
        self._zero_until(self.longest + t)  # every write and read of this forward is below longest + t
        self.key_counts = None  # rows at different lengths: the keys each row's one query sees (the mask's)
        if self.aligned:  # a chunk after a filled cache: query i sees the keys up to longest + i
            chunk = t > 1 and not self.empty
            self._mask = torch.ones(t, self.longest + t, dtype=torch.bool, device=self.device).tril(
                diagonal=self.longest) if chunk else None
            return torch.arange(self.longest, self.longest + t, dtype=torch.long, device=self.device)
        assert t == 1, "rows at different lengths take one token each"
        starts = self._starts.to(self.device)
        write = self.lengths.masked_fill(self.frozen, self.block_size) if self.frozen is not None else self.lengths
        self._rows_index, self._write_index = torch.arange(len(starts), device=self.device), write.to(self.device)
        # row b sees its own keys: positions 0..starts[b] once the new one is written
        keys = torch.arange(self.longest + 1, device=self.device)
        self._mask = (keys[None, :] <= starts[:, None])[:, None, None, :]  # (B, 1, 1, longest + 1)
        self.key_counts = starts + 1 if starts.is_cpu else None  # for the CPU's kernel (`ops.one_query_attention`)
        return starts[:, None]

    def update(self, layer: int, k, v):
        """Store k, v (B, nh, T, hs) after each row's filled positions; return every row's keys and values so far
        (B, nh, longest + T, hs) and the attention mask (None: every query sees every key before it)."""
        root = self.root
        if root.buffer is None:
            root._allocate(k.dtype)
            self._zero_until(self.longest + k.size(2))
        keys, values = root.buffer[layer, 0, self.row_range], root.buffer[layer, 1, self.row_range]
        T = k.size(2)
        end = self.longest + T
        if self.aligned:
            keys[:, :, self.longest:end] = k
            values[:, :, self.longest:end] = v
        else:
            keys[self._rows_index, :, self._write_index] = k[:, :, 0]  # (B, nh, hs), each row at its own position
            values[self._rows_index, :, self._write_index] = v[:, :, 0]
        return keys[:, :, :end], values[:, :, :end], self._mask

    def advance(self, t: int) -> None:
        """End a forward: every row that took part is t tokens longer."""
        if self.frozen is None:
            self.lengths += t
        else:
            self.lengths += (~self.frozen).long() * t


class Request:
    """n continuations of one prompt idx (n, T), decoded together by a `BatchDecoder` for up to max_new_tokens
    steps with one set of sampling parameters and one generator.

    Every row runs until it samples stop_token (its finish reason is then "eot") or the caller ends it with
    `finish(row, reason)`, e.g. when a stop string appears in its text. The request is `done` once no row
    runs or after max_new_tokens steps; the decoder then ends the rows still running with "length" when it
    retires the request. A row that has ended still receives a token each step while others of its request
    run (the rows decode as one); those tokens are not its output. `finish_reasons[row]` is None while the
    row runs. `idx` grows by a column each step; the model sees idx[:, start:], at most block_size tokens.
    """

    def __init__(self, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                 generator: torch.Generator | None = None, stop_token: int | None = None):
        self.idx = idx
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.stop_token = stop_token
        self.finish_reasons: list[str | None] = [None] * idx.size(0)
        self.steps = 0
        self.start = 0
        self.rows: slice | None = None  # its rows in the decoder's batch

    @property
    def n(self) -> int:
        return self.idx.size(0)

    @property
    def done(self) -> bool:
        return self.steps >= self.max_new_tokens or None not in self.finish_reasons

    def finish(self, row: int, reason: str) -> None:
        """End a row that is still running (a row that has ended keeps its first reason)."""
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    def append(self, column) -> None:
        """Add the sampled column (n, 1); rows that sampled the stop token end with "eot"."""
        self.idx = torch.cat((self.idx, column), dim=1)
        self.steps += 1
        if self.stop_token is not None:  # the rows are only read back when a token can end them
            for row, token in enumerate(column[:, 0].tolist()):
                if token == self.stop_token:
                    self.finish(row, "eot")


class BatchDecoder:
    """Decode the requests in a batch of `slots` rows together: `add(request)`, then `step()` until it is done.

    With use_cache, a request's first step prefills the last min(T, block_size) tokens of its prompt
    into its rows; later steps feed every request's last token in one forward over the batch (rows of
    different lengths, and free rows and rows that were just prefilled sitting it out). When a request's
    rows are full they are rebuilt: its last block_size // 2 tokens are prefilled again (positions restart
    at 0), so a rebuild costs one half-block forward every block_size // 2 tokens, and the logits always
    equal those of a full forward over idx[:, start:]. Without the cache every step is that full forward,
    over the last block_size tokens, one request at a time (nanoGPT's way). vocab_size, when smaller than
    the model's (padded) table, keeps the padding ids from being sampled.
    """

    def __init__(self, model: GPT, slots: int, use_cache: bool = True, vocab_size: int | None = None):
        self.model, self.slots, self.use_cache, self.vocab_size = model, slots, use_cache, vocab_size
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        self.cache = KVCache(model.config, slots, self.device) if use_cache else None
        # the decoding steps' forward: the model's own, spelled for speed (a compiled model keeps its forward)
        self.decoding_step = DecodingStep(model) if use_cache and isinstance(model, GPT) else (
            lambda tokens, cache: model(tokens, kv_cache=cache)[0])
        self.requests: list[Request] = []
        self.free = [True] * slots
        self.rebuilds = 0

    def add(self, request: Request) -> bool:
        """Let the request join the batch at the next step: False when no n free rows lie next to each other
        (it may join once a request has retired)."""
        if request.n > self.slots:
            raise ValueError(f"a request of {request.n} rows does not fit {self.slots} slots")
        for first in range(self.slots - request.n + 1):
            if all(self.free[first:first + request.n]):
                request.rows = slice(first, first + request.n)
                self.free[request.rows] = [False] * request.n
                if self.cache is not None:
                    self.cache.lengths[request.rows] = 0
                self.requests.append(request)
                return True
        return False

    def retire(self) -> list[Request]:
        """Remove the requests that are done (rows still running end with "length"), freeing their rows."""
        done = [request for request in self.requests if request.done]
        for request in done:
            for row in range(request.n):
                request.finish(row, "length")
            self.free[request.rows] = [True] * request.n
            self.requests.remove(request)
        return done

    @torch.inference_mode()
    def logits(self) -> dict[Request, torch.Tensor]:
        """Next-token logits (n, vocab) of every request in the batch."""
        out = {}
        decoding = []
        for request in self.requests:
            if request.done:  # it leaves at the next retire; its rows sit out
                continue
            T = request.idx.size(1)
            if self.cache is None:
                request.start = max(0, T - self.block_size)
                out[request] = self.model(request.idx[:, request.start:])[0][:, -1, :]
                continue
            length = int(self.cache.lengths[request.rows.start])  # the rows of a request are in step
            if length > 0 and T - request.start <= self.block_size:
                decoding.append(request)  # its last token is the only one not in the cache
                continue
            keep = min(T, self.block_size) if length == 0 else max(1, self.block_size // 2)
            self.rebuilds += length > 0
            self.cache.lengths[request.rows] = 0
            request.start = T - keep
            logits, _ = self.model(request.idx[:, request.start:], kv_cache=self.cache.rows(request.rows))
            out[request] = logits[:, -1, :]
        if decoding:
            first = min(request.rows.start for request in decoding)
            last = max(request.rows.stop for request in decoding)
            if len(decoding) == 1:  # the common case (ngpt sample, a lone request): its rows, no copies
                tokens, frozen = decoding[0].idx[:, -1:], None
            else:
                tokens = torch.zeros(last - first, 1, dtype=torch.long, device=self.device)
                frozen = torch.ones(last - first, dtype=torch.bool)
                for request in decoding:
                    tokens[request.rows.start - first:request.rows.stop - first] = request.idx[:, -1:]
                    frozen[request.rows.start - first:request.rows.stop - first] = False
                frozen = frozen if sum(request.n for request in decoding) < last - first else None
            rows = self.cache.rows(slice(first, last), frozen)
            logits = self.decoding_step(tokens, rows)
            for request in decoding:
                out[request] = logits[request.rows.start - first:request.rows.stop - first, -1, :]
        return out

    @torch.inference_mode()
    def step(self) -> dict[Request, torch.Tensor]:
        """One decoding step of every request that is not done: each gets its sampled column (n, 1)."""
        columns = {}
        for request, logits in self.logits().items():
            if self.vocab_size and self.vocab_size < logits.size(-1):
                logits = logits[:, :self.vocab_size]
            column = sample_next(logits, request.temperature, request.top_k, request.top_p, request.generator)
            request.append(column)
            columns[request] = column
        return columns


MIN_TEMPERATURE = 1e-6


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token (B, 1) from logits (B, vocab): greedy at temperature 0,
    otherwise sampled after temperature, top-k and nucleus (top-p) filtering.

    With top_k the draw is among the k largest logits and those tied with the k-th (the distribution of masking
    the others to -inf, nanoGPT's way, but a softmax and a draw over about k values instead of the vocabulary:
    at GPT-2's 50304 and k 200 that is a millisecond of every decoding step on a CPU). Without top_p, float32 logits
    on the CPU take the same draw in one native call (`ops.sample`)."""
    if top_p is None or top_p >= 1.0:
        picked = ops.sample(logits, temperature if temperature == 0 else max(temperature, MIN_TEMPERATURE), top_k,
                            generator)
        if picked is not None:
            return picked
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    candidates = None  # the vocabulary ids of the columns of logits when they are a subset (top-k)
    if top_k is not None and 0 < top_k < logits.size(-1):
        # sorted, largest first (a temperature keeps the order), and one more: whether the k-th value has a tie
        values, candidates = torch.topk(logits, top_k + 1)
        kth = values[:, top_k - 1:top_k]
        if bool((values[:, top_k:] == kth).any()):  # ties with the k-th value stay in (common in bf16)
            kept = int((logits >= kth).sum(dim=-1).max())
            values, candidates = torch.topk(logits, kept)
            values = values.masked_fill(values < kth, -float("inf"))  # a row with fewer ties keeps its own
        else:  # the common case: no pass over the vocabulary beyond the top-k's own
            values, candidates = values[:, :top_k], candidates[:, :top_k]
        logits = values
    # below MIN_TEMPERATURE float32 division overflows (1e-300 is 0 in float32); sampling there is greedy anyway
    logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, descending=True)
        probs = logits.softmax(dim=-1)
        # keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, -float("inf"))
    choice = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
    return choice if candidates is None else candidates.gather(-1, choice)


class Generation:
    """Extend a batch idx (B, T) by up to max_new_tokens tokens: iterating yields each new column (B, 1).

    The rows are one `Request` (see there for how rows end: the stop token, `finish(row, reason)`, or
    "length" after max_new_tokens steps) decoded by a `BatchDecoder` of B slots, the engine `ngpt serve`
    batches many requests in. With use_cache the prompt is prefilled once and each step feeds one token
    against cached keys and values; without, every step recomputes the last block_size tokens, as nanoGPT does.
    """

    def __init__(self, model: GPT, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                 generator: torch.Generator | None = None, use_cache: bool = True, stop_token: int | None = None,
                 vocab_size: int | None = None):
        self.request = Request(idx, max_new_tokens, temperature, top_k, top_p, generator, stop_token)
        self.decoder = BatchDecoder(model, idx.size(0), use_cache, vocab_size)
        self.decoder.add(self.request)

    @property
    def finish_reasons(self) -> list[str | None]:
        return self.request.finish_reasons

    @property
    def steps(self) -> int:
        return self.request.steps

    def finish(self, row: int, reason: str) -> None:
        self.request.finish(row, reason)

    @torch.inference_mode()
    def __iter__(self):
        while not self.request.done:
            yield self.decoder.step()[self.request]
        self.decoder.retire()
