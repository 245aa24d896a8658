"""Fine-tuning: a run that starts from another run's checkpoint (train.init_from, or
`nmt train NAME --init-from CHECKPOINT`).

The spm stage trains no SentencePiece model: it writes the checkpoint's models and output
vocabulary into exp/spm and encodes the new corpus with them, so the vocabularies cannot mismatch.
Training builds the recipe's model, which must have the checkpoint's architecture (its model
section, dropout aside: dropout changes no weight), loads the checkpoint's weights, and goes on
like any new run: a fresh optimizer, schedule and step count, the recipe's train section.

A resume wins: once the run has written last.pt, it resumes from there and never re-applies the
checkpoint (last.pt, best.pt and summary.json record it as `init_from`: its path and step).
"""

from __future__ import annotations

from pathlib import Path

from nmt.checkpoint import find_checkpoint, load_checkpoint
from nmt.config import Config, config_to_dict
from nmt.errors import NmtError

# Model keys that may differ between the checkpoint and the recipe: they change no weight.
NOT_ARCHITECTURE = ("dropout", "word_dropout")


def load_init(config: Config) -> tuple[Path, dict]:
    """The checkpoint train.init_from names (a file, or an experiment's best.pt/last.pt) and its
    payload; one of another architecture than the recipe's is refused, naming the keys."""
    path = Path(config.train.init_from)
    try:
        checkpoint = find_checkpoint(path) if path.is_dir() else path
        payload = load_checkpoint(checkpoint)
    except NmtError as err:
        raise NmtError(f"train.init_from: {err}") from None
    saved = payload["config"].get("model")
    if not isinstance(saved, dict):
        raise NmtError(f"train.init_from: {checkpoint}: damaged checkpoint (its config has no model section)")
    wanted = config_to_dict(config)["model"]
    differences = [f"model.{key} {saved.get(key)!r} (checkpoint) vs {wanted.get(key)!r} (recipe)"
                   for key in sorted((set(saved) | set(wanted)) - set(NOT_ARCHITECTURE))
                   if saved.get(key) != wanted.get(key)]
    if differences:
        raise NmtError(f"train.init_from: {checkpoint} is another architecture than the recipe's: "
                       f"{'; '.join(differences)}; give the recipe the checkpoint's model keys")
    return checkpoint, payload


def init_record(checkpoint: Path, payload: dict) -> dict:
    """What a fine-tuned run records of where it started: the checkpoint and its step."""
    progress = payload.get("progress")
    step = progress.get("step") if isinstance(progress, dict) else None
    return {"path": str(checkpoint.resolve()), "step": step}


def init_weights(config: Config, spm_paths: dict[str, Path], output_vocab: list | None) -> tuple[dict, dict, Path]:
    """The weights to start fine-tuning from, its record and path, once the spm stage has taken
    the checkpoint's SentencePiece models (`spm_paths`) and output vocabulary."""
    checkpoint, payload = load_init(config)
    same = all(path.read_bytes() == payload["spm"][side] for side, path in spm_paths.items())
    if not same or output_vocab != payload.get("output_vocab"):
        spm_dir = spm_paths["src"].parent
        raise NmtError(f"{spm_dir}: its SentencePiece models or output vocabulary are not those of "
                       f"train.init_from ({checkpoint}): run `nmt spm {config.name} --init-from "
                       f"{config.train.init_from}` first")
    return payload["model"], init_record(checkpoint, payload), checkpoint
