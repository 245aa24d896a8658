"""Pictures: BLEU against source length, attention heat maps, and a sweep's trials. The only module
that imports matplotlib (the `plot` extra); without it, `available()` is False and callers skip the
pictures."""

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


# -- a sweep's trials (nmt.sweep_report) ----------------------------------------------------------


def optimisation_history(points: list[tuple[int, float, bool]], path: Path, title: str = "") -> None:
    """(trial number, best valid BLEU, pruned) per trial: the trials as dots (pruned ones hollow)
    and the best complete trial so far as a step line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for pruned, style in ((False, {"color": "C0"}), (True, {"facecolors": "none", "edgecolors": "C0"})):
        chosen = [(n, v) for n, v, p in points if p == pruned]
        if chosen:
            ax.scatter([n for n, _ in chosen], [v for _, v in chosen], label="pruned" if pruned else "complete", **style)
    best, line = None, []
    for number, value, pruned in sorted(points):
        if not pruned and (best is None or value > best):
            best = value
        if best is not None:
            line.append((number, best))
    if line:
        ax.step([n for n, _ in line], [v for _, v in line], where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation BLEU")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Optimisation history")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def param_importances(importances: dict[str, float], path: Path, title: str = "") -> None:
    """Horizontal bars, the most important key on top."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5), dpi=100)
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance (PED-ANOVA, normalised to sum to 1)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title or "Parameter importances")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def bleu_against_params(points: dict[str, list[tuple[object, float]]], log_keys: set[str], path: Path) -> None:
    """One panel per swept key: each trial's best valid BLEU against its value; values that are
    not numbers (cells, attention kinds, booleans) sit at evenly spaced positions."""
    plt = _pyplot()
    columns = min(3, len(points))
    rows = -(-len(points) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), dpi=100, squeeze=False)
    for ax, (key, pairs) in zip(axes.flat, points.items()):
        values = [v for v, _ in pairs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values, [b for _, b in pairs], color="C0")
            if key in log_keys:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # labels at 2×10^1, 3×10^1 ... overlap
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], [b for _, b in pairs], color="C0")
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel("best validation BLEU")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(points):]:
        ax.set_visible(False)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def training_curves(series: dict[str, tuple[list[float], list[float]]], path: Path, title: str = "") -> None:
    """Validation BLEU against training time (minutes, validation included), one line per trial."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, (minutes, bleu) in series.items():
        ax.plot(minutes, bleu, marker="o", markersize=3, label=name)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("validation BLEU (greedy)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "Training curves")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
