"""Subword regularization: our samplers draw SentencePiece's distributions, unsampled they segment
as SentencePiece does, the same (seed, epoch) gives the same split in any process, and a run with
sampling resumes exactly."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm

from nmt.checkpoint import load_checkpoint
from nmt.cli import main
from nmt.errors import NmtError
from nmt.io import read_lines
from nmt.regularization import SPACE, Pieces, Segmenter, possible_pieces
from nmt.subword import (
    PAD_ID,
    UNK_ID,
    EncodedSplit,
    SplitSampler,
    load_processor,
    pack,
    run_spm_stage,
)
from nmt.train import load_training_data, train

from .conftest import ROOT, TINY_OVERRIDES
from .test_train import after_update, model_state

SAMPLES = 20_000


def processor_of(exp) -> spm.SentencePieceProcessor:
    return load_processor(exp / "spm" / "joint.model")


@pytest.fixture(scope="module")
def bpe_model(prepared_exp, tmp_path_factory) -> spm.SentencePieceProcessor:
    """A small BPE model of the tiny corpus (the prepared experiment's is unigram)."""
    lines = read_lines(prepared_exp / "data" / "train.src") + read_lines(prepared_exp / "data" / "train.tgt")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=300, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    path = tmp_path_factory.mktemp("bpe") / "bpe.model"
    path.write_bytes(model.getvalue())
    return load_processor(path)


def segmentations(word: str, ids: dict) -> list[tuple[int, ...]]:
    """Every way to cut `word` into pieces of the vocabulary, by brute force."""
    if not word:
        return [()]
    return [(ids[word[:end]], *rest) for end in range(1, len(word) + 1) if word[:end] in ids
            for rest in segmentations(word[end:], ids)]


def a_word_with(processor, lines, fewest: int, most: int) -> str:
    """The first word of `lines` (normalized, '▁' first) with fewest..most segmentations."""
    ids = Pieces(processor).ids
    for line in lines:
        for word in processor.normalize(line).split(SPACE):
            if word and fewest <= len(segmentations(SPACE + word, ids)) <= most:
                return SPACE + word
    raise AssertionError("no such word")


def frequencies(samples) -> dict:
    counts = Counter(tuple(s) for s in samples)
    return {k: v / len(samples) for k, v in counts.items()}


def distance(p: dict, q: dict) -> float:
    """Total variation distance between two distributions over segmentations."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def our_samples(processor, word: str, model_type: str, alpha: float, nbest: int = -1) -> list:
    segmenter = Segmenter([word.replace(SPACE, " ")] * SAMPLES, processor, model_type, alpha, nbest)
    flat, offsets = segmenter.sample(np.random.default_rng(7))
    return [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(SAMPLES)]


def sentencepiece_samples(processor, word: str, alpha: float, nbest: int = -1) -> list:
    return processor.encode([word.replace(SPACE, " ")] * SAMPLES, enable_sampling=True, alpha=alpha,
                            nbest_size=nbest)


# ----------------------------------------------------------------------------------------------
# The samplers draw SentencePiece's distributions


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_unigram_sampling_draws_every_segmentation_by_its_probability(prepared_exp, alpha):
    processor = processor_of(prepared_exp)
    word = a_word_with(processor, read_lines(prepared_exp / "data" / "train.tgt"), 6, 60)
    pieces = Pieces(processor)
    # P(segmentation) ∝ exp(alpha · Σ log p(piece)) (Kudo 2018, eq. 7), computed by enumeration.
    weights = {s: math.exp(alpha * sum(float(pieces.scores[i]) for i in s)) for s in segmentations(word, pieces.ids)}
    exact = {s: w / sum(weights.values()) for s, w in weights.items()}
    ours = frequencies(our_samples(processor, word, "unigram", alpha))
    assert distance(ours, exact) < 0.03
    assert distance(frequencies(sentencepiece_samples(processor, word, alpha)), exact) < 0.03  # the same thing


def test_unigram_nbest_samples_among_sentencepieces_n_best(prepared_exp):
    processor = processor_of(prepared_exp)
    word = a_word_with(processor, read_lines(prepared_exp / "data" / "train.tgt"), 8, 60)
    ours = frequencies(our_samples(processor, word, "unigram", 0.3, nbest=4))
    theirs = frequencies(sentencepiece_samples(processor, word, 0.3, nbest=4))
    assert len(set(ours) | set(theirs)) <= 4  # of its segmentations, only the 4 best
    assert distance(ours, theirs) < 0.04


def test_bpe_dropout_draws_sentencepieces_distribution(prepared_exp, bpe_model):
    word = a_word_with(bpe_model, read_lines(prepared_exp / "data" / "train.tgt"), 10, 200)
    ours = frequencies(our_samples(bpe_model, word, "bpe", 0.2))
    theirs = frequencies(sentencepiece_samples(bpe_model, word, 0.2))
    assert len(ours) > 2
    assert distance(ours, theirs) < 0.04
    assert our_samples(bpe_model, word, "bpe", 0.0)[0] == bpe_model.encode(word.replace(SPACE, " "))


# ----------------------------------------------------------------------------------------------
# Unsampled, as SentencePiece


@pytest.mark.parametrize("model", ["unigram", "bpe"])
def test_unsampled_segmentation_is_sentencepieces(prepared_exp, bpe_model, model):
    processor = processor_of(prepared_exp) if model == "unigram" else bpe_model
    lines = read_lines(prepared_exp / "data" / "train.tgt") + ["", "ein ☃ Schneemann ☃☃", "x  y "]
    segmenter = Segmenter(lines, processor, model, 0.1)
    flat, offsets = pack(processor.encode(lines))
    assert segmenter.first_difference(flat, offsets) is None
    ours, our_offsets = segmenter.best()
    if model == "bpe":
        assert np.array_equal(ours, flat) and np.array_equal(our_offsets, offsets)
    assert (ours == UNK_ID).sum() == (flat == UNK_ID).sum() > 0  # a run of unknowns is one unk
    # and a segmentation that is not SentencePiece's is found, on its line
    swapped = [*lines[:3], lines[4], lines[3], *lines[5:]]
    assert segmenter.first_difference(*pack(processor.encode(swapped))) == 3


def test_samples_are_segmentations_of_the_same_text(prepared_exp):
    processor = processor_of(prepared_exp)
    lines = read_lines(prepared_exp / "data" / "train.src")
    flat, offsets = Segmenter(lines, processor, "unigram", 0.1).sample(np.random.default_rng(1))
    sampled = [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(lines))]
    unsampled = processor.encode(lines)
    assert processor.decode(sampled) == processor.decode(unsampled)
    assert sum(s != u for s, u in zip(sampled, unsampled)) > len(lines) / 2  # alpha 0.1 samples widely


# ----------------------------------------------------------------------------------------------
# The training split, per epoch


@pytest.fixture
def sampling_exp(tiny_exp):
    config, exp = tiny_exp
    config.subword.sampling_alpha = 0.2
    run_spm_stage(config, exp)
    return config, exp


def split_digest(split: EncodedSplit) -> str:
    arrays = (split.src_ids, split.src_offsets, split.tgt_ids, split.tgt_offsets)
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def test_same_seed_and_epoch_give_the_same_split_in_any_process(sampling_exp):
    config, exp = sampling_exp
    sampler = load_training_data(config, exp).sampler
    first = split_digest(sampler.sample(3, 0))
    assert split_digest(sampler.sample(3, 0)) == first
    assert len({first, split_digest(sampler.sample(3, 1)), split_digest(sampler.sample(4, 0))}) == 3
    # SentencePiece's own sampler fails exactly this: its generator is salted per process.
    script = ("import pathlib, sys; from nmt.config import load_recipe; from nmt.train import load_training_data; "
              "from tests.test_regularization import split_digest; "
              "config = load_recipe('de-en', sys.argv[2:]); "
              "print(split_digest(load_training_data(config, pathlib.Path(sys.argv[1])).sampler.sample(3, 0)))")
    other = subprocess.run([sys.executable, "-c", script, str(exp), *TINY_OVERRIDES, "subword.sampling_alpha=0.2"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == first


def test_sampling_off_trains_on_todays_ids(tiny_exp):
    config, exp = tiny_exp
    data = load_training_data(config, exp)
    assert data.sampler is None
    processor = processor_of(exp)
    src, _ = pack(processor.encode(read_lines(exp / "data" / "train.src")))
    assert np.array_equal(data.train.src_ids, src)
    manifest = json.loads((exp / "spm" / "manifest.json").read_text())
    assert not manifest["output_vocab_sampled"]
    tgt = EncodedSplit.load(exp / "spm" / "train.npz").tgt_ids
    assert manifest["output_vocab"] == np.union1d(np.arange(4), tgt).tolist()  # the unsampled targets' pieces


def test_output_vocabulary_holds_every_sampled_target_piece(sampling_exp):
    config, exp = sampling_exp
    data = load_training_data(config, exp)
    manifest = json.loads((exp / "spm" / "manifest.json").read_text())
    unsampled = set(EncodedSplit.load(exp / "spm" / "train.npz").tgt_ids.tolist())
    assert manifest["output_vocab_sampled"] and unsampled < set(manifest["output_vocab"])
    seen = set()
    for epoch in range(5):
        split = data.sampler.sample(config.train.seed, epoch)
        assert not (split.tgt_ids == UNK_ID).any() and not (split.tgt_ids == PAD_ID).any()
        seen |= set(data.vocab.to_spm(split.tgt_ids.tolist()))
    assert seen - unsampled  # sampling did reach pieces that the unsampled targets lack
    assert seen <= set(possible_pieces(read_lines(exp / "data" / "train.tgt"), processor_of(exp)).tolist())


def test_sampling_with_an_output_vocabulary_made_without_it_is_one_line(tiny_exp, capsys):
    config, exp = tiny_exp  # its spm stage ran without sampling
    args = ["train", "de-en", "--exp", str(exp), *(f"--set={o}" for o in TINY_OVERRIDES),
            "--set", "subword.sampling_alpha=0.2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json" in err and "subword.sampling_alpha" in err


def test_sampling_refused_when_sentencepiece_segments_otherwise(sampling_exp):
    config, exp = sampling_exp
    lines = read_lines(exp / "data" / "train.tgt")
    (exp / "data" / "train.tgt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(NmtError, match=r"train\.tgt:1: nmt's sampler"):
        load_training_data(config, exp)


def test_interrupted_and_resumed_with_sampling_equals_straight(sampling_exp, tmp_path, monkeypatch):
    config, exp = sampling_exp
    config.train.batch_tokens, config.train.max_steps = 1500, 24  # about 15 batches an epoch
    resumed_exp = tmp_path / "resumed"
    shutil.copytree(exp, resumed_exp)
    epochs = []
    sample = SplitSampler.sample
    monkeypatch.setattr(SplitSampler, "sample", lambda self, seed, epoch: epochs.append(epoch) or sample(self, seed, epoch))

    straight = train(config, exp)
    assert straight["epochs"] >= 1 and epochs == list(range(len(epochs))) and len(epochs) >= 2

    epochs.clear()
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:  # Ctrl-C in the second epoch, between checkpoints (every 4)
        with after_update(21, lambda: signal.raise_signal(signal.SIGINT)):
            with pytest.raises(NmtError, match="interrupted at step 21"):
                train(config, resumed_exp)
    finally:
        signal.signal(signal.SIGINT, previous)
    stopped_in = load_checkpoint(resumed_exp / "model" / "last.pt")["progress"]["epoch"]
    assert stopped_in >= 1
    epochs.clear()
    train(config, resumed_exp)  # re-derives the segmentation of the epoch it stopped in
    assert epochs[0] == stopped_in
    expected, resumed = model_state(exp / "model" / "last.pt"), model_state(resumed_exp / "model" / "last.pt")
    for name in expected:
        assert np.array_equal(resumed[name].numpy(), expected[name].numpy()), name
