"""torchrun + DistributedDataParallel on CPU (gloo): same parameters as one process that sees the
same global batches, also across a resume; one log and checkpoint; a dead rank ends the run
instead of hanging it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch

from nmt.batches import collate, token_batches
from nmt.checkpoint import load_checkpoint
from nmt.train import Trainer

from .conftest import ROOT, TINY_OVERRIDES

STEPS = 6


def torchrun(exp, *overrides, nproc=2):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "nmt.cli", "train", "de-en", "--exp", str(exp)]
    for override in [*TINY_OVERRIDES, "model.dropout=0.0", *overrides]:
        args += ["--set", override]
    return args


def reference_parameters(config, exp, world=2):
    """One process, one update per group of `world` batches, gradients averaged as DDP does."""
    t = config.train
    trainer = Trainer(config, exp)  # the same model, optimizer and data, as one process
    model, optimizer, split = trainer.model, trainer.optimizer, trainer.data.train
    batches = token_batches(split, t.batch_tokens, t.seed, 0, t.max_len)
    model.train()
    for step in range(STEPS):
        losses = [model(*_tensors(collate(split, batches[world * step + r])), t.label_smoothing)
                  for r in range(world)]
        optimizer.zero_grad()
        (sum(losses) / world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        optimizer.step()
    return model.state_dict()


def _tensors(batch):
    return batch.src_ids, batch.src_lens, batch.tgt_in, batch.tgt_out


def test_two_processes_equal_one_process_on_the_same_global_batches(tiny_exp):
    config, exp = tiny_exp
    config.model.dropout = 0.0
    # Half the steps, then resume under torchrun for the rest.
    for steps in (STEPS // 2, STEPS):
        result = subprocess.run(torchrun(exp, f"train.max_steps={steps}", "train.valid_every=1000"),
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("model:") == 1  # rank 0 alone prints
    assert f"resuming from {exp / 'model' / 'last.pt'} at step {STEPS // 2}" in result.stdout
    payload = load_checkpoint(exp / "model" / "last.pt")
    assert payload["progress"]["step"] == STEPS
    assert len(payload["rng"]["ranks"]) == 2
    expected = reference_parameters(config, exp)
    for name, value in expected.items():
        torch.testing.assert_close(payload["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    records = [json.loads(line) for line in (exp / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_bleu" in r] == [STEPS // 2, STEPS]  # written once each
    summary = json.loads((exp / "model" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == STEPS


def test_a_dead_rank_ends_the_run(tiny_exp):
    _, exp = tiny_exp
    launcher = subprocess.Popen(torchrun(exp, "train.max_steps=100000", "train.valid_every=100000",
                                         "train.checkpoint_every=2"),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (exp / "model" / "last.pt").exists():
            time.sleep(0.05)
        assert (exp / "model" / "last.pt").exists(), "training did not start"
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
        pids = [int(p) for p in workers.stdout.split()]
        assert len(pids) == 2
        subprocess.run(["kill", "-9", str(pids[-1])], check=True)
        launcher.wait(timeout=60)  # torchrun notices, stops the other rank and fails
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGKILL)
    assert launcher.returncode != 0
    assert b"failed" in launcher.stderr.read().lower()
    load_checkpoint(exp / "model" / "last.pt")  # the last checkpoint is intact
