"""`nmt translate` at its edges (issue 15): outputs that are files it reads, operating-system
errors on -i, -o and stdout, streaming from a pipe, and any bytes as input."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import os
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nmt.cli import main
from nmt.translate import Translator

from .conftest import ROOT
from .test_translate import NMT, run_nmt

ERROR = "nmt translate: error: "


def only_error(stderr: str | bytes) -> str:
    """The one error line; before it at most the "nmt: precision" line, when the model loaded, and
    the progress bar, when writing to -o."""
    lines = (stderr.decode() if isinstance(stderr, bytes) else stderr).rstrip("\n").split("\n")
    assert lines and lines[-1].startswith(ERROR), stderr
    assert all(line.startswith("nmt: precision ") or line.endswith("sent/s]") for line in lines[:-1]), stderr
    return lines[-1][len(ERROR):]


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A checkpoint that fails to load: an error about anything else was found before loading."""
    path = tmp_path / "fake.pt"
    path.write_text("not a checkpoint\n")
    return path


def translate_in_process(capsys, *args) -> tuple[int, str]:
    code = main(["translate", *map(str, args)])
    return code, capsys.readouterr().err


# -- outputs that are files translate reads ------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "checkpoint", "found checkpoint"])
def test_output_that_is_a_file_translate_reads_is_refused_untouched(tmp_path, fake_model, capsys, how):
    source = tmp_path / "in.de"
    source.write_bytes(b"Ein Hund.\n")
    model, read = fake_model, f"the input {source}"
    if how == "same path":
        output = source
    elif how in ("symlink", "hard link"):
        output = tmp_path / "out.en"
        output.symlink_to(source) if how == "symlink" else os.link(source, output)
    elif how == "checkpoint":
        output, read = fake_model, f"the checkpoint {fake_model}"
    else:  # the checkpoint that --model EXP_DIR stands for
        output = model = tmp_path / "exp" / "model" / "best.pt"
        model.parent.mkdir(parents=True)
        shutil.copy(fake_model, model)
        read = f"the checkpoint {model}"
        model = tmp_path / "exp"
    before, listing = output.read_bytes(), sorted(os.listdir(tmp_path))
    code, stderr = translate_in_process(capsys, "--model", model, "-i", source, "-o", output)
    assert code == 2 and only_error(stderr).startswith(f"{output} is the same file as {read}, ")
    assert output.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("redirect", ["stdout appends to -i", "-o is stdin's file",
                                      "stdout appends to the checkpoint"])
def test_redirections_onto_a_file_translate_reads_are_refused(tmp_path, fake_model, redirect):
    """`nmt translate -i f >> f` would read its own output for ever (cat refuses it too)."""
    source = tmp_path / "in.de"
    source.write_bytes(b"Ein Hund.\n")
    args = ["translate", "--model", str(fake_model)]
    target = fake_model if "checkpoint" in redirect else source
    before = target.read_bytes()
    with contextlib.ExitStack() as stack:
        stdin = stack.enter_context(open(source, "rb"))
        stdout = subprocess.DEVNULL
        if redirect == "-o is stdin's file":
            args += ["-o", str(source)]
        else:
            stdout = stack.enter_context(open(target, "ab"))
            if redirect == "stdout appends to -i":
                args += ["-i", str(source)]
        result = subprocess.run(NMT + args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT)
    assert result.returncode == 2 and "is the same file as" in only_error(result.stderr)
    assert target.read_bytes() == before


# -- operating-system errors on -i and -o, before the model loads ------------------------------


@pytest.mark.parametrize("kind", ["missing", "directory", "symlink to a directory"])
def test_input_that_cannot_be_read_is_named_before_loading(tmp_path, fake_model, capsys, kind):
    source = tmp_path / "in.de"
    if kind == "directory":
        source.mkdir()
    elif kind == "symlink to a directory":
        source.symlink_to(tmp_path)
    code, stderr = translate_in_process(capsys, "--model", fake_model, "-i", source)
    assert code == 2 and only_error(stderr).startswith(f"{source}: cannot read (")


def drop_file_capabilities() -> list[str]:
    """A command prefix under which root, too, is refused a mode-000 file."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root reads any file, and setpriv (to drop that capability) is not installed")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_unreadable_input_is_named_before_loading(tmp_path, fake_model):
    source = tmp_path / "in.de"
    source.write_text("Ein Hund.\n")
    source.chmod(0)
    result = subprocess.run(drop_file_capabilities() + NMT + ["translate", "--model", str(fake_model),
                                                              "-i", str(source)],
                            capture_output=True, cwd=ROOT)
    assert result.returncode == 2
    assert only_error(result.stderr) == f"{source}: cannot read (Permission denied)"


@pytest.mark.parametrize("kind", ["directory", "symlink to a directory", "in a missing directory",
                                  "under a file"])
def test_output_that_cannot_be_written_is_named_before_loading(tmp_path, fake_model, capsys, kind):
    (tmp_path / "in.de").write_text("Ein Hund.\n")
    output = {"directory": tmp_path, "symlink to a directory": tmp_path / "link",
              "in a missing directory": tmp_path / "missing" / "out.en",
              "under a file": tmp_path / "in.de" / "out.en"}[kind]
    if kind == "symlink to a directory":
        output.symlink_to(tmp_path)
    listing = sorted(os.listdir(tmp_path))
    code, stderr = translate_in_process(capsys, "--model", fake_model, "-i", tmp_path / "in.de", "-o", output)
    assert code == 2 and only_error(stderr).startswith(f"{output}: cannot write")
    assert sorted(os.listdir(tmp_path)) == listing  # no directory made, no temporary file left


def in_mount_namespace(setup: str, command: list[str], after: str = "", **kwargs) -> subprocess.CompletedProcess:
    """`setup` (shell mount commands), `command`, then `after` (a shell command), in a private mount
    namespace: the mounts vanish with it. stdout ends with "exit N" (the command's status) and
    what `after` printed. Skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a read-only or a full file system")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount here: {probe.stderr.decode().strip()}")
    script = f'{setup} && "$@"; echo "exit $?"; {after or "true"}'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *command],
                          capture_output=True, cwd=ROOT, **kwargs)


def test_output_in_a_read_only_directory_is_named_before_loading(tmp_path, fake_model):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "out.en"
    output.write_text("old\n")
    setup = f"mount --bind {out_dir} {out_dir} && mount -o remount,bind,ro {out_dir}"
    result = in_mount_namespace(setup, NMT + ["translate", "--model", str(fake_model), "-o", str(output)],
                                input=b"Ein Hund.\n")
    assert result.stdout.decode().splitlines() == ["exit 2"], result.stderr
    assert only_error(result.stderr) == f"{output}: cannot write in {out_dir} (Read-only file system)"


def test_output_on_a_full_file_system_keeps_the_old_file(trained_exp, tmp_path):
    """The disk is full when the translations are written: one line naming -o, the old output
    intact, no temporary file left."""
    _, exp = trained_exp
    out_dir = tmp_path / "full"
    out_dir.mkdir()
    output = out_dir / "out.en"
    setup = (f"mount -t tmpfs -o size=64k tmpfs {out_dir} && printf 'old\\n' > {output} && "
             f"{{ cat /dev/zero > {out_dir}/filler 2>/dev/null; true; }}")
    result = in_mount_namespace(setup, NMT + ["translate", "--model", str(exp), "--beam", "1", "-o", str(output)],
                                after=f"ls -A {out_dir}; cat {output}", input=b"Ein Hund rennt.\n" * 50)
    assert result.stdout.decode().splitlines() == ["exit 2", "filler", "out.en", "old"], result.stderr
    assert only_error(result.stderr) == f"{output}: cannot write (No space left on device)"


# -- stdout: a full device, a reader that goes away ----------------------------------------------


def test_stdout_on_a_full_device_is_one_line(trained_exp):
    _, exp = trained_exp
    with open("/dev/full", "wb") as full:
        result = subprocess.run(NMT + ["translate", "--model", str(exp), "--beam", "1"], input=b"Ein Hund.\n" * 3,
                                stdout=full, stderr=subprocess.PIPE, cwd=ROOT)
    # Nothing more either (no "Exception ignored" from Python's flush at exit).
    assert only_error(result.stderr) == "<stdout>: cannot write (No space left on device)"
    assert result.returncode == 2


def test_reader_that_goes_away_is_a_quiet_exit_0(trained_exp):
    """`nmt translate | head -1`: the rest of the output has nowhere to go, and that is fine."""
    _, exp = trained_exp
    process = subprocess.Popen(NMT + ["translate", "--model", str(exp), "--beam", "2", "--nbest", "2",
                                      "--batch-size", "4"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    # A one-page pipe: the output (3000 lines of at least two scores) cannot all be written before
    # we stop reading; the input (48 kB) fits in its pipe, so that writing it cannot block.
    fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    process.stdin.write(b"Ein Hund rennt.\n" * 3000)
    process.stdin.close()
    assert read_line(process.stdout.fileno(), 600)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=600) == 0, stderr
    assert all(line.startswith("nmt: precision ") for line in stderr.splitlines()), stderr


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--beam", "0"], ["--beam", "-2"], ["--batch-size", "0"],
                                  ["--batch-size", "-5"], ["--nbest", "0"], ["--nbest", "-1"],
                                  ["--beam", "2", "--nbest", "3"], ["--beam", "1", "--nbest", "2"]])
def test_bad_options_are_one_line_before_loading(fake_model, capsys, args):
    code, stderr = translate_in_process(capsys, "--model", fake_model, *args)
    assert code == 2 and only_error(stderr).startswith(args[-2])


def test_nbest_larger_than_the_checkpoints_beam_is_refused(trained_exp):
    config, exp = trained_exp
    nbest = config.decode.beam_size + 1
    result = run_nmt(["translate", "--model", str(exp), "--nbest", str(nbest)], b"Ein Hund.\n")
    assert result.returncode == 2
    assert only_error(result.stderr).startswith(f"--nbest must be between 1 and the beam size ({nbest - 1})")


# -- streaming -----------------------------------------------------------------------------------


def read_line(fd: int, timeout: float) -> bytes:
    """One line from a pipe, or b"" if none came within `timeout` seconds."""
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], timeout)[0]:
            return b""
        byte = os.read(fd, 1)
        if not byte:
            return line
        line += byte
    return line


def test_a_program_can_write_one_line_and_wait_for_its_translation(trained_exp):
    """One line in, its translation out while stdin stays open; then the next. The timeout only
    stops a deadlock from hanging the suite: it is far above what any machine needs."""
    _, exp = trained_exp
    process = subprocess.Popen(NMT + ["translate", "--model", str(exp)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    translator = cached_translator(exp)
    try:
        for line in ["Ein Hund rennt.", "Zwei Männer spielen Fußball."]:
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()
            translation = read_line(process.stdout.fileno(), 120)
            assert translation, f"no translation of {line!r} while stdin was open"
            assert translation.decode() == translator.translate([line])[0] + "\n"
            assert process.poll() is None
    finally:
        process.stdin.close()
        process.wait(timeout=120)
    assert process.returncode == 0, process.stderr.read().decode()
    assert process.stdout.read() == b""


# -- any input: as many output lines as input lines, or one error naming the line ---------------


@functools.cache
def cached_translator(exp: Path) -> Translator:
    return Translator.from_path(exp)


def expected_outcome(data: bytes) -> tuple[str, int]:
    """("lines", n) for an input of n lines, as translate counts them (a last line without a
    newline counts), or ("error", n) when line n is the first that is not UTF-8 text."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "error", number
        if "\x00" in text:
            return "error", number
    return "lines", len(lines)


texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
long_lines = st.builds(lambda word, n: word * n, st.sampled_from(["Haus ", "x", "漢字", "\x01 ", "der\r"]),
                       st.integers(300, 3000))
line_lists = st.lists(st.one_of(texts, long_lines, st.sampled_from(["", "\r", " ", "\x00", "a\rb", "\x1c\x85\u2028"]),
                                st.binary(max_size=12).map(lambda b: b.decode("latin-1"))), max_size=12)
inputs = st.one_of(
    st.binary(max_size=300),
    st.tuples(line_lists, st.sampled_from(["\n", "\r\n"]), st.booleans()).map(
        lambda t: (t[1].join(t[0]) + (t[1] if t[2] and t[0] else "")).encode("utf-8")),
    st.tuples(line_lists, st.binary(max_size=4)).map(lambda t: "\n".join(t[0]).encode("utf-8") + t[1]),
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@example(data=b"gut\n\n\xff\n", via_stdin=True, batch_size="1")
@example(data=b"a\nb", via_stdin=False, batch_size="1")
@example(data=("Haus " * 2000 + "\n\nEin Hund.\n").encode(), via_stdin=True, batch_size="32")
@given(data=inputs, via_stdin=st.booleans(), batch_size=st.sampled_from(["1", "3", "32"]))
def test_any_input_gives_one_line_per_line_or_one_error(trained_exp, tmp_path_factory, data, via_stdin, batch_size):
    config, exp = trained_exp
    work = tmp_path_factory.mktemp("fuzz")
    source, output = work / "in.de", work / "out.en"
    source.write_bytes(data)
    args = ["translate", "--model", str(exp), "--beam", "2", "--batch-size", batch_size]
    stderr = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stderr(stderr))
        if via_stdin:
            patch = stack.enter_context(pytest.MonkeyPatch.context())
            patch.setattr(sys, "stdin", stack.enter_context(open(source, encoding="utf-8")))
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(
                open(output, "w", encoding="utf-8", newline="\n"))))
        else:
            args += ["-i", str(source), "-o", str(output)]
        code = main(args)
    name = "<stdin>" if via_stdin else str(source)
    outcome, n = expected_outcome(data)
    if outcome == "error":
        assert code == 2
        message = stderr.getvalue().splitlines()[-1]
        assert re.fullmatch(rf"{re.escape(ERROR + name)}:{n}: (invalid UTF-8|NUL byte).*", message), message
        assert stderr.getvalue().count(ERROR) == 1
        return
    assert code == 0, stderr.getvalue()
    translated = output.read_text(encoding="utf-8")
    assert translated.count("\n") == n and (n == 0 or translated.endswith("\n"))
    # An empty line gives an empty line; a line too long is cut, and the warning names it.
    lines = [raw.decode().rstrip("\r") for raw in data.split(b"\n")[:n]]
    assert all(t == "" for t, line in zip(translated.split("\n"), lines) if line == "")
    src_spm = cached_translator(exp).src_spm
    too_long = {i for i, line in enumerate(lines, start=1) if len(src_spm.encode(line)) > config.decode.max_src_len}
    warned = {int(m) for m in re.findall(rf"warning: {re.escape(name)}:(\d+): line of \d+ subwords cut to", stderr.getvalue())}
    assert warned == too_long


def test_a_killed_translates_temp_file_is_removed_by_the_next(trained_exp, tmp_path):
    """kill -9 during `-o out.txt` leaves .out.txt.<pid>.<hex>.tmp; the next translate to the same
    file removes it (its writer is gone) and leaves other files, and live writers' temps, alone."""
    _, exp = trained_exp
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.txt.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".out.txt.{os.getpid()}.0123abcd.tmp"
    other = tmp_path / f".other.txt.{dead.pid}.0123abcd.tmp"
    for path in (stale, live, other):
        path.write_text("half")
    (tmp_path / "in.txt").write_text("Ein Hund.\n")
    result = subprocess.run([sys.executable, "-m", "nmt.cli", "translate", "--model", str(exp),
                             "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.txt")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and live.exists() and other.exists()
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 1
