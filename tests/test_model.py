"""The GPT model: shapes, init, weight tying, cropping, optimizer groups, MFU, the two attention forms."""

import math

import pytest
import torch

from nanogpt_cli.model import GPT, GPTConfig


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


def test_the_loss_is_the_cross_entropy_of_the_logits_skipping_ignored_targets():
    model = tiny()
    x, y = torch.randint(50, (3, 16)), torch.randint(50, (3, 16))
    y[:, :4] = -1
    logits, loss = model(x, y)
    want = torch.nn.functional.cross_entropy(logits.view(-1, 50), y.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)


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


@pytest.mark.gpu
def test_on_cuda_sdpa_matches_the_explicit_attention():
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
