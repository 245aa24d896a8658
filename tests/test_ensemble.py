"""Ensembles (nmt.ensemble): several models decoding as one, their probabilities averaged per step."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from nmt.batches import pad
from nmt.checkpoint import load_checkpoint, save_checkpoint
from nmt.cli import main
from nmt.config import load_recipe
from nmt.ensemble import Ensemble
from nmt.io import read_lines
from nmt.model import bos_column, build_model
from nmt.search import search_corpus
from nmt.train import train
from nmt.translate import Translator

from .conftest import ROOT, TINY_OVERRIDES


@pytest.fixture(scope="module")
def second_exp(prepared_exp, mirror, tmp_path_factory) -> Path:
    """Another tiny model on the same SentencePiece models and data: another seed, and another
    architecture (an ensemble's members may differ in it)."""
    exp = tmp_path_factory.mktemp("second") / "exp"
    shutil.copytree(prepared_exp, exp)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NMT_DATA_MIRROR", str(mirror))
        config = load_recipe("de-en", [*TINY_OVERRIDES, "train.seed=5", "model.cell=lstm",
                                       "model.attention=luong-general", "train.max_steps=60",
                                       "train.lr=0.01", "train.valid_every=30"])
        train(config, exp)
    return exp


@pytest.fixture(scope="module")
def lines(prepared_exp) -> list[str]:
    return read_lines(prepared_exp / "data" / "test.src")[:40]


def same_hypotheses(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for our_nbest, their_nbest in zip(ours, theirs):
        assert [h.tokens for h in our_nbest] == [h.tokens for h in their_nbest]
        assert [h.score for h in our_nbest] == pytest.approx([h.score for h in their_nbest], abs=1e-6)
        assert [h.log_prob for h in our_nbest] == pytest.approx([h.log_prob for h in their_nbest], abs=1e-6)
        for ours_h, theirs_h in zip(our_nbest, their_nbest):
            assert (ours_h.attention is None) == (theirs_h.attention is None)
            if ours_h.attention is not None:
                torch.testing.assert_close(ours_h.attention, theirs_h.attention, rtol=0, atol=1e-6)


@pytest.mark.parametrize("beam, nbest", [(1, 1), (3, 3)])
def test_a_model_ensembled_with_itself_gives_its_own_output(trained_exp, lines, beam, nbest):
    _, exp = trained_exp
    single = Translator.from_path(exp)
    double = Translator.from_paths([exp, exp / "model" / "best.pt"])
    assert isinstance(double.model, Ensemble) and not isinstance(single.model, Ensemble)
    decode = dataclasses.replace(single.decode, beam_size=beam)
    expected = single.search(lines, decode, nbest)
    assert any(h[0].tokens for h in expected)  # the tiny model says something
    same_hypotheses(double.search(lines, decode, nbest), expected)


def test_ensemble_step_is_the_mean_of_its_members(trained_exp, second_exp, lines):
    """exp(log_probs) of each step is the mean of the members' probabilities, the attention the
    mean of theirs, and reordering the ensemble's memory and state reorders every member's."""
    _, exp = trained_exp
    ensemble = Translator.from_paths([exp, second_exp]).model
    src_ids, src_lens = pad(Translator.from_path(exp).src_spm.encode(lines[:6]))
    members = list(ensemble.members)
    with torch.no_grad():
        memory, state = ensemble.encode(src_ids, src_lens)
        alone = [member.encode(src_ids, src_lens) for member in members]
        prev = bos_column(src_ids.size(0), src_ids.device)
        for _ in range(4):
            log_probs, state, attn = ensemble.decode_step(prev, state, memory)
            steps = [member.decode_step(prev, s, m) for member, (m, s) in zip(members, alone)]
            probs = torch.stack([step[0].exp() for step in steps]).mean(dim=0)
            torch.testing.assert_close(log_probs.exp(), probs, rtol=0, atol=1e-6)
            torch.testing.assert_close(attn, torch.stack([step[2] for step in steps]).mean(dim=0))
            assert not torch.equal(steps[0][0], steps[1][0])  # two different models
            # the next step from the ensemble's choices, rows reversed as a beam reorders them
            order = torch.arange(src_ids.size(0) - 1, -1, -1)
            prev = log_probs.argmax(dim=-1)[order]
            memory, state = memory.index_select(order), state.index_select(order)
            alone = [(m.index_select(order), step[1].index_select(order)) for (m, _), step in zip(alone, steps)]


def test_attention_of_ensembles_with_fixed_context_members(trained_exp, lines):
    """The mean over the members that attend; none when no member does (as for one such model)."""
    _, exp = trained_exp
    translator = Translator.from_path(exp)
    attending = translator.model
    torch.manual_seed(0)
    fixed_cfg = dataclasses.replace(translator.config.model, attention="none")
    fixed = [build_model(fixed_cfg, attending.src_vocab_size, attending.tgt_vocab_size).eval() for _ in range(2)]
    src_ids, src_lens = pad(translator.src_spm.encode(lines[:4]))
    prev = bos_column(src_ids.size(0), src_ids.device)
    with torch.no_grad():
        memory, state = attending.encode(src_ids, src_lens)
        _, _, expected = attending.decode_step(prev, state, memory)
        mixed = Ensemble([fixed[0], attending]).eval()
        memory, state = mixed.encode(src_ids, src_lens)
        _, _, attn = mixed.decode_step(prev, state, memory)
        torch.testing.assert_close(attn, expected)
    decode = dataclasses.replace(translator.decode, beam_size=2)
    src_seqs = translator.src_spm.encode(lines[:4])
    for model, has_attention in ((mixed, True), (Ensemble(fixed), False)):
        hyps = search_corpus(model, src_seqs, decode, "fp32", nbest=2)
        assert all((h.attention is not None) == has_attention for nbest in hyps for h in nbest)


def test_two_models_ensembled_translate_differently(trained_exp, second_exp, lines):
    _, exp = trained_exp
    outputs = [Translator.from_paths(paths).translate(lines) for paths in ([exp], [second_exp], [exp, second_exp])]
    first, second, ensemble = outputs
    assert first != second
    assert ensemble != first or ensemble != second


def other_spm_model(lines: list[str]) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=60,
                                   minloglevel=2)
    return model.getvalue()


@pytest.mark.parametrize("what", ["source SentencePiece model", "target SentencePiece model", "output vocabulary"])
def test_models_that_do_not_share_vocabularies_are_refused(trained_exp, lines, tmp_path, capsys, what):
    _, exp = trained_exp
    good = exp / "model" / "best.pt"
    payload = load_checkpoint(good)
    if what == "output vocabulary":
        payload["output_vocab"] = payload["output_vocab"][:-1]
        payload["vocab_size"]["output"] = len(payload["output_vocab"])
    else:
        payload["spm"]["src" if what.startswith("source") else "tgt"] = other_spm_model(lines)
    other = tmp_path / "other.pt"
    save_checkpoint(other, payload)
    source = tmp_path / "in.de"
    source.write_text("Ein Hund.\n")
    assert main(["translate", "--model", str(good), "--model", str(other), "-i", str(source)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("nmt: precision ")]
    assert errors == [f"nmt translate: error: {good} and {other}: different {what}; the models of an "
                      "ensemble must share them"]


def test_translate_with_two_models_nbest_and_alignments(trained_exp, second_exp, lines, tmp_path):
    _, exp = trained_exp
    source, out = tmp_path / "in.de", tmp_path / "out.en"
    source.write_text("\n".join(lines[:10]) + "\n", encoding="utf-8")
    args = ["translate", "--model", str(exp), "--model", str(second_exp / "model" / "best.pt"),
            "-i", str(source), "-o", str(out), "--beam", "3", "--nbest", "2", "--alignments"]
    assert main(args) == 0
    translator = Translator.from_paths([exp, second_exp])
    expected = translator.search(lines[:10], dataclasses.replace(translator.decode, beam_size=3), nbest=2)
    rows = out.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 10
    for row, line, hyps in zip(rows, lines, expected):
        fields = row.split("\t")
        assert len(fields) == 6  # (translation, score, alignment) for each of 2 hypotheses
        assert fields[0::3] == [translator.detokenize(h) for h in hyps]
        assert [float(s) for s in fields[1::3]] == pytest.approx([h.score for h in hyps], abs=1e-4)
        for text, alignment in zip(fields[0::3], fields[2::3]):
            pairs = alignment.split()
            assert len(pairs) == len(text.split())
            assert all(re.fullmatch(r"\d+-\d+", p) for p in pairs)
            assert all(int(p.split("-")[0]) < len(line.split()) for p in pairs)


def test_evaluate_records_every_checkpoint(trained_exp, second_exp, capsys):
    _, exp = trained_exp
    overrides = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]
    evaluate = ["evaluate", "de-en", "--exp", str(second_exp), "--beam", "2", *overrides]
    own = second_exp / "model" / "best.pt"
    assert main(evaluate) == 0  # the experiment's own checkpoint, as without ensembles
    record = json.loads((second_exp / "eval" / "test.json").read_text())
    assert record["checkpoint"] == str(own)
    assert record["checkpoint_step"] == load_checkpoint(own)["progress"]["step"]
    assert main([*evaluate, "--model", str(exp), "--model", str(second_exp)]) == 0
    steps = [load_checkpoint(path)["progress"]["step"] for path in (exp / "model" / "best.pt", own)]
    for name in ("test.json", "scores.json"):
        record = json.loads((second_exp / "eval" / name).read_text())
        assert record["checkpoint"] == [str(exp / "model" / "best.pt"), str(own)]
        assert record["checkpoint_step"] == steps
    capsys.readouterr()


def test_make_ensemble_trains_the_seeds_on_one_spm_then_is_up_to_date(mirror, tmp_path):
    """`make ensemble` trains the recipe and one run per seed on copies of its data and spm stages,
    decodes the test sets with all of them together, and a second make does nothing."""
    exp = tmp_path / "de-en"
    args = ["make", "recipe=de-en", "ensemble", f"EXP={exp}", f"MIRROR={mirror}", "SEEDS=4",
            "SET=" + " ".join(TINY_OVERRIDES)]
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]

    own, seed = (json.loads((path / "model" / "summary.json").read_text()) for path in (exp, tmp_path / "de-en-seed4"))
    assert (own["config"]["train"]["seed"], seed["config"]["train"]["seed"]) == (3, 4)
    assert (exp / "spm" / "joint.model").read_bytes() == (tmp_path / "de-en-seed4" / "spm" / "joint.model").read_bytes()
    scores = json.loads((tmp_path / "de-en-ensemble" / "eval" / "scores.json").read_text())
    assert [Path(p).parent.parent.name for p in scores["checkpoint"]] == ["de-en", "de-en-seed4"]
    assert set(scores["scores"]) == {"test", "test2017"}
    for path in (exp, tmp_path / "de-en-seed4"):  # each model is scored alone as well
        alone = json.loads((path / "eval" / "scores.json").read_text())
        assert alone["checkpoint"] == str(path / "model" / "best.pt") and set(alone["scores"]) == {"test", "test2017"}

    done = (tmp_path / "de-en-ensemble" / "eval" / "scores.json").stat().st_mtime_ns
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and "/nmt " not in second.stdout, second.stdout
    assert (tmp_path / "de-en-ensemble" / "eval" / "scores.json").stat().st_mtime_ns == done
