"""`nmt compare`: attention versus fixed context, trained and decoded the same way.

Reproduces the two findings of Bahdanau et al. (2015) on the recipe's own data: BLEU against
source length for each variant (their Fig. 2), and attention heat maps as soft word alignments
(their Fig. 3). The fixed-context twin is the recipe with `model.attention: none` and nothing else
changed: same data, subwords, sizes, seed, training limits and decoding.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from nmt.config import Config, config_to_dict
from nmt.errors import NmtError
from nmt.evaluate import score
from nmt.io import atomic_write_text, read_lines, versions, write_json


def twin_config(config: Config) -> Config:
    model = dataclasses.replace(config.model, attention="none", input_feeding=False)
    return dataclasses.replace(config, name=f"{config.name}-fixed", model=model)


def ensure_trained(config: Config, exp_dir: Path) -> dict:
    """Run the missing stages of one experiment; reuse a finished one with the same model/train."""
    from nmt.corpus import run_data_stage
    from nmt.subword import run_spm_stage
    from nmt.train import train

    summary_path = exp_dir / "model" / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        mine = config_to_dict(config)
        for section in ("model", "train", "subword"):
            if summary["config"][section] != mine[section]:
                raise NmtError(f"{exp_dir}: holds a model trained with a different {section} section "
                               f"than {config.name}; remove it or compare with --exp elsewhere")
        print(f"{config.name}: reusing the trained model in {exp_dir}")
        return summary
    if not (exp_dir / "data" / "stats.json").is_file():
        run_data_stage(config, exp_dir)
    if not (exp_dir / "spm" / "manifest.json").is_file():
        run_spm_stage(config, exp_dir)
    print(f"{config.name}: training in {exp_dir}")
    return train(config, exp_dir)


def bucket_labels(edges: list[int]) -> list[str]:
    bounds = [0, *edges]
    return [f"{lo}-{hi}" for lo, hi in zip(bounds, bounds[1:])] + [f"{edges[-1]}+"]


def bucket_of(length: int, edges: list[int]) -> int:
    """Buckets are [0, e1], (e1, e2], ..., (e_last, inf) in source words."""
    for i, edge in enumerate(edges):
        if length <= edge:
            return i
    return len(edges)


def bleu_by_length(src: list[str], hyps: list[str], refs: list[str], edges: list[int]) -> list[dict]:
    members: list[list[int]] = [[] for _ in range(len(edges) + 1)]
    for i, line in enumerate(src):
        members[bucket_of(len(line.split()), edges)].append(i)
    rows = []
    for label, idx in zip(bucket_labels(edges), members):
        bleu = score([hyps[i] for i in idx], [[refs[i] for i in idx]])["bleu"] if idx else None
        rows.append({"bucket": label, "sentences": len(idx), "bleu": bleu})
    return rows


def heatmap_sentences(src: list[str], wanted=(8, 14, 20, 30), eligible=None) -> list[int]:
    """Test sentences of different lengths: for each wanted length, the closest one not yet taken
    (among `eligible` indices, e.g. those with a non-empty translation)."""
    lengths = [len(line.split()) for line in src]
    pool = range(len(src)) if eligible is None else eligible
    chosen: list[int] = []
    for target in wanted:
        candidates = [i for i in pool if i not in chosen and lengths[i] > 0]
        if candidates:
            chosen.append(min(candidates, key=lambda i: (abs(lengths[i] - target), i)))
    return sorted(set(chosen), key=lambda i: lengths[i])


def run_compare(configs: list[Config], exp_dirs: list[Path], edges: list[int], heatmaps: int = 4) -> Path:
    from nmt import plot
    from nmt.translate import Translator

    if not any(c.model.attention == "none" for c in configs):
        configs = [*configs, twin_config(configs[0])]
        exp_dirs = [*exp_dirs, exp_dirs[0].parent / f"{exp_dirs[0].name}-fixed"]
    out = exp_dirs[0] / "compare"
    (out / "report.md").unlink(missing_ok=True)  # the stage's completion marker
    test_name = next(iter(configs[0].data.test))
    variants = []
    for config, exp_dir in zip(configs, exp_dirs):
        summary = ensure_trained(config, exp_dir)
        src = read_lines(exp_dirs[0] / "data" / f"{test_name}.src")  # one test set for all
        refs = read_lines(exp_dirs[0] / "data" / f"{test_name}.tgt")
        translator = Translator.from_path(exp_dir, device=config.train.device, decode=config.decode)
        decoded = {}
        for mode, beam in (("beam", config.decode.beam_size), ("greedy", 1)):
            started = time.perf_counter()
            hyps = translator.search(src, beam_size=beam)
            seconds = time.perf_counter() - started
            texts = [translator.detokenize(h[0]) for h in hyps]
            atomic_write_text(out / config.name / f"{test_name}.{mode}.hyp", "".join(t + "\n" for t in texts))
            decoded[mode] = {"hyps": hyps, "texts": texts, "scores": score(texts, [refs]),
                             "sent_per_s": len(src) / seconds, "beam_size": beam}
        variants.append({
            "name": config.name, "attention": config.model.attention, "exp": str(exp_dir),
            "params": summary["num_parameters"], "train_seconds": summary["train_seconds"],
            "epochs": summary["epochs"], "steps": summary["steps"],
            "best_valid_bleu": summary["best_valid_bleu"],
            "beam": {k: v for k, v in decoded["beam"].items() if k not in ("hyps", "texts")},
            "greedy": {k: v for k, v in decoded["greedy"].items() if k not in ("hyps", "texts")},
            "by_length": bleu_by_length(src, decoded["beam"]["texts"], refs, edges),
            "_decoded": decoded, "_translator": translator, "_src": src,
        })

    labels = bucket_labels(edges)
    pictures = plot.available()
    if pictures:
        series = {v["name"]: [row["bleu"] for row in v["by_length"]] for v in variants}
        plot.bleu_by_length(labels, series, out / "bleu_by_length.png",
                            title=f"{configs[0].name}: BLEU by source length ({test_name}, beam)")
        attending = next((v for v in variants if v["attention"] != "none"), None)
        if attending is not None:
            draw_heatmaps(attending, out / "attention", heatmaps)
    report = render_report(variants, labels, test_name, pictures, configs[0].name)
    public = [{k: v for k, v in variant.items() if not k.startswith("_")} for variant in variants]
    write_json(out / "results.json", {"test_set": test_name, "buckets": labels, "variants": public,
                                      "versions": versions()})
    atomic_write_text(out / "report.md", report)
    return out / "report.md"


def draw_heatmaps(variant: dict, out: Path, count: int) -> None:
    from nmt import plot
    from nmt.align import merge_attention, words_of

    translator, src = variant["_translator"], variant["_src"]
    hyps = [h[0] for h in variant["_decoded"]["beam"]["hyps"]]
    drawable = [i for i, h in enumerate(hyps) if h.tokens and h.attention is not None]
    for index in heatmap_sentences(src, eligible=drawable)[:count]:
        hyp = hyps[index]
        src_pieces = translator.src_spm.encode(src[index], out_type=str)
        tgt_pieces = translator.target_pieces(hyp)
        merged = merge_attention(hyp.attention[:-1], src_pieces, tgt_pieces)
        plot.attention_heatmap(merged, words_of(src_pieces), words_of(tgt_pieces),
                               out / f"{index}.png", title=f"{variant['name']}, test sentence {index}")


def render_report(variants: list[dict], labels: list[str], test_name: str, pictures: bool,
                  name: str) -> str:
    lines = [f"# {name}: attention versus fixed context", "",
             f"Test set `{test_name}`; beam search with each recipe's decode settings, and greedy.", "",
             "| variant | attention | params | train time | epochs (steps) | best valid BLEU "
             "| test BLEU beam | chrF beam | BLEU greedy | chrF greedy | beam sent/s | greedy sent/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        lines.append(
            f"| {v['name']} | {v['attention']} | {v['params'] / 1e6:.2f} M | {v['train_seconds'] / 60:.1f} min "
            f"| {v['epochs']} ({v['steps']}) | {v['best_valid_bleu']:.2f} | {v['beam']['scores']['bleu']:.2f} "
            f"| {v['beam']['scores']['chrf']:.2f} | {v['greedy']['scores']['bleu']:.2f} "
            f"| {v['greedy']['scores']['chrf']:.2f} | {v['beam']['sent_per_s']:.0f} | {v['greedy']['sent_per_s']:.0f} |")
    lines += ["", "## BLEU by source length (words), beam search", "",
              "| source words | sentences | " + " | ".join(v["name"] for v in variants) + " |",
              "|---|---:|" + "---:|" * len(variants)]
    for i, label in enumerate(labels):
        cells = [v["by_length"][i]["bleu"] for v in variants]
        shown = " | ".join("–" if c is None else f"{c:.2f}" for c in cells)
        lines.append(f"| {label} | {variants[0]['by_length'][i]['sentences']} | {shown} |")
    lines += ["", f"BLEU signature: `{variants[0]['beam']['scores']['bleu_signature']}`",
              f"chrF signature: `{variants[0]['beam']['scores']['chrf_signature']}`", ""]
    if pictures:
        lines += ["![BLEU by source length](bleu_by_length.png)", "",
                  "Attention heat maps of test sentences of different lengths are in `attention/`"
                  " (source words on x, target words on y; SentencePiece pieces merged into words"
                  " by summing weights over a word's source pieces and averaging over its target"
                  " pieces).", ""]
    else:
        from nmt.plot import INSTALL_HINT

        lines += [f"No pictures: matplotlib is not installed. Install it with `{INSTALL_HINT}` and"
                  " rerun `nmt compare` to get bleu_by_length.png and attention heat maps.", ""]
    return "\n".join(lines)
