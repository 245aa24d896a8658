"""`nmt sweep RECIPE SWEEP.yaml`: search a recipe's settings with Optuna; every trial is an
ordinary experiment directory (SWEEP_DIR/trials/NNNN/) that nmt translate and nmt evaluate take.

The study lives in Optuna's storage (a journal file in the sweep directory, or --storage URL), so a
sweep that was killed continues where it stopped, and workers started with the same command, on
one machine or on several sharing a storage, share one study:

- on each machine one worker at a time chooses the next trial (a lock file in the sweep
  directory), and a trial counts once Optuna has given it a number, so no trial runs twice and
  the study gets exactly n_trials that count; a trial another machine's worker took in the same
  instant beyond n_trials is marked surplus and not run;
- a trial whose worker died (kill -9, a crash; Ctrl-C and SIGTERM too, after saving) is marked
  failed and queued again with the same values and directory, so its training resumes from its
  last.pt, up to MAX_ATTEMPTS attempts;
- a trial reports each validation BLEU through train()'s on_validation hook, and when the
  pruner says so its training stops there, with last.pt, best.pt and summary.json as usual.

The objective is a trial's best validation BLEU (greedy, as training validates); no test set is
decoded. The same sweep file (its seed) gives the same sequence of trials.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmt.config import Config, config_to_dict, load_recipe, recipe_diff, write_recipe
from nmt.errors import Interrupted, NmtError
from nmt.io import process_alive, read_json, waiting_lock, write_json
from nmt.sweep_config import STAGE_KEYS, PrunerConfig, Sweep, load_sweep
from nmt.sweep_report import counted, decode_lengths, write_report

MAX_ATTEMPTS = 3  # a trial killed this many times (say, by the OOM killer) stays failed
HOST = socket.gethostname()


@dataclass
class Outcome:
    state: str  # complete | pruned | fail
    value: float | None = None  # the objective: the trial's best validation BLEU
    attrs: dict = field(default_factory=dict)  # stored with the trial: steps, minutes, error ...


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise NmtError("nmt sweep needs Optuna: pip install 'nmt[sweep]' (or: pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep says what happens itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # constant_liar, PED-ANOVA
    return optuna


def run_sweep(recipe: str, sweep_path: Path, out: Path | None = None, overrides: list[str] | tuple[str, ...] = (),
              storage: str | None = None, device: str = "auto") -> Path:
    """Run trials until the study has the sweep's n_trials, then write the report; returns
    report.md. Started again (or on another machine with the same --storage) it joins the study."""
    sweep = load_sweep(sweep_path, recipe, overrides)
    import_optuna()  # before anything is written
    out = Path(out) if out is not None else Path("exp") / f"{sweep.base.name}-{sweep.path.stem}"
    claim_directory(sweep, out, storage)
    study = open_study(sweep, out, storage)
    ran = run_worker(study, sweep, TrialRunner(sweep, out, device), out / "ask.lock")
    print(f"sweep {sweep.study_name}: this worker ran {ran} trial(s)")
    return write_report(study, sweep, out, device)


def claim_directory(sweep: Sweep, out: Path, storage: str | None) -> None:
    """sweep.json names the study a sweep directory belongs to: trial directories are numbered by
    trial, so two studies must never share one."""
    where = _masked(storage) if storage else "journal file study.log in the sweep directory"
    record = {"study": sweep.study_name, "storage": where, "recipe": sweep.recipe, "sweep": str(sweep.path),
              "overrides": sweep.overrides}
    path = out / "sweep.json"
    if path.is_file():
        old = read_json(path, "sweep record")
        if (old.get("study"), old.get("storage")) != (record["study"], record["storage"]):
            raise NmtError(f"{out}: holds the study '{old.get('study')}' in {old.get('storage')}, not "
                           f"'{record['study']}' in {where} (another sweep file, recipe, --set or --storage); "
                           "use another --out or remove the directory")
        return
    write_json(path, record)


def _masked(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)  # no password in sweep.json


def open_study(sweep: Sweep, out: Path, storage: str | None = None):
    optuna = import_optuna()
    if storage is None:
        # A journal file rather than SQLite: SQLite lets one writer in at a time and answers the
        # others "database is locked", which Optuna's docs warn about for parallel workers; the
        # journal is an append-only log behind a lock file, made for several processes on one
        # machine, and each append is one small write, so a kill leaves no half-written state.
        storage = optuna.storages.JournalStorage(_journal_backend(optuna, out / "study.log"))
        where = str(out / "study.log")
    else:
        where = _masked(storage)
    try:
        return optuna.create_study(study_name=sweep.study_name, storage=storage, direction="maximize",
                                   load_if_exists=True, sampler=make_sampler(sweep, 0),
                                   pruner=make_pruner(sweep.file.pruner))
    except Exception as err:  # a bad URL, a missing database driver, no connection: Optuna's and SQLAlchemy's many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NmtError(f"Optuna storage {where}: {first[:300]}") from None


def _journal_backend(optuna, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # Optuna before 4.0
        return optuna.storages.JournalFileStorage(str(path))
    return JournalFileBackend(str(path))


def make_sampler(sweep: Sweep, offset: int):
    """grid: Optuna's GridSampler, which gives trial n the n-th combination (shuffled by the
    seed), so that concurrent workers never take the same one. tpe: a new TPE sampler for every
    trial, seeded by the sweep's seed and the number of trials so far, so that a sweep resumed
    after a kill samples what an uninterrupted one would have."""
    import optuna

    seed = sweep.file.seed
    if sweep.file.method == "grid":
        return optuna.samplers.GridSampler({p.key: p.choices for p in sweep.params}, seed=seed)
    # constant_liar: trials still running count as bad ones, so that parallel workers spread out
    return optuna.samplers.TPESampler(seed=(seed + offset) % 2**32, n_startup_trials=sweep.file.startup_trials,
                                      constant_liar=True)


def make_pruner(pruner: PrunerConfig):
    import optuna

    if pruner.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_steps)
    if pruner.kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=pruner.min_bleu, n_warmup_steps=pruner.warmup_steps)
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------------------------
# The worker: choose a trial, run it, tell the study


def run_worker(study, sweep: Sweep, run_trial: Callable[[Any, dict], Outcome], lock: Path) -> int:
    """Run trials with `run_trial(trial, params)` until the study has sweep.n_trials that count;
    returns how many this worker ran."""
    ran = 0
    while True:
        with waiting_lock(lock):  # one worker of this machine chooses at a time
            recover_dead(study)
            trial = next_trial(study, sweep)
            if trial is None:
                return ran
            params = {p.key: suggest(trial, p) for p in sweep.params}
            trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid()})
            if "dir" not in trial.user_attrs:  # a retry keeps its directory, to resume there
                trial.set_user_attr("dir", f"{trial.number:04d}")
        print(f"trial {trial.number} (trials/{trial.user_attrs['dir']}): "
              + ", ".join(f"{k}={v}" for k, v in params.items()))
        try:
            outcome = run_trial(trial, params)
        except (Interrupted, KeyboardInterrupt):  # saved by train(): the next run resumes it
            retry(study, next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number))
            raise Interrupted(f"interrupted in trial {trial.number} (trials/{trial.user_attrs['dir']}), "
                              "which is queued again") from None
        except NmtError as err:  # this trial's own problem (an invalid combination, NaN ...)
            outcome = Outcome("fail", attrs={"error": str(err)})
        finish(study, trial, outcome)
        ran += 1


def next_trial(study, sweep: Sweep):
    """A queued retry, or a new trial while the study has fewer than n_trials; None when full."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if sweep.file.baseline and not trials:  # a new study: the recipe's own values go first
        study.enqueue_trial(sweep.baseline_values, user_attrs={"baseline": True})
        trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if not waiting and len(counted(trials)) >= sweep.n_trials:
        return None
    study.sampler = make_sampler(sweep, len(trials))
    trial = study.ask()
    if "retry_of" not in trial.user_attrs:
        # Workers of other machines may ask in the same instant: the trial numbers (given out by
        # the storage, one at a time) decide which trials are inside n_trials.
        before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(before) >= sweep.n_trials:
            trial.set_user_attr("surplus", True)
            tell(study, trial, state=TrialState.FAIL)
            return None
    return trial


def suggest(trial, param) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.key, param.choices)
    if param.integer:
        return trial.suggest_int(param.key, int(param.low), int(param.high), log=param.log)
    return trial.suggest_float(param.key, param.low, param.high, log=param.log)


def recover_dead(study) -> None:
    """Trials left running by a process of this machine that is gone: failed, and queued again."""
    from optuna.trial import TrialState

    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = frozen.user_attrs.get("worker") or {}
        pid = worker.get("pid")
        if worker.get("host") == HOST and isinstance(pid, int) and pid > 0 and not process_alive(pid):
            print(f"trial {frozen.number}: its worker (pid {pid}) is gone; queued again")
            retry(study, frozen)


def retry(study, frozen) -> None:
    import optuna
    from optuna.trial import TrialState

    tell(study, frozen.number, state=TrialState.FAIL)
    attempt = frozen.user_attrs.get("attempt", 1)
    if attempt >= MAX_ATTEMPTS:
        print(f"trial {frozen.number}: stopped {attempt} times; left failed")
        return
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        system_attrs=frozen.system_attrs,  # GridSampler's grid_id: the same combination
        user_attrs={"dir": frozen.user_attrs.get("dir", f"{frozen.number:04d}"), "retry_of": frozen.number,
                    "attempt": attempt + 1, **({"baseline": True} if frozen.user_attrs.get("baseline") else {})}))


def finish(study, trial, outcome: Outcome) -> None:
    from optuna.trial import TrialState

    for key, value in outcome.attrs.items():
        trial.set_user_attr(key, value)
    if outcome.state == "complete":
        tell(study, trial, values=outcome.value)
    else:
        tell(study, trial, state=TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL)
    state = outcome.state + (f" at step {outcome.attrs['pruned_at']}" if "pruned_at" in outcome.attrs else "")
    shown = f"best valid BLEU {outcome.value:.2f}" if outcome.value is not None else outcome.attrs.get("error", "")
    print(f"trial {trial.number}: {state}; {shown}")


def tell(study, trial, **kwargs) -> None:
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as err:
        # GridSampler calls study.stop() after the last combination, which Optuna allows only
        # inside study.optimize(); the state is stored before that, so nothing is lost.
        if "Study.stop" not in str(err):
            raise


# ----------------------------------------------------------------------------------------------
# One trial: an experiment directory, trained with the budget


class Pruning:
    """train()'s on_validation for a trial: report the BLEU to Optuna, stop when its pruner says so."""

    def __init__(self, trial):
        self.trial, self.pruned_at = trial, None

    def __call__(self, step: int, bleu: float) -> bool:
        self.trial.report(bleu, step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


@dataclass
class TrialRunner:
    sweep: Sweep
    out: Path
    device: str = "auto"  # where the report's decodes run (training: the recipe's train.device)

    def __call__(self, trial, params: dict) -> Outcome:
        from nmt.device import machine_label  # torch: only once a trial runs
        from nmt.train import train

        directory = self.out / "trials" / trial.user_attrs["dir"]
        config = self.sweep.trial_config(params)  # an invalid combination fails here, untrained
        prepare_stages(self.sweep, params, self.out, directory)
        base = config_to_dict(load_recipe(self.sweep.recipe))
        write_recipe(directory / "recipe.yaml", self.sweep.extends, recipe_diff(base, config_to_dict(config)),
                     f"trial {trial.number} of sweep {self.sweep.study_name}, with its budget; to evaluate it:\n"
                     f"  nmt evaluate {directory / 'recipe.yaml'} --exp {directory}")
        pruning = Pruning(trial)
        summary = train(config, directory, on_validation=pruning)
        attrs = {"best_valid_bleu": summary["best_valid_bleu"], "best_step": summary["best_step"],
                 "steps": summary["steps"], "minutes": summary["wall_seconds"] / 60,
                 "machine": machine_label(summary["machine"], summary["precision"]["name"])}
        if pruning.pruned_at is not None:
            attrs["pruned_at"] = pruning.pruned_at
        report = self.sweep.file.report
        if report.by_length or report.joined:
            decode_lengths(config, directory, report.joined, self.device)
        state = "complete" if pruning.pruned_at is None else "pruned"
        write_json(directory / "trial.json", {"number": trial.number, "study": self.sweep.study_name, "state": state,
                                              "params": params, **attrs})
        return Outcome(state, summary["best_valid_bleu"], attrs)


def prepare_stages(sweep: Sweep, params: dict, out: Path, directory: Path) -> None:
    """The trial's data/ and spm/: hard links to the prepared copy for its data and subword
    values, which the first worker to need it prepares (the data and spm stages) while others
    wait. Trials that sweep no such key all share the recipe's one copy."""
    if (directory / "spm" / "manifest.json").is_file():  # linked last: a retry has them all
        return
    config = sweep.stage_config(params)
    prepared = prepared_dir(out, config)
    with waiting_lock(prepared.with_suffix(".lock")):
        if not (prepared / "spm" / "manifest.json").is_file():
            from nmt.corpus import run_data_stage
            from nmt.subword import run_spm_stage

            touched = {k: v for k, v in params.items() if k.startswith(STAGE_KEYS)}
            print(f"preparing the data and spm stages for {touched or 'the recipe'} in {prepared}")
            run_data_stage(config, prepared)
            run_spm_stage(config, prepared)
    shutil.copytree(prepared / "data", directory / "data", copy_function=_link, dirs_exist_ok=True)
    shutil.copytree(prepared / "spm", directory / "spm", copy_function=_link, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("manifest.json"))
    _link(prepared / "spm" / "manifest.json", directory / "spm" / "manifest.json")


def prepared_dir(out: Path, config: Config) -> Path:
    """The prepared copy of the data and spm stages for a recipe: named by what they depend on."""
    stages = config_to_dict(config)
    depends = {"data": stages["data"], "subword": stages["subword"], "init_from": stages["train"]["init_from"]}
    return out / "prepared" / hashlib.sha256(json.dumps(depends, sort_keys=True).encode()).hexdigest()[:10]


def _link(src, dst) -> None:
    """A hard link, else a copy. Sharing the files is safe because nmt never writes a file in
    place: a rewrite goes to a temporary file renamed over the target (nmt.io.atomic_output),
    which replaces the trial's link and leaves the prepared copy as it was."""
    dst = Path(dst)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)
