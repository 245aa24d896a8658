"""nmt.output's loss computes what F.cross_entropy over F.linear computes, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from nmt import output as loss_module
from nmt.output import projected_cross_entropy


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_cross_entropy_over_linear(monkeypatch, label_smoothing, with_bias):
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 64)  # several chunks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(150, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 40, (150,))
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets, label_smoothing=label_smoothing)
    expected_grads = torch.autograd.grad(2.5 * expected, inputs)
    got = projected_cross_entropy(hidden, weight, bias, targets, label_smoothing)
    got_grads = torch.autograd.grad(2.5 * got, inputs)

    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
    with torch.no_grad():
        torch.testing.assert_close(projected_cross_entropy(hidden, weight, bias, targets, label_smoothing),
                                   expected)


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    expected = F.cross_entropy(F.linear(hidden, weight), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = projected_cross_entropy(hidden, weight, None, targets)
    (grad,) = torch.autograd.grad(got, [weight])
    (expected_grad,) = torch.autograd.grad(expected, [weight])
    assert got.dtype == torch.float32
    assert abs(got.detach().item() - expected.detach().item()) < 0.02 * expected.detach().item()
    assert grad.dtype == torch.float32
    assert float((grad - expected_grad).abs().max()) < 0.02 * float(expected_grad.abs().max())
