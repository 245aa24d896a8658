"""Pictures: BLEU against source length, and attention heat maps. The only module that imports
matplotlib (the `plot` extra); without it, `available()` is False and callers skip the pictures."""

from __future__ import annotations

from pathlib import Path

import torch

from nmt.io import atomic_output

INSTALL_HINT = 'pip install "nmt[plot]"  (or: pip install matplotlib)'


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")


def bleu_by_length(buckets: list[str], series: dict[str, list[float | None]], path: Path,
                   title: str = "") -> None:
    """One line per variant: BLEU of each source-length bucket (Bahdanau et al. 2015, Fig. 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, values in series.items():
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_xlabel("source sentence length (words)")
    ax.set_ylabel("BLEU")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "BLEU by source length")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def attention_heatmap(weights: torch.Tensor, src_words: list[str], tgt_words: list[str], path: Path,
                      title: str = "") -> None:
    """weights (tgt_words, src_words): source words on x, target words on y (Bahdanau Fig. 3)."""
    plt = _pyplot()
    # Room for the labels: about 0.09 inch per character of the longest word.
    src_label = 0.09 * max(len(w) for w in src_words) + 0.6
    tgt_label = 0.09 * max(len(w) for w in tgt_words) + 0.6
    width = max(4.0, 0.38 * len(src_words) + tgt_label + 0.6)
    height = max(3.0, 0.32 * len(tgt_words) + src_label + 0.6)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100, layout="constrained")
    ax.imshow(weights.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(src_words)), src_words, rotation=90)
    ax.set_yticks(range(len(tgt_words)), tgt_words)
    ax.xaxis.tick_top()
    if title:
        ax.set_xlabel(title)
    _save(fig, path)
    plt.close(fig)
