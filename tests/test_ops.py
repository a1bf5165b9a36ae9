"""The model's kernels against torch's: cpu's chunked cross-entropy and RMSNorm, forward and backward."""

import pytest
import torch
from torch.nn import functional as F

from nanogpt_cli import ops
from nanogpt_cli.ops import cross_entropy


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


def test_the_chunked_cross_entropy_on_edge_cases_is_f_cross_entropy():
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_is_torchs_forward_and_backward(dtype, with_weight):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 32) * 4 + 1).to(dtype).requires_grad_()
    weight = torch.randn(32).requires_grad_() if with_weight else None
    grad = torch.randn(3, 5, 32).to(dtype)
    results = []
    for norm in (ops.rms_norm, lambda x, w, eps: F.rms_norm(x.float(), (32,), w, eps).to(dtype)):
        x.grad = None
        if weight is not None:
            weight.grad = None
        y = norm(x, weight, 1e-6)
        y.backward(grad)
        results.append((y, x.grad, None if weight is None else weight.grad))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert results[0][0].dtype == dtype
    for ours, torchs in zip(results[0], results[1], strict=True):
        if ours is not None:
            torch.testing.assert_close(ours, torchs, **tol)
