"""The Python API as a user calls it (`from nmt import Translator`), against `nmt translate`."""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys

import pytest
import torch

from nmt import Translation, Translator
from nmt.checkpoint import load_checkpoint, save_checkpoint
from nmt.cli import main
from nmt.errors import NmtError
from nmt.io import read_lines
from nmt.model import build_model

from .conftest import ROOT

LINES = ["Ein Mann fährt Fahrrad.", "", "   ", "Zwei Hunde spielen im Schnee.", "☃ 漢字 ✈",
         "Eine Frau mit einem roten Hut sitzt auf einer Bank."]


@pytest.fixture(scope="module")
def translator(trained_exp) -> Translator:
    _, exp = trained_exp
    return Translator.load(str(exp), device="cpu")


@pytest.fixture(scope="module")
def lines(trained_exp) -> list[str]:
    _, exp = trained_exp
    return LINES + read_lines(exp / "data" / "test.src")[:30]


def cli_lines(exp, lines: list[str], tmp_path, *options: str) -> list[str]:
    source, out = tmp_path / "in.de", tmp_path / "out.en"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert main(["translate", "--model", str(exp), "-i", str(source), "-o", str(out), *options]) == 0
    return out.read_bytes().decode("utf-8").split("\n")[:-1]


@pytest.mark.parametrize("beam, nbest", [(1, 1), (3, 1), (3, 3)])
def test_translations_are_what_nmt_translate_prints(trained_exp, translator, lines, tmp_path, beam, nbest):
    _, exp = trained_exp
    printed = cli_lines(exp, lines, tmp_path, "--beam", str(beam), "--nbest", str(nbest))
    results = translator.translations(lines, beam=beam, nbest=nbest)
    assert [r.source for r in results] == lines
    ours = [r.text if nbest == 1 else "\t".join(field for h in r.hypotheses for field in (h.text, f"{h.score:.4f}"))
            for r in results]
    assert ours == printed
    assert sum(bool(r.text) for r in results) > len(lines) // 2  # the model says something
    for r in results:
        assert isinstance(r, Translation) and r.text == r.hypotheses[0].text
        if not r.source.strip():  # an empty line: one empty translation, as the CLI prints
            assert [(h.text, h.score, h.log_prob, h.attention) for h in r.hypotheses] == [("", 0.0, 0.0, None)]
            continue
        assert len(r.hypotheses) == nbest
        scores = [h.score for h in r.hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert all(-math.inf < h.log_prob <= 0 and h.attention is None for h in r.hypotheses)


def test_attention_is_over_words_and_gives_the_cli_alignments(trained_exp, translator, lines, tmp_path):
    _, exp = trained_exp
    printed = cli_lines(exp, lines, tmp_path, "--beam", "3", "--nbest", "2", "--alignments")
    results = translator.translations(lines, beam=3, nbest=2, attention=True)
    checked = 0
    for r, line in zip(results, printed):
        fields = line.split("\t")
        for h, (text, _, alignment) in zip(r.hypotheses, zip(fields[::3], fields[1::3], fields[2::3])):
            assert h.text == text
            if not r.source.strip():
                assert h.attention is None
                continue
            att = h.attention
            assert att is not None
            assert att.source_words == r.source.split()  # plain words: each is one source word
            if not att.target_words:  # the model said EOS at once
                assert att.weights == [] and alignment == ""
                continue
            weights = torch.tensor(att.weights)
            assert weights.shape == (len(att.target_words), len(att.source_words))
            torch.testing.assert_close(weights.sum(1), torch.ones(len(att.target_words)), rtol=0, atol=1e-5)
            assert bool((weights >= 0).all())
            # the CLI's hard alignment: each target word with text to its most attended source word
            texts = [i for i, w in enumerate(att.target_words) if w != "\u2581"]
            assert alignment == " ".join(f"{int(weights[i].argmax())}-{j}" for j, i in enumerate(texts))
            checked += 1
    assert checked > 40


def test_without_attention_model_or_request_there_is_none(trained_exp, translator, tmp_path):
    _, exp = trained_exp
    payload = load_checkpoint(exp / "model" / "best.pt")
    payload["config"]["model"]["attention"] = "none"  # a fixed-context model of the same sizes
    fixed = build_model(_config(payload).model, payload["vocab_size"]["src"], translator.vocab.size)
    payload["model"] = fixed.state_dict()
    save_checkpoint(tmp_path / "fixed.pt", payload)
    results = Translator.load(tmp_path / "fixed.pt", device="cpu").translations(LINES, nbest=2, attention=True)
    assert all(h.attention is None for r in results for h in r.hypotheses)
    assert all(h.attention is None for r in translator.translations(LINES) for h in r.hypotheses)


def _config(payload):
    from nmt.config import config_from_dict

    return config_from_dict(payload["config"])


def test_an_ensemble_of_the_model_with_itself_is_the_model(trained_exp, translator, lines):
    _, exp = trained_exp
    pair = Translator.load([exp, exp / "model" / "best.pt"], device="cpu")
    ours = pair.translations(lines, beam=3, nbest=2, attention=True)
    alone = translator.translations(lines, beam=3, nbest=2, attention=True)
    assert [[(h.text, f"{h.score:.4f}") for h in r.hypotheses] for r in ours] == \
        [[(h.text, f"{h.score:.4f}") for h in r.hypotheses] for r in alone]
    for r, s in zip(ours, alone):
        for h, g in zip(r.hypotheses, s.hypotheses):
            assert h.log_prob == pytest.approx(g.log_prob, abs=1e-5)
            assert (h.attention is None) == (g.attention is None)
            if h.attention is not None:
                torch.testing.assert_close(torch.tensor(h.attention.weights), torch.tensor(g.attention.weights),
                                           rtol=0, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda exp, t: Translator.load(exp / "missing"), r"missing: checkpoint not found"),
    (lambda exp, t: Translator.load(exp / "data"), r"no checkpoint .* found"),
    (lambda exp, t: Translator.load([]), r"no model given"),
    (lambda exp, t: Translator.load(exp, precision="fp16"), r"precision must be one of"),
    (lambda exp, t: Translator.load(exp, device="tpu"), r"unknown device 'tpu'"),
    (lambda exp, t: t.translations(["Ein Hund."], beam=0), r"beam must be at least 1, got 0"),
    (lambda exp, t: t.translations("Ein Hund."), r"takes a list of sentences: for one, give \[sentence\]"),
    (lambda exp, t: t.translations(["Ein Hund."], beam=2, nbest=3), r"nbest must be between 1 and the beam size \(2\)"),
])
def test_a_bad_argument_is_one_line(trained_exp, translator, call, message):
    _, exp = trained_exp
    with pytest.raises(NmtError, match=message) as caught:
        call(exp, translator)
    assert "\n" not in str(caught.value)


def test_import_nmt_is_quick_and_translator_comes_with_torch():
    code = ("import sys, nmt\n"
            "assert 'torch' not in sys.modules\n"
            "from nmt import Translator\n"
            "assert 'torch' in sys.modules and Translator.__module__ == 'nmt.translate'\n"
            "import os; assert os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'] == '8'\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    with pytest.raises(AttributeError, match="no attribute 'Translater'"):
        __import__("nmt").Translater  # noqa: B018


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Serving: the Python API and `nmt serve`"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


def test_the_readme_example_runs_as_written(trained_exp, translator):
    _, exp = trained_exp
    code = readme_example()
    assert '"exp/de-en"' in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace('"exp/de-en"', repr(str(exp))), {})  # noqa: S102
    [expected] = translator.translations(["Ein Mann fährt Fahrrad."], beam=5, nbest=3, attention=True)
    out = printed.getvalue().splitlines()
    assert out[0] == expected.text
    assert out[1:4] == [f"{h.score:.4f}  {h.text}" for h in expected.hypotheses]
    assert out[4] == str(expected.hypotheses[0].attention.source_words)
