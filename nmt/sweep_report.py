"""The report of a sweep, from the study in Optuna's storage and the trial directories on this
machine: SWEEP_DIR/report.md (the trials ranked by validation BLEU), results.json (the same
numbers), best.yaml (a recipe that extends the base recipe with the best trial's values) and the
pictures. Every number comes from the validation set; the sweep decodes no test set.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from nmt import plot
from nmt.config import Config, config_to_dict, load_recipe, recipe_diff, write_recipe
from nmt.evaluate import LENGTH_EDGES, bleu_by_length, bucket_labels, score
from nmt.io import atomic_write_text, read_lines, write_json
from nmt.joined import JOINED_NOTE, joined_by_length
from nmt.sweep_config import Sweep

IMPORTANCE_MIN_TRIALS = 4  # complete trials below which an importance estimate is noise
LENGTHS = "lengths.json"  # in a trial directory: its validation set's BLEU by length


@dataclass
class Row:
    """One trial as the report lists it."""

    number: int  # Optuna's trial number (of the attempt that counts)
    dir: str  # trials/<dir>
    state: str  # complete | pruned | fail | running | waiting
    params: dict
    bleu: float | None  # best validation BLEU
    steps: int | None
    minutes: float | None  # in the training loop, validation included
    note: str = ""
    baseline: bool = False  # the recipe's own values (sweep file `baseline: true`)
    machine: str | None = None  # what it trained on (nmt.device.machine_label)


def counted(trials: list) -> list:
    """The trials that count toward n_trials (Optuna FrozenTrials): all but the failed ones that
    were queued again (their retry counts) and the surplus ones (nmt.sweep)."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if not (t.state.name == "FAIL" and t.number in retried)
            and not t.user_attrs.get("surplus")]


def row_of(trial) -> Row:
    attrs = trial.user_attrs
    state = trial.state.name.lower()
    note = f"pruned at step {attrs['pruned_at']}" if "pruned_at" in attrs else attrs.get("error", "")
    if state == "fail" and not note:
        note = "its worker stopped every time it ran"
    baseline = bool(attrs.get("baseline"))
    if baseline:
        note = "; ".join(filter(None, ["the recipe's own values", note]))
    return Row(trial.number, attrs.get("dir", f"{trial.number:04d}"), state, dict(trial.params),
               attrs.get("best_valid_bleu", trial.value), attrs.get("steps"), attrs.get("minutes"), note, baseline,
               attrs.get("machine"))


def ranked(rows: list[Row]) -> list[Row]:
    """Finished trials best first, then those still running or queued, then the failed."""
    order = {"complete": 0, "pruned": 0, "running": 1, "waiting": 1}
    return sorted(rows, key=lambda r: (order.get(r.state, 2), -(r.bleu if r.bleu is not None else -1), r.number))


def decode_lengths(config: Config, directory: Path, joined: int, device: str = "auto") -> dict:
    """The trial's validation set decoded greedily (as validation decodes it): BLEU by source
    length, and with `joined` also of k = 2..joined consecutive captions joined (nmt.joined);
    written to the trial's lengths.json."""
    from nmt.translate import Translator

    greedy = dataclasses.replace(config.decode, beam_size=1)
    translator = Translator.from_path(directory, device=device, decode=greedy)
    src_path = directory / "data" / "valid.src"
    src, refs = read_lines(src_path), read_lines(src_path.with_suffix(".tgt"))
    hyps = translator.translate(src, origin=(str(src_path), 1))
    record = {"bleu": score(hyps, [refs])["bleu"], "buckets": bucket_labels(LENGTH_EDGES),
              "by_length": bleu_by_length(src, hyps, refs)}
    if joined:
        record["joined"] = joined_by_length(src, refs, hyps, lambda lines: translator.translate(lines, origin=("joined", 1)),
                                            joined)
    write_json(directory / LENGTHS, record)
    return record


def write_report(study, sweep: Sweep, out: Path, device: str = "auto") -> Path:
    """report.md (written last), results.json, best.yaml and the pictures."""
    rows = ranked([row_of(t) for t in counted(study.get_trials(deepcopy=False))])
    keys = [p.key for p in sweep.params]
    pictures = plot.available()
    file = sweep.file
    budget = sweep.budget_text()
    states = {s: sum(r.state == s for r in rows) for s in ("complete", "pruned", "fail", "running", "waiting")}
    lines = [f"# Sweep `{sweep.path.stem}` of recipe `{sweep.recipe}`", "",
             f"Study `{sweep.study_name}`; method {file.method} (seed {file.seed}), pruner {file.pruner.kind}; "
             f"every trial trained with {budget}"
             + (f" and --set {' '.join(sweep.overrides)}" if sweep.overrides else "") + ".",
             f"{len(rows)} of {sweep.n_trials} trials: " + ", ".join(f"{n} {s}" for s, n in states.items() if n) + ".",
             "The objective is each trial's best validation BLEU (greedy decoding, as training validates); "
             "no test set is decoded.", *_machines(sweep, rows), "",
             "## Trials, best first", "",
             "| rank | trial | state | valid BLEU | steps | minutes | " + " | ".join(f"`{k}`" for k in keys) + " | note |",
             "|---:|---|---|---:|---:|---:|" + "---|" * len(keys) + "---|"]
    for rank, r in enumerate(rows, start=1):
        cells = [_num(r.bleu, ".2f"), _num(r.steps, "d"), _num(r.minutes, ".1f")]
        lines.append(f"| {rank} | [{r.dir}](trials/{r.dir}) | {r.state} | " + " | ".join(cells) + " | "
                     + " | ".join(_value(r.params.get(k, "–")) for k in keys) + f" | {r.note} |")
    lines += [""] + _best(sweep, out, rows) + _pictures(study, sweep, out, rows, pictures)
    lines += _curves(out, rows, keys, pictures) + _lengths(out, rows, keys, pictures)
    write_json(out / "results.json", {"study": sweep.study_name, "n_trials": sweep.n_trials,
                                      "trials": [dataclasses.asdict(r) for r in rows]})
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _value(value) -> str:
    """A swept value as the tables show it: floats to 4 significant digits (results.json and
    best.yaml keep them whole)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _best(sweep: Sweep, out: Path, rows: list[Row]) -> list[str]:
    """best.yaml: the base recipe with the best complete trial's values (and the sweep's --set),
    without the trial budget, so that it trains with the recipe's own limits."""
    best = next((r for r in rows if r.state == "complete"), None)
    if best is None:
        return ["No trial has completed yet, so there is no best.yaml.", ""]
    base = config_to_dict(load_recipe(sweep.recipe))
    settings = recipe_diff(base, config_to_dict(load_recipe(sweep.recipe, sweep.overrides, best.params)))
    path = out / "best.yaml"
    budget = sweep.budget_text()
    write_recipe(path, sweep.extends, settings,
                 f"The best trial of sweep {sweep.study_name}: trials/{best.dir}, best validation BLEU "
                 f"{best.bleu:.2f}\nafter {best.steps} updates with {budget}. This recipe has the base "
                 "recipe's training limits.\nTrain it with `nmt train <this file> --exp DIR`, or copy it "
                 "to recipes/NAME.yaml and run `make recipe=NAME train`.")
    values = ", ".join(f"`{k}: {_value(v)}`" for k, v in best.params.items())
    return ["## Best", "", f"Trial {best.dir} ({values}): best validation BLEU {best.bleu:.2f}. "
            f"[`best.yaml`](best.yaml) extends `{sweep.extends}` with these values and trains with the "
            f"recipe's own limits: `nmt train {path} --exp DIR`, or copy it to `recipes/NAME.yaml` and run "
            "`make recipe=NAME train`.", "", *_against_baseline(best, rows, budget)]


def _against_baseline(best: Row, rows: list[Row], budget: str) -> list[str]:
    """How the best trial compares with the recipe's own values, trained with the same budget."""
    base = next((r for r in rows if r.baseline), None)
    if base is None:
        return []
    if base.state != "complete" or base.bleu is None:
        return [f"The recipe's own values (trial {base.dir}) did not complete ({base.state}), so there is "
                "nothing to compare the best trial with.", ""]
    if best is base:
        return [f"No trial beat the recipe's own values (trial {base.dir}, {base.bleu:.2f}) with {budget}.", ""]
    return [f"Against the recipe's own values, trained with the same budget ({budget}): trial {base.dir}, "
            f"{base.bleu:.2f}; the best trial is {best.bleu - base.bleu:+.2f} validation BLEU from it.", ""]


def _machines(sweep: Sweep, rows: list[Row]) -> list[str]:
    """What the trials trained on. With a time budget a faster machine trains more updates in the
    same minutes, so trials are comparable only within one kind of machine: say so when they differ."""
    trained: dict[str, list[str]] = {}
    for r in rows:
        if r.machine:
            trained.setdefault(r.machine, []).append(r.dir)
    if len(trained) == 1:
        return [f"Every trial trained on: {next(iter(trained))}."]
    lines = [f"The trials trained on {len(trained)} kinds of machine: "
             + "; ".join(f"{m} (trials {', '.join(dirs)})" for m, dirs in trained.items()) + "."] if trained else []
    if len(trained) > 1 and sweep.budget_values().get("train.max_minutes"):
        lines.append("**Their budget is time**, so their BLEU is comparable only between trials of one kind of machine.")
    return lines


def _pictures(study, sweep: Sweep, out: Path, rows: list[Row], pictures: bool) -> list[str]:
    if not pictures:
        return [f"No pictures: matplotlib is not installed (`{plot.INSTALL_HINT}`).", ""]
    finished = [r for r in rows if r.state in ("complete", "pruned") and r.bleu is not None]
    if not finished:
        return []
    plot.optimisation_history([(r.number, r.bleu, r.state == "pruned") for r in finished], out / "history.png",
                              title=f"Sweep {sweep.path.stem}: best validation BLEU per trial")
    points = {p.key: [(r.params[p.key], r.bleu) for r in finished if p.key in r.params] for p in sweep.params}
    plot.bleu_against_params(points, {p.key for p in sweep.params if p.log}, out / "params.png")
    lines = ["## Pictures", "", "![optimisation history](history.png)", "",
             "Best validation BLEU of each trial against each swept value:", "", "![BLEU by value](params.png)", ""]
    complete = [r for r in rows if r.state == "complete"]
    if len(sweep.params) < 2:
        return lines + ["No parameter importances: the sweep has one parameter.", ""]
    if len(complete) < IMPORTANCE_MIN_TRIALS:
        return lines + [f"No parameter importances: {len(complete)} complete trials, fewer than "
                        f"{IMPORTANCE_MIN_TRIALS}.", ""]
    if len({r.bleu for r in complete}) == 1:
        return lines + ["No parameter importances: every complete trial has the same BLEU.", ""]
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    try:
        importances = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except Exception as err:  # an estimate for a picture: its failure must not cost the report
        return lines + [f"No parameter importances: Optuna could not estimate them ({err}).", ""]
    plot.param_importances(importances, out / "importances.png",
                           title=f"Parameter importances (PED-ANOVA, {len(complete)} trials)")
    return lines + ["![parameter importances](importances.png)", ""]


def _label(row: Row, keys: list[str]) -> str:
    return f"{row.dir}: " + " ".join(_value(row.params.get(k, "–")) for k in keys)


def _curves(out: Path, rows: list[Row], keys: list[str], pictures: bool) -> list[str]:
    """Validation BLEU against training time, from each local trial's metrics.jsonl."""
    series = {}
    for r in rows:
        path = out / "trials" / r.dir / "model" / "metrics.jsonl"
        if not path.is_file():
            continue  # a trial another machine ran, or one that never started
        records = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a partial line of a killed run
            if isinstance(record, dict) and "valid_bleu" in record and "wall" in record:
                records.append(record)
        if records:
            series[_label(r, keys)] = ([rec["wall"] / 60 for rec in records], [rec["valid_bleu"] for rec in records])
    if not series or not pictures:
        return []
    plot.training_curves(series, out / "curves.png", title="Validation BLEU against training time")
    return ["## Training curves", "", "Validation BLEU (greedy) against time in the training loop, validation "
            "included, of the trials run on this machine:", "", "![training curves](curves.png)", ""]


def _lengths(out: Path, rows: list[Row], keys: list[str], pictures: bool) -> list[str]:
    """BLEU by source length of each trial's validation set (report.by_length), and of joined
    captions (report.joined), from the trials' lengths.json."""
    found = [(r, json.loads((out / "trials" / r.dir / LENGTHS).read_text())) for r in rows
             if r.state in ("complete", "pruned") and (out / "trials" / r.dir / LENGTHS).is_file()]
    if not found:
        return []
    lines = ["## BLEU by source length (validation set, greedy)", ""]
    lines += _length_table(found, "by_length", keys)
    if pictures:
        plot.bleu_by_length(found[0][1]["buckets"], {_label(r, keys): [b["bleu"] for b in rec["by_length"]]
                                                     for r, rec in found}, out / "by_length.png",
                            title="BLEU by source length (validation, greedy)")
        lines += ["![BLEU by source length](by_length.png)", ""]
    joined = [(r, rec["joined"]) for r, rec in found if "joined" in rec]
    if joined:
        max_k = len(joined[0][1]["sets"])
        lines += [f"## Longer inputs: joined validation captions (k = 1..{max_k})", "", JOINED_NOTE, "",
                  "| trial | " + " | ".join(f"k={s['k']} ({s['sentences']} inputs, ≤{s['max_words']} words)"
                                          for s in joined[0][1]["sets"]) + " |",
                  "|---|" + "---:|" * max_k]
        for r, rec in joined:
            lines.append(f"| {_label(r, keys)} | " + " | ".join(_num(s["bleu"], ".2f") for s in rec["sets"]) + " |")
        lines += ["", "BLEU by source length over all joined inputs:", ""]
        lines += _length_table(joined, "by_length", keys)
        if pictures:
            plot.bleu_by_length(joined[0][1]["buckets"], {_label(r, keys): [b["bleu"] for b in rec["by_length"]]
                                                          for r, rec in joined}, out / "by_length_joined.png",
                                title="BLEU by source length, joined validation captions (greedy)")
            lines += ["![BLEU by source length, joined captions](by_length_joined.png)", ""]
    return lines


def _length_table(found: list[tuple[Row, dict]], field: str, keys: list[str]) -> list[str]:
    buckets = found[0][1][field]
    lines = ["| source words | " + " | ".join(b["bucket"] for b in buckets) + " |",
             "|---|" + "---:|" * len(buckets),
             "| sentences | " + " | ".join(str(b["sentences"]) for b in buckets) + " |"]
    for r, rec in found:
        lines.append(f"| {_label(r, keys)} | " + " | ".join(_num(b["bleu"], ".2f") for b in rec[field]) + " |")
    return lines + [""]
