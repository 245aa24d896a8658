"""nmt serve's batcher without HTTP: 16 client threads submit one sentence each, in process.

    python bench/batcher_load.py --model exp/de-en [--beam 5] [--clients 16] [--limit 512]

Separates the batcher and search (nmt.batcher, nmt.search.BeamSearch) from the web server: the
sentences/s here against bench/serve_load.py's is what HTTP and the event loop cost. Prints
sentences/s, the mean batch (sentences decoded together per round), and the time spent in the
model's encoder (newly arrived sentences), in BeamSearch.add (encoding and joining the batch) and
in its steps. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmt import Translator  # noqa: E402
from nmt.batcher import Batcher, GroupKey  # noqa: E402
from nmt.io import read_lines  # noqa: E402
from nmt.search import BeamSearch  # noqa: E402

spent: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()


def timed(owner, name: str, label: str) -> None:
    """Wrap owner.name to add its time to spent[label]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - started
            calls[label] += 1
    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="experiment directory (with data/test.src)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--join-wait-ms", type=float, default=0.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    translator = Translator.load(args.model, device="cpu")
    sentences = [s for s in read_lines(args.model / "data" / "test.src") if s.strip()][: args.limit]
    timed(BeamSearch, "add", "BeamSearch.add")
    timed(BeamSearch, "step", "BeamSearch.step")
    timed(translator.model, "encode", "model.encode")
    batcher = Batcher({"m": translator}, args.max_batch, args.max_wait_ms / 1000, args.join_wait_ms / 1000)
    key = GroupKey("m", args.beam, 1, False)
    batcher.submit(key, sentences[: args.clients]).result()  # warm up
    spent.clear()
    calls.clear()
    before = batcher.totals
    numbers, lock = iter(range(len(sentences))), threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            batcher.submit(key, [sentences[i]]).result()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    batcher.close()
    rounds, in_rounds = batcher.totals[1] - before[1], batcher.totals[2] - before[2]
    print(f"{len(sentences)} sentences, beam {args.beam}, {args.clients} client threads, {args.threads} torch threads")
    print(f"{len(sentences) / seconds:.1f} sent/s in {seconds:.1f} s; mean batch {in_rounds / max(rounds, 1):.1f} "
          f"sentences over {rounds} rounds")
    for label in ("model.encode", "BeamSearch.add", "BeamSearch.step"):
        print(f"{label:16s} {spent[label]:6.2f} s in {calls[label]:5d} calls, "
              f"{1000 * spent[label] / max(calls[label], 1):6.2f} ms each")


if __name__ == "__main__":
    main()
