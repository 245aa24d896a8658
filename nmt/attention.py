"""Attention: additive (Bahdanau), dot and general (Luong), and the fixed context, one signature.

Every kind is a module that projects the encoder states into keys once per batch, then, at each
decoder step, turns one query into a context vector and the weights it was made with:

    keys = attention.project_keys(states)            # once per batch (nmt.model.Seq2Seq.encode)
    context, weights = attention(query, memory)      # every step
    # query (batch, decoder_size); memory: keys, values (the encoder states h_j), src_mask, summary
    # context (batch, enc_size); weights (batch, src_len), rows sum to 1, padding gets 0
    # (the fixed context has no weights: None)

and says when it attends (`before_rnn`): Bahdanau attention computes c_i from the previous state
s_{i-1}, and c_i is part of the decoder RNN's input, as the fixed context is; Luong attention
attends after the RNN step, from the new state s_i (see nmt.model.Decoder.recur).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nmt.model import Memory


def masked_softmax(scores: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the real source positions, in fp32 even under bf16 autocast."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    return torch.softmax(scores.masked_fill(~src_mask, float("-inf")), dim=-1)


def weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """c_i = sum_j a_ij h_j: weights (batch, src_len), values (batch, src_len, enc) → (batch, enc)."""
    return torch.bmm(weights.unsqueeze(1).to(values.dtype), values).squeeze(1)


class AdditiveAttention(nn.Module):
    """Bahdanau, Cho & Bengio (2015), eq. (5)-(6) and appendix A.1.2:

        e_ij = v^T tanh(W s_{i-1} + U h_j),   a_ij = softmax_j(e_ij),   c_i = sum_j a_ij h_j

    U h_j does not depend on the decoder step, so `project_keys` computes it once per batch.
    The scores are computed as 2 v^T sigmoid(2 (W s + U h_j)): tanh(x) = 2 sigmoid(2x) - 1, and
    the -1 adds the same -sum(v) to every score of a row, which the softmax takes away. The
    weights are the same; torch's sigmoid runs several times faster than its tanh on an AVX2 CPU
    (bench/README.md), and this is the largest elementwise operation of a decoder step
    (batch x src_len x attention).
    """

    before_rnn = True  # from s_{i-1}; c_i is part of the RNN's input

    def __init__(self, query_size: int, enc_size: int, attention_size: int):
        super().__init__()
        self.key_proj = nn.Linear(enc_size, attention_size, bias=False)  # U
        self.query_proj = nn.Linear(query_size, attention_size, bias=True)  # W (+ bias)
        self.energy = nn.Linear(attention_size, 1, bias=False)  # v

    def project_keys(self, enc_states: torch.Tensor) -> torch.Tensor:
        return 2 * self.key_proj(enc_states)  # (batch, src_len, attention_size): 2 U h_j

    def forward(self, query: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        query = 2 * self.query_proj(query).unsqueeze(1)  # (batch, 1, attention): 2 (W s + b)
        scores = _AdditiveScores.apply(memory.keys, query, self.energy.weight.squeeze(0))  # (batch, src_len)
        weights = masked_softmax(scores, memory.src_mask)
        return weighted_sum(weights, memory.values), weights


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
    """Luong, Pham & Manning (2015), eq. (8) "dot": score(s_i, h_j) = s_i^T h_j, attending after
    the RNN step, from its new state s_i."""

    before_rnn = False

    def project_keys(self, enc_states: torch.Tensor) -> torch.Tensor:
        return enc_states

    def forward(self, query: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.bmm(memory.keys, query.unsqueeze(2).to(memory.keys.dtype)).squeeze(2)  # (batch, src_len)
        weights = masked_softmax(scores, memory.src_mask)
        return weighted_sum(weights, memory.values), weights


class GeneralAttention(DotAttention):
    """Luong et al. (2015), eq. (8) "general": score = s_i^T W_a h_j, with W_a h_j precomputed."""

    def __init__(self, query_size: int, enc_size: int):
        super().__init__()
        self.key_proj = nn.Linear(enc_size, query_size, bias=False)  # W_a

    def project_keys(self, enc_states: torch.Tensor) -> torch.Tensor:
        return self.key_proj(enc_states)  # (batch, src_len, query_size)


class FixedContext(nn.Module):
    """No attention: the baseline of Cho et al. (2014) and Sutskever et al. (2014). Every step
    reads the same context c = [h_fwd_last ; h_bwd_first] (h_last for a unidirectional encoder),
    the encoder's summary of the whole source: the fixed-length bottleneck attention removes. It
    enters the RNN's input at every step (`before_rnn`), whatever the query. No weights."""

    before_rnn = True

    def project_keys(self, enc_states: torch.Tensor) -> None:
        return None

    def forward(self, query: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, None]:
        return memory.summary, None


def build_attention(kind: str, query_size: int, enc_size: int, attention_size: int) -> nn.Module:
    if kind == "bahdanau":
        return AdditiveAttention(query_size, enc_size, attention_size)
    if kind == "luong-dot":
        return DotAttention()
    if kind == "luong-general":
        return GeneralAttention(query_size, enc_size)
    if kind == "none":
        return FixedContext()
    raise ValueError(f"unknown attention kind {kind!r}")
