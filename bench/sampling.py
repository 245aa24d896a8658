"""What subword regularization costs: building the sampler (once per run) and sampling the
training split (once per epoch), against SentencePiece's own sampled encode of the same lines.

    .venv/bin/python bench/sampling.py exp/de-en [--alpha 0.1] [--nbest -1] [--bpe] [--rounds 3]

Needs an experiment with the data and spm stages done. --bpe trains a BPE model of the same size
on the training text first (into a temporary directory) and measures BPE-dropout. Reports process
CPU seconds (less swayed by other processes than wall time; both are printed), the load average,
and how many more tokens a sampled epoch holds than an unsampled one.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nmt.io import read_aligned
from nmt.regularization import Segmenter
from nmt.subword import load_manifest, load_processor


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp", type=Path)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--nbest", type=int, default=-1)
    parser.add_argument("--bpe", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    manifest = load_manifest(args.exp / "spm", args.exp.name)
    lines = read_aligned(args.exp / "data" / "train.src", args.exp / "data" / "train.tgt")[:2]
    model_type = manifest.get("model_type", "unigram")
    processors = [load_processor(args.exp / "spm" / manifest["models"][side]) for side in ("src", "tgt")]
    if args.bpe:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[0] + lines[1]), model_writer=model,
                                       model_type="bpe", vocab_size=processors[1].get_piece_size(),
                                       hard_vocab_limit=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                       minloglevel=2, num_threads=2)
        path = Path(tempfile.mkdtemp()) / "bpe.model"
        path.write_bytes(model.getvalue())
        processors, model_type = [load_processor(path)] * 2, "bpe"

    print(f"{len(lines[0])} pairs; {model_type}, alpha {args.alpha}, nbest {args.nbest}; "
          f"load average {os.getloadavg()[0]:.2f}")
    segmenters, build = [], [0.0, 0.0]
    for text, processor in zip(lines, processors):
        segmenter, cpu, wall = timed(lambda t=text, p=processor: Segmenter(t, p, model_type, args.alpha, args.nbest))
        segmenters.append(segmenter)
        build = [build[0] + cpu, build[1] + wall]
    print(f"build the sampler (once per run): {build[0]:.2f} s CPU, {build[1]:.2f} s wall")
    ours, theirs = [], []
    for epoch in range(args.rounds):
        rng = np.random.default_rng([1, epoch])
        ours.append(sum(timed(lambda s=s, r=rng: s.sample(r))[1] for s in segmenters))
        theirs.append(sum(timed(lambda t=t, p=p: p.encode(t, enable_sampling=True, alpha=args.alpha,
                                                           nbest_size=args.nbest, num_threads=1))[1]
                          for t, p in zip(lines, processors)))
    print(f"sample both sides (once per epoch): {statistics.median(ours):.2f} s CPU (median of {args.rounds}); "
          f"SentencePiece's own sampled encode, one thread: {statistics.median(theirs):.2f} s CPU")
    # Sampled segmentations are longer: an epoch holds more tokens (and takes longer) by this much.
    for side, segmenter in zip(("source", "target"), segmenters):
        sampled = len(segmenter.sample(np.random.default_rng([1, 0]))[0])
        print(f"{side} tokens of an epoch, sampled / unsampled: {sampled / len(segmenter.best()[0]):.3f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
