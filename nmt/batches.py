"""Id arrays → length-bucketed token batches.

Sentences are sorted by length (with random tie-breaking from the epoch's seed) and cut into
batches of about `batch_tokens` real target tokens, so a batch holds sentences of nearly equal
length and almost no padding; then the order of the batches is shuffled. The same seed and epoch
always give the same batches, which is what makes an interrupted run resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nmt.subword import BOS_ID, EOS_ID, PAD_ID, EncodedSplit


@dataclass
class Batch:
    src_ids: torch.Tensor  # (batch, src_len) padded with PAD_ID
    src_lens: torch.Tensor  # (batch,)
    tgt_in: torch.Tensor  # (batch, tgt_len + 1): BOS y_1 ... y_n
    tgt_out: torch.Tensor  # (batch, tgt_len + 1): y_1 ... y_n EOS
    indices: np.ndarray  # positions of these sentences in the split

    @property
    def num_tgt_tokens(self) -> int:
        return int((self.tgt_out != PAD_ID).sum())

    def to(self, device) -> Batch:
        return Batch(self.src_ids.to(device), self.src_lens.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.indices)


def token_batches(
    split: EncodedSplit, batch_tokens: int, seed: int, epoch: int, max_len: int = 0,
    shuffle: bool = True,
) -> list[np.ndarray]:
    """Index arrays of the batches of one epoch. Pairs with a side over max_len (if > 0) and pairs
    with an empty side are left out (SentencePiece can turn a line into zero pieces)."""
    src_lens, tgt_lens = split.src_lengths, split.tgt_lengths
    keep = (src_lens > 0) & (tgt_lens > 0)
    if max_len > 0:
        keep &= (src_lens <= max_len) & (tgt_lens <= max_len)
    indices = np.flatnonzero(keep)
    rng = np.random.default_rng([seed, epoch])
    tie_break = rng.random(len(indices)) if shuffle else np.arange(len(indices))
    # Sort by target length, then source length, ties broken at random (np.lexsort: last key first).
    order = indices[np.lexsort((tie_break, src_lens[indices], tgt_lens[indices]))]
    cost = tgt_lens[order] + 1  # + EOS: real target tokens
    batches, start, total = [], 0, 0
    for i, c in enumerate(cost):
        if total + c > batch_tokens and i > start:
            batches.append(order[start:i])
            start, total = i, 0
        total += c
    if start < len(order):
        batches.append(order[start:])
    if shuffle:
        rng.shuffle(batches)
    return batches


def sentence_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Inference batches: sorted by length so that little is padded; the caller restores order."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(sequences: list[np.ndarray], prefix: int | None = None, suffix: int | None = None):
    extra = (prefix is not None) + (suffix is not None)
    lengths = [len(s) + extra for s in sequences]
    out = torch.full((len(sequences), max(lengths)), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(sequences):
        parts = ([prefix] if prefix is not None else []) + list(seq) + ([suffix] if suffix is not None else [])
        out[row, : len(parts)] = torch.as_tensor(parts, dtype=torch.long)
    return out, torch.as_tensor(lengths, dtype=torch.long)


def collate(split: EncodedSplit, indices: np.ndarray) -> Batch:
    src_ids, src_lens = pad([split.src(i) for i in indices])
    tgt_in, _ = pad([split.tgt(i) for i in indices], prefix=BOS_ID)
    tgt_out, _ = pad([split.tgt(i) for i in indices], suffix=EOS_ID)
    return Batch(src_ids, src_lens, tgt_in, tgt_out, indices)
