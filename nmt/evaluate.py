"""Scores with sacrebleu (BLEU and chrF with their signatures), BLEU by source length, and the
recipe's eval stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from nmt.config import Config, config_to_dict
from nmt.device import machine
from nmt.errors import NmtError
from nmt.io import read_lines, start_stage, versions, write_json, write_lines
from nmt.translate import Translator

# Source-length buckets in words, 0-10 ... 40+: where Bahdanau et al. (2015, Fig. 2) see a fixed
# context fall behind attention.
LENGTH_EDGES = (10, 20, 30, 40)


def score(hyps: list[str], refs: list[list[str]]) -> dict:
    """Corpus BLEU and chrF of detokenised hypotheses against one or more raw references."""
    from sacrebleu.metrics import BLEU, CHRF  # imported when needed: it takes a second

    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hyps, refs)
    chrf_score = chrf.corpus_score(hyps, refs)
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_details": str(bleu_score),
        "sentences": len(hyps),
    }


def bucket_labels(edges: Sequence[int]) -> list[str]:
    bounds = [0, *edges]
    return [f"{lo}-{hi}" for lo, hi in zip(bounds, bounds[1:])] + [f"{edges[-1]}+"]


def bucket_of(length: int, edges: Sequence[int]) -> int:
    """Buckets are [0, e1], (e1, e2], ..., (e_last, inf) in source words."""
    for i, edge in enumerate(edges):
        if length <= edge:
            return i
    return len(edges)


def bleu_by_length(src: list[str], hyps: list[str], refs: list[str],
                   edges: Sequence[int] = LENGTH_EDGES) -> list[dict]:
    """Corpus BLEU of the sentences in each source-length bucket (None for an empty bucket)."""
    members: list[list[int]] = [[] for _ in range(len(edges) + 1)]
    for i, line in enumerate(src):
        members[bucket_of(len(line.split()), edges)].append(i)
    rows = []
    for label, idx in zip(bucket_labels(edges), members):
        bleu = score([hyps[i] for i in idx], [[refs[i] for i in idx]])["bleu"] if idx else None
        rows.append({"bucket": label, "sentences": len(idx), "bleu": bleu})
    return rows


def evaluate_files(hyp_path: Path, ref_paths: list[Path]) -> dict:
    hyps = read_lines(hyp_path)
    refs = [read_lines(p) for p in ref_paths]
    for path, ref in zip(ref_paths, refs):
        if len(ref) != len(hyps):
            raise NmtError(f"{path} has {len(ref)} lines but {hyp_path} has {len(hyps)}")
    return score(hyps, refs)


def format_scores(name: str, scores: dict) -> str:
    return (f"{name}: BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  "
            f"({scores['sentences']} sentences; {scores['bleu_signature']})")


def evaluate_recipe(config: Config, exp_dir: Path, beam_size: int | None = None, device: str = "auto",
                    models: list[Path] | None = None) -> dict:
    """Decode every test set with the recipe's decode settings (not the checkpoint's) and
    `beam_size` if given; write eval/<name>.{hyp,json} (with BLEU by source length) and
    eval/scores.json (written last: it marks the stage complete). `models` (checkpoints or
    experiment directories; several: an ensemble) decode instead of the experiment's own."""
    decode = dataclasses.replace(config.decode, beam_size=beam_size or config.decode.beam_size)
    translator = Translator.from_paths(models or [exp_dir], device=device, decode=decode)
    precision = translator.precision.record()
    beam = decode.beam_size
    out = exp_dir / "eval"
    start_stage(out, "scores.json")
    results = {}
    for name in config.data.test:
        src = read_lines(exp_dir / "data" / f"{name}.src")
        ref = read_lines(exp_dir / "data" / f"{name}.tgt")
        hyps = translator.translate(src, origin=(str(exp_dir / "data" / f"{name}.src"), 1))
        write_lines(out / f"{name}.hyp", hyps)
        scores = score(hyps, [ref])
        record = {
            "test_set": name, **scores, "by_length": bleu_by_length(src, hyps, ref),
            "beam_size": beam, **translator.checkpoint_record(), "decode": dataclasses.asdict(decode),
            "precision": precision, "machine": machine(), "versions": versions(),
        }
        write_json(out / f"{name}.json", record)
        results[name] = scores
    write_json(out / "scores.json", {"scores": results, "beam_size": beam, **translator.checkpoint_record(),
                                     "precision": precision, "config": config_to_dict(config),
                                     "versions": versions()})
    return results
