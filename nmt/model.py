"""The RNN encoder-decoder: Encoder, Decoder, Seq2Seq.

Read next to Bahdanau, Cho & Bengio (2015) "Neural Machine Translation by Jointly Learning to
Align and Translate", and Cho et al. (2014) for the fixed-context baseline:

    encoder      h_j = [h_fwd_j ; h_bwd_j]                   bidirectional RNN over the source
    bridge       s_0 = tanh(W_s [h_fwd_last ; h_bwd_first])  decoder initial state
    attention    c_i = sum_j a_ij h_j,  a_i = softmax(v^T tanh(W s_{i-1} + U h_j))      (bahdanau)
                 c_i = c = [h_fwd_last ; h_bwd_first] at every step                      (none)
    decoder      s_i = RNN([y_{i-1} ; c_i], s_{i-1})
    deep output  t_i = tanh(W_o [s_i ; c_i ; y_{i-1}]),   p(y_i | ...) = softmax(V t_i)

Luong attention (dot/general) instead attends *after* the RNN step with the new state s_i, and
`input_feeding` feeds t_{i-1} back into the RNN input (Luong et al. 2015, section 3.3).
Ids 0-3 are pad, unk, bos, eos (nmt.subword).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.attention import build_attention
from nmt.config import ModelConfig
from nmt.subword import BOS_ID, PAD_ID

RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


@dataclass
class Memory:
    """What the decoder reads from the encoder; fixed for a batch, reordered for beams."""

    keys: torch.Tensor | None  # (batch, src_len, key_size): projected once per batch
    values: torch.Tensor  # (batch, src_len, enc_size)
    src_mask: torch.Tensor  # (batch, src_len) bool, True on real tokens
    summary: torch.Tensor  # (batch, enc_size): the fixed context c of the baseline

    def index_select(self, index: torch.Tensor) -> Memory:
        keys = None if self.keys is None else self.keys.index_select(0, index)
        return Memory(keys, self.values.index_select(0, index),
                      self.src_mask.index_select(0, index), self.summary.index_select(0, index))


@dataclass
class DecoderState:
    hidden: torch.Tensor  # (layers, batch, decoder_size)
    cell: torch.Tensor | None  # (layers, batch, decoder_size), LSTM only
    output: torch.Tensor | None  # (batch, output_size): previous t_i, for input feeding

    def index_select(self, index: torch.Tensor) -> DecoderState:
        """Reorder along the batch (beam search): the decoder owns how its state moves."""
        def pick(x):
            return None if x is None else x.index_select(-2 if x.dim() == 3 else 0, index)
        return DecoderState(pick(self.hidden), pick(self.cell), pick(self.output))

    def rnn_state(self):
        return self.hidden if self.cell is None else (self.hidden, self.cell)


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.embed_size, padding_idx=PAD_ID)
        self.rnn = RNN_CLASSES[cfg.cell](
            cfg.embed_size, cfg.hidden_size, num_layers=cfg.enc_layers, batch_first=True,
            bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.output_size = cfg.hidden_size * (2 if cfg.bidirectional else 1)

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor):
        """src_ids (batch, src_len), src_lens (batch,) → states (batch, src_len, enc_size), summary
        (batch, enc_size): the top layer's last forward and first backward state."""
        batch, src_len = src_ids.shape
        embedded = self.dropout(self.embed(src_ids))  # (batch, src_len, embed)
        # Packing makes the RNN stop at each sentence's end: padding never changes a result.
        packed = pack_padded_sequence(embedded, src_lens.cpu(), batch_first=True, enforce_sorted=False)
        packed_states, final = self.rnn(packed)
        states, _ = pad_packed_sequence(packed_states, batch_first=True, total_length=src_len)
        if isinstance(final, tuple):  # LSTM: (h, c); the summary is built from h
            final = final[0]
        directions = 2 if self.cfg.bidirectional else 1
        final = final.view(self.cfg.enc_layers, directions, batch, self.cfg.hidden_size)
        summary = torch.cat(list(final[-1]), dim=-1)  # (batch, enc_size)
        return self.dropout(states), summary


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig, enc_size: int):
        super().__init__()
        self.cfg = cfg
        self.attends_first = cfg.attention in ("bahdanau", "none")  # context from s_{i-1}
        self.embed = nn.Embedding(vocab_size, cfg.embed_size, padding_idx=PAD_ID)
        self.attention = build_attention(cfg.attention, cfg.decoder_size, enc_size, cfg.attention_size)
        rnn_input = cfg.embed_size + (enc_size if self.attends_first else 0)
        rnn_input += cfg.output_size if cfg.input_feeding else 0
        self.rnn = RNN_CLASSES[cfg.cell](
            rnn_input, cfg.decoder_size, num_layers=cfg.dec_layers, batch_first=True,
            dropout=cfg.dropout if cfg.dec_layers > 1 else 0.0,
        )
        # The bridge: every decoder layer starts from a learned function of the source summary.
        self.bridge = nn.Linear(enc_size, cfg.dec_layers * cfg.decoder_size)
        self.bridge_cell = nn.Linear(enc_size, cfg.dec_layers * cfg.decoder_size) if cfg.cell == "lstm" else None
        self.pre_output = nn.Linear(cfg.decoder_size + enc_size + cfg.embed_size, cfg.output_size)
        self.output = nn.Linear(cfg.output_size, vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        self.dropout = nn.Dropout(cfg.dropout)

    def init_state(self, summary: torch.Tensor) -> DecoderState:
        layers, size = self.cfg.dec_layers, self.cfg.decoder_size

        def bridge(linear):  # (batch, enc) → (layers, batch, decoder_size)
            return torch.tanh(linear(summary)).view(-1, layers, size).transpose(0, 1).contiguous()

        cell = bridge(self.bridge_cell) if self.bridge_cell is not None else None
        output = summary.new_zeros(summary.size(0), self.cfg.output_size) if self.cfg.input_feeding else None
        return DecoderState(bridge(self.bridge), cell, output)

    def step(self, embedded: torch.Tensor, state: DecoderState, memory: Memory):
        """One target position: embedded (batch, embed) of y_{i-1} → t_i (batch, output_size),
        new state, attention weights (batch, src_len) or None for the fixed-context model."""
        weights = None
        if self.attends_first:
            if self.attention is None:
                context = memory.summary
            else:
                query = state.hidden[-1]  # s_{i-1}, top layer
                context, weights = self.attention(query, memory.keys, memory.values, memory.src_mask)
            rnn_input = [embedded, context]
        else:
            rnn_input = [embedded]
        if state.output is not None:
            rnn_input.append(state.output)
        rnn_out, rnn_state = self.rnn(torch.cat(rnn_input, dim=-1).unsqueeze(1), state.rnn_state())
        s_i = rnn_out.squeeze(1)  # (batch, decoder_size)
        if not self.attends_first:
            context, weights = self.attention(s_i, memory.keys, memory.values, memory.src_mask)
        t_i = torch.tanh(self.pre_output(self.dropout(torch.cat([s_i, context, embedded], dim=-1))))
        hidden, cell = rnn_state if isinstance(rnn_state, tuple) else (rnn_state, None)
        return t_i, DecoderState(hidden, cell, t_i if self.cfg.input_feeding else None), weights

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(t))


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.encoder = Encoder(src_vocab_size, cfg)
        self.decoder = Decoder(tgt_vocab_size, cfg, self.encoder.output_size)
        for param in self.parameters():
            nn.init.uniform_(param, -0.1, 0.1)
        with torch.no_grad():  # the pad embeddings stay zero
            self.encoder.embed.weight[PAD_ID].zero_()
            self.decoder.embed.weight[PAD_ID].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor):
        states, summary = self.encoder(src_ids, src_lens)
        attention = self.decoder.attention
        keys = attention.project_keys(states) if attention is not None else None
        src_mask = src_ids != PAD_ID
        memory = Memory(keys, states, src_mask, summary)
        return memory, self.decoder.init_state(summary)

    def forward(self, src_ids, src_lens, tgt_in):
        """Teacher forcing: tgt_in (batch, tgt_len) starts with BOS → t (batch, tgt_len, output_size)
        and attention (batch, tgt_len, src_len) or None. The vocabulary projection is left to the
        caller so that it runs once, over real tokens only (see train.batch_loss)."""
        memory, state = self.encode(src_ids, src_lens)
        embedded = self.decoder.dropout(self.decoder.embed(tgt_in))  # all steps at once
        outputs, weights = [], []
        for i in range(tgt_in.size(1)):
            t_i, state, w = self.decoder.step(embedded[:, i], state, memory)
            outputs.append(t_i)
            weights.append(w)
        attn = torch.stack(weights, dim=1) if weights[0] is not None else None
        return torch.stack(outputs, dim=1), attn

    def decode_step(self, prev_ids: torch.Tensor, state: DecoderState, memory: Memory):
        """Inference: prev_ids (batch,) → logits (batch, vocab), new state, attention."""
        embedded = self.decoder.dropout(self.decoder.embed(prev_ids))
        t_i, state, weights = self.decoder.step(embedded, state, memory)
        return self.decoder.logits(t_i), state, weights


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    return Seq2Seq(cfg, src_vocab_size, tgt_vocab_size)


def bos_column(batch: int, device) -> torch.Tensor:
    return torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
