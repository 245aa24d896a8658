"""Checkpoints: atomic save, safe load, clear errors.

A checkpoint is self-contained: model weights, the recipe it was trained with, the SentencePiece
models (as bytes), optimizer/scheduler/RNG state and the data position for an exact resume, and
the versions that produced it. It is loaded with `weights_only=True`, so a checkpoint from someone
else cannot run code, and written through io.atomic_output, so a crash mid-write leaves the
previous file intact.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from nmt.errors import NmtError
from nmt.io import atomic_output

FORMAT_VERSION = 1
KIND = "nmt-checkpoint"


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"kind": KIND, "format_version": FORMAT_VERSION, **payload}
    try:
        with atomic_output(path, "wb") as f:
            torch.save(payload, f)
    except OSError as err:
        raise NmtError(
            f"{path}: cannot write checkpoint ({err.strerror or err}); the previous checkpoint "
            "is left as it was"
        ) from None


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path)
    if not path.is_file():
        raise NmtError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NmtError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first_line[:200]}") from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise NmtError(f"{path}: not an nmt checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NmtError(
            f"{path}: checkpoint format {version} is newer than this nmt reads ({FORMAT_VERSION}); "
            "upgrade nmt"
        )
    return payload


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
