"""Where beam search's time goes, by batch size: sentences/s, time per step, and torch.profiler.

    python bench/profile_search.py --model exp/de-en [--beam 5] [--sizes 1 4 16 64] [--profile 16]

Decodes the first --limit test sentences of an experiment (data/test.src) with nmt.Translator
(what `nmt translate` runs) at each batch size, in the order given, and prints sentences/s and the
mean time of one search step (a step of a batch: its decoder call, top-k and bookkeeping). The
step time at two batch sizes splits into a fixed cost per step and a cost per row (a + b * rows):
a server whose batches hold few sentences pays the fixed part for fewer of them. --profile N runs
torch.profiler over batches of N and prints the operators by self CPU time. Nothing else should
run meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmt.io import read_lines  # noqa: E402
from nmt.translate import Translator  # noqa: E402


class StepCounter:
    """Counts the decoder calls of the search (one per step of a batch) and the rows they carry."""

    def __init__(self, model):
        self.model, self.steps, self.rows = model, 0, 0
        self.original = model.decode_step

    def __enter__(self):
        def counted(prev, state, memory):
            self.steps += 1
            self.rows += prev.size(0)
            return self.original(prev, state, memory)
        self.model.decode_step = counted
        return self

    def __exit__(self, *exc):
        del self.model.decode_step  # the instance attribute: the method shows through again


def run(translator: Translator, sentences: list[str], beam: int, batch_size: int) -> dict:
    decode = translator.settings(beam, batch_size=batch_size)
    translator.search(sentences[: 2 * batch_size], decode)  # warm up
    with StepCounter(translator.model) as counter:
        started = time.perf_counter()
        translator.search(sentences, decode)
        seconds = time.perf_counter() - started
    return {"batch": batch_size, "sent_per_s": len(sentences) / seconds, "steps": counter.steps,
            "ms_per_step": 1000 * seconds / counter.steps, "rows_per_step": counter.rows / counter.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="experiment directory (with data/test.src)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, help="batch size to profile (0: none)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    translator = Translator.load(args.model, device="cpu")
    sentences = [s for s in read_lines(args.model / "data" / "test.src") if s.strip()][: args.limit]
    print(f"{len(sentences)} sentences, beam {args.beam}, {args.threads} threads, {translator.precision.name}")
    results = [run(translator, sentences, args.beam, size) for size in args.sizes]
    for r in results:
        print(f"batch {r['batch']:>4}: {r['sent_per_s']:7.1f} sent/s, {r['steps']:5d} steps, "
              f"{r['ms_per_step']:6.2f} ms/step, {r['rows_per_step']:6.1f} rows/step")
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        per_row = (hi["ms_per_step"] - lo["ms_per_step"]) / (hi["rows_per_step"] - lo["rows_per_step"])
        print(f"step time ~ {lo['ms_per_step'] - per_row * lo['rows_per_step']:.2f} ms fixed "
              f"+ {1000 * per_row:.1f} us per row (batches {lo['batch']} and {hi['batch']})")
    if args.profile:
        decode = translator.settings(args.beam, batch_size=args.profile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            translator.search(sentences[: 8 * args.profile], decode)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
