"""Training: exact resume after an interrupt, checkpoints that fail loudly, the recipe end to end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from nmt.checkpoint import FORMAT_VERSION, load_checkpoint, load_state, save_checkpoint
from nmt.config import load_recipe
from nmt.errors import NmtError
from nmt.model import build_model
from nmt.train import train

from .conftest import ROOT, TINY_OVERRIDES


def model_state(path):
    return load_checkpoint(path)["model"]


@contextlib.contextmanager
def after_update(n: int, action):
    """Call `action()` right after the n-th optimizer step (of any optimizer) in the block."""
    count = 0

    def hook(optimizer, args, kwargs):
        nonlocal count
        count += 1
        if count == n:
            action()

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_interrupted_and_resumed_equals_straight(tiny_exp, tmp_path):
    config, exp = tiny_exp
    config.train.max_steps = 30
    resumed_exp = tmp_path / "resumed"
    shutil.copytree(exp, resumed_exp)

    summary = train(config, exp)
    assert summary["steps"] == 30

    previous = signal.signal(signal.SIGINT, lambda *_: None)  # should train miss it, not pytest
    try:
        # Ctrl-C during the 5th update, between checkpoints (every 4) and validations (every 6):
        # the update finishes, last.pt is written, training stops.
        with after_update(5, lambda: signal.raise_signal(signal.SIGINT)):
            with pytest.raises(NmtError, match="interrupted at step 5"):
                train(config, resumed_exp)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_checkpoint(resumed_exp / "model" / "last.pt")["progress"]["step"] == 5
    assert not (resumed_exp / "model" / "summary.json").exists()

    train(config, resumed_exp)  # resumes
    straight, resumed = model_state(exp / "model" / "last.pt"), model_state(resumed_exp / "model" / "last.pt")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    log = [json.loads(line) for line in (resumed_exp / "model" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "valid_bleu" in r]
    assert steps == sorted(set(steps))  # no record was written twice


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tiny_exp):
    config, exp = tiny_exp
    config.train.max_steps = 4
    train(config, exp)
    last = exp / "model" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(NmtError, match="last.pt: not a readable checkpoint"):
        train(config, exp)
    assert last.read_bytes() == data[: len(data) // 2]  # nothing overwritten


def test_checkpoint_of_another_model_is_refused(tiny_exp):
    config, exp = tiny_exp
    config.train.max_steps = 4
    train(config, exp)
    before = (exp / "model" / "last.pt").read_bytes()
    config.model.hidden_size = 40
    with pytest.raises(NmtError, match="different model section"):
        train(config, exp)
    assert (exp / "model" / "last.pt").read_bytes() == before

    payload = load_checkpoint(exp / "model" / "last.pt")
    other_vocab = build_model(config.model, 300, 300)
    with pytest.raises(NmtError, match="does not fit this model"):
        load_state(other_vocab, payload["model"], exp / "model" / "last.pt")


def test_newer_or_foreign_checkpoints_are_refused(tmp_path):
    save_checkpoint(tmp_path / "new.pt", {"model": {}})
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(NmtError, match="newer than this nmt reads"):
        load_checkpoint(tmp_path / "newer.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(NmtError, match="not an nmt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(NmtError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_recipe_end_to_end_through_make(mirror, tmp_path):
    """make runs data → spm → train → eval on a tiny corpus; a second make does nothing."""
    exp = tmp_path / "exp"
    args = ["make", "recipe=de-en", "train", f"EXP={exp}", f"MIRROR={mirror}",
            "SET=" + " ".join(TINY_OVERRIDES)]
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    scores = json.loads((exp / "eval" / "scores.json").read_text())
    test = json.loads((exp / "eval" / "test.json").read_text())
    assert set(scores["scores"]) == {"test", "test2017"}
    assert test["bleu_signature"].startswith("nrefs:1|case:mixed") and test["beam_size"] == 3
    assert len((exp / "eval" / "test.hyp").read_text().splitlines()) == 100
    summary = json.loads((exp / "model" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["num_parameters"] > 0
    config = load_recipe(str(exp / "model" / "config.yaml"))
    assert config.model.hidden_size == 32
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and "/nmt " not in second.stdout


def test_time_budget_stops_cleanly(tiny_exp, monkeypatch):
    """The update that runs out train.max_minutes is the last; the run ends as a finished one and
    stays stopped when resumed. An hour passes on the clock during the first update, so no real
    time budget (and no machine's speed) is involved."""
    config, exp = tiny_exp
    config.train.max_steps = 50  # a safety net: the budget must stop training long before
    config.train.max_minutes = 30
    config.train.max_epochs = 1000
    config.train.patience = 0
    skipped = {"seconds": 0.0}
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skipped["seconds"])
    with after_update(1, lambda: skipped.update(seconds=3600.0)):
        summary = train(config, exp)
    assert summary["steps"] == 1 and summary["wall_seconds"] >= 3600.0
    assert json.loads((exp / "model" / "summary.json").read_text())["steps"] == 1
    assert load_checkpoint(exp / "model" / "last.pt")["progress"]["step"] == 1
    resumed = train(config, exp)  # its progress says the budget is spent
    assert resumed["steps"] == 1 and load_checkpoint(exp / "model" / "last.pt")["progress"]["step"] == 1


def test_compiled_decoder_step_trains_like_eager(tiny_exp, tmp_path):
    config, exp = tiny_exp
    compiled_exp = tmp_path / "compiled"
    shutil.copytree(exp, compiled_exp)
    train(config, exp)
    config.train.compile = True
    torch._dynamo.reset()
    train(config, compiled_exp)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    eager, compiled = model_state(exp / "model" / "last.pt"), model_state(compiled_exp / "model" / "last.pt")
    for name in eager:  # fused kernels round differently, nothing more
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-3, atol=1e-4, msg=name)
