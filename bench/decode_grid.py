"""Beam size and length penalty on the validation set: which decode settings to ship (issue 16).

    .venv/bin/python bench/decode_grid.py --model exp/de-en [--model ...] --beams 3 5 8 12 \
        --alphas 0 0.3 0.6 1.0 1.4 [--json out.json]

The length penalty only ranks a sentence's finished hypotheses (search keeps its beams by raw
log-probability and stops a sentence when beam_size hypotheses have finished: nmt/search.py), so
each beam size is searched once, keeping all its finished hypotheses, and every alpha re-ranks
them. BLEU and chrF (sacrebleu, as `nmt evaluate` scores them) on the validation set of the
experiment (data/valid.src, data/valid.tgt) and, for reference only, on its test sets: choose on
validation, never on test. Several --model give an ensemble, as `nmt translate` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import sacrebleu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmt.io import read_lines  # noqa: E402
from nmt.search import normalise  # noqa: E402
from nmt.translate import Translator, checkpoint_of  # noqa: E402


def experiment_of(model: str) -> Path:
    """The experiment directory of a --model (an experiment, or a checkpoint in its model/)."""
    path = Path(model)
    return path if path.is_dir() else checkpoint_of(path).parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--beams", type=int, nargs="+", default=[5])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.6])
    parser.add_argument("--sets", nargs="+", default=["valid", "test", "test2017"],
                        help="data/<name>.src|.tgt of the first model's experiment")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()

    translator = Translator.load(args.model if len(args.model) > 1 else args.model[0])
    data = experiment_of(args.model[0]) / "data"
    sets = {name: ([line or "" for line in read_lines(data / f"{name}.src")],
                   [line or "" for line in read_lines(data / f"{name}.tgt")]) for name in args.sets}
    rows = []
    bleu_metric, chrf_metric = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    for beam in args.beams:
        decode = translator.settings(beam)
        for name, (sources, references) in sets.items():
            hyps = translator.search(sources, decode, nbest=beam, origin=(str(data / f"{name}.src"), 1))
            for alpha in args.alphas:
                best = [max(sentence, key=lambda h: normalise(h.log_prob, len(h.tokens) + 1, "gnmt", alpha))
                        for sentence in hyps]
                outputs = [translator.detokenize(h) for h in best]
                bleu = bleu_metric.corpus_score(outputs, [references])
                chrf = chrf_metric.corpus_score(outputs, [references])
                ratio = sum(len(o.split()) for o in outputs) / max(1, sum(len(r.split()) for r in references))
                rows.append({"set": name, "beam": beam, "alpha": alpha, "bleu": round(bleu.score, 2),
                             "chrf": round(chrf.score, 2), "length_ratio": round(ratio, 3)})
                print(f"{name:9} beam {beam:2} alpha {alpha:4.2f}  BLEU {bleu.score:6.2f}  chrF {chrf.score:6.2f}"
                      f"  words/ref {ratio:.3f}", flush=True)
    valid = [r for r in rows if r["set"] == args.sets[0]]
    chosen = max(valid, key=lambda r: r["bleu"])
    print(f"best on {args.sets[0]}: beam {chosen['beam']} alpha {chosen['alpha']}: "
          + ", ".join(f"{r['set']} {r['bleu']:.2f}" for r in rows
                      if r["beam"] == chosen["beam"] and r["alpha"] == chosen["alpha"]))
    if args.json:
        args.json.write_text(json.dumps({"models": args.model, "bleu_signature": str(bleu_metric.get_signature()),
                                         "chrf_signature": str(chrf_metric.get_signature()),
                                         "rows": rows, "chosen": chosen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
