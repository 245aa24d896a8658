"""The table of the quality screens (bench/screen.sh) or of any trained experiments: per run the
best validation BLEU, test_2016 and test_2017 BLEU/chrF of best.pt and of the average of the 5
newest checkpoints (where eval-avg5/ exists), updates, epochs, tokens per epoch and training time;
an ensemble's directory (make ensemble: exp/NAME-ensemble) gives its test scores.

    .venv/bin/python bench/screens.py [bench/out/screen/*] [--json out.json]
    .venv/bin/python bench/screens.py exp/de-en exp/de-en-seed2 exp/de-en-seed3 exp/de-en-ensemble --spread

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
        return ensemble_row(exp)
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


def ensemble_row(exp: Path) -> dict | None:
    """An ensemble's evaluation (`make ensemble`: no model of its own, eval/scores.json naming
    several checkpoints): its test scores, with the members' runs for the other columns."""
    scores = read(exp / "eval" / "scores.json")
    if scores is None or not isinstance(scores.get("checkpoint"), list):
        return None
    members = [Path(p).parent.parent.name for p in scores["checkpoint"]]
    record = {"run": f"{exp.name} ({' + '.join(members)})", "steps": None, "epochs": None, "best_valid_bleu": None,
              "tokens_per_epoch": None, "ensemble": members}
    for name, s in scores["scores"].items():
        record[f"best.{name}.bleu"], record[f"best.{name}.chrf"] = s["bleu"], s["chrf"]
    record["bleu_signature"] = next(iter(scores["scores"].values()))["bleu_signature"]
    return record


def markdown(rows: list[dict]) -> str:
    tests = sorted({k.split(".")[1] for r in rows for k in r if k.startswith("best.")})
    head = ["run", "updates", "epochs", "tok/epoch", "best valid BLEU"]
    for label in ("best", "avg5"):
        head += [f"{label} {t} BLEU / chrF" for t in tests]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "ensemble" in r:
            cells = [r["run"], "–", "–", "–", "–"]
        else:
            cells = [r["run"], str(r["steps"]), str(r["epochs"]), f"{r['tokens_per_epoch']:,}", f"{r['best_valid_bleu']:.2f}"]
        for label in ("best", "avg5"):
            for t in tests:
                b, c = r.get(f"{label}.{t}.bleu"), r.get(f"{label}.{t}.chrf")
                cells.append("–" if b is None else f"{b:.2f} / {c:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(rows: list[dict]) -> str:
    """Mean ± standard deviation over the single models' runs of every score column (for seed
    groups; an ensemble's row is not one of them)."""
    singles = [r for r in rows if "ensemble" not in r]
    keys = [k for k in singles[0] if k.split(".")[0] in ("best", "avg5") and k.endswith(("bleu", "chrf"))] if singles else []
    out = []
    for k in keys:
        values = [r[k] for r in singles if k in r]
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
