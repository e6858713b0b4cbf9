"""Who may use the server: the API key, the Host a loopback server answers to, slow clients."""

from __future__ import annotations

import argparse
import http.client
import json
import socket

import openai
import pytest

from familial.infer.engine import Engine
from familial.commands.serve import serve as serve_command
from familial.serve.guard import ClientPolicy

KEY = "s3cret-key"
ROUTES = [("GET", "/v1/models", None),
          ("POST", "/v1/completions", {"model": "exit-1", "prompt": "Once", "max_tokens": 2}),
          ("POST", "/v1/chat/completions", {"model": "exit-1", "max_tokens": 2,
                                            "messages": [{"role": "user", "content": "hi"}]}),
          ("GET", "/v1/nothing", None)]


def call(url: str, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, object]:
    connection = http.client.HTTPConnection(url.split("//")[1], timeout=60)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        data = response.read()
        kind = response.getheader("content-type", "")
        return response.status, dict(response.getheaders()), json.loads(data) if "json" in kind else data
    finally:
        connection.close()


@pytest.fixture(scope="module")
def keyed(family_dir, serve):
    engine = Engine.from_checkpoint(family_dir, max_batch_size=2, max_queue=4, max_seq_len=128)
    with serve(engine, policy=ClientPolicy(api_key=KEY)) as running:
        yield running


@pytest.mark.parametrize("method, path, body", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_v1_route_needs_the_key(keyed, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, response_headers, reply = call(keyed.url, method, path, body, headers)
        assert status == 401, reply
        assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["code"] == "invalid_api_key"
        assert response_headers["www-authenticate"] == "Bearer"
    status, _, reply = call(keyed.url, method, path, body, {"Authorization": f"Bearer {KEY}"})
    assert status == (404 if path == "/v1/nothing" else 200), reply


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_the_schema_and_docs_pages_need_the_key(keyed, path):
    status, _, reply = call(keyed.url, "GET", path)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert call(keyed.url, "GET", path, headers={"Authorization": f"Bearer {KEY}"})[0] == 200


def test_health_and_the_page_stay_open_and_the_openai_client_works_with_the_key(keyed):
    assert call(keyed.url, "GET", "/health")[0] == 200
    assert call(keyed.url, "GET", "/")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert client.completions.create(model="exit-1", prompt="Once", max_tokens=2).usage.completion_tokens == 2


def test_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FAMILIAL_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    assert parser.parse_args(["family"]).api_key == "from-env"
    assert parser.parse_args(["family", "--api-key", "given"]).api_key == "given"


def test_a_loopback_server_answers_only_loopback_host_names(live):
    port = live.url.rsplit(":", 1)[1]
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}"):
        assert call(live.url, "GET", "/health", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]:80", "[::1]evil.example",
                 f"[::1]evil.example:{port}", "::1", "localhost:80:evil.example"):
        status, _, reply = call(live.url, "GET", "/v1/models", headers={"Host": host})
        assert status == 400 and reply["error"]["code"] == "invalid_host", (host, reply)


def test_a_request_with_two_host_headers_is_refused(live):
    """With two, the last one was checked, and a proxy or the app may read the first."""
    host, port = live.url.split("//")[1].split(":")
    for first, second in (("evil.example", "127.0.0.1"), ("127.0.0.1", "evil.example"), ("127.0.0.1", "localhost")):
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            reply = read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 400 ") and b'"invalid_host"' in reply, reply[:300]


def test_any_host_is_answered_off_loopback(family_dir, serve):
    engine = Engine.from_checkpoint(family_dir, max_batch_size=1, max_queue=2, max_seq_len=128)
    with serve(engine, policy=ClientPolicy(loopback_only=False)) as running:
        assert call(running.url, "GET", "/health", headers={"Host": "familial.example:8000"})[0] == 200


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_slow_clients_are_cut_off(family_dir, serve):
    engine = Engine.from_checkpoint(family_dir, max_batch_size=1, max_queue=2, max_seq_len=128)
    policy = ClientPolicy(loopback_only=True, header_timeout=0.5, body_timeout=0.5)
    with serve(engine, policy=policy) as running:
        host, port = running.url.split("//")[1].split(":")
        # The socket's own timeout only ends the test if the server never closes.
        with socket.create_connection((host, int(port)), timeout=120) as slow_head:
            slow_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert read_until_closed(slow_head) == b""
        with socket.create_connection((host, int(port)), timeout=120) as slow_body:
            slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
            reply = read_until_closed(slow_body)
        assert reply.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in reply
        # A body announced too large is refused unread; what follows is dropped, and the
        # connection closes when the next head is overdue.
        with socket.create_connection((host, int(port)), timeout=120) as endless:
            endless.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Length: 1000000000000\r\n\r\n" + b"x" * 65536)
            assert read_response(endless).startswith(b"HTTP/1.1 413 ")
            endless.sendall(b"x" * 65536)
            assert read_until_closed(endless) == b""
        # After a whole request, the next head is also due in time.
        with socket.create_connection((host, int(port)), timeout=120) as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(idle).startswith(b"HTTP/1.1 200 ")
            idle.sendall(b"GET /health HTTP/1.1\r\n")
            assert read_until_closed(idle) == b""
        assert call(running.url, "GET", "/health")[0] == 200
