"""An ensemble of Seq2Seq models that search decodes as it decodes one.

At each step every member reads its own memory and state and gives its distribution over the
shared output vocabulary; the ensemble's is their mean, p(y_i | ...) = 1/N sum_n p_n(y_i | ...),
returned as log-probabilities like a single model's. Its memory and state are the members' side
by side (`Members`), reordered together, so nmt.search needs no change. The members may differ in
architecture (sizes, cell, attention); they must share the source SentencePiece model and the
output vocabulary, which nmt.translate checks before it builds an ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmt.model import SearchWeights, Seq2Seq


@dataclass
class Members:
    """One item per member (its Memory, or its DecoderState), reordered together."""

    items: tuple

    def index_select(self, index: torch.Tensor) -> Members:
        return Members(tuple(item.index_select(index) for item in self.items))

    def narrow(self, length: int) -> Members:
        return Members(tuple(item.narrow(length) for item in self.items))

    def concat(self, other: Members) -> Members:
        return Members(tuple(mine.concat(theirs) for mine, theirs in zip(self.items, other.items)))


class Ensemble(nn.Module):
    def __init__(self, members: list[Seq2Seq]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        self.src_vocab_size = members[0].src_vocab_size
        self.tgt_vocab_size = members[0].tgt_vocab_size

    def search_weights(self) -> tuple[SearchWeights, ...]:
        return tuple(member.search_weights() for member in self.members)

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor,
               weights: tuple[SearchWeights, ...] | None = None) -> tuple[Members, Members]:
        weights = weights if weights is not None else (None,) * len(self.members)
        memories, states = zip(*(member.encode(src_ids, src_lens, w) for member, w in zip(self.members, weights)))
        return Members(memories), Members(states)

    def decode_step(self, prev_ids: torch.Tensor, state: Members, memory: Members):
        """prev_ids (batch,) → log of the members' mean probabilities (batch, vocab), in fp32 at
        least; new state; the mean of the attention weights (batch, src_len) of the members that
        have attention, or None if none has (all fixed context)."""
        log_probs, states, weights = [], [], []
        for member, member_state, member_memory in zip(self.members, state.items, memory.items):
            step_log_probs, member_state, attn = member.decode_step(prev_ids, member_state, member_memory)
            log_probs.append(step_log_probs)  # (batch, vocab)
            states.append(member_state)
            if attn is not None:
                weights.append(attn.float())  # (batch, src_len)
        mixed = mean_of_probabilities(torch.stack(log_probs))
        attn_weights = torch.stack(weights).mean(dim=0) if weights else None  # (batch, src_len)
        return mixed, Members(tuple(states)), attn_weights


def mean_of_probabilities(log_probs: torch.Tensor) -> torch.Tensor:
    """log_probs (members, batch, vocab) → log(mean_n exp(log_probs[n])) (batch, vocab), in fp32 at
    least. Written as m + log(mean exp(x - m)) with m the largest member log-probability rather
    than logsumexp(x) - log N: for identical members every x - m is 0 and the mean of ones is
    exactly 1, so a model ensembled with itself scores exactly as it does alone."""
    log_probs = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))
    top = log_probs.max(dim=0).values  # (batch, vocab)
    # where every member gives probability 0, -inf - -inf would be NaN: shift by 0 there instead
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + torch.log(torch.exp(log_probs - top).mean(dim=0))
