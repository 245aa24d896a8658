"""nmt sweep: strict sweep files, the trials Optuna chooses, and real tiny sweeps through the
command: trial experiment directories, the report and best.yaml, a kill and a resume, two workers
sharing one study, pruning."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nmt.checkpoint import load_checkpoint
from nmt.cli import main
from nmt.config import load_recipe
from nmt.joined import JOINED_NOTE, joined_by_length, joined_sets
from nmt.sweep import Outcome, open_study, prepared_dir, run_worker
from nmt.sweep_config import load_sweep, lookup
from nmt.sweep_report import write_report
from nmt.translate import Translator

from .conftest import ROOT, TINY_OVERRIDES

SETS = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]


def write_sweep(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def seed_prepared(prepared_exp: Path, out: Path, overrides: list[str]) -> None:
    """The sweep's shared data and spm stages, taken from the session's prepared experiment (the
    same recipe): the stages themselves are prepared for real in the end-to-end test."""
    target = prepared_dir(out, load_recipe("de-en", overrides))
    shutil.copytree(prepared_exp, target)


def study_trials(path: Path, out: Path, overrides: list[str]):
    return open_study(load_sweep(path, "de-en", overrides), out).get_trials(deepcopy=False)


# -- the sweep file ------------------------------------------------------------------------------

OK = "n_trials: 2\nbudget: {max_steps: 2}\n"


@pytest.mark.parametrize("text, expected", [
    (OK + "metod: grid\nspace: {model.cell: [gru]}\n", "metod: unknown key; did you mean 'method'?"),
    (OK + "method: random\nspace: {model.cell: [gru]}\n", "method: 'random' is not one of grid, tpe"),
    (OK + "pruner: {kind: medain}\nspace: {model.cell: [gru]}\n", "pruner.kind: 'medain' is not one of median"),
    (OK + "space: {model.hiden_size: [32, 64]}\n",
     "space.model.hiden_size: 32 does not make a valid recipe: "),
    (OK + "space: {model.hiden_size: {low: 32, high: 64}}\n", "unknown key; did you mean 'hidden_size'?"),
    (OK + "space: {model.attention: [bahdanau, bahdanu]}\n", "'bahdanu' is not one of bahdanau"),
    (OK + "space: {model.dropout: {low: 0.5, high: 0.1}}\n", "space.model.dropout: low (0.5) must be below high (0.1)"),
    (OK + "space: {model.dropout: {low: 0.1, high: 1.0}}\n", "model.dropout: must be in [0, 1), got 1.0"),
    (OK + "space: {train.lr: {low: 0, high: 0.1, log: true}}\n", "space.train.lr: a log range needs low above 0"),
    (OK + "space: {train.lr: {low: 1e-4, high: 1.0e-2}}\n", "space.train.lr.low: '1e-4' is a string to YAML"),
    (OK + "space: {model.hidden_size: {low: 32.5, high: 64}}\n", "model.hidden_size is an integer"),
    (OK + "space: {model.cell: {low: 1, high: 2}}\n", "a range needs a numeric key"),
    (OK + "space: {model.dropout: {low: 0.1, hihg: 0.2}}\n", "space.model.dropout.hihg: unknown key; did you mean 'high'?"),
    (OK + "space: {train.max_steps: [2, 3]}\n", "space.train.max_steps: is the trial budget"),
    (OK + "space: {model.cell: []}\n", "space.model.cell: an empty list"),
    (OK + "space: []\n", "space: expected a mapping of recipe keys"),
    ("n_trials: 2\nbudget: {max_steps: 2, max_minutes: 1}\nspace: {model.cell: [gru]}\n", "budget: set exactly one"),
    ("budget: {max_steps: 2}\nspace: {model.cell: [gru]}\n", "n_trials: tpe needs the number of trials"),
    ("method: grid\nbudget: {max_steps: 2}\nspace: {train.lr: {low: 0.001, high: 0.01}}\n",
     "space.train.lr: grid searches lists of values only"),
    ("method: grid\nn_trials: 5\nbudget: {max_steps: 2}\nspace: {model.cell: [gru, lstm]}\n",
     "n_trials: the grid has 2 combinations, fewer than 5"),
    ("method: grid\nbaseline: true\nbudget: {max_steps: 2}\nspace: {model.cell: [gru, lstm]}\n",
     "baseline: is for tpe"),
    (OK + "baseline: true\nspace: {model.hidden_size: {low: 16, high: 128}}\n",
     "baseline: the recipe's model.hidden_size (352) is outside the space [16, 128]"),
    (OK + "baseline: true\nspace: {model.cell: [lstm, rnn]}\n",
     "baseline: the recipe's model.cell ('gru') is outside the space ['lstm', 'rnn']"),
])
def test_sweep_file_errors_are_one_line_naming_the_file_and_key(tmp_path, capsys, text, expected):
    path = write_sweep(tmp_path, text)
    assert main(["sweep", "de-en", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"nmt sweep: error: {path}: ") and expected in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_sweep_refuses_a_combination_that_is_no_recipe(tmp_path, capsys):
    # Each value is valid alone on the recipe (luong-dot: decoder 704 = 2 x the encoder's 352), the
    # combination with an encoder of 128 per direction is not.
    path = write_sweep(tmp_path, "method: grid\nbudget: {max_steps: 2}\n"
                                 "space: {model.hidden_size: [128, 352], model.attention: [luong-dot]}\n")
    args = ["sweep", "de-en", str(path), "--out", str(tmp_path / "out"), "--set", "model.decoder_size=704"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"nmt sweep: error: {path}: ")
    assert "space: the combination {'model.hidden_size': 128, 'model.attention': 'luong-dot'} does not make a valid recipe" in err
    assert not (tmp_path / "out").exists()


# -- the trials Optuna chooses (a cheap objective instead of training) --------------------------


def test_grid_runs_every_combination_exactly_once(tmp_path):
    path = write_sweep(tmp_path, "method: grid\nbudget: {max_steps: 2}\n"
                                 "space:\n  model.cell: [rnn, gru, lstm]\n  model.attention: [bahdanau, none]\n")
    sweep = load_sweep(path, "de-en")
    assert sweep.n_trials == 6
    seen = []

    def objective(trial, params):
        seen.append((params["model.cell"], params["model.attention"]))
        return Outcome("complete", float(len(seen)))

    study = open_study(sweep, tmp_path / "out")
    assert run_worker(study, sweep, objective, tmp_path / "out" / "ask.lock") == 6
    assert sorted(seen) == sorted(itertools.product(["rnn", "gru", "lstm"], ["bahdanau", "none"]))
    again = open_study(sweep, tmp_path / "out")  # a later run of the same sweep: nothing left to do
    assert run_worker(again, sweep, objective, tmp_path / "out" / "ask.lock") == 0


TPE = """method: tpe
n_trials: {n}
seed: {seed}
startup_trials: 3
budget: {{max_steps: 2}}
space:
  model.cell: [gru, lstm]
  model.hidden_size: {{low: 16, high: 256, log: true}}
  model.dropout: {{low: 0.0, high: 0.5}}
  train.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
"""


def run_tpe(tmp_path, out: str, seed: int, n: int) -> list[dict]:
    sweep = load_sweep(write_sweep(tmp_path, TPE.format(n=n, seed=seed), f"tpe{seed}.yaml"), "de-en")
    params = []

    def objective(trial, values):  # a smooth function of the values, best at lr 1e-3, lstm, 128
        params.append(values)
        bleu = (30 - 5 * abs(math.log10(values["train.lr"]) + 3) - abs(math.log2(values["model.hidden_size"] / 128))
                + 2 * (values["model.cell"] == "lstm") - 4 * values["model.dropout"])
        return Outcome("complete", bleu, {"best_valid_bleu": bleu, "steps": 2, "minutes": 0.1})

    run_worker(open_study(sweep, tmp_path / out), sweep, objective, tmp_path / out / "ask.lock")
    return params


def test_tpe_with_the_same_seed_gives_the_same_trials_also_when_resumed(tmp_path):
    straight = run_tpe(tmp_path, "a", seed=7, n=8)
    assert len(straight) == 8 and all(isinstance(p["model.hidden_size"], int) and 16 <= p["model.hidden_size"] <= 256
                                      and 1e-4 <= p["train.lr"] <= 1e-2 for p in straight)
    resumed = run_tpe(tmp_path, "b", seed=7, n=3) + run_tpe(tmp_path, "b", seed=7, n=8)  # stopped after 3
    assert resumed == straight
    assert run_tpe(tmp_path, "c", seed=8, n=8) != straight

    # The report of that study: ranked trials, best.yaml with the best values, the pictures.
    sweep = load_sweep(tmp_path / "tpe7.yaml", "de-en")
    report = write_report(open_study(sweep, tmp_path / "a"), sweep, tmp_path / "a").read_text()
    results = json.loads((tmp_path / "a" / "results.json").read_text())["trials"]
    bleus = [r["bleu"] for r in results]
    assert len(results) == 8 and bleus == sorted(bleus, reverse=True)
    best = load_recipe(str(tmp_path / "a" / "best.yaml"))
    assert {key: lookup(best, key) for key in results[0]["params"]} == results[0]["params"]
    assert best.train.max_steps == load_recipe("de-en").train.max_steps  # the budget is not copied
    for picture in ("history.png", "params.png", "importances.png"):
        assert (tmp_path / "a" / picture).stat().st_size > 0
    assert "![parameter importances](importances.png)" in report


def test_baseline_trains_the_recipes_own_values_first_and_the_report_compares(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, TPE.format(n=4, seed=3) + "baseline: true\n"), "de-en",
                       ["model.hidden_size=64"])  # the overrides are part of the recipe's values
    recipe = load_recipe("de-en", ["model.hidden_size=64"])
    seen = []

    def objective(trial, values):  # the recipe's values score lowest here: the others beat it
        seen.append(values)
        bleu = 10.0 if len(seen) == 1 else 10.0 + len(seen)
        return Outcome("complete", bleu, {"best_valid_bleu": bleu, "steps": 2, "minutes": 0.1})

    out = tmp_path / "out"
    assert run_worker(open_study(sweep, out), sweep, objective, out / "ask.lock") == 4
    assert seen[0] == {"model.cell": recipe.model.cell, "model.hidden_size": 64, "model.dropout": recipe.model.dropout,
                       "train.lr": recipe.train.lr}
    assert all(values != seen[0] for values in seen[1:])  # enqueued once, not again on a resume
    assert run_worker(open_study(sweep, out), sweep, objective, out / "ask.lock") == 0
    report = write_report(open_study(sweep, out), sweep, out).read_text()
    assert "| the recipe's own values |" in report
    assert "trial 0000, 10.00; the best trial is +4.00 validation BLEU from it." in report


def test_the_report_says_when_time_budgeted_trials_trained_on_different_machines(tmp_path):
    text = TPE.format(n=4, seed=2).replace("budget: {max_steps: 2}", "budget: {max_minutes: 5}")
    sweep = load_sweep(write_sweep(tmp_path, text), "de-en")
    machines = ["bf16-native class, AMD EPYC (AVX512), bf16, 2 threads", "fp32-only class, AMD EPYC (AVX2), fp32, 2 threads"]

    def objective(trial, values):  # as if two workers on two kinds of machine shared the study
        return Outcome("complete", 20.0 + trial.number, {"best_valid_bleu": 20.0 + trial.number, "steps": 9,
                                                         "minutes": 5.0, "machine": machines[trial.number % 2]})

    out = tmp_path / "out"
    run_worker(open_study(sweep, out), sweep, objective, out / "ask.lock")
    report = write_report(open_study(sweep, out), sweep, out).read_text()
    assert f"{machines[0]} (trials 0002, 0000)" in report and f"{machines[1]} (trials 0003, 0001)" in report
    assert "**Their budget is time**" in report


# -- real tiny sweeps through `nmt sweep` -------------------------------------------------------


def test_tiny_sweep_end_to_end(mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NMT_DATA_MIRROR", str(mirror))
    out = tmp_path / "sweep"
    assert main(["sweep", "de-en", str(ROOT / "sweeps" / "tiny.yaml"), "--out", str(out), *SETS]) == 0
    trials = sorted((out / "trials").iterdir())
    assert [t.name for t in trials] == ["0000", "0001", "0002"]
    # No data. or subword. key is swept: the trials share one prepared copy of those stages.
    [prepared] = [p for p in (out / "prepared").iterdir() if p.is_dir()]
    for trial in trials:
        assert json.loads((trial / "model" / "summary.json").read_text())["steps"] == 4  # the budget
        assert os.path.samefile(trial / "spm" / "manifest.json", prepared / "spm" / "manifest.json")
    results = json.loads((out / "results.json").read_text())["trials"]
    assert len(results) == 3 and {r["state"] for r in results} <= {"complete", "pruned"}

    # A trial is an ordinary experiment: nmt evaluate takes it, with the trial's own recipe.
    capsys.readouterr()
    assert main(["evaluate", str(trials[0] / "recipe.yaml"), "--exp", str(trials[0])]) == 0
    assert json.loads((trials[0] / "eval" / "scores.json").read_text())["scores"]["test"]["sentences"] == 100

    # best.yaml: the base recipe, the --set overrides and the best trial's values, no budget.
    best_row = next(r for r in results if r["state"] == "complete")
    best = load_recipe(str(out / "best.yaml"))
    assert {key: lookup(best, key) for key in best_row["params"]} == best_row["params"]
    assert best.model.embed_size == 32 and best.train.max_steps == 12  # TINY_OVERRIDES' limit, not 4

    report = (out / "report.md").read_text()
    assert all(f"[{t.name}](trials/{t.name})" in report for t in trials)
    assert "No parameter importances: " in report and JOINED_NOTE in report
    assert "Every trial trained on: " in report and " class, " in report  # one machine: this one
    for picture in ("history.png", "params.png", "curves.png", "by_length.png", "by_length_joined.png"):
        assert (out / picture).stat().st_size > 0
    lengths = json.loads((trials[0] / "lengths.json").read_text())
    assert [s["sentences"] for s in lengths["joined"]["sets"]] == [100, 50]  # 100 validation lines
    assert sum(b["sentences"] for b in lengths["by_length"]) == 100

    # nmt compare takes trial directories, and --joined extends the length axis.
    assert main(["compare", str(trials[0]), str(trials[1]), "--out", str(tmp_path / "cmp"), "--joined", "3",
                 "--heatmaps", "0"]) == 0
    compared = (tmp_path / "cmp" / "report.md").read_text()
    assert JOINED_NOTE in compared and "k=3 (33 inputs" in compared
    assert (tmp_path / "cmp" / "bleu_by_length_joined.png").stat().st_size > 0


def test_killed_sweep_resumes_without_repeating_a_finished_trial(mirror, prepared_exp, tmp_path):
    path = write_sweep(tmp_path, "n_trials: 2\nseed: 4\nbudget: {max_steps: 40}\npruner: {kind: none}\n"
                                 "space: {model.cell: [gru, lstm]}\n")
    overrides = [*TINY_OVERRIDES, "train.checkpoint_every=2", "train.valid_every=10"]
    out = tmp_path / "sweep"
    seed_prepared(prepared_exp, out, overrides)
    args = ["sweep", "de-en", str(path), "--out", str(out), *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "NMT_DATA_MIRROR": str(mirror)}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "nmt.cli", *args], cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        while not (out / "trials" / "0001" / "model" / "last.pt").is_file():  # trial 1 is training
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        first.kill()
        first.wait()
    assert not (out / "trials" / "0001" / "model" / "summary.json").exists()  # killed mid-training
    finished = (out / "trials" / "0000" / "model" / "summary.json").read_text()

    with pytest.MonkeyPatch.context() as env_patch:
        env_patch.setenv("NMT_DATA_MIRROR", str(mirror))
        assert main(args) == 0  # the same command again
    assert (out / "trials" / "0000" / "model" / "summary.json").read_text() == finished  # not repeated
    assert json.loads((out / "trials" / "0001" / "model" / "summary.json").read_text())["steps"] == 40
    trials = study_trials(path, out, overrides)
    assert [(t.number, t.state.name, t.user_attrs.get("dir")) for t in trials] == [
        (0, "COMPLETE", "0000"), (1, "FAIL", "0001"), (2, "COMPLETE", "0001")]  # 1 retried as 2, in 0001
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001"]
    assert len(json.loads((out / "results.json").read_text())["trials"]) == 2


def test_two_workers_share_one_study(mirror, tmp_path):
    path = write_sweep(tmp_path, "method: grid\nn_trials: 3\nbudget: {max_steps: 3}\n"
                                 "space:\n  subword.vocab_size: [200, 240]\n  model.cell: [gru, lstm]\n")
    out = tmp_path / "sweep"
    env = {**os.environ, "NMT_DATA_MIRROR": str(mirror)}
    command = [sys.executable, "-m", "nmt.cli", "sweep", "de-en", str(path), "--out", str(out), *SETS]
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log) for log in logs]
    codes = [w.wait(timeout=900) for w in workers]
    for log in logs:
        log.close()
    assert codes == [0, 0], [(tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(2)]

    trials = study_trials(path, out, TINY_OVERRIDES)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # as many as asked, none twice
    combinations = [(t.params["subword.vocab_size"], t.params["model.cell"]) for t in trials]
    assert len(set(combinations)) == 3
    assert {t.user_attrs["worker"]["pid"] for t in trials} <= {w.pid for w in workers}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002"]
    for trial in trials:  # each trained on the subwords of its own vocab_size, prepared once per value
        manifest = json.loads((out / "trials" / trial.user_attrs["dir"] / "spm" / "manifest.json").read_text())
        assert manifest["config"]["subword"]["vocab_size"] == trial.params["subword.vocab_size"]
    assert len([p for p in (out / "prepared").iterdir() if p.is_dir()]) == len({v for v, _ in combinations})


def test_a_pruned_trial_stops_cleanly(mirror, prepared_exp, tmp_path, monkeypatch):
    monkeypatch.setenv("NMT_DATA_MIRROR", str(mirror))
    # A threshold no BLEU reaches: the pruner stops the trial at its first validation.
    path = write_sweep(tmp_path, "n_trials: 1\nbudget: {max_steps: 12}\npruner: {kind: threshold, min_bleu: 100}\n"
                                 "space: {model.dropout: [0.1]}\n")
    overrides = [*TINY_OVERRIDES, "train.valid_every=3"]
    out = tmp_path / "sweep"
    seed_prepared(prepared_exp, out, overrides)
    assert main(["sweep", "de-en", str(path), "--out", str(out), *[a for o in overrides for a in ("--set", o)]]) == 0
    trial = out / "trials" / "0000"
    assert json.loads((trial / "model" / "summary.json").read_text())["steps"] == 3  # not 12
    records = [json.loads(line) for line in (trial / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_bleu" in r] == [3]
    for name in ("last.pt", "best.pt"):  # the checkpoints are whole and of that step
        assert load_checkpoint(trial / "model" / name)["progress"]["step"] == 3
    assert len(Translator.from_path(trial, device="cpu").translate(["Ein Hund läuft."])) == 1
    [row] = json.loads((out / "results.json").read_text())["trials"]
    assert (row["state"], row["note"]) == ("pruned", "pruned at step 3")
    assert not (out / "best.yaml").exists() and "No trial has completed yet" in (out / "report.md").read_text()


# -- longer inputs: joined captions --------------------------------------------------------------


def test_joined_captions_join_k_consecutive_lines_on_both_sides():
    src = [f"quelle {i} ." for i in range(10)]
    refs = [f"the reference {i} is here ." for i in range(10)]  # four words or more: 4-grams for BLEU
    sets = joined_sets(src, refs, 4)
    assert [(s.k, len(s.src), len(s.refs)) for s in sets] == [(1, 10, 10), (2, 5, 5), (3, 3, 3), (4, 2, 2)]
    assert sets[0].src == src and sets[2].src[1] == "quelle 3 . quelle 4 . quelle 5 ."
    assert sets[2].refs[1] == " ".join(refs[3:6])  # and the remainder (line 9) is left out for k = 3
    translation = {s: r for joined in sets for s, r in zip(joined.src, joined.refs)}  # a perfect model
    result = joined_by_length(src, refs, refs, lambda lines: [translation[line] for line in lines], 4)
    assert [(s["k"], s["sentences"], s["max_words"], s["bleu"]) for s in result["sets"]] == [
        (1, 10, 3, 100.0), (2, 5, 6, 100.0), (3, 3, 9, 100.0), (4, 2, 12, 100.0)]
    assert sum(b["sentences"] for b in result["by_length"]) == 20 and result["buckets"][-1] == "80+"


def test_sweep_trial_configs_carry_budget_and_values(tmp_path):
    sweep = load_sweep(ROOT / "sweeps" / "cells.yaml", "de-en")
    config = sweep.trial_config({"model.cell": "lstm", "model.attention": "none"})
    assert (config.model.cell, config.model.attention, config.train.max_minutes) == ("lstm", "none", 10.0)
    assert dataclasses.asdict(config.data) == dataclasses.asdict(sweep.base.data)
    bayes = load_sweep(ROOT / "sweeps" / "bayes.yaml", "de-en")
    assert {p.key for p in bayes.params if p.touches_stages} == {"subword.sampling_alpha"}
    assert [p.integer for p in bayes.params[:3]] == [True, True, True] and bayes.n_trials == 30
