"""The model: it learns, every cell/attention kind trains, padding never changes a result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmt.model import build_model
from nmt.train import batch_loss

from .synthetic import VOCAB, exact_match, make_batch, random_strings, small_config, train_reversal

ATTENTIONS = ["bahdanau", "luong-dot", "luong-general", "none"]


def test_attention_model_learns_to_reverse():
    torch.set_num_threads(1)
    model = train_reversal(small_config(embed_size=64), steps=400, seed=0, lr=1e-2)
    held_out = random_strings(np.random.default_rng(12345), 300, 5, 20)
    accuracy = exact_match(model, held_out).mean()
    assert accuracy >= 0.95, f"exact match {accuracy:.3f} on held-out reversals"


def _sizes(attention):  # luong-dot scores decoder states against encoder states directly
    return {"decoder_size": 128} if attention == "luong-dot" else {}


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_cell_and_attention_trains(cell, attention):
    torch.manual_seed(0)
    cfg = small_config(cell=cell, attention=attention, **_sizes(attention),
                       input_feeding=attention.startswith("luong"))
    model = build_model(cfg, VOCAB, VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        sources = random_strings(rng, 32, 3, 6)
        loss, _ = batch_loss(model, make_batch(sources, sources))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_deep_tied_unidirectional_variant_trains():
    torch.manual_seed(0)
    cfg = small_config(cell="lstm", enc_layers=2, dec_layers=2, bidirectional=False,
                       tie_embeddings=True, output_size=32, dropout=0.2)
    model = build_model(cfg, VOCAB, VOCAB)
    assert model.decoder.output.weight is model.decoder.embed.weight
    sources = random_strings(np.random.default_rng(1), 16, 3, 6)
    loss, tokens = batch_loss(model, make_batch(sources, sources))
    loss.backward()
    assert tokens == sum(len(s) + 1 for s in sources) and torch.isfinite(loss)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_padding_never_changes_a_result(attention, cell):
    torch.manual_seed(0)
    model = build_model(small_config(cell=cell, attention=attention, **_sizes(attention)), VOCAB, VOCAB).eval()
    rng = np.random.default_rng(3)
    sentence = random_strings(rng, 1, 7, 7)
    others = random_strings(rng, 3, 2, 15)
    sources = others[:1] + sentence + others[1:]  # the sentence sits at row 1 among longer/shorter
    targets = [s[::-1] for s in sources]
    with torch.no_grad():
        alone = make_batch(sentence, targets[1:2])
        batch = make_batch(sources, targets)
        memory_alone, _ = model.encode(alone.src_ids, alone.src_lens)
        memory_batch, _ = model.encode(batch.src_ids, batch.src_lens)
        out_alone, attn_alone = model(alone.src_ids, alone.src_lens, alone.tgt_in)
        out_batch, attn_batch = model(batch.src_ids, batch.src_lens, batch.tgt_in)
    n_src, n_tgt = 7, len(targets[1]) + 1
    torch.testing.assert_close(memory_batch.values[1, :n_src], memory_alone.values[0])
    torch.testing.assert_close(out_batch[1, :n_tgt], out_alone[0])
    if attention != "none":
        torch.testing.assert_close(attn_batch[1, :n_tgt, :n_src], attn_alone[0])
        assert float(attn_batch[1, :, n_src:].abs().sum()) == 0.0  # padding gets no weight
        torch.testing.assert_close(attn_batch.sum(-1), torch.ones(attn_batch.shape[:2]))
    else:
        assert attn_batch is None


def test_parameter_count_matches_the_modules():
    model = build_model(small_config(), VOCAB, VOCAB)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert model.num_parameters() == encoder + decoder > 0


def test_bf16_autocast_trains_and_keeps_state_and_attention_in_fp32():
    from nmt.model import autocast
    from nmt.search import search_corpus

    torch.manual_seed(0)
    model = build_model(small_config(), VOCAB, VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        sources = random_strings(rng, 32, 3, 6)
        with autocast("cpu", "bf16"):
            loss, _ = batch_loss(model, make_batch(sources, sources))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
    model.eval()
    with torch.no_grad(), autocast("cpu", "bf16"):
        batch = make_batch(sources[:4], sources[:4])
        memory, state = model.encode(batch.src_ids, batch.src_lens)
        _, state, weights = model.decode_step(batch.tgt_in[:, 0], state, memory)
    assert state.hidden.dtype == torch.float32 and weights.dtype == torch.float32
    hyp = search_corpus(model, sources[:4], "cpu", beam_size=3, precision="bf16")[0][0]
    torch.testing.assert_close(hyp.attention.sum(-1), torch.ones(hyp.attention.size(0)))
