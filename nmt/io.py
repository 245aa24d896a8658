"""Files: safe writes, strict reading of line-aligned text and JSON, and the experiment lock.

Every output nmt writes goes through `atomic_output`. A regular file (or a new path) is written to
a temporary file in the same directory, flushed to disk, then renamed over the target: a crash (or
kill -9) at any moment leaves either the old file or the new one, never half of one, so a later
stage never mistakes a partial output for a complete one. A symlink is followed: its target is
replaced and the link stays a link. Anything else that exists (/dev/null, a FIFO, a socket), and
a file already open (/dev/stdout), is written through, never renamed over: replacing it would
destroy the device, starve the FIFO's reader or cut the shell's `>> log` short.

Temporary files are named `.<name>.<pid>.<random>.tmp`, so one left behind by a kill -9 names the
process that wrote it and `remove_stale_temps` can tell it from the file of a writer still running.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import platform
import re
import stat
import zlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from nmt.errors import NmtError

_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[1-9][0-9]{0,9})\.[0-9a-f]{8}\.tmp")
_MAX_PID = 2**31 - 1
_NAME_BYTES = 200  # of the target's name kept in a temp file's name: the whole stays under 255


class OutputError(NmtError):
    """An output could not be written; `reason` is the system's word for why (its strerror)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot write ({reason})")
        self.path, self.reason = path, reason


class _RawOutput(io.FileIO):
    """The file under the buffers. It remembers the error of a failed write, so that an OSError
    raised by writing the output is told apart from one raised by the caller's own code (reading
    its input, say), which must not be reported as a failure to write the output."""

    error: OSError | None = None

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as err:
            self.error = err
            raise


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator:
    """Open `path` for writing ("w": UTF-8 text with "\\n" newlines, "wb": bytes). A regular file
    or a new path is replaced atomically when the block ends without an error; a symlink is
    followed; a device, FIFO or socket is written through. An OSError while writing becomes an
    OutputError naming `path`, and no temporary file is left behind, whatever ends the block."""
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_output writes with mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    try:  # what the path leads to, through symlinks (/dev/stdout too, which realpath cannot follow)
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    except OSError as err:
        raise OutputError(path, err.strerror or str(err)) from None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise NmtError(f"{path}: is a directory, not a file")
    replace = (existing is None or stat.S_ISREG(existing.st_mode)) and not _open_file_link(path)

    tmp: Path | None = None
    raw: _RawOutput | None = None
    target = Path(os.path.realpath(path))  # the file a symlink (or a chain of them) names
    try:
        if replace:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise NmtError(f"{path}: cannot create its directory {target.parent} "
                               f"({err.strerror or err})") from None
            tmp, raw = _create_temp(target)
            if existing is not None:  # the replacement keeps the file's permissions
                os.fchmod(raw.fileno(), stat.S_IMODE(existing.st_mode))
        else:  # no O_TRUNC: through /dev/stdout that would empty the shell's `>> log`
            raw = _RawOutput(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC), "w")
        buffered = io.BufferedWriter(raw)
        f = buffered if "b" in mode else io.TextIOWrapper(buffered, encoding="utf-8", newline="\n")
    except OSError as err:
        _discard(None, raw, tmp)
        raise OutputError(path, err.strerror or str(err)) from None

    finished = False
    try:
        yield f
        finished = True  # from here on, every error is one of writing the output
        f.flush()
        if tmp is not None:
            os.fsync(raw.fileno())
        f.close()
        if tmp is not None:
            os.replace(tmp, target)
            _sync_directory(target.parent)
    except BaseException as err:
        ours = finished or err is raw.error  # before closing, which may fail to write again
        _discard(f, raw, tmp)
        # A FIFO's reader that has gone is a closed pipe, as for stdout: the CLI's own policy.
        if isinstance(err, OSError) and ours and not isinstance(err, BrokenPipeError):
            raise OutputError(path, err.strerror or str(err)) from None
        raise


def _open_file_link(path: Path) -> bool:
    """Whether `path` leads through /proc to a file already open (/dev/stdout, /dev/fd/1): written
    through, never replaced, or `-o /dev/stdout >> log` would replace the whole log."""
    for _ in range(40):  # the kernel's own limit on a chain of links
        if os.path.realpath(path.parent).startswith("/proc/"):
            return True
        if not path.is_symlink():
            return False
        path = path.parent / os.readlink(path)
    return False


def _create_temp(target: Path) -> tuple[Path, _RawOutput]:
    """A new temporary file next to `target`, named after it and after this process."""
    stem = _temp_stem(target.name)
    while True:
        tmp = target.parent / f".{stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:  # 0o666: the umask applies, so a new output gets the usual permissions
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits taken already
            continue
        return tmp, _RawOutput(fd, "w")


def _temp_stem(name: str) -> str:
    return os.fsdecode(os.fsencode(name)[:_NAME_BYTES])


def _discard(f, raw: _RawOutput | None, tmp: Path | None) -> None:
    """Close what was opened and remove the temporary file, keeping the error that got us here."""
    for stream in (f, raw):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _sync_directory(directory: Path) -> None:
    # The rename is on disk only once the directory is: without this a power cut could bring the
    # old file back after a later stage has read the new one.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the file itself is synced
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, name: str | None = None) -> int:
    """Remove our temporary files in `directory` (only those for the file `name`, if given) whose
    writer is no longer running (killed, or the machine rebooted); a writer still running keeps
    its file. Returns how many were removed."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    except OSError as err:
        raise NmtError(f"{directory}: cannot list ({err.strerror or err})") from None
    removed = 0
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or entry.is_dir(follow_symlinks=False) or (name is not None and match["name"] != _temp_stem(name)):
            continue
        pid = int(match["pid"])
        if pid > _MAX_PID or process_alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:  # removed by someone else meanwhile
            continue
        except OSError as err:
            raise NmtError(f"{entry.path}: cannot remove this stale temporary file "
                           f"({err.strerror or err})") from None
        removed += 1
    return removed


def start_stage(directory: Path, marker: str) -> Path:
    """Ready a stage's output directory: create it, remove the temporary files a killed run left
    there, and remove the stage's completion marker (returned), which the stage writes last: an
    interrupted run is then never taken for a finished one, by make or by the next stage."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NmtError(f"{directory}: cannot create directory ({err.strerror or err})") from None
    remove_stale_temps(directory)
    marker_path = directory / marker
    try:
        marker_path.unlink(missing_ok=True)
    except OSError as err:
        raise NmtError(f"{marker_path}: cannot remove ({err.strerror or err})") from None
    return marker_path


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as f:
        f.write(text)


def write_lines(path: str | Path, lines: list[str]) -> None:
    with atomic_output(path) as f:
        for line in lines:
            f.write(line + "\n")


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def open_text_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(path: str | Path, skip_bad: bool = False) -> list[str | None]:
    """Read a UTF-8 text file (optionally .gz) as lines without their newline.

    Invalid UTF-8 and NUL bytes are errors that name the file and the line; with skip_bad such a
    line becomes None instead, for the caller to drop and count. A missing, unreadable or damaged
    file (a gzip member that fails its CRC or its deflate stream) is one error naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise NmtError(f"{path}: is a directory, not a file")
    if not path.exists():
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
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        detail = str(err) or type(err).__name__
        raise NmtError(f"{path}: damaged gzip file after line {len(lines)} ({detail})") from None
    except OSError as err:
        raise NmtError(f"{path}: cannot read ({err.strerror or err})") from None
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


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from one of our own files (`what` says which, for the message): missing,
    unreadable, invalid JSON or not an object is one error naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NmtError(f"{path}: {what} not found") from None
    except OSError as err:
        raise NmtError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise NmtError(f"{path}: damaged {what} (invalid UTF-8 at byte {err.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise NmtError(f"{path}:{err.lineno}: damaged {what} (invalid JSON: {err.msg} at "
                       f"column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # nesting too deep, an integer too long
        raise NmtError(f"{path}: damaged {what} (invalid JSON: {err})") from None
    if not isinstance(value, dict):
        raise NmtError(f"{path}: damaged {what} (a JSON {type(value).__name__}, not an object)")
    return value


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
            if owner > 0 and process_alive(owner):
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


@contextlib.contextmanager
def waiting_lock(path: Path):
    """Wait for, then hold, an advisory lock on the file `path` (flock): processes on one machine
    take turns. The kernel releases the lock when its holder dies, so a kill never leaves it taken."""
    import fcntl  # Unix only, like the signals training relies on

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def versions() -> dict:
    """Versions of everything that changes a result, recorded in every output."""
    found = {"python": platform.python_version()}
    for package in ("nmt", "torch", "sentencepiece", "sacrebleu", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
