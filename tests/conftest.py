"""Shared fixtures: a small slice of the shared Multi30k mirror, and a tiny trained experiment."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from nmt.config import load_recipe
from nmt.corpus import run_data_stage
from nmt.subword import run_spm_stage
from nmt.train import train

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("NMT_TEST_DATA", ROOT.parent / "shared" / "data"))


def write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def read_gz(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="session")
def mirror(tmp_path_factory) -> Path:
    """A mirror laid out like ../shared/data holding a slice of Multi30k (500 training pairs)."""
    source = SHARED_DATA / "multi30k"
    if not source.is_dir():
        pytest.fail(f"{source} not found: tests need the shared corpora (set NMT_TEST_DATA)")
    root = tmp_path_factory.mktemp("mirror")
    sizes = {"train": 500, "val": 100, "test_2016_flickr": 100, "test_2017_flickr": 50}
    for split, n in sizes.items():
        for lang in ("en", "de"):
            write_gz(root / "multi30k" / f"{split}.{lang}.gz", read_gz(source / f"{split}.{lang}.gz", n))
    return root


TINY_OVERRIDES = [
    "subword.vocab_size=200",
    "subword.sampling_alpha=0.0",  # one fixed segmentation; the sampling tests set their own
    "train.lr=0.002",  # the tiny models' update counts were chosen at this learning rate
    "model.embed_size=32", "model.hidden_size=32", "model.decoder_size=48",
    "model.attention_size=32", "model.output_size=32", "model.dropout=0.1",
    "train.batch_tokens=600", "train.max_steps=12", "train.valid_every=6",
    "train.checkpoint_every=4", "train.threads=1", "train.seed=3",
    "train.ema_decay=0.0",  # 12 updates: an average would be mostly the initial weights
    "decode.batch_size=32", "decode.beam_size=3",
    # fp32, so that exact comparisons hold on any CPU (bf16 has its own test in test_model.py)
    "train.precision=fp32", "decode.precision=fp32",
]


@pytest.fixture(scope="session")
def prepared_exp(mirror, tmp_path_factory) -> Path:
    """The tiny recipe through the data and spm stages, once per session: tests take a copy."""
    exp = tmp_path_factory.mktemp("prepared") / "exp"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NMT_DATA_MIRROR", str(mirror))
        config = load_recipe("de-en", TINY_OVERRIDES)
        run_data_stage(config, exp)
        run_spm_stage(config, exp)
    return exp


@pytest.fixture
def tiny_exp(prepared_exp, mirror, tmp_path, monkeypatch):
    """A real experiment on the mirror slice, through the data and spm stages (not trained): the
    test's own copy, so that it may train in it or damage its files."""
    monkeypatch.setenv("NMT_DATA_MIRROR", str(mirror))
    exp = tmp_path / "exp"
    shutil.copytree(prepared_exp, exp)
    return load_recipe("de-en", TINY_OVERRIDES), exp


@pytest.fixture(scope="session")
def trained_exp(prepared_exp, mirror, tmp_path_factory):
    """A tiny model really trained (a few steps) on the mirror slice: for translate/evaluate."""
    exp = tmp_path_factory.mktemp("trained") / "exp"
    shutil.copytree(prepared_exp, exp)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NMT_DATA_MIRROR", str(mirror))
        # Enough updates (and a high learning rate) for the tiny model to say more than EOS.
        config = load_recipe("de-en", [*TINY_OVERRIDES, "train.max_steps=100", "train.lr=0.01",
                                       "train.valid_every=50"])
        train(config, exp)
    return config, exp
