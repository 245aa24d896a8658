"""Data and spm stages: mirror, hub (local dataset), cleaning, alignment errors, SentencePiece."""

from __future__ import annotations

import json
import subprocess

import pytest

from nmt.clean import clean_pairs, normalize
from nmt.config import CleanConfig, load_recipe
from nmt.corpus import run_data_stage
from nmt.errors import NmtError
from nmt.io import read_aligned, read_lines
from nmt.subword import POOL_FROM_LINES, EncodedSplit, Subwords, encode_lines, run_spm_stage

from .conftest import ROOT, write_gz


def test_normalize_nfc_whitespace_and_controls():
    assert normalize("  Cafe\u0301 \t au\x07  lait \n") == "Caf\u00e9 au lait"


def test_clean_counts_every_reason():
    cfg = CleanConfig(max_tokens=5, max_ratio=2.0, dedup=True, max_chars=100)
    src = ["a b", "", "a b c d e f g", "one", "a b", "x  y", "z"]
    tgt = ["c d", "x", "x", "one two three", "c d", "u v", "  "]
    kept_src, kept_tgt, stats = clean_pairs(src, tgt, cfg)
    assert kept_src == ["a b", "x y"] and kept_tgt == ["c d", "u v"]
    assert stats == {"pairs_in": 7, "pairs_kept": 2,
                     "dropped": {"empty": 2, "too_long": 1, "length_ratio": 1, "duplicate": 1}}


def test_misaligned_corpus_is_an_error(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    with pytest.raises(NmtError, match="has 3 lines but .* has 2"):
        read_aligned(tmp_path / "a.en", tmp_path / "a.de")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.en"
    path.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(NmtError, match=r"bad.en:3: invalid UTF-8"):
        read_lines(path)


def test_mirror_data_stage(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("NMT_DATA_MIRROR", str(mirror))
    config = load_recipe("en-de")
    exp = tmp_path / "exp"
    stats = run_data_stage(config, exp)
    out = exp / "data"
    assert len(read_lines(out / "train.src")) == stats["train"]["pairs_kept"] <= 500
    assert stats["train"]["pairs_in"] == 500
    assert read_lines(out / "test.src")[0] == read_lines(mirror / "multi30k" / "test_2016_flickr.en.gz")[0]
    assert len(read_lines(out / "test2017.tgt")) == 50 and len(read_lines(out / "valid.tgt")) == 100
    saved = json.loads((out / "stats.json").read_text())
    assert saved["splits"]["train"]["pairs_kept"] == stats["train"]["pairs_kept"]
    assert saved["config"]["data"]["src_lang"] == "en" and "torch" in saved["versions"]
    assert (out / "config.yaml").is_file()


def test_mirror_missing_split_never_fetches(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("NMT_DATA_MIRROR", str(mirror))
    config = load_recipe("en-de", ["data.train.0.split=nope"])
    with pytest.raises(NmtError, match="nothing is fetched from the network"):
        run_data_stage(config, tmp_path / "exp")


def test_misaligned_mirror_split_is_an_error(mirror, tmp_path, monkeypatch):
    bad = tmp_path / "bad-mirror"
    for lang, n in (("en", 10), ("de", 9)):
        write_gz(bad / "multi30k" / f"train.{lang}.gz", [f"line {i}" for i in range(n)])
    monkeypatch.setenv("NMT_DATA_MIRROR", str(bad))
    with pytest.raises(NmtError, match="has 10 lines but"):
        run_data_stage(load_recipe("en-de"), tmp_path / "exp")


@pytest.mark.parametrize("recipe", ["iwslt17-en-de", "wmt14-en-de"])
def test_hub_path_with_a_local_dataset(recipe, tmp_path, monkeypatch):
    """The `datasets` code path, offline: a local dataset dir stands in for a hub id."""
    dataset = tmp_path / "fake-hub" / "iwslt"
    dataset.mkdir(parents=True)
    rows = {"train": 30, "validation": 5, "test": 6}
    for split, n in rows.items():
        with open(dataset / f"{split}.jsonl", "w") as f:
            for i in range(n):
                pair = {"en": f"sentence {i} of {split}", "de": f"Satz {i} aus {split}"}
                f.write(json.dumps({"translation": pair}) + "\n")
    monkeypatch.delenv("NMT_DATA_MIRROR", raising=False)
    monkeypatch.setenv("NMT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = load_recipe(recipe, [
        f"data.train.0.hub={dataset}", "data.train.0.hub_config=null",
        f"data.valid.hub={dataset}", "data.valid.hub_config=null",
        f"data.test.test.hub={dataset}", "data.test.test.hub_config=null",
    ])
    config.data.test = {"test": config.data.test["test"]}
    stats = run_data_stage(config, tmp_path / "exp")
    assert stats["train"]["pairs_kept"] == 30 and stats["test"]["pairs_in"] == 6
    exported = tmp_path / "data" / config.data.train[0].corpus / f"{config.data.train[0].split}.de"
    assert read_lines(exported)[0] == "Satz 0 aus train"
    assert read_lines(tmp_path / "exp" / "data" / "valid.src")[4] == "sentence 4 of validation"


def test_spm_stage_round_trip_and_arrays(tiny_exp):
    config, exp = tiny_exp
    manifest = json.loads((exp / "spm" / "manifest.json").read_text())
    assert manifest["vocab_size"]["src"] <= 200
    subwords = Subwords.load(exp / "spm" / "joint.model", exp / "spm" / "joint.model")
    for special, expected in (("<pad>", 0), ("<unk>", 1), ("<s>", 2), ("</s>", 3)):
        assert subwords.tgt.piece_to_id(special) == expected
    lines = read_lines(exp / "data" / "valid.tgt")[:20]
    assert subwords.decode_tgt(subwords.encode_tgt(lines)) == lines
    train = EncodedSplit.load(exp / "spm" / "train.npz")
    assert len(train) == manifest["splits"]["train"]["pairs"]
    first = read_lines(exp / "data" / "train.src")[0]
    assert subwords.src.decode(train.src(0).tolist()) == first
    # a few lines are encoded one by one, a corpus on SentencePiece's pool: the same ids
    corpus = read_lines(exp / "data" / "train.src")
    assert len(corpus) < POOL_FROM_LINES  # (the slice is small: repeat it past the threshold)
    corpus = (corpus * (POOL_FROM_LINES // len(corpus) + 1))[: POOL_FROM_LINES + 1]
    assert encode_lines(subwords.src, corpus) == subwords.src.encode(corpus)
    assert encode_lines(subwords.src, corpus[:3]) == subwords.src.encode(corpus[:3]) == \
        [subwords.src.encode(line) for line in corpus[:3]]


def test_spm_stage_needs_data_stage(tmp_path):
    with pytest.raises(NmtError, match="run `nmt data"):
        run_spm_stage(load_recipe("en-de"), tmp_path / "nothing")


def test_make_lists_the_stages_in_order(tmp_path):
    result = subprocess.run(
        ["make", "-n", "recipe=en-de", "train", f"EXP={tmp_path}/exp", "SET=train.max_epochs=3"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    commands = [line for line in result.stdout.splitlines() if "/nmt " in line]
    stages = [line.split("/nmt ")[1].split()[0] for line in commands]
    assert stages == ["data", "spm", "train", "evaluate"]
    assert all("--set train.max_epochs=3" in line for line in commands)


def test_output_vocabulary_is_the_pieces_of_the_training_targets(tiny_exp):
    config, exp = tiny_exp
    manifest = json.loads((exp / "spm" / "manifest.json").read_text())
    vocab = manifest["output_vocab"]
    train = EncodedSplit.load(exp / "spm" / "train.npz")
    assert vocab[:4] == [0, 1, 2, 3] and vocab == sorted(vocab)
    assert set(vocab) == set(train.tgt_ids.tolist()) | {0, 1, 2, 3}
    assert manifest["vocab_size"]["output"] == len(vocab) < manifest["vocab_size"]["tgt"]
