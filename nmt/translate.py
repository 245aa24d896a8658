"""Translator: a checkpoint and its SentencePiece models → ordered, streamed translation."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from nmt.align import hard_alignment, merge_attention, words_of
from nmt.checkpoint import find_checkpoint, load_checkpoint, load_state
from nmt.config import DecodeConfig, config_from_dict
from nmt.device import resolve_device, resolve_precision
from nmt.errors import NmtError
from nmt.io import atomic_output
from nmt.model import build_model
from nmt.search import Hypothesis, search_corpus
from nmt.subword import OutputVocabulary


def processor_from_bytes(blob: bytes, path: Path) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(blob)
    except (RuntimeError, TypeError) as err:
        raise NmtError(f"{path}: its SentencePiece model is corrupt ({err})") from None
    return processor


class Translator:
    """Owns a model in eval mode and the SentencePiece models it was trained with.

    `device` follows resolve_device (`auto`: a GPU if there is one). `decode` replaces the
    checkpoint's decode settings (a recipe's, for `nmt evaluate`), and `precision` their precision
    (`nmt translate --precision`)."""

    def __init__(self, payload: dict, path: Path, device: str = "auto", decode: DecodeConfig | None = None,
                 precision: str | None = None, log=None):
        self.path = path
        self.config = config_from_dict(payload["config"], source=str(path))
        self.decode = decode or self.config.decode
        self.step = payload.get("progress", {}).get("step")
        self.device = resolve_device(device)
        key = "--precision" if precision is not None else "decode.precision"
        self.precision = resolve_precision(precision or self.decode.precision, self.device, key, log)
        self.src_spm = processor_from_bytes(payload["spm"]["src"], path)
        self.tgt_spm = processor_from_bytes(payload["spm"]["tgt"], path)
        vocab = payload["vocab_size"]
        if (self.src_spm.get_piece_size(), self.tgt_spm.get_piece_size()) != (vocab["src"], vocab["tgt"]):
            raise NmtError(f"{path}: SentencePiece models do not match the model's vocabulary")
        self.vocab = OutputVocabulary.of(payload, path)
        self.model = build_model(self.config.model, vocab["src"], self.vocab.size)
        load_state(self.model, payload["model"], path)
        self.model.to(self.device).eval()

    @classmethod
    def from_path(cls, path: Path, device: str = "auto", decode: DecodeConfig | None = None,
                  precision: str | None = None, log=None) -> Translator:
        path = find_checkpoint(Path(path)) if Path(path).is_dir() else Path(path)
        return cls(load_checkpoint(path), path, device, decode, precision, log)

    def search(self, lines: list[str], decode: DecodeConfig | None = None, nbest: int = 1) -> list[list[Hypothesis]]:
        """The `nbest` best hypotheses of each line, with `decode` (default: self.decode)."""
        decode = decode or self.decode
        src_seqs = self.src_spm.encode(lines)
        for i, seq in enumerate(src_seqs):
            if len(seq) > decode.max_src_len:
                print(f"nmt: warning: input line of {len(seq)} subwords cut to {decode.max_src_len} "
                      "(decode.max_src_len)", file=sys.stderr)
                src_seqs[i] = seq[: decode.max_src_len]
        return search_corpus(self.model, src_seqs, decode, self.precision.name, nbest)

    def translate(self, lines: list[str], decode: DecodeConfig | None = None) -> list[str]:
        return [self.detokenize(h[0]) for h in self.search(lines, decode)]

    def target_ids(self, hyp: Hypothesis) -> list[int]:
        """The hypothesis as SentencePiece ids."""
        return self.vocab.to_spm(hyp.tokens)

    def target_pieces(self, hyp: Hypothesis) -> list[str]:
        return [self.tgt_spm.id_to_piece(t) for t in self.target_ids(hyp)]

    def detokenize(self, hyp: Hypothesis) -> str:
        return self.tgt_spm.decode(self.target_ids(hyp))

    def word_alignment(self, source: str, hyp: Hypothesis) -> str:
        """Hard word alignment from the hypothesis' attention ('' without attention or words)."""
        if hyp.attention is None or not hyp.tokens:
            return ""
        src_pieces = self.src_spm.encode(source, out_type=str)
        tgt_pieces = self.target_pieces(hyp)
        merged = merge_attention(hyp.attention[:-1], src_pieces, tgt_pieces)
        return hard_alignment(merged, words_of(tgt_pieces))


def _read_chunks(stream, size: int, name: str):
    """Yield lists of decoded lines, `size` at a time, naming the line of any invalid UTF-8."""
    chunk, number = [], 0
    for raw in stream:
        number += 1
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            raise NmtError(f"{name}:{number}: invalid UTF-8 ({err.reason} at byte {err.start})") from None
        if "\x00" in line:
            raise NmtError(f"{name}:{number}: NUL byte: this looks like binary, not text")
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def translate_stream(model: Path, input_path: Path | None, output_path: Path | None,
                     beam_size: int | None, batch_size: int | None, nbest: int = 1,
                     alignments: bool = False, device: str = "auto", precision: str | None = None) -> None:
    """Translate line by line; output starts after the first chunk, in input order."""
    if beam_size is not None and beam_size < 1:
        raise NmtError(f"--beam must be at least 1, got {beam_size}")
    if batch_size is not None and batch_size < 1:
        raise NmtError(f"--batch-size must be at least 1, got {batch_size}")
    translator = Translator.from_path(model, device, precision=precision)
    decode = dataclasses.replace(translator.decode, beam_size=beam_size or translator.decode.beam_size,
                                 batch_size=batch_size or translator.decode.batch_size)
    if nbest < 1 or nbest > decode.beam_size:
        raise NmtError(f"--nbest must be between 1 and the beam size, got {nbest}")
    chunk_size = decode.batch_size * 8  # enough to sort by length, small enough to stream
    source = open(input_path, "rb") if input_path else sys.stdin.buffer
    name = str(input_path) if input_path else "<stdin>"
    sink_context = atomic_output(output_path) if output_path else contextlib.nullcontext(sys.stdout)
    # A progress bar only when stdout is free for it, i.e. when writing to a file.
    total = _count_lines(input_path) if input_path and output_path else None
    progress = tqdm(total=total, unit="sent", disable=output_path is None, file=sys.stderr)
    with source, sink_context as sink, progress:
        for lines in _read_chunks(source, chunk_size, name):
            for line, hyps in zip(lines, translator.search(lines, decode, nbest)):
                sink.write(_format(translator, line, hyps, nbest, alignments) + "\n")
            sink.flush()
            progress.update(len(lines))


def _count_lines(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError as err:
        raise NmtError(f"{path}: cannot read ({err.strerror})") from None


def _format(translator: Translator, source: str, hyps: list[Hypothesis], nbest: int,
            alignments: bool) -> str:
    """One output line: the translation; with --nbest K, K (translation, score) fields; with
    --alignments, each translation followed by its word alignment (src-tgt, 0-based)."""
    fields = []
    for hyp in hyps[:nbest]:
        fields.append(translator.detokenize(hyp))
        if nbest > 1:
            fields.append(f"{hyp.score:.4f}")
        if alignments:
            fields.append(translator.word_alignment(source, hyp))
    return "\t".join(fields)
