"""Request batching for nmt serve: one decoding thread, and requests decoded together.

A request's sentences wait in one queue. The single decoding thread (torch work must not block the
server's event loop, and a model decodes best one batch at a time) takes the oldest request, waits
up to `max_wait` seconds after its arrival for others of its group (GroupKey: the same model and
beam; n-best and attention are each request's own), and starts decoding them together, at most
`max_batch` sentences.

Beam search then runs continuously (nmt.search.BeamSearch): between two of its steps, requests of
its group that came in meanwhile join it while it has room (once the oldest of them has waited
`join_wait` seconds, or they fill the room, so that under load several sentences share one
encoder call), and each request is answered as soon
as its own sentences are done, so a short sentence does not wait for the long ones it shares steps
with, and the batch stays full under load. A request of more sentences than `max_batch` decodes
on its own (nmt serve refuses --max-sentences above --max-batch). Within a group requests start in
arrival order, and a waiting request of another group stops younger ones from joining, so that
the running search drains and that group's turn comes. Greedy search (beam 1) decodes batch by batch. The model is
padding-invariant and search decodes each sentence on its own, whenever it joins, so an answer is
the one `nmt translate` gives (tested in tests/test_serve.py and tests/test_search.py).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from nmt.batches import pad
from nmt.device import autocast
from nmt.results import Translation
from nmt.search import BeamSearch, Hypothesis

if TYPE_CHECKING:
    from nmt.config import DecodeConfig
    from nmt.translate import Translator


class GroupKey(NamedTuple):
    """What a request asks for; requests of one model and beam are decoded together."""

    model: str
    beam: int
    nbest: int
    attention: bool

    @property
    def group(self) -> tuple[str, int]:
        return self.model, self.beam


@dataclass
class Job:
    key: GroupKey
    sentences: list[str]
    future: Future[list[Translation]]
    arrived: float  # time.monotonic()
    hyps: list[list[Hypothesis] | None] = field(default_factory=list)  # per sentence, once searched
    left: int = 0  # sentences still searching


class ShuttingDown(RuntimeError):
    """A request that came, or still waited, when the server stopped."""


@dataclass(frozen=True)
class BatchRecord:
    """Requests that started decoding together, and their sentences."""

    sentences: int
    requests: int


@dataclass
class Running:
    """The beam search in progress and the requests it decodes (by job number)."""

    key: GroupKey
    translator: Translator
    decode: DecodeConfig
    search: BeamSearch
    jobs: dict[int, Job] = field(default_factory=dict)
    # One autocast context for the search's whole life: autocast caches its casts of the weights
    # until its outermost context exits, so a context per step would cast them all again at every
    # step (search_corpus, too, keeps one for the whole corpus).
    precision: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class Batcher:
    """The one decoding thread and its queue. `history` keeps recent batches (how many sentences,
    from how many requests, started decoding together), which tests read to see requests share
    them; `totals` counts since the start the sentences decoded, the rounds of decoding (a
    greedy batch, or a step of beam search) and the sentences in them (GET /health)."""

    def __init__(self, translators: dict[str, Translator], max_batch: int, max_wait: float,
                 join_wait: float = 0.0):
        self.translators, self.max_batch, self.max_wait = translators, max_batch, max_wait
        self.join_wait = join_wait
        self.history: deque[BatchRecord] = deque(maxlen=10_000)
        # (sentences, rounds, sentences in rounds): one tuple, so that a reader sees all at once
        self.totals = (0, 0, 0)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._numbers = itertools.count()

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
        """Stop once the requests being decoded are answered; requests still queued fail."""
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

    # -- the decoding thread ---------------------------------------------------------------------

    def _run(self) -> None:
        running: Running | None = None
        while (jobs := self._take(running)) is not None:
            try:  # (_take only moves requests between lists, under the lock)
                if running is None:
                    if not jobs:
                        continue
                    key = jobs[0].key
                    translator = self.translators[key.model]
                    decode = translator.settings(key.beam, batch_size=self.max_batch)
                    if key.beam == 1:  # greedy: one batch at a time
                        self._decode_batch(translator, decode, jobs)
                        continue
                    running = Running(key, translator, decode, BeamSearch(translator.model, decode))
                    running.precision.enter_context(autocast(translator.device, translator.precision.name))
                if jobs:
                    self._admit(running, jobs)
                if running.search:
                    self._step(running)
                if not running.search:
                    running.precision.close()
                    running = None
            except Exception as err:  # the server stays up; each request hears what went wrong
                for job in jobs + (list(running.jobs.values()) if running else []):
                    if not job.future.done():
                        job.future.set_exception(err)
                if running is not None:
                    running.precision.close()
                running = None

    def _take(self, running: Running | None) -> list[Job] | None:
        """The requests to start decoding now. With no search running: the oldest request and
        those of its group that fit beside it, once they fill a batch or the oldest has waited
        max_wait (requests that queued during the last decode have, so under load batches follow
        each other without a pause); None when closed. With a search running: those of its group
        that fit in its room, without waiting (none yet while the oldest of them has waited less
        than join_wait and they do not fill the room), and none once closed."""
        with self._cond:
            if running is None:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                group, deadline = self._pending[0].key.group, self._pending[0].arrived + self.max_wait
                while (left := deadline - time.monotonic()) > 0 and not self._closed and \
                        sum(len(job.sentences) for job in self._pending if job.key.group == group) < self.max_batch:
                    self._cond.wait(left)
                if self._closed:
                    return None
                room = self.max_batch
            else:
                if self._closed:
                    return []
                group, room = running.key.group, self.max_batch - len(running.search)
                joining = [job for job in self._pending if job.key.group == group]
                if joining and joining[0].arrived + self.join_wait > time.monotonic() and \
                        sum(len(job.sentences) for job in joining) < room:
                    return []  # more may come before the next step: one encoder call for them all
            taken, size = [], 0
            for job in list(self._pending):
                if job.future.cancelled():  # the client went away while it waited
                    self._pending.remove(job)
                    continue
                if job.key.group != group:
                    if running is not None:  # an older request of another group: its turn next
                        break
                    continue
                if size + len(job.sentences) > room and (taken or running is not None):
                    break  # arrival order within the group: younger ones wait behind this one
                self._pending.remove(job)
                if job.future.set_running_or_notify_cancel():  # False: the client went away
                    taken.append(job)
                    size += len(job.sentences)
            return taken

    def _count(self, sentences: int, rounds: int, in_rounds: int) -> None:
        total = self.totals
        self.totals = (total[0] + sentences, total[1] + rounds, total[2] + in_rounds)

    def _decode_batch(self, translator: Translator, decode: DecodeConfig, jobs: list[Job]) -> None:
        sentences = [sentence for job in jobs for sentence in job.sentences]
        hyps = translator.search(sentences, decode)
        self.history.append(BatchRecord(len(sentences), len(jobs)))
        self._count(len(sentences), 1, len(sentences))
        start = 0
        for job in jobs:
            job.future.set_result([translator.translation(line, h, job.key.nbest, job.key.attention)
                                   for line, h in zip(job.sentences, hyps[start : start + len(job.sentences)])])
            start += len(job.sentences)

    def _admit(self, running: Running, jobs: list[Job]) -> None:
        """The jobs' sentences join the search (an empty one is done at once, as in search_corpus)."""
        translator = running.translator
        self.history.append(BatchRecord(sum(len(job.sentences) for job in jobs), len(jobs)))
        sequences, tags = [], []
        for job in jobs:
            number = next(self._numbers)
            running.jobs[number] = job
            job.hyps, job.left = [None] * len(job.sentences), len(job.sentences)
            for i, seq in enumerate(translator.encode(job.sentences, running.decode)):
                if len(seq):
                    sequences.append(seq)
                    tags.append((number, i))
                else:
                    job.hyps[i], job.left = [Hypothesis([], 0.0, 0.0, None)], job.left - 1
        if sequences:
            src_ids, src_lens = pad(sequences)
            try:  # add() changes nothing when it fails: the requests already searching go on
                running.search.add(src_ids.to(translator.device), src_lens.to(translator.device), tags)
            except Exception as err:
                for number in {number for number, _ in tags}:
                    running.jobs.pop(number).future.set_exception(err)
        for number in [n for n, job in running.jobs.items() if job.left == 0]:
            self._answer(running, number)

    def _step(self, running: Running) -> None:
        live = len(running.search)
        done = running.search.step()
        self._count(0, 1, live)
        for (number, i), hyps in done:
            job = running.jobs[number]
            job.hyps[i], job.left = hyps, job.left - 1
            if job.left == 0:
                self._answer(running, number)

    def _answer(self, running: Running, number: int) -> None:
        job = running.jobs.pop(number)
        try:
            results = [running.translator.translation(line, hyps, job.key.nbest, job.key.attention)
                       for line, hyps in zip(job.sentences, job.hyps)]
        except Exception as err:  # this request's alone
            job.future.set_exception(err)
            return
        self._count(len(job.sentences), 0, 0)
        job.future.set_result(results)
