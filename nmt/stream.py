"""nmt translate at its edges: the input read as it arrives, the output written atomically, and the
loop between them that streams lines through a Translator in order."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from nmt.align import hard_alignment
from nmt.errors import NmtError
from nmt.io import atomic_output, remove_stale_temps
from nmt.results import Translation
from nmt.translate import Translator, checkpoint_of

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
