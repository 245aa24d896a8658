"""The `nmt` command: each subcommand parses its arguments and calls one function of a stage's
module.

An NmtError (bad recipe key, missing file, corrupt checkpoint ...) becomes one line on stderr and
exit status 2; Ctrl-C exits with 130. Each command imports its stage's module when it runs: they
import torch, which takes seconds, and `nmt --help` should not wait for it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from nmt.config import PRECISIONS, load_recipe
from nmt.errors import Interrupted, NmtError


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a name under recipes/ or a path to a recipe YAML file")
    parser.add_argument("--exp", type=Path, help="experiment directory (default: exp/<recipe>)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set model.hidden_size=256 (repeatable)",
    )


def _load(args):
    config = load_recipe(args.recipe, args.overrides)
    if getattr(args, "init_from", None) is not None:  # train.init_from, whatever YAML would make of the path
        config.train.init_from = str(args.init_from)
    exp_dir = args.exp if args.exp is not None else Path("exp") / config.name
    return config, exp_dir


def cmd_data(args) -> None:
    from nmt.corpus import run_data_stage

    config, exp_dir = _load(args)
    stats = run_data_stage(config, exp_dir)
    for split, s in stats.items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "none dropped"
        print(f"{split}: {s['pairs_kept']} of {s['pairs_in']} pairs ({dropped})")
    print(f"wrote {exp_dir / 'data'}")


def cmd_spm(args) -> None:
    from nmt.subword import run_spm_stage

    config, exp_dir = _load(args)
    manifest = run_spm_stage(config, exp_dir)
    sizes = manifest["vocab_size"]
    if manifest["init_from"]:
        print(f"SentencePiece models and output vocabulary of {manifest['init_from']['path']} (the recipe's "
              "keys for training SentencePiece are not used)")
    if manifest["unk_targets"]:
        print(f"warning: {manifest['unk_targets']} target pieces of the training split are not in the "
              "output vocabulary: they train as unk")
    print(f"SentencePiece vocab: src {sizes['src']}, tgt {sizes['tgt']}; output layer {sizes['output']}")
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['pairs']} pairs, {s['src_tokens']} src / {s['tgt_tokens']} tgt pieces")
    print(f"wrote {exp_dir / 'spm'}")


def cmd_train(args) -> None:
    from nmt.train import train

    config, exp_dir = _load(args)
    summary = train(config, exp_dir)
    print(
        f"best valid BLEU {summary['best_valid_bleu']:.2f} at step {summary['best_step']}; "
        f"{summary['steps']} steps in {summary['train_seconds']:.0f} s; wrote {exp_dir / 'model'}"
    )


def cmd_evaluate(args) -> None:
    from nmt.evaluate import evaluate_files, evaluate_recipe, format_scores

    if args.recipe is None:
        if not args.hyp or not args.ref:
            raise NmtError("nmt evaluate: give a RECIPE, or --hyp FILE and --ref FILE")
        if args.model:
            raise NmtError("--model decodes a recipe's test sets: give a RECIPE")
        results = {"hyp": evaluate_files(args.hyp, args.ref)}
    else:
        config, exp_dir = _load(args)
        results = evaluate_recipe(config, exp_dir, beam_size=args.beam, device=args.device, models=args.model)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for name, scores in results.items():
            print(format_scores(name, scores))


def cmd_compare(args) -> None:
    from nmt.compare import run_compare
    from nmt.evaluate import LENGTH_EDGES

    if args.buckets is None:
        args.buckets = ",".join(map(str, LENGTH_EDGES))
    try:
        edges = [int(x) for x in args.buckets.split(",")]
    except ValueError:
        raise NmtError(f"--buckets: expected comma-separated word counts, got '{args.buckets}'") from None
    if not edges or edges != sorted(set(edges)) or edges[0] <= 0:
        raise NmtError(f"--buckets: expected increasing positive word counts, got '{args.buckets}'")
    if args.heatmaps < 0:
        raise NmtError(f"--heatmaps must be 0 or more, got {args.heatmaps}")
    if not 0 <= args.joined <= 8:
        raise NmtError(f"--joined must be between 0 and 8 sentences, got {args.joined}")
    out = args.out if args.out is not None else args.experiments[0] / "compare"
    report = run_compare(args.experiments, out, edges, heatmaps=args.heatmaps, device=args.device,
                         joined=args.joined)
    print(report.read_text())
    print(f"wrote {report.parent}")


def cmd_translate(args) -> None:
    from nmt.stream import translate_stream

    translate_stream(
        models=args.model, input_path=args.input, output_path=args.output, beam_size=args.beam,
        batch_size=args.batch_size, nbest=args.nbest, alignments=args.alignments,
        device=args.device, precision=args.precision,
    )


def cmd_serve(args) -> None:
    try:
        from nmt.serve import ServeSettings, run_server
    except ImportError as err:
        raise NmtError(f"nmt serve needs FastAPI and uvicorn ({err.name} is not installed): "
                       "pip install 'nmt[serve]'") from None

    settings = ServeSettings(max_sentences=args.max_sentences, max_chars=args.max_chars,
                             max_body_bytes=args.max_body_bytes, max_beam=args.max_beam,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             join_wait_ms=args.join_wait_ms)
    run_server(args.model, host=args.host, port=args.port, device=args.device,
               precision=args.precision, settings=settings, threads=args.threads, in_process=args.in_process,
               workers=args.workers)


def cmd_sweep(args) -> None:
    from nmt.sweep import run_sweep

    report = run_sweep(args.recipe, args.sweep, args.out, args.overrides, storage=args.storage, device=args.device)
    print(report.read_text())
    print(f"wrote {report.parent}")


def cmd_average(args) -> None:
    from nmt.average import run_average

    averaged = run_average(args.checkpoints, args.output, last=args.last, best=args.best)
    print(f"averaged {len(averaged)} checkpoints:")
    for source in averaged:
        bleu = f"valid BLEU {source['valid_bleu']:.2f}" if source["valid_bleu"] is not None else "no valid BLEU"
        print(f"  {source['path']}  step {source['step']}  {bleu}")
    print(f"wrote {args.output}")


DEVICE_HELP = "auto | cpu | cuda | cuda:N: where to decode (default auto: a GPU if there is one)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Neural machine translation with attention-based RNN encoder-decoders "
                    "(Bahdanau, Luong, fixed context).",
        epilog="A recipe (recipes/NAME.yaml) runs through the stages in order:\n"
               "  nmt data NAME -> nmt spm NAME -> nmt train NAME -> nmt evaluate NAME\n"
               "(or `make recipe=NAME train`). Then:\n"
               "  echo 'Ein Hund rennt.' | nmt translate --model exp/NAME\n"
               "Every recipe key can be changed with --set key.path=value. "
               "`nmt COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch and clean the recipe's corpora")
    _recipe_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("spm", help="train SentencePiece and encode every split")
    _recipe_args(p)
    p.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                   help="take this checkpoint's SentencePiece models and output vocabulary instead of "
                        "training new ones, to fine-tune it (train.init_from)")
    p.set_defaults(func=cmd_spm)

    p = sub.add_parser("train", help="train (or resume) the recipe's model")
    _recipe_args(p)
    p.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights (or an experiment's best.pt) "
                        "with a fresh optimizer, schedule and step count; run `nmt spm` with it first. "
                        "A run that has a last.pt resumes instead (train.init_from)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="decode the recipe's test sets and score them, or score files")
    p.add_argument("recipe", nargs="?", help="a recipe name or YAML path")
    p.add_argument("--exp", type=Path, help="experiment directory (default: exp/<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--hyp", type=Path, help="hypothesis file (with --ref, scores files only)")
    p.add_argument("--ref", type=Path, action="append", default=[], help="reference file(s)")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the recipe's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="checkpoint or experiment directory to decode with (default: the experiment's "
                        "own); repeat it to decode with an ensemble")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="decode one test set with trained experiments: report, plots",
                       description="Decode the first experiment's first test set with each experiment's "
                                   "model (beam search with its decode settings, and greedy) and report "
                                   "BLEU, chrF, BLEU by source length and attention heat maps. "
                                   "`make recipe=NAME compare` trains NAME and its fixed-context twin "
                                   "(exp/NAME-fixed) and runs this on both.")
    p.add_argument("experiments", nargs="+", type=Path, metavar="EXP",
                   help="trained experiment directories, e.g. exp/de-en exp/de-en-fixed")
    p.add_argument("--out", type=Path, help="output directory (default: <first EXP>/compare)")
    p.add_argument("--buckets", default=None,
                   help="source-length bucket edges in words (default: 10,20,30,40, as nmt evaluate)")
    p.add_argument("--heatmaps", type=int, default=4, help="attention heat maps to draw")
    p.add_argument("--joined", type=int, default=0, metavar="K",
                   help="also decode inputs of k = 2..K consecutive test sentences joined (on both sides) "
                        "and report BLEU by length up to their length (default 0: none)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("translate", help="translate raw text line by line")
    p.add_argument("--model", required=True, type=Path, action="append",
                   help="experiment directory or checkpoint; repeat it to decode with an ensemble "
                        "(probabilities averaged; the first model's decode settings)")
    p.add_argument("-i", "--input", type=Path, help="input file (default: stdin)")
    p.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="sentences per batch")
    p.add_argument("--nbest", type=int, default=1, help="print the K best, tab-separated with scores")
    p.add_argument("--alignments", action="store_true", help="append hard alignments (i-j)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 or fp32 matrix products; auto: bf16 where the hardware has it "
                        "(default: the checkpoint's decode.precision)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("serve", help="translate over HTTP (JSON API and an attention page)",
                       description="Serve models over HTTP: POST /translate, GET /models, GET /health, "
                                   "the OpenAPI description at /openapi.json and a page at /. "
                                   "Concurrent requests are decoded together. Listens on 127.0.0.1; "
                                   "another --host needs an API key in NMT_API_KEY, which requests "
                                   "then send as 'Authorization: Bearer <key>'.")
    p.add_argument("--model", required=True, action="append", metavar="[NAME=]PATH",
                   help="experiment directory or checkpoint, named NAME (default: the directory's "
                        "name or the checkpoint's stem); comma-separated paths make an ensemble; "
                        "repeat it to serve several (the first is the default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free one)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 or fp32 matrix products (default: each checkpoint's decode.precision)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-batch", type=int, default=64, help="sentences decoded together (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch (default 5)")
    p.add_argument("--join-wait-ms", type=float, default=20.0,
                   help="how long requests that came while a search runs may wait to join it "
                        "together, in one encoder call (default 20; 0: at its next step)")
    p.add_argument("--max-sentences", type=int, default=64, help="sentences per request (default 64)")
    p.add_argument("--max-chars", type=int, default=1000, help="characters per sentence (default 1000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="request body size (default 1048576)")
    p.add_argument("--max-beam", type=int, default=16, help="largest beam a request may ask for (default 16)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes, each batching the requests it is given and taking its "
                        "share of --threads (default: 2 on a CPU with 2 threads or more, else 1)")
    p.add_argument("--in-process", action="store_true",
                   help="decode in a thread of the server's process instead of a worker process of "
                        "its own (which the server's Python does not slow down)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sweep", help="search recipe settings with Optuna: trials ranked by valid BLEU",
                       description="Run the trials of a sweep file (sweeps/*.yaml): each an experiment "
                                   "directory SWEEP_DIR/trials/NNNN trained with the sweep's budget, ranked "
                                   "by validation BLEU in SWEEP_DIR/report.md, the best as SWEEP_DIR/best.yaml. "
                                   "Run it again to continue a killed sweep; start it on several machines "
                                   "with the same --storage to share one study.")
    p.add_argument("recipe", help="the base recipe: a name under recipes/ or a path to a recipe YAML file")
    p.add_argument("sweep", type=Path, help="the sweep file, e.g. sweeps/cells.yaml")
    p.add_argument("--out", type=Path, help="sweep directory (default: exp/<recipe>-<sweep file name>)")
    p.add_argument("--storage", metavar="URL",
                   help="an Optuna storage URL that workers on several machines share, e.g. "
                        "postgresql://user:password@host/db (default: a journal file in the sweep directory)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key in every trial (repeatable)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP + "; for the report's decodes")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("average", help="average the weights of checkpoints into one",
                       description="Average the weights of an experiment's kept step checkpoints "
                                   "(train.keep_checkpoints), the K newest or the K best by validation "
                                   "BLEU, or of checkpoint files of one model, into one checkpoint for "
                                   "nmt translate and nmt evaluate --model.")
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="EXP_OR_CHECKPOINT",
                   help="an experiment directory (with --last or --best), or checkpoint files")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, metavar="K", help="the K newest kept step checkpoints")
    which.add_argument("--best", type=int, metavar="K", help="the K kept step checkpoints best by valid BLEU")
    p.add_argument("-o", "--output", type=Path, required=True, help="the averaged checkpoint to write")
    p.set_defaults(func=cmd_average)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    where = f"nmt {args.command}"
    try:
        args.func(args)
    except Interrupted as err:  # the work is saved: say how to go on
        print(f"{where}: {err}: run `nmt {shlex.join(argv)}` again to resume", file=sys.stderr)
        return 130
    except NmtError as err:
        print(f"{where}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:  # the operating system refused: name what it refused
        name = f"{err.filename}: " if err.filename else ""
        print(f"{where}: error: {name}{err.strerror or err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        print(f"{where}: error: out of memory ({first[:200]}); lower the model sizes, "
              "train.batch_tokens or decode.batch_size", file=sys.stderr)
        return 2
    return 0


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err) or "out of memory" in str(err)


if __name__ == "__main__":
    sys.exit(main())
