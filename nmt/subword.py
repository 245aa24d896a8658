"""SentencePiece: train, encode every split once into id arrays, decode.

The SentencePiece model is the vocabulary: ids 0-3 are fixed (pad, unk, bos, eos) so that a model
checkpoint and its .model file always agree. Splits are stored as one flat int32 array plus offsets
per side (`<split>.npz`), which training loads in milliseconds and never touches text again;
except with subword regularization (subword.sampling_alpha), where `SplitSampler` segments the
training text anew for every epoch (nmt.regularization). With train.init_from the spm stage trains
no model: it takes the checkpoint's models and output vocabulary (nmt.finetune).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nmt.config import Config, SubwordConfig, config_to_dict, save_config
from nmt.errors import NmtError
from nmt.io import atomic_output, read_aligned, read_json, start_stage, versions, write_json
from nmt.regularization import Segmenter, possible_pieces

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_SPM_SEED = 2**32 - 1  # SentencePiece's seed is an unsigned 32-bit integer
SAMPLING_STREAM = 0x5EC7  # keeps the segmentation's random stream apart from the batches' (seed, epoch)

# What SentencePiece's trainer checks, by the words of its message ("INTERNAL: file(line) [the
# check] text"): the recipe key each check is about, and why in our words.
_TRAINER_CHECKS = (
    ("input_sentence_size", "subword.max_sentences",
     "SentencePiece samples more than 100 sentences (or all of them): use at least 101"),
    ("character_coverage()", "subword.character_coverage", "SentencePiece takes a coverage from 0.98 to 1"),
    ("sentences_.empty()", "data.train",
     "no sentence to train SentencePiece on: every line is empty or longer than 4192 bytes"),
    ("all_chars_count", "data.train", "no characters to train SentencePiece on"),
)


def train_sentencepiece(lines: list[str], path: Path, config: Config, threads: int = 2) -> None:
    sub, seed = config.subword, config.train.seed
    if not 0 <= seed <= MAX_SPM_SEED:
        raise NmtError(f"train.seed: SentencePiece takes a seed from 0 to {MAX_SPM_SEED}, got {seed}")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
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
    except (RuntimeError, ValueError) as err:
        raise _trainer_error(err, sub, path) from None
    with atomic_output(path, "wb") as f:
        f.write(model.getvalue())


def _trainer_error(err: Exception, sub, path: Path) -> NmtError:
    """SentencePiece's refusal to train, as one line naming the recipe key(s) it is about."""
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    parts = re.match(r"\w+: \S+\(\d+\) \[(?P<check>.*)\] ?(?P<reason>.*)$", first_line)
    check, reason = (parts["check"], parts["reason"].strip()) if parts else ("", first_line)
    needed = re.search(r"required_chars\. \d+ vs (\d+)", reason)
    if needed:
        return NmtError(
            f"subword.vocab_size: SentencePiece cannot train {path.name} with {sub.vocab_size} "
            f"pieces on this corpus: its characters and the 4 specials need at least "
            f"{needed[1]} (raise subword.vocab_size or lower subword.character_coverage)")
    for words, key, why in _TRAINER_CHECKS:
        if words in check:
            return NmtError(f"{key}: SentencePiece cannot train {path.name}: {why}")
    return NmtError(
        f"subword: SentencePiece cannot train {path.name} on this corpus with model_type "
        f"{sub.model_type}, vocab_size {sub.vocab_size}, character_coverage "
        f"{sub.character_coverage}: {reason or check}")


@dataclass
class Subwords:
    """The source and target SentencePiece models (the same file when joint)."""

    src: spm.SentencePieceProcessor
    tgt: spm.SentencePieceProcessor

    @classmethod
    def load(cls, src_model: Path, tgt_model: Path) -> Subwords:
        return cls(load_processor(src_model), load_processor(tgt_model))

    def encode_src(self, lines: list[str]) -> list[list[int]]:
        return encode_lines(self.src, lines)

    def encode_tgt(self, lines: list[str]) -> list[list[int]]:
        return encode_lines(self.tgt, lines)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode(ids)


# SentencePiece encodes a list on a pool of threads that it starts anew at every call: about half
# a millisecond, 100-200 times the cost of encoding one caption, which a server pays for every
# request. A corpus is worth the pool; a few lines are encoded one by one.
POOL_FROM_LINES = 1000


def encode_lines(processor: spm.SentencePieceProcessor, lines: list[str]) -> list[list[int]]:
    """The lines as SentencePiece ids."""
    if len(lines) >= POOL_FROM_LINES:
        return processor.encode(lines)
    return [processor.encode(line) for line in lines]


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
    def load(cls, path: Path, vocab_size: dict | None = None) -> EncodedSplit:
        """A split written by `save`. Anything damaged (a truncated or altered file, a missing
        array, arrays that do not make a split, ids outside `vocab_size` {"src", "tgt"} when
        given) is one error naming the file, before any of it is used."""
        path = Path(path)
        if not path.is_file():
            raise NmtError(f"{path}: encoded split not found; run `nmt spm` first")
        try:
            f = open(path, "rb")
        except OSError as err:
            raise NmtError(f"{path}: cannot read ({err.strerror or err})") from None
        with f:
            try:  # a damaged zip or .npy header fails numpy in many ways: all are caught below
                archive = np.load(f)  # never a pickle: allow_pickle is off
                if not isinstance(archive, np.lib.npyio.NpzFile):
                    problem = "not an .npz archive"
                else:
                    with archive:
                        missing = [name for name in _SPLIT_ARRAYS if name not in archive.files]
                        loaded = {name: archive[name] for name in _SPLIT_ARRAYS if name not in missing}
                    problem = (f"no array {', '.join(missing)}" if missing
                               else _split_problem(loaded, vocab_size))
            except Exception as err:
                text = str(err).strip()
                problem = text.splitlines()[0][:200] if text else type(err).__name__
        if problem is not None:
            raise NmtError(f"{path}: damaged encoded split ({problem}); rerun `nmt spm`")
        return cls(**{name: loaded[name].astype(np.int64 if name.endswith("offsets") else np.int32,
                                                copy=False) for name in _SPLIT_ARRAYS})


_SPLIT_ARRAYS = ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets")


def _split_problem(arrays: dict, vocab_size: dict | None) -> str | None:
    """What keeps these arrays from being a split, or None: each side's offsets start at 0, never
    decrease and end at its number of ids, both sides have as many sentences, ids are in range."""
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            return f"{name} is not a flat integer array"
    for side in ("src", "tgt"):
        ids, offsets = arrays[f"{side}_ids"], arrays[f"{side}_offsets"]
        if len(offsets) == 0 or offsets[0] != 0 or (offsets[1:] < offsets[:-1]).any():
            return f"{side}_offsets do not start at 0 and rise"
        if offsets[-1] != len(ids):
            return f"{side}_offsets end at {offsets[-1]} but {side}_ids holds {len(ids)} ids"
        limit = vocab_size[side] if vocab_size is not None else 2**31
        if len(ids) and (ids.min() < 0 or ids.max() >= limit):
            return f"{side}_ids outside 0..{limit - 1}"
    if len(arrays["src_offsets"]) != len(arrays["tgt_offsets"]):
        return (f"{len(arrays['src_offsets']) - 1} source sentences but "
                f"{len(arrays['tgt_offsets']) - 1} target sentences")
    return None


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
        """From a manifest or checkpoint payload (its `vocab_size` and `output_vocab`); one that
        does not describe an output vocabulary is an error naming `source` and the key."""
        sizes = record.get("vocab_size")
        spm_size = sizes.get("tgt") if isinstance(sizes, dict) else None
        if not _is_int(spm_size) or spm_size <= EOS_ID:
            raise NmtError(f"{source}: vocab_size.tgt is {spm_size!r}, not a vocabulary size")
        pieces = record.get("output_vocab")
        if pieces is not None:
            if not isinstance(pieces, list) or not all(_is_int(i) for i in pieces):
                raise NmtError(f"{source}: output_vocab is not a list of SentencePiece ids")
            pieces = tuple(pieces)
            # As output_vocabulary() makes it: the specials first, ids rising, all in the model.
            if (pieces[: EOS_ID + 1] != tuple(range(EOS_ID + 1)) or pieces[-1] >= spm_size
                    or any(a >= b for a, b in zip(pieces, pieces[1:]))):
                raise NmtError(f"{source}: output_vocab is not a rising list of ids of the target "
                               "SentencePiece model, specials first")
        vocab = cls(spm_size, pieces)
        if sizes.get("output", vocab.size) != vocab.size:
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SplitSampler:
    """Subword regularization: the training split segmented anew for every epoch, from the raw
    text of the data stage and the spm stage's models, targets in output ids. The same train.seed
    and epoch always give the same split, so a resumed run re-derives its epoch exactly."""

    def __init__(self, data_dir: Path, subwords: Subwords, vocab: OutputVocabulary, model_type: str,
                 sub: SubwordConfig, encoded: EncodedSplit):
        """`encoded`: train.npz as the spm stage wrote it (SentencePiece ids), which unsampled
        segmentations must reproduce, line for line."""
        lines = read_aligned(data_dir / "train.src", data_dir / "train.tgt")[:2]
        if len(lines[0]) != len(encoded):
            raise NmtError(f"{data_dir / 'train.src'}: {len(lines[0])} pairs, but the spm stage encoded "
                           f"{len(encoded)}: rerun `nmt spm`")
        self.vocab, self.sides = vocab, []
        for side, text, processor in zip(("src", "tgt"), lines, (subwords.src, subwords.tgt)):
            segmenter = Segmenter(text, processor, model_type, sub.sampling_alpha, sub.sampling_nbest)
            line = segmenter.first_difference(getattr(encoded, f"{side}_ids"), getattr(encoded, f"{side}_offsets"))
            if line is not None:
                raise NmtError(f"{data_dir / f'train.{side}'}:{line + 1}: nmt's sampler, unsampled, segments "
                               "this line otherwise than SentencePiece: subword.sampling_alpha cannot be "
                               "used with this SentencePiece model")
            self.sides.append(segmenter)

    def sample(self, seed: int, epoch: int) -> EncodedSplit:
        rng = np.random.default_rng([seed, epoch, SAMPLING_STREAM])
        (src_ids, src_offsets), (tgt_ids, tgt_offsets) = (side.sample(rng) for side in self.sides)
        return EncodedSplit(src_ids, src_offsets, self.vocab.to_output(tgt_ids), tgt_offsets)

    @classmethod
    def for_training(cls, config: Config, exp_dir: Path, manifest: dict, subwords: Subwords,
                     vocab: OutputVocabulary, encoded: EncodedSplit) -> SplitSampler | None:
        """The sampler when subword.sampling_alpha is on (else None), refused when the spm stage
        made an output vocabulary that sampled targets would fall out of (a checkpoint's, with
        train.init_from, is the model's own: what it lacks trains as unk)."""
        if config.subword.sampling_alpha == 0:
            return None
        if vocab.pieces is not None and not manifest.get("output_vocab_sampled") and not manifest.get("init_from"):
            raise NmtError(f"{exp_dir / 'spm' / 'manifest.json'}: the output vocabulary holds only the pieces "
                           "of the unsampled training targets: rerun `nmt spm` with subword.sampling_alpha "
                           "set, so that it holds every piece a sampled target can")
        return cls(exp_dir / "data", subwords, vocab, manifest.get("model_type", config.subword.model_type),
                   config.subword, encoded)


def load_manifest(spm_dir: Path, recipe: str) -> dict:
    """spm/manifest.json with what training reads from it checked (the SentencePiece model files,
    the vocabulary sizes, the output vocabulary, the splits): missing or damaged is one error
    naming the file."""
    path = Path(spm_dir) / "manifest.json"
    if not path.is_file():
        raise NmtError(f"{path} not found: run `nmt spm {recipe}` first")
    try:
        manifest = read_json(path, "spm manifest")
        models, sizes = manifest.get("models"), manifest.get("vocab_size")
        if not isinstance(models, dict) or not isinstance(sizes, dict):
            raise NmtError(f"{path}: damaged spm manifest (no 'models' or no 'vocab_size')")
        for side in ("src", "tgt"):
            name = models.get(side)
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise NmtError(f"{path}: damaged spm manifest (models.{side} is not a file name)")
            if not _is_int(sizes.get(side)) or sizes[side] <= EOS_ID:
                raise NmtError(f"{path}: damaged spm manifest (vocab_size.{side} is not a size)")
        OutputVocabulary.of(manifest, path)
        if not isinstance(manifest.get("splits"), dict):
            raise NmtError(f"{path}: damaged spm manifest (no 'splits')")
    except NmtError as err:
        raise NmtError(f"{err}; rerun `nmt spm {recipe}`") from None
    return manifest


def run_spm_stage(config: Config, exp_dir: Path) -> dict:
    """Train SentencePiece on the cleaned training split (or take train.init_from's models) and
    encode every split."""
    data_dir, out = exp_dir / "data", exp_dir / "spm"
    if not (data_dir / "stats.json").is_file():
        raise NmtError(f"{data_dir}/stats.json not found: run `nmt data {config.name}` first")
    init = None
    if config.train.init_from:  # refused (e.g. another architecture) before the stage starts
        from nmt.finetune import load_init  # reads a checkpoint: torch, which only this needs

        init = load_init(config)
    manifest_path = start_stage(out, "manifest.json")  # complete only once this is rewritten
    threads = max(1, config.train.threads or 2)

    train_src, train_tgt, _ = read_aligned(data_dir / "train.src", data_dir / "train.tgt")
    init_from, model_type = None, config.subword.model_type
    if init is not None:
        models, output_vocab, model_type, init_from = _take_checkpoint_subwords(*init, out)
    elif config.subword.joint:
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
        src_lines, tgt_lines, _ = read_aligned(data_dir / f"{name}.src", data_dir / f"{name}.tgt")
        src_ids, src_offsets = pack(subwords.encode_src(src_lines))
        tgt_ids, tgt_offsets = pack(subwords.encode_tgt(tgt_lines))
        EncodedSplit(src_ids, src_offsets, tgt_ids, tgt_offsets).save(out / f"{name}.npz")
        splits[name] = {
            "pairs": len(src_lines),
            "src_tokens": int(src_offsets[-1]),
            "tgt_tokens": int(tgt_offsets[-1]),
        }

    train = EncodedSplit.load(out / "train.npz")
    sampling = config.subword.sampling_alpha > 0
    if init_from is None:
        output_vocab = None
        if config.subword.restrict_target:
            pieces = output_vocabulary(train)
            if sampling:  # and every piece that a sampled segmentation of the targets can hold
                pieces = np.union1d(pieces, possible_pieces(train_tgt, subwords.tgt))
            output_vocab = pieces.tolist()
    save_config(config, out / "config.yaml")
    manifest = {
        "models": models,
        "model_type": model_type,
        "vocab_size": {"src": subwords.src.get_piece_size(), "tgt": subwords.tgt.get_piece_size(),
                       "output": len(output_vocab) if output_vocab else subwords.tgt.get_piece_size()},
        "output_vocab": output_vocab,
        # the output vocabulary holds every piece of sampled training targets (subword.sampling_alpha)
        "output_vocab_sampled": init_from is None and sampling,
        "init_from": init_from,
        # target pieces of the training split that train as unk (a checkpoint's vocabulary may lack them)
        "unk_targets": int((~np.isin(train.tgt_ids, output_vocab)).sum()) if output_vocab else 0,
        "splits": splits,
        "config": config_to_dict(config),
        "versions": versions(),
    }
    write_json(manifest_path, manifest)
    return manifest


def _take_checkpoint_subwords(checkpoint: Path, payload: dict, out: Path) -> tuple[dict, list | None, str, dict]:
    """train.init_from: the checkpoint's SentencePiece models written into `out`, and its output
    vocabulary, model type and record (path, step), so that the run's vocabularies are its own."""
    from nmt.finetune import init_record

    models = ({"src": "joint.model", "tgt": "joint.model"} if payload["spm"]["src"] == payload["spm"]["tgt"]
              else {"src": "src.model", "tgt": "tgt.model"})
    for side, name in models.items():
        with atomic_output(out / name, "wb") as f:
            f.write(payload["spm"][side])
    vocab = OutputVocabulary.of(payload, checkpoint)
    subword = payload["config"].get("subword")
    model_type = subword.get("model_type", "unigram") if isinstance(subword, dict) else "unigram"
    return models, vocab.record(), model_type, init_record(checkpoint, payload)
