"""Attention over SentencePiece pieces → soft and hard alignments between words.

A word is a piece that starts with "▁" (SentencePiece's word-boundary mark) and the pieces that
follow it up to the next such piece. Attention is merged from pieces to words by *summing* over the
source pieces of a word (attention is a distribution over source positions, so the sum is the
weight on the word) and *averaging* over the target pieces of a word (each target piece is one
decoder step with its own distribution, and the word's is their mean). Rows of the merged matrix
still sum to 1.
"""

from __future__ import annotations

import torch

WORD_START = "\u2581"


def word_index(pieces: list[str]) -> list[int]:
    """The word each piece belongs to. A bare "▁" before another word-start piece holds no text
    (detokenised, it is just a space), so it joins the word that follows."""
    index, current, has_text = [], -1, False
    for piece in pieces:
        if current < 0 or (piece.startswith(WORD_START) and has_text):
            current, has_text = current + 1, False
        has_text = has_text or bool(piece.lstrip(WORD_START))
        index.append(current)
    return index


def words_of(pieces: list[str]) -> list[str]:
    words: list[str] = []
    for piece, w in zip(pieces, word_index(pieces)):
        if w == len(words):
            words.append("")
        words[w] += piece
    return [w.lstrip(WORD_START) or WORD_START for w in words]  # "▁": a word without text


def merge_attention(attention: torch.Tensor, src_pieces: list[str], tgt_pieces: list[str]) -> torch.Tensor:
    """attention (tgt_pieces, src_pieces), without the EOS row → (tgt_words, src_words)."""
    src_index = torch.tensor(word_index(src_pieces))
    tgt_index = torch.tensor(word_index(tgt_pieces))
    n_src, n_tgt = int(src_index.max()) + 1, int(tgt_index.max()) + 1
    by_src_word = torch.zeros(attention.size(0), n_src).index_add_(1, src_index, attention.float())
    summed = torch.zeros(n_tgt, n_src).index_add_(0, tgt_index, by_src_word)
    counts = torch.bincount(tgt_index, minlength=n_tgt).clamp(min=1).unsqueeze(1)
    return summed / counts


def hard_alignment(merged: torch.Tensor, tgt_words: list[str]) -> str:
    """Each target word aligned to its most attended source word, as 'src-tgt' pairs (0-based
    over the words of the detokenised text: a word without text is no word there)."""
    pairs, j = [], 0
    for row, word in zip(merged, tgt_words):
        if word.strip(WORD_START):
            pairs.append(f"{int(row.argmax())}-{j}")
            j += 1
    return " ".join(pairs)
