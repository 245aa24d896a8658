"""nmt serve's decoder in a process of its own: the Batcher (nmt.batcher) behind a pipe.

In one process the server's event loop and the decoding thread share one interpreter lock, and
both are mostly Python: parsing and answering requests, and the beam search's bookkeeping between
its small matrix products. A worker process has its own lock, so the two run side by side on two
cores. The worker loads the models itself (from the paths the command line named) and runs a
Batcher; the server sends each request's sentences with a number and gets back the Translations
(plain records, cheap to pickle) with the Batcher's totals for GET /health.

BatcherProcess has the Batcher's interface (submit, open, close, totals), so the app does not
know which one it has. If the worker dies, the requests it held fail with the reason, requests
are refused with 503 while a new worker loads, and the server stays up.

WorkerPool runs several workers (`nmt serve --workers N`), each with its share of the threads, and
gives each request to the one with the fewest sentences outstanding. Beam search over the few
sentences of concurrent one-sentence clients is a chain of small matrix products that two torch
threads barely split, so on a CPU two single-threaded workers, each batching its half of the
clients, can keep both cores busy where one worker keeps about one.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import pickle
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmt.batcher import Batcher, GroupKey, ShuttingDown
from nmt.errors import NmtError

if TYPE_CHECKING:
    from nmt.results import Translation


@dataclass(frozen=True)
class WorkerSpec:
    """What the worker needs to load the models and batch as the server was told."""

    models: dict[str, list[str]]  # name -> the paths of a model (several: an ensemble)
    device: str
    precision: str | None
    threads: int | None
    max_batch: int
    max_wait: float  # seconds
    join_wait: float  # seconds


class WorkerGone(RuntimeError):
    """The decoding process ended while it held this request."""


def portable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError that says the same."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def work(conn: Connection, spec: WorkerSpec) -> None:
    """The worker process: load the models, then take requests until the server says stop (None)
    or goes away. Answers leave from the decoding thread as each request is done."""
    import torch

    from nmt.translate import Translator

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    said: list[str] = []  # the lines loading says (which precision runs), for the server to print
    try:
        translators = {name: Translator.load(paths, spec.device, spec.precision, log=said.append)
                       for name, paths in spec.models.items()}
    except Exception as err:
        conn.send(("failed", f"{err}"))
        return
    batcher = Batcher(translators, spec.max_batch, spec.max_wait, spec.join_wait)
    sending = threading.Lock()
    futures: dict[int, Future[list[Translation]]] = {}

    def answer(number: int, future: Future[list[Translation]]) -> None:
        futures.pop(number, None)
        if future.cancelled():
            outcome: tuple[str, Any] = ("cancelled", None)
        elif (err := future.exception()) is not None:
            outcome = ("error", portable(err))
        else:
            outcome = ("ok", future.result())
        with sending:
            conn.send(("answer", number, *outcome, batcher.totals))

    conn.send(("ready", list(dict.fromkeys(said))))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server went away
            break
        if message is None:
            break
        kind, number, payload = message
        if kind == "submit":
            key, sentences = payload
            try:
                future = batcher.submit(GroupKey(*key), sentences)
            except ShuttingDown as err:
                with sending:
                    conn.send(("answer", number, "error", err, batcher.totals))
                continue
            futures[number] = future
            future.add_done_callback(lambda f, number=number: answer(number, f))
        elif kind == "cancel" and (future := futures.get(number)) is not None:
            future.cancel()  # only while it waits: a request being decoded finishes
    batcher.close()  # answers the requests being decoded; those still waiting fail
    with sending, contextlib.suppress(OSError):
        conn.send(("closed", None))


class BatcherProcess:
    """The server's side: a worker process and a thread that reads its answers."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.totals = (0, 0, 0)  # the worker's Batcher.totals, as of its last answer
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._futures: dict[int, Future[list[Translation]]] = {}
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self.restarts = 0  # workers started again after one died
        self.outstanding = 0  # sentences submitted and not yet answered (WorkerPool balances on it)

    # -- the worker's life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and wait until its models are loaded; NmtError if it cannot."""
        # spawn, not fork: the server process already runs threads (and torch's pools)
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=work, args=(theirs, self.spec), name="nmt-worker", daemon=True)
        process.start()
        theirs.close()
        try:
            kind, detail = ours.recv()
        except (EOFError, OSError):
            process.join()
            raise NmtError(f"nmt serve: the decoding process ended while it loaded the models "
                           f"(exit code {process.exitcode})") from None
        if kind != "ready":
            process.join()
            raise NmtError(f"nmt serve: the decoding process could not load the models: {detail}")
        for line in detail:
            print(line, file=sys.stderr, flush=True)
        with self._lock:
            self._conn, self._process = ours, process
        self._reader = threading.Thread(target=self._read, args=(ours, process), name="nmt-answers", daemon=True)
        self._reader.start()

    def open(self) -> None:
        """Take requests again (a server's lifespan may start more than once)."""
        with self._lock:
            self._closed = False
            running = self._conn is not None
        if not running:
            self.start()

    def close(self) -> None:
        """Stop once the requests being decoded are answered; requests still queued fail."""
        with self._lock:
            self._closed = True
            conn, process, reader = self._conn, self._process, self._reader
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
        if reader is not None:
            reader.join(120)
        if process is not None:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        self._fail_all(ShuttingDown("the server is shutting down"))

    # -- requests ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """A worker is there to take requests (not while one restarts or after close)."""
        return self._conn is not None and not self._closed

    def submit(self, key: GroupKey, sentences: list[str]) -> Future[list[Translation]]:
        future: Future[list[Translation]] = Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._conn is None:
                raise ShuttingDown("the decoding process is restarting; try again in a few seconds")
            number = next(self._numbers)
            self._futures[number] = future
            try:
                self._conn.send(("submit", number, (tuple(key), sentences)))
            except OSError:  # it has just died: the reader is about to start another
                del self._futures[number]
                raise ShuttingDown("the decoding process is restarting; try again in a few seconds") from None
            self.outstanding += len(sentences)
        future.add_done_callback(lambda f: self._done(f, number, len(sentences)))
        return future

    def _done(self, future: Future, number: int, sentences: int) -> None:
        with self._lock:
            self.outstanding -= sentences
        if future.cancelled():
            self._cancel(number)

    def _cancel(self, number: int) -> None:
        with self._lock:
            self._futures.pop(number, None)
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(("cancel", number, None))

    def _read(self, conn: Connection, process: multiprocessing.process.BaseProcess) -> None:
        """Hand each answer to its request; when the worker dies, fail what it held and start
        another (unless the server is stopping)."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "closed":
                break
            _, number, outcome, payload, totals = message
            self.totals = totals
            with self._lock:
                future = self._futures.pop(number, None)
            if future is None or not future.set_running_or_notify_cancel():
                continue  # the client went away
            if outcome == "ok":
                future.set_result(payload)
            else:
                future.set_exception(payload if outcome == "error" else ShuttingDown("cancelled"))
        conn.close()
        process.join(30)
        with self._lock:
            self._conn = None
            closed = self._closed
        if closed:
            return
        self._fail_all(WorkerGone(f"the decoding process ended (exit code {process.exitcode}) "
                                  "while it decoded this request"))
        self.restarts += 1
        print(f"nmt serve: the decoding process ended (exit code {process.exitcode}); starting another",
              file=sys.stderr, flush=True)
        try:
            self.start()
        except NmtError as err:  # the models loaded before and do not now: every request hears 503
            print(err, file=sys.stderr, flush=True)

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            futures, self._futures = self._futures, {}
        for future in futures.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(err)


class WorkerPool:
    """Several worker processes behind the Batcher's interface. A request goes whole to the live
    worker with the fewest sentences outstanding (the first on ties), so that under load each
    batches about as many; totals are the workers' summed. Each worker restarts on its own when
    it dies, and requests go to the others meanwhile."""

    def __init__(self, spec: WorkerSpec, workers: int):
        if workers < 1:
            raise NmtError(f"--workers must be at least 1, got {workers}")
        self.workers = [BatcherProcess(spec) for _ in range(workers)]
        self._lock = threading.Lock()

    @property
    def totals(self) -> tuple[int, int, int]:
        return tuple(sum(column) for column in zip(*(w.totals for w in self.workers)))  # type: ignore[return-value]

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    def start(self) -> None:
        try:
            for worker in self.workers:
                worker.start()
        except BaseException:
            self.close()
            raise

    def open(self) -> None:
        for worker in self.workers:
            worker.open()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def submit(self, key: GroupKey, sentences: list[str]) -> Future[list[Translation]]:
        with self._lock:  # so that requests arriving together see each other's counts
            live = [w for w in self.workers if w.alive] or self.workers  # none live: say why
            return min(live, key=lambda w: w.outstanding).submit(key, sentences)


def worker_spec(models: dict[str, list[Path]], device: str, precision: str | None, threads: int | None,
                max_batch: int, max_wait_ms: float, join_wait_ms: float) -> WorkerSpec:
    return WorkerSpec({name: [str(p) for p in paths] for name, paths in models.items()}, device, precision,
                      threads, max_batch, max_wait_ms / 1000, join_wait_ms / 1000)
