"""Recipes: strict keys, types, values, extends and overrides; one-line errors from the CLI."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from nmt.cli import main
from nmt.config import RECIPES_DIR, ModelConfig, config_from_dict, config_to_dict, load_recipe
from nmt.errors import ConfigError

MINIMAL = """
data:
  src_lang: en
  tgt_lang: de
  train: [{corpus: c, split: train}]
  valid: {corpus: c, split: val}
  test: {test: {corpus: c, split: test}}
"""


def write_recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path), list(overrides))
    return str(info.value)


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"en-de", "de-en", "en-de-fixed", "de-en-fixed"} <= set(names)
    for name in names:
        config = load_recipe(name)
        assert config.name == name


def test_minimal_recipe_takes_defaults(tmp_path):
    config = load_recipe(str(write_recipe(tmp_path, MINIMAL)))
    assert config.model.attention == "bahdanau" and config.train.batch_tokens > 0
    assert config.name == "r"


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write_recipe(tmp_path, MINIMAL + "model:\n  hiden_size: 64\n")
    message = error_of(path)
    assert str(path) in message and "model.hiden_size" in message and "did you mean 'hidden_size'" in message


def test_unknown_section(tmp_path):
    message = error_of(write_recipe(tmp_path, MINIMAL + "modle: {}\n"))
    assert "modle" in message and "did you mean 'model'" in message


def test_wrong_type(tmp_path):
    message = error_of(write_recipe(tmp_path, MINIMAL + "model:\n  hidden_size: big\n"))
    assert "model.hidden_size" in message and "integer" in message


def test_bool_is_not_an_int(tmp_path):
    assert "model.enc_layers" in error_of(write_recipe(tmp_path, MINIMAL + "model:\n  enc_layers: true\n"))


def test_missing_required_key(tmp_path):
    message = error_of(write_recipe(tmp_path, MINIMAL.replace("  src_lang: en\n", "")))
    assert "data.src_lang" in message and "missing" in message


@pytest.mark.parametrize("override, key", [
    ("model.hidden_size=-3", "model.hidden_size"),
    ("model.attention=bahdanu", "model.attention"),
    ("model.dropout=1.5", "model.dropout"),
    ("data.tgt_lang=en", "data.tgt_lang"),
    ("model.cell=transformer", "model.cell"),
])
def test_impossible_values(tmp_path, override, key):
    assert key in error_of(write_recipe(tmp_path, MINIMAL), [override])


def test_attention_typo_suggests(tmp_path):
    assert "did you mean 'bahdanau'" in error_of(write_recipe(tmp_path, MINIMAL), ["model.attention=bahdanu"])


@pytest.mark.parametrize("override, message", [
    ("model.cell=gur", "model.cell: 'gur' is not one of gru, lstm, rnn; did you mean 'gru'?"),
    ("model.cell=xyz", "model.cell: 'xyz' is not one of gru, lstm, rnn"),
    ("model.enc_layers=0", "model.enc_layers: must be positive, got 0"),
    ("train.patience=-1", "train.patience: must not be negative, got -1"),
    ("train.label_smoothing=1.5", "train.label_smoothing: must be in [0, 1), got 1.5"),
    ("data.clean.max_ratio=0", "data.clean.max_ratio: must be positive, got 0.0"),
    ("subword.vocab_size=5", "subword.vocab_size: must be at least 8 (4 ids are reserved for specials), got 5"),
    # values torch, numpy or SentencePiece would only refuse (or crash on) later
    ("train.seed=-1", "train.seed: must be between 0 and 4294967295, got -1"),
    ("train.seed=4294967296", "train.seed: must be between 0 and 4294967295, got 4294967296"),
    ("train.threads=1000000", "train.threads: must be between 0 and 1024, got 1000000"),
    ("name=a/b", "name: must be a plain name (no '/', control characters or surrounding spaces), got 'a/b'"),
])
def test_value_error_messages(tmp_path, override, message):
    path = write_recipe(tmp_path, MINIMAL)
    assert error_of(path, [override]) == f"{path}: {message}"


@pytest.mark.parametrize("key", ["train.lr", "train.clip_norm", "train.max_minutes", "train.min_lr",
                                 "decode.alpha", "model.dropout", "data.clean.max_ratio"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_numbers_must_be_finite(tmp_path, key, value):
    # NaN passes no comparison, so a range check written as `value <= 0` would let it through.
    message = error_of(write_recipe(tmp_path, MINIMAL), [f"{key}={value}"])
    assert message.endswith(f"{key}: must be a finite number, got {float(value.replace('.', ''))}")


def test_en_de_lists_every_key_at_its_default():
    # en-de.yaml is the recipe every other one extends and the one README sends readers to for the
    # meaning of each key, so it names every key that has a default and gives it that default.
    raw = yaml.safe_load((RECIPES_DIR / "en-de.yaml").read_text())
    config = load_recipe("en-de")
    assert "extends" not in raw
    problems = []

    def walk(section, raw_section, prefix, top=False):
        for f in dataclasses.fields(section):
            key, value = prefix + f.name, getattr(section, f.name)
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if dataclasses.is_dataclass(value) and (has_default or top):  # data, subword, ..., data.clean
                walk(value, raw_section.get(f.name) or {}, f"{key}.")
            elif not has_default:
                continue  # required, so recipe-specific: the name, the languages, the data splits
            elif f.name not in raw_section:
                problems.append(f"{key} is not listed")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                if value != default:
                    problems.append(f"{key}: {value!r} in en-de.yaml, {default!r} in nmt/config.py")

    walk(config, raw, "", top=True)
    assert not problems, "recipes/en-de.yaml must list every key at its default:\n" + "\n".join(problems)


def test_luong_dot_needs_matching_sizes(tmp_path):
    message = error_of(write_recipe(tmp_path, MINIMAL), ["model.attention=luong-dot", "model.decoder_size=100"])
    assert "luong-dot" in message


def test_extends_gives_the_fixed_context_twin():
    base, twin = load_recipe("en-de"), load_recipe("en-de-fixed")
    assert twin.model.attention == "none" and base.model.attention == "bahdanau"
    # Everything but attention (and the name) is the same, so the two differ only in attention.
    assert dataclasses.replace(twin.model, attention="bahdanau") == base.model
    assert (twin.data, twin.train, twin.decode, twin.subword) == (base.data, base.train, base.decode, base.subword)
    assert twin.name == "en-de-fixed"


def test_de_en_reverses_languages():
    config = load_recipe("de-en")
    assert (config.data.src_lang, config.data.tgt_lang) == ("de", "en")


def test_overrides_are_typed_and_nested():
    config = load_recipe("en-de", ["model.hidden_size=64", "train.betas=[0.8, 0.9]",
                                   "data.train.0.split=other", "model.attention=luong-general"])
    assert config.model.hidden_size == 64 and config.train.betas == [0.8, 0.9]
    assert config.data.train[0].split == "other" and config.model.attention == "luong-general"
    with pytest.raises(ConfigError, match="train.max_epochs"):
        load_recipe("en-de", ["train.max_epochs=three"])
    with pytest.raises(ConfigError, match="no such list item"):
        load_recipe("en-de", ["data.train.5.split=x"])


def test_extends_cycle_is_an_error(tmp_path):
    write_recipe(tmp_path, "extends: b.yaml\n", "a.yaml")
    write_recipe(tmp_path, "extends: a.yaml\n", "b.yaml")
    assert "cycle" in error_of(tmp_path / "a.yaml")


def test_invalid_yaml_names_line(tmp_path):
    message = error_of(write_recipe(tmp_path, MINIMAL + "model: [unclosed\n"))
    assert "invalid YAML" in message and "line" in message


def test_resolved_config_round_trips():
    config = load_recipe("de-en-fixed", ["train.seed=7"])
    assert config_from_dict(config_to_dict(config)) == config


def test_unknown_recipe_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'en-de'"):
        load_recipe("en-dee")


def test_cli_bad_value_is_one_line_exit_2(tmp_path, capsys):
    status = main(["data", "en-de", "--exp", str(tmp_path), "--set", "model.hidden_size=-1"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "model.hidden_size" in err and "Traceback" not in err


def test_null_in_a_child_removes_the_inherited_key(tmp_path):
    # wmt14-en-de sets hidden_size 1000 over en-de's: null takes the key away, back to the default
    child = write_recipe(tmp_path, f"extends: {RECIPES_DIR / 'wmt14-en-de.yaml'}\ndata:\n  test:\n"
                                   "    test: {corpus: multi30k, split: test_2016_flickr}\n    test2017: null\n"
                                   "model:\n  hidden_size: null\n")
    config = load_recipe(str(child))
    assert load_recipe("wmt14-en-de").model.hidden_size == 1000
    assert list(config.data.test) == ["test"]
    assert config.model.hidden_size == ModelConfig().hidden_size != 1000


def test_benchmark_recipe_loads():
    config = load_recipe(str(RECIPES_DIR.parent / "bench" / "m30k-de-en.yaml"))
    assert list(config.data.test) == ["test"] and config.train.max_minutes == 20
