"""A tiny family with the shipped demo tokenizer, and the real server on a free local port."""

from __future__ import annotations

import http.client as http_client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from familial.chat_template import ChatTemplate
from familial.checkpoint_io import save_family
from familial.config import FamilyConfig
from familial.infer.engine import Engine
from familial.infer.process import EngineProcess
from familial.model import FamilyModel
from familial.serve.guard import ClientPolicy

ASSETS = Path(str(resources.files("familial.data").joinpath("assets")))
CHATML = ChatTemplate()


def write_family(directory: Path) -> Path:
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(ASSETS / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    # No eos: a random model would end answers at a chance token; stop strings test "stop".
    config = FamilyConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 3],
                          member_names={"small": 1}, max_position_embeddings=4096)
    return save_family(FamilyModel(config), directory, tokenizer_source=ASSETS)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory) -> Path:
    return write_family(tmp_path_factory.mktemp("serve") / "family")


@dataclass
class Live:
    url: str
    engine: Engine
    app: object


@contextmanager
def serve_engine(engine: Engine, chat_template: ChatTemplate | None = CHATML, policy: ClientPolicy | None = None,
                 **options) -> Iterator[Live]:
    """Run create_app(engine, ...) under uvicorn in a thread, as `familial serve` runs it, on
    127.0.0.1:<free port> (so Host names other than loopback ones are refused by default)."""
    from familial.serve.app import create_app
    from familial.serve.guard import uvicorn_server

    policy = policy or ClientPolicy(loopback_only=True)
    app = create_app(engine, engine.tokenizer, chat_template, policy, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn_server(app, policy, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    engine.start()
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", engine, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()
        sock.close()


@pytest.fixture(scope="session")
def serve():
    """serve(engine, chat_template=CHATML, policy=None, **create_app options): a live server."""
    return serve_engine


@pytest.fixture(scope="module")
def live(family_dir) -> Iterator[Live]:
    """The server as `familial serve` runs it: the engine in a process of its own."""
    engine = EngineProcess(family_dir, threads=1, max_batch_size=4, max_queue=16, max_seq_len=256)
    with serve_engine(engine) as running:
        yield running


@pytest.fixture
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60)


class Http:
    """Raw requests, for what the openai client will not send: malformed bodies, dropped streams."""

    @staticmethod
    def connect(url: str) -> http_client.HTTPConnection:
        parts = urlsplit(url)
        return http_client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def request(self, url: str, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        connection = self.connect(url)
        try:
            if body is not None and not isinstance(body, (str, bytes)):
                body = json.dumps(body)
            headers = {"Content-Type": content_type} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            is_json = response.getheader("content-type", "").startswith("application/json")
            return response.status, json.loads(data) if is_json else data.decode()
        finally:
            connection.close()

    def get(self, url: str, path: str) -> tuple[int, Any]:
        return self.request(url, "GET", path)

    def post(self, url: str, path: str, body: Any, content_type: str = "application/json") -> tuple[int, Any]:
        return self.request(url, "POST", path, body, content_type)

    def health_until(self, url: str, condition, what: str, seconds: float = 60.0) -> dict:
        """Poll /health until condition(health) holds (the engine changes state between steps)."""
        deadline = time.monotonic() + seconds
        while True:
            _, health = self.get(url, "/health")
            if condition(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}; last /health: {health}")
            time.sleep(0.05)

    def server_up(self, url: str, process, seconds: float = 120.0) -> tuple[int, Any]:
        """The first /health answer of a `familial serve` started as `process` (which must not
        end first)."""
        deadline = time.monotonic() + seconds
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                return self.get(url, "/health")
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)

    def open_stream(self, url: str, path: str, body: dict):
        """Start a streaming request; returns (connection, response) with the body unread."""
        connection = self.connect(url)
        connection.request("POST", path, body=json.dumps({**body, "stream": True}),
                           headers={"Content-Type": "application/json"})
        return connection, connection.getresponse()


@pytest.fixture(scope="session")
def http() -> Http:
    return Http()
