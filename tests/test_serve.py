"""`nmt serve`: the JSON API against `nmt translate`, bad input, the API key, batching, load."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

import nmt.serve
from nmt import Translator
from nmt.batcher import Batcher, GroupKey, ShuttingDown
from nmt.cli import build_parser, main
from nmt.errors import NmtError
from nmt.io import read_lines
from nmt.serve import (
    ServeSettings,
    create_app,
    default_workers,
    is_loopback,
    listen,
    page,
    parse_models,
)

from .conftest import ROOT

LIMITS = ServeSettings(max_sentences=8, max_chars=200, max_body_bytes=8192, max_beam=4, max_batch=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exp(trained_exp) -> Path:
    return trained_exp[1]


@pytest.fixture(scope="module")
def translator(exp) -> Translator:
    return Translator.load(exp, device="cpu")


@pytest.fixture(scope="module")
def pool(exp) -> list[str]:
    return read_lines(exp / "data" / "test.src")[:40]


@pytest.fixture(scope="module")
def app(translator):
    """The app the real server runs (each app runs in one server: its lifespan stops its worker)."""
    app = create_app({"tiny": translator, "same": translator}, LIMITS)
    yield app
    app.state.batcher.close()


@pytest.fixture(scope="module")
def asgi_app(translator):
    """The same API, for FastAPI's test client and schemathesis."""
    app = create_app({"tiny": translator, "same": translator}, LIMITS)
    yield app
    app.state.batcher.close()


@pytest.fixture(scope="module")
def client(asgi_app) -> Iterator[TestClient]:
    with TestClient(asgi_app) as client:
        yield client


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, in a thread of this process."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def live(app) -> Iterator[str]:
    with live_server(app) as url:
        yield url


def cli_lines(exp: Path, lines: list[str], tmp_path: Path, *options: str) -> list[str]:
    source, out = tmp_path / "in.de", tmp_path / "out.en"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert main(["translate", "--model", str(exp), "-i", str(source), "-o", str(out), *options]) == 0
    return out.read_bytes().decode("utf-8").split("\n")[:-1]


def as_printed(translation: dict, nbest: int) -> str:
    if nbest == 1:
        return translation["translation"]
    return "\t".join(f for h in translation["hypotheses"] for f in (h["translation"], f"{h['score']:.4f}"))


# -- answers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("beam, nbest", [(None, 1), (1, 1), (3, 2), (4, 4)])
def test_answers_are_what_nmt_translate_prints(exp, live, pool, tmp_path, beam, nbest):
    lines = [*pool[:20], "", "  ", "☃ unbekannt"]
    options = ["--nbest", str(nbest)] + (["--beam", str(beam)] if beam else [])
    printed = cli_lines(exp, lines, tmp_path, *options)
    answers = []
    with httpx.Client(base_url=live, timeout=60) as http:
        for start in range(0, len(lines), LIMITS.max_sentences):  # as several requests
            response = http.post("/translate", json={"sentences": lines[start : start + 8], "beam": beam,
                                                     "nbest": nbest, "model": "same"})
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["model"], body["beam"]) == ("same", beam or 3)
            answers += body["translations"]
    assert [a["source"] for a in answers] == lines
    assert [as_printed(a, nbest) for a in answers] == printed
    for a in answers:
        assert a["translation"] == a["hypotheses"][0]["translation"]
        assert len(a["hypotheses"]) == (nbest if a["source"].strip() else 1)
        assert all(h["attention"] is None for h in a["hypotheses"])


def test_attention_in_the_answer(client, translator, pool):
    response = client.post("/translate", json={"sentences": pool[:4], "nbest": 2, "attention": True})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny"  # the first model is the default
    expected = translator.translations(pool[:4], nbest=2, attention=True)
    for answer, ours in zip(body["translations"], expected):
        for h, c in zip(answer["hypotheses"], ours.hypotheses, strict=True):
            assert h["attention"] == {"source_words": c.attention.source_words,
                                      "target_words": c.attention.target_words, "weights": c.attention.weights}
            assert len(h["attention"]["weights"]) == len(h["attention"]["target_words"])
            assert all(abs(sum(row) - 1) < 1e-5 for row in h["attention"]["weights"])


def test_health_models_and_the_page(client, exp, pool, monkeypatch):
    before = client.get("/health").json()
    assert {k: before[k] for k in ("status", "models")} == {"status": "ok", "models": ["tiny", "same"]}
    assert client.post("/translate", json={"sentences": pool[:3]}).status_code == 200
    after = client.get("/health").json()  # the 3 sentences decoded together: beam search, a round a step
    assert after["sentences"] == before["sentences"] + 3 and after["rounds"] > before["rounds"]
    in_rounds = after["mean_batch"] * after["rounds"] - before["mean_batch"] * before["rounds"]
    assert 1 <= in_rounds / (after["rounds"] - before["rounds"]) <= 3
    models = client.get("/models").json()
    assert models["default"] == "tiny"
    assert models["models"][0] == {"name": "tiny", "checkpoint": "best.pt", "step": models["models"][0]["step"],
                                   "src_lang": "de", "tgt_lang": "en", "beam_size": 3, "attention": "bahdanau",
                                   "ensemble_size": 1}
    assert isinstance(models["models"][0]["step"], int) and models["models"][0]["step"] > 0
    index = ROOT / "nmt" / "web" / "index.html"
    assert page() == (index.read_text(encoding="utf-8") if index.is_file() else None)
    monkeypatch.setattr(nmt.serve, "page", lambda: "<!doctype html><title>nmt</title>")
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.text == "<!doctype html><title>nmt</title>"
    monkeypatch.setattr(nmt.serve, "page", lambda: None)
    response = client.get("/")
    assert response.status_code == 404 and "index.html" in response.json()["detail"]


def test_an_ensemble_is_described(exp):
    pair = Translator.load([exp, exp], device="cpu")
    with TestClient(create_app({"pair": pair})) as client:
        [info] = client.get("/models").json()["models"]
    assert (info["checkpoint"], info["ensemble_size"], info["attention"]) == ("best.pt, best.pt", 2, "bahdanau")


# -- bad input -------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
BAD = [
    ("malformed JSON", b'{"sentences": ["Ein Hund.", ', JSON, 400, r"^malformed JSON: .* at byte \d+$"),
    ("not an object", b'["Ein Hund."]', JSON, 422, r"^body: "),
    ("no body", b"", JSON, 422, r"^body: Field required"),
    ("a string for the list", b'{"sentences": "Ein Hund."}', JSON, 422, r"^sentences: Input should be a valid list"),
    ("a number for a sentence", b'{"sentences": ["a", 3]}', JSON, 422, r"^sentences\.1: Input should be a valid string"),
    ("a string for the beam", b'{"sentences": ["a"], "beam": "3"}', JSON, 422, r"^beam: Input should be a valid integer"),
    ("a number for a flag", b'{"sentences": ["a"], "attention": 1}', JSON, 422, r"^attention: "),
    ("an unknown field", b'{"sentences": ["a"], "beam_size": 3}', JSON, 422, r"^beam_size: Extra inputs"),
    ("an empty list", b'{"sentences": []}', JSON, 422, r"^sentences: List should have at least 1 item"),
    ("too many sentences", b'{"sentences": [' + b", ".join([b'"a"'] * 9) + b"]}", JSON, 413,
     r"^sentences: List should have at most 8 items"),
    ("too many, and a wrong beam", b'{"beam": "x", "sentences": [' + b", ".join([b'"a"'] * 9) + b"]}", JSON, 413,
     r"^sentences: List should have at most 8 items .* \(and 1 more\)$"),
    ("an over-long line", b'{"sentences": ["a", "' + b"b" * 201 + b'"]}', JSON, 413,
     r"^sentences\.1: String should have at most 200 characters"),
    ("two lines in one", b'{"sentences": ["Ein Hund.\\nEine Katze."]}', JSON, 422, r"^sentences\.0: a sentence is one line"),
    ("invalid UTF-8", b'{"sentences": ["Ein \xff\xfe Hund."]}', JSON, 400, r"^request body is not valid UTF-8"),
    ("an unknown model", b'{"sentences": ["a"], "model": "nope"}', JSON, 404, r"^unknown model 'nope'; known: tiny, same$"),
    ("nbest over the beam", b'{"sentences": ["a"], "beam": 2, "nbest": 3}', JSON, 422,
     r"^nbest: 3 is more than the beam size \(2\)$"),
    ("nbest over the default beam", b'{"sentences": ["a"], "nbest": 4}', JSON, 422, r"beam size \(3\)"),
    ("a beam over the cap", b'{"sentences": ["a"], "beam": 17}', JSON, 422, r"^beam: Input should be less than or equal to 4"),
    ("a beam of 0", b'{"sentences": ["a"], "beam": 0}', JSON, 422, r"^beam: Input should be greater than or equal to 1"),
    ("an oversize body", b'{"sentences": ["' + b"a" * 9000 + b'"]}', JSON, 413, r"^request body over 8192 bytes"),
]


def test_bad_requests_are_one_line_and_the_server_stays_up(live):
    with httpx.Client(base_url=live, timeout=30) as http:
        for what, body, headers, status, message in BAD:
            response = http.post("/translate", content=body, headers=headers)
            assert response.status_code == status, (what, response.text)
            assert response.headers["content-type"] == "application/json", what
            detail = response.json()["detail"]
            assert list(response.json()) == ["detail"] and "\n" not in detail, what
            assert re.search(message, detail), (what, detail)
            assert http.get("/health").status_code == 200, what
        # an oversize body without Content-Length (chunked) is cut off too
        response = http.post("/translate", content=iter([b'{"sentences": ["', b"a" * 5000, b"a" * 5000, b'"]}']),
                             headers=JSON)
        assert response.status_code == 413
        assert http.get("/nowhere").json() == {"detail": "Not Found"}
        assert http.get("/translate").status_code == 405
        assert http.post("/translate", json={"sentences": ["Ein Hund."]}).status_code == 200


def test_no_request_the_openapi_description_allows_is_a_server_error(asgi_app):
    """Requests made from /openapi.json, valid and not: no 5xx, every answer as described there.
    (The strategy is built in the test: schemathesis' pytest loader does not run on pytest 9.)"""
    # 413 is how this API refuses a body, a list or a sentence over the limits
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": [400, 404, 413, 422]}}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", asgi_app, config=config)
    cases = st.one_of([schema.as_strategy(generation_mode=mode) for mode in GenerationMode])

    @given(cases)
    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        body = case.body if isinstance(case.body, dict) else {}
        nbest, beam = body.get("nbest", 1), body.get("beam") or 3
        # nbest <= beam is the one bound JSON Schema cannot state: over it, a valid-looking request
        # is refused (422, tested in test_bad_requests_are_one_line_and_the_server_stays_up)
        over_beam = isinstance(nbest, (int, float)) and isinstance(beam, (int, float)) and nbest > beam
        case.call_and_validate(excluded_checks=[positive_data_acceptance] if over_beam else None)

    check()


def test_the_openapi_description_has_the_limits(client):
    spec = client.get("/openapi.json").json()
    request = spec["components"]["schemas"]["TranslateRequest"]
    sentences = request["properties"]["sentences"]
    assert (sentences["minItems"], sentences["maxItems"], sentences["items"]["maxLength"]) == (1, 8, 200)
    assert request["additionalProperties"] is False
    assert {"400", "404", "413", "422"} <= set(spec["paths"]["/translate"]["post"]["responses"])


# -- the API key and the address -------------------------------------------------------------------

def test_with_a_key_every_endpoint_but_the_page_and_health_needs_it(translator, monkeypatch):
    monkeypatch.setattr(nmt.serve, "page", lambda: "<p>page</p>")
    app = create_app({"tiny": translator}, ServeSettings(api_key="s3cret"))
    body = {"sentences": ["Ein Hund."]}
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200
        for method, path in (("GET", "/models"), ("POST", "/translate"), ("GET", "/openapi.json"), ("GET", "/docs")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "\n" not in response.json()["detail"] and "API key" in response.json()["detail"]
            ok = client.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200, (method, path)
    app.state.batcher.close()


def test_a_public_address_without_a_key_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NMT_API_KEY", raising=False)
    missing = tmp_path / "no-such-model"
    for host in ("0.0.0.0", "::"):
        assert main(["serve", "--model", str(missing), "--host", host]) == 2
        err = capsys.readouterr().err
        assert err == (f"nmt serve: error: --host {host} is not a loopback address: set NMT_API_KEY so that "
                       "requests need a key, or leave --host at 127.0.0.1\n")
    monkeypatch.setenv("NMT_API_KEY", "s3cret")  # with the key, it goes on: to the model
    assert main(["serve", "--model", str(missing), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert capsys.readouterr().err == f"nmt serve: error: {missing}: checkpoint not found\n"


def test_safe_defaults():
    args = build_parser().parse_args(["serve", "--model", "exp/de-en"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)
    defaults = ServeSettings()
    assert (args.max_sentences, args.max_chars, args.max_body_bytes, args.max_beam, args.max_batch,
            args.max_wait_ms, args.join_wait_ms) == (
        defaults.max_sentences, defaults.max_chars, defaults.max_body_bytes, defaults.max_beam,
        defaults.max_batch, defaults.max_wait_ms, defaults.join_wait_ms)
    assert (defaults.max_sentences, defaults.max_chars, defaults.max_body_bytes, defaults.max_beam,
            defaults.max_batch, defaults.max_wait_ms, defaults.join_wait_ms, defaults.api_key) == (
        64, 1000, 1 << 20, 16, 64, 5.0, 20.0, None)


def test_two_workers_by_default_on_a_cpu_with_two_threads():
    assert [default_workers("cpu", threads) for threads in (1, 2, 8)] == [1, 2, 2]


def test_loopback_addresses():
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "8.8.8.8"))


def test_a_port_in_use_and_bad_settings_are_one_line(exp, capsys):
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(exp), "--port", str(port)]) == 2
        assert re.fullmatch(rf"nmt serve: error: cannot listen on 127\.0\.0\.1:{port} \(.+\)\n",
                            capsys.readouterr().err)
    for option in ("--max-batch", "--max-sentences", "--max-chars", "--max-body-bytes", "--max-beam", "--threads",
                   "--workers"):
        assert main(["serve", "--model", str(exp), option, "0"]) == 2
        assert capsys.readouterr().err == f"nmt serve: error: {option} must be at least 1, got 0\n"
    assert main(["serve", "--model", str(exp), "--max-wait-ms", "-1"]) == 2
    assert capsys.readouterr().err == "nmt serve: error: --max-wait-ms must be 0 or more, got -1.0\n"
    assert main(["serve", "--model", str(exp), "--max-batch", "8"]) == 2  # a request fits in a batch
    assert capsys.readouterr().err == ("nmt serve: error: --max-sentences 64 is more than --max-batch 8: "
                                       "lower it, or raise --max-batch\n")
    assert main(["serve", "--model", str(exp), "--in-process", "--workers", "2"]) == 2
    assert capsys.readouterr().err == ("nmt serve: error: --in-process decodes in one thread of the server: "
                                       "it cannot have --workers 2\n")


def test_model_names(exp, tmp_path):
    best = exp / "model" / "best.pt"
    specs = parse_models([str(exp), f"b={best}", f"pair={exp},{best}", str(best)])
    assert [(s.name, s.paths) for s in specs] == [
        (exp.name, [exp]), ("b", [best]), ("pair", [exp, best]), ("best", [best])]
    with pytest.raises(NmtError, match=r"^--model: two models are named 'best': name them with --model NAME=PATH$"):
        parse_models([str(best), f"best={exp}"])
    with pytest.raises(NmtError, match="the name before '=' is empty"):
        parse_models([f"={exp}"])


@pytest.mark.parametrize("where", ["worker", "in-process", "two workers"])
def test_nmt_serve_runs_and_stops_on_sigterm(exp, pool, translator, tmp_path, where):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "nmt.cli", "serve", "--model", f"tiny={exp}",
                                    "--port", "0", "--threads", "1", *(["--in-process"] if where == "in-process" else []),
                                    *(["--workers", "2"] if where == "two workers" else [])],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "NMT_API_KEY"})
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"nmt serve: tiny on http://127\.0\.0\.1:(\d+)\n", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{found[1]}", timeout=60) as http:
            assert http.get("/health").json() == {"status": "ok", "models": ["tiny"], "sentences": 0, "rounds": 0,
                                                 "mean_batch": 0.0}
            answer = http.post("/translate", json={"sentences": pool[:3]}).json()
            assert [t["translation"] for t in answer["translations"]] == translator.translate(pool[:3])
            assert http.get("/models").json()["models"][0]["checkpoint"] == "best.pt"
            children = [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                        for pid in (task / "children").read_text().split()]
            workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert len(workers) == {"worker": 1, "in-process": 0, "two workers": 2}[where]
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(60)
    assert status == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # the worker stopped with it


# -- batching and load -----------------------------------------------------------------------------

def test_requests_that_agree_are_decoded_together(translator, pool):
    batcher = Batcher({"tiny": translator}, max_batch=6, max_wait=0.5)
    beam3, greedy = GroupKey("tiny", 3, 1, False), GroupKey("tiny", 1, 1, False)
    jobs = [(beam3, pool[0:2]), (beam3, pool[2:4]), (beam3, pool[4:6]),  # 6 sentences: a full batch
            (greedy, pool[6:8]), (beam3, pool[8:12]), (beam3, pool[12:15])]  # 4 + 3 > 6: two batches
    futures = [batcher.submit(key, sentences) for key, sentences in jobs]
    results = [future.result(timeout=60) for future in futures]
    batcher.close()
    assert [(b.sentences, b.requests) for b in batcher.history] == [(6, 3), (2, 1), (4, 1), (3, 1)]
    for (key, sentences), result in zip(jobs, results):
        expected = translator.translations(sentences, beam=key.beam)
        # the same words; the scores to float rounding (a request that joins a running search
        # shares its steps with other sources, padded to the longest)
        assert [(t.source, t.text) for t in result] == [(t.source, t.text) for t in expected]
        assert all(math.isclose(a.hypotheses[0].score, b.hypotheses[0].score, rel_tol=1e-5)
                   for a, b in zip(result, expected))
    with pytest.raises(ShuttingDown, match="shutting down"):
        batcher.submit(beam3, pool[:1])
    batcher.open()  # as a server's lifespan does when it starts again
    [again] = batcher.submit(greedy, pool[:1]).result(timeout=60)
    assert again.text == translator.translations(pool[:1], beam=1)[0].text
    batcher.close()


def test_requests_that_come_while_a_search_runs_join_it_together(translator, pool):
    """With a join wait, requests that arrive while a beam search runs wait to join it in one
    encoder call: until the oldest of them has waited join_wait, or they fill the search's room.
    _take is the decoding thread's choice between two steps, asked here of a real search."""
    from concurrent.futures import Future

    from nmt.batcher import Job, Running
    from nmt.batches import pad
    from nmt.search import BeamSearch

    key = GroupKey("tiny", 3, 1, False)
    batcher = Batcher({"tiny": translator}, max_batch=4, max_wait=0.0, join_wait=0.5)
    decode = translator.settings(3, batch_size=4)
    search = BeamSearch(translator.model, decode)
    src_ids, src_lens = pad(translator.encode(pool[:1], decode))
    search.add(src_ids, src_lens, [(0, 0)])
    running = Running(key, translator, decode, search)  # one sentence searching: room for 3

    def waiting(sentences: list[str], waited: float) -> Job:
        job = Job(key, sentences, Future(), time.monotonic() - waited)
        batcher._pending.append(job)
        return job

    first = waiting(pool[1:2], 0.0)
    assert batcher._take(running) == []  # just came: it waits for company
    second = waiting(pool[2:3], 0.0)
    assert batcher._take(running) == [] and len(batcher._pending) == 2
    first.arrived -= 1.0  # the oldest has now waited longer than join_wait: both join at once
    assert batcher._take(running) == [first, second] and not batcher._pending
    full = waiting(pool[3:6], 0.0)  # three sentences fill the room: no waiting
    assert batcher._take(running) == [full]
    batcher.join_wait = 0.0  # no join wait: a request joins at the next step
    assert batcher._take(running) == [] and batcher._take(running) == []  # (nothing waits)
    alone = waiting(pool[6:7], 0.0)
    assert batcher._take(running) == [alone]


def test_load_sixteen_clients_lose_no_request(exp):
    """2,000 one-sentence requests from 16 concurrent clients (asyncio tasks: one thread, so that
    the clients leave the processor to the server) against a real server, bounded in time."""
    requests, clients = 2000, 16
    translator = Translator.load(exp, device="cpu")
    # The test is of the server: outputs of at most 8 tokens (the tiny model would say ~20).
    translator.decode = dataclasses.replace(translator.decode, max_len_a=0.0, max_len_b=8)
    pool = read_lines(exp / "data" / "test.src")[:40]
    expected = {beam: [t.text for t in translator.translations(pool, beam=beam)] for beam in (1, 3)}
    answers: dict[int, tuple[int, int, dict]] = {}
    app = create_app({"tiny": translator})

    async def client(http: httpx.AsyncClient, numbers: Iterator[int]) -> None:
        for i in numbers:
            beam = 3 if i % 8 == 0 else 1  # two groups, decoded apart
            response = await http.post("/translate", json={"sentences": [pool[i % len(pool)]], "beam": beam})
            answers[i] = (beam, response.status_code, response.json())

    async def load(url: str) -> None:
        numbers = iter(range(requests))  # shared: each client takes the next number
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            await asyncio.wait_for(asyncio.gather(*(client(http, numbers) for _ in range(clients))), 120)

    with live_server(app) as url:
        asyncio.run(load(url))
    assert sorted(answers) == list(range(requests))
    for i, (beam, status, body) in answers.items():
        assert status == 200, body
        assert [t["source"] for t in body["translations"]] == [pool[i % len(pool)]]
        assert body["translations"][0]["translation"] == expected[beam][i % len(pool)], i
    history = list(app.state.batcher.history)
    assert sum(b.sentences for b in history) == requests
    assert max(b.requests for b in history) > 1  # concurrent requests shared batches
