"""Request batching for nmt serve: one decoding thread, and requests decoded together.

A request's sentences wait in one queue. The single decoding thread (torch work must not block
the server's event loop, and a model decodes best one batch at a time) takes the oldest request,
waits up to `max_wait` seconds after its arrival for others that agree with it on model, beam,
nbest and attention (a GroupKey), and decodes them as one batch of at most `max_batch` sentences;
each request gets its own results back, in order. Requests that queued while the thread was
decoding have waited already, so under load one batch follows the other without a pause. The model
is padding-invariant and search decodes each sentence of a batch on its own, so a batched answer
is the one `nmt translate` gives (tested in tests/test_serve.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from nmt.results import Translation

if TYPE_CHECKING:
    from nmt.translate import Translator


class GroupKey(NamedTuple):
    """Requests decode together when they agree on all of these."""

    model: str
    beam: int
    nbest: int
    attention: bool


@dataclass
class Job:
    key: GroupKey
    sentences: list[str]
    future: Future[list[Translation]]
    arrived: float  # time.monotonic()


class ShuttingDown(RuntimeError):
    """A request that came, or still waited, when the server stopped."""


@dataclass(frozen=True)
class BatchRecord:
    sentences: int
    requests: int


class Batcher:
    """The one decoding thread and its queue. `history` keeps the size of recent batches (how
    many sentences, from how many requests), which tests read to see requests share batches."""

    def __init__(self, translators: dict[str, Translator], max_batch: int, max_wait: float):
        self.translators, self.max_batch, self.max_wait = translators, max_batch, max_wait
        self.history: deque[BatchRecord] = deque(maxlen=10_000)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, key: GroupKey, sentences: list[str]) -> Future[list[Translation]]:
        future: Future[list[Translation]] = Future()
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._thread is None:  # started with the first request, in whichever app runs
                self._thread = threading.Thread(target=self._run, name="nmt-decode", daemon=True)
                self._thread.start()
            self._pending.append(Job(key, sentences, future, time.monotonic()))
            self._cond.notify()
        return future

    def open(self) -> None:
        """Take requests again after close(): a server's lifespan may start more than once (a
        test client's does, each time it is entered)."""
        with self._cond:
            if self._closed:
                self._closed, self._thread = False, None

    def close(self) -> None:
        """Stop after the batch in hand; requests still queued fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        for job in self._pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
        self._pending.clear()

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            if jobs:
                self._decode(jobs)

    def _next_batch(self) -> list[Job] | None:
        """The oldest request and those that may join it, once the batch is full or the oldest
        has waited max_wait (requests that queued during the last decode have, so under load
        batches follow each other without a pause); [] if their clients went away, None when
        closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key, deadline = self._pending[0].key, self._pending[0].arrived + self.max_wait
            while (left := deadline - time.monotonic()) > 0 and not self._closed and \
                    sum(len(job.sentences) for job in self._pending if job.key == key) < self.max_batch:
                self._cond.wait(left)
            taken, size = [], 0
            for job in list(self._pending):
                if job.key == key and (not taken or size + len(job.sentences) <= self.max_batch):
                    self._pending.remove(job)
                    if job.future.set_running_or_notify_cancel():  # False: the client went away
                        taken.append(job)
                        size += len(job.sentences)
            return taken

    def _decode(self, jobs: list[Job]) -> None:
        key = jobs[0].key
        sentences = [sentence for job in jobs for sentence in job.sentences]
        try:
            translator = self.translators[key.model]
            decode = translator.settings(key.beam, key.nbest, batch_size=min(len(sentences), self.max_batch))
            results = translator.results(sentences, decode, key.nbest, key.attention)
        except Exception as err:  # the server stays up; each request hears what went wrong
            for job in jobs:
                job.future.set_exception(err)
            return
        self.history.append(BatchRecord(len(sentences), len(jobs)))
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.sentences)])
            start += len(job.sentences)
