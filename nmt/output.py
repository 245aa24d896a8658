"""The output layer: p(y_i | ...) = softmax(V t_i + b), its training loss and its search form.

One module owns the vocabulary projection V (the decoder's `output`, an nn.Linear so that its
weights keep their names in checkpoints and can be tied to the target embeddings):

    loss = output.loss(t, targets, label_smoothing)    # training: t (tokens, size) → scalar
    weight, bias = output.padded(dtype)                # once per search (SearchWeights)
    log_probs = output.log_probs(t, weight, bias)      # a search step: (batch, vocab)

The loss is `F.cross_entropy(F.linear(t, V, b).float(), targets, label_smoothing=...)` computed a
chunk of tokens at a time. The plain form keeps (tokens × vocabulary) logits, their fp32 copy,
the log-softmax and, in the backward pass, two gradients of that size: for a 3,000-token batch
and 4k output pieces about 50 MB each, most of the training step's peak memory. Here the
gradient of each chunk of 1,024 tokens is computed right after its loss, in the forward pass, and
only the gradients of the inputs are kept (the "fused linear cross-entropy" of Liger-Kernel and
others). The matrix products are the same three, in the same precision (the autocast dtype), and
the softmax is in fp32.

Both forms compute their logits over a vocabulary padded to a multiple of 32 rows (`padded_output`):
MKL's sgemm runs odd-width outputs at about half speed (bench/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmt.device import autocast_dtype

CHUNK_TOKENS = 1024
OUTPUT_ROWS_MULTIPLE = 32


class OutputLayer(nn.Linear):
    """V t + b over the output vocabulary (nmt.subword.OutputVocabulary), with its loss."""

    def loss(self, t: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean (label-smoothed) cross-entropy of t (tokens, size) against targets (tokens,)."""
        return projected_cross_entropy(t, self.weight, self.bias, targets, label_smoothing)

    def padded(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights for search's steps (no gradients), made anew at each call: see
        padded_output. A search makes them once (nmt.model.SearchWeights); a cache here, keyed on
        the weights' version counter, went stale after torch's fused Adam, which updates the
        weights in place without counting a version."""
        return padded_output(self.weight, self.bias, dtype)

    def log_probs(self, t: torch.Tensor, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y_i | ...) from t (batch, size) → (batch, vocab), in fp32 at least; with the
        padded weight and bias of `padded` when given (search), else the layer as it is."""
        logits = self(t) if weight is None else F.linear(t, weight, bias)  # (batch, [padded] vocab)
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return log_probs[:, : self.out_features]


def padded_output(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None):
    """The projection weight (vocab, size) and bias with rows of zeros (and a bias of -inf) added
    up to a multiple of 32 outputs, detached and optionally cast: (padded, size), (padded,). The
    extra logits are -inf: probability exactly 0, cut off by the callers."""
    vocab = weight.size(0)
    padded = -(-vocab // OUTPUT_ROWS_MULTIPLE) * OUTPUT_ROWS_MULTIPLE
    weight = weight.detach() if dtype is None else weight.detach().to(dtype)
    pad_weight = weight.new_zeros(padded - vocab, weight.size(1))
    bias = weight.new_zeros(vocab) if bias is None else bias.detach().to(weight.dtype)
    pad_bias = weight.new_full((padded - vocab,), float("-inf"))
    return torch.cat([weight, pad_weight]), torch.cat([bias, pad_bias])


def projected_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over tokens of the (label-smoothed) cross-entropy of softmax(hidden W^T + b).
    hidden (tokens, size), weight (vocab, size), bias (vocab,) or None, targets (tokens,)."""
    dtype = autocast_dtype(hidden.device) or weight.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ProjectedCrossEntropy.apply(hidden, weight, bias, targets, label_smoothing, dtype)
    total, _ = _chunks(hidden, weight, bias, targets, label_smoothing, dtype, with_grads=False)
    return total / max(1, targets.numel())


class _ProjectedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_smoothing, dtype):
        total, grads = _chunks(hidden, weight, bias, targets, label_smoothing, dtype, with_grads=True)
        ctx.save_for_backward(*grads)
        ctx.has_bias, ctx.tokens = bias is not None, max(1, targets.numel())
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return total / ctx.tokens

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss / ctx.tokens
        return ((grad_hidden * scale).to(ctx.hidden_dtype), (grad_weight * scale).to(ctx.weight_dtype),
                (grad_bias * scale).to(ctx.weight_dtype) if ctx.has_bias else None, None, None, None)


def _chunks(hidden, weight, bias, targets, label_smoothing, dtype, with_grads: bool):
    """Sum of the token losses and, with_grads, the gradients of that sum with respect to hidden,
    weight and bias (zeros for a missing bias)."""
    device_type = hidden.device.type
    vocab = weight.size(0)
    w, b = padded_output(weight, bias, dtype)  # (padded, size), (padded,): extra logits are -inf
    x_all = hidden.detach().to(dtype)
    wide = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
    total = torch.zeros((), dtype=wide, device=hidden.device)
    grad_hidden = torch.empty_like(x_all) if with_grads else None
    grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if with_grads else None
    grad_bias = torch.zeros(vocab, dtype=wide, device=weight.device) if with_grads else None
    with torch.autocast(device_type, enabled=False):
        for start in range(0, x_all.size(0), CHUNK_TOKENS):
            x = x_all[start : start + CHUNK_TOKENS]
            gold = targets[start : start + CHUNK_TOKENS]
            # rounded to the compute dtype, as F.linear's output under autocast is
            logits = torch.addmm(b, x, w.t()).to(wide)  # (chunk, padded)
            log_probs = torch.log_softmax(logits, dim=1)
            del logits
            nll = -log_probs.gather(1, gold.unsqueeze(1)).squeeze(1)
            if label_smoothing > 0:  # the smoothed share: mean over the vocabulary of -log p
                nll = (1 - label_smoothing) * nll - label_smoothing * log_probs[:, :vocab].mean(dim=1)
            total += nll.sum()
            if not with_grads:
                continue
            # d loss / d logits = softmax - (1 - eps) onehot(gold) - eps / vocab; 0 on the padding
            grad = log_probs.exp_()
            if label_smoothing > 0:
                grad[:, :vocab].sub_(label_smoothing / vocab)
            rows = torch.arange(gold.numel(), device=gold.device)
            grad[rows, gold] -= 1 - label_smoothing
            grad = grad[:, :vocab]
            grad_bias += grad.sum(dim=0)
            grad = grad.to(dtype)
            grad_hidden[start : start + CHUNK_TOKENS] = grad @ w[:vocab]
            grad_weight += (grad.t() @ x).to(wide)
    grads = (grad_hidden, grad_weight, grad_bias) if with_grads else None
    return total, grads
