"""Where a training step's time and memory go: torch.profiler over a few updates of the bench model.

    python bench/profile_step.py [--steps 20] [--precision auto|fp32|bf16] [--exp bench/out/<date>/exp]

Needs an experiment directory with the data and spm stages done (any `make bench` run leaves one
in bench/out/<date>/exp; the newest is used by default). Prints the operators by self CPU time
(forward and backward), the share of the time in matrix products, and the peak RSS of each phase.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmt.batches import collate, token_batches  # noqa: E402
from nmt.config import load_recipe  # noqa: E402
from nmt.train import Trainer, train_step  # noqa: E402

MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
                   "aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward"}


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 1024


def newest_exp() -> Path:
    runs = sorted(p for p in (ROOT / "bench" / "out").glob("*/exp") if (p / "spm" / "manifest.json").is_file())
    if not runs:
        sys.exit("bench/profile_step.py: no bench/out/<date>/exp with a finished spm stage; run `make bench QUICK=1`")
    return runs[-1]


def update(trainer: Trainer, indices) -> tuple[int, torch.Tensor]:
    """The training loop's update (nmt.train.train_step) on the batch of these pair indices.
    Returns the batch's target tokens and its loss."""
    t = trainer.config.train
    batch = collate(trainer.data.train, indices).to(trainer.device)
    update = train_step(trainer.forward_model, trainer.optimizer, batch, t.clip_norm, t.label_smoothing,
                        trainer.precision.name)
    return batch.num_tgt_tokens, update.loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--exp", type=Path, default=None)
    args = parser.parse_args()
    exp = args.exp or newest_exp()
    config = load_recipe(str(ROOT / "bench" / "m30k-de-en.yaml"), [f"train.precision={args.precision}"])
    trainer = Trainer(config, exp)
    batches = token_batches(trainer.data.train, config.train.batch_tokens, config.train.seed, 0)

    for indices in batches[:5]:  # warm-up: first-use costs (oneDNN kernels, Adam state)
        update(trainer, indices)
    measured = batches[5 : 5 + args.steps]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started, tokens = time.perf_counter(), 0
        for indices in measured:
            tokens += update(trainer, indices)[0]
        seconds = time.perf_counter() - started
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    products = sum(e.self_cpu_time_total for e in averages if e.key in MATRIX_PRODUCTS)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
    print(f"{len(measured)} updates, {tokens} target tokens in {seconds:.1f} s under the profiler "
          f"({tokens / seconds:.0f} tok/s; the profiler adds overhead per operator)")
    print(f"matrix products: {100 * products / total:.0f}% of the operators' self CPU time; "
          f"peak RSS {peak_rss_mib():.0f} MiB (the profiler's event records included); {os.environ.get('OMP_NUM_THREADS', '?')} OMP threads")


if __name__ == "__main__":
    main()
