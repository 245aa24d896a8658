"""The RNN encoder-decoder: Encoder, Decoder, Seq2Seq.

Read next to Bahdanau, Cho & Bengio (2015) "Neural Machine Translation by Jointly Learning to
Align and Translate", and Cho et al. (2014) for the fixed-context baseline:

    encoder      h_j = [h_fwd_j ; h_bwd_j]                   bidirectional RNN over the source
    bridge       s_0 = tanh(W_s [h_fwd_last ; h_bwd_first])  decoder initial state
    attention    c_i = sum_j a_ij h_j,  a_i = softmax(v^T tanh(W s_{i-1} + U h_j))      (bahdanau)
                 c_i = c = [h_fwd_last ; h_bwd_first] at every step                      (none)
                 (a unidirectional encoder: c = h_last)
    decoder      s_i = RNN([y_{i-1} ; c_i], s_{i-1})
    deep output  t_i = tanh(W_o [s_i ; c_i ; y_{i-1}]),   p(y_i | ...) = softmax(V t_i)

Luong attention (dot/general) instead attends *after* the RNN step with the new state s_i, and
`input_feeding` feeds t_{i-1} back into the RNN input (Luong et al. 2015, section 3.3). Each kind
of attention, the fixed context included, is a module of nmt.attention; the vocabulary projection
V and the loss are nmt.output. Ids 0-3 are pad, unk, bos, eos (nmt.subword).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nmt.attention import FixedContext, build_attention
from nmt.config import ModelConfig
from nmt.device import autocast_dtype
from nmt.errors import NmtError
from nmt.output import OutputLayer
from nmt.subword import BOS_ID, PAD_ID

RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


@dataclass
class Memory:
    """What the decoder reads from the encoder: fixed for a batch, reordered for beams. Everything
    here is computed once per batch, not once per decoder step."""

    keys: torch.Tensor | None  # (batch, src_len, key_size): attention.project_keys(values)
    values: torch.Tensor  # (batch, src_len, enc_size): the encoder states h_j
    src_mask: torch.Tensor  # (batch, src_len) bool, True on real tokens
    summary: torch.Tensor  # (batch, enc_size): the fixed context c of the baseline
    # The fixed context's share of the decoder RNN's input gates, W_c c: the same at every step.
    summary_gates: torch.Tensor | None = None  # (batch, gates * decoder_size)
    # The blocks of the decoder's input weights W_ih that multiply c_i and t_{i-1} at every step,
    # cast to the autocast dtype once per batch (training) or per search (SearchWeights):
    # autocast caches the cast of a whole parameter but casts a slice of one again at every use
    # (see Decoder.prepare). They are shared by all sentences, so index_select passes them on.
    context_weight: torch.Tensor | None = None
    feed_weight: torch.Tensor | None = None
    # Search only (from its SearchWeights): the output projection padded for speed
    # (OutputLayer.padded), and W_ih's block for y_{i-1}, as search projects one embedding a step.
    output_weight: torch.Tensor | None = None
    output_bias: torch.Tensor | None = None
    embed_weight: torch.Tensor | None = None

    def index_select(self, index: torch.Tensor) -> Memory:
        def pick(x):
            return None if x is None else x.index_select(0, index)
        return Memory(pick(self.keys), pick(self.values), pick(self.src_mask), pick(self.summary),
                      pick(self.summary_gates), self.context_weight, self.feed_weight,
                      self.output_weight, self.output_bias, self.embed_weight)

    def narrow(self, length: int) -> Memory:
        """The first `length` source positions: search drops padding no live sentence needs."""
        def cut(x):
            return None if x is None else x[:, :length].contiguous()
        return Memory(cut(self.keys), cut(self.values), cut(self.src_mask), self.summary, self.summary_gates,
                      self.context_weight, self.feed_weight, self.output_weight, self.output_bias,
                      self.embed_weight)

    def concat(self, other: Memory) -> Memory:
        """Both batches' sentences, these first, with the source positions of the shorter padded
        (masked out) to the longer: search adds sentences to a batch it is decoding."""
        length = max(self.values.size(1), other.values.size(1))

        def join(a, b, positional: bool):
            if a is None:
                return None
            if positional:  # (batch, src_len, ...): zeros (False in the mask) after the end
                a, b = (x if x.size(1) == length else
                        torch.cat([x, x.new_zeros((x.size(0), length - x.size(1), *x.shape[2:]))], 1)
                        for x in (a, b))
            return torch.cat([a, b])

        return Memory(join(self.keys, other.keys, True), join(self.values, other.values, True),
                      join(self.src_mask, other.src_mask, True), join(self.summary, other.summary, False),
                      join(self.summary_gates, other.summary_gates, False), self.context_weight,
                      self.feed_weight, self.output_weight, self.output_bias, self.embed_weight)


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

    def concat(self, other: DecoderState) -> DecoderState:
        """Both batches' states, these first (see Memory.concat)."""
        def join(a, b):
            return None if a is None else torch.cat([a, b], dim=-2 if a.dim() == 3 else 0)
        return DecoderState(join(self.hidden, other.hidden), join(self.cell, other.cell),
                            join(self.output, other.output))


@dataclass
class SearchWeights:
    """What a search reads of the weights at every batch and step, in the precision it computes
    in: cast, padded and laid out once per search (`Seq2Seq.search_weights`, under the search's
    autocast context) instead of once per batch. nmt serve encodes each arriving group of one or
    two sentences as a batch of its own, and preparing these weights for each took about half of
    encoding one sentence (bench/README.md). They are copies: a search must not outlive a change
    of the weights (training's validations make new ones each time)."""

    # Per encoder layer: its directions' W_hh^T stacked (dirs, hidden, gates) and b_hh (dirs, 1, gates).
    encoder_hh: list[tuple[torch.Tensor, torch.Tensor]]
    context: torch.Tensor | None  # the decoder's W_ih block for c_i (Memory.context_weight)
    feed: torch.Tensor | None  # ... for t_{i-1} (input feeding)
    embed: torch.Tensor  # ... for y_{i-1}, contiguous
    output: torch.Tensor  # the vocabulary projection, padded (OutputLayer.padded)
    output_bias: torch.Tensor


class Dropout(nn.Module):
    """Dropout with its mask drawn as random bytes, eight from each random 64-bit integer.

    On CPU, torch draws a Bernoulli mask one random number per element, several times slower
    than this (bench/README.md). p is rounded to a multiple of 1/256 (0.3 → 77/256 = 0.3008).
    """

    def __init__(self, p: float):
        super().__init__()
        self.threshold = round(p * 256)  # drop where the byte < threshold
        self.scale = 256.0 / (256 - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return x * self.keep(x.shape, x.device) * self.scale

    def keep(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device)
        return words.view(torch.uint8)[:n].view(shape) >= self.threshold


class WordDropout(Dropout):
    """Drops whole tokens of an embedded sequence (batch, len, embed): all of a token's features at
    once, so the model must do without the word, not just some of its features (word dropout,
    Gal & Ghahramani 2016; among the regularisers that helped most on small corpora in Sennrich &
    Zhang 2019)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return x * self.keep((*x.shape[:-1], 1), x.device) * self.scale


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.embed_size, padding_idx=PAD_ID)
        self.rnn = RNN_CLASSES[cfg.cell](
            cfg.embed_size, cfg.hidden_size, num_layers=cfg.enc_layers, batch_first=True,
            bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0,
        )
        self.dropout = Dropout(cfg.dropout)
        self.word_dropout = WordDropout(cfg.word_dropout)
        self.output_size = cfg.hidden_size * (2 if cfg.bidirectional else 1)

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor,
                recurrent: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """src_ids (batch, src_len), src_lens (batch,) → states (batch, src_len, enc_size), summary
        (batch, enc_size): the top layer's last forward and first backward state. At inference
        `recurrent` may give each layer's recurrent_weights, made once for a whole search."""
        batch, src_len = src_ids.shape
        x = self.dropout(self.word_dropout(self.embed(src_ids)))  # (batch, src_len, embed)
        # Padding must never change a result. Rather than packing the batch (torch's packed RNN
        # is slower on CPU: it copies and zero-fills per step), every direction runs over the
        # padded batch as if the sentences were alone: the backward direction reads each
        # sentence reversed within its length, so both read the padding last, after every real
        # token, and the states they leave on padding are never read (attention masks them).
        positions = torch.arange(src_len, device=x.device)
        lens = src_lens.to(x.device).unsqueeze(1)
        reverse = torch.where(positions < lens, lens - 1 - positions, positions)  # (batch, src_len)
        last = (lens - 1).squeeze(1)  # (batch,): position of each sentence's last token
        directions = 2 if self.cfg.bidirectional else 1
        for layer in range(self.cfg.enc_layers):
            if layer > 0:
                x = self.dropout(x)
            suffixes = [f"_l{layer}", f"_l{layer}_reverse"][:directions]
            if torch.is_grad_enabled():
                outputs = []
                for direction, suffix in enumerate(suffixes):
                    if direction == 0:
                        outputs.append(self._run(x, suffix))
                    else:  # reversed within each sentence, run, and put back in source order
                        outputs.append(_reorder(self._run(_reorder(x, reverse), suffix), reverse))
            else:
                inputs = [x, _reorder(x, reverse)][:directions]
                weight_hh, bias_hh = (recurrent[layer] if recurrent is not None else
                                      self.recurrent_weights(layer, autocast_dtype(x.device)))
                outputs = list(self._run_stepwise(inputs, suffixes, weight_hh, bias_hh).unbind(0))
                if directions == 2:
                    outputs[1] = _reorder(outputs[1], reverse)
            x = torch.cat(outputs, dim=-1)  # (batch, src_len, directions * hidden)
        rows = torch.arange(batch, device=x.device)
        finals = [outputs[0][rows, last]] + ([outputs[1][:, 0]] if directions == 2 else [])
        return self.dropout(x), torch.cat(finals, dim=-1)  # summary (batch, enc_size)

    def _run(self, inputs: torch.Tensor, suffix: str) -> torch.Tensor:
        """Training: one direction of one layer of self.rnn, with its own parameters, left to
        right over inputs (batch, src_len, size) → outputs (batch, src_len, hidden), by torch's
        fused RNN (torch._VF is what nn.GRU/LSTM/RNN.forward call themselves). Inference runs the
        same equations step by step (_run_stepwise)."""
        params = [getattr(self.rnn, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h0 = inputs.new_zeros(1, inputs.size(0), self.cfg.hidden_size)
        run = {"gru": torch._VF.gru, "lstm": torch._VF.lstm, "rnn": torch._VF.rnn_tanh}[self.cfg.cell]
        hx = (h0, h0) if self.cfg.cell == "lstm" else h0
        return run(inputs, hx, params, True, 1, 0.0, self.training, False, True)[0]

    def recurrent_weights(self, layer: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s W_hh^T of every direction stacked (dirs, hidden, gates) and b_hh (dirs,
        1, gates), detached, cast to `dtype` (the autocast one) if given: what _run_stepwise
        multiplies at every position, laid out and cast once rather than at every position."""
        suffixes = [f"_l{layer}", f"_l{layer}_reverse"][: 2 if self.cfg.bidirectional else 1]
        weight_hh = torch.stack([getattr(self.rnn, f"weight_hh{s}").detach().t() for s in suffixes])
        bias_hh = torch.stack([getattr(self.rnn, f"bias_hh{s}").detach() for s in suffixes]).unsqueeze(1)
        if dtype is not None:
            weight_hh, bias_hh = weight_hh.to(dtype), bias_hh.to(dtype)
        return weight_hh, bias_hh

    def _run_stepwise(self, inputs: list[torch.Tensor], suffixes: list[str], weight_hh: torch.Tensor,
                      bias_hh: torch.Tensor) -> torch.Tensor:
        """_run without autograd, for all directions of a layer at once: inputs (batch, src_len,
        size) per direction, each already in its reading order, and the layer's recurrent_weights
        → (directions, batch, src_len, hidden). The input projections of all positions at once,
        then one batched product per position for every direction together (a direction's state
        only meets its own weights), and the cell's equations with the state in fp32, as the
        decoder runs its RNN.

        Its reason is that a sentence's result must not depend on the other sentences of its
        batch (search runs one sentence alone or among 64, and nmt serve joins sentences as they
        come): under bf16 autocast torch's fused RNN rounds differently with the batch size (its
        states are bf16, and its kernels change with the batch), where these bf16 products give
        every row the same bits whatever the batch (tests/test_search.py). One product for both
        directions rather than one each: the encoder of one sentence, what nmt serve mostly
        runs, took 0.91 of the time (bench/README.md)."""
        batch, hidden = inputs[0].size(0), self.cfg.hidden_size
        input_gates = torch.stack([F.linear(x, getattr(self.rnn, f"weight_ih{s}"), getattr(self.rnn, f"bias_ih{s}"))
                                   for x, s in zip(inputs, suffixes)]).float()  # (dirs, batch, len, gates)
        h = input_gates.new_zeros(len(inputs), batch, hidden)
        c = torch.zeros_like(h) if self.cfg.cell == "lstm" else None
        outputs = []
        for gates in input_gates.unbind(2):
            hidden_gates = torch.baddbmm(bias_hh, h.to(weight_hh.dtype), weight_hh)
            h, c = cell_update(self.cfg.cell, gates, hidden_gates.to(h.dtype), h, c)
            outputs.append(h)
        return torch.stack(outputs, dim=2)


def cell_update(cell: str, input_gates: torch.Tensor, hidden_gates: torch.Tensor, h: torch.Tensor,
                c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's GRU/LSTM/Elman equations (gate order r z n, and i f g o) for one step, from the
    input's and the state's projections (W_ih x + b_ih, W_hh h + b_hh) → new h and c (LSTM) or
    None. The encoder's inference and the decoder share it."""
    if cell == "gru":
        # r, z = sigmoid(i_rz + h_rz); n = tanh(i_n + r * h_n); h' = n + z * (h - n), in as few
        # operations as torch has for it (each costs a call, forward and backward, per step)
        size = h.size(-1)
        reset, update = torch.sigmoid(input_gates[..., : 2 * size] + hidden_gates[..., : 2 * size]).chunk(2, dim=-1)
        candidate = torch.tanh(torch.addcmul(input_gates[..., 2 * size :], reset, hidden_gates[..., 2 * size :]))
        return torch.lerp(candidate, h, update), None
    if cell == "lstm":
        i, f, g, o = (input_gates + hidden_gates).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    return torch.tanh(input_gates + hidden_gates), None


def _reorder(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, src_len, size) with its positions taken in the order index (batch, src_len)."""
    return x.gather(1, index.unsqueeze(2).expand_as(x))


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig, enc_size: int):
        super().__init__()
        self.cfg = cfg
        self.enc_size = enc_size
        self.embed = nn.Embedding(vocab_size, cfg.embed_size, padding_idx=PAD_ID)
        self.attention = build_attention(cfg.attention, cfg.decoder_size, enc_size, cfg.attention_size)
        rnn_input = cfg.embed_size + (enc_size if self.attention.before_rnn else 0)
        rnn_input += cfg.output_size if cfg.input_feeding else 0
        # The RNN's parameters, laid out as torch's (and initialised, saved and loaded as such);
        # its recurrence is written out in `recur` so that the input projections can be hoisted.
        self.rnn = RNN_CLASSES[cfg.cell](
            rnn_input, cfg.decoder_size, num_layers=cfg.dec_layers, batch_first=True,
            dropout=cfg.dropout if cfg.dec_layers > 1 else 0.0,
        )
        # The bridge: every decoder layer starts from a learned function of the source summary.
        self.bridge = nn.Linear(enc_size, cfg.dec_layers * cfg.decoder_size)
        self.bridge_cell = nn.Linear(enc_size, cfg.dec_layers * cfg.decoder_size) if cfg.cell == "lstm" else None
        self.pre_output = nn.Linear(cfg.decoder_size + enc_size + cfg.embed_size, cfg.output_size)
        self.output = OutputLayer(cfg.output_size, vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        self.dropout = Dropout(cfg.dropout)
        self.word_dropout = WordDropout(cfg.word_dropout)

    def init_state(self, summary: torch.Tensor) -> DecoderState:
        layers, size = self.cfg.dec_layers, self.cfg.decoder_size

        def bridge(linear):  # (batch, enc) → (layers, batch, decoder_size), in the parameters'
            # precision: under bf16 autocast the state must still start (and stay) in fp32
            state = torch.tanh(linear(summary)).to(linear.weight.dtype)
            return state.view(-1, layers, size).transpose(0, 1).contiguous()

        cell = bridge(self.bridge_cell) if self.bridge_cell is not None else None
        output = summary.new_zeros(summary.size(0), self.cfg.output_size) if self.cfg.input_feeding else None
        return DecoderState(bridge(self.bridge), cell, output)

    # The first RNN layer's input is [y_{i-1} ; c_i ; t_{i-1}], so its input projection W_ih splits
    # into column blocks for the embedding, the context and the fed output. The embedding part
    # does not depend on the previous step: `project_embeddings` does it for all steps at once; so
    # does `prepare` for the fixed context. (Projecting the encoder states once, W_c h_j, and
    # weighing them at each step would save FLOPs too, but the weighing then reads batch × src_len
    # × gates values per step and measured slower than W_c c_i: bench/README.md.)

    def _input_weights(self, dtype: torch.dtype | None = None):
        """W_ih's blocks for the embedding, the context (or None) and the fed output (or None)."""
        w, e = self.rnn.weight_ih_l0, self.cfg.embed_size
        w = w if dtype is None else w.to(dtype)
        context = w[:, e : e + self.enc_size] if self.attention.before_rnn else None
        fed = w[:, w.size(1) - self.cfg.output_size :] if self.cfg.input_feeding else None
        return w[:, :e], context, fed

    def search_weights(self, dtype: torch.dtype | None) -> tuple:
        """The decoder's part of SearchWeights: (context, feed, embed, output, output_bias).
        Called without autograd (Seq2Seq.search_weights)."""
        embed, context, feed = self._input_weights(dtype)
        return (context, feed, embed.contiguous(), *self.output.padded(dtype))

    def prepare(self, memory: Memory, weights: SearchWeights | None = None) -> Memory:
        """Once per batch: what every decoder step reads, in the precision it computes in. Under
        bf16 autocast the per-step products would otherwise cast the encoder states and the
        weight blocks again at every step, and keep each copy for the backward pass. A search
        gives its SearchWeights, with the output projection and y_{i-1}'s block, made once."""
        dtype = autocast_dtype(memory.values.device)
        if weights is not None:
            memory.context_weight, memory.feed_weight = weights.context, weights.feed
            memory.embed_weight, memory.output_weight = weights.embed, weights.output
            memory.output_bias = weights.output_bias
        else:
            _, memory.context_weight, memory.feed_weight = self._input_weights(dtype)
        if dtype is not None:
            same = memory.keys is memory.values  # Luong dot: the keys are the states
            memory.values = memory.values.to(dtype)
            if memory.keys is not None:
                memory.keys = memory.values if same else memory.keys.to(dtype)
        if isinstance(self.attention, FixedContext):  # W_c c is the same at every step
            memory.summary_gates = F.linear(memory.summary, memory.context_weight)
        return memory

    def project_embeddings(self, embedded: torch.Tensor) -> torch.Tensor:
        """embedded (..., embed) → (..., gates * decoder_size): W_ih[:, :embed] y + b_ih."""
        return F.linear(embedded, self._input_weights()[0], self.rnn.bias_ih_l0)

    def recur(self, projected: torch.Tensor, state: DecoderState, memory: Memory):
        """One target position i, from y_{i-1} projected (batch, gates * decoder_size) → s_i
        (batch, decoder_size), context c_i (batch, enc_size), attention a_i (batch, src_len) or
        None, the new state."""
        gates = projected
        if self.attention.before_rnn:  # Bahdanau, fixed context: c_i from s_{i-1}, into the RNN
            context, weights = self.attention(state.hidden[-1], memory)
            context_gates = memory.summary_gates  # the fixed context's, computed once (prepare)
            if context_gates is None:
                context_gates = F.linear(context, memory.context_weight)
            gates = gates + context_gates
        if state.output is not None:  # input feeding: t_{i-1}
            gates = gates + F.linear(state.output, memory.feed_weight)
        hiddens, cells = [], []
        for layer in range(self.cfg.dec_layers):
            if layer > 0:
                gates = F.linear(self.dropout(hiddens[-1]), getattr(self.rnn, f"weight_ih_l{layer}"),
                                 getattr(self.rnn, f"bias_ih_l{layer}"))
            cell = state.cell[layer] if state.cell is not None else None
            h, c = self._recur_layer(layer, gates, state.hidden[layer], cell)
            hiddens.append(h)
            cells.append(c)
        s_i = hiddens[-1]
        if not self.attention.before_rnn:  # Luong: c_i from the new state s_i
            context, weights = self.attention(s_i, memory)
        cell = torch.stack(cells) if state.cell is not None else None
        return s_i, context, weights, DecoderState(torch.stack(hiddens), cell, None)

    def _recur_layer(self, layer: int, input_gates, h, c):
        """One step of layer `layer` (cell_update's equations) from its input's projection."""
        hidden_gates = F.linear(h, getattr(self.rnn, f"weight_hh_l{layer}"), getattr(self.rnn, f"bias_hh_l{layer}"))
        # Under bf16 autocast the products come back in bf16; the recurrence itself stays in the
        # state's precision (fp32), or rounding would accumulate over the steps.
        return cell_update(self.cfg.cell, input_gates.to(h.dtype), hidden_gates.to(h.dtype), h, c)

    def deep_output(self, s: torch.Tensor, context: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """t_i = tanh(W_o [s_i ; c_i ; y_{i-1}]) for one step or, stacked, for all of them."""
        return torch.tanh(self.pre_output(self.dropout(torch.cat([s, context, embedded], dim=-1))))

    def step(self, embedded: torch.Tensor, state: DecoderState, memory: Memory):
        """One target position at inference: embedded y_{i-1} (batch, embed) → t_i (batch,
        output_size), new state, attention weights (batch, src_len) or None (fixed context)."""
        weight = memory.embed_weight if memory.embed_weight is not None else self._input_weights()[0]
        s_i, context, weights, state = self.recur(F.linear(embedded, weight, self.rnn.bias_ih_l0), state, memory)
        t_i = self.deep_output(s_i, context, embedded)
        if self.cfg.input_feeding:
            state.output = t_i
        return t_i, state, weights

    def log_probs(self, t: torch.Tensor, memory: Memory) -> torch.Tensor:
        """log p(y_i | ...) from t_i (batch, output_size) → (batch, vocab), in fp32 at least."""
        return self.output.log_probs(t, memory.output_weight, memory.output_bias)

    def loss(self, t: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Training: mean cross-entropy of t (tokens, output_size) against targets (tokens,)."""
        return self.output.loss(self.dropout(t), targets, label_smoothing)


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

    def search_weights(self) -> SearchWeights:
        """The weights a search reads at every batch, made once for it in the precision of the
        autocast context it is called in (the search's own)."""
        dtype = autocast_dtype(next(self.parameters()).device)
        with torch.no_grad():
            encoder_hh = [self.encoder.recurrent_weights(layer, dtype) for layer in range(self.cfg.enc_layers)]
            return SearchWeights(encoder_hh, *self.decoder.search_weights(dtype))

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor, weights: SearchWeights | None = None):
        """The memory and the decoder's initial state of a batch; a search passes its weights."""
        states, summary = self.encoder(src_ids, src_lens, weights.encoder_hh if weights is not None else None)
        keys = self.decoder.attention.project_keys(states)
        memory = self.decoder.prepare(Memory(keys, states, src_ids != PAD_ID, summary), weights)
        return memory, self.decoder.init_state(summary)

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Training: the mean cross-entropy per real target token of the batch (nmt.batches.Batch's
        tensors). The vocabulary projection runs once, over the real tokens of all steps."""
        outputs, _ = self.teacher_forced(src_ids, src_lens, tgt_in)  # (batch, tgt_len, output_size)
        real = tgt_out != PAD_ID
        return self.decoder.loss(outputs[real], tgt_out[real], label_smoothing)

    def teacher_forced(self, src_ids: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor):
        """tgt_in (batch, tgt_len) starts with BOS → t (batch, tgt_len, output_size) and attention
        (batch, tgt_len, src_len) or None (fixed context), every step reading the reference's
        previous token."""
        decoder = self.decoder
        memory, state = self.encode(src_ids, src_lens)
        # Everything that does not depend on the previous step is computed for all steps at once:
        # the embeddings and their input projection here, the contexts and the deep output after
        # the loop (unless input feeding needs t_i at the next step).
        embedded = decoder.dropout(decoder.word_dropout(decoder.embed(tgt_in)))  # (batch, tgt_len, embed)
        projected = decoder.project_embeddings(embedded)  # (batch, tgt_len, gates * decoder_size)
        states, contexts, weights, outputs = [], [], [], []
        # unbind, not projected[:, i]: the backward of T slices would be T zero-filled
        # (batch, tgt_len, ...) tensors summed up; unbind's backward is one stack.
        steps = zip(projected.unbind(1), embedded.unbind(1))
        for projected_i, embedded_i in steps:
            s_i, context, w, state = decoder.recur(projected_i, state, memory)
            if self.cfg.input_feeding:
                state.output = decoder.deep_output(s_i, context, embedded_i)
                outputs.append(state.output)
            states.append(s_i)
            contexts.append(context)
            weights.append(w)
        attn = torch.stack(weights, dim=1) if weights[0] is not None else None  # (batch, tgt, src)
        if self.cfg.input_feeding:
            return torch.stack(outputs, dim=1), attn
        outputs = decoder.deep_output(torch.stack(states, dim=1), torch.stack(contexts, dim=1), embedded)
        return outputs, attn

    def decode_step(self, prev_ids: torch.Tensor, state: DecoderState, memory: Memory):
        """Inference: prev_ids (batch,) → log-probabilities (batch, vocab), new state, attention."""
        embedded = self.decoder.embed(prev_ids)  # (batch, embed)
        t_i, state, weights = self.decoder.step(embedded, state, memory)
        return self.decoder.log_probs(t_i, memory), state, weights


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    try:
        return Seq2Seq(cfg, src_vocab_size, tgt_vocab_size)
    except (RuntimeError, MemoryError) as err:  # sizes that pass validation but not the machine
        if isinstance(err, RuntimeError) and "allocate" not in str(err):
            raise
        wanted = re.search(r"allocate (\d+) bytes", str(err))
        size = f" (a tensor of {int(wanted.group(1)) / 2**30:.1f} GiB)" if wanted else ""
        raise NmtError(f"model: the model does not fit in memory{size}; lower the sizes in the model "
                       "section") from None


def bos_column(batch: int, device) -> torch.Tensor:
    return torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
