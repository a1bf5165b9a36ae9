"""Decoding: the KV cache against full forwards (rebuilds past block_size included), the sampling filters,
per-row stopping, and the loop giving what `ngpt sample` prints for a seed."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli import ops
from nanogpt_cli.checkpoint import FORMAT
from nanogpt_cli.cli import app
from nanogpt_cli.generate import BatchDecoder, Generation, KVCache, Request, sample_next
from nanogpt_cli.model import GPT, GPTConfig
from tests.test_model import MODERN, tiny

# ---------------------------------------------------------------- the KV cache


# the cache against full forwards for GPT-2, and for every modern option at once (rotary positions: the cached
# keys are rotated by their own positions, a step's query by the cache's position); projections not zero-initialised,
# which would leave attention out of the logits
OPTIONS = {"gpt2": {}, "modern": MODERN}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_kv_cache_matches_full_forward_at_every_step(options):
    model = tiny(block_size=32, **{**options, "zero_init_proj": False})
    idx = torch.randint(50, (2, 5))
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    logits, _ = model(idx, kv_cache=cache)
    for _ in range(10):
        full, _ = model(idx)
        torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
        logits, _ = model(nxt, kv_cache=cache)
    chunk = torch.randint(50, (2, 3))  # a multi-token chunk after a filled cache
    logits, _ = model(chunk, kv_cache=cache, all_logits=True)
    full, _ = model(torch.cat([idx, chunk], 1), all_logits=True)
    torch.testing.assert_close(logits, full[:, -3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("prompt_len", [3, 12])  # a short prompt, and one longer than block_size
def test_cached_logits_equal_a_full_forward_at_every_step_across_rebuilds(prompt_len, options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{"block_size": 8, "vocab_size": 50, "n_layer": 2, "n_head": 2, "n_embd": 16, "bias": True,
                             **options, "zero_init_proj": False})).eval()
    decoder = BatchDecoder(model, 2)
    request = Request(torch.randint(50, (2, prompt_len)), 30)
    decoder.add(request)
    windows = []
    with torch.inference_mode():
        for _ in range(30):  # far past block_size: the cache is rebuilt several times
            logits = decoder.logits()[request]
            window = request.idx[:, request.start:]
            assert 1 <= window.size(1) <= 8 and decoder.cache.lengths.tolist() == [window.size(1)] * 2
            full, _ = model(window)  # a full forward over the same context window, no cache
            torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=1e-5)
            windows.append(window.size(1))
            request.append(logits.argmax(-1, keepdim=True))
    assert decoder.rebuilds >= 5 and request.idx.size(1) == prompt_len + 30
    assert 4 in windows and 8 in windows  # rebuilt from half a block, then grown to a full block
    with torch.inference_mode():  # without the cache: always the last block_size tokens
        recompute = BatchDecoder(model, 2, use_cache=False)
        again = Request(request.idx, 1)
        recompute.add(again)
        torch.testing.assert_close(recompute.logits()[again], model(request.idx[:, -8:])[0][:, -1])
        assert again.start == request.idx.size(1) - 8


def test_decoding_steps_run_the_decoding_step_and_only_prefills_and_rebuilds_the_forward(monkeypatch):
    from nanogpt_cli.model import DecodingStep

    model = tiny(block_size=8)
    forwards, steps = [], []
    forward, step = GPT.forward, DecodingStep.__call__
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **k: forwards.append(idx.size(1)) or forward(
        self, idx, *a, **k))
    monkeypatch.setattr(DecodingStep, "__call__", lambda self, idx, cache: steps.append(1) or step(self, idx, cache))
    tokens = list(model.generate(torch.randint(50, (2, 3)), 12, temperature=0))
    # 12 tokens: the prompt's prefill, two rebuilds of half the block (each time the rows reach block_size),
    # and nine decoding steps in between, none of them through the forward
    assert len(tokens) == 12 and forwards == [3, 4, 4] and len(steps) == 9


def test_generation_with_and_without_cache_agree_greedily_past_block_size():
    model = tiny(block_size=8)
    idx = torch.randint(50, (1, 4))
    cached = torch.cat(list(model.generate(idx, 6, temperature=0)), 1)
    full = torch.cat(list(model.generate(idx, 6, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, full)  # within block_size the two paths are the same computation
    long = torch.cat(list(model.generate(idx, 30, temperature=0)), 1)
    assert long.shape == (1, 30)


def test_cache_and_recompute_agree_within_the_block():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(50, (3, 5))
    runs = [torch.cat(list(model.generate(idx, 40, temperature=0.9, top_k=20, generator=torch.Generator()
                                          .manual_seed(3), use_cache=c)), 1) for c in (True, False)]
    assert torch.equal(*runs)


@pytest.mark.gpu
def test_on_cuda_the_cache_matches_a_full_forward(monkeypatch):
    # fp32 matmuls in full precision: a Trainer earlier in the session turns TF32 on for the process, and TF32
    # rounds differently for a one-token step than for a full forward (1e-4 apart, past this test's tolerance)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    idx = torch.randint(0, 50, (3, 24), device="cuda")
    with torch.inference_mode():
        cache = KVCache(model.config, 3, "cuda")
        model(idx[:, :10], kv_cache=cache)
        for t in range(10, 24):
            step, _ = model(idx[:, t:t + 1], kv_cache=cache)
            full, _ = model(idx[:, :t + 1])
            torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- sampling filters


@pytest.fixture(params=["native", "torch"])
def draw(request, monkeypatch):
    """Each sampling test twice: float32 logits on the CPU drawn in the native kernel (`ops.sample`; torch's ops
    where it cannot be built), then in torch's ops."""
    if request.param == "torch":
        monkeypatch.setattr(ops, "sample", lambda *args: None)
    return request.param


def test_sample_next_strategies(draw):
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [[3], [0]]  # greedy
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)], 1)
    assert set(picks[0].tolist()) == {2, 3} and set(picks[1].tolist()) == {0, 1}
    # probabilities 0.032 0.087 0.237 0.644: top_p 0.8 keeps {3, 2} (mass 0.88), 0.6 and 0.5 keep {3}, 1.0 all
    for top_p, expected in ((0.5, {3}), (0.6, {3}), (0.8, {2, 3}), (0.95, {1, 2, 3}), (1.0, {0, 1, 2, 3})):
        picks = {sample_next(logits[:1], 1.0, top_p=top_p, generator=g).item() for _ in range(400)}
        assert picks == expected, top_p
    # a low temperature sharpens: token 3 nearly always
    cold = [sample_next(logits[:1], 0.1, generator=g).item() for _ in range(100)]
    assert cold.count(3) >= 99


def test_top_k_draws_among_the_k_largest_with_the_masked_distribution(draw):
    # drawing among the top-k's own softmax is nanoGPT's draw (the others masked to -inf) by another route:
    # the same probabilities, read off 40,000 draws of each
    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 2
    k, draws = 5, 40_000
    v, _ = torch.topk(logits, k)
    masked = logits.masked_fill(logits < v[:, [-1]], -float("inf")).softmax(-1)[0]
    g = torch.Generator().manual_seed(1)
    picks = sample_next(logits.expand(draws, -1), 1.0, top_k=k, generator=g)[:, 0]
    counts = torch.bincount(picks, minlength=300).float() / draws
    assert set(picks.unique().tolist()) == set(masked.nonzero()[:, 0].tolist())
    torch.testing.assert_close(counts, masked, atol=0.01, rtol=0)
    # top-p after top-k keeps the smallest head of the k whose mass reaches top_p
    probs = v.softmax(-1)[0]
    keep = int((probs.cumsum(0) - probs < 0.7).sum())
    picks = set(sample_next(logits.expand(2000, -1), 1.0, top_k=k, top_p=0.7, generator=g)[:, 0].tolist())
    head = torch.topk(logits, keep).indices[0].tolist()
    assert picks <= set(head) and head[0] in picks


def test_top_k_keeps_the_logits_tied_with_the_kth(draw):
    # as masking below the k-th value does (nanoGPT, Hugging Face): bf16 logits tie often
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([sample_next(logits, 3.0, top_k=3, generator=g) for _ in range(3000)], 1)
    assert set(picks[0].tolist()) == {0, 1, 2, 3, 4}  # the three 3.0s all stay in
    assert set(picks[1].tolist()) == {0, 1, 2}  # a row with no tie keeps its own k


def test_padding_ids_past_vocab_size_are_never_sampled(draw):
    model = tiny()
    generation = Generation(model, torch.zeros(4, 1, dtype=torch.long), 20, temperature=2.0, vocab_size=5,
                            generator=torch.Generator().manual_seed(0))
    tokens = torch.cat(list(generation), 1)
    assert tokens.shape == (4, 20) and int(tokens.max()) < 5 and len(tokens.unique()) == 5


# ---------------------------------------------------------------- stopping, row by row


def test_each_row_ends_at_the_stop_token_and_the_batch_once_every_row_has():
    torch.manual_seed(5)
    model = GPT(GPTConfig(block_size=8, vocab_size=6, n_layer=1, n_head=2, n_embd=8)).eval()
    generation = Generation(model, torch.zeros(4, 2, dtype=torch.long), 200, generator=torch.Generator().manual_seed(1),
                            stop_token=2)
    tokens = torch.cat(list(generation), 1)
    assert generation.finish_reasons == ["eot"] * 4 and tokens.size(1) == generation.steps < 200
    ends = [row.index(2) for row in tokens.tolist()]  # the step at which each row sampled the stop token
    assert max(ends) == generation.steps - 1 and len(set(ends)) > 1  # rows ended apart; the last one ended it
    assert torch.equal(tokens, torch.cat(list(model.generate(torch.zeros(4, 2, dtype=torch.long), 200, generator=
                                                             torch.Generator().manual_seed(1), stop_token=2)), 1))
    short = Generation(model, torch.zeros(4, 2, dtype=torch.long), min(ends) + 1,
                       generator=torch.Generator().manual_seed(1), stop_token=2)
    list(short)
    assert short.finish_reasons == ["eot" if end == min(ends) else "length" for end in ends]


def test_the_caller_ends_rows_and_a_row_keeps_its_first_reason():
    model = tiny()
    generation = Generation(model, torch.randint(50, (3, 4)), 30, temperature=0)
    for _ in generation:
        if generation.steps == 2:
            generation.finish(0, "stop")
        if generation.steps == 5:
            generation.finish(1, "stop")
            generation.finish(0, "later")
    assert generation.steps == 30 and generation.finish_reasons == ["stop", "stop", "length"]
    generation = Generation(model, torch.randint(50, (2, 4)), 30, temperature=0)
    for _ in generation:
        generation.finish(generation.steps % 2, "stop")  # row 1 at the first step, row 0 at the second
    assert generation.steps == 2 and generation.finish_reasons == ["stop", "stop"]


# ---------------------------------------------------------------- the loop is what `ngpt sample` runs


@pytest.mark.parametrize("use_cache", ["--use_cache", "--no-use_cache"])
def test_the_loop_gives_what_ngpt_sample_prints_for_a_seed(tmp_path, use_cache):
    """A char model whose table is padded past its vocabulary (20 -> 32), decoded past block_size."""
    chars = list("abcdefghij klmnop.\n:")
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config).eval()
    torch.save({"format": FORMAT, "model": model.state_dict(), "model_args": asdict(config),
                "meta": {"tokenizer": "char", "itos": chars, "vocab_size": len(chars)}}, tmp_path / "ckpt.pt")
    result = CliRunner().invoke(app, ["sample", f"--out_dir={tmp_path}", "--device=cpu", "--dtype=float32", "--json",
                                      "--prompt=ab:", "--num_samples=3", "--max_new_tokens=30", "--temperature=0.9",
                                      "--top_k=12", "--seed=5", use_cache])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)["samples"]
    prompt = torch.tensor([[chars.index(c) for c in "ab:"]] * 3)
    columns = Generation(model, prompt, 30, temperature=0.9, top_k=12, generator=torch.Generator().manual_seed(5),
                         use_cache=use_cache == "--use_cache", vocab_size=len(chars))
    tokens = torch.cat(list(columns), 1).tolist()
    assert printed == ["ab:" + "".join(chars[t] for t in row) for row in tokens]


# ---------------------------------------------------------------- the batch: requests of their own lengths


def decode_rows_of_their_own_lengths(model, cache: KVCache, steps: int) -> None:
    """Prefill rows 0-2 of a 4-row cache with prompts of 2, 7 and 4 tokens, then decode `steps` tokens with row 3
    free and sitting the steps out, each row's logits checked against its own full forward."""
    prompts = [torch.randint(50, (1, length)) for length in (2, 7, 4)]
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            model(prompt, kv_cache=cache.rows(slice(row, row + 1)))
        assert cache.lengths.tolist() == [2, 7, 4, 0]
        frozen = torch.tensor([False, False, False, True])
        for _ in range(steps):
            nxt = torch.randint(50, (4, 1))
            logits, _ = model(nxt, kv_cache=cache.rows(slice(0, 4), frozen))
            for row in range(3):
                prompts[row] = torch.cat([prompts[row], nxt[row:row + 1]], 1)
                full, _ = model(prompts[row])
                torch.testing.assert_close(logits[row], full[0], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [2 + steps, 7 + steps, 4 + steps, 0]  # the frozen row kept its length


def test_rows_at_different_lengths_give_each_its_own_full_forward_logits():
    model = tiny(block_size=32)
    decode_rows_of_their_own_lengths(model, KVCache(model.config, 4, "cpu"), steps=5)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_no_row_reads_cache_memory_that_nothing_wrote_or_zeroed(monkeypatch, chunk):
    """The buffer starts uninitialised (here: NaN everywhere but the spare position) and is zeroed ahead of the
    writes: a row shorter than the longest, whose masked positions are below the longest row's, still gets its
    own full forward's logits, with the frontier a position ahead (chunk 1) or further."""
    allocate = KVCache._allocate

    def poisoned(self, dtype):
        allocate(self, dtype)
        self.buffer[:, :, :, :, :self.block_size].fill_(float("nan"))

    monkeypatch.setattr(KVCache, "_allocate", poisoned)
    monkeypatch.setattr(KVCache, "ZERO_CHUNK", chunk)
    model = tiny(block_size=32, zero_init_proj=False)
    cache = KVCache(model.config, 4, "cpu")
    decode_rows_of_their_own_lengths(model, cache, steps=6)
    assert cache.zeroed >= 13 and (chunk > 1 or cache.zeroed == 13)  # the longest row's 13 positions, no more
    assert torch.isnan(cache.buffer[:, :, :, :, cache.zeroed:cache.block_size]).all()  # never touched


def test_greedy_output_is_the_same_alone_and_in_a_batch_of_other_prompts():
    """Prompts of different lengths (one longer than block_size) join a 5-slot batch at different steps, decode past
    block_size (each request rebuilds its rows on its own) and leave when done."""
    model = tiny(block_size=16)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(50, (1, length), generator=generator) for length in (3, 7, 20, 1, 11)]
    lengths = [40, 25, 40, 33, 40]
    alone = [torch.cat(list(Generation(model, p, n, temperature=0)), 1) for p, n in zip(prompts, lengths, strict=True)]
    decoder = BatchDecoder(model, 5)
    requests = [Request(p, n, temperature=0) for p, n in zip(prompts, lengths, strict=True)]
    waiting, step, sizes = list(requests), 0, set()
    while waiting or decoder.requests:
        if waiting and step % 3 == 0:
            assert decoder.add(waiting.pop(0))
        sizes.add(len(decoder.step()))
        decoder.retire()
        step += 1
    for prompt, request, expected in zip(prompts, requests, alone, strict=True):
        assert torch.equal(request.idx[:, prompt.size(1):], expected)
        assert request.finish_reasons == ["length"]
    assert {1, 5} <= sizes and decoder.rebuilds >= 5 and all(decoder.free)


def test_each_request_samples_with_its_own_parameters_and_generator():
    model = tiny(block_size=16)
    settings = [dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.8), dict(temperature=1.3)]

    def make(i, n):
        return Request(torch.full((n, 2 + i), i), 20, generator=torch.Generator().manual_seed(i), **settings[i])

    alone = []
    for i, n in enumerate((2, 1, 3)):
        decoder = BatchDecoder(model, n)
        decoder.add(request := make(i, n))
        while not request.done:
            decoder.step()
        alone.append(request.idx)
    decoder = BatchDecoder(model, 6)
    together = [make(i, n) for i, n in enumerate((2, 1, 3))]
    for request in together:
        assert decoder.add(request)
    assert [r.rows for r in together] == [slice(0, 2), slice(2, 3), slice(3, 6)]
    assert not decoder.add(make(0, 1))  # every row is taken
    while decoder.requests:
        decoder.step()
        decoder.retire()
    assert all(torch.equal(a, b.idx) for a, b in zip(alone, together, strict=True))


def test_a_request_joins_the_first_free_rows_next_to_each_other():
    decoder = BatchDecoder(tiny(), 4)
    first, second, third = (Request(torch.zeros(n, 1, dtype=torch.long), 3) for n in (1, 2, 1))
    assert decoder.add(first) and decoder.add(second) and decoder.add(third)
    second.finish(0, "stop")
    second.finish(1, "stop")
    assert decoder.retire() == [second] and decoder.free == [False, True, True, False]
    wide = Request(torch.zeros(3, 1, dtype=torch.long), 3)
    assert not decoder.add(wide)  # two free rows, not three
    pair = Request(torch.zeros(2, 1, dtype=torch.long), 3)
    assert decoder.add(pair) and pair.rows == slice(1, 3)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.add(Request(torch.zeros(5, 1, dtype=torch.long), 3))
