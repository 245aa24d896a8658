"""Attention versus fixed context: the paper's finding in miniature, and the compare report."""

from __future__ import annotations

import difflib
import json
import os
import struct
import subprocess

import numpy as np
import pytest
import torch

from nmt.align import hard_alignment, merge_attention, word_index, words_of
from nmt.cli import main
from nmt.compare import Decoding, Variant, heatmap_sentences, labels_of, render_report
from nmt.config import DecodeConfig, load_recipe
from nmt.evaluate import bleu_by_length, bucket_labels, evaluate_recipe
from nmt.search import search_corpus

from .conftest import ROOT, TINY_OVERRIDES
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
        model = train_reversal(small_config(embed_size=64, attention=attention), steps=250, seed=SEED,
                               lr=1e-2, min_len=5, max_len=40, batch_size=32)
        hyps = search_corpus(model, long_sources, DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=5))
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


def test_labels_are_directory_names_with_as_many_parents_as_tell_them_apart(tmp_path):
    assert labels_of([tmp_path / "de-en", tmp_path / "de-en-fixed"]) == ["de-en", "de-en-fixed"]
    assert labels_of([tmp_path / "a" / "exp", tmp_path / "b" / "exp"]) == ["a/exp", "b/exp"]


def test_report_without_matplotlib_says_how_to_get_pictures():
    scores = {"bleu": 1, "chrf": 2, "bleu_signature": "s", "chrf_signature": "c"}
    variant = Variant(label="x", exp="exp/x", recipe="x", attention="none", params=1_000_000,
                      train_seconds=60, epochs=1, steps=5, best_valid_bleu=1.0,
                      beam=Decoding(5, scores, 10), greedy=Decoding(1, scores, 20),
                      by_length=[{"bucket": "0-10", "sentences": 3, "bleu": 1.0}])
    report = render_report([variant], ["0-10"], "test", pictures=False)
    assert "| x | none | 1.00 M | 1.0 min | 1 (5) |" in report
    assert "matplotlib is not installed" in report and "nmt[plot]" in report
    assert variant.record()["beam"] == {"beam_size": 5, "scores": scores, "sent_per_s": 10}


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_compare_through_make_trains_both_then_is_up_to_date(mirror, tmp_path):
    """make trains the recipe and its fixed-context twin, then `nmt compare` reports on both; a
    second make finds everything up to date."""
    pytest.importorskip("matplotlib")
    exp = tmp_path / "de-en"
    # Enough updates for the tiny models to say more than EOS, so that there is something to draw.
    overrides = [*TINY_OVERRIDES, "train.max_steps=60", "train.valid_every=30", "train.lr=0.005"]
    args = ["make", "recipe=de-en", "compare", f"EXP={exp}", f"MIRROR={mirror}", "SET=" + " ".join(overrides)]
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]

    summaries = {name: tmp_path / name / "model" / "summary.json" for name in ("de-en", "de-en-fixed")}
    for name, path in summaries.items():
        summary = json.loads(path.read_text())
        assert summary["steps"] == 60, name
        assert summary["config"]["model"]["hidden_size"] == 32
    assert json.loads(summaries["de-en"].read_text())["config"]["model"]["attention"] == "bahdanau"
    assert json.loads(summaries["de-en-fixed"].read_text())["config"]["model"]["attention"] == "none"

    out = exp / "compare"
    report = (out / "report.md").read_text()
    assert "| de-en | bahdanau |" in report and "| de-en-fixed | none |" in report
    assert "nrefs:1|case:mixed" in report and "| 0-10 |" in report
    results = json.loads((out / "results.json").read_text())
    assert [v["label"] for v in results["variants"]] == ["de-en", "de-en-fixed"]
    for variant in results["variants"]:
        assert (variant["beam"]["beam_size"], variant["greedy"]["beam_size"]) == (3, 1)
        assert sum(row["sentences"] for row in variant["by_length"]) == 100
        assert len((out / variant["label"] / "test.beam.hyp").read_text().splitlines()) == 100
    assert png_size(out / "bleu_by_length.png") == (700, 450)
    heatmaps = sorted((out / "attention").glob("*.png"))
    assert 1 <= len(heatmaps) <= 4
    for path in heatmaps:
        width, height = png_size(path)
        assert width >= 400 and height >= 300

    trained_at = {name: path.stat().st_mtime_ns for name, path in summaries.items()}
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and "/nmt " not in second.stdout, second.stdout
    assert {name: path.stat().st_mtime_ns for name, path in summaries.items()} == trained_at

    # The eval stage records BLEU by source length too, in the same buckets.
    evaluate_recipe(load_recipe(str(exp / "model" / "config.yaml")), exp)
    by_length = json.loads((exp / "eval" / "test.json").read_text())["by_length"]
    assert [row["bucket"] for row in by_length] == ["0-10", "10-20", "20-30", "30-40", "40+"]
    assert sum(row["sentences"] for row in by_length) == 100


def test_compare_of_an_untrained_experiment_is_one_line_naming_it(trained_exp, tmp_path, capsys):
    _, trained = trained_exp
    untrained = tmp_path / "de-en-fixed"
    assert main(["compare", str(trained), str(untrained), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nmt compare: error: {untrained}: no trained model"), err
    assert "make recipe=" in err and not (tmp_path / "out").exists()


def test_pieces_merge_into_words_sum_over_source_average_over_target():

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
