"""`nmt compare`: trained experiments decoded the same way, side by side.

Reproduces the two findings of Bahdanau et al. (2015) on a recipe's own data when given the
recipe's experiment and its fixed-context twin (`make recipe=NAME compare` trains both): BLEU
against source length for each model (their Fig. 2), and attention heat maps as soft word
alignments (their Fig. 3). Training is not done here: every experiment must be trained already.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nmt import plot
from nmt.align import merge_attention, words_of
from nmt.config import DecodeConfig
from nmt.errors import NmtError
from nmt.evaluate import LENGTH_EDGES, bleu_by_length, bucket_labels, score
from nmt.io import atomic_write_text, read_json, read_lines, versions, write_json
from nmt.joined import JOINED_NOTE, joined_by_length
from nmt.search import Hypothesis
from nmt.translate import Translator


@dataclass
class TestSet:
    name: str
    src: list[str]
    refs: list[str]
    src_path: Path  # for warnings that name a line


@dataclass
class Decoding:
    """The test set decoded one way (beam search or greedy) by one model."""

    beam_size: int
    scores: dict  # evaluate.score: bleu, chrf and their signatures
    sent_per_s: float


@dataclass
class Variant:
    """One trained experiment in the comparison."""

    label: str  # the experiment directory's name, e.g. de-en, de-en-fixed
    exp: str
    recipe: str  # config.name of the model's recipe
    attention: str
    params: int
    train_seconds: float
    epochs: int
    steps: int
    best_valid_bleu: float
    beam: Decoding
    greedy: Decoding
    by_length: list[dict]  # evaluate.bleu_by_length of the beam search output
    beam_hyps: list[Hypothesis] = field(default_factory=list, repr=False)  # for the heat maps
    joined: dict | None = None  # nmt.joined.joined_by_length of the beam search (--joined)

    def record(self) -> dict:
        """The numbers, for results.json (the hypotheses are in <label>/<test>.beam.hyp)."""
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "beam_hyps"}
        return {**numbers, "beam": dataclasses.asdict(self.beam), "greedy": dataclasses.asdict(self.greedy)}


def trained_summary(exp_dir: Path) -> dict:
    """model/summary.json, which training writes when it finishes (make's target)."""
    path = exp_dir / "model" / "summary.json"
    if not path.is_file():
        raise NmtError(f"{exp_dir}: no trained model (model/summary.json missing): run "
                       f"`make recipe=RECIPE compare`, which trains a recipe and its fixed-context "
                       f"twin, or `nmt train RECIPE --exp {exp_dir}`")
    return read_json(path, "training summary")


def labels_of(exp_dirs: list[Path]) -> list[str]:
    """Each experiment's directory name, with as many parent directories as tell them apart."""
    paths = [p.resolve() for p in exp_dirs]
    if len(set(paths)) < len(paths):
        raise NmtError("the same experiment is given twice")
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    raise AssertionError("distinct paths differ in some part")  # pragma: no cover


def decode_test_set(translator: Translator, decode: DecodeConfig, test: TestSet,
                    hyp_path: Path) -> tuple[Decoding, list[Hypothesis], list[str]]:
    started = time.perf_counter()
    hyps = [nbest[0] for nbest in translator.search(test.src, decode, origin=(str(test.src_path), 1))]
    seconds = time.perf_counter() - started
    texts = [translator.detokenize(h) for h in hyps]
    atomic_write_text(hyp_path, "".join(t + "\n" for t in texts))
    return Decoding(decode.beam_size, score(texts, [test.refs]), len(test.src) / max(seconds, 1e-9)), hyps, texts


def decode_variant(translator: Translator, summary: dict, exp_dir: Path, label: str, test: TestSet,
                   edges: Sequence[int], out: Path, joined: int = 0) -> Variant:
    """Beam search with the model's own decode settings, and greedy; writes both outputs to
    out/<test>.{beam,greedy}.hyp. With `joined`, also beam search of k = 2..joined consecutive
    test sentences joined (nmt.joined)."""
    beam, beam_hyps, beam_texts = decode_test_set(translator, translator.decode, test,
                                                  out / f"{test.name}.beam.hyp")
    greedy_decode = dataclasses.replace(translator.decode, beam_size=1)
    greedy, _, _ = decode_test_set(translator, greedy_decode, test, out / f"{test.name}.greedy.hyp")
    config = translator.config
    return Variant(
        label=label, exp=str(exp_dir), recipe=config.name, attention=config.model.attention,
        params=summary["num_parameters"], train_seconds=summary["train_seconds"],
        epochs=summary["epochs"], steps=summary["steps"], best_valid_bleu=summary["best_valid_bleu"],
        beam=beam, greedy=greedy, by_length=bleu_by_length(test.src, beam_texts, test.refs, edges),
        beam_hyps=beam_hyps,
        joined=joined_by_length(test.src, test.refs, beam_texts, lambda lines: translator.translate(
            lines, origin=(f"{test.name} joined", 1)), joined) if joined else None,
    )


def run_compare(exp_dirs: list[Path], out: Path, edges: Sequence[int] = LENGTH_EDGES, heatmaps: int = 4,
                device: str = "auto", joined: int = 0) -> Path:
    """Decode the first experiment's first test set with every experiment's model; write
    report.md (last: it marks the comparison complete), results.json and the pictures to `out`.
    `joined` K > 1 adds inputs of k = 2..K consecutive test sentences joined (nmt.joined)."""
    summaries = [trained_summary(exp_dir) for exp_dir in exp_dirs]  # all of them before any work
    labels = labels_of(exp_dirs)
    pairs = {exp_dir: "{src_lang}-{tgt_lang}".format(**s["config"]["data"]) for exp_dir, s in zip(exp_dirs, summaries)}
    if len(set(pairs.values())) > 1:
        raise NmtError("experiments of different language pairs: "
                       + ", ".join(f"{exp_dir} {pair}" for exp_dir, pair in pairs.items()))
    test_name = next(iter(summaries[0]["config"]["data"]["test"]))
    src_path = exp_dirs[0] / "data" / f"{test_name}.src"  # one test set for all
    test = TestSet(test_name, read_lines(src_path), read_lines(src_path.with_suffix(".tgt")), src_path)
    (out / "report.md").unlink(missing_ok=True)
    for stale in (out / "attention").glob("*.png"):
        stale.unlink()
    pictures = plot.available()
    variants, heatmaps_of = [], None
    for exp_dir, label, summary in zip(exp_dirs, labels, summaries):
        translator = Translator.from_path(exp_dir, device=device)
        variant = decode_variant(translator, summary, exp_dir, label, test, edges, out / label, joined)
        if pictures and heatmaps > 0 and heatmaps_of is None and variant.attention != "none":
            draw_heatmaps(translator, variant, test.src, out / "attention", heatmaps)
            heatmaps_of = label
        variants.append(variant)

    buckets = bucket_labels(edges)
    if pictures:
        series = {v.label: [row["bleu"] for row in v.by_length] for v in variants}
        plot.bleu_by_length(buckets, series, out / "bleu_by_length.png",
                            title=f"BLEU by source length ({test_name}, beam)")
        if joined:
            series = {v.label: [row["bleu"] for row in v.joined["by_length"]] for v in variants}
            plot.bleu_by_length(variants[0].joined["buckets"], series, out / "bleu_by_length_joined.png",
                                title=f"BLEU by source length, joined {test_name} sentences (beam)")
    write_json(out / "results.json", {"test_set": test_name, "source": str(src_path), "buckets": buckets,
                                      "variants": [v.record() for v in variants], "versions": versions()})
    atomic_write_text(out / "report.md", render_report(variants, buckets, test_name, pictures, heatmaps_of))
    return out / "report.md"


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


def draw_heatmaps(translator: Translator, variant: Variant, src: list[str], out: Path, count: int) -> None:
    hyps = variant.beam_hyps
    drawable = [i for i, h in enumerate(hyps) if h.tokens and h.attention is not None]
    for index in heatmap_sentences(src, eligible=drawable)[:count]:
        hyp = hyps[index]
        src_pieces = translator.src_spm.encode(src[index], out_type=str)
        tgt_pieces = translator.target_pieces(hyp)
        merged = merge_attention(hyp.attention[:-1], src_pieces, tgt_pieces)  # the EOS row dropped
        plot.attention_heatmap(merged, words_of(src_pieces), words_of(tgt_pieces),
                               out / f"{index}.png", title=f"{variant.label}, test sentence {index}")


def render_report(variants: list[Variant], buckets: list[str], test_name: str, pictures: bool,
                  heatmaps_of: str | None = None) -> str:
    lines = [f"# {' versus '.join(v.label for v in variants)}", "",
             f"Test set `{test_name}`; beam search with each model's decode settings, and greedy.", "",
             "| variant | attention | params | train time | epochs (steps) | best valid BLEU "
             "| test BLEU beam | chrF beam | BLEU greedy | chrF greedy | beam sent/s | greedy sent/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        lines.append(
            f"| {v.label} | {v.attention} | {v.params / 1e6:.2f} M | {v.train_seconds / 60:.1f} min "
            f"| {v.epochs} ({v.steps}) | {v.best_valid_bleu:.2f} | {v.beam.scores['bleu']:.2f} "
            f"| {v.beam.scores['chrf']:.2f} | {v.greedy.scores['bleu']:.2f} "
            f"| {v.greedy.scores['chrf']:.2f} | {v.beam.sent_per_s:.0f} | {v.greedy.sent_per_s:.0f} |")
    lines += ["", "## BLEU by source length (words), beam search", "",
              "| source words | sentences | " + " | ".join(v.label for v in variants) + " |",
              "|---|---:|" + "---:|" * len(variants)]
    for i, bucket in enumerate(buckets):
        cells = [v.by_length[i]["bleu"] for v in variants]
        shown = " | ".join("–" if c is None else f"{c:.2f}" for c in cells)
        lines.append(f"| {bucket} | {variants[0].by_length[i]['sentences']} | {shown} |")
    lines += ["", f"BLEU signature: `{variants[0].beam.scores['bleu_signature']}`",
              f"chrF signature: `{variants[0].beam.scores['chrf_signature']}`", ""]
    if pictures:
        lines += ["![BLEU by source length](bleu_by_length.png)", ""]
    if variants[0].joined is not None:
        lines += render_joined(variants, pictures)
    if pictures and heatmaps_of is not None:
        lines += [f"Attention heat maps of {heatmaps_of} for test sentences of different lengths are in"
                  " `attention/` (source words on x, target words on y; SentencePiece pieces merged"
                  " into words by summing weights over a word's source pieces and averaging over its"
                  " target pieces).", ""]
    if not pictures:
        lines += [f"No pictures: matplotlib is not installed. Install it with `{plot.INSTALL_HINT}` and"
                  " rerun `nmt compare` to get bleu_by_length.png and attention heat maps.", ""]
    return "\n".join(lines)


def render_joined(variants: list[Variant], pictures: bool) -> list[str]:
    """The section of --joined: BLEU of each joined set, and by source length over all of them."""
    sets = variants[0].joined["sets"]
    lines = [f"## Longer inputs: k = 1..{len(sets)} consecutive test sentences joined, beam search", "",
             JOINED_NOTE, "",
             "| variant | " + " | ".join(f"k={s['k']} ({s['sentences']} inputs, ≤{s['max_words']} words)"
                                       for s in sets) + " |", "|---|" + "---:|" * len(sets)]
    for v in variants:
        lines.append(f"| {v.label} | " + " | ".join("–" if s["bleu"] is None else f"{s['bleu']:.2f}"
                                                  for s in v.joined["sets"]) + " |")
    rows = variants[0].joined["by_length"]
    lines += ["", "| source words (joined) | inputs | " + " | ".join(v.label for v in variants) + " |",
              "|---|---:|" + "---:|" * len(variants)]
    for i, row in enumerate(rows):
        cells = [v.joined["by_length"][i]["bleu"] for v in variants]
        lines.append(f"| {row['bucket']} | {row['sentences']} | "
                     + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines.append("")
    if pictures:
        lines += ["![BLEU by source length, joined sentences](bleu_by_length_joined.png)", ""]
    return lines
