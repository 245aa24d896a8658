"""Fine-tuning (train.init_from, --init-from): the checkpoint's subwords and weights, a fresh
optimizer and step count, one-line refusals, and a resume that never re-initialises."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nmt.checkpoint import load_checkpoint
from nmt.cli import main
from nmt.config import load_recipe
from nmt.errors import NmtError
from nmt.subword import run_spm_stage
from nmt.train import load_training_data, train

from .conftest import TINY_OVERRIDES
from .test_train import after_update, model_state


@pytest.fixture
def parent(trained_exp, tmp_path):
    """A copy of the tiny trained model's last.pt (100 steps) and its payload."""
    _, exp = trained_exp
    path = tmp_path / "parent.pt"
    shutil.copy(exp / "model" / "last.pt", path)
    return path, load_checkpoint(path)


@pytest.fixture
def fine_tune(tiny_exp, parent):
    """The tiny experiment set to fine-tune `parent` for 8 steps, its spm stage run with it."""
    config, exp = tiny_exp
    config.train.init_from, config.train.max_steps = str(parent[0]), 8
    config.train.lr = 3e-4  # the recipe's, not the parent's (0.01)
    run_spm_stage(config, exp)
    return config, exp


def test_spm_stage_takes_the_checkpoints_subwords(fine_tune, parent):
    config, exp = fine_tune
    path, payload = parent
    manifest = json.loads((exp / "spm" / "manifest.json").read_text())
    assert manifest["models"] == {"src": "joint.model", "tgt": "joint.model"}
    assert (exp / "spm" / "joint.model").read_bytes() == payload["spm"]["src"] == payload["spm"]["tgt"]
    assert manifest["output_vocab"] == payload["output_vocab"]
    assert manifest["init_from"] == {"path": str(path.resolve()), "step": 100}


def test_fine_tuning_starts_from_the_weights_with_a_fresh_optimizer(fine_tune, parent):
    config, exp = fine_tune
    path, payload = parent
    first = {}

    def before_step(optimizer, args, kwargs):
        if not first:  # the model's parameters (no buffers: state_dict order) before the first update
            first.update(state=len(optimizer.state), lr=optimizer.param_groups[0]["lr"],
                         weights=[p.detach().clone() for p in optimizer.param_groups[0]["params"]])

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        summary = train(config, exp)
    finally:
        handle.remove()
    assert len(first["weights"]) == len(payload["model"])
    for (name, saved), weights in zip(payload["model"].items(), first["weights"]):
        assert torch.equal(weights, saved), name  # the checkpoint's
    assert first["state"] == 0 and first["lr"] == 3e-4  # a fresh Adam and schedule
    assert summary["steps"] == 8  # counted from 0, not from the checkpoint's 100
    last = load_checkpoint(exp / "model" / "last.pt")
    assert last["progress"]["step"] == 8
    record = {"path": str(path.resolve()), "step": 100}
    assert summary["init_from"] == last["init_from"] == load_checkpoint(exp / "model" / "best.pt")["init_from"] == record
    assert json.loads((exp / "model" / "summary.json").read_text())["init_from"] == record


def test_another_architecture_is_one_line(tiny_exp, parent, capsys):
    _, exp = tiny_exp
    args = ["spm", "de-en", "--exp", str(exp), *(f"--set={o}" for o in TINY_OVERRIDES),
            "--set", "model.hidden_size=40", "--set", "model.cell=lstm", "--set", "model.dropout=0.5",
            "--init-from", str(parent[0])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.init_from" in err and str(parent[0]) in err
    assert "model.hidden_size 32 (checkpoint) vs 40 (recipe)" in err and "model.cell 'gru'" in err
    assert "dropout" not in err  # changes no weight: fine-tuning may change it
    assert main(["train", *args[1:]]) == 2
    assert "model.hidden_size 32 (checkpoint) vs 40 (recipe)" in capsys.readouterr().err


def test_train_refuses_subwords_not_made_from_the_checkpoint(tiny_exp, parent, capsys):
    config, exp = tiny_exp
    config.subword.vocab_size = 150
    run_spm_stage(config, exp)  # its own SentencePiece model, not the checkpoint's
    args = ["train", "de-en", "--exp", str(exp), *(f"--set={o}" for o in TINY_OVERRIDES),
            "--set", "subword.vocab_size=150", "--init-from", str(parent[0])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--init-from {parent[0]}` first" in err
    assert main(["train", "de-en", "--exp", str(exp), *(f"--set={o}" for o in TINY_OVERRIDES),
                 "--set", "subword.vocab_size=150", "--init-from", str(exp / "missing.pt")]) == 2
    assert "train.init_from: " in capsys.readouterr().err


def test_interrupted_fine_tune_resumes_rather_than_reinitialising(fine_tune, parent, tmp_path):
    config, exp = fine_tune
    straight_exp = tmp_path / "straight"
    shutil.copytree(exp, straight_exp)
    train(config, straight_exp)

    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        with after_update(3, lambda: signal.raise_signal(signal.SIGINT)):
            with pytest.raises(NmtError, match="interrupted at step 3"):
                train(config, exp)
    finally:
        signal.signal(signal.SIGINT, previous)
    parent[0].unlink()  # a resume never reads the checkpoint it started from again
    summary = train(config, exp)
    assert summary["steps"] == 8 and summary["init_from"]["step"] == 100
    straight, resumed = model_state(straight_exp / "model" / "last.pt"), model_state(exp / "model" / "last.pt")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_fine_tuning_may_sample_subwords(fine_tune, parent):
    config, exp = fine_tune
    config.subword.sampling_alpha = 0.3
    run_spm_stage(config, exp)
    data = load_training_data(config, exp)  # the checkpoint's output vocabulary, sampled targets
    split = data.sampler.sample(config.train.seed, 0)
    assert len(split) == len(data.train) and data.vocab.record() == parent[1]["output_vocab"]


def test_init_from_is_a_recipe_key():  # so that make passes it with SET; --init-from is tested above
    config = load_recipe("de-en", ["train.init_from=exp/de-en/model/best.pt"])
    assert config.train.init_from == "exp/de-en/model/best.pt"
    assert load_recipe("de-en").train.init_from is None
