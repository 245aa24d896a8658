"""Attention: additive (Bahdanau), dot and general (Luong), all with one signature.

Each module first projects the encoder states into keys once per batch (`project_keys`), then
scores one decoder query per step against them and returns the attention weights:

    weights = attention(query, keys, src_mask)
    # query (batch, query_size), keys (batch, src_len, *), src_mask (batch, src_len) bool
    # weights (batch, src_len): rows sum to 1, padding gets 0

The decoder takes the weighted sum of whatever it needs (the encoder states for the context, or
their projections into its gates; see model.Decoder). The fixed-context baseline
(`attention: none`) has no module at all.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the real source positions, in fp32 even under bf16 autocast."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    return torch.softmax(scores.masked_fill(~src_mask, float("-inf")), dim=-1)


class AdditiveAttention(nn.Module):
    """Bahdanau, Cho & Bengio (2015), eq. (6) and appendix A.1.2: e_ij = v^T tanh(W s + U h_j).

    U h_j does not depend on the decoder step, so `project_keys` computes it once per batch.
    The scores are computed as 2 v^T sigmoid(2 (W s + U h_j)): tanh(x) = 2 sigmoid(2x) - 1, and
    the -1 adds the same -sum(v) to every score of a row, which the softmax takes away. The
    weights are the same; torch's sigmoid runs about 4x faster than its tanh on an AVX2 CPU, and
    this is the largest elementwise operation of a decoder step (batch x src_len x attention).
    """

    def __init__(self, query_size: int, enc_size: int, attention_size: int):
        super().__init__()
        self.key_proj = nn.Linear(enc_size, attention_size, bias=False)  # U
        self.query_proj = nn.Linear(query_size, attention_size, bias=True)  # W (+ bias)
        self.energy = nn.Linear(attention_size, 1, bias=False)  # v

    def project_keys(self, enc_states: torch.Tensor) -> torch.Tensor:
        return 2 * self.key_proj(enc_states)  # (batch, src_len, attention_size): 2 U h_j

    def forward(self, query, keys, src_mask):
        query = 2 * self.query_proj(query).unsqueeze(1)  # (batch, 1, attention): 2 (W s + b)
        scores = _AdditiveScores.apply(keys, query, self.energy.weight.squeeze(0))  # (batch, src_len)
        return masked_softmax(scores, src_mask)


class _AdditiveScores(torch.autograd.Function):
    """scores = 2 v^T sigmoid(keys + query): keys (batch, src_len, a), query (batch, 1, a), v (a,).

    Autograd would keep sigmoid(keys + query), batch x src_len x a values, for every decoder step
    until the backward pass: the largest share of a training batch's memory. The backward pass
    recomputes it instead (one add and one sigmoid), which costs far less time than the memory.
    """

    @staticmethod
    def forward(ctx, keys, query, v):
        ctx.save_for_backward(keys, query, v)
        return 2 * torch.matmul(torch.sigmoid(keys + query), v.to(keys.dtype))

    @staticmethod
    def backward(ctx, grad_scores):
        keys, query, v = ctx.saved_tensors
        hidden = torch.sigmoid(keys + query)  # (batch, src_len, a), recomputed
        grad_scores = 2 * grad_scores.to(hidden.dtype)  # (batch, src_len)
        grad_v = torch.matmul(grad_scores.reshape(1, -1), hidden.reshape(-1, hidden.size(-1))).view(-1)
        # d sigmoid(x) / dx = y (1 - y): torch's fused kernel for it
        grad_pre = torch.ops.aten.sigmoid_backward(grad_scores.unsqueeze(-1) * v.to(hidden.dtype), hidden)
        return grad_pre.to(keys.dtype), grad_pre.sum(1, keepdim=True).to(query.dtype), grad_v.to(v.dtype)


class DotAttention(nn.Module):
    """Luong, Pham & Manning (2015), eq. (8) "dot": score(h_t, h_s) = h_t^T h_s."""

    def project_keys(self, enc_states: torch.Tensor) -> torch.Tensor:
        return enc_states

    def forward(self, query, keys, src_mask):
        scores = torch.bmm(keys, query.unsqueeze(2).to(keys.dtype)).squeeze(2)  # (batch, src_len)
        return masked_softmax(scores, src_mask)


class GeneralAttention(DotAttention):
    """Luong et al. (2015), eq. (8) "general": score = h_t^T W_a h_s, with W_a h_s precomputed."""

    def __init__(self, query_size: int, enc_size: int):
        super().__init__()
        self.key_proj = nn.Linear(enc_size, query_size, bias=False)  # W_a

    def project_keys(self, enc_states: torch.Tensor) -> torch.Tensor:
        return self.key_proj(enc_states)  # (batch, src_len, query_size)


def build_attention(kind: str, query_size: int, enc_size: int, attention_size: int):
    if kind == "bahdanau":
        return AdditiveAttention(query_size, enc_size, attention_size)
    if kind == "luong-dot":
        return DotAttention()
    if kind == "luong-general":
        return GeneralAttention(query_size, enc_size)
    if kind == "none":
        return None
    raise ValueError(f"unknown attention kind {kind!r}")
