"""Recipes: YAML files loaded into typed dataclasses, strictly.

A recipe has the sections `data`, `subword`, `model`, `train` and `decode` (see recipes/en-de.yaml,
where every key is commented). `extends: other` starts from another recipe and overrides keys;
`--set key.path=value` overrides after that. Every problem is one ConfigError naming the file and
the key path, with a "did you mean" hint for unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmt.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class SplitSource:
    corpus: str  # folder of the corpus in the mirror or data dir: <corpus>/<split>.<lang>[.gz]
    split: str  # split name in that folder, e.g. train, val, test_2016_flickr
    hub: str | None = None  # Hugging Face dataset id (or a local dataset dir) to fetch it from
    hub_config: str | None = None  # the dataset's config name, e.g. iwslt2017-en-de
    hub_split: str | None = None  # the dataset's split name; defaults to `split`
    src_file: str | None = None  # local plain-text files instead of mirror or hub
    tgt_file: str | None = None


@dataclass
class CleanConfig:
    max_tokens: int = 80  # drop training pairs with a side longer than this (whitespace tokens)
    max_ratio: float = 3.0  # drop pairs whose token-length ratio exceeds this
    dedup: bool = True  # drop exact duplicate pairs
    max_chars: int = 2000  # drop pairs with a side longer than this many characters


@dataclass
class DataConfig:
    src_lang: str
    tgt_lang: str
    train: list[SplitSource]
    valid: SplitSource
    test: dict[str, SplitSource]
    clean: CleanConfig = field(default_factory=CleanConfig)
    bad_lines: str = "error"  # error | skip: training lines with invalid UTF-8 or NUL bytes


@dataclass
class SubwordConfig:
    model_type: str = "unigram"  # unigram | bpe
    vocab_size: int = 8000
    joint: bool = True  # one model for both languages, or one per side
    character_coverage: float = 1.0
    max_sentences: int = 1_000_000  # cap on sentences sampled for training SentencePiece
    restrict_target: bool = True  # output layer over the pieces seen in training targets only


@dataclass
class ModelConfig:
    cell: str = "gru"  # gru | lstm | rnn (Elman, tanh)
    embed_size: int = 256
    hidden_size: int = 256  # encoder RNN size per direction
    decoder_size: int = 512  # decoder RNN size
    enc_layers: int = 1
    dec_layers: int = 1
    bidirectional: bool = True
    attention: str = "bahdanau"  # bahdanau | luong-dot | luong-general | none (fixed context)
    attention_size: int = 256  # hidden size of the additive (Bahdanau) scorer
    input_feeding: bool = False  # feed the previous attentional vector to the decoder RNN (Luong)
    output_size: int = 256  # size of the deep output layer before the vocabulary projection
    tie_embeddings: bool = False  # share target embeddings with the output projection
    dropout: float = 0.3


@dataclass
class TrainConfig:
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    batch_tokens: int = 3000  # target tokens per batch (real tokens, padding not counted)
    max_epochs: int = 30
    max_steps: int = 0  # stop after this many updates; 0 = no limit
    max_minutes: float = 0.0  # stop after this much wall-clock training time; 0 = no limit
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # gradient clipping by global norm; 0 = off
    label_smoothing: float = 0.0
    schedule: str = "plateau"  # plateau | warmup | constant
    plateau_factor: float = 0.5  # plateau: multiply lr by this when valid BLEU stalls
    plateau_patience: int = 2  # plateau: validations without improvement before decaying
    warmup_steps: int = 1000  # warmup: linear warmup, then inverse square-root decay
    min_lr: float = 1e-6
    valid_every: int = 500  # validate (loss + greedy BLEU) every this many updates
    patience: int = 8  # early stopping: validations without a better BLEU; 0 = never stop early
    checkpoint_every: int = 200  # write last.pt every this many updates
    max_len: int = 100  # training pairs longer than this (subword tokens) are skipped
    precision: str = "auto"  # auto | fp32 | bf16: bf16 matrix products (autocast) where native
    compile: bool = False  # torch.compile the decoder step of training (fuses its small ops)


@dataclass
class DecodeConfig:
    beam_size: int = 5
    batch_size: int = 64  # sentences per batch
    length_penalty: str = "gnmt"  # gnmt | avg | none
    alpha: float = 0.6  # GNMT length-penalty exponent
    max_len_a: float = 1.5  # max output length = a * source length + b
    max_len_b: int = 10
    max_src_len: int = 250  # longer inputs are cut to this many subwords (with a warning)
    precision: str = "auto"  # auto | fp32 | bf16, as train.precision, for search


@dataclass
class Config:
    name: str
    data: DataConfig
    subword: SubwordConfig = field(default_factory=SubwordConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


CHOICES = {
    "data.bad_lines": ("error", "skip"),
    "subword.model_type": ("unigram", "bpe"),
    "model.cell": ("gru", "lstm", "rnn"),
    "model.attention": ("bahdanau", "luong-dot", "luong-general", "none"),
    "train.schedule": ("plateau", "warmup", "constant"),
    "decode.length_penalty": ("gnmt", "avg", "none"),
    "train.precision": ("auto", "fp32", "bf16"),
    "decode.precision": ("auto", "fp32", "bf16"),
}


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


def _read_yaml(path: Path) -> dict:
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
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
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
    raw = _read_yaml(path)
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


def load_recipe(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, merge `extends`, apply overrides, and validate a recipe."""
    path = resolve_recipe_path(recipe)
    raw = _load_raw(path)
    raw.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    config = _build(Config, raw, "", source)
    validate(config, source)
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    from nmt.io import atomic_write_text

    header = f"# fully resolved recipe '{config.name}', written by nmt\n"
    atomic_write_text(path, header + yaml.safe_dump(config_to_dict(config), sort_keys=False))


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


def validate(config: Config, source: str) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            hint = difflib.get_close_matches(value, allowed, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            fail(key, f"'{value}' is not one of {', '.join(allowed)}{extra}")

    positive = {
        "subword.vocab_size": config.subword.vocab_size,
        "subword.max_sentences": config.subword.max_sentences,
        "model.embed_size": config.model.embed_size,
        "model.hidden_size": config.model.hidden_size,
        "model.decoder_size": config.model.decoder_size,
        "model.enc_layers": config.model.enc_layers,
        "model.dec_layers": config.model.dec_layers,
        "model.attention_size": config.model.attention_size,
        "model.output_size": config.model.output_size,
        "train.batch_tokens": config.train.batch_tokens,
        "train.max_epochs": config.train.max_epochs,
        "train.lr": config.train.lr,
        "train.valid_every": config.train.valid_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.max_len": config.train.max_len,
        "decode.beam_size": config.decode.beam_size,
        "decode.batch_size": config.decode.batch_size,
        "decode.max_src_len": config.decode.max_src_len,
        "data.clean.max_tokens": config.data.clean.max_tokens,
        "data.clean.max_ratio": config.data.clean.max_ratio,
        "data.clean.max_chars": config.data.clean.max_chars,
    }
    for key, value in positive.items():
        if value <= 0:
            fail(key, f"must be positive, got {value}")
    non_negative = {
        "train.max_steps": config.train.max_steps,
        "train.max_minutes": config.train.max_minutes,
        "train.threads": config.train.threads,
        "train.clip_norm": config.train.clip_norm,
        "train.patience": config.train.patience,
        "train.warmup_steps": config.train.warmup_steps,
        "train.weight_decay": config.train.weight_decay,
        "decode.alpha": config.decode.alpha,
        "decode.max_len_a": config.decode.max_len_a,
        "decode.max_len_b": config.decode.max_len_b,
    }
    for key, value in non_negative.items():
        if value < 0:
            fail(key, f"must not be negative, got {value}")
    for key, value in {
        "model.dropout": config.model.dropout,
        "train.label_smoothing": config.train.label_smoothing,
    }.items():
        if not 0.0 <= value < 1.0:
            fail(key, f"must be in [0, 1), got {value}")
    if not 0.0 < config.subword.character_coverage <= 1.0:
        fail("subword.character_coverage", "must be in (0, 1]")
    if not 0.0 < config.train.plateau_factor < 1.0:
        fail("train.plateau_factor", "must be in (0, 1)")
    if len(config.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in config.train.betas):
        fail("train.betas", f"expected two numbers in [0, 1), got {config.train.betas}")
    if config.subword.vocab_size < 8:
        fail("subword.vocab_size", "must be at least 8 (4 ids are reserved for specials)")
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
