"""SentencePiece: train, encode every split once into id arrays, decode.

The SentencePiece model is the vocabulary: ids 0-3 are fixed (pad, unk, bos, eos) so that a model
checkpoint and its .model file always agree. Splits are stored as one flat int32 array plus offsets
per side (`<split>.npz`), which training loads in milliseconds and never touches text again.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nmt.config import Config, config_to_dict, save_config
from nmt.errors import NmtError
from nmt.io import atomic_output, read_lines, versions, write_json

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_sentencepiece(lines: list[str], path: Path, config: Config, threads: int = 2) -> None:
    sub = config.subword
    spm.set_random_generator_seed(config.train.seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type=sub.model_type,
        vocab_size=sub.vocab_size,
        character_coverage=sub.character_coverage,
        input_sentence_size=sub.max_sentences,
        shuffle_input_sentence=True,
        # A small corpus may not support the requested size: take what it has, don't fail.
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=threads,
        minloglevel=2,
    )
    with atomic_output(path, "wb") as f:
        f.write(model.getvalue())


@dataclass
class Subwords:
    """The source and target SentencePiece models (the same file when joint)."""

    src: spm.SentencePieceProcessor
    tgt: spm.SentencePieceProcessor

    @classmethod
    def load(cls, src_model: Path, tgt_model: Path) -> Subwords:
        return cls(load_processor(src_model), load_processor(tgt_model))

    def encode_src(self, lines: list[str]) -> list[list[int]]:
        return self.src.encode(lines)

    def encode_tgt(self, lines: list[str]) -> list[list[int]]:
        return self.tgt.encode(lines)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode(ids)


def load_processor(path: Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise NmtError(f"{path}: SentencePiece model not found")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as err:
        raise NmtError(f"{path}: not a valid SentencePiece model ({err})") from None
    if processor.pad_id() != PAD_ID or processor.eos_id() != EOS_ID or processor.bos_id() != BOS_ID:
        raise NmtError(f"{path}: SentencePiece model lacks nmt's special ids (pad 0, bos 2, eos 3)")
    return processor


def pack(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists → (flat int32 ids, int64 offsets of length n+1)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for s in sequences for i in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


@dataclass
class EncodedSplit:
    src_ids: np.ndarray  # flat int32
    src_offsets: np.ndarray  # (n+1,) int64
    tgt_ids: np.ndarray
    tgt_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.diff(self.tgt_offsets)

    def src(self, i: int) -> np.ndarray:
        return self.src_ids[self.src_offsets[i] : self.src_offsets[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_ids[self.tgt_offsets[i] : self.tgt_offsets[i + 1]]

    def save(self, path: Path) -> None:
        with atomic_output(path, "wb") as f:
            np.savez(f, src_ids=self.src_ids, src_offsets=self.src_offsets,
                     tgt_ids=self.tgt_ids, tgt_offsets=self.tgt_offsets)

    @classmethod
    def load(cls, path: Path) -> EncodedSplit:
        if not Path(path).is_file():
            raise NmtError(f"{path}: encoded split not found; run `nmt spm` first")
        try:
            with np.load(path) as arrays:
                return cls(**{k: arrays[k] for k in ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets")})
        except (OSError, ValueError, KeyError) as err:
            raise NmtError(f"{path}: corrupt encoded split ({err}); rerun `nmt spm`") from None


def output_vocabulary(train: EncodedSplit) -> np.ndarray:
    """The SentencePiece ids that occur in the training targets, plus the specials: the output
    layer's vocabulary, where output id i is SentencePiece id vocab[i]. A piece that never occurs
    in the targets can never be learned, so computing its probability would be wasted work (with a
    joint model, that is most of the other language's pieces). The specials keep their ids."""
    return np.union1d(np.arange(4), np.unique(train.tgt_ids)).astype(np.int64)


@dataclass(frozen=True)
class OutputVocabulary:
    """The map between the output layer's ids and the target SentencePiece ids, in one place.

    Output id i is SentencePiece id `pieces[i]`; without `pieces` (subword.restrict_target off)
    the two are the same. Training maps its targets in, validation and translation map the
    hypotheses out. Stored as `output_vocab` (the list, or null) in the spm manifest and in every
    checkpoint."""

    spm_size: int  # the target SentencePiece model's pieces
    pieces: tuple[int, ...] | None = None

    @classmethod
    def of(cls, record: dict, source: Path | str) -> OutputVocabulary:
        """From a manifest or checkpoint payload (its `vocab_size` and `output_vocab`)."""
        vocab = cls(record["vocab_size"]["tgt"], _as_ids(record.get("output_vocab")))
        expected = record["vocab_size"].get("output", vocab.size)
        if vocab.size != expected or (vocab.pieces and max(vocab.pieces) >= vocab.spm_size):
            raise NmtError(f"{source}: its output vocabulary does not match the model")
        return vocab

    @property
    def size(self) -> int:
        """Rows of the output layer."""
        return len(self.pieces) if self.pieces is not None else self.spm_size

    def to_output(self, spm_ids: np.ndarray) -> np.ndarray:
        """SentencePiece ids → output ids; pieces outside the vocabulary become unk."""
        if self.pieces is None:
            return spm_ids
        lookup = np.full(self.spm_size, UNK_ID, dtype=np.int32)
        lookup[list(self.pieces)] = np.arange(len(self.pieces), dtype=np.int32)
        return lookup[spm_ids]

    def to_spm(self, output_ids: list[int]) -> list[int]:
        """Output ids (a hypothesis) → SentencePiece ids."""
        if self.pieces is None:
            return list(output_ids)
        return [self.pieces[i] for i in output_ids]

    def record(self) -> list[int] | None:
        return list(self.pieces) if self.pieces is not None else None


def _as_ids(pieces) -> tuple[int, ...] | None:
    return None if pieces is None else tuple(int(i) for i in pieces)


def run_spm_stage(config: Config, exp_dir: Path) -> dict:
    """Train SentencePiece on the cleaned training split and encode every split."""
    data_dir, out = exp_dir / "data", exp_dir / "spm"
    if not (data_dir / "stats.json").is_file():
        raise NmtError(f"{data_dir}/stats.json not found: run `nmt data {config.name}` first")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # the stage is complete only once this is rewritten
    threads = max(1, config.train.threads or 2)

    train_src, train_tgt = read_lines(data_dir / "train.src"), read_lines(data_dir / "train.tgt")
    if config.subword.joint:
        train_sentencepiece(train_src + train_tgt, out / "joint.model", config, threads)
        models = {"src": "joint.model", "tgt": "joint.model"}
    else:
        train_sentencepiece(train_src, out / "src.model", config, threads)
        train_sentencepiece(train_tgt, out / "tgt.model", config, threads)
        models = {"src": "src.model", "tgt": "tgt.model"}
    subwords = Subwords.load(out / models["src"], out / models["tgt"])

    split_names = ["train", "valid", *config.data.test]
    splits = {}
    for name in split_names:
        src_lines = read_lines(data_dir / f"{name}.src")
        tgt_lines = read_lines(data_dir / f"{name}.tgt")
        src_ids, src_offsets = pack(subwords.encode_src(src_lines))
        tgt_ids, tgt_offsets = pack(subwords.encode_tgt(tgt_lines))
        EncodedSplit(src_ids, src_offsets, tgt_ids, tgt_offsets).save(out / f"{name}.npz")
        splits[name] = {
            "pairs": len(src_lines),
            "src_tokens": int(src_offsets[-1]),
            "tgt_tokens": int(tgt_offsets[-1]),
        }

    output_vocab = None
    if config.subword.restrict_target:
        output_vocab = output_vocabulary(EncodedSplit.load(out / "train.npz")).tolist()
    save_config(config, out / "config.yaml")
    manifest = {
        "models": models,
        "vocab_size": {"src": subwords.src.get_piece_size(), "tgt": subwords.tgt.get_piece_size(),
                       "output": len(output_vocab) if output_vocab else subwords.tgt.get_piece_size()},
        "output_vocab": output_vocab,
        "splits": splits,
        "config": config_to_dict(config),
        "versions": versions(),
    }
    write_json(manifest_path, manifest)
    return manifest
