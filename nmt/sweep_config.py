"""Sweep files: which recipe keys `nmt sweep` searches, how, and what each trial may spend.

A sweep file (sweeps/*.yaml) is read as strictly as a recipe, with the same machinery
(config.build_settings): an unknown key has a "did you mean", a wrong type or an impossible value
is one ConfigError naming the file and the key. Every swept key is checked against the recipe by
building the recipe with each value (each choice, both ends of a range): a key the recipe does not
have, or a value it refuses, fails before any trial runs. Nothing here imports Optuna.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmt.config import (
    NON_NEGATIVE,
    RECIPES_DIR,
    Config,
    build_settings,
    config_to_dict,
    load_recipe,
    read_yaml,
    resolve_recipe_path,
    setting,
)
from nmt.errors import ConfigError

# Keys under these prefixes change what the data and spm stages write: trials that set them get
# their own prepared copy of those stages (one per distinct set of values).
STAGE_KEYS = ("data.", "subword.", "train.init_from")
BUDGET_KEYS = ("train.max_minutes", "train.max_steps")


@dataclass
class Range:
    """A uniform range of a numeric recipe key (int or float, as the recipe declares the key)."""

    low: float
    high: float
    log: bool = False  # uniform in log space (a learning rate): needs low > 0


@dataclass
class Budget:
    """What each trial may spend: exactly one of the two, set on every trial's recipe."""

    max_minutes: float = setting(0.0, NON_NEGATIVE)  # train.max_minutes (validation included)
    max_steps: int = setting(0, NON_NEGATIVE)  # train.max_steps


@dataclass
class PrunerConfig:
    kind: str = setting("median", choices=("median", "threshold", "none"))
    # median: prune a trial whose BLEU is below the median of earlier trials' at the same step,
    # once this many trials have finished
    startup_trials: int = setting(2, NON_NEGATIVE)
    warmup_steps: int = setting(0, NON_NEGATIVE)  # updates of a trial before it may be pruned
    min_bleu: float = setting(0.0, ("must be between 0 and 100", lambda v: 0 <= v <= 100))  # threshold


@dataclass
class ReportConfig:
    by_length: bool = False  # decode each trial's validation set (greedy): BLEU by source length
    # also k = 2..joined consecutive validation captions joined (nmt.joined); 0 = none
    joined: int = setting(0, ("must be between 0 and 8", lambda v: 0 <= v <= 8))


@dataclass
class SweepFile:
    # recipe key -> a list of values (categorical) or a Range; read by load_sweep, not by
    # build_settings, and listed here so that a misspelt `space` gets its hint
    space: dict[str, Any] = field(default_factory=dict)
    method: str = setting("tpe", choices=("grid", "tpe"))  # tpe: Optuna's TPE sampler (Bayesian)
    n_trials: int = setting(0, NON_NEGATIVE)  # grid: 0 = every combination; tpe: required
    seed: int = setting(0, ("must be between 0 and 4294967295", lambda v: 0 <= v < 2**32))
    startup_trials: int = setting(10, NON_NEGATIVE)  # tpe: random trials before TPE models the results
    # tpe: the first trial trains the recipe's own values of the swept keys, under the same budget,
    # so that the report says whether the search beat the recipe (a grid holds them already)
    baseline: bool = False
    budget: Budget = field(default_factory=Budget)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass
class Param:
    """One swept recipe key; `key` is also the parameter's name in Optuna."""

    key: str
    choices: list | None = None  # categorical; otherwise a range:
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False  # the recipe declares the key an int: suggest integers

    @property
    def touches_stages(self) -> bool:
        return self.key.startswith(STAGE_KEYS)


@dataclass
class Sweep:
    path: Path
    recipe: str  # as given: a name under recipes/ or a path
    overrides: list[str]  # --set, applied to every trial before the swept values
    file: SweepFile
    params: list[Param]
    base: Config  # the recipe with the overrides and the budget

    @property
    def n_trials(self) -> int:
        if self.file.n_trials or self.file.method != "grid":
            return self.file.n_trials
        return math.prod(len(p.choices) for p in self.params)

    def budget_values(self) -> dict[str, Any]:
        return budget_values(self.file.budget)

    @property
    def baseline_values(self) -> dict[str, Any]:
        """The recipe's own values of the swept keys (with the sweep's --set overrides)."""
        return {p.key: lookup(self.base, p.key) for p in self.params}

    def budget_text(self) -> str:
        """The budget as the sweep file sets it, e.g. `train.max_minutes: 20`."""
        return ", ".join(f"{k}: {v:g}" for k, v in self.budget_values().items() if k in BUDGET_KEYS and v)

    def trial_config(self, values: dict[str, Any]) -> Config:
        """The recipe of a trial: the overrides, the swept `values`, then the budget."""
        return load_recipe(self.recipe, self.overrides, {**values, **self.budget_values()})

    def stage_config(self, values: dict[str, Any]) -> Config:
        """The recipe its data and spm stages run with: only the values that touch them."""
        return load_recipe(self.recipe, self.overrides,
                           {k: v for k, v in values.items() if k.startswith(STAGE_KEYS)})

    @property
    def extends(self) -> str:
        """What a recipe written by the sweep (best.yaml) extends: the recipe's name if it lives
        under recipes/, else its absolute path."""
        path = resolve_recipe_path(self.recipe).resolve()
        return path.stem if path.parent == RECIPES_DIR.resolve() else str(path)

    @property
    def study_name(self) -> str:
        """Derived from everything that defines the search, so that workers started with the same
        command join one study, and a changed sweep (or recipe, or --set) starts a new one. The
        number of trials is left out: raising it continues the study."""
        defining = {"recipe": config_to_dict(self.base), "params": [dataclasses.asdict(p) for p in self.params],
                    "method": self.file.method, "seed": self.file.seed,
                    "startup_trials": self.file.startup_trials}
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.path.stem}-{self.base.name}-{digest}"


def budget_values(budget: Budget) -> dict[str, Any]:
    """The trial's limits: its budget, and the recipe's other limits lifted (its max_steps and
    max_epochs are the recipe's budget, not the sweep's)."""
    if budget.max_minutes:
        return {"train.max_minutes": budget.max_minutes, "train.max_steps": 0, "train.max_epochs": 1_000_000}
    return {"train.max_steps": budget.max_steps, "train.max_minutes": 0.0, "train.max_epochs": 1_000_000}


def load_sweep(path: Path, recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and check a sweep file against the recipe (with `overrides`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    source = str(path)
    raw = read_yaml(path, "a sweep file")
    raw_space = raw.pop("space", None)
    file = build_settings(SweepFile, raw, source)
    budget = file.budget
    if (budget.max_minutes > 0) == (budget.max_steps > 0):
        raise ConfigError(f"{source}: budget: set exactly one of max_minutes and max_steps (what each trial may spend)")
    base = load_recipe(recipe, overrides, budget_values(budget))  # the recipe's own errors name it
    if not isinstance(raw_space, dict) or not raw_space:
        got = "nothing" if raw_space is None else f"{type(raw_space).__name__} {raw_space!r:.40}"
        raise ConfigError(f"{source}: space: expected a mapping of recipe keys to a list of values or a "
                          f"range {{low, high, log}}, got {got}")
    checker = _Checker(source, recipe, list(overrides), budget_values(budget))
    params = [checker.param(str(key), value, base) for key, value in raw_space.items()]
    sweep = Sweep(path, recipe, list(overrides), file, params, base)
    if file.method == "grid":
        ranges = [p.key for p in params if p.choices is None]
        if ranges:
            raise ConfigError(f"{source}: space.{ranges[0]}: grid searches lists of values only; give the values "
                              "as a list, or use method: tpe")
        combinations = math.prod(len(p.choices) for p in params)
        if file.n_trials > combinations:
            raise ConfigError(f"{source}: n_trials: the grid has {combinations} combinations, fewer than {file.n_trials}")
        for values in itertools.product(*(p.choices for p in params)):  # every trial's recipe is valid
            checker.combination(dict(zip((p.key for p in params), values)))
    elif file.n_trials == 0:
        raise ConfigError(f"{source}: n_trials: tpe needs the number of trials to run")
    if file.baseline:
        if file.method == "grid":
            raise ConfigError(f"{source}: baseline: is for tpe; a grid trains the recipe's values when its lists hold them")
        for param, value in zip(params, sweep.baseline_values.values()):
            inside = (value in param.choices) if param.choices is not None else param.low <= value <= param.high
            if not inside:
                domain = param.choices if param.choices is not None else f"[{param.low:g}, {param.high:g}]"
                raise ConfigError(f"{source}: baseline: the recipe's {param.key} ({value!r}) is outside the space "
                                  f"{domain}; widen space.{param.key} or set baseline: false")
    return sweep


def lookup(config: Config, key: str) -> Any:
    """The value of a dotted key path in a loaded recipe."""
    node: Any = config
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part] if isinstance(node, dict) else getattr(node, part)
    return node


@dataclass
class _Checker:
    source: str
    recipe: str
    overrides: list[str]
    budget: dict[str, Any]

    def value(self, key: str, value: Any) -> None:
        self.combination({key: value}, key)

    def combination(self, values: dict[str, Any], key: str | None = None) -> None:
        try:
            load_recipe(self.recipe, self.overrides, {**values, **self.budget})
        except ConfigError as err:
            what = f"space.{key}: {values[key]!r}" if key else f"space: the combination {values}"
            raise ConfigError(f"{self.source}: {what} does not make a valid recipe: {err}") from None

    def param(self, key: str, spec: Any, base: Config) -> Param:
        where = f"{self.source}: space.{key}"
        if key in BUDGET_KEYS:
            raise ConfigError(f"{where}: is the trial budget; set it under budget:")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where}: an empty list of values")
            for value in spec:
                if isinstance(value, (list, dict)) or value is None:
                    raise ConfigError(f"{where}: values must be single strings, numbers or booleans, got {value!r:.40}")
            if len(set(map(repr, spec))) < len(spec):
                raise ConfigError(f"{where}: a value is listed twice: {spec}")
            for value in spec:
                self.value(key, value)
            return Param(key, choices=list(spec))
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a list of values or a range {{low, high, log}}, got "
                              f"{type(spec).__name__} {spec!r:.40}")
        for end in ("low", "high"):  # YAML 1.1 reads 1e-4 (no dot) as a string
            if isinstance(spec.get(end), str) and _is_number(spec[end]):
                raise ConfigError(f"{where}.{end}: '{spec[end]}' is a string to YAML; write it with a dot, "
                                  f"e.g. {float(spec[end]):.1e}")
        bounds = build_settings(Range, spec, self.source, f"space.{key}")
        if not bounds.low < bounds.high:
            raise ConfigError(f"{where}: low ({bounds.low:g}) must be below high ({bounds.high:g})")
        if bounds.log and bounds.low <= 0:
            raise ConfigError(f"{where}: a log range needs low above 0, got {bounds.low:g}")
        try:
            current = lookup(base, key)
        except (AttributeError, KeyError, IndexError, ValueError):
            self.value(key, bounds.low)  # the recipe's own error, with its "did you mean"
            raise ConfigError(f"{where}: not a key of the recipe") from None
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ConfigError(f"{where}: a range needs a numeric key, and {key} is a {type(current).__name__}; "
                              "give its values as a list")
        integer = isinstance(current, int)
        if integer and not (bounds.low.is_integer() and bounds.high.is_integer()):
            raise ConfigError(f"{where}: {key} is an integer; low and high must be whole numbers")
        low, high = (int(bounds.low), int(bounds.high)) if integer else (bounds.low, bounds.high)
        self.value(key, low)
        self.value(key, high)
        return Param(key, low=low, high=high, log=bounds.log, integer=integer)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
