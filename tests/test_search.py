"""Search: a scripted decoder worked by hand, beam 1 == greedy, beam >= greedy, exhaustive optimum,
batch independence, and sentences joining a search that runs."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from nmt.batches import pad
from nmt.config import DecodeConfig
from nmt.ensemble import Ensemble
from nmt.model import DecoderState, Memory, bos_column, build_model
from nmt.search import BeamSearch, beam_search, greedy_search, normalise, search_corpus
from nmt.subword import BOS_ID, EOS_ID

from .synthetic import VOCAB, make_batch, random_strings, small_config, train_reversal

A, B = 4, 5  # the two real tokens of the scripted vocabulary


@pytest.fixture(scope="module")
def half_trained():
    """A reversal model stopped early: imperfect, so that search choices matter."""
    torch.set_num_threads(1)
    return train_reversal(small_config(embed_size=64), steps=120, seed=1, lr=1e-2)


class ScriptedDecoder(torch.nn.Module):
    """Next-token probabilities depend only on the prefix, written out by hand (as in fairseq's
    scripted-decoder tests). The "state" is the prefix itself, encoded as a base-8 number."""

    SCRIPT = {
        (): {A: 0.6, B: 0.4},
        (A,): {EOS_ID: 0.1, A: 0.45, B: 0.45},
        (B,): {EOS_ID: 0.9, A: 0.05, B: 0.05},
        (A, A): {EOS_ID: 1.0},
        (A, B): {EOS_ID: 1.0},
    }

    def search_weights(self):
        return None  # nothing to prepare: the script is the model

    def encode(self, src_ids, src_lens, weights=None):
        batch = src_ids.size(0)
        mask = torch.ones_like(src_ids, dtype=torch.bool)
        memory = Memory(None, torch.zeros(batch, src_ids.size(1), 1), mask, torch.zeros(batch, 1))
        return memory, DecoderState(torch.zeros(1, batch, 1), None, None)

    def decode_step(self, prev_ids, state, memory):
        prefixes = [self._prefix(int(code)) for code in state.hidden[0, :, 0]]
        logits = torch.full((len(prefixes), 6), -1e9)
        new_codes = []
        for row, (prefix, prev) in enumerate(zip(prefixes, prev_ids.tolist())):
            prefix = prefix + ((prev,) if prev != BOS_ID else ())
            for token, p in self.SCRIPT.get(prefix, {EOS_ID: 1.0}).items():
                logits[row, token] = math.log(p)
            new_codes.append(self._code(prefix))
        hidden = torch.tensor(new_codes, dtype=torch.float).view(1, -1, 1)
        return logits, DecoderState(hidden, None, None), None

    @staticmethod
    def _code(prefix):
        return sum((t + 1) * 8 ** i for i, t in enumerate(prefix))

    @staticmethod
    def _prefix(code):
        out = []
        while code:
            out.append(code % 8 - 1)
            code //= 8
        return tuple(out)


def test_scripted_decoder_worked_by_hand():
    model = ScriptedDecoder()
    src, lens = torch.ones(1, 3, dtype=torch.long), torch.tensor([3])
    # Greedy takes A (0.6), then A or B (0.45; the first wins ties), then EOS: p = 0.27.
    greedy = greedy_search(model, src, lens, DecodeConfig(max_len_a=0, max_len_b=5))[0]
    assert greedy.tokens == [A, A] and math.isclose(greedy.log_prob, math.log(0.6 * 0.45), rel_tol=1e-6)
    # Beam 2 keeps B (0.4) and finds B EOS: p = 0.36, better than anything through A.
    hyps = beam_search(model, src, lens, DecodeConfig(beam_size=2, max_len_a=0, max_len_b=5, length_penalty="none"),
                       nbest=2)[0]
    assert [h.tokens for h in hyps] == [[B], [A, A]] or [h.tokens for h in hyps] == [[B], [A, B]]
    assert math.isclose(hyps[0].log_prob, math.log(0.36), rel_tol=1e-6)
    assert math.isclose(hyps[1].log_prob, math.log(0.6 * 0.45), rel_tol=1e-6)


def test_beam_one_equals_greedy(half_trained):
    sources = random_strings(np.random.default_rng(5), 40, 5, 20)
    greedy = search_corpus(half_trained, sources, DecodeConfig(beam_size=1, length_penalty="none"))
    src_ids, src_lens = pad(sources)
    beam = beam_search(half_trained, src_ids, src_lens, DecodeConfig(beam_size=1, length_penalty="none"))
    for g, b in zip(greedy, beam):
        assert g[0].tokens == b[0].tokens
        assert math.isclose(g[0].log_prob, b[0].log_prob, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("penalty", ["gnmt", "avg", "none"])
def test_beam_never_scores_below_greedy(half_trained, penalty):
    sources = random_strings(np.random.default_rng(6), 60, 5, 20)
    greedy = search_corpus(half_trained, sources, DecodeConfig(beam_size=1, length_penalty=penalty, alpha=0.6))
    beam = search_corpus(half_trained, sources, DecodeConfig(beam_size=5, length_penalty=penalty, alpha=0.6))
    # Not a theorem: a sentence is done after beam_size finished hypotheses, so a long greedy path
    # that scores well once normalised can be missed. Over a corpus beam must still win.
    better = [b[0].score >= g[0].score - 1e-5 for g, b in zip(greedy, beam)]
    assert np.mean(better) >= 0.9, np.mean(better)
    assert np.mean([b[0].score for b in beam]) > np.mean([g[0].score for g in greedy])


def sequence_log_prob(model, src_ids, src_lens, tokens):
    memory, state = model.encode(src_ids, src_lens)
    prev, total = bos_column(1, "cpu"), 0.0
    for token in tokens:
        log_probs, state, _ = model.decode_step(prev, state, memory)
        total += float(log_probs[0, token])
        prev = torch.tensor([token])
    return total


@pytest.mark.parametrize("penalty", ["none", "gnmt"])
def test_wide_beam_finds_the_exhaustive_optimum(penalty):
    torch.manual_seed(4)
    vocab = 6  # pad, unk, bos, eos and two real tokens
    model = build_model(small_config(embed_size=8, hidden_size=8, decoder_size=8, attention_size=8,
                                     output_size=8), vocab, vocab).eval()
    with torch.no_grad():  # sharpen the random model so that the optimum is not trivially short
        model.decoder.output.weight.mul_(40)
        model.decoder.output.bias.mul_(40)
    src_ids, src_lens = torch.tensor([[4, 5, 4]]), torch.tensor([3])
    max_len = 4  # output tokens including EOS
    best = -math.inf
    with torch.no_grad():
        for length in range(max_len):
            for body in itertools.product(range(vocab), repeat=length):
                log_prob = sequence_log_prob(model, src_ids, src_lens, list(body) + [EOS_ID])
                best = max(best, normalise(log_prob, length + 1, penalty, 0.6))
    decode = DecodeConfig(beam_size=vocab ** (max_len - 1), max_len_a=0, max_len_b=max_len,
                          length_penalty=penalty, alpha=0.6)
    hyp = beam_search(model, src_ids, src_lens, decode)[0][0]
    assert math.isclose(hyp.score, best, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_results_do_not_depend_on_the_batch(half_trained, beam_size):
    sources = random_strings(np.random.default_rng(7), 24, 3, 20)
    together = search_corpus(half_trained, sources, DecodeConfig(beam_size=beam_size, batch_size=24))
    for source, batched in zip(sources, together):
        alone = search_corpus(half_trained, [source], DecodeConfig(beam_size=beam_size, batch_size=1))[0]
        assert alone[0].tokens == batched[0].tokens
        assert math.isclose(alone[0].score, batched[0].score, rel_tol=1e-4, abs_tol=1e-4)
        torch.testing.assert_close(alone[0].attention, batched[0].attention, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_in_bf16_a_sentence_gets_the_same_bits_alone_as_in_a_batch(cell):
    """Under bf16 autocast torch's fused RNN rounds differently with the batch size, so the
    encoder runs step by step at inference (Encoder._run_stepwise): a sentence's encoder states,
    tokens and scores must be bit for bit what it gets alone, whatever shares its batch; its
    attention weights may still differ by a few millionths (they come out of kernels that see
    rows padded wider). In fp32 a product of 1-3 rows may differ in its last bit from a bigger
    one's (the test above allows for that)."""
    torch.manual_seed(3)
    model = build_model(small_config(cell=cell, enc_layers=2), VOCAB, VOCAB).eval()
    sources = random_strings(np.random.default_rng(12), 9, 2, 16)
    src_ids, src_lens = pad(sources)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory, state = model.encode(src_ids, src_lens)
        for i, source in enumerate(sources):
            one_memory, one_state = model.encode(*pad([source]))
            n = len(source)
            assert torch.equal(one_memory.values[0, :n], memory.values[i, :n]), i
            assert torch.equal(one_state.hidden[:, 0], state.hidden[:, i]), i
    decode = DecodeConfig(beam_size=3, batch_size=9)
    together = search_corpus(model, sources, decode, precision="bf16", nbest=3)
    for source, batched in zip(sources, together):
        alone = search_corpus(model, [source], decode, precision="bf16", nbest=3)[0]
        assert [(h.tokens, h.log_prob) for h in alone] == [(h.tokens, h.log_prob) for h in batched]
        for a, b in zip(alone, batched):  # as in the fp32 test above
            torch.testing.assert_close(a.attention, b.attention, rtol=1e-4, atol=1e-5)


def test_attention_is_returned_per_hypothesis(half_trained):
    source = random_strings(np.random.default_rng(8), 1, 9, 9)
    hyp = search_corpus(half_trained, source, DecodeConfig(beam_size=3))[0][0]
    assert hyp.attention.shape == (len(hyp.tokens) + 1, 9)
    torch.testing.assert_close(hyp.attention.sum(-1), torch.ones(len(hyp.tokens) + 1))


def joining_models(half_trained):
    """Models of each kind of memory and state BeamSearch joins: the trained reversal model, and
    untrained ones (whose outputs run to the length limit): fixed context, an LSTM with Luong
    attention and input feeding, and an ensemble of two different models."""
    torch.manual_seed(11)
    fixed = build_model(small_config(attention="none"), VOCAB, VOCAB).eval()
    lstm = build_model(small_config(cell="lstm", attention="luong-general", input_feeding=True), VOCAB, VOCAB).eval()
    return {"bahdanau": half_trained, "fixed": fixed, "lstm": lstm, "ensemble": Ensemble([half_trained, lstm])}


@pytest.mark.parametrize("kind", ["bahdanau", "fixed", "lstm", "ensemble"])
def test_sentences_joining_a_running_search_get_what_they_get_alone(half_trained, kind):
    """nmt serve adds sentences to a search between its steps (BeamSearch.add): each must come out
    as it does decoded alone, whenever it joined, next to longer or shorter sources, and the
    search must keep no more width than its live sentences need."""
    model = joining_models(half_trained)[kind]
    rng = np.random.default_rng(9)
    waves = [random_strings(rng, 3, 4, 8), random_strings(rng, 2, 18, 22), random_strings(rng, 4, 3, 6)]
    decode = DecodeConfig(beam_size=4)
    search, results, widths = BeamSearch(model, decode), {}, []
    for wave, sources in enumerate(waves):
        assert wave == 0 or search, "the next wave must join a search that runs"
        src_ids, src_lens = pad(sources)
        search.add(src_ids, src_lens, [(wave, i) for i in range(len(sources))])
        # the long ones join after 3 steps and are near their end when the last short ones join
        for _ in range((3, 17, 10_000)[wave]):
            if not search:
                break
            for tag, hyps in search.step():
                assert tag not in results
                results[tag] = hyps
            widths.append((search.width, max(search.src_lens, default=0)))
    assert not search and len(results) == sum(map(len, waves))
    for wave, sources in enumerate(waves):
        for i, source in enumerate(sources):
            alone = search_corpus(model, [source], decode, nbest=4)[0]
            joined = results[(wave, i)]
            assert [h.tokens for h in joined] == [h.tokens for h in alone], (wave, i)
            for a, b in zip(alone, joined):
                assert math.isclose(a.score, b.score, rel_tol=1e-4, abs_tol=1e-4)
                if kind == "fixed":
                    assert a.attention is None and b.attention is None
                else:
                    torch.testing.assert_close(a.attention, b.attention, rtol=1e-4, atol=1e-5)
    # the memory was as wide as the longest live source at every step: padding left with the long ones
    assert all(width == longest for width, longest in widths if longest)
    assert max(width for width, _ in widths) >= 18


def test_a_search_after_an_optimizer_step_reads_the_new_weights(half_trained):
    """Training validates between updates with the same model object. A search must read the
    weights as they are now: torch's fused Adam updates them in place without counting a version,
    so weights kept from an earlier search (as a cache keyed on the version once did) would be
    stale. The updated model must decode exactly as a fresh copy of it does."""
    model = copy.deepcopy(half_trained)
    sources = [list(s) for s in random_strings(np.random.default_rng(3), 12, 3, 9)]
    decode = DecodeConfig(beam_size=3, batch_size=5)
    before = search_corpus(model, sources, decode)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    batch = make_batch(sources, [s[::-1] for s in sources])
    model.train()
    model(batch.src_ids, batch.src_lens, batch.tgt_in, batch.tgt_out).backward()
    optimizer.step()
    after = search_corpus(model, sources, decode)
    fresh = search_corpus(copy.deepcopy(model), sources, decode)
    assert [h[0].log_prob for h in after] == [h[0].log_prob for h in fresh]
    assert [h[0].log_prob for h in after] != [h[0].log_prob for h in before]
