"""Longer inputs built from a held-out set itself: k consecutive captions joined on both sides.

Multi30k captions are short (no test sentence has 30 words), so the long end of Bahdanau et al.'s
BLEU-by-length curve (their Fig. 2) is out of reach. Joining k consecutive lines, source with
source and reference with reference, gives inputs of up to about 80 words (k = 4) whose
references are still exact. They are joined captions, not natural long sentences: each part is
an independent sentence, which is easier than one long sentence of the same length, so a report
must say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nmt.evaluate import bleu_by_length, bucket_labels, score

# Source-length buckets of the joined inputs, in words: up to 80 (four captions) and beyond.
JOINED_EDGES = (10, 20, 30, 40, 50, 60, 70, 80)
JOINED_NOTE = ("Inputs of k > 1 are k consecutive captions joined on both sides, not natural long "
               "sentences: each part stays an independent caption.")


@dataclass
class JoinedSet:
    k: int  # captions per input line
    src: list[str]
    refs: list[str]


def _join(parts: list[str]) -> str:
    return " ".join(p.strip() for p in parts if p.strip())


def joined_sets(src: list[str], refs: list[str], max_k: int) -> list[JoinedSet]:
    """For k = 1..max_k, the lines i·k .. i·k+k-1 joined, for every whole group (a remainder of
    fewer than k lines is left out): len(src) // k inputs each."""
    if len(src) != len(refs):
        raise ValueError(f"{len(src)} sources but {len(refs)} references")
    sets = []
    for k in range(1, max_k + 1):
        starts = range(0, len(src) - k + 1, k)
        sets.append(JoinedSet(k, [_join(src[i:i + k]) for i in starts], [_join(refs[i:i + k]) for i in starts]))
    return sets


def joined_by_length(src: list[str], refs: list[str], hyps: list[str], translate: Callable[[list[str]], list[str]],
                     max_k: int, edges=JOINED_EDGES) -> dict:
    """BLEU of every joined set (k = 1 is the set as it is, decoded already: `hyps`; the others
    are decoded with `translate`) and BLEU by source length over all of them pooled."""
    pooled_src, pooled_refs, pooled_hyps, per_k = [], [], [], []
    for joined in joined_sets(src, refs, max_k):
        outputs = hyps if joined.k == 1 else translate(joined.src)
        words = [len(line.split()) for line in joined.src]
        per_k.append({"k": joined.k, "sentences": len(joined.src), "max_words": max(words, default=0),
                      "bleu": score(outputs, [joined.refs])["bleu"] if joined.src else None})
        pooled_src += joined.src
        pooled_refs += joined.refs
        pooled_hyps += outputs
    return {"sets": per_k, "buckets": bucket_labels(edges),
            "by_length": bleu_by_length(pooled_src, pooled_hyps, pooled_refs, edges)}
