"""`nmt translate` and `nmt evaluate` as a user runs them: real CLI, real (tiny) model."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import select
import subprocess
import sys

import pytest

from nmt.cli import main
from nmt.evaluate import evaluate_files
from nmt.io import read_lines
from nmt.subword import EncodedSplit
from nmt.translate import Translator

from .conftest import ROOT, TINY_OVERRIDES

NMT = [sys.executable, "-m", "nmt.cli"]


def run_nmt(args, stdin=b""):
    return subprocess.run(NMT + args, input=stdin, capture_output=True, cwd=ROOT)


def test_line_count_is_always_preserved(trained_exp, tmp_path):
    _, exp = trained_exp
    lines = ["Ein Mann fährt Fahrrad.", "", "   ", "☃ 漢字 ✈ unbekannte Zeichen", "Zwei Hunde.", ""]
    source = tmp_path / "in.de"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.en"
    assert main(["translate", "--model", str(exp), "-i", str(source), "-o", str(out), "--beam", "2"]) == 0
    translated = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(translated) == len(lines)
    assert translated[1] == "" and translated[2] == "" and translated[5] == ""


def test_stdin_to_stdout_matches_the_translator(trained_exp):
    _, exp = trained_exp
    lines = ["Eine Frau spielt Gitarre.", "Ein Kind läuft."]
    result = run_nmt(["translate", "--model", str(exp / "model" / "best.pt"), "--beam", "3"],
                     ("\n".join(lines) + "\n").encode())
    assert result.returncode == 0, result.stderr
    translator = Translator.from_path(exp)
    expected = translator.translate(lines, dataclasses.replace(translator.decode, beam_size=3))
    assert result.stdout.decode().splitlines() == expected


def test_nbest_and_alignments_format(trained_exp):
    _, exp = trained_exp
    result = run_nmt(["translate", "--model", str(exp), "--beam", "3", "--nbest", "2", "--alignments"],
                     b"Ein Mann mit einem Hut.\n")
    assert result.returncode == 0, result.stderr
    fields = result.stdout.decode().rstrip("\n").split("\t")
    assert len(fields) == 6  # (translation, score, alignment) for each of 2 hypotheses
    scores = [float(fields[1]), float(fields[4])]
    assert 0.0 >= scores[0] >= scores[1] > -math.inf  # normalised log-probabilities, best first
    for text, alignment in ((fields[0], fields[2]), (fields[3], fields[5])):
        pairs = alignment.split()
        assert len(pairs) == len(text.split())
        assert all(re.fullmatch(r"\d+-\d+", p) for p in pairs)
        assert [int(p.split("-")[1]) for p in pairs] == list(range(len(pairs)))
        assert all(int(p.split("-")[0]) < 5 for p in pairs)  # 5 source words


def test_invalid_utf8_input(trained_exp):
    _, exp = trained_exp
    result = run_nmt(["translate", "--model", str(exp)], b"gut\nauch gut\n\xff\xfe kaputt\n")
    assert result.returncode == 2
    assert re.search(rb"<stdin>:3: invalid UTF-8", result.stderr)
    # one error line; before it at most the "nmt: precision ..." line every translation starts with
    lines = result.stderr.decode().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("nmt translate: error: ")
    assert all(line.startswith("nmt: precision ") for line in lines[:-1])


def test_missing_and_wrong_checkpoints(tmp_path):
    result = run_nmt(["translate", "--model", str(tmp_path / "nothing.pt")], b"x\n")
    assert result.returncode == 2 and b"checkpoint not found" in result.stderr
    fake = tmp_path / "fake.pt"
    fake.write_text("not a checkpoint")
    result = run_nmt(["translate", "--model", str(fake)], b"x\n")
    assert result.returncode == 2 and b"not a readable checkpoint" in result.stderr


def test_output_streams_before_input_ends(trained_exp):
    """With --batch-size 2 a chunk is 16 lines: its translations must arrive while stdin is open."""
    _, exp = trained_exp
    process = subprocess.Popen(NMT + ["translate", "--model", str(exp), "--batch-size", "2", "--beam", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        process.stdin.write(b"Ein Hund rennt.\n" * 16)
        process.stdin.flush()
        # Without streaming no output comes until stdin closes: fail then rather than hang (the
        # timeout is a safety net far above what any machine needs).
        ready, _, _ = select.select([process.stdout], [], [], 600)
        assert ready, "no translation while stdin was open"
        first = process.stdout.readline()
        assert first.endswith(b"\n")
        assert process.poll() is None
    finally:
        process.stdin.close()
        process.wait(timeout=60)
    assert process.returncode == 0


def test_overlong_line_is_cut_with_a_warning(trained_exp):
    """A line over decode.max_src_len (250) subwords is translated as its first 250 are."""
    _, exp = trained_exp
    line = " ".join(["Haus"] * 10_000)
    src_spm = Translator.from_path(exp).src_spm
    cut = src_spm.decode(src_spm.encode(line)[:250])
    assert src_spm.encode(cut) == src_spm.encode(line)[:250]
    result = run_nmt(["translate", "--model", str(exp), "--beam", "1"],
                     f"{line}\n{cut}\nEin Haus.\n".encode())
    assert result.returncode == 0
    assert result.stderr.count(b"cut to 250") == 1
    translated = result.stdout.decode().split("\n")
    assert len(translated) == 4 and translated[0] == translated[1]


def test_nbest_larger_than_beam_is_refused(trained_exp):
    _, exp = trained_exp
    result = run_nmt(["translate", "--model", str(exp), "--beam", "2", "--nbest", "3"], b"x\n")
    assert result.returncode == 2 and b"--nbest" in result.stderr


def test_evaluate_files_and_json(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp", tmp_path / "ref"
    hyp.write_text("the cat sat on the mat\na dog runs\n")
    ref.write_text("the cat sat on the mat\na dog is running\n")
    scores = evaluate_files(hyp, [ref])
    assert 0 < scores["bleu"] < 100 and scores["bleu_signature"].startswith("nrefs:1")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hyp"]["bleu"] == scores["bleu"]
    perfect = evaluate_files(ref, [ref])
    assert perfect["bleu"] == 100.0


def test_evaluate_refuses_misaligned_files(tmp_path, capsys):
    (tmp_path / "h").write_text("a\nb\n")
    (tmp_path / "r").write_text("a\n")
    assert main(["evaluate", "--hyp", str(tmp_path / "h"), "--ref", str(tmp_path / "r")]) == 2
    assert "has 1 lines but" in capsys.readouterr().err


@pytest.mark.parametrize("beam", ["1", "3"])
def test_evaluate_recipe_writes_hyp_and_json(trained_exp, beam, capsys):
    _, exp = trained_exp
    overrides = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]
    assert main(["evaluate", "de-en", "--exp", str(exp), "--beam", beam, *overrides]) == 0
    record = json.loads((exp / "eval" / "test.json").read_text())
    assert record["beam_size"] == int(beam) and "version:2" in record["bleu_signature"]
    assert len((exp / "eval" / "test.hyp").read_text().splitlines()) == 100


def test_translations_use_only_pieces_seen_in_training_targets(trained_exp):
    """The output layer's ids are mapped back to SentencePiece ids (subword.output_vocabulary)."""
    _, exp = trained_exp

    translator = Translator.from_path(exp)
    assert translator.model.tgt_vocab_size == translator.vocab.size == len(translator.vocab.pieces)
    seen = set(EncodedSplit.load(exp / "spm" / "train.npz").tgt_ids.tolist())
    hyps = translator.search(read_lines(exp / "data" / "test.src")[:30], dataclasses.replace(translator.decode, beam_size=2))
    produced = {t for h in hyps for t in translator.target_ids(h[0])}
    assert produced and produced <= seen
