"""Subword regularization: SentencePiece's segmentations sampled from our own random generators
(unigram sampling, Kudo 2018; BPE-dropout, Provilkov et al. 2020).

SentencePiece samples them itself (`encode(enable_sampling=True)`), but its generator is salted
per process (abseil's seed material): `set_random_generator_seed` repeats a sample within one
process only. A resumed run could not re-derive its epoch's segmentation, and two runs with the
same seed would train on different data. So we draw the same distributions from numpy:

- unigram, nbest -1: forward-filtering backward-sampling over every segmentation, each with
  probability proportional to exp(alpha * its log-probability), as SentencePiece's lattice scores it;
- unigram, nbest l: one of the l best segmentations (SentencePiece's n-best), with those weights;
- bpe: SentencePiece's merge loop, each merge skipped with probability alpha.

Words are sampled one by one: a piece holds '▁' only at its start, so a line's segmentations are
its words' segmentations side by side, and sampling each word samples the line (with nbest l, the
l best of each word rather than of the line). `Segmenter.first_difference` checks this against
SentencePiece: unsampled, we must segment a text as it does.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from itertools import chain

import numpy as np
import sentencepiece as spm

SPACE = "\u2581"  # SentencePiece's visible space, which starts a word
UNK_PENALTY = 10.0  # an unknown character scores the lowest piece score minus this (as SentencePiece)
_WORDS = re.compile(f"{SPACE}?[^{SPACE}]+|{SPACE}")


@dataclass
class Words:
    """Lines as SentencePiece segments them: normalized, then cut before each '▁'."""

    texts: list[str]  # the distinct words
    occurrences: np.ndarray  # (words of all lines,) index into texts, line after line
    line_offsets: np.ndarray  # (lines + 1,) where each line's words start in `occurrences`

    @classmethod
    def of(cls, lines: list[str], processor: spm.SentencePieceProcessor) -> Words:
        index: dict[str, int] = {}
        occurrences, counts = [], np.zeros(len(lines), dtype=np.int64)
        for i, text in enumerate(processor.normalize(lines) if lines else []):
            words = _WORDS.findall(text)
            counts[i] = len(words)
            occurrences.extend(index.setdefault(word, len(index)) for word in words)
        return cls(list(index), np.asarray(occurrences, dtype=np.int64), _offsets(counts))


class Pieces:
    """The pieces a segmentation may use (no specials), by surface, and every piece's score."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        size = processor.get_piece_size()
        self.unk_id = processor.unk_id()
        self.scores = np.array([processor.get_score(i) for i in range(size)], dtype=np.float32)
        self.ids = {processor.id_to_piece(i): i for i in range(size)
                    if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i)
                            or processor.is_byte(i))}
        lowest = min((float(self.scores[i]) for i in self.ids.values()), default=0.0)
        self.unk_score = np.float32(lowest - UNK_PENALTY)
        self.max_len = max(map(len, self.ids), default=1)

    def line_scores(self, flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Log-probability of each line's segmentation (float64 sums of the float32 scores)."""
        scores = np.where(flat == self.unk_id, self.unk_score, self.scores[flat]).astype(np.float64)
        return np.add.reduceat(np.r_[scores, 0.0], offsets[:-1]) * (np.diff(offsets) > 0)


@dataclass
class Lattice:
    """Every segmentation of every distinct word: arcs between character positions. Node
    `node_base[w] + e` is word w after its e-th character; arcs are sorted by their end node, then
    their start node (as SentencePiece's lattice orders them)."""

    node_base: np.ndarray  # (words,)
    word_len: np.ndarray  # (words,) characters
    arc_from: np.ndarray  # (arcs,) node
    arc_to: np.ndarray  # (arcs,) node
    arc_piece: np.ndarray  # (arcs,) SentencePiece id; unk for an unknown character
    arc_score: np.ndarray  # (arcs,) float32 log-probability
    by_end: list[np.ndarray]  # the arcs that end after character e of their word, e = 1, 2, ...

    @classmethod
    def of(cls, texts: list[str], pieces: Pieces) -> Lattice:
        starts, ends, ids, node_base, nodes = [], [], [], [], 0
        for text in texts:
            node_base.append(nodes)
            for s in range(len(text)):
                single = False
                for e in range(s + 1, min(len(text), s + pieces.max_len) + 1):
                    piece = pieces.ids.get(text[s:e])
                    if piece is not None:
                        starts.append(nodes + s), ends.append(nodes + e), ids.append(piece)
                        single |= e == s + 1
                if not single:  # as SentencePiece: a character no piece starts with is one unk
                    starts.append(nodes + s), ends.append(nodes + s + 1), ids.append(pieces.unk_id)
            nodes += len(text) + 1
        arc_from, arc_to = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        order = np.lexsort((arc_from, arc_to))
        arc_from, arc_to, arc_piece = arc_from[order], arc_to[order], np.asarray(ids, dtype=np.int64)[order]
        arc_score = np.where(arc_piece == pieces.unk_id, pieces.unk_score, pieces.scores[arc_piece])
        word_len = np.asarray([len(t) for t in texts], dtype=np.int64)
        node_base = np.asarray(node_base, dtype=np.int64)
        end_pos = arc_to - np.repeat(node_base, word_len + 1)[arc_to]
        by_end = [np.flatnonzero(end_pos == e) for e in range(1, int(word_len.max(initial=0)) + 1)]
        return cls(node_base, word_len, arc_from, arc_to, arc_piece, arc_score.astype(np.float32), by_end)

    def best_arcs(self) -> np.ndarray:
        """For each node, the arc into it on the best path (Viterbi), as SentencePiece takes it:
        float32 sums, a tie to the arc that starts first."""
        best = np.zeros(len(self.node_base) + int(self.word_len.sum()), dtype=np.float32)
        choice = np.full(len(best), -1, dtype=np.int64)
        for arcs in self.by_end:
            values = best[self.arc_from[arcs]] + self.arc_score[arcs]
            first, sizes, to = _runs(self.arc_to[arcs])
            top = np.maximum.reduceat(values, first)
            position = np.where(values == np.repeat(top, sizes), np.arange(len(arcs)), len(arcs))
            best[to], choice[to] = top, arcs[np.minimum.reduceat(position, first)]
        return choice

    def sampling_keys(self, alpha: float) -> np.ndarray:
        """Forward filtering: for each arc, its end node plus the cumulative probability, among
        the arcs into that node, of coming through it. Backward sampling then finds the arc for a
        node and a uniform draw u by one binary search for node + u."""
        weight = alpha * self.arc_score.astype(np.float64)
        forward = np.zeros(len(self.node_base) + int(self.word_len.sum()))  # log-sum of paths to a node
        for arcs in self.by_end:
            values = forward[self.arc_from[arcs]] + weight[arcs]
            first, sizes, to = _runs(self.arc_to[arcs])
            top = np.maximum.reduceat(values, first)
            forward[to] = top + np.log(np.add.reduceat(np.exp(values - np.repeat(top, sizes)), first))
        prob = np.exp(forward[self.arc_from] + weight - forward[self.arc_to])
        first, sizes, _ = _runs(self.arc_to)
        cum = np.cumsum(prob)
        cum -= np.repeat(cum[first] - prob[first], sizes)  # cumulative within each node's arcs
        last = first + sizes - 1
        cum /= np.repeat(cum[last], sizes)
        cum[last] = 1.0  # exactly, so that every u < 1 finds an arc of its node
        return self.arc_to + cum

    def walk(self, words: np.ndarray, choose) -> tuple[np.ndarray, np.ndarray]:
        """From the end of each word of `words` back to its start, taking the arc `choose(nodes)`
        into each node: (the words' pieces in order, (len(words) + 1,) offsets)."""
        node = self.node_base[words] + self.word_len[words]
        start = self.node_base[words]
        active = np.arange(len(words))
        owners, steps, pieces, step = [], [], [], 0
        while len(active):
            arc = choose(node)
            owners.append(active), steps.append(np.full(len(active), step)), pieces.append(self.arc_piece[arc])
            node = self.arc_from[arc]
            more = node != start[active]
            active, node, step = active[more], node[more], step + 1
        owner, step_of, piece = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (owners, steps, pieces))
        order = np.lexsort((-step_of, owner))  # each word's pieces were found last to first
        return piece[order], _offsets(np.bincount(owner, minlength=len(words)))


class Bpe:
    """SentencePiece's BPE segmentation of a word, each merge skipped with probability `dropout`:
    the adjacent pair whose union is the best-scoring piece merges first (ties: the leftmost),
    until no adjacent pair makes a piece."""

    def __init__(self, pieces: Pieces):
        self.unk_id = pieces.unk_id
        self.pieces = {p: (i, -float(pieces.scores[i])) for p, i in pieces.ids.items()}  # min-heap
        self._pairs: dict[str, list] = {}  # per word: the heap of its characters' pairs

    def segment(self, word: str, dropout: float = 0.0, draw=None) -> list[int]:
        pieces = self.pieces
        heap = self._pairs.get(word)
        if heap is None:
            heap = [(pieces[word[i:i + 2]][1], i, i + 1, 2) for i in range(len(word) - 1) if word[i:i + 2] in pieces]
            heapify(heap)
            self._pairs[word] = heap
        heap, symbols = heap.copy(), list(word)
        prev, next_ = list(range(-1, len(word) - 1)), [*range(1, len(word)), -1]
        while heap:
            _, left, right, size = heappop(heap)
            merged = symbols[left] + symbols[right]
            if not symbols[left] or not symbols[right] or len(merged) != size:
                continue  # a side merged with its other neighbour since
            if dropout and draw() < dropout:
                continue
            symbols[left], symbols[right] = merged, ""
            after = next_[left] = next_[right]
            if after >= 0:
                prev[after] = left
                if (pair := merged + symbols[after]) in pieces:
                    heappush(heap, (pieces[pair][1], left, after, len(pair)))
            if (before := prev[left]) >= 0 and (pair := symbols[before] + merged) in pieces:
                heappush(heap, (pieces[pair][1], before, left, len(pair)))
        return [pieces[s][0] if s in pieces else self.unk_id for s in symbols if s]


class Segmenter:
    """One side of a split, segmented by one SentencePiece model: unsampled (`best`) or sampled
    (`sample`), as flat ids and line offsets. Built once per run; each sample costs a few numpy
    passes over the words (unigram), or BPE runs for the words that drop a merge (bpe)."""

    def __init__(self, lines: list[str], processor: spm.SentencePieceProcessor, model_type: str,
                 alpha: float, nbest: int = -1):
        self.words = Words.of(lines, processor)
        self.pieces = Pieces(processor)
        self.alpha, self.bpe = alpha, Bpe(self.pieces) if model_type == "bpe" else None
        if self.bpe is not None:  # each word unsampled, and the merges it makes
            best = [self.bpe.segment(w) for w in self.words.texts]
            self.best_flat, self.best_offsets = _pack(best)
            self.merges = np.array([len(w) - len(s) for w, s in zip(self.words.texts, best)], dtype=np.int64)
        else:
            self.lattice = Lattice.of(self.words.texts, self.pieces)
            every_word = np.arange(len(self.words.texts))
            choice = self.lattice.best_arcs()
            self.best_flat, self.best_offsets = self.lattice.walk(every_word, lambda node: choice[node])
            if nbest > 0:
                self.nbest = self._nbest(processor, nbest)
            else:
                self.nbest, self.keys = None, self.lattice.sampling_keys(alpha)

    def _nbest(self, processor: spm.SentencePieceProcessor, nbest: int):
        """Each word's `nbest` best segmentations (SentencePiece's, which are deterministic), packed,
        with each one's word and cumulative probability among its word's, as sampling_keys."""
        raw = [w.replace(SPACE, " ") for w in self.words.texts]
        lists = processor.nbest_encode(raw, nbest_size=nbest) if raw else []
        flat, offsets = _pack([s for segmentations in lists for s in segmentations])
        word = np.repeat(np.arange(len(lists)), [len(s) for s in lists])
        weight = np.exp(self.alpha * (self.pieces.line_scores(flat, offsets) - self.pieces.line_scores(
            self.best_flat, self.best_offsets)[word]))  # relative to the best: no overflow
        first, sizes, _ = _runs(word)
        cum = np.cumsum(weight)
        cum -= np.repeat(cum[first] - weight[first], sizes)
        cum /= np.repeat(cum[first + sizes - 1], sizes)
        cum[first + sizes - 1] = 1.0
        return flat, offsets, word + cum

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """The unsampled segmentation, which SentencePiece's encode gives."""
        return self._join(*_gather(self.best_flat, self.best_offsets, self.words.occurrences))

    def first_difference(self, flat: np.ndarray, offsets: np.ndarray) -> int | None:
        """The first line that SentencePiece (`flat`, `offsets`: its encoding of the same lines)
        segments otherwise than `best`, or None. For unigram, otherwise means with another score:
        SentencePiece breaks exact ties (a 0+00 for a 00+0) by its float32 rounding over the line."""
        ours, our_offsets = self.best()
        if self.bpe is None:
            theirs, mine = self.pieces.line_scores(flat, offsets), self.pieces.line_scores(ours, our_offsets)
            differ = ~np.isclose(mine, theirs, rtol=1e-5, atol=1e-4) if len(mine) == len(theirs) else [True]
        elif len(ours) == len(flat) and np.array_equal(our_offsets, offsets):
            differ = ours != flat[: len(ours)]
            differ = np.bincount(np.searchsorted(offsets, np.flatnonzero(differ), "right") - 1,
                                 minlength=len(offsets) - 1) > 0
        else:
            differ = np.diff(our_offsets) != np.diff(offsets) if len(our_offsets) == len(offsets) else [True]
        found = np.flatnonzero(differ)
        return int(found[0]) if len(found) else None

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        occurrences = self.words.occurrences
        if self.bpe is not None:
            return self._join(*self._dropout(rng))
        if self.nbest is not None:
            flat, offsets, keys = self.nbest
            chosen = np.searchsorted(keys, occurrences + rng.random(len(occurrences)), side="right")
            return self._join(*_gather(flat, offsets, chosen))
        keys = self.keys
        return self._join(*self.lattice.walk(
            occurrences, lambda node: np.searchsorted(keys, node + rng.random(len(node)), side="right")))

    def _dropout(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BPE-dropout, mostly without running BPE: each word draws one number per merge of its
        unsampled segmentation; if none falls below alpha, no merge was skipped and that is its
        segmentation. The others run the merge loop taking those same draws first, then more:
        exactly as if every word had run it."""
        occurrences, texts = self.words.occurrences, self.words.texts
        merges = self.merges[occurrences]
        draws = rng.random(int(merges.sum()))
        first_draw = _offsets(merges)
        skipped = np.zeros(len(occurrences), dtype=bool)
        skipped[np.repeat(np.arange(len(occurrences)), merges)[draws < self.alpha]] = True
        more = iter(random.Random(int(rng.integers(2**63))).random, None)  # the draws after those
        runs = [self.bpe.segment(texts[occurrences[i]], self.alpha,
                                 chain(draws[first_draw[i]:first_draw[i + 1]].tolist(), more).__next__)
                for i in np.flatnonzero(skipped).tolist()]
        run_flat, run_offsets = _pack(runs)
        # One pool: each word's unsampled segmentation, then the runs; each occurrence takes one.
        source = np.where(skipped, len(texts) + np.cumsum(skipped) - 1, occurrences)
        return _gather(np.r_[self.best_flat, run_flat],
                       np.r_[self.best_offsets[:-1], run_offsets + len(self.best_flat)], source)

    def _join(self, flat: np.ndarray, word_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The words' pieces → the lines' pieces, a run of unknowns one unk (as SentencePiece)."""
        line_offsets = word_offsets[self.words.line_offsets]
        line = np.repeat(np.arange(len(line_offsets) - 1), np.diff(line_offsets))
        unk = flat == self.pieces.unk_id
        repeated = np.r_[False, unk[1:] & unk[:-1] & (line[1:] == line[:-1])]
        if repeated.any():
            flat = flat[~repeated]
            line_offsets = _offsets(np.bincount(line[~repeated], minlength=len(line_offsets) - 1))
        return flat.astype(np.int32), line_offsets


def possible_pieces(lines: list[str], processor: spm.SentencePieceProcessor) -> np.ndarray:
    """Every piece that some segmentation of these lines uses, sorted: each piece whose surface
    occurs within a word, and unk for a character no piece covers. It holds every sample of
    either sampler (BPE-dropout's are segmentations too)."""
    pieces = Pieces(processor)
    return np.unique(Lattice.of(Words.of(lines, processor).texts, pieces).arc_piece)


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _pack(sequences: list) -> tuple[np.ndarray, np.ndarray]:
    offsets = _offsets(np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)))
    flat = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def _gather(flat: np.ndarray, offsets: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequences `which` of the packed (flat, offsets), packed in that order."""
    lengths = offsets[1:][which] - offsets[:-1][which] if len(which) else np.zeros(0, np.int64)
    new_offsets = _offsets(lengths)
    index = np.repeat(offsets[:-1][which] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return flat[index], new_offsets


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of equal values in a sorted array: their starts, sizes and values."""
    if not len(sorted_keys):
        return sorted_keys, sorted_keys, sorted_keys
    first = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return first, np.diff(np.r_[first, len(sorted_keys)]), sorted_keys[first]
