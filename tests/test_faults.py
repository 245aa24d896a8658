"""Hardening: bad input and faults end in one clear message and lose no work."""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nmt.checkpoint import load_checkpoint, save_checkpoint
from nmt.cli import main
from nmt.config import Config, load_recipe, resolve_recipe_path, save_config
from nmt.corpus import run_data_stage
from nmt.errors import ConfigError, NmtError
from nmt.io import exclusive_lock
from nmt.subword import run_spm_stage
from nmt.train import train

from .conftest import ROOT, TINY_OVERRIDES, write_gz

# -- recipes: any YAML gives a valid config or one ConfigError --------------------------------
# A config that loads must survive the trip through model/config.yaml (save_config, load_recipe)
# unchanged; an error must name the file, and the key of the section that is wrong.

KEYS = ["data", "model", "train", "decode", "subword", "extends", "name", "src_lang", "tgt_lang",
        "train", "valid", "test", "corpus", "split", "hidden_size", "attention", "cell", "betas",
        "clean", "max_tokens", "lr", "beam_size", "bad_lines", "x"]
WORDS = ["bahdanau", "luong-dot", "luong-general", "none", "gru", "lstm", "rnn", "unigram", "bpe",
         "plateau", "warmup", "constant", "gnmt", "avg", "auto", "fp32", "bf16", "cpu", "skip", "en", "de"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(WORDS))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)

VALID = {"data": {"src_lang": "en", "tgt_lang": "de", "train": [{"corpus": "c", "split": "train"}],
                  "valid": {"corpus": "c", "split": "val"},
                  "test": {"test": {"corpus": "c", "split": "test"}}}}


def key_paths(cls, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths += key_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


# Every key of a recipe, some misspelt, some one level too deep.
PATHS = key_paths(Config) + ["model.hiden_size", "trian.lr", "x", "data.clean.x", "model.cell.x"]
split_sources = st.dictionaries(st.sampled_from(["corpus", "split", "hub", "src_file", "tgt_file", "x"]),
                                st.one_of(st.text(min_size=1, max_size=6), st.none(), st.integers()),
                                max_size=4)
edit_values = st.one_of(scalars, values, st.integers(-2, 600), st.floats(-1.0, 2.0),
                        st.lists(st.floats(-0.5, 1.5), max_size=3), st.lists(split_sources, max_size=2),
                        st.dictionaries(st.sampled_from(["test", "t2", "train", "a/b"]), split_sources,
                                        max_size=2))


def set_key(document: dict, path: str, value) -> None:
    *sections, key = path.split(".")
    node = document
    for name in sections:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[key] = value


@st.composite
def edited_recipes(draw) -> tuple[dict, list[str]]:
    """A valid recipe with a few keys set to anything: it loads often, and fails in many ways."""
    document = copy.deepcopy(VALID)
    paths = draw(st.lists(st.sampled_from(PATHS), max_size=3, unique=True))
    for path in paths:
        set_key(document, path, draw(edit_values))
    return document, paths


def assert_round_trips(config: Config, tmp_path) -> None:
    saved = tmp_path / "model" / "config.yaml"  # not next to the fuzzed recipe, which may extend
    saved.parent.mkdir(exist_ok=True)
    save_config(config, saved)
    assert load_recipe(str(saved)) == config


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(document=({**VALID, "name": "two\nlines"}, ["name"]))  # a name in save_config's header
@given(document=st.one_of(edited_recipes(), st.dictionaries(st.sampled_from(KEYS), values, max_size=6),
                          values, st.text(max_size=40)))
def test_any_yaml_gives_a_config_or_a_config_error(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    edited = None
    if isinstance(document, tuple):
        document, edited = document
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path.write_text(text, encoding="utf-8")
    try:
        config = load_recipe(str(path))
    except ConfigError as err:
        message = str(err)
    else:
        assert_round_trips(config, tmp_path)
        return
    try:
        extends = yaml.safe_load(text).get("extends")
    except (yaml.YAMLError, AttributeError):
        extends = None
    if isinstance(extends, str) and not message.startswith(f"{path}:"):
        # the recipe named by `extends` is not there
        assert message.startswith((f"{extends}: recipe file not found", f"unknown recipe '{extends}'"))
        return
    assert message.startswith(f"{path}:")
    if edited is not None:  # the error names a key in a section that was edited
        named = message.removeprefix(f"{path}: ")
        assert any(named.startswith(p.split(".")[0]) for p in edited), (message, edited)


assignments = st.builds("{}={}".format, st.sampled_from(PATHS),
                        st.one_of(st.text(max_size=8), st.sampled_from([*WORDS, "null", "[0.8, 0.9]", "{}"]),
                                  st.integers(-2, 600).map(str), st.floats(-1.0, 2.0).map(str)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(assignment=st.one_of(assignments, st.text(max_size=30)))
def test_any_override_gives_a_config_or_a_config_error(tmp_path, assignment):
    try:
        config = load_recipe("en-de", [assignment])
    except ConfigError as err:
        message = str(err)
    else:
        assert_round_trips(config, tmp_path)
        return
    if "=" not in assignment:
        assert message == f"--set: '{assignment}' is not of the form key.path=value"
        return
    section = assignment.split("=", 1)[0].strip().split(".")[0]
    recipe = resolve_recipe_path("en-de")
    assert message.startswith((f"--set: {section}", f"{recipe}: {section}")), message


# -- corpora ----------------------------------------------------------------------------------


def bad_mirror(tmp_path, en_lines: list[bytes], de_lines: list[bytes]):
    root = tmp_path / "mirror"
    for split in ("train", "val", "test_2016_flickr", "test_2017_flickr"):
        for lang, lines in (("en", en_lines), ("de", de_lines)):
            path = root / "multi30k" / f"{split}.{lang}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(line + b"\n" for line in (lines if split == "train" else [b"ok"])))
    return root


def test_invalid_utf8_and_nul_bytes_error_or_skip_with_counts(tmp_path, monkeypatch):
    en = [b"a fine line", b"broken \xff line", b"nul \x00 here", b"bell \x07 is removed", b"another fine one"]
    de = [b"eine gute Zeile", b"kaputt", b"null", b"Klingel", b"noch eine gute"]
    monkeypatch.setenv("NMT_DATA_MIRROR", str(bad_mirror(tmp_path, en, de)))
    with pytest.raises(NmtError, match=r"train.en:2: invalid UTF-8"):
        run_data_stage(load_recipe("en-de"), tmp_path / "exp")
    stats = run_data_stage(load_recipe("en-de", ["data.bad_lines=skip"]), tmp_path / "exp")
    assert stats["train"]["pairs_in"] == 5 and stats["train"]["pairs_kept"] == 3
    assert stats["train"]["dropped"] == {"invalid_text": 2}
    kept = (tmp_path / "exp" / "data" / "train.src").read_text().splitlines()
    assert kept[1] == "bell is removed"  # control characters become spaces, then fold


def test_overlong_lines_are_dropped_and_counted(tmp_path, monkeypatch):
    en = [b"short", b"word " * 5000, b"fine too"]
    de = [b"kurz", b"Wort " * 5000, b"auch gut"]
    monkeypatch.setenv("NMT_DATA_MIRROR", str(bad_mirror(tmp_path, en, de)))
    stats = run_data_stage(load_recipe("en-de"), tmp_path / "exp")
    assert stats["train"]["dropped"] == {"too_long": 1} and stats["train"]["pairs_kept"] == 2


def test_empty_corpora_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NMT_DATA_MIRROR", str(bad_mirror(tmp_path, [b""], [b""])))
    with pytest.raises(NmtError, match="no training pairs left after cleaning"):
        run_data_stage(load_recipe("en-de"), tmp_path / "exp")
    empty = tmp_path / "empty"
    for lang in ("en", "de"):
        write_gz(empty / "multi30k" / f"train.{lang}.gz", ["x y"])
        write_gz(empty / "multi30k" / f"val.{lang}.gz", [])
    monkeypatch.setenv("NMT_DATA_MIRROR", str(empty))
    with pytest.raises(NmtError, match="data.valid: .* is empty"):
        run_data_stage(load_recipe("en-de"), tmp_path / "exp2")


def test_missing_local_file_names_it(tmp_path):
    config = load_recipe("en-de", [f"data.train.0.src_file={tmp_path}/nope.en",
                                   f"data.train.0.tgt_file={tmp_path}/nope.de"])
    with pytest.raises(NmtError, match="nope.en: file not found"):
        run_data_stage(config, tmp_path / "exp")


def test_interrupted_data_stage_is_never_taken_as_complete(tiny_exp, tmp_path, monkeypatch):
    config, exp = tiny_exp
    monkeypatch.setenv("NMT_DATA_MIRROR", str(tmp_path / "missing-mirror-dir"))
    (tmp_path / "missing-mirror-dir").mkdir()
    with pytest.raises(NmtError):
        run_data_stage(config, exp)  # fails part-way: after removing its completion marker
    assert not (exp / "data" / "stats.json").exists()
    with pytest.raises(NmtError, match="run `nmt data"):
        run_spm_stage(config, exp)


def test_binary_input_to_translate_is_a_clear_error(trained_exp):
    _, exp = trained_exp
    blob = bytes(range(256)) * 4
    result = subprocess.run([sys.executable, "-m", "nmt.cli", "translate", "--model", str(exp)],
                            input=b"ein Haus\n" + blob + b"\n", capture_output=True, cwd=ROOT)
    assert result.returncode == 2 and b"<stdin>:2: NUL byte" in result.stderr
    # one error line; before it at most the "nmt: precision ..." line every translation starts with
    lines = result.stderr.decode().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("nmt translate: error: ")
    assert all(line.startswith("nmt: precision ") for line in lines[:-1])


# -- training faults --------------------------------------------------------------------------


def nmt_train(exp, *extra):
    args = [sys.executable, "-m", "nmt.cli", "train", "de-en", "--exp", str(exp)]
    for override in [*TINY_OVERRIDES, *extra]:
        args += ["--set", override]
    return args


def wait_for(condition, process: subprocess.Popen, what: str, stderr: Path, timeout: float = 600.0) -> None:
    """Poll until `condition()`; fail if the process ends first or nothing happens for `timeout`
    seconds (a safety net against a hang, far above what any machine needs)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process exited with status {process.returncode} before {what}: "
                        + stderr.read_text(errors="replace")[-1000:])
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} seconds")
        time.sleep(0.02)


def test_kill_9_loses_only_work_since_the_last_checkpoint(tiny_exp, tmp_path):
    _, exp = tiny_exp
    stderr = tmp_path / "train.stderr"
    with open(stderr, "wb") as err:
        process = subprocess.Popen(nmt_train(exp, "train.max_steps=100000", "train.checkpoint_every=1",
                                             "train.valid_every=1000"),
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    last = exp / "model" / "last.pt"
    try:
        # a few checkpoints written, one each update: the kill may land inside a write
        wait_for(lambda: last.is_file() and load_checkpoint(last)["progress"]["step"] >= 3, process,
                 f"a checkpoint at step 3 in {last}", stderr)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    step = load_checkpoint(last)["progress"]["step"]  # the previous checkpoint stays readable
    assert step >= 3
    # The stale lock of the killed process is detected, and training resumes.
    assert (exp / "model" / "train.lock").exists()
    resumed = subprocess.run(nmt_train(exp, f"train.max_steps={step + 3}"), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert f"resuming from {last} at step {step}" in resumed.stdout
    assert "stale lock" in resumed.stdout
    assert load_checkpoint(last)["progress"]["step"] == step + 3


def test_second_trainer_on_the_same_experiment_is_refused(tmp_path):
    lock = tmp_path / "train.lock"
    with exclusive_lock(lock):
        with pytest.raises(NmtError, match=f"pid {os.getpid()}"):
            with exclusive_lock(lock):
                pass
    assert not lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid}\n")
    with exclusive_lock(lock):  # stale: its process is gone
        assert lock.read_text().strip() == str(os.getpid())


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(NmtError, match="No space left on device.*previous checkpoint is left as it was"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_nan_loss_skips_updates_then_stops_keeping_the_last_good_checkpoint(tiny_exp, capsys):
    config, exp = tiny_exp
    config.train.max_steps = 4
    train(config, exp)
    good = load_checkpoint(exp / "model" / "last.pt")
    config.train.max_steps = 40
    config.train.lr = 1e38  # near the float32 limit: activations overflow to inf after one update
    config.train.clip_norm = 0.0
    with pytest.raises(NmtError, match="NaN/inf for 5 batches in a row"):
        train(config, exp)
    assert "update skipped" in capsys.readouterr().out
    kept = load_checkpoint(exp / "model" / "last.pt")
    assert kept["progress"]["step"] <= good["progress"]["step"] + 1
    assert not (exp / "model" / "summary.json").exists()
    # What was kept is good: finite parameters, and progress without a NaN (JSON refuses one).
    assert all(torch.isfinite(w).all() for w in kept["model"].values() if w.is_floating_point())
    assert json.loads(json.dumps(kept["progress"], allow_nan=False)) == kept["progress"]


def test_nan_stop_before_any_checkpoint_says_none_was_written(tiny_exp):
    config, exp = tiny_exp
    config.train.max_steps, config.train.checkpoint_every = 40, 1000
    config.train.lr, config.train.clip_norm = 1e38, 0.0
    with pytest.raises(NmtError, match="no last.pt was written yet") as raised:
        train(config, exp)
    assert "keeps the last good state" not in str(raised.value)
    assert not (exp / "model" / "last.pt").exists()


def test_ctrl_c_exits_130_and_names_the_command_as_given(tiny_exp, tmp_path):
    """The resume hint repeats the arguments as they were given: a recipe path and --exp."""
    _, exp = tiny_exp
    recipe = str(resolve_recipe_path("de-en"))
    args = [sys.executable, "-m", "nmt.cli", "train", recipe, "--exp", str(exp)]
    for override in [*TINY_OVERRIDES, "train.max_steps=100000", "train.checkpoint_every=2"]:
        args += ["--set", override]
    stderr = tmp_path / "train.stderr"
    with open(stderr, "wb") as err:
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        last = exp / "model" / "last.pt"
        wait_for(last.exists, process, "a checkpoint", stderr)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=600)
    message = stderr.read_text().strip().splitlines()[-1]
    assert process.returncode == 130, message
    assert message.startswith("nmt train: interrupted at step ")
    assert f"run `nmt train {recipe} --exp {exp} --set" in message and message.endswith("again to resume")


def test_a_partial_metrics_line_does_not_stop_a_resume(tiny_exp):
    config, exp = tiny_exp
    config.train.max_steps = 4
    train(config, exp)
    metrics = exp / "model" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "train_lo')  # a kill -9 in the middle of a record
    config.train.max_steps = 6
    summary = train(config, exp)
    assert summary["steps"] == 6
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line reads
    assert [r["step"] for r in records if "valid_bleu" in r] == [4, 6]


def test_an_extreme_validation_line_is_bounded_with_a_warning(tiny_exp, capsys):
    """A 3,000-word validation line: left out of the validation loss, its source cut for BLEU,
    named once; training goes on."""
    config, exp = tiny_exp
    for side in ("src", "tgt"):
        path = exp / "data" / f"valid.{side}"
        lines = path.read_text().splitlines()
        lines[6] = " ".join(["Hund", "Katze", "Baum"] * 1000)
        path.write_text("\n".join(lines) + "\n")
    run_spm_stage(config, exp)
    config.train.max_steps, config.train.valid_every = 2, 1
    summary = train(config, exp)
    out = capsys.readouterr().out
    assert summary["steps"] == 2
    assert out.count(f"{exp / 'data' / 'valid.src'}:7:") == 1
    assert "left out of the validation loss" in out


def test_evaluate_decodes_with_the_recipe_and_records_it(trained_exp, tmp_path):
    """`--set decode.*` changes the decoding (max 2 output tokens: one piece and EOS) and the
    record says so."""
    config, exp = trained_exp

    overrides = [a for o in [*TINY_OVERRIDES, "decode.beam_size=2", "decode.max_len_a=0", "decode.max_len_b=2"]
                 for a in ("--set", o)]
    work = tmp_path / "exp"
    for part in ("data", "spm", "model"):
        os.makedirs(work, exist_ok=True)
        os.symlink(exp / part, work / part)
    assert main(["evaluate", "de-en", "--exp", str(work), *overrides]) == 0
    record = json.loads((work / "eval" / "test.json").read_text())
    assert record["decode"]["beam_size"] == 2 and record["decode"]["max_len_b"] == 2
    hyps = (work / "eval" / "test.hyp").read_text().splitlines()
    assert hyps and all(len(h.split()) <= 1 for h in hyps)  # at most one piece: at most one word


def test_a_model_too_big_for_memory_is_one_line_naming_the_section(tiny_exp, capsys):
    """Sizes that pass validation but not the machine: a 4-TiB recurrent weight."""
    _, exp = tiny_exp
    overrides = [a for o in [*TINY_OVERRIDES, "model.hidden_size=1000000000"] for a in ("--set", o)]
    assert main(["train", "de-en", "--exp", str(exp), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nmt train: error: model: the model does not fit in memory (a tensor of ")
    assert not (exp / "model" / "last.pt").exists()
