"""What a translation gives its user: plain typed records, without tensors (nmt.Translator makes them).

Attention is given over words, not SentencePiece pieces, merged as `nmt compare` and
`nmt translate --alignments` merge it (nmt.align): weights summed over a word's source pieces and
averaged over its target pieces, the EOS step left out, so each row still sums to 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WordAttention:
    source_words: list[str]
    target_words: list[str]
    weights: list[list[float]]  # (target words, source words); each row sums to 1


@dataclass(frozen=True)
class Candidate:
    """One translation of a source sentence, as `nmt translate --nbest` ranks it."""

    text: str
    score: float  # the ranking score: log-probability normalised for length (decode.length_penalty)
    log_prob: float  # total log-probability, EOS included
    attention: WordAttention | None  # None when not asked for, or for a fixed-context model


@dataclass(frozen=True)
class Translation:
    source: str
    hypotheses: list[Candidate]  # best first; an empty source has one, empty

    @property
    def text(self) -> str:
        """The best translation: what `nmt translate` prints for the source line."""
        return self.hypotheses[0].text
