"""Files: atomic writes, strict reading of line-aligned text, and the experiment lock.

Every output nmt writes goes through `atomic_output`: it is written to a temporary file in the same
directory, flushed to disk, then renamed over the target. A crash (or kill -9) at any moment leaves
either the old file or the new one, never half of one, so a later stage never mistakes a partial
output for a complete one.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from nmt.errors import NmtError

# mkstemp creates files readable by the owner only; outputs should get the usual permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file for writing; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        binary = "b" in mode
        with os.fdopen(fd, mode, **({} if binary else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as f:
        f.write(text)


def write_lines(path: str | Path, lines: list[str]) -> None:
    with atomic_output(path) as f:
        for line in lines:
            f.write(line + "\n")


def open_text_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(path: str | Path, skip_bad: bool = False) -> list[str | None]:
    """Read a UTF-8 text file (optionally .gz) as lines without their newline.

    Invalid UTF-8 and NUL bytes are errors that name the file and the line; with skip_bad such a
    line becomes None instead, for the caller to drop and count.
    """
    path = Path(path)
    if not path.is_file():
        raise NmtError(f"{path}: file not found")
    lines: list[str | None] = []
    try:
        with open_text_bytes(path) as f:
            for number, raw in enumerate(f, start=1):
                problem = None
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if "\x00" in line:
                        problem = "NUL byte in text"
                except UnicodeDecodeError as err:
                    problem = f"invalid UTF-8 ({err.reason} at byte {err.start})"
                if problem is not None:
                    if not skip_bad:
                        raise NmtError(f"{path}:{number}: {problem} (data.bad_lines: skip drops such lines)")
                    line = None
                lines.append(line)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise NmtError(f"{path}: cannot read: {err}") from None
    return lines


def read_aligned(src_path: Path, tgt_path: Path, skip_bad: bool = False) -> tuple[list[str], list[str], int]:
    """Both sides of a parallel corpus and the number of pairs dropped for bad text (skip_bad).
    Differing line counts are an error, never truncated."""
    src, tgt = read_lines(src_path, skip_bad), read_lines(tgt_path, skip_bad)
    if len(src) != len(tgt):
        raise NmtError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
            "the two sides of a corpus must be aligned line by line"
        )
    pairs = [(s, t) for s, t in zip(src, tgt) if s is not None and t is not None]
    return [s for s, _ in pairs], [t for _, t in pairs], len(src) - len(pairs)


@contextlib.contextmanager
def exclusive_lock(path: Path, log=print):
    """One owner at a time (one `nmt train` per experiment): a lock file holding the owner's pid,
    removed on exit. A lock whose process is gone (killed, machine rebooted) is stale and taken
    over, with a line through `log`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner > 0 and _alive(owner):
                raise NmtError(f"{path}: another `nmt train` (pid {owner}) is training this "
                               "experiment; wait for it or stop it first") from None
            log(f"removing stale lock {path} (pid {owner} is not running)")
            path.unlink(missing_ok=True)
    else:  # pragma: no cover - lost a race twice
        raise NmtError(f"{path}: could not take the training lock")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def versions() -> dict:
    """Versions of everything that changes a result, recorded in every output."""
    found = {"python": platform.python_version()}
    for package in ("nmt", "torch", "sentencepiece", "sacrebleu", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
