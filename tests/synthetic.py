"""Synthetic translation tasks that a small model must really learn, trained with nmt's own code."""

from __future__ import annotations

import numpy as np
import torch

from nmt.batches import Batch, pad
from nmt.config import DecodeConfig, ModelConfig
from nmt.model import build_model
from nmt.search import search_corpus
from nmt.subword import BOS_ID, EOS_ID
from nmt.train import train_step

DIGITS = 10  # tokens 4..13
VOCAB = 4 + DIGITS


def random_strings(rng: np.random.Generator, n: int, min_len: int, max_len: int) -> list[list[int]]:
    lengths = rng.integers(min_len, max_len + 1, size=n)
    return [list(rng.integers(4, 4 + DIGITS, size=int(k))) for k in lengths]


def make_batch(sources: list[list[int]], targets: list[list[int]]) -> Batch:
    src_ids, src_lens = pad(sources)
    tgt_in, _ = pad(targets, prefix=BOS_ID)
    tgt_out, _ = pad(targets, suffix=EOS_ID)
    return Batch(src_ids, src_lens, tgt_in, tgt_out, np.arange(len(sources)))


def loss_of(model, batch: Batch) -> torch.Tensor:
    """The model's training loss on a batch (mean per real target token)."""
    return model(batch.src_ids, batch.src_lens, batch.tgt_in, batch.tgt_out)


def small_config(**overrides) -> ModelConfig:
    values = dict(cell="gru", embed_size=32, hidden_size=64, decoder_size=64, attention_size=64,
                  output_size=64, dropout=0.0)
    values.update(overrides)
    return ModelConfig(**values)


def train_reversal(cfg: ModelConfig, steps: int, seed: int = 0, min_len: int = 5, max_len: int = 20,
                   batch_size: int = 64, lr: float = 3e-3, task: str = "reverse", clip: float = 5.0):
    """Train a model to reverse (or copy) random digit strings; returns the model."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(cfg, VOCAB, VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Linear decay to zero: a high early learning rate finds the alignment fast, the low late one
    # settles it (without it, some seeds end in a poor spot).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    for _ in range(steps):
        sources = random_strings(rng, batch_size, min_len, max_len)
        targets = [s[::-1] if task == "reverse" else list(s) for s in sources]
        train_step(model, optimizer, make_batch(sources, targets), clip_norm=clip)
        schedule.step()
    model.eval()
    return model


def exact_match(model, sources: list[list[int]], task: str = "reverse", beam_size: int = 1) -> np.ndarray:
    decode = DecodeConfig(beam_size=beam_size, batch_size=100, max_len_a=1.0, max_len_b=5)
    hyps = search_corpus(model, sources, decode)
    expected = [s[::-1] if task == "reverse" else list(s) for s in sources]
    return np.array([h[0].tokens == e for h, e in zip(hyps, expected)])
