"""Speed and quality benchmark on protocol "m30k-de-en-cpu" (../shared/bench/anchors/RESULTS.md).

    python bench/run.py                 # full: 20 minutes of training, then decoding (~25 min)
    python bench/run.py --quick         # 3 minutes of training, 300 test sentences
    python bench/run.py --anchor onmt   # then the same protocol with OpenNMT-py; ratios nmt/anchor

Measures, as the anchors do:
- training target tokens/s in steady state: the median of the 20-update windows that start 60 s
  or more into training (`metrics.jsonl`), and effective: all target tokens / wall-clock training
  time (validation and checkpoints included);
- BLEU and chrF on test_2016_flickr after exactly `--minutes` of training, beam 5 and greedy, from
  the checkpoint nmt picks (best.pt, by validation BLEU);
- decoding sentences/s over the test set, beam 5 and greedy, at several batch sizes (model
  loading is timed apart and excluded);
- peak RSS of the training and of the decoding process (getrusage of the child);
- achieved training FLOP/s: an analytic count of the model's multiply-adds per target token
  (forward; backward counted as twice the forward) times the steady tokens/s, as a fraction of
  the fp32 peak measured here by a 2-thread 2048³ matrix product.
Each run writes bench/out/<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "bench" / "m30k-de-en.yaml"
ANCHORS = ROOT.parent / "shared" / "bench" / "anchors"
PYTHON = sys.executable
THREADS = "2"


def env() -> dict:
    variables = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1")
    if "NMT_DATA_MIRROR" not in variables and (ROOT.parent / "shared" / "data").is_dir():
        variables["NMT_DATA_MIRROR"] = str(ROOT.parent / "shared" / "data")
    return variables


def run_child(args: list[str], log: Path | None = None) -> tuple[int, float, float]:
    """Run a command; returns (exit status, wall seconds, peak RSS in MiB) of that process."""
    started = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    process = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


def nmt(*args: str) -> list[str]:
    return [PYTHON, "-m", "nmt.cli", *args]


# -- the peak: what a 2-thread fp32 matrix product reaches here --------------------------------


def matmul_peak() -> float:
    code = """
import time, torch
torch.set_num_threads(2)
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
best = 0.0
for _ in range(5):
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    best = max(best, 10 * 2 * 2048 ** 3 / (time.perf_counter() - t))
print(best / 1e9)
"""
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env(), check=True)
    return float(out.stdout.strip())


def forward_flops_per_target_token(cfg: dict, tgt_vocab: int, src_per_tgt: float,
                                   avg_src_len: float, avg_tgt_len: float) -> float:
    """Multiply-adds × 2 of one forward pass, per target token (embedding lookups are free)."""
    m = cfg["model"]
    gates = {"gru": 3, "lstm": 4, "rnn": 1}[m["cell"]]
    dirs = 2 if m["bidirectional"] else 1
    enc_out = m["hidden_size"] * dirs
    enc = 0.0
    for layer in range(m["enc_layers"]):
        inp = m["embed_size"] if layer == 0 else enc_out
        enc += dirs * 2 * gates * (inp + m["hidden_size"]) * m["hidden_size"]
    per_src_token = enc
    dec_in = m["embed_size"] + (m["output_size"] if m["input_feeding"] else 0)
    if m["attention"] in ("bahdanau", "none"):
        dec_in += enc_out
    dec = 0.0
    for layer in range(m["dec_layers"]):
        inp = dec_in if layer == 0 else m["decoder_size"]
        dec += 2 * gates * (inp + m["decoder_size"]) * m["decoder_size"]
    attention = 0.0
    if m["attention"] == "bahdanau":
        per_src_token += 2 * enc_out * m["attention_size"]  # keys, once per batch
        attention = 2 * m["decoder_size"] * m["attention_size"] + avg_src_len * (3 * m["attention_size"] + 2 * enc_out)
    elif m["attention"] != "none":
        attention = avg_src_len * 4 * enc_out
    deep_output = 2 * (m["decoder_size"] + enc_out + m["embed_size"]) * m["output_size"]
    softmax = 2 * m["output_size"] * tgt_vocab
    bridge = 2 * enc_out * m["decoder_size"] * m["dec_layers"] / avg_tgt_len  # once per sentence
    return per_src_token * src_per_tgt + dec + attention + deep_output + softmax + bridge


# -- decoding, in its own process so that its RSS and timing are its own ---------------------


def decode_main(exp: Path, limit: int, out: Path) -> None:
    import torch

    from nmt.evaluate import score
    from nmt.io import read_lines
    from nmt.translate import Translator

    torch.set_num_threads(int(THREADS))
    started = time.perf_counter()
    translator = Translator.from_path(exp)
    load_seconds = time.perf_counter() - started
    src = read_lines(exp / "data" / "test.src")[:limit]
    refs = read_lines(exp / "data" / "test.tgt")[:limit]
    result = {"load_seconds": load_seconds, "sentences": len(src), "checkpoint_step": translator.step,
              "precision": translator.precision.record()}
    for mode, beam, batch_sizes in (("beam5", 5, (32, 64, 128)), ("greedy", 1, (64, 128, 256))):
        timings = {}
        for batch_size in batch_sizes:
            started = time.perf_counter()
            hyps = translator.translate(src, dataclasses.replace(translator.decode, beam_size=beam,
                                                                 batch_size=batch_size))
            timings[batch_size] = len(src) / (time.perf_counter() - started)
        best = max(timings, key=timings.get)
        scores = score(hyps, [refs])
        result[mode] = {"sent_per_s": timings[best], "best_batch_size": best, "sweep": timings,
                        "bleu": scores["bleu"], "chrf": scores["chrf"],
                        "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"]}
    out.write_text(json.dumps(result, indent=2))


# -- the nmt run ------------------------------------------------------------------------------


def run_nmt(minutes: float, limit: int, work: Path, settings: list[str]) -> dict:
    exp = work / "exp"
    overrides = [arg for setting in [f"train.max_minutes={minutes}", *settings] for arg in ("--set", setting)]
    for stage in ("data", "spm"):
        status, _, _ = run_child(nmt(stage, str(RECIPE), "--exp", str(exp)), work / f"{stage}.log")
        if status != 0:
            sys.exit(f"bench: nmt {stage} failed, see {work / f'{stage}.log'}")
    for stale in ("last.pt", "best.pt", "metrics.jsonl", "summary.json"):
        (exp / "model" / stale).unlink(missing_ok=True)
    print(f"bench: training for {minutes} min (log: {work / 'train.log'})", flush=True)
    status, wall, train_rss = run_child(nmt("train", str(RECIPE), "--exp", str(exp), *overrides),
                                        work / "train.log")
    if status != 0:
        sys.exit(f"bench: nmt train failed, see {work / 'train.log'}")
    summary = json.loads((exp / "model" / "summary.json").read_text())
    records = [json.loads(line) for line in (exp / "model" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["wall"] >= 60]
    steady = statistics.median(windows) if windows else summary["tokens_per_second"]
    print("bench: decoding", flush=True)
    decode_json = work / "decode.json"
    status, _, decode_rss = run_child([PYTHON, str(Path(__file__)), "--decode-only", str(exp),
                                       "--limit", str(limit), "--decode-out", str(decode_json)],
                                      work / "decode.log")
    if status != 0:
        sys.exit(f"bench: decoding failed, see {work / 'decode.log'}")
    decoded = json.loads(decode_json.read_text())
    manifest = json.loads((exp / "spm" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    tgt_with_eos = train["tgt_tokens"] + train["pairs"]
    flops = forward_flops_per_target_token(
        summary["config"], manifest["vocab_size"]["tgt"], train["src_tokens"] / tgt_with_eos,
        train["src_tokens"] / train["pairs"], tgt_with_eos / train["pairs"])
    return {
        "params": summary["num_parameters"], "steps": summary["steps"],
        "train_tok_s_steady": steady,
        "train_tok_s_effective": summary["target_tokens"] / summary["wall_seconds"],
        "train_wall_seconds": summary["wall_seconds"], "process_wall_seconds": wall,
        "epochs": summary["target_tokens"] / (train["tgt_tokens"] + train["pairs"]),
        "best_step": summary["best_step"], "best_valid_bleu": summary["best_valid_bleu"],
        "bleu": decoded["beam5"]["bleu"], "chrf": decoded["beam5"]["chrf"],
        "greedy_bleu": decoded["greedy"]["bleu"], "greedy_chrf": decoded["greedy"]["chrf"],
        "beam5_sent_s": decoded["beam5"]["sent_per_s"], "greedy_sent_s": decoded["greedy"]["sent_per_s"],
        "decode": decoded, "peak_rss_train_mib": train_rss, "peak_rss_decode_mib": decode_rss,
        "precision": summary["precision"]["name"], "precision_reason": summary["precision"]["reason"],
        "decode_precision": decoded["precision"]["name"],
        "train_flops_per_token": 3 * flops,
        "train_gflop_s": 3 * flops * steady / 1e9,
    }


# -- an anchor from ../shared/bench/anchors, run by its own script ----------------------------


# Each anchor decodes at its best batch size in the sweep of RESULTS.md (sentences per batch):
# Joey does not depend on it (its default, 64); OpenNMT-py and fairseq are fastest at 128.
ANCHOR_DECODE_BATCH = {"joey": "64", "onmt": "128", "fairseq": "128"}


def run_anchor(name: str, minutes: float, work: Path) -> dict:
    script = ANCHORS / f"{name}.sh"
    if not script.is_file():
        sys.exit(f"bench: {script} not found")
    log = work / f"anchor-{name}.log"
    print(f"bench: running the {name} anchor for {minutes} min (log: {log})", flush=True)
    environment = dict(env(), BUDGET=str(int(minutes * 60)), DEC_BS=ANCHOR_DECODE_BATCH[name])
    with open(log, "w") as f:
        status = subprocess.run(["bash", str(script), "all"], cwd=ROOT, env=environment, stdout=f,
                                stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    if status != 0:
        sys.exit(f"bench: the {name} anchor failed (exit {status}), see {log}")
    return {**parse_anchor_report(text), "precision": "fp32"}  # the anchors' scripts train in fp32


def parse_anchor_report(text: str) -> dict:
    def number(pattern: str) -> float | None:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else None

    bleu = re.search(r"\.b5\S*: BLEU ([\d.]+)\s+chrF ([\d.]+)", text)
    greedy = re.search(r"\.b1\S*: BLEU ([\d.]+)\s+chrF ([\d.]+)", text)
    return {
        "train_tok_s_steady": number(r"steady tok/s.*?\):\s*(\d+)"),
        "peak_rss_train_mib": number(r"peak RSS train (\d+) MiB"),
        "beam5_sent_s": number(r"decode \S+\.b5\S*: .*?= ([\d.]+) sent/s"),
        "greedy_sent_s": number(r"decode \S+\.b1\S*: .*?= ([\d.]+) sent/s"),
        "bleu": float(bleu.group(1)) if bleu else None, "chrf": float(bleu.group(2)) if bleu else None,
        "greedy_bleu": float(greedy.group(1)) if greedy else None,
    }


# -- report -----------------------------------------------------------------------------------

COLUMNS = [("train tok/s steady", "train_tok_s_steady", "{:.0f}", True),
           ("BLEU (beam 5)", "bleu", "{:.2f}", True), ("chrF", "chrf", "{:.2f}", True),
           ("beam-5 sent/s", "beam5_sent_s", "{:.0f}", True), ("greedy sent/s", "greedy_sent_s", "{:.0f}", True),
           ("peak RSS train MiB", "peak_rss_train_mib", "{:.0f}", False)]


def table(rows: dict[str, dict]) -> str:
    lines = ["| toolkit | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        cells = [fmt.format(row[key]) if row.get(key) is not None else "–" for _, key, fmt, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(ours: dict, anchor: dict) -> dict:
    """nmt / anchor for higher-is-better figures, anchor / nmt for RSS: > 1 means nmt is better."""
    out = {}
    for _, key, _, higher in COLUMNS:
        if ours.get(key) and anchor.get(key):
            out[key] = ours[key] / anchor[key] if higher else anchor[key] / ours[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes of training, 300 test sentences")
    parser.add_argument("--minutes", type=float, help="training budget (default 20, quick 3)")
    parser.add_argument("--anchor", choices=["joey", "onmt", "fairseq"], action="append", default=[],
                        help="also run this anchor's script in the same invocation (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key of nmt's training run, e.g. train.compile=true (repeatable)")
    parser.add_argument("--decode-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--decode-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_only:
        decode_main(args.decode_only, args.limit or 10**9, args.decode_out)
        return
    minutes = args.minutes or (3.0 if args.quick else 20.0)
    limit = args.limit or (300 if args.quick else 1000)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    work = args.out / stamp
    work.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak()
    ours = run_nmt(minutes, limit, work, args.set)
    ours["fp32_peak_gflop_s"] = peak
    ours["fraction_of_peak"] = ours["train_gflop_s"] / peak
    rows = {"nmt": ours}
    for name in args.anchor:
        rows[name] = run_anchor(name, minutes, work)
    from nmt.device import machine
    from nmt.io import versions

    result = {"date": stamp, "minutes": minutes, "test_sentences": limit, "quick": args.quick, "set": args.set,
              "machine": {**machine(), "threads": int(THREADS)},
              "results": rows, "ratios": {n: ratios(ours, r) for n, r in rows.items() if n != "nmt"},
              "versions": versions()}
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, torch CPU capability {m['cpu_capability']}, {m['class']} "
          f"(AVX-512 BF16 {m['avx512_bf16']}, AMX {m['amx']}), {m['threads']} threads, torch {m['torch']}; "
          f"nmt trained in {ours['precision']} ({ours['precision_reason']}), the anchors in fp32")
    print(table(rows))
    print(f"\nnmt: {ours['params'] / 1e6:.2f} M params, {ours['steps']} updates ({ours['epochs']:.2f} epochs) "
          f"in {minutes} min; effective {ours['train_tok_s_effective']:.0f} tok/s; greedy BLEU "
          f"{ours['greedy_bleu']:.2f}; {ours['train_gflop_s']:.1f} GFLOP/s = "
          f"{100 * ours['fraction_of_peak']:.0f}% of the {peak:.0f} GFLOP/s fp32 matmul peak")
    for name, r in result["ratios"].items():
        print(f"nmt/{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    print(f"wrote {args.out / f'{stamp}.json'}")


if __name__ == "__main__":
    main()
