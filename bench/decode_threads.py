"""Two cores for small batches: one search on both cores, or one search per core?

    python bench/decode_threads.py --model exp/de-en [--beam 5] [--batch 16] [--rounds 3]

A server with 16 one-sentence clients has at most 16 sentences to decode together, where torch's
two intra-op threads split small matrix products poorly. This decodes the first --limit test
sentences of an experiment (data/test.src) with nmt.Translator, alternating two ways, --rounds
times each: `one`, batches of --batch sentences with torch using both threads; `split`, two Python
threads each decoding half of the sentences in batches of --batch / 2 with one intra-op thread
(torch releases the GIL inside its operators, so the two searches overlap). It also decodes in
batches of 64 with both threads, what `nmt translate` does offline. It prints sentences/s of each
and how many translations differ from the first run's (sums may round differently in other batch
shapes). Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmt.io import read_lines  # noqa: E402
from nmt.translate import Translator  # noqa: E402


def one(translator: Translator, sentences: list[str], beam: int, batch: int) -> tuple[float, list]:
    torch.set_num_threads(2)
    decode = translator.settings(beam, batch_size=batch)
    started = time.perf_counter()
    hyps = translator.search(sentences, decode)
    return len(sentences) / (time.perf_counter() - started), [h[0].tokens for h in hyps]


def split(translator: Translator, sentences: list[str], beam: int, batch: int) -> tuple[float, list]:
    torch.set_num_threads(1)
    decode = translator.settings(beam, batch_size=max(1, batch // 2))
    halves = [sentences[0::2], sentences[1::2]]
    results: list = [None, None]

    def work(i: int) -> None:
        results[i] = translator.search(halves[i], decode)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    tokens = [None] * len(sentences)
    tokens[0::2] = [h[0].tokens for h in results[0]]
    tokens[1::2] = [h[0].tokens for h in results[1]]
    return len(sentences) / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="experiment directory (with data/test.src)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    translator = Translator.load(args.model, device="cpu")
    sentences = [s for s in read_lines(args.model / "data" / "test.src") if s.strip()][: args.limit]
    print(f"{len(sentences)} sentences, beam {args.beam}, batch {args.batch}, {translator.precision.name}")
    one(translator, sentences[: 2 * args.batch], args.beam, args.batch)  # warm up both ways
    split(translator, sentences[: 2 * args.batch], args.beam, args.batch)
    speeds: dict[str, list[float]] = {"one": [], "split": [], "offline-64": []}
    reference = None
    for _ in range(args.rounds):
        for name, run, batch in (("one", one, args.batch), ("split", split, args.batch), ("offline-64", one, 64)):
            speed, tokens = run(translator, sentences, args.beam, batch)
            speeds[name].append(speed)
            reference = reference or tokens
            differ = sum(a != b for a, b in zip(tokens, reference))
            print(f"{name:>10}: {speed:6.1f} sent/s, {differ} translations differ from the first run's")
    for name, values in speeds.items():
        print(f"{name:>10}: median {statistics.median(values):6.1f} sent/s of {len(values)} rounds")
    print(f"split / one: {statistics.median(speeds['split']) / statistics.median(speeds['one']):.2f}; "
          f"split / offline-64: {statistics.median(speeds['split']) / statistics.median(speeds['offline-64']):.2f}")


if __name__ == "__main__":
    main()
