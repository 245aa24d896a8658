"""Checkpoints: atomic save, safe load, clear errors.

A checkpoint is self-contained: model weights, the recipe it was trained with, the SentencePiece
models (as bytes), optimizer/scheduler/RNG state and the data position for an exact resume, and
the versions that produced it. It is loaded with `weights_only=True`, so a checkpoint from someone
else cannot run code, and written through io.atomic_output, so a crash mid-write leaves the
previous file intact.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import torch

from nmt.errors import NmtError
from nmt.io import OutputError, atomic_output

FORMAT_VERSION = 1
KIND = "nmt-checkpoint"

# What every reader of a checkpoint (translate, evaluate, a resume) takes from it, with its type;
# a dotted key is one inside a dict. A crafted or damaged payload fails here, with the key named,
# instead of with a KeyError deep inside a reader.
REQUIRED_KEYS = (
    ("model", dict), ("config", dict),
    ("spm", dict), ("spm.src", bytes), ("spm.tgt", bytes),
    ("vocab_size", dict), ("vocab_size.src", int), ("vocab_size.tgt", int),
)
OPTIONAL_KEYS = (("progress", dict), ("output_vocab", (list, type(None))), ("vocab_size.output", int))
# What a resume takes in addition.
RESUME_KEYS = (
    ("optimizer", dict), ("scheduler", (dict, type(None))), ("progress", dict),
    ("rng", dict), ("rng.torch", torch.Tensor), ("rng.python", (tuple, list)),
)


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"kind": KIND, "format_version": FORMAT_VERSION, **payload}
    try:
        # Serialized in memory first: torch's zip writer reports a failed write (a full disk) as
        # a RuntimeError without the errno, so the reason would be lost; our own write keeps it.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with atomic_output(path, "wb") as f:
            f.write(buffer.getbuffer())
    except OutputError as err:
        reason = err.reason
    except OSError as err:
        reason = err.strerror or str(err)
    else:
        return
    raise NmtError(f"{path}: cannot write checkpoint ({reason}); the previous checkpoint is left as it was")


def load_checkpoint(path: Path, resume: bool = False) -> dict:
    """The payload of a checkpoint (or of an experiment's best/last one), with the keys every
    reader needs checked; with `resume`, also those a resume needs."""
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path)
    if not path.is_file():
        raise NmtError(f"{path}: checkpoint not found")
    try:
        f = open(path, "rb")
    except OSError as err:
        raise NmtError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None
    # One open file for the check and the load: a checkpoint replaced in between (a training run
    # saving) must not be checked as one file and loaded as another.
    with f:
        try:
            _check_archive(path, f)
            f.seek(0)
            payload = torch.load(f, map_location="cpu", weights_only=True)
        except NmtError:
            raise
        except Exception as err:  # a damaged file fails zipfile and the unpickler in many ways
            raise _unreadable(path, err) from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise NmtError(f"{path}: not an nmt checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NmtError(
            f"{path}: checkpoint format {version} is newer than this nmt reads ({FORMAT_VERSION}); "
            "upgrade nmt"
        )
    _check_keys(path, payload, REQUIRED_KEYS, required=True)
    _check_keys(path, payload, OPTIONAL_KEYS, required=False)
    if resume:
        _check_keys(path, payload, RESUME_KEYS, required=True)
    for name, value in payload["model"].items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise NmtError(f"{path}: damaged checkpoint ('model' holds a {type(value).__name__} "
                           f"under {name!r}, not a tensor)")
    return payload


def _check_archive(path: Path, f) -> None:
    """torch reads a checkpoint's zip records without checking their CRC, so a flipped byte in
    the weights would load as different weights: check every record before torch reads any."""
    with zipfile.ZipFile(f) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise NmtError(f"{path}: not a readable checkpoint (damaged: its record {bad} fails its CRC check)")


def _unreadable(path: Path, err: Exception) -> NmtError:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch colours its messages
    refused = re.search(r"WeightsUnpickler error: (.*?)(\.\s|$)", text, re.MULTILINE)
    if refused:  # torch's advice to load it anyway is not ours to give
        return NmtError(f"{path}: not a readable checkpoint (it holds more than tensors and plain "
                        f"data, and nmt never runs code from a checkpoint: {refused[1][:200]})")
    first_line = text.splitlines()[0][:200] if text else type(err).__name__
    return NmtError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first_line}")


def _check_keys(path: Path, payload: dict, keys, required: bool) -> None:
    for key, expected in keys:
        value, found = payload, True
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                found = False
                break
            value = value[part]
        if not found:
            if required:
                raise NmtError(f"{path}: checkpoint has no '{key}' (damaged, or not written by "
                               "`nmt train`)")
            continue
        types = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise NmtError(f"{path}: damaged checkpoint ('{key}' is a {type(value).__name__}, "
                           f"not a {wanted})")


def find_checkpoint(exp_or_model_dir: Path) -> Path:
    """best.pt of an experiment (exp/<recipe> or its model/ dir), else last.pt."""
    for model_dir in (exp_or_model_dir / "model", exp_or_model_dir):
        for name in ("best.pt", "last.pt"):
            if (model_dir / name).is_file():
                return model_dir / name
    raise NmtError(f"{exp_or_model_dir}: no checkpoint (model/best.pt or model/last.pt) found")


def load_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    """load_state_dict with a one-line error when the checkpoint is for another model/vocab."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise NmtError(f"{path}: checkpoint does not fit this model ({detail})") from None
