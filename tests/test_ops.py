"""The model's kernels: cpu's chunked cross-entropy against F.cross_entropy, forward and backward."""

import pytest
import torch

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
