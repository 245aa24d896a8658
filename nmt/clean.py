"""Pure filters over sentence pairs, with a count for every reason a pair is dropped.

Only the training split is filtered; validation and test sets are kept exactly as they are, since
dropping test sentences would change the benchmark.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from nmt.config import CleanConfig

# Control characters (C0/C1 except tab/newline) are never meaningful in running text and confuse
# SentencePiece; they become spaces, then whitespace runs fold into one space.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFC, control characters to spaces, whitespace folded to single spaces, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def drop_reason(src: str, tgt: str, cfg: CleanConfig) -> str | None:
    """Why a (normalised) pair is dropped, or None to keep it."""
    if not src or not tgt:
        return "empty"
    if len(src) > cfg.max_chars or len(tgt) > cfg.max_chars:
        return "too_long"
    n_src, n_tgt = len(src.split()), len(tgt.split())
    if n_src > cfg.max_tokens or n_tgt > cfg.max_tokens:
        return "too_long"
    if max(n_src, n_tgt) / min(n_src, n_tgt) > cfg.max_ratio:
        return "length_ratio"
    return None


def clean_pairs(
    src_lines: list[str], tgt_lines: list[str], cfg: CleanConfig
) -> tuple[list[str], list[str], dict]:
    """Normalise and filter a training corpus; returns the kept sides and the stats."""
    assert len(src_lines) == len(tgt_lines)
    kept_src, kept_tgt = [], []
    dropped: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for raw_src, raw_tgt in zip(src_lines, tgt_lines):
        src, tgt = normalize(raw_src), normalize(raw_tgt)
        reason = drop_reason(src, tgt, cfg)
        if reason is None and cfg.dedup:
            if (src, tgt) in seen:
                reason = "duplicate"
            else:
                seen.add((src, tgt))
        if reason is not None:
            dropped[reason] += 1
            continue
        kept_src.append(src)
        kept_tgt.append(tgt)
    stats = {"pairs_in": len(src_lines), "pairs_kept": len(kept_src), "dropped": dict(dropped)}
    return kept_src, kept_tgt, stats
