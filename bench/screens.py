"""The table of the quality screens (bench/screen.sh) or of any trained experiments: per run the
best validation BLEU, test_2016 and test_2017 BLEU/chrF of best.pt and of the average of the 5
newest checkpoints (where eval-avg5/ exists), updates, epochs, tokens per epoch and training time.

    .venv/bin/python bench/screens.py [bench/out/screen/*] [--json out.json]

Training time is only comparable between runs that ran alone; screens share the cores, so their
times say little, and the fixed number of updates is what makes their BLEU comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def row(exp: Path) -> dict | None:
    summary = read(exp / "model" / "summary.json")
    if summary is None:
        return None
    record = {
        "run": exp.name, "steps": summary["steps"], "epochs": summary["epochs"],
        "best_valid_bleu": summary["best_valid_bleu"], "best_step": summary["best_step"],
        "train_minutes": round(summary["train_seconds"] / 60, 1),
        "tokens_per_epoch": round(summary["target_tokens"] / max(summary["epochs"], 1)),
        "threads": summary["config"]["train"]["threads"],
    }
    for label, folder in (("best", "eval"), ("avg5", "eval-avg5")):
        scores = read(exp / folder / "scores.json")
        if scores is not None:
            for name, s in scores["scores"].items():
                record[f"{label}.{name}.bleu"], record[f"{label}.{name}.chrf"] = s["bleu"], s["chrf"]
            record["bleu_signature"] = next(iter(scores["scores"].values()))["bleu_signature"]
    return record


def markdown(rows: list[dict]) -> str:
    tests = sorted({k.split(".")[1] for r in rows for k in r if k.startswith("best.")})
    head = ["run", "updates", "epochs", "tok/epoch", "best valid BLEU"]
    for label in ("best", "avg5"):
        head += [f"{label} {t} BLEU / chrF" for t in tests]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], str(r["steps"]), str(r["epochs"]), f"{r['tokens_per_epoch']:,}", f"{r['best_valid_bleu']:.2f}"]
        for label in ("best", "avg5"):
            for t in tests:
                b, c = r.get(f"{label}.{t}.bleu"), r.get(f"{label}.{t}.chrf")
                cells.append("–" if b is None else f"{b:.2f} / {c:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(rows: list[dict]) -> str:
    """Mean ± standard deviation over the runs of every score column (for seed groups)."""
    keys = [k for k in rows[0] if k.split(".")[0] in ("best", "avg5") and k.endswith(("bleu", "chrf"))]
    out = []
    for k in keys:
        values = [r[k] for r in rows if k in r]
        if len(values) > 1:
            out.append(f"{k}: {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exps", nargs="*", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--spread", action="store_true", help="mean ± sd over the runs (seeds)")
    args = parser.parse_args()
    exps = args.exps or sorted(p for p in Path("bench/out/screen").iterdir() if p.is_dir())
    rows = [r for r in map(row, exps) if r is not None]
    if not rows:
        sys.exit("no trained experiment among " + " ".join(map(str, exps)))
    print(markdown(rows))
    if args.spread:
        print(spread(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
