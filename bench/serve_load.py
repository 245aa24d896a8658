"""Load on `nmt serve` against offline decoding of the same sentences, in one run.

    python bench/serve_load.py --model exp/de-en                  # starts nmt serve itself
    python bench/serve_load.py --model exp/de-en --url http://127.0.0.1:8080   # a running server

Measures, on the test sentences of an experiment (data/test.src, the first --limit):
- throughput: --clients (16) concurrent clients, each sending one sentence per request, until
  every sentence is translated or --max-seconds pass: sentences/s, against the offline throughput
  of the same sentences through nmt.Translator (what `nmt translate` runs) at the same beam, and
  the ratio of the two;
- latency: one client, one sentence per request, for the first --latency-sentences: median and
  p90, against the time to decode each of those sentences alone offline.
Every answer is checked against the offline translation (`mismatches` should be 0). The server
runs with --threads torch threads and the offline decoding with as many; the clients run in this
process, on the same machine. The server is stopped before the offline decoding, so the two never
share the processor. While the clients run it counts the CPU time of the clients, of the server
process and of its workers (nmt serve decodes in worker processes unless --in-process is given).
Writes <out>/serve-<date>.json with the machine (nmt.device.machine) and
prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
THREADS = "2"


def start_server(model: Path, beam: int, threads: str, log: Path, join_wait_ms: float | None = None,
                 in_process: bool = False, workers: int | None = None) -> tuple[subprocess.Popen, str]:
    """`nmt serve` on a free loopback port; returns it and its URL once it listens."""
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    env.pop("NMT_API_KEY", None)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "nmt.cli", "serve", "--model", f"bench={model}",
                                    "--port", "0", "--threads", threads, "--max-beam", str(max(beam, 16)),
                                    *([] if join_wait_ms is None else ["--join-wait-ms", str(join_wait_ms)]),
                                    *(["--in-process"] if in_process else []),
                                    *([] if workers is None else ["--workers", str(workers)])],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (found := re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"nmt serve did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return process, found[1]


async def throughput(url: str, sentences: list[str], beam: int, clients: int, max_seconds: float) -> dict:
    answers: dict[int, str] = {}
    numbers = iter(range(len(sentences)))
    stop = time.monotonic() + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        for i in numbers:
            if time.monotonic() > stop:
                return
            response = await http.post("/translate", json={"sentences": [sentences[i]], "beam": beam})
            response.raise_for_status()
            answers[i] = response.json()["translations"][0]["translation"]

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        await http.post("/translate", json={"sentences": sentences[:clients], "beam": beam})  # warm up
        before = (await http.get("/health")).json()
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
        after = (await http.get("/health")).json()
    rounds = after["rounds"] - before["rounds"]  # the server's rounds of decoding: how full they were
    in_rounds = after["mean_batch"] * after["rounds"] - before["mean_batch"] * before["rounds"]
    return {"answers": answers, "seconds": seconds, "sent_per_s": len(answers) / seconds, "rounds": rounds,
            "mean_batch": in_rounds / max(rounds, 1)}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of this process, or of process `pid` from /proc."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (nmt serve's worker and its resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a server process and of the processes it started."""
    return {"server": cpu_seconds(pid), "workers": sum(cpu_seconds(child) for child in descendants(pid))}


def latencies(url: str, sentences: list[str], beam: int, max_seconds: float) -> tuple[list[float], list[str]]:
    times, answers = [], []
    stop = time.monotonic() + max_seconds
    with httpx.Client(base_url=url, timeout=120) as http:
        for sentence in sentences:
            if time.monotonic() > stop:
                break
            started = time.perf_counter()
            response = http.post("/translate", json={"sentences": [sentence], "beam": beam})
            times.append(time.perf_counter() - started)
            response.raise_for_status()
            answers.append(response.json()["translations"][0]["translation"])
    return times, answers


def spread(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(ordered), "median_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def offline(model: Path, sentences: list[str], single: list[str], beam: int, threads: str) -> dict:
    import torch

    from nmt import Translator

    torch.set_num_threads(int(threads))
    translator = Translator.load(model)
    translator.translations(sentences[:16], beam=beam)  # warm up, as the server was
    started = time.perf_counter()
    texts = [t.text for t in translator.translations(sentences, beam=beam)]
    seconds = time.perf_counter() - started
    alone = []
    for sentence in single:
        started = time.perf_counter()
        translator.translations([sentence], beam=beam)
        alone.append(time.perf_counter() - started)
    return {"texts": texts, "seconds": seconds, "sent_per_s": len(sentences) / seconds, "alone": alone,
            "batch_size": translator.decode.batch_size, "precision": translator.precision.record()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="experiment directory (with data/test.src)")
    parser.add_argument("--url", help="a running nmt serve serving --model as its default (default: start one)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--limit", type=int, default=1000, help="test sentences for the throughput")
    parser.add_argument("--latency-sentences", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=600, help="bound on each measurement")
    parser.add_argument("--threads", default=THREADS, help="torch threads of the server and offline")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--join-wait-ms", type=float, default=None, help="the server's (default: its own)")
    parser.add_argument("--in-process", action="store_true", help="nmt serve --in-process: no worker process")
    parser.add_argument("--workers", type=int, default=None,
                        help="nmt serve --workers: decoding processes (default: the server's own)")
    args = parser.parse_args()

    from nmt.device import machine
    from nmt.io import read_lines, versions

    sentences = [s for s in read_lines(args.model / "data" / "test.src") if s.strip()][: args.limit]
    single = sentences[: args.latency_sentences]
    process = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url is None:
            process, url = start_server(args.model, args.beam, args.threads, Path(tmp) / "serve.log",
                                        args.join_wait_ms, args.in_process, args.workers)
        else:
            url = args.url
        try:
            # what the clients and the server spend of the two cores while the clients run
            client_cpu, server_cpu = cpu_seconds(), tree_cpu(process.pid) if process else None
            served = asyncio.run(throughput(url, sentences, args.beam, args.clients, args.max_seconds))
            served["client_cpu_s"] = cpu_seconds() - client_cpu
            if process is not None:
                after = tree_cpu(process.pid)
                served["server_cpu_s"] = after["server"] - server_cpu["server"]
                served["worker_cpu_s"] = after["workers"] - server_cpu["workers"]
            latency, latency_answers = latencies(url, single, args.beam, args.max_seconds)
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    local = offline(args.model, sentences, single, args.beam, args.threads)
    mismatches = sum(text != local["texts"][i] for i, text in served["answers"].items())
    mismatches += sum(text != local["texts"][i] for i, text in enumerate(latency_answers))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    result = {
        "date": stamp, "model": str(args.model), "beam": args.beam, "clients": args.clients,
        "join_wait_ms": args.join_wait_ms, "in_process": args.in_process, "workers": args.workers,
        "sentences": len(sentences), "answered": len(served["answers"]), "mismatches": mismatches,
        "machine": {**machine(), "threads": int(args.threads)},
        "served": {"sent_per_s": served["sent_per_s"], "seconds": served["seconds"], "rounds": served["rounds"],
                   "mean_batch": served["mean_batch"], "client_cpu_s": served["client_cpu_s"],
                   "server_cpu_s": served.get("server_cpu_s"), "worker_cpu_s": served.get("worker_cpu_s")},
        "offline": {"sent_per_s": local["sent_per_s"], "seconds": local["seconds"],
                    "batch_size": local["batch_size"], "precision": local["precision"]},
        "throughput_ratio": served["sent_per_s"] / local["sent_per_s"],
        "latency_served": spread(latency), "latency_offline_alone": spread(local["alone"]),
        "versions": versions(),
    }
    result["latency_ratio"] = result["latency_served"]["median_ms"] / result["latency_offline_alone"]["median_ms"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    m = result["machine"]
    print(f"machine: {m['cpu']} ({m['class']}), {m['threads']} threads; beam {args.beam}, {args.clients} clients")
    print(f"served {result['answered']}/{len(sentences)} sentences at {served['sent_per_s']:.1f} sent/s; "
          f"offline {local['sent_per_s']:.1f} sent/s (batch {local['batch_size']}); "
          f"ratio {result['throughput_ratio']:.2f}; mismatches {mismatches}; the server's mean batch "
          f"{served['mean_batch']:.1f} sentences")
    server_cpu = ""
    if served.get("server_cpu_s") is not None:
        server_cpu = f", the server {served['server_cpu_s']:.1f} s, its workers {served['worker_cpu_s']:.1f} s"
    print(f"CPU time while the clients ran ({served['seconds']:.1f} s): the clients {served['client_cpu_s']:.1f} s"
          f"{server_cpu}")
    ls, lo = result["latency_served"], result["latency_offline_alone"]
    print(f"latency, one client: median {ls['median_ms']:.1f} ms, p90 {ls['p90_ms']:.1f} ms; one sentence "
          f"decoded alone offline: median {lo['median_ms']:.1f} ms, p90 {lo['p90_ms']:.1f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
