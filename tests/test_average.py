"""Weight averaging: step checkpoints kept through kills and resumes, `nmt average`, and the EMA."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import nmt.average
import nmt.train
from nmt.average import EMA, select
from nmt.checkpoint import load_checkpoint, load_state, save_checkpoint
from nmt.cli import main
from nmt.config import load_recipe
from nmt.errors import NmtError
from nmt.model import build_model
from nmt.train import Trainer, train, validate
from nmt.translate import Translator

from .conftest import TINY_OVERRIDES

# Validations at 3, 6 and 9, last.pt at 4, 8 and 9; the 2 newest step checkpoints kept.
KEEP_2 = [*TINY_OVERRIDES, "train.max_steps=9", "train.valid_every=3", "train.keep_checkpoints=2"]


class Killed(BaseException):
    """Stands in for kill -9: nothing catches it, nothing is saved on the way out."""


@contextlib.contextmanager
def killed_after_update(n: int):
    count = 0

    def hook(optimizer, args, kwargs):
        nonlocal count
        count += 1
        if count == n:
            raise Killed

    handle = register_optimizer_step_post_hook(hook)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        handle.remove()


def run(prepared_exp, exp: Path, overrides: list[str]):
    shutil.copytree(prepared_exp, exp)
    config = load_recipe("de-en", overrides)
    train(config, exp)
    return config, exp


@pytest.fixture(scope="module")
def kept_exp(prepared_exp, tmp_path_factory):
    """A tiny run that keeps its 2 newest step checkpoints (of 3 validations)."""
    return run(prepared_exp, tmp_path_factory.mktemp("kept") / "exp", KEEP_2)


def step_file(exp: Path, step: int) -> Path:
    return exp / "model" / f"step-{step:06d}.pt"


def step_files(exp: Path) -> list[str]:
    return sorted(p.name for p in (exp / "model").glob("step-*.pt"))


def listed(exp: Path) -> list[dict]:
    return json.loads((exp / "model" / "checkpoints.json").read_text())["checkpoints"]


def valid_bleu(exp: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (exp / "model" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["valid_bleu"] for r in records if "valid_bleu" in r}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def assert_same_checkpoints(a: Path, b: Path) -> None:
    """Both experiments hold the same kept step checkpoints, list and best.pt, bit for bit."""
    assert step_files(a) == step_files(b)
    assert listed(a) == listed(b)
    for name in [*step_files(a), "best.pt"]:
        assert_same_tensors(load_checkpoint(a / "model" / name)["model"], load_checkpoint(b / "model" / name)["model"])


# ----------------------------------------------------------------------------------------------
# Step checkpoints


def test_keep_last_keeps_the_newest_k_with_their_bleu(kept_exp):
    _, exp = kept_exp
    bleu = valid_bleu(exp)
    assert sorted(bleu) == [3, 6, 9]
    assert step_files(exp) == ["step-000006.pt", "step-000009.pt"]
    assert listed(exp) == [{"step": s, "valid_bleu": bleu[s], "file": f"step-{s:06d}.pt"} for s in (6, 9)]
    for step in (6, 9):
        payload = load_checkpoint(step_file(exp, step))
        assert payload["progress"]["step"] == step and payload["validation"]["valid_bleu"] == bleu[step]
        assert "optimizer" not in payload  # weights only: what translation needs
    # No EMA: the step checkpoint of the last step holds the weights last.pt holds.
    assert_same_tensors(load_checkpoint(step_file(exp, 9))["model"], load_checkpoint(exp / "model" / "last.pt")["model"])


def test_keep_best_keeps_the_best_by_bleu(prepared_exp, tmp_path, monkeypatch):
    scripted = iter([9.0, 5.0, 7.0])  # the validation BLEU at steps 3, 6 and 9
    monkeypatch.setattr(nmt.train, "score", lambda hyps, refs: {"bleu": next(scripted)})
    _, exp = run(prepared_exp, tmp_path / "exp", [*KEEP_2, "train.keep_by=best"])
    assert step_files(exp) == ["step-000003.pt", "step-000009.pt"]
    assert [(e["step"], e["valid_bleu"]) for e in listed(exp)] == [(3, 9.0), (9, 7.0)]


def test_select():
    entries = [{"step": s, "valid_bleu": b} for s, b in [(1, 3.0), (2, 7.0), (3, 5.0), (4, 7.0), (5, 1.0)]]
    assert [e["step"] for e in select(entries, 2, "last")] == [4, 5]
    assert [e["step"] for e in select(entries, 3, "best")] == [2, 3, 4]
    assert [e["step"] for e in select(entries, 1, "best")] == [4]  # 2 and 4 tie: the newer


@pytest.mark.parametrize("crash", ["before the list", "before deleting"])
def test_a_kill_while_keeping_checkpoints_is_harmless(kept_exp, prepared_exp, tmp_path, monkeypatch, crash):
    """A kill -9 at step 9 between writing step-9 and the list, or between the list and deleting
    step-3: last.pt is at step 8; the resumed run ends with what an uninterrupted one has."""
    config, straight = kept_exp
    exp = tmp_path / "exp"
    shutil.copytree(prepared_exp, exp)
    with monkeypatch.context() as patch:
        if crash == "before the list":
            write_kept, calls = nmt.average.write_kept, []

            def crash_at_step_9(*args):
                calls.append(1)
                if len(calls) == 3:
                    raise Killed
                write_kept(*args)

            patch.setattr(nmt.average, "write_kept", crash_at_step_9)
        else:
            unlink = Path.unlink

            def crash_on_a_step_file(path, missing_ok=False):
                if path.name.startswith("step-"):
                    raise Killed
                unlink(path, missing_ok=missing_ok)

            patch.setattr(Path, "unlink", crash_on_a_step_file)
        with pytest.raises(Killed):
            train(config, exp)
    assert load_checkpoint(exp / "model" / "last.pt")["progress"]["step"] == 8
    assert step_files(exp) == ["step-000003.pt", "step-000006.pt", "step-000009.pt"]
    # What the resume starts from: the files and the list agree, as they were at step 8 (or with
    # step-3 gone already: the kill came after the list of step 9 had dropped it).
    nmt.average.restore_kept(exp / "model", 8, config.train)
    kept = [3, 6] if crash == "before the list" else [6]
    assert step_files(exp) == [f"step-{s:06d}.pt" for s in kept] and [e["step"] for e in listed(exp)] == kept
    train(config, exp)
    assert_same_checkpoints(exp, straight)


# ----------------------------------------------------------------------------------------------
# nmt average


def test_average_of_three_checkpoints_is_their_mean(kept_exp, tmp_path, capsys):
    _, exp = kept_exp
    paths = [exp / "model" / "best.pt", step_file(exp, 6), step_file(exp, 9)]  # best.pt: step 3
    out = tmp_path / "avg.pt"
    assert main(["average", *map(str, paths), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"{path}  step {s}" in printed for path, s in zip(paths, (3, 6, 9))) and f"wrote {out}" in printed

    averaged = load_checkpoint(out)
    states = [load_checkpoint(p)["model"] for p in paths]
    for name, tensor in averaged["model"].items():
        mean = (states[0][name].double() + states[1][name].double() + states[2][name].double()) / 3
        assert tensor.dtype == states[0][name].dtype
        torch.testing.assert_close(tensor, mean.to(tensor.dtype), rtol=0, atol=0, msg=name)
    assert not torch.equal(averaged["model"]["decoder.embed.weight"], states[2]["decoder.embed.weight"])
    bleu = valid_bleu(exp)
    assert averaged["averaged_from"] == [{"path": str(p), "step": s, "valid_bleu": bleu[s]}
                                         for p, s in zip(paths, (3, 6, 9))]
    assert "validation" not in averaged and "optimizer" not in averaged


def test_average_last_and_best_of_an_experiment(kept_exp, tmp_path, capsys):
    _, original = kept_exp
    exp = tmp_path / "exp"
    shutil.copytree(original / "model", exp / "model")
    record = json.loads((exp / "model" / "checkpoints.json").read_text())
    for entry, bleu in zip(record["checkpoints"], (30.0, 10.0)):  # steps 6 and 9
        entry["valid_bleu"] = bleu
    (exp / "model" / "checkpoints.json").write_text(json.dumps(record))

    for which, steps in (("--best", [6]), ("--last", [9]), ("--best", [6, 9])):
        out = tmp_path / f"{which[2:]}.pt"
        assert main(["average", str(exp), which, str(len(steps)), "-o", str(out)]) == 0
        assert [s["step"] for s in load_checkpoint(out)["averaged_from"]] == steps
        printed = capsys.readouterr().out
        assert [f"step {s}" in printed for s in (6, 9)] == [s in steps for s in (6, 9)]


def test_averaged_checkpoint_translates_and_evaluates(kept_exp, tmp_path, capsys):
    config, exp = kept_exp
    out = tmp_path / "avg.pt"
    assert main(["average", str(exp), "--last", "2", "-o", str(out)]) == 0
    source = tmp_path / "in.de"
    lines = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    translated = tmp_path / "out.en"
    assert main(["translate", "--model", str(out), "-i", str(source), "-o", str(translated)]) == 0
    translator = Translator.from_path(out)
    assert translated.read_text(encoding="utf-8").splitlines() == translator.translate(lines)

    evaluated = tmp_path / "eval-exp"
    shutil.copytree(exp, evaluated)
    args = ["evaluate", "de-en", "--exp", str(evaluated), "--model", str(out), "--beam", "1"]
    assert main([*args, *[a for o in KEEP_2 for a in ("--set", o)]]) == 0
    record = json.loads((evaluated / "eval" / "test.json").read_text())
    hyps = (evaluated / "eval" / "test.hyp").read_text(encoding="utf-8").splitlines()
    assert out.name in json.dumps(record) and len(hyps) == 100


def other_checkpoints(exp: Path, tmp_path: Path) -> dict[str, Path]:
    """A step checkpoint of another model, of another SentencePiece model, of another output
    vocabulary."""
    payload = load_checkpoint(step_file(exp, 6))
    config = load_recipe("de-en", [*KEEP_2, "model.hidden_size=40"])
    sizes = payload["vocab_size"]
    wider = {**payload, "config": {**payload["config"], "model": dataclasses.asdict(config.model)},
             "model": build_model(config.model, sizes["src"], sizes["output"]).state_dict()}
    spm = {**payload, "spm": {"src": payload["spm"]["src"] + b"\0", "tgt": payload["spm"]["tgt"] + b"\0"}}
    vocab = {**payload, "output_vocab": payload["output_vocab"][:-1],
             "vocab_size": {**sizes, "output": sizes["output"] - 1}}
    paths = {}
    for name, other in (("model", wider), ("spm", spm), ("vocab", vocab)):
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint(paths[name], {k: v for k, v in other.items() if k not in ("kind", "format_version")})
    return paths


def test_averaging_different_models_or_vocabularies_is_refused(kept_exp, tmp_path, capsys):
    _, exp = kept_exp
    others = other_checkpoints(exp, tmp_path)
    first = step_file(exp, 6)
    for name, problem in (("model", r"different models \(model.hidden_size differ\)"),
                          ("spm", "different SentencePiece models"), ("vocab", "different output vocabularies")):
        out = tmp_path / "avg.pt"
        assert main(["average", str(first), str(others[name]), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        with pytest.raises(NmtError, match=rf"^{first} and {others[name]}: {problem}; only checkpoints "
                                           "of one model can be averaged$"):
            nmt.average.run_average([first, others[name]], out)
        assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["{exp}", "-o", "x.pt"], "a directory; give --last K or --best K"),
    (["{exp}", "--last", "3", "-o", "x.pt"], "--last 3: .*checkpoints.json lists only 2 checkpoints"),
    (["{exp}", "--best", "0", "-o", "x.pt"], "--best must be at least 1, got 0"),
    (["{step}", "--last", "2", "-o", "x.pt"], "--last takes one experiment directory"),
    (["{empty}", "--last", "2", "-o", "x.pt"], "checkpoints.json: not found; train with train.keep_checkpoints"),
])
def test_average_usage_errors(kept_exp, tmp_path, capsys, args, message):
    _, exp = kept_exp
    (tmp_path / "empty").mkdir()
    values = {"exp": exp, "step": step_file(exp, 6), "empty": tmp_path / "empty"}
    assert main(["average", *[a.format(**values) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


# ----------------------------------------------------------------------------------------------
# EMA


def test_ema_warm_up_and_swap():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # d_1 = min(0.9, 2 / 11)
    for averaged, old, new in zip(ema.params, start, model.parameters()):
        expected = (2 / 11) * old.double() + (9 / 11) * new.detach().double()
        torch.testing.assert_close(averaged.double(), expected, rtol=1e-6, atol=1e-6)
    raw = [p.detach().clone() for p in model.parameters()]
    with ema.applied(model):
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), ema.params))
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))  # exactly back

    zero = EMA(model, 0.0)
    with torch.no_grad():
        model.weight.mul_(3.0)
    zero.update(model)
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), zero.params))


def test_ema_of_decay_zero_changes_nothing(kept_exp, prepared_exp, tmp_path, monkeypatch):
    """The EMA machinery (update, validation on the average, best.pt and step checkpoints from it,
    its state in last.pt) with decay 0 trains and keeps exactly what a run without it does."""
    _, plain = kept_exp

    class ZeroDecay(EMA):
        def __init__(self, model, decay):
            super().__init__(model, 0.0)

    monkeypatch.setattr(nmt.train, "EMA", ZeroDecay)
    _, exp = run(prepared_exp, tmp_path / "exp", [*KEEP_2, "train.ema_decay=0.5"])
    last = load_checkpoint(exp / "model" / "last.pt")
    assert last["ema"]["updates"] == 9
    assert_same_tensors(last["model"], load_checkpoint(plain / "model" / "last.pt")["model"])
    assert_same_tensors(last["ema"]["params"], last["model"])
    assert_same_checkpoints(exp, plain)
    assert valid_bleu(exp) == valid_bleu(plain)


def test_best_pt_holds_the_ema_weights_it_validated(prepared_exp, tmp_path):
    config, exp = run(prepared_exp, tmp_path / "exp",
                      [*TINY_OVERRIDES, "train.max_steps=6", "train.ema_decay=0.9", "train.keep_checkpoints=1"])
    last, best = load_checkpoint(exp / "model" / "last.pt"), load_checkpoint(exp / "model" / "best.pt")
    assert last["progress"]["step"] == best["progress"]["step"] == 6  # the one validation
    assert_same_tensors(best["model"], last["ema"]["params"])
    assert_same_tensors(load_checkpoint(step_file(exp, 6))["model"], best["model"])
    assert not torch.equal(best["model"]["decoder.embed.weight"], last["model"]["decoder.embed.weight"])
    # The validation recorded is that of the averaged weights.
    trainer = Trainer(config, exp)
    load_state(trainer.model, best["model"], exp / "model" / "best.pt")
    record = [json.loads(line) for line in (exp / "model" / "metrics.jsonl").read_text().splitlines()][-1]
    assert validate(trainer)["valid_loss"] == record["valid_loss"]


def test_ema_resume_is_bit_exact(prepared_exp, tmp_path):
    """Killed during update 7 (last.pt at 4; step-6 and best.pt written after it), resumed: raw
    weights, EMA, best.pt and the kept step checkpoint equal an uninterrupted run's."""
    overrides = [*TINY_OVERRIDES, "train.max_steps=8", "train.ema_decay=0.9", "train.keep_checkpoints=1"]
    config, straight = run(prepared_exp, tmp_path / "straight", overrides)
    exp = tmp_path / "resumed"
    shutil.copytree(prepared_exp, exp)
    with killed_after_update(7):
        train(config, exp)
    assert load_checkpoint(exp / "model" / "last.pt")["progress"]["step"] == 4
    assert step_files(exp) == ["step-000006.pt"]
    train(config, exp)

    a, b = load_checkpoint(straight / "model" / "last.pt"), load_checkpoint(exp / "model" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 8 and b["ema"]["updates"] == 8
    assert_same_tensors(b["model"], a["model"])
    assert_same_tensors(b["ema"]["params"], a["ema"]["params"])
    assert step_files(exp) == ["step-000008.pt"]  # validated at 6 and 8 (the end)
    assert_same_checkpoints(exp, straight)
    assert_same_tensors(load_checkpoint(step_file(exp, 8))["model"], b["ema"]["params"])
