"""Hardening: bad input and faults end in one clear message and lose no work."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmt.checkpoint import load_checkpoint, save_checkpoint
from nmt.config import Config, load_recipe
from nmt.corpus import run_data_stage
from nmt.errors import ConfigError, NmtError
from nmt.subword import run_spm_stage
from nmt.train import exclusive_lock, train

from .conftest import ROOT, TINY_OVERRIDES, write_gz

# -- recipes: any YAML gives a valid config or one ConfigError --------------------------------

KEYS = ["data", "model", "train", "decode", "subword", "extends", "name", "src_lang", "tgt_lang",
        "train", "valid", "test", "corpus", "split", "hidden_size", "attention", "cell", "betas",
        "clean", "max_tokens", "lr", "beam_size", "bad_lines", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["bahdanau", "gru", "en", "de", "none"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), values,
                          st.text(max_size=40)))
def test_any_yaml_gives_a_config_or_a_config_error(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path.write_text(text, encoding="utf-8")
    try:
        assert isinstance(load_recipe(str(path)), Config)
    except ConfigError as err:
        assert str(path) in str(err) or "recipe" in str(err)


@settings(max_examples=60, deadline=None)
@given(assignment=st.text(max_size=30))
def test_any_override_gives_a_config_or_a_config_error(assignment):
    try:
        load_recipe("en-de", [assignment])
    except ConfigError:
        pass


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


def test_kill_9_loses_only_work_since_the_last_checkpoint(tiny_exp):
    _, exp = tiny_exp
    process = subprocess.Popen(nmt_train(exp, "train.max_steps=100000", "train.checkpoint_every=1",
                                         "train.valid_every=1000"),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = exp / "model" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.01)
    time.sleep(1.0)  # let it write a few more checkpoints; the kill may land inside a write
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = load_checkpoint(last)["progress"]["step"]  # the previous checkpoint stays readable
    assert step >= 1
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
    json.dumps(kept["progress"])
