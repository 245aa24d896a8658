"""Recipes: YAML files loaded into typed dataclasses, strictly.

A recipe has the sections `data`, `subword`, `model`, `train` and `decode` (recipes/en-de.yaml
lists every key with its meaning and default). `extends: other` starts from another recipe and
overrides keys; `--set key.path=value` overrides after that. Each setting's allowed values sit next
to its field (`setting`). Every problem is one ConfigError naming the file and the key path, with
a "did you mean" hint for unknown keys and choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmt.errors import ConfigError
from nmt.io import atomic_write_text

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# A setting's allowed range: the message a value outside it fails with, and the test a value inside
# passes. Each test asks "is it inside?", so NaN, which fails every comparison, is outside.
POSITIVE = ("must be positive", lambda v: v > 0)
NON_NEGATIVE = ("must not be negative", lambda v: v >= 0)
FRACTION = ("must be in [0, 1)", lambda v: 0 <= v < 1)  # 1 would drop, or smooth away, everything
PRECISIONS = ("auto", "fp32", "bf16")  # bf16: matrix products in bfloat16 (autocast) where native


def setting(default: Any, bounds: tuple[str, Callable] | None = None, *, choices=()) -> Any:
    """A dataclass field that carries its allowed values (a range or choices) for validate()."""
    return field(default=default, metadata={"bounds": bounds, "choices": choices})


@dataclass
class SplitSource:
    corpus: str  # folder of the corpus in the mirror or data dir: <corpus>/<split>.<lang>[.gz]
    split: str  # split name in that folder, e.g. train, val, test_2016_flickr
    hub: str | None = None  # Hugging Face dataset id (or a local dataset dir) to fetch it from
    hub_config: str | None = None  # the dataset's config name, e.g. iwslt2017-en-de
    hub_split: str | None = None  # the dataset's split name; defaults to `split`
    src_file: str | None = None  # local plain-text files instead of mirror or hub
    tgt_file: str | None = None


# The defaults below are the values of recipes/en-de.yaml, which every other recipe extends and
# which lists every key with its meaning; a test keeps the two equal.


@dataclass
class CleanConfig:
    max_tokens: int = setting(80, POSITIVE)  # drop pairs with a side longer than this many words
    max_ratio: float = setting(3.0, POSITIVE)  # drop pairs whose word-count ratio exceeds this
    dedup: bool = True  # drop exact duplicate pairs
    max_chars: int = setting(2000, POSITIVE)  # drop pairs with a side longer than this (characters)


@dataclass
class DataConfig:
    src_lang: str
    tgt_lang: str
    train: list[SplitSource]
    valid: SplitSource
    test: dict[str, SplitSource]
    clean: CleanConfig = field(default_factory=CleanConfig)  # for the training split only
    bad_lines: str = setting("error", choices=("error", "skip"))  # lines with bad UTF-8 or NUL


@dataclass
class SubwordConfig:
    model_type: str = setting("unigram", choices=("unigram", "bpe"))
    vocab_size: int = setting(8000, ("must be at least 8 (4 ids are reserved for specials)",
                                     lambda v: v >= 8))
    joint: bool = True  # one model for both languages, or one per side
    # the ranges SentencePiece's trainer accepts
    character_coverage: float = setting(1.0, ("must be between 0.98 and 1", lambda v: 0.98 <= v <= 1))
    max_sentences: int = setting(1_000_000, ("must be more than 100", lambda v: v > 100))  # sampled to train SentencePiece
    restrict_target: bool = True  # output layer over the pieces seen in training targets only
    # Subword regularization (0 = off): the training split is segmented anew every epoch, sampled.
    # unigram: alpha is the sharpness of the sampling distribution; bpe: the merge-dropout probability.
    sampling_alpha: float = setting(0.5, NON_NEGATIVE)
    # unigram: sample among each word's n best segmentations (SentencePiece's limit: 512), or all (-1)
    sampling_nbest: int = setting(-1, ("must be -1 (all) or from 2 to 512", lambda v: v == -1 or 2 <= v <= 512))


@dataclass
class ModelConfig:
    cell: str = setting("gru", choices=("gru", "lstm", "rnn"))  # rnn: Elman, tanh
    embed_size: int = setting(400, POSITIVE)
    hidden_size: int = setting(352, POSITIVE)  # encoder RNN size per direction
    decoder_size: int = setting(304, POSITIVE)  # decoder RNN size
    enc_layers: int = setting(1, POSITIVE)
    dec_layers: int = setting(1, POSITIVE)
    bidirectional: bool = True
    # none: a fixed context, the encoder's summary of the whole source (Cho et al. 2014)
    attention: str = setting("bahdanau", choices=("bahdanau", "luong-dot", "luong-general", "none"))
    attention_size: int = setting(256, POSITIVE)  # hidden size of the additive (Bahdanau) scorer
    input_feeding: bool = False  # feed the previous attentional vector to the decoder RNN (Luong)
    output_size: int = setting(256, POSITIVE)  # deep output layer before the vocabulary projection
    tie_embeddings: bool = False  # share target embeddings with the output projection
    dropout: float = setting(0.1291475421192717, FRACTION)  # the Bayesian sweep's value
    # training only: each source and target input token's embedding is dropped whole with this
    # probability (word dropout; 0 = off)
    word_dropout: float = setting(0.0, FRACTION)


@dataclass
class TrainConfig:
    # torch, numpy and SentencePiece all take a 32-bit unsigned seed
    seed: int = setting(1, ("must be between 0 and 4294967295", lambda v: 0 <= v < 2**32))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # CPU threads for torch; 0 = torch's default. Bounded: a million threads crashes the process.
    threads: int = setting(2, ("must be between 0 and 1024", lambda v: 0 <= v <= 1024))
    batch_tokens: int = setting(3000, POSITIVE)  # target tokens per batch, padding not counted
    max_epochs: int = setting(20, POSITIVE)
    # stop after this many updates; 0 = no limit. 2,400: Multi30k's budget (issue 16: within 60
    # minutes on a 2-core CPU: ~30 bf16-native, ~59 fp32-only, estimated); recipes for other
    # corpora set their own (e.g. max_steps: 0)
    max_steps: int = setting(2400, NON_NEGATIVE)
    max_minutes: float = setting(0.0, NON_NEGATIVE)  # wall-clock training budget; 0 = no limit
    lr: float = setting(0.0024764423432578515, POSITIVE)  # the Bayesian sweep's value
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = setting(0.0, NON_NEGATIVE)
    clip_norm: float = setting(1.0, NON_NEGATIVE)  # gradient clipping by global norm; 0 = off
    label_smoothing: float = setting(0.1, FRACTION)
    schedule: str = setting("plateau", choices=("plateau", "warmup", "constant"))
    # plateau: lr *= plateau_factor after plateau_patience validations without a better BLEU
    plateau_factor: float = setting(0.5, ("must be in (0, 1)", lambda v: 0 < v < 1))
    plateau_patience: int = setting(1, NON_NEGATIVE)
    warmup_steps: int = setting(1000, NON_NEGATIVE)  # warmup: linear, then inverse square root
    min_lr: float = setting(1e-5, NON_NEGATIVE)
    valid_every: int = setting(400, POSITIVE)  # updates between validations (loss + greedy BLEU)
    patience: int = setting(4, NON_NEGATIVE)  # validations without a better BLEU; 0 = never stop
    checkpoint_every: int = setting(100, POSITIVE)  # updates between writes of last.pt
    # each validation also writes model/step-<step>.pt; this many are kept (0 = none), for `nmt average`
    keep_checkpoints: int = setting(0, NON_NEGATIVE)
    keep_by: str = setting("last", choices=("last", "best"))  # the newest, or the best by valid BLEU
    # exponential moving average of the weights (0 = off): validation, best.pt and step checkpoints
    # use it. Below 1, or the average would never move.
    ema_decay: float = setting(0.999, FRACTION)
    max_len: int = setting(100, POSITIVE)  # training pairs longer than this (subwords) are skipped
    precision: str = setting("auto", choices=PRECISIONS)
    compile: bool = False  # torch.compile the decoder step of training (fuses its small ops)
    init_from: str | None = None  # fine-tuning: a checkpoint (or experiment) whose weights and subwords to start from


@dataclass
class DecodeConfig:
    beam_size: int = setting(5, POSITIVE)
    batch_size: int = setting(64, POSITIVE)  # sentences per batch
    length_penalty: str = setting("gnmt", choices=("gnmt", "avg", "none"))
    alpha: float = setting(0.6, NON_NEGATIVE)  # GNMT length-penalty exponent
    max_len_a: float = setting(1.5, NON_NEGATIVE)  # max output length = a * source length + b
    max_len_b: int = setting(10, NON_NEGATIVE)
    max_src_len: int = setting(250, POSITIVE)  # longer inputs are cut to this (with a warning)
    precision: str = setting("auto", choices=PRECISIONS)  # as train.precision, for search


@dataclass
class Config:
    name: str
    data: DataConfig
    subword: SubwordConfig = field(default_factory=SubwordConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


# ----------------------------------------------------------------------------------------------
# Loading


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe is a path to a YAML file or a name under recipes/."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or os.sep in recipe:
        if not path.is_file():
            raise ConfigError(f"{recipe}: recipe file not found")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        hint = difflib.get_close_matches(recipe, known, n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else f"; known: {', '.join(known)}"
        raise ConfigError(f"unknown recipe '{recipe}'{extra}")
    return path


def read_yaml(path: Path, what: str = "a recipe") -> dict:
    """A YAML file holding a mapping (`what` it is, for the message): unreadable text, invalid
    YAML or another kind of value is one ConfigError naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _merge(base: dict, override: dict) -> dict:
    """Deep merge; a key set to null in the child removes the parent's key (back to its default,
    or, for a test set, no test set of that name)."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: extends: cycle through {' -> '.join(str(p) for p in seen)}")
    raw = read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a recipe name or path")
    parent_path = path.parent / parent if parent.endswith((".yaml", ".yml")) else None
    if parent_path is None or not parent_path.is_file():
        candidate = path.parent / f"{parent}.yaml"
        parent_path = candidate if candidate.is_file() else resolve_recipe_path(parent)
    base = _load_raw(parent_path, seen + (path.resolve(),))
    base.pop("name", None)  # a child is its own recipe
    return _merge(base, raw)


def apply_override(raw: dict, assignment: str, source: str = "--set") -> None:
    """Apply `key.path=value` to the raw recipe dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"{source}: '{assignment}' is not of the form key.path=value")
    key_path, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    set_key(raw, key_path, value, source)


def set_key(raw: dict, key_path: str, value: Any, source: str = "--set") -> None:
    """Set the value at a dotted key path of the raw recipe dict (list items by index), creating
    sections on the way; whether the key exists is for config_from_dict to say."""
    keys = key_path.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{source}: {'.'.join(keys[: i + 1])}: no such list item")
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{source}: {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: {key_path}: no such list item")
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(recipe: str, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None) -> Config:
    """Load, merge `extends`, apply overrides (`key.path=value` text, then `values`: typed values
    by dotted key path, as a sweep's trial sets them), and validate a recipe."""
    path = resolve_recipe_path(recipe)
    raw = _load_raw(path)
    raw.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(raw, assignment)
    for key_path, value in (values or {}).items():
        set_key(raw, key_path, value)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    config = _build(Config, raw, "", source)
    validate(config, source)
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    header = f"# fully resolved recipe '{config.name}', written by nmt\n"
    atomic_write_text(path, header + yaml.safe_dump(config_to_dict(config), sort_keys=False))


def recipe_diff(base: dict, changed: dict) -> dict:
    """The keys of `changed` (a config_to_dict) whose values differ from `base`'s, nested as a
    recipe writes them; a list that differs is given whole."""
    diff = {}
    for key, value in changed.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            inner = recipe_diff(base[key], value)
            if inner:
                diff[key] = inner
        elif base.get(key) != value:
            diff[key] = value
    return diff


def write_recipe(path: Path, extends: str, settings: dict, header: str = "") -> None:
    """A recipe that `extends` another and sets `settings` (nested, as recipe_diff gives them);
    `header` becomes comment lines."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump({"extends": extends, **settings}, sort_keys=False)
    atomic_write_text(path, comments + body)


# ----------------------------------------------------------------------------------------------
# Strict construction: every key known, every value of its declared type


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    where = f"{source}: {key}"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {_describe(value)}")
        return _build(tp, value, key, source)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_convert(item_type, v, f"{key}.{i}", source) for i, v in enumerate(value)]
    if origin is dict:
        _, item_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        return {str(k): _convert(item_type, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {_describe(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}"


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: {full}: unknown key{extra}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], full, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {full}: required key is missing")
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Values that type-check but make no sense


def build_settings(cls: type, raw: dict, source: str, prefix: str = "") -> Any:
    """Any dataclass of settings (a recipe section, a sweep file) built as strictly as a recipe:
    unknown keys with a hint, declared types, and each field's `setting` range or choices."""
    section = _build(cls, raw, prefix, source)
    check_settings(section, f"{prefix}." if prefix else "", source)
    return section


def check_settings(section: Any, prefix: str, source: str) -> None:
    """Every field's value inside its `setting` range or choices, in nested sections too."""
    for f in dataclasses.fields(section):
        key, value = prefix + f.name, getattr(section, f.name)
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        if dataclasses.is_dataclass(value):
            check_settings(value, f"{key}.", source)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: {key}: must be a finite number, got {value}")  # YAML reads .nan and .inf
        elif choices and value not in choices:
            hint = difflib.get_close_matches(value, choices, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{source}: {key}: '{value}' is not one of {', '.join(choices)}{extra}")
        elif bounds and not bounds[1](value):
            raise ConfigError(f"{source}: {key}: {bounds[0]}, got {value}")


def validate(config: Config, source: str) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    check_settings(config, "", source)
    # The name becomes a directory (exp/<name>) and a line of config.yaml's header.
    if "/" in config.name or not config.name.isprintable() or config.name.strip() != config.name:
        fail("name", f"must be a plain name (no '/', control characters or surrounding spaces), got {config.name!r}")
    # Checks that involve more than one value, or a list or mapping as a whole.
    if len(config.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in config.train.betas):
        fail("train.betas", f"expected two numbers in [0, 1), got {config.train.betas}")
    if config.data.src_lang == config.data.tgt_lang:
        fail("data.tgt_lang", f"source and target language are both '{config.data.src_lang}'")
    if not config.data.train:
        fail("data.train", "names no corpus")
    if not config.data.test:
        fail("data.test", "names no test set")
    for name in config.data.test:
        if name in ("train", "valid") or "/" in name:
            fail(f"data.test.{name}", "test set names must differ from train/valid and be plain")
    sources = [("data.valid", config.data.valid)]
    sources += [(f"data.train.{i}", s) for i, s in enumerate(config.data.train)]
    sources += [(f"data.test.{n}", s) for n, s in config.data.test.items()]
    for key, src in sources:
        if (src.src_file is None) != (src.tgt_file is None):
            fail(key, "src_file and tgt_file go together")
    model = config.model
    enc_out = model.hidden_size * (2 if model.bidirectional else 1)
    if model.attention == "luong-dot" and enc_out != model.decoder_size:
        fail(
            "model.attention",
            f"luong-dot needs decoder_size ({model.decoder_size}) equal to the encoder output size "
            f"({enc_out}); use luong-general or change the sizes",
        )
    if model.input_feeding and model.attention == "none":
        fail("model.input_feeding", "input feeding needs an attention model (attention is 'none')")
    if model.tie_embeddings and model.output_size != model.embed_size:
        fail("model.tie_embeddings", "needs model.output_size equal to model.embed_size")
    sub = config.subword
    if sub.model_type == "bpe" and sub.sampling_alpha >= 1:
        fail("subword.sampling_alpha", f"is BPE-dropout's probability of skipping a merge: must be below 1, got {sub.sampling_alpha}")
    if sub.model_type == "bpe" and sub.sampling_nbest != -1:
        fail("subword.sampling_nbest", f"BPE-dropout has no n-best list: leave it at -1, got {sub.sampling_nbest}")
