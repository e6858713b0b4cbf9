"""The event loop waits on nobody: not on a body being parsed, a header without end, a stopped
engine process; and a dead engine process stops the server (exit status 3) for a supervisor to
start again. Each test holds the slow party still until the loop has shown it is free, so no
outcome depends on the machine's speed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from familial.infer.engine import Engine
from familial.infer.process import EngineProcess

COMPLETION = {"model": "exit-1", "prompt": "Once", "max_tokens": 2}
# What issue 21 sent: 588 KB of invalid token ids (1.8-4.9 s of the event loop, each).
NEGATIVE_IDS = ('{"model": "exit-1", "prompt": [' + ", ".join(["-1"] * 196000) + "]}").encode()


@pytest.fixture(scope="module")
def long_context(family_dir, serve):
    """A server with the family's whole 4096-token context: the Guard then lets bodies of
    ~196,000 JSON items through to the parser."""
    engine = Engine.from_checkpoint(family_dir, max_batch_size=1, max_queue=4)
    with serve(engine) as running:
        yield running


def test_a_body_is_parsed_and_validated_off_the_event_loop(long_context, http, monkeypatch):
    """Parsing a body is held until /health and /v1/models have answered: on the event loop,
    they could not answer until the hold gave up."""
    body = ('{"model": "exit-1", "prompt": [' + ", ".join(["-1"] * 500) + "]}").encode()
    held, release, outcome = threading.Event(), threading.Event(), []
    loads = json.loads

    def held_loads(text, *args, **kwargs):
        if text == body:
            held.set()
            outcome.append("released" if release.wait(60) else "gave up")
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", held_loads)
    replies = []
    sender = threading.Thread(target=lambda: replies.append(http.post(long_context.url, "/v1/completions", body)))
    sender.start()
    try:
        assert held.wait(120), "the body never reached the parser"
        assert http.get(long_context.url, "/health")[0] == 200
        assert http.get(long_context.url, "/v1/models")[0] == 200
    finally:
        release.set()
        sender.join()
    assert outcome == ["released"]
    (status, reply), = replies
    assert status == 400 and reply["error"]["param"] == "prompt", reply


def test_a_body_of_many_items_is_measured_in_a_worker_process(long_context, http):
    """json.loads holds the GIL, in whatever thread: the 588 KB body is measured by a worker
    process, which is held stopped here until /health and /v1/models have answered."""
    bodies = long_context.app.state.server.bodies
    bodies.timeout = 300  # the worker is stopped on purpose: no measuring deadline meanwhile
    worker, = bodies.all
    os.kill(worker.pid, signal.SIGSTOP)
    replies = []
    sender = threading.Thread(target=lambda: replies.append(
        http.post(long_context.url, "/v1/completions", NEGATIVE_IDS)))
    try:
        sender.start()
        assert http.get(long_context.url, "/health")[0] == 200
        assert http.get(long_context.url, "/v1/models")[0] == 200
        assert sender.is_alive()  # its body is with the stopped worker
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        sender.join()
    (status, reply), = replies
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
    # The object, its two keys, the model, the list and its 196,000 ids.
    assert "holds 196005 JSON items" in reply["error"]["message"]


def test_unknown_keys_are_refused_in_a_short_error(long_context, http):
    """190,000 unknown keys (4.5 s of the loop), and an 8 MB key name (a 16 MB error response)."""
    many = {"model": "exit-1", "prompt": "x", **{f"k{i}": 0 for i in range(190000)}}
    nested = {"model": "exit-1", "messages": [{"role": "user", "content": "x", **{f"k{i}": 0 for i in range(50000)}}]}
    few = {"model": "exit-1", "messages": [{"role": "user", "content": "x", "k0": 0}]}
    huge_key = {"model": "exit-1", "prompt": "x", "k" * (8 * 2**20 - 100): 0}
    for path, body, expected in (
            ("/v1/completions", many, "the request has an object of 190002 keys; this API's objects have at most"),
            ("/v1/chat/completions", nested, "the request has an object of 50002 keys"),
            ("/v1/chat/completions", few, "messages.0.k0: unsupported parameter"),
            ("/v1/completions", huge_key, "kkkkkkkk")):
        connection = http.connect(long_context.url)
        try:
            connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        assert response.status == 400 and len(data) < 1024, data[:300]
        error = json.loads(data)["error"]
        assert error["message"].startswith(expected), error
    assert error["message"].endswith("...: unsupported parameter") and error["param"].endswith("...")
    assert http.post(long_context.url, "/v1/completions", COMPLETION)[0] == 200


def test_a_header_without_end_gets_431_and_the_server_answers_others(long_context, http):
    """10 MB of one header: the parser copied the header on every read (seconds of the loop)
    and answered 200. Now the head is cut at 32 KiB."""
    host, port = long_context.url.split("//")[1].split(":")
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: " + b"a" * (10 * 2**20) + b"\r\n\r\n"
    sent: list[BaseException] = []

    def send(sock: socket.socket) -> None:
        try:
            sock.sendall(head)
        except OSError as error:  # the server closed the connection: what it should do
            sent.append(error)

    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sender = threading.Thread(target=send, args=(sock,))
        sender.start()
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # the kernel resets a closed socket that still receives; the 431 may be lost with it
        sender.join()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"headers_too_large" in reply or reply == b""
    assert http.get(long_context.url, "/health")[0] == 200
    # A head of ordinary size still passes.
    connection = http.connect(long_context.url)
    connection.request("GET", "/health", headers={"X-Padding": "a" * 16000})
    assert connection.getresponse().status == 200
    connection.close()


def test_a_stopped_engine_process_holds_up_no_other_request(family_dir, serve, http):
    """With the engine process stopped (SIGSTOP), a completion waits for it; /v1/models and the
    page answer meanwhile. The submission waited on the loop for up to a minute, then failed."""
    engine = EngineProcess(family_dir, threads=1, max_batch_size=2, max_queue=4, max_seq_len=128)
    with serve(engine) as server:
        pid = engine._process.pid
        os.kill(pid, signal.SIGSTOP)
        replies = []
        sender = threading.Thread(target=lambda: replies.append(http.post(server.url, "/v1/completions", COMPLETION)))
        try:
            sender.start()
            deadline = time.monotonic() + 120
            while not engine._replies:  # the submission is waiting for the engine's answer
                assert time.monotonic() < deadline, "the completion never reached the engine"
                time.sleep(0.02)
            assert http.get(server.url, "/v1/models")[0] == 200
            assert http.get(server.url, "/")[0] == 200
        finally:
            os.kill(pid, signal.SIGCONT)
            sender.join()
        (status, reply), = replies
        assert status == 200 and reply["usage"]["completion_tokens"] == 2, reply


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_child(pid: int) -> int:
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"familial.infer.process" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no engine process")


def test_a_killed_engine_process_stops_the_server_with_status_3(family_dir, http):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "familial.cli", "serve", str(family_dir), "--port", str(port),
                                "--max-batch-size", "1", "--max-seq-len", "128"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        assert http.server_up(url, process)[0] == 200
        os.kill(engine_child(process.pid), signal.SIGKILL)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 3, output
    assert "error: the engine process ended (exit code -9); the server stops (exit status 3)" in output
