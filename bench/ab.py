"""Two versions of nmt, same work, alternating: is the second one as fast as the first?

    python bench/ab.py --a ../before --b . [--rounds 3] [--steps 150] [--exp bench/out/<date>/exp]

A and B are checkouts of this repository (e.g. `git worktree add ../before HEAD~3`). Each round
runs, for A then B (B then A in the next round, so that a drift of the machine hits both alike):
a real `nmt train` of the bench recipe from scratch for `--steps` updates (no validation until the
end), and a decode of the test set (beam 5 at batch 128, greedy at batch 256) by a Translator
loaded in its own process. Every run uses the same data, SentencePiece model, seed and batches;
training speed is target tokens / seconds spent in updates (summary.json), decoding speed
sentences / seconds (model loading excluded). Prints per-run figures, each version's median and
the ratio B / A, and writes bench/out/ab-<date>.json. Needs an experiment directory whose data
and spm stages are done and which holds a trained model for decoding (any `make bench` run
leaves one in bench/out/<date>/exp; the newest is used by default). Run it alone: two cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = "2"

# Runs inside the checkout under test (its nmt on sys.path first), for both the current
# Translator API (decode settings as a DecodeConfig) and the earlier one (loose arguments).
DECODE = r"""
import dataclasses, json, sys, time
import torch
from nmt.io import read_lines
from nmt.translate import Translator
torch.set_num_threads(int(sys.argv[3]))
translator = Translator.from_path(sys.argv[1], "cpu")
src = read_lines(sys.argv[2])
result = {}
for mode, beam, batch in (("beam5", 5, 128), ("greedy", 1, 256)):
    started = time.perf_counter()
    try:
        hyps = translator.translate(src, dataclasses.replace(translator.decode, beam_size=beam, batch_size=batch))
    except TypeError:
        hyps = translator.translate(src, beam_size=beam, batch_size=batch)
    result[mode] = len(src) / (time.perf_counter() - started)
    result[mode + "_hyps"] = hyps
print(json.dumps(result))
"""


def env(checkout: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS,
                NMT_DATA_MIRROR=os.environ.get("NMT_DATA_MIRROR", str(ROOT.parent / "shared" / "data")))


def train_speed(checkout: Path, exp: Path, steps: int, scratch: Path) -> float:
    run_dir = scratch / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for stage in ("data", "spm"):
        shutil.copytree(exp / stage, run_dir / stage)
    sets = [f"train.max_steps={steps}", "train.valid_every=100000", "train.checkpoint_every=100000",
            "train.max_minutes=0"]
    args = [sys.executable, "-m", "nmt.cli", "train", str(checkout / "bench" / "m30k-de-en.yaml"),
            "--exp", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    # cwd outside both checkouts: `python -m` puts the working directory first on sys.path
    subprocess.run(args, cwd=scratch, env=env(checkout), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    summary = json.loads((run_dir / "model" / "summary.json").read_text())
    return summary["tokens_per_second"]


def decode_speed(checkout: Path, exp: Path, scratch: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", DECODE, str(exp), str(exp / "data" / "test.src"), THREADS],
                            cwd=scratch, env=env(checkout), check=True, capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def newest_exp() -> Path:
    runs = sorted(p for p in (ROOT / "bench" / "out").glob("*/exp") if (p / "model" / "best.pt").is_file())
    if not runs:
        sys.exit("bench/ab.py: no bench/out/<date>/exp with a trained model; run `make bench QUICK=1`")
    return runs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="checkout A (e.g. the version before)")
    parser.add_argument("--b", type=Path, default=ROOT, help="checkout B (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--exp", type=Path, default=None)
    args = parser.parse_args()
    exp = (args.exp or newest_exp()).resolve()
    versions = {"A": args.a.resolve(), "B": args.b.resolve()}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                tok_s = train_speed(versions[name], exp, args.steps, Path(scratch))
                decoded = decode_speed(versions[name], exp, Path(scratch))
                runs[name].append({"train_tok_s": tok_s, **decoded})
                print(f"round {round_ + 1} {name}: train {tok_s:,.0f} tok/s, beam-5 {decoded['beam5']:.1f} sent/s, "
                      f"greedy {decoded['greedy']:.1f} sent/s", flush=True)
    same = all(a[k] == b[k] for a, b in zip(runs["A"], runs["B"]) for k in ("beam5_hyps", "greedy_hyps"))
    summary = {}
    for key in ("train_tok_s", "beam5", "greedy"):
        medians = {name: statistics.median(r[key] for r in runs[name]) for name in runs}
        summary[key] = {**medians, "ratio_b_over_a": medians["B"] / medians["A"]}
        print(f"{key}: A {medians['A']:,.1f}  B {medians['B']:,.1f}  B/A {medians['B'] / medians['A']:.3f}")
    print(f"translations identical: {same}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = ROOT / "bench" / "out" / f"ab-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in runs:
        for r in runs[name]:
            r.pop("beam5_hyps"), r.pop("greedy_hyps")
    out.write_text(json.dumps({"a": str(versions["A"]), "b": str(versions["B"]), "exp": str(exp),
                               "steps": args.steps, "rounds": args.rounds, "runs": runs, "summary": summary,
                               "translations_identical": same}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
