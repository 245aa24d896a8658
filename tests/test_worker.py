"""nmt serve's worker process (nmt.worker): the same answers as in process, and a server that
outlives its worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from nmt import Translator
from nmt.batcher import GroupKey, ShuttingDown
from nmt.errors import NmtError
from nmt.io import read_lines
from nmt.worker import BatcherProcess, WorkerGone, WorkerPool, worker_spec


@pytest.fixture(scope="module")
def exp(trained_exp) -> Path:
    return trained_exp[1]


@pytest.fixture(scope="module")
def pool(exp) -> list[str]:
    return read_lines(exp / "data" / "test.src")[:12]


def spec(models: dict[str, list[Path]]):
    return worker_spec(models, "cpu", None, 1, max_batch=8, max_wait_ms=5.0, join_wait_ms=0.0)


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_worker_answers_as_the_translator_does(exp, pool):
    translator = Translator.load(exp, device="cpu")
    batcher = BatcherProcess(spec({"tiny": [exp]}))
    batcher.start()
    try:
        keys = [GroupKey("tiny", 3, 2, True), GroupKey("tiny", 1, 1, False)]
        futures = [(key, pool[i : i + 3], batcher.submit(key, pool[i : i + 3]))
                   for i in range(0, len(pool), 3) for key in keys]
        for key, sentences, future in futures:
            got = future.result(timeout=120)
            expected = translator.translations(sentences, beam=key.beam, nbest=key.nbest, attention=key.attention)
            assert [t.source for t in got] == sentences
            assert [[c.text for c in t.hypotheses] for t in got] == [[c.text for c in t.hypotheses] for t in expected]
            if key.attention:
                rows = [row for t in got for c in t.hypotheses if c.attention for row in c.attention.weights]
                assert rows and all(abs(sum(row) - 1) < 1e-4 for row in rows)
        assert batcher.totals[0] == 2 * len(pool)  # every sentence decoded, counted by the worker
    finally:
        batcher.close()
    with pytest.raises(ShuttingDown, match="shutting down"):
        batcher.submit(keys[0], pool[:1])
    batcher.open()  # a lifespan that starts again starts a worker again
    try:
        [again] = batcher.submit(keys[1], pool[:1]).result(timeout=120)
        assert again.text == translator.translations(pool[:1], beam=1)[0].text
    finally:
        batcher.close()


def test_a_dead_worker_fails_its_requests_and_another_takes_over(exp, pool):
    batcher = BatcherProcess(spec({"tiny": [exp]}))
    batcher.start()
    try:
        key = GroupKey("tiny", 3, 1, False)
        pid = batcher._process.pid
        os.kill(pid, signal.SIGSTOP)  # the request is surely held by the worker when it dies
        held = batcher.submit(key, pool[:4])
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerGone, match=r"the decoding process ended \(exit code -9\)"):
            held.result(timeout=60)
        wait_for(lambda: batcher.restarts == 1 and batcher._conn is not None and batcher._process.pid != pid)
        assert [t.text for t in batcher.submit(key, pool[:4]).result(timeout=120)] == \
            [t.text for t in Translator.load(exp, device="cpu").translations(pool[:4], beam=3)]
    finally:
        batcher.close()


def test_models_the_worker_cannot_load_are_one_line(exp, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(NmtError, match=rf"could not load the models: .*{broken.name}") as err:
        BatcherProcess(spec({"tiny": [exp], "broken": [broken]})).start()
    assert "\n" not in str(err.value)


def test_a_pool_shares_requests_out_and_outlives_a_worker(exp, pool):
    """Concurrent requests go to the worker with the fewest sentences outstanding, so both decode;
    the answers are the translator's; while one worker restarts, the other takes every request."""
    translator = Translator.load(exp, device="cpu")
    expected = [t.text for t in translator.translations(pool, beam=3)]
    workers = WorkerPool(spec({"tiny": [exp]}), 2)
    workers.start()
    try:
        key = GroupKey("tiny", 3, 1, False)
        futures = [workers.submit(key, [line]) for line in pool]  # all at once: the counts alternate
        assert [f.result(timeout=120)[0].text for f in futures] == expected
        assert [w.totals[0] for w in workers.workers] == [len(pool) // 2] * 2
        assert workers.totals[0] == len(pool) and all(w.outstanding == 0 for w in workers.workers)
        first = workers.workers[0]
        pid = first._process.pid
        os.kill(pid, signal.SIGSTOP)  # held until it is killed: a request in it fails, not lost
        held = workers.submit(key, pool[:1])
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerGone):
            held.result(timeout=60)
        wait_for(lambda: first.restarts == 1)
        assert [t.text for t in workers.submit(key, pool[:2]).result(timeout=120)] == expected[:2]
        wait_for(lambda: first.alive)
        assert workers.restarts == 1
    finally:
        workers.close()
    with pytest.raises(ShuttingDown):
        workers.submit(GroupKey("tiny", 3, 1, False), pool[:1])
