"""Translator: a checkpoint (or an ensemble) and its SentencePiece models → translations, in order.
nmt.stream streams files and stdin through it (`nmt translate`)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from nmt.align import merge_attention, words_of
from nmt.checkpoint import find_checkpoint, load_checkpoint, load_state
from nmt.config import PRECISIONS, DecodeConfig, config_from_dict
from nmt.device import resolve_device, resolve_precision
from nmt.ensemble import Ensemble
from nmt.errors import NmtError
from nmt.model import Seq2Seq, build_model
from nmt.results import Candidate, Translation, WordAttention
from nmt.search import Hypothesis, search_corpus
from nmt.subword import OutputVocabulary, encode_lines


def checkpoint_of(path: Path) -> Path:
    """The checkpoint a --model names: the file itself, or an experiment's (find_checkpoint)."""
    return find_checkpoint(path) if path.is_dir() else path


def processor_from_bytes(blob: bytes, path: Path) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(blob)
    except (RuntimeError, TypeError) as err:
        raise NmtError(f"{path}: its SentencePiece model is corrupt ({err})") from None
    return processor


class Translator:
    """Owns a model in eval mode, or an ensemble of several (nmt.ensemble), and the SentencePiece
    models they were trained with.

    The models of an ensemble must share their SentencePiece models and output vocabulary; they
    may differ in architecture. The first model's recipe and decode settings are used. `device`
    follows resolve_device (`auto`: a GPU if there is one). `decode` replaces the checkpoint's
    decode settings (a recipe's, for `nmt evaluate`), and `precision` their precision
    (`nmt translate --precision`). `payloads` are the checkpoints' at `paths`, in order; from an
    iterator they are loaded one at a time (a checkpoint carries the optimizer's state too, so
    four of them at once would need several times the memory of the models).

    From Python: `Translator.load(model)`, then `translations(lines, beam, nbest, attention)`."""

    def __init__(self, paths: list[Path], payloads: Iterable[dict], device: str = "auto",
                 decode: DecodeConfig | None = None, precision: str | None = None, log=None):
        self.paths = [Path(p) for p in paths]
        self.path = self.paths[0]
        payloads = iter(payloads)
        first = next(payloads)
        self.config = config_from_dict(first["config"], source=str(self.path))
        self.decode = decode or self.config.decode
        self.device = resolve_device(device)
        key = "--precision" if precision is not None else "decode.precision"
        self.precision = resolve_precision(precision or self.decode.precision, self.device, key, log)
        self.src_spm = processor_from_bytes(first["spm"]["src"], self.path)
        self.tgt_spm = processor_from_bytes(first["spm"]["tgt"], self.path)
        self.vocab = OutputVocabulary.of(first, self.path)
        spm_models = first["spm"]
        self.steps: list[int | None] = []
        self.averaged_from: list[list | None] = []  # per model: what nmt average made it from
        members = [self._member(first, self.path, spm_models)]
        del first
        members += [self._member(payload, path, spm_models) for path, payload in zip(self.paths[1:], payloads)]
        self.step = self.steps[0]
        self.model = members[0] if len(members) == 1 else Ensemble(members)
        self.model.to(self.device).eval()

    def _member(self, payload: dict, path: Path, spm_models: dict) -> Seq2Seq:
        """The model of one checkpoint, refused unless it shares the first one's SentencePiece
        models (`spm_models`, compared as bytes) and output vocabulary."""
        differs = [what for what, same in (
            ("source SentencePiece model", payload["spm"]["src"] == spm_models["src"]),
            ("target SentencePiece model", payload["spm"]["tgt"] == spm_models["tgt"]),
            ("output vocabulary", OutputVocabulary.of(payload, path) == self.vocab)) if not same]
        if differs:
            raise NmtError(f"{self.path} and {path}: different {' and '.join(differs)}; the models "
                           "of an ensemble must share them")
        vocab = payload["vocab_size"]
        if (self.src_spm.get_piece_size(), self.tgt_spm.get_piece_size()) != (vocab["src"], vocab["tgt"]):
            raise NmtError(f"{path}: SentencePiece models do not match the model's vocabulary")
        config = config_from_dict(payload["config"], source=str(path))
        model = build_model(config.model, vocab["src"], self.vocab.size)
        load_state(model, payload["model"], path)
        self.steps.append(payload.get("progress", {}).get("step"))
        self.averaged_from.append(payload.get("averaged_from"))
        return model

    @classmethod
    def from_path(cls, path: Path, device: str = "auto", decode: DecodeConfig | None = None,
                  precision: str | None = None, log=None) -> Translator:
        return cls.from_paths([path], device, decode, precision, log)

    @classmethod
    def from_paths(cls, paths: list[Path], device: str = "auto", decode: DecodeConfig | None = None,
                   precision: str | None = None, log=None) -> Translator:
        """One model, or an ensemble of several: checkpoints or experiment directories."""
        paths = [checkpoint_of(Path(path)) for path in paths]
        return cls(paths, (load_checkpoint(path) for path in paths), device, decode, precision, log)

    def checkpoint_record(self) -> dict:
        """What an output records of the checkpoints that produced it: `checkpoint` and
        `checkpoint_step`, one value each for one model, lists for an ensemble."""
        averaged = {}
        if any(self.averaged_from):
            averaged = {"averaged_from": self.averaged_from[0] if len(self.paths) == 1 else self.averaged_from}
        if len(self.paths) == 1:
            return {"checkpoint": str(self.path), "checkpoint_step": self.step, **averaged}
        return {"checkpoint": [str(path) for path in self.paths], "checkpoint_step": list(self.steps), **averaged}

    def search(self, lines: list[str], decode: DecodeConfig | None = None, nbest: int = 1,
               origin: tuple[str, int] = ("input", 1)) -> list[list[Hypothesis]]:
        """The `nbest` best hypotheses of each line, with `decode` (default: self.decode). A line
        over decode.max_src_len subwords is cut to them, with a warning naming it by `origin`:
        the name of the input and the number of lines[0] in it."""
        decode = decode or self.decode
        return search_corpus(self.model, self.encode(lines, decode, origin), decode, self.precision.name, nbest)

    def encode(self, lines: list[str], decode: DecodeConfig, origin: tuple[str, int] = ("input", 1)) -> list[list[int]]:
        """The lines as source SentencePiece ids, cut to decode.max_src_len (see search())."""
        src_seqs = encode_lines(self.src_spm, lines)
        name, first = origin
        for i, seq in enumerate(src_seqs):
            if len(seq) > decode.max_src_len:
                print(f"nmt: warning: {name}:{first + i}: line of {len(seq)} subwords cut to "
                      f"{decode.max_src_len} (decode.max_src_len)", file=sys.stderr)
                src_seqs[i] = seq[: decode.max_src_len]
        return src_seqs

    def translate(self, lines: list[str], decode: DecodeConfig | None = None,
                  origin: tuple[str, int] = ("input", 1)) -> list[str]:
        return [self.detokenize(h[0]) for h in self.search(lines, decode, origin=origin)]

    def target_ids(self, hyp: Hypothesis) -> list[int]:
        """The hypothesis as SentencePiece ids."""
        return self.vocab.to_spm(hyp.tokens)

    def target_pieces(self, hyp: Hypothesis) -> list[str]:
        return [self.tgt_spm.id_to_piece(t) for t in self.target_ids(hyp)]

    def detokenize(self, hyp: Hypothesis) -> str:
        return self.tgt_spm.decode(self.target_ids(hyp))

    def word_attention(self, source: str, hyp: Hypothesis) -> WordAttention | None:
        """The hypothesis' attention merged from pieces into words, the EOS row left out (None
        without attention)."""
        if hyp.attention is None:
            return None
        # a line over decode.max_src_len pieces was searched cut to them
        src_pieces = self.src_spm.encode(source, out_type=str)[: hyp.attention.size(1)]
        tgt_pieces = self.target_pieces(hyp)
        if not tgt_pieces:
            return WordAttention(words_of(src_pieces), [], [])
        merged = merge_attention(hyp.attention[:-1], src_pieces, tgt_pieces)  # (tgt words, src words)
        return WordAttention(words_of(src_pieces), words_of(tgt_pieces), merged.tolist())

    # -- the Python API: Translator.load(...).translations(...) ---------------------------------

    @classmethod
    def load(cls, model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], device: str = "auto",
             precision: str | None = None, log: Callable[[str], None] | None = None) -> Translator:
        """A model to translate with: an experiment directory (its model/best.pt) or a checkpoint
        file, or a list of them for an ensemble. `device` and `precision` as `nmt translate` takes
        them: auto | cpu | cuda | cuda:N, and auto | fp32 | bf16 (None: the checkpoint's
        decode.precision). `log` receives the line saying which precision runs (default: stderr)."""
        paths = [model] if isinstance(model, (str, os.PathLike)) else list(model)
        if not paths:
            raise NmtError("no model given: name an experiment directory or a checkpoint")
        if precision is not None and precision not in PRECISIONS:
            raise NmtError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        return cls.from_paths([Path(path) for path in paths], device, precision=precision, log=log)

    def settings(self, beam: int | None = None, nbest: int = 1, batch_size: int | None = None) -> DecodeConfig:
        """The decode settings with another beam size or batch size (None: the checkpoint's), and
        `nbest` checked against the beam."""
        for name, value in (("beam", beam), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise NmtError(f"{name} must be at least 1, got {value}")
        decode = dataclasses.replace(self.decode, beam_size=beam or self.decode.beam_size,
                                     batch_size=batch_size or self.decode.batch_size)
        if not 1 <= nbest <= decode.beam_size:
            raise NmtError(f"nbest must be between 1 and the beam size ({decode.beam_size}), got {nbest}")
        return decode

    def translations(self, lines: Sequence[str], beam: int | None = None, nbest: int = 1,
                     attention: bool = False, batch_size: int | None = None) -> list[Translation]:
        """Each line's `nbest` best translations with their scores and, with `attention`, their
        word attention: what `nmt translate --beam B --nbest K` prints, as records."""
        if isinstance(lines, str):  # a string is a sequence too: of one-character lines
            raise NmtError("translations() takes a list of sentences: for one, give [sentence]")
        return self.results(list(lines), self.settings(beam, nbest, batch_size), nbest, attention)

    def results(self, lines: list[str], decode: DecodeConfig, nbest: int = 1, attention: bool = False,
                origin: tuple[str, int] = ("input", 1)) -> list[Translation]:
        """translations() with the decode settings whole; `origin` as for search()."""
        return [self.translation(line, hyps, nbest, attention)
                for line, hyps in zip(lines, self.search(lines, decode, nbest, origin))]

    def translation(self, line: str, hyps: list[Hypothesis], nbest: int = 1, attention: bool = False) -> Translation:
        """The record of one line's search: its `nbest` best hypotheses (hyps are best first)."""
        return Translation(line, [Candidate(self.detokenize(hyp), hyp.score, hyp.log_prob,
                                            self.word_attention(line, hyp) if attention else None)
                                  for hyp in hyps[:nbest]])
