"""Attention versus fixed context: the paper's finding in miniature, and the compare report."""

from __future__ import annotations

import difflib
import os
import struct

import numpy as np
import pytest
import torch

from nmt.cli import main
from nmt.compare import bleu_by_length, bucket_labels, heatmap_sentences, render_report
from nmt.search import search_corpus

from .conftest import TINY_OVERRIDES
from .synthetic import random_strings, small_config, train_reversal

SEED = int(os.environ.get("NMT_TEST_SEED", "0"))


def similarity(hyp: list[int], ref: list[int]) -> float:
    """1.0 for identical sequences; one skipped or repeated token costs little (unlike position-wise
    accuracy, which a single shift ruins)."""
    return difflib.SequenceMatcher(None, hyp, ref, autojunk=False).ratio()


def test_attention_holds_up_on_long_sentences_where_fixed_context_fails():
    torch.set_num_threads(1)
    long_sources = random_strings(np.random.default_rng(99), 60, 30, 40)
    quality = {}
    for attention in ("bahdanau", "none"):  # the same sizes, seed, data and number of steps
        model = train_reversal(small_config(embed_size=64, attention=attention), steps=400, seed=SEED,
                               lr=1e-2, min_len=5, max_len=40, batch_size=32)
        hyps = search_corpus(model, long_sources, "cpu", beam_size=1, max_len_a=1.0, max_len_b=5)
        quality[attention] = np.mean([similarity(h[0].tokens, s[::-1]) for h, s in zip(hyps, long_sources)])
        if attention == "bahdanau":
            near_anti_diagonal = []
            for h, s in zip(hyps, long_sources):
                n, weights = len(s), h[0].attention
                for j in range(min(n, weights.size(0) - 1)):
                    near_anti_diagonal.append(abs(int(weights[j].argmax()) - (n - 1 - j)) <= 1)
            assert np.mean(near_anti_diagonal) >= 0.9, np.mean(near_anti_diagonal)
    assert quality["bahdanau"] >= 0.8, quality
    assert quality["bahdanau"] - quality["none"] >= 0.3, quality


def test_buckets_and_bleu_by_length():
    assert bucket_labels([10, 20]) == ["0-10", "10-20", "20+"]
    src = ["a b", "a b c d e f g h i j k l", "x " * 25]
    refs = ["the cat", "the cat sat on the mat today", "a dog"]
    hyps = ["the cat", "the cat sat on a mat today", "no"]
    rows = bleu_by_length(src, hyps, refs, [10, 20])
    assert [r["sentences"] for r in rows] == [1, 1, 1]
    assert rows[0]["bleu"] == 0.0 or rows[0]["bleu"] > rows[2]["bleu"]
    assert bleu_by_length(src, hyps, refs, [1, 2, 3])[0] == {"bucket": "0-1", "sentences": 0, "bleu": None}


def test_heatmap_sentences_have_different_lengths():
    src = [" ".join(["w"] * n) for n in (3, 8, 8, 13, 21, 29, 40)]
    chosen = heatmap_sentences(src)
    lengths = [len(src[i].split()) for i in chosen]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths) == 4


def test_report_without_matplotlib_says_how_to_get_pictures():
    variant = {"name": "x", "attention": "none", "params": 1e6, "train_seconds": 60, "epochs": 1,
               "steps": 5, "best_valid_bleu": 1.0,
               "beam": {"scores": {"bleu": 1, "chrf": 2, "bleu_signature": "s", "chrf_signature": "c"},
                        "sent_per_s": 10},
               "greedy": {"scores": {"bleu": 1, "chrf": 2}, "sent_per_s": 20},
               "by_length": [{"bucket": "0-10", "sentences": 3, "bleu": 1.0}]}
    report = render_report([variant], ["0-10"], "test", pictures=False, name="r")
    assert "matplotlib is not installed" in report and "nmt[plot]" in report


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_compare_end_to_end(mirror, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("NMT_DATA_MIRROR", str(mirror))
    exp = tmp_path / "de-en"
    # Enough updates for the tiny models to say more than EOS, so that there is something to draw.
    overrides = [arg for o in [*TINY_OVERRIDES, "train.max_steps=60", "train.valid_every=30", "train.lr=0.005"]
                 for arg in ("--set", o)]
    assert main(["compare", "de-en", "--exp", str(exp), *overrides]) == 0
    out = exp / "compare"
    report = (out / "report.md").read_text()
    assert "| de-en | bahdanau |" in report and "| de-en-fixed | none |" in report
    assert "nrefs:1|case:mixed" in report and "| 0-10 |" in report
    assert (tmp_path / "de-en-fixed" / "model" / "summary.json").is_file()
    assert png_size(out / "bleu_by_length.png") == (700, 450)
    heatmaps = sorted((out / "attention").glob("*.png"))
    assert 1 <= len(heatmaps) <= 4
    for path in heatmaps:
        width, height = png_size(path)
        assert width >= 400 and height >= 300
    # A second run reuses both trained models.
    assert main(["compare", "de-en", "--exp", str(exp), *overrides]) == 0
    assert capsys.readouterr().out.count("reusing the trained model") == 2


def test_pieces_merge_into_words_sum_over_source_average_over_target():
    from nmt.align import hard_alignment, merge_attention, word_index, words_of

    src = ["▁Ein", "▁Mann", "s", "▁", "„"]  # words: Ein | Manns | „
    tgt = ["▁A", "▁man", "'", "▁", "▁"]  # words: A | man' | (a bare space: no word)
    assert word_index(src) == [0, 1, 1, 2, 2] and words_of(src) == ["Ein", "Manns", "„"]
    assert word_index(tgt) == [0, 1, 1, 2, 2]
    attention = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05],
                              [0.0, 0.5, 0.3, 0.1, 0.1],
                              [0.2, 0.2, 0.2, 0.2, 0.2],
                              [0.0, 0.0, 0.0, 0.5, 0.5],
                              [0.0, 0.0, 0.0, 1.0, 0.0]])
    merged = merge_attention(attention, src, tgt)
    torch.testing.assert_close(merged[0], torch.tensor([0.7, 0.2, 0.1]))
    torch.testing.assert_close(merged[1], torch.tensor([0.1, 0.6, 0.3]))  # mean of two rows
    torch.testing.assert_close(merged.sum(-1), torch.ones(3))
    assert hard_alignment(merged, words_of(tgt)) == "0-0 1-1"
