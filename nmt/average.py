"""Weight averaging: over the checkpoints of a run (`nmt average`), and over its updates (EMA).

The weights of the last updates of a run scatter around the region the run has reached; their
mean usually sits nearer its centre and translates better than any one of them (Junczys-Dowmunt
et al. 2016; Vaswani et al. 2017 average the last checkpoints). Two ways to take it:

- Step checkpoints. With train.keep_checkpoints K, every validation writes the weights it scored to
  model/step-<step>.pt, and model/checkpoints.json lists the K kept by train.keep_by (the newest,
  or the best by validation BLEU, the newer of equals) with their BLEU. `nmt average` takes the
  mean of some of them (or of any checkpoint files of one model) into one checkpoint.
- EMA: an exponential moving average of the parameters, updated after every update (`EMA`).

A kill -9 at any moment leaves the step checkpoints consistent: a new one is written first, then
the list, then the files it dropped are deleted (each write atomic). A resume redoes the updates
after last.pt, so `restore_kept` drops what is newer than the step it resumes from, and deletes
the files the list no longer names (dropped just before the kill).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from nmt.checkpoint import load_checkpoint, save_checkpoint
from nmt.config import TrainConfig
from nmt.errors import NmtError
from nmt.io import read_json, write_json

KEPT = "checkpoints.json"
STEP_FILE = re.compile(r"step-(\d{6,})\.pt")
# What a training checkpoint holds besides its weights and what translation needs; an average is
# none of these, and its weights were scored by no validation.
TRAINING_STATE = ("kind", "format_version", "optimizer", "scheduler", "rng", "ema", "validation")


def step_path(model_dir: Path, step: int) -> Path:
    return model_dir / f"step-{step:06d}.pt"


# ----------------------------------------------------------------------------------------------
# Exponential moving average of the weights


class EMA:
    """An exponential moving average of a model's parameters. After update t (counted here),
    ema = d_t·ema + (1 − d_t)·params with d_t = min(decay, (1 + t) / (10 + t)): Marian's warm-up,
    so that the random initialisation and the first updates do not linger for 1 / (1 − decay)
    updates."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # lerp_(x, w) = ema + w·(x − ema); one fused pass over all parameters
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "params": dict(zip(self.names, self.params))}

    @torch.no_grad()
    def load_state_dict(self, state, path: Path) -> None:
        """A checkpoint's `ema` (its decay is the recipe's now, not the saved one)."""
        params = state.get("params") if isinstance(state, dict) else None
        updates = state.get("updates") if isinstance(state, dict) else None
        if (not isinstance(params, dict) or not isinstance(updates, int) or list(params) != self.names
                or any(not isinstance(params[n], torch.Tensor) or params[n].shape != p.shape
                       for n, p in zip(self.names, self.params))):
            raise NmtError(f"{path}: damaged checkpoint ('ema' does not hold this model's parameters)")
        for name, ema in zip(self.names, self.params):
            ema.copy_(params[name])
        self.updates = updates

    def weights(self, model: torch.nn.Module) -> dict:
        """model.state_dict() with the averaged parameters in it."""
        return {**model.state_dict(), **dict(zip(self.names, self.params))}

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The averaged parameters in `model` for the block, its own ones back (exactly) after."""
        params = list(model.parameters())
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.params)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)


# ----------------------------------------------------------------------------------------------
# Step checkpoints


def select(entries: list[dict], count: int, by: str) -> list[dict]:
    """The `count` newest entries (by 'last') or best by BLEU, the newer first on ties ('best'),
    in the order of their steps."""
    key = (lambda e: e["step"]) if by == "last" else (lambda e: (e["valid_bleu"], e["step"]))
    return sorted(sorted(entries, key=key, reverse=True)[:count], key=lambda e: e["step"])


def read_kept(model_dir: Path) -> list[dict]:
    """checkpoints.json's list: {step, valid_bleu, file} each, file a name in model_dir."""
    path = model_dir / KEPT
    entries = read_json(path, "checkpoint list").get("checkpoints")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and type(e.get("step")) is int and type(e.get("valid_bleu")) in (int, float)
            and e.get("file") == step_path(model_dir, e["step"]).name for e in entries):
        raise NmtError(f"{path}: damaged checkpoint list (its 'checkpoints' are not "
                       "{step, valid_bleu, file} records)")
    return entries


def write_kept(model_dir: Path, entries: list[dict], t: TrainConfig) -> None:
    write_json(model_dir / KEPT, {"keep_checkpoints": t.keep_checkpoints, "keep_by": t.keep_by,
                                  "checkpoints": entries})


def keep_step_checkpoint(model_dir: Path, payload: dict, t: TrainConfig) -> None:
    """Write the step checkpoint of a validation (`payload`, with its `validation` record) if it is
    among the train.keep_checkpoints kept by train.keep_by; drop the one it displaces."""
    step, bleu = payload["validation"]["step"], payload["validation"]["valid_bleu"]
    listed = [e for e in read_kept(model_dir) if e["step"] != step] if (model_dir / KEPT).is_file() else []
    new = {"step": step, "valid_bleu": bleu, "file": step_path(model_dir, step).name}
    kept = select(listed + [new], t.keep_checkpoints, t.keep_by)
    if new in kept:
        save_checkpoint(step_path(model_dir, step), payload)
    write_kept(model_dir, kept, t)
    for entry in listed:
        if entry not in kept:
            step_path(model_dir, entry["step"]).unlink(missing_ok=True)


def restore_kept(model_dir: Path, step: int, t: TrainConfig) -> None:
    """At the start of a run (`step` 0) or of a resume from `step`: the step checkpoints as they
    were at that step, kept by the recipe's rule now. Those of later steps are deleted (they are
    redone), and so are files the list does not name: dropped before a kill, or from an earlier run."""
    files = {int(m[1]): model_dir / m[0] for m in map(STEP_FILE.fullmatch, _names(model_dir)) if m}
    if not files and not (model_dir / KEPT).exists():
        return
    if (model_dir / KEPT).exists():
        listed = read_kept(model_dir)
    else:  # the list was removed: the files' own validation records stand in for it
        listed = [_entry_of(path, s) for s, path in sorted(files.items()) if s <= step]
    kept = [e for e in listed if e["step"] <= step and e["step"] in files]
    if t.keep_checkpoints:
        kept = select(kept, t.keep_checkpoints, t.keep_by)
    write_kept(model_dir, kept, t)
    steps = {e["step"] for e in kept}
    for s, path in files.items():
        if s not in steps:
            path.unlink(missing_ok=True)


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _entry_of(path: Path, step: int) -> dict:
    bleu = _valid_bleu(load_checkpoint(path))
    if bleu is None:
        raise NmtError(f"{path}: a step checkpoint without its validation BLEU; remove it or restore "
                       f"{path.parent / KEPT}")
    return {"step": step, "valid_bleu": bleu, "file": path.name}


def _valid_bleu(payload: dict) -> float | None:
    validation = payload.get("validation")
    bleu = validation.get("valid_bleu") if isinstance(validation, dict) else None
    return float(bleu) if type(bleu) in (int, float) else None


# ----------------------------------------------------------------------------------------------
# nmt average


def kept_checkpoints(exp_or_model_dir: Path, count: int, by: str) -> list[Path]:
    """The `count` newest ('last') or best ('best') of an experiment's kept step checkpoints."""
    model_dir = exp_or_model_dir / "model" if (exp_or_model_dir / "model").is_dir() else exp_or_model_dir
    path = model_dir / KEPT
    if not path.is_file():
        raise NmtError(f"{path}: not found; train with train.keep_checkpoints > 0 to keep step "
                       "checkpoints to average")
    entries = read_kept(model_dir)
    if count > len(entries):
        raise NmtError(f"--{by} {count}: {path} lists only {len(entries)} checkpoints")
    chosen = [model_dir / e["file"] for e in select(entries, count, by)]
    for file in chosen:
        if not file.is_file():
            raise NmtError(f"{file}: listed in {path} but not found")
    return chosen


def average_checkpoints(paths: list[Path]) -> dict:
    """A checkpoint whose weights are the mean of those of `paths` (floating tensors summed in
    float64, so that the order of the files does not matter, then cast back; other tensors must be
    equal), with the rest of the last one's payload and `averaged_from`: the path, step and
    validation BLEU of each. All must be checkpoints of one model: the same model section,
    SentencePiece models and output vocabulary."""
    first = sums = payload = None
    averaged_from = []
    for path in paths:
        payload = load_checkpoint(path)  # one at a time: K models need not fit in memory at once
        if first is None:
            first = (path, payload)
            sums = {name: t.double() if t.is_floating_point() else t for name, t in payload["model"].items()}
        else:
            _check_same_model(*first, path, payload)
            for name, tensor in payload["model"].items():
                if tensor.is_floating_point():
                    sums[name] += tensor.double()
                elif not torch.equal(tensor, sums[name]):
                    raise NmtError(f"{first[0]} and {path}: their {name} tensors differ (integers "
                                   "cannot be averaged)")
        averaged_from.append({"path": str(path), "step": payload.get("progress", {}).get("step"),
                              "valid_bleu": _valid_bleu(payload)})
    dtypes = {name: t.dtype for name, t in first[1]["model"].items()}
    model = {name: (s / len(paths)).to(dtypes[name]) if s.is_floating_point() else s for name, s in sums.items()}
    rest = {k: v for k, v in payload.items() if k not in TRAINING_STATE}
    return {**rest, "model": model, "averaged_from": averaged_from}


def _check_same_model(path_a: Path, a: dict, path_b: Path, b: dict) -> None:
    model_a, model_b = a["config"].get("model"), b["config"].get("model")
    problem = None
    if model_a != model_b:
        keys = sorted(k for k in {**model_a, **model_b} if model_a.get(k) != model_b.get(k)) \
            if isinstance(model_a, dict) and isinstance(model_b, dict) else []
        problem = f"different models ({', '.join('model.' + k for k in keys) or 'model section'} differ)"
    elif a["spm"]["src"] != b["spm"]["src"] or a["spm"]["tgt"] != b["spm"]["tgt"]:
        problem = "different SentencePiece models"
    elif (a.get("output_vocab"), a["vocab_size"]) != (b.get("output_vocab"), b["vocab_size"]):
        problem = "different output vocabularies"
    elif {n: (t.shape, t.dtype) for n, t in a["model"].items()} != {n: (t.shape, t.dtype) for n, t in b["model"].items()}:
        problem = "different parameters"
    if problem:
        raise NmtError(f"{path_a} and {path_b}: {problem}; only checkpoints of one model can be averaged")


def run_average(sources: list[Path], output: Path, last: int | None = None, best: int | None = None) -> list[dict]:
    """`nmt average`: average an experiment's `last` newest or `best` best kept checkpoints, or the
    checkpoint files `sources`, into `output`; returns what was averaged (averaged_from)."""
    if last is not None or best is not None:
        by, count = ("last", last) if last is not None else ("best", best)
        if len(sources) != 1 or not sources[0].is_dir():
            raise NmtError(f"--{by} takes one experiment directory, got {' '.join(map(str, sources))}")
        if count < 1:
            raise NmtError(f"--{by} must be at least 1, got {count}")
        paths = kept_checkpoints(sources[0], count, by)
    else:
        for source in sources:
            if source.is_dir():
                raise NmtError(f"{source}: a directory; give --last K or --best K to average its kept "
                               "checkpoints, or checkpoint files")
        paths = sources
    payload = average_checkpoints(paths)
    save_checkpoint(output, payload)
    return payload["averaged_from"]
