"""The GPT model: shapes, init, weight tying, cropping, optimizer groups, KV-cache equivalence."""

import math

import pytest
import torch

from nanogpt_cli.model import GPT, GPTConfig, KVCache, cross_entropy, sample_next


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_forward_shapes_and_initial_loss():
    model = tiny()
    x = torch.randint(50, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3  # untrained: close to uniform
    logits, loss = model(x)
    assert logits.shape == (3, 1, 50) and loss is None


def test_weight_tying_and_residual_init():
    model = tiny(n_layer=4)
    assert model.transformer.wte.weight is model.lm_head.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.003


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 16)
    model(torch.zeros(1, 8, dtype=torch.long))


def test_optimizer_groups_decay_matrices_only():
    model = tiny(bias=False)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_kv_cache_matches_full_forward_at_every_step():
    model = tiny(block_size=32)
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


def test_generation_with_and_without_cache_agree_greedily_past_block_size():
    model = tiny(block_size=8)
    idx = torch.randint(50, (1, 4))
    cached = torch.cat(list(model.generate(idx, 6, temperature=0)), 1)
    full = torch.cat(list(model.generate(idx, 6, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, full)  # within block_size the two paths are the same computation
    long = torch.cat(list(model.generate(idx, 30, temperature=0)), 1)
    assert long.shape == (1, 30)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, temperature=0).item() == 3
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(50)}
    assert picks <= {2, 3}
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert picks == {3}  # the top token alone holds more than half the mass


def test_estimate_mfu():
    model = tiny()
    assert model.estimate_mfu(1000.0, None) is None
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000 / 1e12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_matches_sdpa_with_gradients(dtype):
    """The explicit attention (cpu bf16 training) computes what SDPA does, forward and backward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=32))
    idx = torch.randint(0, 50, (3, 24))
    results = []
    for kind in ("sdpa", "explicit"):
        model.set_attention(kind)
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((logits.float(), [p.grad.clone() for p in model.parameters()]))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(results[0][0], results[1][0], atol=tol, rtol=tol)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert all(block.attn.attention == "explicit" for block in model.transformer.h)
    with pytest.raises(AssertionError):
        model.set_attention("flash")


@pytest.mark.parametrize("vocab, dtype", [(65, torch.float32), (70_000, torch.float32), (50_304, torch.bfloat16)])
def test_the_chunked_cross_entropy_is_f_cross_entropy_forward_and_backward(vocab, dtype):
    """cpu's row-block cross-entropy (one block for a small vocabulary, several for a large one) gives the
    loss and gradient of F.cross_entropy on float32 logits, skips ignore_index, keeps the logits' dtype."""
    torch.manual_seed(0)
    base = torch.randn(37, vocab) * 3
    targets = torch.randint(vocab, (37,))
    targets[::5] = -1
    ours, ref = base.to(dtype).requires_grad_(), base.to(dtype).requires_grad_()
    expected = torch.nn.functional.cross_entropy(ref.float(), targets, ignore_index=-1)
    (expected * 2).backward()
    loss = cross_entropy(ours, targets)
    (loss * 2).backward()
    assert loss.dtype == torch.float32 and ours.grad.dtype == dtype
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), atol=1e-7, rtol=1e-2 if dtype != torch.float32
                               else 1e-5)
    assert (ours.grad[::5] == 0).all()  # ignored rows get no gradient
    every_row_ignored = torch.full((4,), -1)
    assert torch.isnan(cross_entropy(torch.randn(4, 10), every_row_ignored))  # 0 / 0, as F.cross_entropy
    masked = torch.randn(3, 10)
    masked[0] = -float("inf")  # an ignored row may hold anything, -inf included
    masked = masked.requires_grad_()
    loss = cross_entropy(masked, torch.tensor([-1, 2, 5]))
    loss.backward()
    want = torch.nn.functional.cross_entropy(masked[1:].detach(), torch.tensor([2, 5]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.isfinite(masked.grad).all() and (masked.grad[0] == 0).all()
    assert torch.isnan(cross_entropy(torch.randn(0, 10), torch.zeros(0, dtype=torch.long)))  # empty, as F's


@pytest.mark.gpu
def test_on_cuda_sdpa_matches_the_explicit_attention_and_the_cache_matches_a_full_forward(monkeypatch):
    # fp32 matmuls in full precision: a Trainer earlier in the session turns TF32 on for the process, and TF32
    # rounds differently for a one-token step than for a full forward (1e-4 apart, past this test's tolerance)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64)).cuda()
    idx = torch.randint(0, 50, (3, 24), device="cuda")
    results = []
    for kind in ("sdpa", "explicit"):  # bf16 on cuda: SDPA's flash or memory-efficient kernel
        model.set_attention(kind)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((logits.float(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=5e-2, rtol=5e-2)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    model.set_attention("sdpa")
    model.eval()
    with torch.inference_mode():
        cache = KVCache(model.config, 3, "cuda")
        model(idx[:, :10], kv_cache=cache)
        for t in range(10, 24):
            step, _ = model(idx[:, t:t + 1], kv_cache=cache)
            full, _ = model(idx[:, :t + 1])
            torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
