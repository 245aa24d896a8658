"""Greedy and batched beam search → hypotheses with scores and attention.

Both decode a whole batch of sentences at once. Beam search keeps beam × batch rows: at every step
it takes the 2·beam best continuations of each sentence, moves those ending in EOS (within the top
beam) out into the sentence's finished list with their attention, and refills the beam from the
rest, so the beam stays full (as in fairseq). A sentence is done when it has `beam_size` finished
hypotheses; the search ends when every sentence is done. Length normalisation is applied when a
hypothesis finishes: GNMT's ((5 + |y|) / 6) ** alpha (Wu et al. 2016, eq. 14), the plain average
log-probability, or none.

Every function takes the decode settings whole (nmt.config.DecodeConfig: beam size, batch size,
length limits and penalty); search_corpus runs greedy search for beam size 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nmt.batches import pad, sentence_batches
from nmt.config import DecodeConfig
from nmt.device import autocast
from nmt.model import SearchWeights, Seq2Seq, bos_column
from nmt.subword import EOS_ID


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # normalised log-probability (the ranking score)
    log_prob: float  # total log-probability, EOS included
    attention: torch.Tensor | None  # (len(tokens) + 1, src_len), the EOS row included


def normalise(log_prob: float, length: int, length_penalty: str, alpha: float) -> float:
    """length counts the output tokens including EOS."""
    if length_penalty == "gnmt":
        return log_prob / (((5.0 + length) / 6.0) ** alpha)
    if length_penalty == "avg":
        return log_prob / length
    return log_prob


def max_lengths(src_lens: torch.Tensor, a: float, b: int) -> torch.Tensor:
    return (src_lens.float() * a + b).long().clamp(min=1)  # output tokens, EOS included


@torch.no_grad()
def greedy_search(model: Seq2Seq, src_ids: torch.Tensor, src_lens: torch.Tensor,
                  decode: DecodeConfig, weights: SearchWeights | None = None) -> list[Hypothesis]:
    """The most probable token at each step; scores normalised like beam search's. A sentence
    that has produced EOS leaves the batch, so the last steps only compute the long ones.
    src_ids (batch, src_len), src_lens (batch,) → one hypothesis per sentence. `weights`: the
    model's search_weights, if the caller made them for several batches."""
    batch, device = src_ids.size(0), src_ids.device
    memory, state = model.encode(src_ids, src_lens, weights if weights is not None else model.search_weights())
    limits = max_lengths(src_lens, decode.max_len_a, decode.max_len_b).to(device)
    max_steps = int(limits.max())
    live = torch.arange(batch, device=device)  # the sentence of each row still decoding
    tokens = torch.zeros(batch, max_steps, dtype=torch.long, device=device)
    attention = None  # (batch, max_steps, src_len)
    log_probs = torch.zeros(batch, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    prev = bos_column(batch, device)
    for step in range(max_steps):
        step_log_probs, state, attn = model.decode_step(prev, state, memory)  # (rows, vocab), _, (rows, src_len)
        at_limit = limits[live] <= step + 1  # the last position allowed must be EOS
        if bool(at_limit.any()):
            step_log_probs[at_limit] = _only_eos(step_log_probs[at_limit])
        best_log_prob, best = step_log_probs.max(dim=-1)
        tokens[live, step] = best
        log_probs[live] += best_log_prob
        lengths[live] += 1
        if attn is not None:
            if attention is None:
                attention = torch.zeros(batch, max_steps, attn.size(1), device=device)
            attention[live, step] = attn.float()
        running = best != EOS_ID
        if not bool(running.any()):
            break
        if not bool(running.all()):  # finished sentences leave the batch
            keep = running.nonzero().squeeze(1)
            live, best = live[keep], best[keep]
            memory, state = memory.index_select(keep), state.index_select(keep)
        prev = best
    tokens, lengths, log_probs = tokens.tolist(), lengths.tolist(), log_probs.tolist()
    results = []
    for row in range(batch):
        n = lengths[row]
        score = normalise(log_probs[row], n, decode.length_penalty, decode.alpha)
        attn = attention[row, :n, : int(src_lens[row])].cpu() if attention is not None else None
        results.append(Hypothesis(tokens[row][: n - 1], score, log_probs[row], attn))
    return results


def _only_eos(log_probs: torch.Tensor) -> torch.Tensor:
    forced = torch.full_like(log_probs, float("-inf"))
    forced[:, EOS_ID] = log_probs[:, EOS_ID]
    return forced


class BeamSearch:
    """Beam search over a batch of sentences that may grow while it runs.

    add() encodes sentences and gives each beam_size rows; step() extends every beam by one token
    and returns the sentences that are done, each with its finished hypotheses, best first. Each
    sentence counts its own steps from when it was added, so its hypotheses do not depend on when
    it joined or which sentences share its steps (the model is padding-invariant): beam_search()
    adds one batch and steps until it is done, and nmt serve adds requests' sentences as they come
    (nmt.batcher), so that a short sentence's answer need not wait for a long one's.

    Per live sentence: its `tags` (the caller's name for it), the steps it has taken, its output
    length limit and source length, and its finished hypotheses. Per row (k for each sentence, in
    sentence order): the beam's score, previous token, decoder state, and its tokens so far in
    `history` (rows, columns), right-aligned: a sentence that joined later has fewer columns of its
    own, and the columns are cut to the longest live one's. The memory and the attention history
    are as wide as the longest live source.

    The model's search_weights are made at the first add(), in its autocast context (which must
    stay the same for the search's life), and kept: the weights must not change meanwhile."""

    def __init__(self, model: Seq2Seq, decode: DecodeConfig, weights: SearchWeights | None = None):
        self.model, self.decode, self.k = model, decode, decode.beam_size
        self.weights = weights
        self._reset()

    def _reset(self) -> None:
        self.tags: list = []
        self.steps: list[int] = []
        self.limits: list[int] = []
        self.src_lens: list[int] = []
        self.finished: list[list[Hypothesis]] = []
        self.width = 0  # source positions of the memory
        self.memory = self.state = self.scores = self.prev = self.history = None
        self.attn_history: torch.Tensor | None = None  # (rows, columns, width)

    def __len__(self) -> int:
        return len(self.tags)

    @torch.no_grad()
    def add(self, src_ids: torch.Tensor, src_lens: torch.Tensor, tags: list) -> None:
        """Sentences to search, src_ids (batch, src_len) and src_lens (batch,) on the model's
        device, none of them empty; `tags` name them in what step() returns."""
        batch, device, k = src_ids.size(0), src_ids.device, self.k
        if self.weights is None:
            self.weights = self.model.search_weights()
        memory, state = self.model.encode(src_ids, src_lens, self.weights)
        # Every sentence gets k rows; the encoder output (and attention keys) are expanded once.
        rows = torch.arange(batch, device=device).repeat_interleave(k)
        memory, state = memory.index_select(rows), state.index_select(rows)
        # Only the first row of each beam is live at the start, or the k rows would be k copies.
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0
        prev = bos_column(batch * k, device)
        columns = 0 if self.history is None else self.history.size(1)
        history = torch.zeros(batch * k, columns, dtype=torch.long, device=device)
        width, attn_history = max(self.width, src_ids.size(1)), self.attn_history
        if self.memory is not None:  # joined to the sentences searching (nothing changes until all is made)
            memory, state = self.memory.concat(memory), self.state.concat(state)
            scores, prev = torch.cat([self.scores, scores]), torch.cat([self.prev, prev])
            history = torch.cat([self.history, history])
            if attn_history is not None:  # no attention yet for the new rows, zeros beyond a source's end
                old = attn_history
                attn_history = old.new_zeros(old.size(0) + batch * k, columns, width)
                attn_history[: old.size(0), :, : old.size(2)] = old
        self.memory, self.state, self.scores, self.prev, self.history = memory, state, scores, prev, history
        self.attn_history, self.width = attn_history, width
        self.tags += tags
        self.steps += [0] * batch
        self.limits += max_lengths(src_lens, self.decode.max_len_a, self.decode.max_len_b).tolist()
        self.src_lens += src_lens.tolist()
        self.finished += [[] for _ in range(batch)]

    @torch.no_grad()
    def step(self) -> list[tuple[object, list[Hypothesis]]]:
        """One token more for every beam → (tag, hypotheses best first) of each sentence that is
        done: it has beam_size finished hypotheses, or has reached its length limit."""
        k, decode, device = self.k, self.decode, self.prev.device
        n = len(self.tags)
        log_probs, state, attn = self.model.decode_step(self.prev, self.state, self.memory)  # (n * k, vocab)
        at_limit = [limit <= steps + 1 for limit, steps in zip(self.limits, self.steps)]
        if any(at_limit):  # the last position allowed must be EOS
            forced = torch.tensor(at_limit, device=device).repeat_interleave(k)
            log_probs[forced] = _only_eos(log_probs[forced])
        vocab = log_probs.size(-1)
        candidates = (self.scores.view(-1, 1) + log_probs).view(n, k * vocab)
        # 2k candidates: even if k of them end in EOS, k live ones remain to fill the beam.
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)  # (n, 2k)
        origin = top_index // vocab  # which beam row of the sentence each candidate extends
        token = top_index % vocab
        if attn is not None:
            step_attn = attn.float().unsqueeze(1)
            self.attn_history = step_attn if self.attn_history is None else torch.cat([self.attn_history, step_attn], 1)

        # Candidates ending in EOS among the top k finish, with their attention.
        is_eos = (token == EOS_ID) & torch.isfinite(top_scores)
        finishing = is_eos[:, :k].nonzero().tolist()
        if finishing:
            finishing_scores, finishing_origin = top_scores[:, :k].tolist(), origin[:, :k].tolist()
            columns = self.history.size(1)
            for i, cand in finishing:
                if len(self.finished[i]) >= k:
                    continue
                source_row, raw, length = i * k + finishing_origin[i][cand], finishing_scores[i][cand], self.steps[i]
                hyp_attn = None
                if self.attn_history is not None:  # this sentence's steps, this one's included
                    hyp_attn = self.attn_history[source_row, -(length + 1):, : self.src_lens[i]].cpu()
                self.finished[i].append(Hypothesis(self.history[source_row, columns - length:].tolist(),
                                                   normalise(raw, length + 1, decode.length_penalty, decode.alpha),
                                                   raw, hyp_attn))
        self.steps = [steps + 1 for steps in self.steps]
        # A sentence with k finished hypotheses, or at its length limit, is done and leaves.
        keep = [i for i in range(n) if len(self.finished[i]) < k and self.limits[i] > self.steps[i]]
        done = [(self.tags[i], sorted(self.finished[i], key=lambda h: h.score, reverse=True))
                for i in sorted(set(range(n)) - set(keep))]
        if not keep:
            self._reset()
            return done

        # Refill each beam with its k best candidates that did not end in EOS.
        live_scores = top_scores.masked_fill(is_eos, float("-inf"))
        scores, pick = live_scores.topk(k, dim=1)  # (n, k)
        source_rows = torch.arange(n, device=device).unsqueeze(1) * k + origin.gather(1, pick)
        prev = token.gather(1, pick)
        memory = self.memory
        if len(keep) < n:
            kept = torch.tensor(keep, device=device)
            scores, source_rows, prev = scores[kept], source_rows[kept], prev[kept]
            memory = memory.index_select((kept.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1))
            for name in ("tags", "steps", "limits", "src_lens", "finished"):
                setattr(self, name, [getattr(self, name)[i] for i in keep])
        source_rows, self.prev, self.scores = source_rows.view(-1), prev.view(-1), scores
        history = torch.cat([self.history.index_select(0, source_rows), self.prev.unsqueeze(1)], dim=1)
        attn_history = self.attn_history.index_select(0, source_rows) if self.attn_history is not None else None
        self.state = state.index_select(source_rows)
        # no more columns than the longest live sentence has steps, no wider than its longest source
        longest, widest = max(self.steps), max(self.src_lens)
        self.history = history[:, history.size(1) - longest:]
        if widest < self.width:
            memory, self.width = memory.narrow(widest), widest
        if attn_history is not None:
            attn_history = attn_history[:, attn_history.size(1) - longest:, : self.width]
        self.memory, self.attn_history = memory, attn_history
        return done


def beam_search(model: Seq2Seq, src_ids: torch.Tensor, src_lens: torch.Tensor, decode: DecodeConfig,
                nbest: int = 1, weights: SearchWeights | None = None) -> list[list[Hypothesis]]:
    """The `nbest` best hypotheses of each sentence, best first. src_ids (batch, src_len),
    src_lens (batch,); the beam has decode.beam_size rows per sentence."""
    search = BeamSearch(model, decode, weights)
    search.add(src_ids, src_lens, list(range(src_ids.size(0))))
    results: list[list[Hypothesis]] = [[] for _ in range(src_ids.size(0))]
    while search:
        for sentence, hyps in search.step():
            results[sentence] = hyps[:nbest]
    return results


def search_corpus(model: Seq2Seq, src_seqs: list, decode: DecodeConfig, precision: str = "fp32",
                  nbest: int = 1) -> list[list[Hypothesis]]:
    """Decode many sentences (lists of source ids) in length-sorted batches of decode.batch_size,
    on the model's device, in the resolved `precision` (fp32 | bf16); results in input order.
    Beam size 1 is greedy search. An empty source gives an empty hypothesis without decoding."""
    device = next(model.parameters()).device
    results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0, None)] for _ in src_seqs]
    lengths = np.array([len(s) for s in src_seqs], dtype=np.int64)
    non_empty = np.flatnonzero(lengths > 0)
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        weights = model.search_weights()  # once for all batches
        for batch in sentence_batches(lengths[non_empty], decode.batch_size):
            indices = non_empty[batch]
            src_ids, src_lens = pad([src_seqs[i] for i in indices])
            src_ids, src_lens = src_ids.to(device), src_lens.to(device)
            if decode.beam_size == 1:
                hyps = [[h] for h in greedy_search(model, src_ids, src_lens, decode, weights)]
            else:
                hyps = beam_search(model, src_ids, src_lens, decode, nbest, weights)
            for i, h in zip(indices, hyps):
                results[i] = h
    model.train(was_training)
    return results
