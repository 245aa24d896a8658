"""The model: it learns, every cell/attention kind trains, padding never changes a result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.attention import AdditiveAttention, FixedContext, build_attention
from nmt.config import DecodeConfig, ModelConfig
from nmt.device import autocast
from nmt.model import Decoder, DecoderState, Encoder, Memory, WordDropout, build_model
from nmt.search import search_corpus
from nmt.train import train_step

from .synthetic import (
    VOCAB,
    exact_match,
    loss_of,
    make_batch,
    random_strings,
    small_config,
    train_reversal,
)

ATTENTIONS = ["bahdanau", "luong-dot", "luong-general", "none"]


def test_attention_model_learns_to_reverse():
    torch.set_num_threads(1)
    model = train_reversal(small_config(embed_size=64), steps=300, seed=0, lr=1e-2)
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
        update = train_step(model, optimizer, make_batch(sources, sources))
        assert update.applied, f"gradient norm {float(update.grad_norm)}"
        losses.append(float(update.loss))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_deep_tied_unidirectional_variant_trains():
    torch.manual_seed(0)
    cfg = small_config(cell="lstm", enc_layers=2, dec_layers=2, bidirectional=False,
                       tie_embeddings=True, output_size=32, dropout=0.2)
    model = build_model(cfg, VOCAB, VOCAB)
    assert model.decoder.output.weight is model.decoder.embed.weight
    sources = random_strings(np.random.default_rng(1), 16, 3, 6)
    batch = make_batch(sources, sources)
    loss = loss_of(model, batch)
    loss.backward()
    assert batch.num_tgt_tokens == sum(len(s) + 1 for s in sources) and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_word_dropout_drops_whole_tokens_in_training_only():
    torch.manual_seed(0)
    drop = WordDropout(0.5)
    x = torch.randn(8, 30, 16) + 5.0  # (batch, len, embed), no zero feature
    out = drop(x)
    dropped = (out == 0).all(-1)  # (batch, len)
    assert torch.equal((out != 0).all(-1), ~dropped)  # a token is kept or dropped whole
    assert torch.allclose(out[~dropped], 2.0 * x[~dropped])  # kept ones scaled by 1 / (1 - p)
    assert 0.35 < dropped.float().mean() < 0.65
    assert torch.equal(drop.eval()(x), x)
    # in a model: training takes both sides' tokens away, so the loss differs; search never does
    cfg = small_config(word_dropout=0.5, dropout=0.0)
    model = build_model(cfg, VOCAB, VOCAB).train()
    sources = random_strings(np.random.default_rng(3), 8, 3, 6)
    batch = make_batch(sources, sources)
    torch.manual_seed(1)
    with_drop = loss_of(model, batch).item()
    model.encoder.word_dropout.threshold = model.decoder.word_dropout.threshold = 0
    torch.manual_seed(1)
    assert loss_of(model, batch).item() != with_drop


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_the_encoder_at_inference_computes_what_training_computes(cell, bidirectional):
    """Training runs torch's fused RNN, inference the same equations step by step with all
    directions in one product per position (Encoder._run_stepwise): states and summary agree,
    for every cell, both directions and two layers, on a padded batch."""
    torch.manual_seed(0)
    cfg = small_config(cell=cell, enc_layers=2, bidirectional=bidirectional)
    model = build_model(cfg, VOCAB, VOCAB).eval()
    sources = random_strings(np.random.default_rng(5), 4, 2, 12)
    batch = make_batch(sources, sources)
    with torch.enable_grad():
        trained, trained_summary = model.encoder(batch.src_ids, batch.src_lens)
    with torch.no_grad():
        inferred, inferred_summary = model.encoder(batch.src_ids, batch.src_lens)
    assert trained.requires_grad and not inferred.requires_grad  # the two paths really differ
    for row, length in enumerate(batch.src_lens.tolist()):
        torch.testing.assert_close(inferred[row, :length], trained[row, :length].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inferred_summary, trained_summary.detach(), rtol=1e-5, atol=1e-6)


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
        out_alone, attn_alone = model.teacher_forced(alone.src_ids, alone.src_lens, alone.tgt_in)
        out_batch, attn_batch = model.teacher_forced(batch.src_ids, batch.src_lens, batch.tgt_in)
    n_src, n_tgt = 7, len(targets[1]) + 1
    torch.testing.assert_close(memory_batch.values[1, :n_src], memory_alone.values[0])
    torch.testing.assert_close(out_batch[1, :n_tgt], out_alone[0])
    if attention != "none":
        torch.testing.assert_close(attn_batch[1, :n_tgt, :n_src], attn_alone[0])
        assert float(attn_batch[1, :, n_src:].abs().sum()) == 0.0  # padding gets no weight
        torch.testing.assert_close(attn_batch.sum(-1), torch.ones(attn_batch.shape[:2]))
    else:
        assert attn_batch is None


def test_bf16_autocast_trains_and_keeps_state_and_attention_in_fp32():
    torch.manual_seed(0)
    model = build_model(small_config(), VOCAB, VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        sources = random_strings(rng, 32, 3, 6)
        update = train_step(model, optimizer, make_batch(sources, sources), precision="bf16")
        losses.append(float(update.loss))
    assert update.loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
    model.eval()
    with torch.no_grad(), autocast("cpu", "bf16"):
        batch = make_batch(sources[:4], sources[:4])
        memory, state = model.encode(batch.src_ids, batch.src_lens)
        _, state, weights = model.decode_step(batch.tgt_in[:, 0], state, memory)
    assert state.hidden.dtype == torch.float32 and weights.dtype == torch.float32
    hyp = search_corpus(model, sources[:4], DecodeConfig(beam_size=3), precision="bf16")[0][0]
    torch.testing.assert_close(hyp.attention.sum(-1), torch.ones(hyp.attention.size(0)))


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("layers, bidirectional", [(1, True), (2, True), (2, False)])
def test_encoder_equals_torchs_packed_rnn(cell, layers, bidirectional):
    """The encoder runs each direction over the padded batch (the backward one on sentences
    reversed within their lengths); torch's own RNN over the packed batch must agree on every
    real position and on the summary, outputs and gradients."""
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, embed_size=8, hidden_size=6, enc_layers=layers,
                      bidirectional=bidirectional, dropout=0.0)
    encoder = Encoder(20, cfg).double()
    lens = torch.tensor([7, 3, 5, 1, 7, 2])
    ids = torch.randint(4, 20, (6, 7))
    real = torch.arange(7)[None] < lens[:, None]  # (batch, src_len)
    ids[~real] = 0
    states, summary = encoder(ids, lens)
    ours = torch.autograd.grad((states * real[..., None]).sum() + summary.sum(), encoder.rnn.weight_hh_l0)

    packed = pack_padded_sequence(encoder.embed(ids), lens, batch_first=True, enforce_sorted=False)
    torch_states, final = encoder.rnn(packed)
    torch_states, _ = pad_packed_sequence(torch_states, batch_first=True, total_length=7)
    final = (final[0] if cell == "lstm" else final).view(layers, 2 if bidirectional else 1, 6, 6)
    torch_summary = torch.cat(list(final[-1]), dim=-1)
    theirs = torch.autograd.grad(torch_states.sum() + torch_summary.sum(), encoder.rnn.weight_hh_l0)

    assert torch.allclose(states[real], torch_states[real], atol=1e-12)
    assert torch.allclose(summary, torch_summary, atol=1e-12)
    assert torch.allclose(ours[0], theirs[0], atol=1e-12)


def test_additive_attention_is_bahdanaus_formula():
    """a_ij = softmax_j(v^T tanh(W s_i + b + U h_j)) over the real positions and c_i = sum_j a_ij
    h_j, computed by hand."""
    torch.manual_seed(0)
    attention = AdditiveAttention(query_size=8, enc_size=6, attention_size=5).double()
    query, states = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        context, weights = attention(query, _memory(attention, states, mask))
    U, W, b, v = (p.detach() for p in (attention.key_proj.weight, attention.query_proj.weight,
                                       attention.query_proj.bias, attention.energy.weight[0]))
    for i in range(3):
        energies = [float(v @ torch.tanh(W @ query[i] + b + U @ states[i, j])) for j in range(4)]
        real = [e for e, m in zip(energies, mask[i]) if m]
        expected = torch.softmax(torch.tensor(real, dtype=torch.float64), dim=0)
        assert torch.allclose(weights[i, : len(real)], expected, atol=1e-12)
        assert float(weights[i, len(real):].abs().sum()) == 0.0
        assert torch.allclose(context[i], expected @ states[i, : len(real)], atol=1e-12)


def _memory(attention, states, mask):
    return Memory(attention.project_keys(states), states, mask, summary=states[:, 0])


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_decoder_recurrence_equals_torchs_rnn(cell):
    """Decoder.recur, the hand-written step over 3 layers, computes what torch's own GRU/LSTM/RNN
    computes with the same parameters. With the fixed context set to zeros, the RNN's input is
    [y_{i-1} ; 0] and its first layer's input projection is recur's (project_embeddings)."""
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, embed_size=8, decoder_size=6, dec_layers=3, attention="none", dropout=0.0)
    decoder = Decoder(10, cfg, enc_size=4).double()
    embedded = torch.randn(5, 7, 8, dtype=torch.float64)  # (batch, steps, embed)
    h0, c0 = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    summary = torch.zeros(5, 4, dtype=torch.float64)
    memory = decoder.prepare(Memory(None, summary.unsqueeze(1), torch.ones(5, 1, dtype=torch.bool), summary))
    state = DecoderState(h0, c0 if cell == "lstm" else None, None)
    outputs = []
    for step in range(embedded.size(1)):
        s_i, context, weights, state = decoder.recur(decoder.project_embeddings(embedded[:, step]), state, memory)
        outputs.append(s_i)
        assert weights is None and torch.equal(context, summary)
    inputs = torch.cat([embedded, torch.zeros(5, 7, 4, dtype=torch.float64)], dim=-1)
    expected, final = decoder.rnn(inputs, (h0, c0) if cell == "lstm" else h0)
    assert torch.allclose(torch.stack(outputs, dim=1), expected, atol=1e-12)
    assert torch.allclose(state.hidden, final[0] if cell == "lstm" else final, atol=1e-12)
    if cell == "lstm":
        assert torch.allclose(state.cell, final[1], atol=1e-12)


@pytest.mark.parametrize("kind", ["luong-dot", "luong-general"])
def test_luong_attention_is_the_formula(kind):
    """a_ij = softmax_j(s_i^T h_j) (dot) or softmax_j(s_i^T W_a h_j) (general), real positions only,
    and c_i = sum_j a_ij h_j."""
    torch.manual_seed(0)
    attention = build_attention(kind, query_size=6, enc_size=6, attention_size=0).double()
    query, states = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        context, weights = attention(query, _memory(attention, states, mask))
    W = attention.key_proj.weight.detach() if kind == "luong-general" else torch.eye(6, dtype=torch.float64)
    for i in range(3):
        real = int(mask[i].sum())
        scores = torch.tensor([float(query[i] @ (W @ states[i, j])) for j in range(real)], dtype=torch.float64)
        assert torch.allclose(weights[i, :real], torch.softmax(scores, dim=0), atol=1e-12)
        assert float(weights[i, real:].abs().sum()) == 0.0
        assert torch.allclose(context[i], torch.softmax(scores, dim=0) @ states[i, :real], atol=1e-12)
    assert attention.before_rnn is False  # Luong attends from the new state s_i


def test_fixed_context_is_the_encoder_summary_at_every_step():
    """No attention (Cho et al. 2014): c_i = [h_fwd_last ; h_bwd_first] whatever the query, before
    the RNN step, and no weights."""
    attention = build_attention("none", query_size=6, enc_size=4, attention_size=0)
    assert isinstance(attention, FixedContext) and attention.before_rnn
    states, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    memory = Memory(attention.project_keys(states), states, mask, summary=torch.randn(2, 4))
    for query in (torch.zeros(2, 6), torch.randn(2, 6)):
        context, weights = attention(query, memory)
        assert weights is None and torch.equal(context, memory.summary)
