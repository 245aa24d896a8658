"""Translator: a checkpoint and its SentencePiece models → ordered, streamed translation."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm import tqdm

from nmt.align import hard_alignment, merge_attention, words_of
from nmt.checkpoint import find_checkpoint, load_checkpoint, load_state
from nmt.config import PRECISIONS, DecodeConfig, config_from_dict
from nmt.device import resolve_device, resolve_precision
from nmt.ensemble import Ensemble
from nmt.errors import NmtError
from nmt.io import atomic_output, remove_stale_temps
from nmt.model import Seq2Seq, build_model
from nmt.results import Candidate, Translation, WordAttention
from nmt.search import Hypothesis, search_corpus
from nmt.subword import OutputVocabulary


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
        src_seqs = self.src_spm.encode(lines)
        name, first = origin
        for i, seq in enumerate(src_seqs):
            if len(seq) > decode.max_src_len:
                print(f"nmt: warning: {name}:{first + i}: line of {len(seq)} subwords cut to "
                      f"{decode.max_src_len} (decode.max_src_len)", file=sys.stderr)
                src_seqs[i] = seq[: decode.max_src_len]
        return search_corpus(self.model, src_seqs, decode, self.precision.name, nbest)

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
        return [Translation(line, [Candidate(self.detokenize(hyp), hyp.score, hyp.log_prob,
                                             self.word_attention(line, hyp) if attention else None)
                                   for hyp in hyps[:nbest]])
                for line, hyps in zip(lines, self.search(lines, decode, nbest, origin))]


# -- nmt translate: the edges (input, output) and the streaming loop ------------------------------

PAUSE = 0.05  # seconds without new input after which the lines read so far are translated
BLOCK = 1 << 16  # bytes per read


def translate_stream(models: list[Path], input_path: Path | None, output_path: Path | None,
                     beam_size: int | None, batch_size: int | None, nbest: int = 1,
                     alignments: bool = False, device: str = "auto", precision: str | None = None) -> None:
    """Translate line by line, in input order, one output line per input line, with one model or
    an ensemble of several (`models`: checkpoints or experiment directories).

    What can go wrong without the model (options, -i, -o, an output that is a file the command
    reads) is reported before it loads. A chunk is translated when it is full or when the input
    pauses, so a program can write a line and wait for its translation."""
    if beam_size is not None and beam_size < 1:
        raise NmtError(f"--beam must be at least 1, got {beam_size}")
    if batch_size is not None and batch_size < 1:
        raise NmtError(f"--batch-size must be at least 1, got {batch_size}")
    if nbest < 1 or (beam_size is not None and nbest > beam_size):
        raise NmtError(f"--nbest must be between 1 and the beam size, got {nbest}")
    checkpoints = [checkpoint_of(Path(model)) for model in models]
    in_name = str(input_path) if input_path else "<stdin>"
    with contextlib.ExitStack() as stack:
        source = _open_input(input_path, stack)
        _refuse_same_file(output_path, source, in_name, checkpoints)
        _check_output(output_path)
        translator = Translator.from_paths(checkpoints, device, precision=precision)
        decode = dataclasses.replace(translator.decode, beam_size=beam_size or translator.decode.beam_size,
                                     batch_size=batch_size or translator.decode.batch_size)
        if nbest > decode.beam_size:
            raise NmtError(f"--nbest must be between 1 and the beam size ({decode.beam_size}), got {nbest}")
        chunk_size = decode.batch_size * 8  # enough to sort by length, small enough to stream
        # A progress bar only when stdout is free for it, i.e. when writing to a file.
        total = _count_lines(source, in_name) if output_path and _is_file(source) else None
        progress = tqdm(total=total, unit="sent", disable=output_path is None, file=sys.stderr)
        done = 0
        with _output(output_path) as sink, progress:
            for lines in _read_chunks(source, chunk_size, in_name):
                for translation in translator.results(lines, decode, nbest, alignments, (in_name, done + 1)):
                    sink.write(_format(translation, nbest, alignments) + "\n")
                sink.flush()
                done += len(lines)
                progress.update(len(lines))


def _open_input(path: Path | None, stack: contextlib.ExitStack) -> int:
    """The input's file descriptor: -i opened now, so that a missing, unreadable or directory path
    is reported before the model loads; else stdin's."""
    if path is None:
        try:
            fd = sys.stdin.fileno()
            os.fstat(fd)
        except (AttributeError, ValueError, OSError):  # started with stdin closed (`<&-`)
            raise NmtError("<stdin>: cannot read (stdin is closed)") from None
        return fd
    try:
        return stack.enter_context(open(path, "rb", buffering=0)).fileno()
    except OSError as err:
        raise NmtError(f"{path}: cannot read ({err.strerror or err})") from None


def _refuse_same_file(output_path: Path | None, source: int, in_name: str, checkpoints: list[Path]) -> None:
    """An output that is a file the command reads would destroy it (replaced) or feed on itself
    (appended to, `>> in.txt`); symlinks and hard links count, devices and FIFOs are not files."""
    try:
        out = os.stat(output_path) if output_path else os.fstat(sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):  # a new file, or no real stdout
        return
    if not stat.S_ISREG(out.st_mode):
        return
    read = [(f"the input {in_name}", os.fstat(source))]
    for checkpoint in checkpoints:
        with contextlib.suppress(OSError):  # a missing checkpoint is reported when it loads
            read.append((f"the checkpoint {checkpoint}", os.stat(checkpoint)))
    for what, st in read:
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            raise NmtError(f"{output_path or '<stdout>'} is the same file as {what}, which translate "
                           "reads: write the translation to another file")


def _check_output(path: Path | None) -> None:
    """Fail now, not after the model loads, when the output cannot be written: closed stdout, -o a
    directory, in a missing or read-only directory. atomic_output replaces a regular file (or
    creates one) in its directory, and writes through to anything else (a device, a FIFO)."""
    if path is None:
        if sys.stdout is None:  # started with stdout closed (`>&-`)
            raise NmtError("<stdout>: cannot write (stdout is closed)")
        return
    target = Path(os.path.realpath(path))  # atomic_output follows symlinks
    if target.is_dir():
        raise NmtError(f"{path}: cannot write ({os.strerror(errno.EISDIR)})")
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise NmtError(f"{path}: cannot write ({os.strerror(errno.EACCES)})")
        return
    try:  # the real test: a file without a name (O_TMPFILE), which not even kill -9 leaves behind
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as err:
        raise NmtError(f"{path}: cannot write in {target.parent} ({err.strerror or err})") from None
    remove_stale_temps(target.parent, target.name)  # a killed translate's half-written output


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator:
    """-o through atomic_output (which names the path in any write error), or stdout, where a
    failed write (`> /dev/full`) becomes one line too. The body's other OSErrors are NmtErrors
    already (_read_chunks), so an OSError here is one of writing."""
    if path is not None:
        with atomic_output(path) as sink:
            yield sink
        return
    try:
        yield sys.stdout
        sys.stdout.flush()
    except OSError as err:
        _silence_stdout()
        if isinstance(err, BrokenPipeError):  # the reader went away (`| head -1`): a quiet exit 0
            raise
        raise NmtError(f"<stdout>: cannot write ({err.strerror or err})") from None


def _silence_stdout() -> None:
    """Python flushes stdout again at exit, and whatever a failed write left in its buffers (that
    differs between versions) would fail again, with a second message and exit status 120. Point
    the descriptor at /dev/null, as Python's docs do for EPIPE (library/signal, "Note on SIGPIPE")."""
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stdout (in tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _is_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _count_lines(fd: int, name: str) -> int:
    """Lines as _read_chunks counts them (a last line without a newline too), read with pread so
    that the file position stays at the start."""
    count, offset, last = 0, 0, b"\n"
    try:
        while block := os.pread(fd, 1 << 20, offset):
            count, offset, last = count + block.count(b"\n"), offset + len(block), block[-1:]
    except OSError as err:
        raise NmtError(f"{name}: cannot read ({err.strerror or err})") from None
    return count + (last != b"\n")


def _read_chunks(fd: int, size: int, name: str) -> Iterator[list[str]]:
    """Decoded lines, at most `size` at a time: a chunk ends when it is full or when no more input
    arrives within PAUSE seconds. Reads raw bytes from the descriptor: a buffered reader would hold
    lines where select cannot see them. A last line without a newline counts; invalid UTF-8 or a
    NUL byte is an error naming the line."""
    lines: list[str] = []
    pending: list[bytes] = []  # the start of a line whose newline has not arrived
    number = 0  # lines read
    while True:
        if lines and not select.select([fd], [], [], PAUSE)[0]:
            yield lines
            lines = []
        try:
            block = os.read(fd, BLOCK)
        except BlockingIOError:  # a non-blocking descriptor (shared with a parent): wait for input
            if not lines:
                select.select([fd], [], [])
            continue
        except OSError as err:
            raise NmtError(f"{name}: cannot read ({err.strerror or err})") from None
        if not block:
            break
        *complete, rest = block.split(b"\n")
        for raw in complete:
            number += 1
            lines.append(_decode(b"".join([*pending, raw]) if pending else raw, name, number))
            pending = []
            if len(lines) == size:
                yield lines
                lines = []
        if b"\x00" in rest:  # binary input (`cat /dev/zero`) may never reach a newline: say so now
            raise NmtError(f"{name}:{number + 1}: NUL byte: this looks like binary, not text")
        if rest:
            pending.append(rest)
    if pending:
        lines.append(_decode(b"".join(pending), name, number + 1))
    if lines:
        yield lines


def _decode(raw: bytes, name: str, number: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NmtError(f"{name}:{number}: invalid UTF-8 ({err.reason} at byte {err.start})") from None
    if "\x00" in line:
        raise NmtError(f"{name}:{number}: NUL byte: this looks like binary, not text")
    return line.rstrip("\r")


def _format(translation: Translation, nbest: int, alignments: bool) -> str:
    """One output line: the translation; with --nbest K, K (translation, score) fields; with
    --alignments, each translation followed by its word alignment (src-tgt, 0-based)."""
    fields = []
    for candidate in translation.hypotheses[:nbest]:
        fields.append(candidate.text)
        if nbest > 1:
            fields.append(f"{candidate.score:.4f}")
        if alignments:
            attention = candidate.attention
            fields.append(hard_alignment(torch.tensor(attention.weights), attention.target_words)
                          if attention is not None and attention.target_words else "")
    return "\t".join(fields)
