"""Files we write and read, under real faults: devices, FIFOs and symlinks as outputs, a full
disk, a read-only directory, a kill -9 mid-write, SentencePiece settings it cannot train with,
and damaged gzip, .npz, JSON and checkpoint files.

The faults are made for real where they can be: a size-limited tmpfs and a read-only bind mount
when the tests run as root (as CI does), skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from nmt.checkpoint import load_checkpoint, save_checkpoint
from nmt.config import config_to_dict, load_recipe
from nmt.corpus import run_data_stage
from nmt.errors import NmtError
from nmt.io import (
    OutputError,
    atomic_output,
    read_json,
    read_lines,
    remove_stale_temps,
    write_json,
    write_lines,
)
from nmt.model import build_model
from nmt.subword import (
    EncodedSplit,
    OutputVocabulary,
    load_manifest,
    pack,
    run_spm_stage,
    train_sentencepiece,
)

from .conftest import ROOT, SHARED_DATA, read_gz, write_gz

NMT = [sys.executable, "-m", "nmt.cli"]


def flipped(data: bytes, position: int) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    return bytes(damaged)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def through_fifo(fifo: Path, write) -> str:
    """What a reader of `fifo` receives while `write()` runs. The reader opens the FIFO first, and
    the test holds a write end open until `write()` is done, so the reader never waits forever,
    even when `write()` wrongly replaced the FIFO (it then receives nothing)."""
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDWR)  # a writer: opening the read end does not block
    read_end = os.open(fifo, os.O_RDONLY)
    received: list[bytes] = []

    def read() -> None:
        with open(read_end, "rb") as f:
            received.append(f.read())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        write()
    finally:
        os.close(keep)
        reader.join()
    return received[0].decode()


# -- mounts: real faults, as root ----------------------------------------------------------------


def mount(args: list[str], what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to {what}")
    try:
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip(f"needs the mount command to {what}")
    if result.returncode != 0:
        pytest.skip(f"needs root to {what}: {result.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: writing more than that fails with a real ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount(["-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], "mount a tmpfs")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def make_read_only():
    """Turns a directory read-only with a read-only bind mount onto itself (undone afterwards)."""
    mounted: list[Path] = []

    def read_only(directory: Path) -> Path:
        mount(["--bind", str(directory), str(directory)], "bind-mount a directory")
        mounted.append(directory)
        mount(["-o", "remount,bind,ro", str(directory)], "remount a directory read-only")
        return directory

    yield read_only
    for directory in reversed(mounted):
        subprocess.run(["umount", str(directory)], check=True)


# -- 1. outputs never clobber what they write to ------------------------------------------------


def test_fifo_output_reaches_its_reader_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "out.fifo"
    assert through_fifo(fifo, lambda: write_lines(fifo, ["eins", "zwei"])) == "eins\nzwei\n"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["out.fifo"]  # no temp file, nothing renamed over


def test_dev_null_stays_a_character_device():
    before = os.stat("/dev/null")
    write_lines("/dev/null", ["nothing to keep"])
    write_json("/dev/null", {"a": 1})
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino


def test_symlink_to_dev_null_is_followed_and_both_stay(tmp_path):
    link = tmp_path / "out.txt"
    link.symlink_to("/dev/null")
    write_lines(link, ["gone"])
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert os.listdir(tmp_path) == ["out.txt"]


def test_symlink_to_a_regular_file_replaces_the_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "hyp.txt"
    target.write_text("old\n")
    target.chmod(0o640)
    first = tmp_path / "first.txt"
    first.symlink_to(tmp_path / "second.txt")  # a chain of two links
    (tmp_path / "second.txt").symlink_to("real/hyp.txt")
    write_lines(first, ["new"])
    assert first.is_symlink() and (tmp_path / "second.txt").is_symlink()
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the replacement keeps its permissions
    assert temp_files(tmp_path) == [] and temp_files(tmp_path / "real") == []


def test_dev_stdout_appended_to_a_log_is_written_through(tmp_path):
    """`-o /dev/stdout >> log`: the log is the shell's open file, so it gets our lines after its
    own; replacing (or truncating) it would lose the log."""
    log = tmp_path / "log.txt"
    log.write_text("earlier line\n")
    code = "from nmt.io import write_lines; write_lines('/dev/stdout', ['our line'])"
    with open(log, "a") as stdout:
        subprocess.run([sys.executable, "-c", code], stdout=stdout, check=True, cwd=ROOT)
    assert log.read_text() == "earlier line\nour line\n" and os.listdir(tmp_path) == ["log.txt"]


def test_regular_file_is_replaced_whole_not_rewritten_in_place(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with open(path) as reader:  # an open reader keeps the old file: proof of a rename
        write_lines(path, ["new"])
        assert reader.read() == "old\n"
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_a_character_device_node_is_written_through(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a device node")
    node = tmp_path / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # another /dev/null
    write_lines(node, ["x"])
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert os.listdir(tmp_path) == ["null"]


def test_a_full_device_is_one_error_and_stays_a_device():
    with pytest.raises(OutputError, match=r"^/dev/full: cannot write \(No space left on device\)$"):
        write_lines("/dev/full", ["x" * 100_000])
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_socket_is_neither_replaced_nor_written(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(NmtError, match=rf"^{path}: cannot write \(No such device or address\)$"):
            write_lines(path, ["x"])
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_directory_is_an_error_naming_it(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to("out")
    for path in (tmp_path / "out", tmp_path / "link"):
        with pytest.raises(NmtError, match=rf"^{path}: is a directory"):
            write_lines(path, ["x"])
    assert sorted(os.listdir(tmp_path)) == ["link", "out"] and os.listdir(tmp_path / "out") == []


def test_an_interrupted_block_keeps_the_old_file_and_propagates(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(path) as f:
            f.write("half")
            raise KeyboardInterrupt
    # An OSError of the caller's own (reading its input) is not a failure to write the output.
    with pytest.raises(FileNotFoundError):
        with atomic_output(path) as f:
            f.write("half")
            open(tmp_path / "missing-input")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.txt"]


def test_translate_output_to_a_fifo_and_dev_null(trained_exp, tmp_path):
    _, exp = trained_exp
    source = tmp_path / "in.de"
    source.write_text("Ein Mann.\nZwei Hunde spielen.\n\nEine Frau liest.\n", encoding="utf-8")
    fifo = tmp_path / "out.fifo"
    results = []
    received = through_fifo(fifo, lambda: results.append(subprocess.run(
        [*NMT, "translate", "--model", str(exp), "-i", str(source), "-o", str(fifo)],
        capture_output=True, cwd=ROOT)))
    assert results[0].returncode == 0, results[0].stderr.decode()
    assert len(received.splitlines()) == 4 and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    result = subprocess.run([*NMT, "translate", "--model", str(exp), "-i", str(source), "-o", "/dev/null"],
                            capture_output=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# -- 2. operating-system errors at the edges --------------------------------------------------


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(small_disk):
    path = small_disk / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(8 * 1024)}})  # 32 KiB
    before = path.read_bytes()
    with pytest.raises(NmtError) as caught:
        save_checkpoint(path, {"model": {"w": torch.zeros(256 * 1024)}})  # 1 MiB: more than the disk
    assert str(caught.value) == (f"{path}: cannot write checkpoint (No space left on device); "
                                 "the previous checkpoint is left as it was")
    assert path.read_bytes() == before
    assert os.listdir(small_disk) == ["last.pt"]  # no temp file left behind


def test_full_disk_while_writing_lines_keeps_the_old_file(small_disk):
    path = small_disk / "train.src"
    write_lines(path, ["old"])
    with pytest.raises(OutputError, match=rf"^{path}: cannot write \(No space left on device\)$"):
        write_lines(path, ["a line of text to fill the disk"] * 20_000)  # 640 KB
    assert path.read_text() == "old\n" and os.listdir(small_disk) == ["train.src"]


def test_read_only_directory_is_one_error_and_nothing_changes(tmp_path, make_read_only):
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "kept.txt").write_text("old\n")
    make_read_only(directory)
    for name in ("kept.txt", "new.txt"):
        with pytest.raises(OutputError, match=rf"^{directory / name}: cannot write \(Read-only file system\)$"):
            write_lines(directory / name, ["new"])
    with pytest.raises(NmtError, match=r"cannot create its directory .*\(Read-only file system\)$"):
        write_lines(directory / "sub" / "new.txt", ["new"])
    assert os.listdir(directory) == ["kept.txt"] and (directory / "kept.txt").read_text() == "old\n"


def test_data_and_spm_stages_in_a_read_only_experiment(tiny_exp, make_read_only):
    config, exp = tiny_exp
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    make_read_only(exp)
    with pytest.raises(NmtError, match=rf"^{exp / 'data' / 'stats.json'}: cannot remove \(Read-only file system\)$"):
        run_data_stage(config, exp)
    with pytest.raises(NmtError, match=rf"^{exp / 'spm' / 'manifest.json'}: cannot remove \(Read-only file system\)$"):
        run_spm_stage(config, exp)
    with pytest.raises(NmtError, match=rf"^{exp / 'fresh' / 'data'}: cannot create directory"):
        run_data_stage(config, exp / "fresh")
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before


def test_temp_file_of_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "train.src"
    code = ("import time\nfrom nmt.io import atomic_output\n"
            f"with atomic_output({str(target)!r}) as f:\n"
            "    f.write('half a file'); f.flush(); print('writing', flush=True); time.sleep(600)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert writer.stdout.readline() == b"writing\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    [left] = temp_files(tmp_path)  # what a kill -9 leaves: named after the file and its writer
    assert left.startswith(f".train.src.{writer.pid}.")
    live = tmp_path / f".valid.src.{os.getpid()}.0123abcd.tmp"
    live.write_text("being written")
    someone_elses = tmp_path / ".notes.tmp"
    someone_elses.write_text("not ours")
    assert remove_stale_temps(tmp_path) == 1
    assert temp_files(tmp_path) == sorted([live.name, someone_elses.name])
    assert remove_stale_temps(tmp_path / "missing") == 0


def test_data_and_spm_stages_remove_stale_temps_on_start(tiny_exp):
    config, exp = tiny_exp
    pid = dead_pid()
    for stage in ("data", "spm"):
        (exp / stage / f".train.src.{pid}.89abcdef.tmp").write_text("killed mid-write")
        (exp / stage / f".train.tgt.{os.getpid()}.89abcdef.tmp").write_text("still writing")
    run_data_stage(config, exp)
    run_spm_stage(config, exp)
    for stage in ("data", "spm"):
        assert temp_files(exp / stage) == [f".train.tgt.{os.getpid()}.89abcdef.tmp"]


def test_reading_a_directory_or_an_unreadable_file_is_one_error(tmp_path):
    with pytest.raises(NmtError, match=rf"^{tmp_path}: is a directory, not a file$"):
        read_lines(tmp_path)
    path = tmp_path / "train.en"
    with socket.socket(socket.AF_UNIX) as server:  # exists, but no one can open it, root neither
        server.bind(str(path))
        with pytest.raises(NmtError, match=rf"^{path}: cannot read \(No such device or address\)$"):
            read_lines(path)
    with pytest.raises(NmtError, match=rf"^{tmp_path / 'missing.en'}: file not found$"):
        read_lines(tmp_path / "missing.en")


# -- 3. SentencePiece settings it cannot train with ---------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return read_gz(SHARED_DATA / "multi30k" / "train.de.gz", 200)


@pytest.mark.parametrize("section, key, value, expected", [
    ("subword", "vocab_size", 8, r"^subword\.vocab_size: SentencePiece cannot train m\.model with 8 "
                                 r"pieces on this corpus: .* need at least \d+ \(raise subword\.vocab_size"),
    ("subword", "max_sentences", 50, r"^subword\.max_sentences: SentencePiece cannot train m\.model: .*at least 101"),
    ("subword", "character_coverage", 0.5, r"^subword\.character_coverage: .*from 0\.98 to 1"),
    ("train", "seed", 2**32, r"^train\.seed: SentencePiece takes a seed from 0 to 4294967295, got 4294967296$"),
    ("train", "seed", -1, r"^train\.seed: "),
])
def test_sentencepiece_settings_it_cannot_train_with(corpus, tmp_path, section, key, value, expected):
    config = load_recipe("de-en")
    setattr(getattr(config, section), key, value)  # past validation: what only SentencePiece knows
    with pytest.raises(NmtError, match=expected) as caught:
        train_sentencepiece(corpus, tmp_path / "m.model", config, threads=1)
    assert "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_sentencepiece_without_a_sentence_it_can_use(tmp_path):
    config = load_recipe("de-en")
    with pytest.raises(NmtError, match=r"^data\.train: SentencePiece cannot train m\.model: no sentence"):
        train_sentencepiece(["x" * 5000, "y" * 5000], tmp_path / "m.model", config, threads=1)


def test_spm_stage_with_too_small_a_vocabulary(tiny_exp):
    config, exp = tiny_exp
    config.subword.vocab_size = 8
    with pytest.raises(NmtError, match=r"^subword\.vocab_size: SentencePiece cannot train joint\.model with 8"):
        run_spm_stage(config, exp)
    assert not (exp / "spm" / "manifest.json").exists()  # the stage is not taken as complete


# -- 4. damaged files we read -----------------------------------------------------------------


@pytest.fixture
def real_gz(tmp_path) -> tuple[Path, list[str]]:
    lines = read_gz(SHARED_DATA / "multi30k" / "train.en.gz", 30)
    path = tmp_path / "train.en.gz"
    write_gz(path, lines)
    return path, lines


def test_damaged_gzip_member_is_one_error_naming_the_file(real_gz):
    path, lines = real_gz
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 8]) + data[middle + 8:])
    with pytest.raises(NmtError, match=rf"^{path}: damaged gzip file"):
        read_lines(path)


def test_every_flipped_or_truncated_byte_of_a_gzip_file(real_gz):
    """Each damage is one error naming the file, or (a header field gzip ignores: the time, the
    original name) the same lines: never other text, never another exception."""
    path, lines = real_gz
    data = path.read_bytes()
    header = data.index(b"\0", 10) + 1  # 10 fixed bytes, then the original name (FNAME)
    for position in range(len(data)):
        path.write_bytes(flipped(data, position))
        try:
            read_back = read_lines(path)
        except NmtError as err:
            assert str(err).startswith(f"{path}: damaged gzip file"), err
            continue
        assert read_back == lines and 4 <= position < header - 1, position
    for size in range(1, len(data) - 1, 7):  # (an empty file is no member: no lines)
        path.write_bytes(data[:size])
        with pytest.raises(NmtError, match=rf"^{path}: damaged gzip file"):
            read_lines(path)


def test_not_gzip_in_a_gz_file(tmp_path):
    path = tmp_path / "train.de.gz"
    path.write_text("plain text\n")
    with pytest.raises(NmtError, match=rf"^{path}: damaged gzip file .*Not a gzipped file"):
        read_lines(path)


@pytest.fixture
def real_npz(tmp_path) -> tuple[Path, EncodedSplit]:
    src_ids, src_offsets = pack([[5, 6, 7], [8], [], [9, 10]])
    tgt_ids, tgt_offsets = pack([[11], [12, 13], [14, 15, 16], [17]])
    split = EncodedSplit(src_ids, src_offsets, tgt_ids, tgt_offsets)
    path = tmp_path / "train.npz"
    split.save(path)
    return path, split


def same_split(a: EncodedSplit, b: EncodedSplit) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name))
               for name in ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets"))


def test_every_flipped_or_truncated_byte_of_an_npz(real_npz):
    path, split = real_npz
    data = path.read_bytes()
    damaged = [flipped(data, i) for i in range(len(data))] + [data[:n] for n in range(0, len(data), 5)]
    errors = 0
    for blob in damaged:
        path.write_bytes(blob)
        try:
            assert same_split(EncodedSplit.load(path), split)
        except NmtError as err:
            assert str(err).startswith(f"{path}: damaged encoded split (") and "rerun `nmt spm`" in str(err)
            errors += 1
    assert errors > len(damaged) // 2


@pytest.mark.parametrize("arrays, problem", [
    ({"src_ids": [5], "src_offsets": [0, 1], "tgt_ids": [6]}, r"no array tgt_offsets"),
    ({"src_ids": [5.0], "src_offsets": [0, 1], "tgt_ids": [6], "tgt_offsets": [0, 1]}, r"src_ids is not a flat integer"),
    ({"src_ids": [[5]], "src_offsets": [0, 1], "tgt_ids": [6], "tgt_offsets": [0, 1]}, r"src_ids is not a flat integer"),
    ({"src_ids": [5, 6], "src_offsets": [0, 1], "tgt_ids": [6], "tgt_offsets": [0, 1]},
     r"src_offsets end at 1 but src_ids holds 2 ids"),
    ({"src_ids": [5, 6], "src_offsets": [0, 2, 1, 2], "tgt_ids": [6], "tgt_offsets": [0, 0, 0, 1]},
     r"src_offsets do not start at 0 and rise"),
    ({"src_ids": [5], "src_offsets": [0, 1], "tgt_ids": [6, 7], "tgt_offsets": [0, 1, 2]},
     r"1 source sentences but 2 target sentences"),
    ({"src_ids": [-5], "src_offsets": [0, 1], "tgt_ids": [6], "tgt_offsets": [0, 1]}, r"src_ids outside"),
])
def test_npz_whose_arrays_do_not_make_a_split(tmp_path, arrays, problem):
    path = tmp_path / "valid.npz"
    np.savez(path, **{name: np.array(values) for name, values in arrays.items()})
    with pytest.raises(NmtError, match=rf"^{path}: damaged encoded split \({problem}.*\); rerun `nmt spm`$"):
        EncodedSplit.load(path)


def test_npz_ids_outside_the_vocabulary_and_other_files(real_npz, tmp_path):
    path, _ = real_npz
    with pytest.raises(NmtError, match=r"tgt_ids outside 0\.\.15"):
        EncodedSplit.load(path, vocab_size={"src": 100, "tgt": 16})
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, src_ids=np.array([object()]), src_offsets=np.array([0, 1]),
             tgt_ids=np.array([1]), tgt_offsets=np.array([0, 1]))
    with pytest.raises(NmtError, match=rf"^{pickled}: damaged encoded split"):
        EncodedSplit.load(pickled)  # never unpickled
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.arange(3))  # an .npy, not an .npz
    with pytest.raises(NmtError, match=rf"^{single}: damaged encoded split"):
        EncodedSplit.load(single)


@pytest.mark.parametrize("damage, problem", [
    (lambda text: text[: len(text) // 2], r":\d+: damaged spm manifest \(invalid JSON"),
    (lambda text: "[1, 2]", r": damaged spm manifest \(a JSON list, not an object\)"),
    (lambda text: "{}", r": damaged spm manifest \(no 'models' or no 'vocab_size'\)"),
    (lambda text: "[" * 100_000, r": damaged spm manifest \(invalid JSON"),
])
def test_damaged_manifest_text(tiny_exp, damage, problem):
    _, exp = tiny_exp
    path = exp / "spm" / "manifest.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(NmtError, match=rf"^{path}{problem}.*; rerun `nmt spm de-en`$"):
        load_manifest(exp / "spm", "de-en")


@pytest.mark.parametrize("key, value, problem", [
    ("models", {"src": "joint.model"}, r"models\.tgt is not a file name"),
    ("models", {"src": "../../etc/joint.model", "tgt": "joint.model"}, r"models\.src is not a file name"),
    ("vocab_size", {"src": 200, "tgt": "200"}, r"vocab_size\.tgt"),
    ("output_vocab", [3, 2, 1, 0], r"output_vocab is not a rising list"),
    ("output_vocab", [0, 1, 2, 3, 10**6], r"output_vocab is not a rising list"),
    ("output_vocab", "all", r"output_vocab is not a list of SentencePiece ids"),
    ("splits", None, r"no 'splits'"),
])
def test_manifest_with_missing_or_wrong_keys(tiny_exp, key, value, problem):
    _, exp = tiny_exp
    path = exp / "spm" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert load_manifest(exp / "spm", "de-en") == manifest
    manifest[key] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(NmtError, match=rf"^{path}: .*{problem}"):
        load_manifest(exp / "spm", "de-en")


def test_read_json_errors_name_the_file(tmp_path):
    path = tmp_path / "stats.json"
    with pytest.raises(NmtError, match=rf"^{path}: data record not found$"):
        read_json(path, "data record")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(NmtError, match=rf"^{path}: damaged data record \(invalid UTF-8"):
        read_json(path, "data record")
    with pytest.raises(NmtError, match=rf"^{tmp_path}: cannot read data record \(Is a directory\)$"):
        read_json(tmp_path, "data record")


@pytest.fixture
def real_checkpoint(tiny_exp, tmp_path) -> tuple[Path, dict]:
    """A checkpoint as training writes it, with a tiny model and the experiment's own spm."""
    config, exp = tiny_exp
    manifest = load_manifest(exp / "spm", "de-en")
    sizes = manifest["vocab_size"]
    model = build_model(config.model, sizes["src"], sizes["output"])
    blob = (exp / "spm" / "joint.model").read_bytes()
    payload = {
        "model": model.state_dict(), "config": config_to_dict(config),
        "spm": {"src": blob, "tgt": blob}, "vocab_size": sizes,
        "output_vocab": manifest["output_vocab"], "progress": {"step": 7},
    }
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload)
    return path, payload


@pytest.mark.parametrize("key", ["model", "config", "spm", "spm.src", "spm.tgt", "vocab_size",
                                 "vocab_size.src", "vocab_size.tgt"])
def test_checkpoint_missing_a_key_every_reader_needs(real_checkpoint, key):
    path, payload = real_checkpoint
    assert load_checkpoint(path)["progress"] == {"step": 7}
    outer, _, inner = key.partition(".")
    if inner:
        del payload[outer][inner]
    else:
        del payload[outer]
    save_checkpoint(path, payload)
    with pytest.raises(NmtError, match=rf"^{path}: checkpoint has no '{key}' \(damaged"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value, problem", [
    ("spm", {"src": "text", "tgt": b"x"}, r"'spm\.src' is a str, not a bytes"),
    ("vocab_size", {"src": True, "tgt": 10}, r"'vocab_size\.src' is a bool, not a int"),
    ("config", [1], r"'config' is a list, not a dict"),
    ("progress", 7, r"'progress' is a int, not a dict"),
    ("model", {"w": 1.5}, r"'model' holds a float under 'w', not a tensor"),
])
def test_checkpoint_key_of_the_wrong_type(real_checkpoint, key, value, problem):
    path, payload = real_checkpoint
    payload[key] = value
    save_checkpoint(path, payload)
    with pytest.raises(NmtError, match=rf"^{path}: damaged checkpoint \({problem}"):
        load_checkpoint(path)


def test_checkpoint_holding_an_object_is_refused_without_running_it(real_checkpoint):
    path, payload = real_checkpoint
    payload["config"] = Fraction(1, 3)  # unpickling it would call fractions.Fraction
    save_checkpoint(path, payload)
    with pytest.raises(NmtError, match=rf"^{path}: not a readable checkpoint \(it holds more than "
                       r"tensors .*never runs code from a checkpoint: Unsupported global: .*Fraction"):
        load_checkpoint(path)


def test_checkpoint_for_a_resume_needs_its_training_state(real_checkpoint):
    path, _ = real_checkpoint
    with pytest.raises(NmtError, match=rf"^{path}: checkpoint has no 'optimizer'"):
        load_checkpoint(path, resume=True)


def test_checkpoint_with_a_wrong_output_vocabulary(real_checkpoint):
    path, payload = real_checkpoint
    payload["output_vocab"] = payload["output_vocab"][:-1]  # one piece fewer than the model has
    save_checkpoint(path, payload)
    with pytest.raises(NmtError, match=rf"^{path}: its output vocabulary does not match the model$"):
        OutputVocabulary.of(load_checkpoint(path), path)


def test_every_sampled_flipped_byte_of_a_checkpoint(real_checkpoint):
    """torch does not check its records' CRC: without our check, most of these flips would load
    as other weights. Each is one error, or (a zip field nothing reads) the same payload."""
    path, _ = real_checkpoint
    data = path.read_bytes()
    original = load_checkpoint(path)
    positions = range(0, len(data), max(1, len(data) // 400))
    errors = 0
    for position in positions:
        path.write_bytes(flipped(data, position))
        try:
            payload = load_checkpoint(path)
        except NmtError as err:
            assert str(err).startswith(f"{path}: not a readable checkpoint"), err
            errors += 1
            continue
        assert payload["spm"] == original["spm"] and payload["config"] == original["config"]
        assert all(torch.equal(payload["model"][k], v) for k, v in original["model"].items())
    assert errors > len(positions) // 2


def test_translate_with_a_crafted_checkpoint_is_one_line(real_checkpoint):
    path, payload = real_checkpoint
    del payload["spm"]
    save_checkpoint(path, payload)
    result = subprocess.run([*NMT, "translate", "--model", str(path)], input=b"ein Hund\n",
                            capture_output=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"nmt translate: error: {path}: checkpoint has no 'spm' (damaged, or not written by `nmt train`)"]

