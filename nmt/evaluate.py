"""Scores with sacrebleu (BLEU and chrF with their signatures), and the recipe's eval stage."""

from __future__ import annotations

from pathlib import Path

from nmt.config import Config, config_to_dict
from nmt.device import machine
from nmt.errors import NmtError
from nmt.io import read_lines, versions, write_json, write_lines


def score(hyps: list[str], refs: list[list[str]]) -> dict:
    """Corpus BLEU and chrF of detokenised hypotheses against one or more raw references."""
    from sacrebleu.metrics import BLEU, CHRF

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


def evaluate_recipe(config: Config, exp_dir: Path, beam_size: int | None = None) -> dict:
    """Decode every test set with the recipe's decode settings (not the checkpoint's); write
    eval/<name>.{hyp,json} and eval/scores.json (written last: it marks the stage complete)."""
    from nmt.translate import Translator

    decode = config.decode
    translator = Translator.from_path(exp_dir, device=config.train.device, decode=decode)
    precision = translator.precision.record()
    beam = beam_size or decode.beam_size
    out = exp_dir / "eval"
    (out / "scores.json").unlink(missing_ok=True)
    results = {}
    for name in config.data.test:
        src = read_lines(exp_dir / "data" / f"{name}.src")
        ref = read_lines(exp_dir / "data" / f"{name}.tgt")
        hyps = translator.translate(src, beam_size=beam, batch_size=decode.batch_size)
        write_lines(out / f"{name}.hyp", hyps)
        scores = score(hyps, [ref])
        record = {
            "test_set": name, **scores, "beam_size": beam, "checkpoint": str(translator.path),
            "checkpoint_step": translator.step, "decode": config_to_dict(config)["decode"],
            "precision": precision, "machine": machine(), "versions": versions(),
        }
        write_json(out / f"{name}.json", record)
        results[name] = scores
    write_json(out / "scores.json", {"scores": results, "beam_size": beam, "precision": precision,
                                     "config": config_to_dict(config), "versions": versions()})
    return results
