"""Does `train.compile` pay? Eager and compiled decoder steps on the same batches, in one process.

    python bench/compile_ab.py [--batches 150] [--block 25] [--precision auto|fp32|bf16] [--exp bench/out/<date>/exp]

Builds the bench model twice from the same seed, one with `decoder.recur` compiled, and trains
both on the same batches in alternating blocks (eager, compiled, eager, ...), so that the
machine's drift hits both alike. Prints each one's training tok/s, the ratio, and both final
losses (equal up to rounding: the compiled step computes the same thing, with the same
dropout masks). Needs an experiment directory with the data and spm stages done, as
bench/profile_step.py does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.profile_step import newest_exp, update  # noqa: E402
from nmt.batches import token_batches  # noqa: E402
from nmt.config import load_recipe  # noqa: E402
from nmt.train import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--block", type=int, default=25)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--exp", type=Path, default=None)
    args = parser.parse_args()
    exp = args.exp or newest_exp()
    trainers = {}
    for mode in ("eager", "compiled"):
        overrides = [f"train.precision={args.precision}", f"train.compile={mode == 'compiled'}"]
        config = load_recipe(str(ROOT / "bench" / "m30k-de-en.yaml"), overrides)
        trainers[mode] = Trainer(config, exp)  # seeds torch: both start from the same weights
    batches = token_batches(trainers["eager"].data.train, config.train.batch_tokens, config.train.seed, 0)

    # Each model draws its dropout masks from its own copy of the random stream, as if alone.
    rng = {mode: torch.get_rng_state() for mode in trainers}
    for mode, trainer in trainers.items():  # first-use costs apart: compiling, oneDNN kernels, Adam
        torch.set_rng_state(rng[mode])
        started = time.perf_counter()
        for indices in batches[:5]:
            update(trainer, indices)
        rng[mode] = torch.get_rng_state()
        print(f"{mode}: first 5 updates {time.perf_counter() - started:.1f} s (compiling included)")
    seconds, tokens, losses = {m: 0.0 for m in trainers}, {m: 0 for m in trainers}, {}
    measured = batches[5 : 5 + args.batches]
    for start in range(0, len(measured), args.block):
        for mode, trainer in trainers.items():
            torch.set_rng_state(rng[mode])
            started = time.perf_counter()
            for indices in measured[start : start + args.block]:
                n, loss = update(trainer, indices)
                tokens[mode] += n
            losses[mode] = loss.item()
            seconds[mode] += time.perf_counter() - started
            rng[mode] = torch.get_rng_state()
    speed = {m: tokens[m] / seconds[m] for m in trainers}
    for mode in trainers:
        print(f"{mode}: {len(measured)} updates, {speed[mode]:.0f} tok/s, last loss {losses[mode]:.4f}")
    print(f"compiled / eager: {speed['compiled'] / speed['eager']:.2f}x "
          f"({torch.get_num_threads()} threads, {trainers['eager'].precision.name})")


if __name__ == "__main__":
    main()
